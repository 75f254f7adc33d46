"""One Flax NNX decoder-only transformer for the llama, mistral, qwen2, phi and gpt2 families.

The math follows transformers 5.24's PyTorch modeling code exactly:

* rotary embeddings in HF's "split halves" layout (``rotate_half``), optionally on only the
  first ``rotary_dim`` dims of each head (phi's partial rotary), with ``llama3``/``linear``
  frequency scaling;
* RMSNorm computed in float32 and cast back before the scale (llama), or LayerNorm (phi, gpt2);
* grouped-query attention, scores and softmax in float32 (`ngdiff_jax.models.attention`: an
  einsum reference, or ``jax.nn.dot_product_attention`` with XLA's or cuDNN's kernel);
* phi's parallel block ``x + attn(ln(x)) + mlp(ln(x))``; gpt2's learned positions.

Weights use einsum layouts (``q: [embed, heads, head_dim]``, ``o: [heads, head_dim, embed]``,
``mlp: [embed, mlp]``); ``hf.py`` converts to and from HF's tensors. The projections, the embedding
lookup, the LM head and remat are the primitives of the model's `ngdiff_jax.backends.Backend`
(``backend=``: plain JAX, or the CPU kernels of `ngdiff_jax.backends.cpu`), a static
attribute of every module that computes. Every parameter is an
``nnx.Param``; there are no other variables, so ``nnx.state(model)`` is exactly the parameters.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngdiff_jax.backends import Backend, forward_mode
from ngdiff_jax.backends import resolve as resolve_backend
from ngdiff_jax.bits import from_bits
from ngdiff_jax.models.attention import attend, resolve_attention
from ngdiff_jax.models.config import ModelConfig
from ngdiff_jax.models.logprobs import IGNORE_INDEX, TokenLogprobs
from ngdiff_jax.shifted import shift_leaf

Array = jax.Array
NEG_INF = -1e30


def _act(name: str):
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}")


class Dense(nnx.Module):
    """``y = einsum(eq, x, kernel) + bias`` with an arbitrary kernel shape."""

    def __init__(self, eq: str, kernel_shape, bias_shape, *, rngs: nnx.Rngs, std: float,
                 dtype, param_dtype, backend: Backend):
        self.eq = eq
        self.dtype = dtype
        self.backend = backend
        init = jax.nn.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), tuple(kernel_shape), param_dtype))
        self.bias = nnx.Param(jnp.zeros(tuple(bias_shape), param_dtype)) if bias_shape is not None else None
        # an optional low-rank adapter, set by `ngdiff_jax.models.lora.attach`: a module with
        # ``lora_a [in, r]``, ``lora_b [r, out]`` and ``scale`` (an ``nnx.LoRA``), added by `add_adapters`
        self.lora = nnx.data(None)

    def __call__(self, x: Array) -> Array:
        return dense_many([self], x)[0]


def dense_many(layers, x: Array) -> list[Array]:
    """``[layer(x) for layer in layers]`` for `Dense` layers reading the same ``x`` (one kernel
    call, so a backend can share their backward)."""
    dt = layers[0].dtype
    ws = [layer.kernel[...].astype(dt) for layer in layers]
    ys = layers[0].backend.einsums([layer.eq for layer in layers], x.astype(dt), ws)
    ys = [y if layer.bias is None else y + layer.bias[...].astype(dt) for y, layer in zip(ys, layers)]
    return add_adapters(layers, x.astype(dt), ys)


def add_adapters(layers, x: Array, ys: list[Array]) -> list[Array]:
    """``ys[j] + scale_j * (x @ A_j) @ B_j`` for the `Dense` layers that carry a LoRA adapter
    (``layer.lora``; PEFT's definition on the projection flattened to 2-D), ``ys`` unchanged for the
    others. ``x`` is the layers' shared input: the ``x @ A_j`` are one backend call."""
    idx = [j for j, layer in enumerate(layers) if layer.lora is not None]
    if not idx:
        return ys
    ops = layers[0].backend
    B, T = x.shape[:2]
    x2 = x.reshape(B, T, math.prod(x.shape[2:]))
    hs = ops.einsums(["btk,kr->btr"] * len(idx), x2, [layers[j].lora.lora_a[...].astype(x.dtype) for j in idx])
    ys = list(ys)
    for j, h in zip(idx, hs):
        lora = layers[j].lora
        d = ops.einsums(["btr,ro->bto"], h * lora.scale, [lora.lora_b[...].astype(x.dtype)])[0]
        ys[j] = ys[j] + d.reshape(ys[j].shape).astype(ys[j].dtype)
    return ys


class Norm(nnx.Module):
    def __init__(self, dim: int, kind: str, eps: float, *, dtype, param_dtype):
        self.kind = kind
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if kind == "layer" else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "rms":
            var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
            y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
            return self.scale[...].astype(self.dtype) * y
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        xc = x32 - mean
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding (float32), as transformers computes them."""
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    s = cfg.rope_scaling_dict
    if s is None:
        return inv
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return (inv / np.float32(s["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = s["factor"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wl = 2 * math.pi / inv
        out = np.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return np.where(medium, smoothed, out).astype(np.float32)
    return inv


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray, rotary_dim: int) -> Array:
    """``x: [B, T, H, D]``, positions ``[B, T]``; HF split-halves layout on the first ``rotary_dim`` dims."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    xr = xr * cos + rot * sin
    return jnp.concatenate([xr, xp], axis=-1) if rotary_dim < x.shape[-1] else xr


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs, dtype, param_dtype, backend: Backend,
                 attention: str = "einsum"):
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.initializer_range
        kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype, backend=backend)
        self.q_proj = Dense("bte,ehd->bthd", (E, H, D), (H, D) if cfg.qkv_bias else None, **kw)
        self.k_proj = Dense("bte,ehd->bthd", (E, K, D), (K, D) if cfg.qkv_bias else None, **kw)
        self.v_proj = Dense("bte,ehd->bthd", (E, K, D), (K, D) if cfg.qkv_bias else None, **kw)
        self.o_proj = Dense("bthd,hde->bte", (H, D, E), (E,) if cfg.o_bias else None, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, D
        self.scale = cfg.attn_scale / ((layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else 1)
        self.rope = cfg.position_embedding == "rope"
        self.rotary_dim = cfg.rotary_dim
        self.inv_freq = tuple(float(v) for v in rope_inv_freq(cfg)) if self.rope else ()
        self.sliding_window = cfg.sliding_window
        self.dtype = dtype
        self.attention = attention  # static: ngdiff_jax.models.attention

    def __call__(self, x, positions, kv_valid, cache=None, write_index=None):
        B, T, _ = x.shape
        q, k, v = dense_many([self.q_proj, self.k_proj, self.v_proj], x)
        if self.rope:
            inv = np.asarray(self.inv_freq, np.float32)
            q = apply_rope(q, positions, inv, self.rotary_dim)
            k = apply_rope(k, positions, inv, self.rotary_dim)
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, write_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, write_index, 0, 0))
            new_cache = (k, v)
            q_slot = write_index + jnp.arange(T)
        else:
            new_cache = None
            q_slot = jnp.arange(T)
        if kv_valid.ndim == 3:  # the whole mask [B, T, S], as given (packed rows)
            mask = kv_valid.astype(bool)
        else:
            S = k.shape[1]
            k_slot = jnp.arange(S)
            allowed = k_slot[None, :] <= q_slot[:, None]
            if self.sliding_window is not None:
                allowed = allowed & (q_slot[:, None] - k_slot[None, :] < self.sliding_window)
            mask = allowed[None, :, :] & kv_valid[:, None, :].astype(bool)  # [B, T, S]
        out = attend(q, k, v, mask, self.scale, self.attention, self.dtype)
        return self.o_proj(out), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype, backend: Backend):
        E, M = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, backend=backend)
        b = cfg.mlp_bias
        self.gated = cfg.gated_mlp
        if self.gated:
            self.gate_proj = Dense("bte,em->btm", (E, M), (M,) if b else None, **kw)
            self.up_proj = Dense("bte,em->btm", (E, M), (M,) if b else None, **kw)
            self.down_proj = Dense("btm,me->bte", (M, E), (E,) if b else None, **kw)
        else:
            self.fc1 = Dense("bte,em->btm", (E, M), (M,) if b else None, **kw)
            self.fc2 = Dense("btm,me->bte", (M, E), (E,) if b else None, **kw)
        self.act = cfg.activation

    def __call__(self, x):
        f = _act(self.act)
        if self.gated:
            gate, up = dense_many([self.gate_proj, self.up_proj], x)
            down = self.down_proj
            dt = down.dtype
            y = down.backend.gated_down(f, gate, up, down.kernel[...].astype(dt))
            y = add_adapters([down], (f(gate) * up).astype(dt), [y])[0]  # the fused path must not skip one
            return y if down.bias is None else y + down.bias[...].astype(dt)
        return self.fc2(f(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs, dtype, param_dtype, backend: Backend,
                 attention: str = "einsum"):
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        self.backend = backend
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm_type, cfg.norm_eps, **nkw)
        self.attn = Attention(cfg, layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype, backend=backend,
                              attention=attention)  # fmt: skip
        self.parallel = cfg.parallel_block
        self.mlp_norm = None if self.parallel else Norm(cfg.hidden_size, cfg.norm_type, cfg.norm_eps, **nkw)
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, backend=backend)

    def __call__(self, x, positions, kv_valid, cache=None, write_index=None):
        h = self.attn_norm(x)
        a, new_cache = self.attn(h, positions, kv_valid, cache, write_index)
        if self.parallel:
            return x + a + self.mlp(h), new_cache
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), new_cache


class CausalLM(nnx.Module):
    """Decoder-only LM. ``model(input_ids, attention_mask=None) -> float32 logits [B, T, V]``.

    ``model.config`` is the `ModelConfig`. ``dtype`` is the compute dtype, ``param_dtype``
    the storage dtype of the parameters (e.g. bf16 compute with float32 parameters).
    ``backend`` (a `ngdiff_jax.backends.Backend`, ``"xla"``, ``"cpu_fast"`` or ``None`` for the
    platform's, `ngdiff_jax.backends.for_platform`) supplies the compute primitives and the
    platform's defaults; it is ``model.backend`` (static), ``model.kernels`` its name.
    ``attention`` (``"einsum"``, ``"xla"``, ``"cudnn"`` or ``None`` for the backend default, by the
    compute dtype) picks the attention implementation, see `ngdiff_jax.models.attention`
    (``model.attention``, static). ``head_chunk_elements`` sizes the chunks of `token_logprobs`'s
    head (logits per chunk; ``None``: the backend's, `ngdiff_jax.backends`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, backend: Backend | str | None = None,
                 attention: str | None = None, head_chunk_elements: int | None = None,
                 scan_layers: bool = False):
        cfg = config
        self.config = cfg
        self.scan_layers = bool(scan_layers)
        self.backend = b = resolve_backend(backend)
        self.attention = resolve_attention(attention, dtype, b)
        self.head_chunk_elements = int(head_chunk_elements or b.head_chunk_elements)
        self.dtype = dtype
        self.param_dtype = param_dtype
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        if cfg.position_embedding == "learned":
            self.pos_embed = nnx.Param(
                init(rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), param_dtype))
        else:
            self.pos_embed = None
        block = partial(Block, cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, backend=b,
                        attention=self.attention)  # fmt: skip
        if scan_layers:  # one block whose every weight has a leading [num_layers] axis (`_stacked_blocks`)
            self.layers = _stacked_blocks(cfg, block, rngs)
        else:
            self.layers = nnx.List([block(i) for i in range(cfg.num_layers)])
        self.final_norm = Norm(cfg.hidden_size, cfg.norm_type, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense("bte,ev->btv", (cfg.hidden_size, cfg.vocab_size),
                                 (cfg.vocab_size,) if cfg.lm_head_bias else None,
                                 rngs=rngs, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype,
                                 backend=b)  # fmt: skip

    @property
    def kernels(self) -> str:
        """The backend's name: ``"cpu_fast"`` (the CPU kernels) or ``"xla"`` (portable)."""
        return self.backend.name

    # ------------------------------------------------------------------
    def _require_weights(self) -> None:
        if isinstance(self.embed.get_value(), jax.ShapeDtypeStruct):
            raise ValueError("this CausalLM holds no weights, only their shapes: it gave its arrays away "
                             "(functional(..., release=True) or abstract_model); call the view "
                             "those returned with the params, or models.with_params(model, params).")  # fmt: skip

    def forward(self, input_ids: Array, positions: Array, kv_valid: Array, cache=None, write_index=None,
                last_only: bool = False, return_hidden: bool = False, stacked=None):
        """Core forward. ``kv_valid [B, S]`` marks attendable key slots (S = T without a cache,
        the cache length with one; causality and the sliding window are applied to it), or is
        the whole boolean mask ``[B, T, S]``, applied as given (several sequences packed in a
        row). ``last_only`` computes logits of the last position only.
        Returns ``(logits float32 [B, T, V], new_cache or None)``; with ``return_hidden`` the
        last block's output ``[B, T, hidden]`` instead of the logits (apply :meth:`head` to it,
        e.g. on a few positions or in chunks). ``stacked = (block graphdef, tuple of block states
        stacked on a leading layer axis, indices of the frozen ones)`` runs the decoder blocks from
        those weights as one scan instead of from ``self.layers`` (`_scan_stacked`; what
        `ngdiff_jax.models.functional` passes); a ``scan_layers`` model scans its own blocks, with a KV cache
        through `_scan_cached`."""
        if stacked is None:
            self._require_weights()
        return self._forward(input_ids, positions, kv_valid, cache, write_index, last_only, return_hidden, stacked)

    def _forward(self, input_ids, positions, kv_valid, cache, write_index, last_only, return_hidden=False,
                 stacked=None):
        x = self.backend.lookup(self.embed[...], input_ids).astype(self.dtype)
        if self.pos_embed is not None:
            x = x + self.backend.lookup(self.pos_embed[...], positions).astype(self.dtype)
        new_cache = [] if cache is not None else None
        remat = getattr(self, "remat", "none")
        if stacked is None and self.scan_layers:
            stacked = self._own_blocks()
        if stacked is not None:  # the blocks' weights come stacked: one scan over the layer axis
            block_def, states, frozen, *shift = stacked
            shift = shift[0] if shift else None
            if cache is not None:
                if isinstance(cache, list):
                    raise ValueError("this model's blocks are stacked (scan_layers=True): its KV cache is one "
                                     "(k, v) pair stacked on a layer axis (model.init_cache), not a list per block.")
                if shift is not None and any(sh is not None for sh in shift):
                    raise ValueError("a KV cache and a shifted (GeN probe) point cannot be combined; "
                                     "materialize the point first (ngdiff_jax.shifted.Shifted.materialize).")
                x, new_cache = _scan_cached(block_def, states, x, positions, kv_valid, cache, write_index,
                                            frozen=frozen)  # fmt: skip
            else:
                x = _scan_stacked(block_def, states, x, positions, kv_valid, remat, frozen=frozen, shift=shift,
                                  backend=self.backend)  # fmt: skip
        else:
            if cache is not None and not isinstance(cache, list):
                raise ValueError("this model's blocks are unrolled: its KV cache is a list of (k, v) per block "
                                 "(model.init_cache), not one stacked pair (a scan_layers=True model's).")
            for i, layer in enumerate(self.layers):
                if cache is None and remat != "none":
                    x = _remat_block(layer, x, positions, kv_valid, remat)
                    continue
                x, c = layer(x, positions, kv_valid, None if cache is None else cache[i], write_index)
                if cache is not None:
                    new_cache.append(c)
        if last_only:
            x = x[:, -1:]
        if return_hidden:
            return x, new_cache
        return self._head(x), new_cache

    def _own_blocks(self):
        """``forward``'s ``stacked`` for a ``scan_layers`` model: its own block, whose weights are stacked."""
        block_def, state = nnx.split(self.layers)
        return block_def, (state,), ()

    def head(self, x: Array) -> Array:
        """Final norm + LM head on hidden states from ``forward(..., return_hidden=True)``: float32 logits."""
        return self._head(x)

    def _head(self, x, head=None):
        """Logits of ``x``; ``head``: the head weight to use (default the model's own)."""
        x = self.final_norm(x)
        if self.lm_head is None:
            eq, head = "bte,ve->btv", self.embed[...] if head is None else head
        else:
            eq, head = "bte,ev->btv", self.lm_head.kernel[...] if head is None else head
        logits = self.backend.einsums([eq], x, [head.astype(self.dtype)], preferred_element_type=jnp.float32,
                                      late=False)[0]
        if self.lm_head is not None and self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias[...].astype(jnp.float32)
        return logits.astype(jnp.float32)

    def token_logprobs(self, input_ids: Array, labels: Array, attention_mask: Array | None = None,
                       positions: Array | None = None) -> TokenLogprobs:
        """``token_logprobs(self(input_ids, attention_mask, positions), labels)`` without the
        ``[B, T, V]`` logits: the head runs over chunks of about ``head_chunk_elements / vocab``
        tokens in a ``lax.scan`` whose body is rematerialized (``jax.checkpoint``), so neither the
        forward nor the backward pass holds more than one chunk's logits (the chunk's logits are
        recomputed in the backward pass: one more head matmul). Plain JAX: jit, vmap and both
        modes of differentiation work as for the logits."""
        input_ids, attention_mask, positions = model_inputs(input_ids, attention_mask, positions)
        graphdef, state = _split_for_mode(self)
        return _jit_logprobs(graphdef, state, input_ids, jnp.asarray(labels), attention_mask, positions)

    def head_logprobs(self, x: Array, labels: Array) -> TokenLogprobs:
        """`TokenLogprobs` of ``labels`` from the last block's output ``x [B, T, E]``, chunked."""
        B, T, E = x.shape
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        n = B * (T - 1)
        x = x[:, :-1].reshape(n, E)
        tgt = jnp.where(mask, targets, 0).reshape(n)
        chunk = head_chunk_tokens(n, self.config.vocab_size, self.head_chunk_elements)
        pad = (-n) % chunk
        if pad:
            x = jnp.pad(x, ((0, pad), (0, 0)))
            tgt = jnp.pad(tgt, (0, pad))

        tied = self.lm_head is None
        bias = None if tied or self.lm_head.bias is None else self.lm_head.bias[...]
        lp = self.backend.head_logprobs(  # a backend's fused head (the CPU's, bfloat16), or None
            self.final_norm(x[None])[0], (self.embed[...] if tied else self.lm_head.kernel[...]).astype(self.dtype),
            bias, tgt, vocab_major=tied, token_chunk=chunk, chunk_elements=self.head_chunk_elements,
            compute_dtype=self.dtype)  # fmt: skip
        if lp is not None:
            logp = lp[:n].reshape(B, T - 1)
            return TokenLogprobs(jnp.where(mask, logp, 0.0), mask.astype(jnp.float32))

        # The head weight enters the loop as a constant, whose gradient the loop sums over the chunks
        # in the constant's dtype: a float32 view (a no-op for float32 weights) sums in float32 and
        # rounds a 16-bit weight's gradient once.
        w = self.embed[...] if self.lm_head is None else self.lm_head.kernel[...]
        w = w.astype(jnp.promote_types(w.dtype, jnp.float32))

        def chunk_logp(w, xc, tc):
            logits = self._head(xc[None], w)[0]  # [chunk, V] float32
            picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
            return picked - jax.nn.logsumexp(logits, axis=-1)

        body = jax.checkpoint(chunk_logp, prevent_cse=False)
        _, lp = jax.lax.scan(lambda c, xs: (c, body(w, *xs)), None,
                             (x.reshape(-1, chunk, E), tgt.reshape(-1, chunk)))  # fmt: skip
        logp = lp.reshape(-1)[:n].reshape(B, T - 1)
        return TokenLogprobs(jnp.where(mask, logp, 0.0), mask.astype(jnp.float32))

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 positions: Array | None = None) -> Array:
        """Logits ``[B, T, V]`` (float32). Positions default to ``0..T-1`` for every row, as
        transformers' forward does when no ``position_ids`` are given (right-padded batches
        are then exact; pass ``positions`` for left-padded input)."""
        self._require_weights()
        input_ids, attention_mask, positions = model_inputs(input_ids, attention_mask, positions)
        graphdef, state = _split_for_mode(self)
        return _jit_call(graphdef, state, input_ids, attention_mask, positions)

    def hidden_state(self, input_ids: Array, attention_mask: Array | None = None, *, layer: int,
                     positions: Array | None = None, stacked=None) -> Array:
        """The residual stream after block ``layer`` (0-based; negative counts from the end),
        ``[B, T, hidden]`` in the compute dtype: what a forward hook on Hugging Face's
        ``model.layers[layer]`` returns. Runs only blocks ``0..layer`` (no head); the plain
        forward is unchanged."""
        n = self.config.num_layers
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"layer={layer} is out of range for a model with {n} layers; use 0..{n - 1} "
                             f"(or -{n}..-1).")
        input_ids, mask, positions = model_inputs(input_ids, attention_mask, positions)
        x = self.backend.lookup(self.embed[...], input_ids).astype(self.dtype)
        if self.pos_embed is not None:
            x = x + self.backend.lookup(self.pos_embed[...], positions).astype(self.dtype)
        if stacked is None and self.scan_layers:
            stacked = self._own_blocks()
        if stacked is not None:  # see forward
            block_def, states, frozen, *shift = stacked
            return _scan_stacked(block_def, states, x, positions, mask, "none", length=idx + 1, frozen=frozen,
                                 shift=shift[0] if shift else None, backend=self.backend)
        for i in range(idx + 1):
            x, _ = self.layers[i](x, positions, mask)
        return x

    def init_cache(self, batch: int, length: int, dtype=None):
        """An empty KV cache of ``length`` slots: a list of ``(k, v)`` per block, each ``[batch,
        length, kv_heads, head_dim]``; with ``scan_layers`` one ``(k, v)`` pair stacked on a leading
        layer axis. Either way the slot axis is ``-3`` and the batch axis ``-4`` of every leaf
        (`ngdiff_jax.models.kv_cache` works on both)."""
        cfg = self.config
        dt = dtype or self.dtype
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        if self.scan_layers:
            shape = (cfg.num_layers, *shape)
            return (jnp.zeros(shape, dt), jnp.zeros(shape, dt))
        return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(cfg.num_layers)]


def _stacked_blocks(cfg: ModelConfig, block, rngs: nnx.Rngs):
    """``cfg.num_layers`` blocks made as one (``nnx.vmap`` over split keys, as flax's scan-over-layers
    example): every weight gains a leading layer axis. The blocks must differ in their weights only."""
    if cfg.scale_attn_by_inverse_layer_idx:
        raise ValueError("scan_layers=True: this model scales each block's attention by its layer index "
                         "(scale_attn_by_inverse_layer_idx), so its blocks are not one block repeated; "
                         "use scan_layers=False (ngdiff eval: --scan-layers false).")  # fmt: skip

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return block(0, rngs=rngs)

    return make(rngs)


def is_stacked(params: dict) -> bool:
    """Whether ``params["layers"]`` is in the stacked layout of `ngdiff_jax.models.stacked` (one
    subtree whose leaves have a leading layer axis, not one subtree per block)."""
    layers = params.get("layers") if isinstance(params, dict) else None
    return isinstance(layers, dict) and bool(layers) and not any(isinstance(k, int) for k in layers)


def model_inputs(input_ids, attention_mask, positions):
    """``(input_ids, attention_mask, positions)`` as arrays, with the defaults of
    `CausalLM.__call__` (all positions attended, positions ``0..T-1`` in every row)."""
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return input_ids, jnp.asarray(attention_mask), positions


def head_chunk_tokens(n_tokens: int, vocab: int, chunk_elements: int) -> int:
    """Tokens per chunk of the chunked head: about ``chunk_elements / vocab``, a multiple of 8
    (at least 8), and never more than ``n_tokens`` rounded up to a multiple of 8."""
    c = max(8, (chunk_elements // max(vocab, 1)) // 8 * 8)
    return min(c, -(-n_tokens // 8) * 8)


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _remat_block(layer: Block, x: Array, positions: Array, kv_valid: Array, policy: str) -> Array:
    """``layer(x)`` under ``jax.checkpoint``: ``full`` saves only the block's input (everything
    else is recomputed in the backward pass), ``dots_saveable`` / ``dots_with_no_batch_dims_saveable``
    also keep matmul outputs (``jax.checkpoint_policies``; MaxText's ``remat_policy``). The
    block's backend runs it (`ngdiff_jax.backends.Backend.remat_block`)."""
    graphdef, state = nnx.split(layer)
    pol = None if policy == "full" else getattr(jax.checkpoint_policies, policy)

    @partial(jax.checkpoint, policy=pol)
    def run(state, x, positions, kv_valid):
        y, _ = nnx.merge(graphdef, state)(x, positions, kv_valid)
        return y

    return layer.backend.remat_block(run, state, x, positions, kv_valid)


def shared_block_graphdef(layers):
    """The graph definition shared by ``layers``; a `ValueError` where the blocks differ in more than
    their weights (then they cannot run as one scanned block)."""
    graphdef = nnx.graphdef(layers[0])
    for i, layer in enumerate(layers[1:], 1):
        if nnx.graphdef(layer) != graphdef:
            raise ValueError(
                f"run.scan_layers=true: decoder block {i} differs from block 0 in more than its weights (e.g. a "
                "per-layer attention scale, scale_attn_by_inverse_layer_idx), so the blocks cannot run as one "
                "scan over stacked weights; set run.scan_layers=false."
            )
    return graphdef


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def frozen_weight(backend: Backend, w: Array) -> Array:
    """A weight that must not be differentiated, as ``backend`` carries it through a layer scan
    (`Backend.carry`). Differentiating it raises (rather than giving a silent zero gradient)."""
    return backend.carry(w)


def _frozen_jvp(backend, primals, tangents):
    if not isinstance(tangents[0], jax.custom_derivatives.SymbolicZero):
        raise ValueError("a frozen weight (the base of a LoRA run on stacked blocks) was differentiated; "
                         "differentiate the adapters only, or use the per-block layout (run.scan_layers=false).")
    out = frozen_weight(backend, primals[0])
    if not jnp.issubdtype(out.dtype, jnp.inexact):
        return out, np.zeros(out.shape, jax.dtypes.float0)
    return out, jnp.zeros_like(out)


frozen_weight.defjvp(_frozen_jvp, symbolic_zeros=True)


def frozen_from_bits(a):
    """A frozen weight stored as bfloat16 bits (``uint16``, `frozen_weight` on a backend that carries
    bfloat16 so) as bfloat16 (a NumPy view for a NumPy array); other leaves as they are."""
    if isinstance(a, np.ndarray) and a.dtype == jnp.uint16:
        return a.view(jnp.bfloat16)
    return from_bits(a)


def _scan_stacked(block_graphdef, states: tuple, x: Array, positions: Array, kv_valid: Array, policy: str,
                  length: int | None = None, frozen: tuple = (), shift: tuple | None = None,
                  backend: Backend | None = None) -> Array:
    """The first ``length`` (default: all) blocks whose weights are ``states`` (stacked on a leading
    layer axis), applied in order as one ``jax.lax.scan`` (MaxText's ``scan_layers``): XLA compiles
    one block instead of one per layer. ``policy`` (``REMAT_POLICIES``) rematerializes the scanned
    block; the scan's backward pass runs (and recomputes) one block at a time by construction.

    ``frozen``: indices of ``states`` that are never differentiated (LoRA's base; differentiating
    these block weights raises). Their leaves enter the scan as the backend carries them
    (`Backend.carry`; the CPU backend: bfloat16 as bits, as `ngdiff_jax.models.functional` stores a
    frozen tree already) and are read back inside the block.

    ``shift`` (GeN's probe point, `ngdiff_jax.shifted`): per state, ``None`` or ``(direction,
    step)`` with ``direction`` stacked like the state; the blocks then run on ``state + step *
    direction``, each block's weights made inside the scan (`shift_leaf`), so the shifted point
    never exists as a whole tree.

    ``backend`` carries the weights into the loop (`Backend.carry`) and may run ``policy="full"``
    over all blocks as its own rematerialized scan (`Backend.remat_scan`)."""
    frozen = tuple(frozen)
    backend = backend if backend is not None else Backend()

    def encode(a):  # frozen leaves as carried (uint16 leaves are stored bfloat16 bits already)
        return a if a.dtype == jnp.uint16 else frozen_weight(backend, a)

    states = tuple(jax.tree.map(encode, st) if i in frozen else st for i, st in enumerate(states))

    def block(h, sts):
        sts = tuple(jax.tree.map(frozen_from_bits, st) if i in frozen else st for i, st in enumerate(sts))
        y, _ = nnx.merge(block_graphdef, *sts)(h, positions, kv_valid)
        return y

    n = jax.tree_util.tree_leaves(states)[0].shape[0]
    if shift is not None and any(sh is not None for sh in shift):
        return _scan_shifted(block, states, frozen, shift, x, policy, n if length is None else length, backend)
    if policy == "full" and (length is None or length == n):
        trained = tuple(st for i, st in enumerate(states) if i not in frozen)
        fixed = tuple(st for i, st in enumerate(states) if i in frozen)

        def split_block(h, t, f, aux):
            t, f = iter(t), iter(f)
            sts = tuple(next(f) if i in frozen else next(t) for i in range(len(states)))
            y, _ = nnx.merge(block_graphdef, *sts)(h, *aux)
            return y

        out = backend.remat_scan(split_block, trained, fixed, x, (positions, kv_valid))
        if out is not None:
            return out
    if policy != "none":
        block = jax.checkpoint(block, policy=None if policy == "full" else getattr(jax.checkpoint_policies, policy),
                               prevent_cse=False)  # fmt: skip
    if length is None or length == n:
        return jax.lax.scan(lambda h, sts: (block(h, sts), None), x, states)[0]
    # a prefix of the blocks (hidden states): index the stacked weights one block at a time
    return jax.lax.scan(lambda h, i: (block(h, jax.tree.map(lambda a: a[i], states)), None), x,
                        jnp.arange(length))[0]  # fmt: skip


def _scan_cached(block_graphdef, states: tuple, x: Array, positions: Array, kv_valid: Array, cache, write_index,
                 frozen: tuple = ()) -> tuple[Array, tuple]:
    """`_scan_stacked` with a KV cache ``(k, v)``, each stacked ``[num_layers, B, S, K, D]``: every block
    reads its layer's slots and writes its ``T`` new keys and values at ``write_index`` (only those
    slots are written back into the stacked cache, carried through the scan and updated in place).
    Returns ``(hidden, (k, v))``."""
    frozen = tuple(frozen)
    ks, vs = cache
    T = x.shape[1]

    def body(carry, sts):
        h, ks, vs, i = carry
        sts = tuple(jax.tree.map(frozen_from_bits, st) if j in frozen else st for j, st in enumerate(sts))
        layer = tuple(jax.lax.dynamic_index_in_dim(c, i, keepdims=False) for c in (ks, vs))
        y, (k, v) = nnx.merge(block_graphdef, *sts)(h, positions, kv_valid, layer, write_index)
        start = (i, 0, write_index, 0, 0)
        ks = jax.lax.dynamic_update_slice(ks, jax.lax.dynamic_slice_in_dim(k, write_index, T, axis=1)[None], start)
        vs = jax.lax.dynamic_update_slice(vs, jax.lax.dynamic_slice_in_dim(v, write_index, T, axis=1)[None], start)
        return (y, ks, vs, i + 1), None

    (x, ks, vs, _), _ = jax.lax.scan(body, (x, ks, vs, jnp.int32(0)), states)
    return x, (ks, vs)


def _shifted_weight(a, b, step, backend):
    """One weight of the shifted point from the carried weight and direction, rounded to its dtype
    as the backend carries it (as the whole shifted tree would be)."""
    return backend.uncarry(backend.carry(shift_leaf(backend.uncarry(a), backend.uncarry(b), step)))


def _scan_shifted(block, states: tuple, frozen: tuple, shift: tuple, x: Array, policy: str, length: int,
                  backend: Backend) -> Array:
    """`_scan_stacked` on ``states`` shifted by ``shift`` (see there): the weights and directions
    enter the loop as ``backend`` carries them and each block's shifted weights are made inside
    the loop body."""
    dirs = tuple(None if sh is None else jax.tree.map(backend.carry, sh[0]) for sh in shift)
    steps = tuple(None if sh is None else sh[1] for sh in shift)
    bits = tuple(st if i in frozen else jax.tree.map(backend.carry, st) for i, st in enumerate(states))

    def shifted_block(h, xs):
        sts, ds = xs
        made = []
        for i, (st, d, step) in enumerate(zip(sts, ds, steps)):
            if i in frozen:  # carried, read back by `block`
                made.append(st)
            elif d is None:
                made.append(jax.tree.map(backend.uncarry, st))
            else:
                made.append(jax.tree.map(partial(_shifted_weight, step=step, backend=backend), st, d))
        return block(h, tuple(made))

    if policy != "none":
        shifted_block = jax.checkpoint(shifted_block, prevent_cse=False,
                                       policy=None if policy == "full" else getattr(jax.checkpoint_policies, policy))
    xs = (bits, dirs)
    n = jax.tree_util.tree_leaves(states)[0].shape[0]
    if length == n:
        return jax.lax.scan(lambda h, w: (shifted_block(h, w), None), x, xs)[0]
    return jax.lax.scan(lambda h, i: (shifted_block(h, jax.tree.map(lambda a: a[i], xs)), None), x,
                        jnp.arange(length))[0]  # fmt: skip


def set_remat(model: CausalLM, policy: str) -> CausalLM:
    """Set the rematerialization policy of every decoder block (``REMAT_POLICIES``) in place;
    it applies to forward passes without a KV cache (training and scoring)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is unknown; choose one of {', '.join(REMAT_POLICIES)}.")
    model.remat = policy
    return model


def with_backend(model: CausalLM, backend: Backend) -> CausalLM:
    """``model`` with ``backend`` in every module that holds one (in place)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(getattr(module, "backend", None), Backend):
            module.backend = backend
    return model


def _split_for_mode(model: CausalLM):
    """``nnx.split(model)``; under forward-mode autodiff (``jax.jvp``, Hessian-vector products)
    with the portable primitives (`Backend.portable`): a backend's ``custom_vjp`` kernels have no
    forward mode, and inside the jitted call they would meet it only after tracing (the same
    values either way)."""
    graphdef, state = nnx.split(model)
    portable = model.backend.portable()
    if model.backend != portable and forward_mode(state):
        graphdef, state = nnx.split(with_backend(nnx.merge(graphdef, state), portable))
    return graphdef, state


@partial(jax.jit, static_argnums=0)
def _jit_call(graphdef, state, input_ids, attention_mask, positions):
    # One compiled program per shape instead of op-by-op dispatch when called eagerly;
    # inlined when already under a trace.
    model = nnx.merge(graphdef, state)
    logits, _ = model.forward(input_ids, positions, attention_mask)
    return logits


@partial(jax.jit, static_argnums=0)
def _jit_logprobs(graphdef, state, input_ids, labels, attention_mask, positions):
    model = nnx.merge(graphdef, state)
    x, _ = model.forward(input_ids, positions, attention_mask, return_hidden=True)
    return model.head_logprobs(x, labels)


def from_config(hf_config, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                param_dtype=jnp.float32, backend: Backend | str | None = None,
                attention: str | None = None) -> CausalLM:
    """A randomly initialized `CausalLM` for a HF config (or `ModelConfig`); ``backend`` and
    ``attention`` as for `CausalLM`.

    Same distributions as the module's initializers (weights N(0, initializer_range), biases
    0, norm scales 1), drawn as one normal vector from ``rngs.params()``: one small compile
    instead of one per parameter shape.
    """
    cfg = ModelConfig.from_hf(hf_config)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    backend = resolve_backend(backend)
    attention = resolve_attention(attention, dtype, backend)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                               backend=backend, attention=attention))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)

    def kind(path):
        last = str(getattr(path[-1], "key", path[-1]))
        parent = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
        if "norm" in parent:
            return "one" if last == "scale" else "zero"
        return "zero" if last == "bias" else "normal"

    kinds = [kind(p) for p, _ in flat]
    total = sum(int(np.prod(x.shape)) for (_, x), k in zip(flat, kinds) if k == "normal")
    noise = np.asarray(_normal(rngs.params(), total)) * np.float32(cfg.initializer_range)
    leaves, off = [], 0
    for (_, x), k in zip(flat, kinds):
        n = int(np.prod(x.shape))
        if k == "normal":
            v = noise[off:off + n].reshape(x.shape)
            off += n
        else:
            v = np.full(x.shape, 1.0 if k == "one" else 0.0, np.float32)
        leaves.append(jnp.asarray(v, dtype=x.dtype))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    return nnx.merge(graphdef, state)


@partial(jax.jit, static_argnums=1)
def _normal(key, n):
    return jax.random.normal(key, (n,), jnp.float32)


def _merge(graphdef, template_state, params):
    st = jax.tree.map(lambda x: x, template_state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(graphdef, st)


def abstract_like(model: CausalLM, **changes) -> CausalLM:
    """An abstract `CausalLM` (shapes only, no weights) built with ``model``'s constructor arguments
    (config, dtypes, backend, attention, head chunk, ``scan_layers``) but for ``changes``."""
    kw = dict(dtype=model.dtype, param_dtype=model.param_dtype, backend=model.backend, attention=model.attention,
              head_chunk_elements=model.head_chunk_elements, scan_layers=model.scan_layers)  # fmt: skip
    kw.update(changes)
    return nnx.eval_shape(lambda: CausalLM(model.config, rngs=nnx.Rngs(0), **kw))


def shapes(tree):
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def shapes_only(tree) -> bool:
    """Whether ``tree`` holds shapes (``jax.ShapeDtypeStruct``) where weights should be."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def release_weights(model: CausalLM) -> None:
    """Replace ``model``'s arrays by their shapes, in place: it keeps its structure and gives its weights
    away (whoever holds them now, e.g. the trees `ngdiff_jax.models.functional` returned, owns them)."""
    nnx.update(model, shapes(nnx.state(model)))


def abstract_model(model: CausalLM) -> CausalLM:
    """``model`` with every array replaced by its ``jax.ShapeDtypeStruct``: the structure
    (for `with_params` / `save_pretrained` later) without holding the weights."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, shapes(state))


def with_params(model: CausalLM, params) -> CausalLM:
    """A new `CausalLM` like ``model`` holding ``params`` (a pure dict as from `functional`)."""
    if model.scan_layers and not is_stacked(params):
        raise ValueError("with_params: this model's blocks are stacked (scan_layers=True) but params hold one "
                         "tree per block: pass models.stacked.stack(params).")  # fmt: skip
    if not model.scan_layers and is_stacked(params):
        raise ValueError("with_params: params are in the stacked layout (params['layers'] is one tree of "
                         "[num_layers, ...] arrays, as from functional(model) of a scan_layers=True model); a "
                         "CausalLM holds one tree per block: pass models.stacked.unstack(params).")  # fmt: skip
    graphdef, state = nnx.split(model)
    return _merge(graphdef, state, params)
