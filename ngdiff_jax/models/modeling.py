"""One Flax NNX decoder-only transformer for the llama, mistral, qwen2, phi and gpt2 families.

The math follows transformers 5.24's PyTorch modeling code exactly:

* rotary embeddings in HF's "split halves" layout (``rotate_half``), optionally on only the
  first ``rotary_dim`` dims of each head (phi's partial rotary), with ``llama3``/``linear``
  frequency scaling;
* RMSNorm computed in float32 and cast back before the scale (llama), or LayerNorm (phi, gpt2);
* grouped-query attention, scores and softmax in float32;
* phi's parallel block ``x + attn(ln(x)) + mlp(ln(x))``; gpt2's learned positions.

Weights use einsum layouts (``q: [embed, heads, head_dim]``, ``o: [heads, head_dim, embed]``,
``mlp: [embed, mlp]``); ``hf.py`` converts to and from HF's tensors. Every parameter is an
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

from ngdiff_jax.models.config import ModelConfig

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


def _dot_nt(a: Array, b: Array, preferred_element_type=None) -> Array:
    """``a @ b.T`` for 2-D ``a [N, K]``, ``b [M, K]``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=preferred_element_type)


def _weight_grad(x: Array, g: Array, dtype, preferred_element_type=None) -> Array:
    """``x.T @ g`` for ``x [N, K]``, ``g [N, M]`` (the weight gradient of ``x @ w``); see
    `_token_matmuls_bwd` for the layout."""
    dt = preferred_element_type
    if jax.default_backend() != "cpu":
        return jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=dt).astype(dtype)
    if x.shape[1] > g.shape[1]:
        # More inputs than outputs (down/o projections): transposing the smaller ``g`` and then
        # the ``[M, K]`` result moves less memory than ``x.T`` (the second barrier keeps the
        # result's transpose from being folded into the dot).
        gt, x_ = jax.lax.optimization_barrier((g.T, x))
        return jax.lax.optimization_barrier(jnp.dot(gt, x_, preferred_element_type=dt)).T.astype(dtype)
    xt, g_ = jax.lax.optimization_barrier((x.T, g))
    return jnp.dot(xt, g_, preferred_element_type=dt).astype(dtype)


@jax.custom_vjp
def _swiglu_down(a: Array, b: Array, w: Array) -> Array:
    """``(silu(a) * b) @ w`` for ``a, b [N, M]``, ``w [M, E]``: the gated MLP after its input
    projections, with a hand-written backward that keeps only ``a`` and ``b`` (and ``w``) as
    residuals and recomputes ``silu(a) * b`` there. Under autodiff the ``[N, M]`` product is a
    residual of the down projection, which makes XLA:CPU materialize ``sigmoid(a)``,
    ``silu(a)`` and the product in three separate passes in the forward; here the product
    feeds only the matmul and fuses into it, as in a plain forward."""
    return jnp.dot(jax.nn.silu(a) * b, w)


def _swiglu_down_fwd(a, b, w):
    return _swiglu_down(a, b, w), (a, b, w)


def _swiglu_down_bwd(res, g):
    # The barrier (which also takes ``g``) keeps XLA from merging this recomputation with the
    # forward's (common-subexpression elimination), which would bring the three passes back.
    a, b, g = jax.lax.optimization_barrier((*res[:2], g))
    w = res[2]
    s = jax.nn.sigmoid(a)
    h = a * s * b
    dh = _dot_nt(g, w)
    da = (dh * b * (s * (1 + a * (1 - s)))).astype(a.dtype)
    db = (dh * (a * s)).astype(b.dtype)
    return da, db, _weight_grad(h, g, w.dtype)


_swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)


def _mm(x: Array, w: Array, w_transposed: bool, preferred_element_type) -> Array:
    if w_transposed:
        return _dot_nt(x, w, preferred_element_type)
    return jnp.dot(x, w, preferred_element_type=preferred_element_type)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_matmuls(x: Array, ws: tuple, w_transposed: bool, preferred_element_type) -> tuple:
    """``tuple(x [N, K] @ w [K, M] for w in ws)`` (``@ w.T`` for ``w [M, K]`` when ``w_transposed``)."""
    return tuple(_mm(x, w, w_transposed, preferred_element_type) for w in ws)


def _token_matmuls_fwd(x, ws, w_transposed, preferred_element_type):
    return _token_matmuls(x, ws, w_transposed, preferred_element_type), (x, ws)


def _token_matmuls_bwd(w_transposed, preferred_element_type, res, gs):
    # The weight gradient contracts the token axis, the *major* axis of both ``x [N, K]`` and
    # ``g [N, M]``. Autodiff's ``dot_general(x, g, contracting=(0, 0))`` is not taken by XLA:CPU's
    # fast (YNNPACK) matmul but by a multi-threaded Eigen contraction (see docs/PERFORMANCE.md).
    # So on CPU the weight gradient is a plain row-major matmul on an explicitly transposed
    # operand: ``x.T @ g``, with one ``x.T`` shared by every weight that reads ``x`` (q/k/v,
    # gate/up). The optimization barrier keeps XLA from folding the transpose back into the dot
    # and, since it also takes the cotangents, from hoisting it into the forward pass (where it
    # would stay live until the backward). Other backends take the transposed dot natively.
    x, ws = res
    dt = preferred_element_type
    cpu = jax.default_backend() == "cpu"
    dx = None
    for g, w in zip(gs, ws):
        d = jnp.dot(g, w, preferred_element_type=dt) if w_transposed else _dot_nt(g, w, dt)
        dx = d if dx is None else dx + d
    if w_transposed:  # y = x @ w.T: dw = g.T @ x
        if cpu:
            gts, x_ = jax.lax.optimization_barrier(([g.T for g in gs], x))
            dws = [jnp.dot(gt, x_, preferred_element_type=dt) for gt in gts]
        else:
            dws = [jax.lax.dot_general(g, x, (((0,), (0,)), ((), ())), preferred_element_type=dt) for g in gs]
    elif len(ws) == 1:
        dws = [_weight_grad(x, gs[0], ws[0].dtype, dt)]
    elif cpu:
        xt, gs_ = jax.lax.optimization_barrier((x.T, list(gs)))
        dws = [jnp.dot(xt, g, preferred_element_type=dt) for g in gs_]
    else:
        dws = [jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=dt) for g in gs]
    return dx.astype(x.dtype), tuple(dw.astype(w.dtype) for dw, w in zip(dws, ws))


_token_matmuls.defvjp(_token_matmuls_fwd, _token_matmuls_bwd)


def _token_plan(eq: str, x_shape, w_shape):
    """``(K, w2_shape, w_transposed, out_free_shape)`` for `token_einsum`'s 2-D form of ``eq``."""
    lhs, out = eq.split("->")
    xs, ws = lhs.split(",")
    contracted = "".join(c for c in xs[2:] if c not in out)
    ok = xs[:2] == "bt" and out[:2] == "bt" and xs[2:] == contracted
    K = math.prod(x_shape[2:])
    if ok and ws.startswith(contracted) and out[2:] == ws[len(contracted):]:
        free = tuple(w_shape[len(contracted):])
        return K, (K, math.prod(free)), False, free
    if ok and ws.endswith(contracted) and out[2:] == ws[: len(ws) - len(contracted)]:
        free = tuple(w_shape[: len(ws) - len(contracted)])
        return K, (math.prod(free), K), True, free
    raise ValueError(f"token_einsum: unsupported equation {eq!r}")


def token_einsums(eqs, x: Array, ws, preferred_element_type=None) -> list[Array]:
    """``[jnp.einsum(eq, x, w) for eq, w in zip(eqs, ws)]`` for equations whose input and output
    start with ``bt`` (batch, time) and whose contracted axes are the trailing axes of ``x`` and
    the leading (or, as for a tied ``[vocab, embed]`` head, the trailing) axes of ``w``.

    Computed as 2-D matmuls ``[B*T, K] @ [K, M]`` with a custom backward: same results, but on
    XLA:CPU the backward of the 3-D einsum transposes the cotangent and misses the fast matmul
    path (2.7x slower LM-head gradient), and the weight gradients need the layout chosen in
    `_token_matmuls_bwd`. Weights that share ``x`` (q/k/v, gate/up) share one backward.
    """
    B, T = x.shape[:2]
    plans = [_token_plan(eq, x.shape, w.shape) for eq, w in zip(eqs, ws)]
    K, _, w_transposed, _ = plans[0]
    if any(p[2] != w_transposed for p in plans):
        raise ValueError("token_einsums: mixed weight layouts")
    ys = _token_matmuls(x.reshape(B * T, K), tuple(w.reshape(p[1]) for w, p in zip(ws, plans)),
                        w_transposed, preferred_element_type)
    return [y.reshape((B, T) + p[3]) for y, p in zip(ys, plans)]


def token_einsum(eq: str, x: Array, w: Array, preferred_element_type=None) -> Array:
    """`token_einsums` for one equation."""
    return token_einsums([eq], x, [w], preferred_element_type)[0]


class Dense(nnx.Module):
    """``y = einsum(eq, x, kernel) + bias`` with an arbitrary kernel shape."""

    def __init__(self, eq: str, kernel_shape, bias_shape, *, rngs: nnx.Rngs, std: float,
                 dtype, param_dtype):
        self.eq = eq
        self.dtype = dtype
        init = jax.nn.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), tuple(kernel_shape), param_dtype))
        self.bias = nnx.Param(jnp.zeros(tuple(bias_shape), param_dtype)) if bias_shape is not None else None

    def __call__(self, x: Array) -> Array:
        return dense_many([self], x)[0]


def dense_many(layers, x: Array) -> list[Array]:
    """``[layer(x) for layer in layers]`` for `Dense` layers reading the same ``x``, with one
    shared backward (see `token_einsums`)."""
    dt = layers[0].dtype
    ys = token_einsums([layer.eq for layer in layers], x.astype(dt), [layer.kernel[...].astype(dt) for layer in layers])
    ys = [y if layer.bias is None else y + layer.bias[...].astype(dt) for y, layer in zip(ys, layers)]
    if any(getattr(layer, "lora_a", None) is not None for layer in layers):  # adapters from models.lora.attach
        from ngdiff_jax.models.lora import add_lora

        ys = add_lora(layers, x.astype(dt), ys)
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
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs, dtype, param_dtype):
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.initializer_range
        kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype)
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
        S = k.shape[1]
        k_slot = jnp.arange(S)
        allowed = k_slot[None, :] <= q_slot[:, None]
        if self.sliding_window is not None:
            allowed = allowed & (q_slot[:, None] - k_slot[None, :] < self.sliding_window)
        mask = allowed[None, :, :] & kv_valid[:, None, :].astype(bool)  # [B, T, S]
        G = self.num_heads // self.num_kv_heads
        qg = q.reshape(B, T, self.num_kv_heads, G, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * self.scale
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))
        out = out.reshape(B, T, self.num_heads, self.head_dim)
        return self.o_proj(out), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        E, M = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype)
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
            if self.act in ("silu", "swish"):
                B, T, M = gate.shape
                dt = self.down_proj.dtype
                y = _swiglu_down(gate.reshape(B * T, M), up.reshape(B * T, M),
                                 self.down_proj.kernel[...].astype(dt)).reshape(B, T, -1)
                if getattr(self.down_proj, "lora_a", None) is not None:  # the fused path must not skip it
                    from ngdiff_jax.models.lora import add_lora

                    y = add_lora([self.down_proj], (jax.nn.silu(gate) * up).astype(dt), [y])[0]
                return y if self.down_proj.bias is None else y + self.down_proj.bias[...].astype(dt)
            return self.down_proj(f(gate) * up)
        return self.fc2(f(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs, dtype, param_dtype):
        nkw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm_type, cfg.norm_eps, **nkw)
        self.attn = Attention(cfg, layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.parallel = cfg.parallel_block
        self.mlp_norm = None if self.parallel else Norm(cfg.hidden_size, cfg.norm_type, cfg.norm_eps, **nkw)
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

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
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        cfg = config
        self.config = cfg
        self.dtype = dtype
        self.param_dtype = param_dtype
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        if cfg.position_embedding == "learned":
            self.pos_embed = nnx.Param(
                init(rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), param_dtype))
        else:
            self.pos_embed = None
        self.layers = nnx.List([
            Block(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for i in range(cfg.num_layers)
        ])
        self.final_norm = Norm(cfg.hidden_size, cfg.norm_type, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense("bte,ev->btv", (cfg.hidden_size, cfg.vocab_size),
                                 (cfg.vocab_size,) if cfg.lm_head_bias else None,
                                 rngs=rngs, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype)

    # ------------------------------------------------------------------
    def forward(self, input_ids: Array, positions: Array, kv_valid: Array, cache=None, write_index=None,
                last_only: bool = False):
        """Core forward. ``kv_valid [B, S]`` marks attendable key slots (S = T without a cache,
        the cache length with one). ``last_only`` computes logits of the last position only.
        Returns ``(logits float32 [B, T, V], new_cache or None)``."""
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, kv_valid, None if cache is None else cache[i], write_index)
            if cache is not None:
                new_cache.append(c)
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = token_einsum("bte,ve->btv", x, self.embed[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = token_einsum("bte,ev->btv", x, self.lm_head.kernel[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
            if self.lm_head.bias is not None:
                logits = logits + self.lm_head.bias[...].astype(jnp.float32)
        return logits.astype(jnp.float32), new_cache

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 positions: Array | None = None) -> Array:
        """Logits ``[B, T, V]`` (float32). Positions default to ``0..T-1`` for every row, as
        transformers' forward does when no ``position_ids`` are given (right-padded batches
        are then exact; pass ``positions`` for left-padded input)."""
        input_ids = jnp.asarray(input_ids)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        graphdef, state = nnx.split(self)
        return _jit_call(graphdef, state, input_ids, jnp.asarray(attention_mask), positions)

    def hidden_state(self, input_ids: Array, attention_mask: Array | None = None, *, layer: int,
                     positions: Array | None = None) -> Array:
        """The residual stream after block ``layer`` (0-based; negative counts from the end),
        ``[B, T, hidden]`` in the compute dtype: what a forward hook on Hugging Face's
        ``model.layers[layer]`` returns. Runs only blocks ``0..layer`` (no head); the plain
        forward is unchanged."""
        n = self.config.num_layers
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"layer={layer} is out of range for a model with {n} layers; use 0..{n - 1} "
                             f"(or -{n}..-1).")
        input_ids = jnp.asarray(input_ids)
        B, T = input_ids.shape
        mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
        for i in range(idx + 1):
            x, _ = self.layers[i](x, positions, mask)
        return x

    def init_cache(self, batch: int, length: int, dtype=None):
        cfg = self.config
        dt = dtype or self.dtype
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(cfg.num_layers)]


@partial(jax.jit, static_argnums=0)
def _jit_call(graphdef, state, input_ids, attention_mask, positions):
    # One compiled program per shape instead of op-by-op dispatch when called eagerly;
    # inlined when already under a trace.
    model = nnx.merge(graphdef, state)
    logits, _ = model.forward(input_ids, positions, attention_mask)
    return logits


def from_config(hf_config, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                param_dtype=jnp.float32) -> CausalLM:
    """A randomly initialized `CausalLM` for a HF config (or `ModelConfig`).

    Same distributions as the module's initializers (weights N(0, initializer_range), biases
    0, norm scales 1), drawn as one normal vector from ``rngs.params()``: one small compile
    instead of one per parameter shape.
    """
    cfg = ModelConfig.from_hf(hf_config)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
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


# ---------------------------------------------------------------------- functional core
def functional(model: CausalLM):
    """``(apply_fn, params)``: ``apply_fn(params, input_ids, attention_mask=None) -> logits``
    is pure, jittable and differentiable in ``params`` (a pure nested dict of arrays).
    ``apply_fn.hidden_state(params, input_ids, attention_mask=None, *, layer)`` gives the
    hidden state after one block (:meth:`CausalLM.hidden_state`), equally pure."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    def apply_fn(params, input_ids, attention_mask=None, positions=None):
        m = _merge(graphdef, state, params)
        return m(input_ids, attention_mask, positions)

    def hidden_state(params, input_ids, attention_mask=None, *, layer, positions=None):
        m = _merge(graphdef, state, params)
        return m.hidden_state(input_ids, attention_mask, layer=layer, positions=positions)

    apply_fn.hidden_state = hidden_state  # per-layer hidden states, for RMU (see CausalLM.hidden_state)
    return apply_fn, params


def _merge(graphdef, template_state, params):
    st = jax.tree.map(lambda x: x, template_state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(graphdef, st)


def with_params(model: CausalLM, params) -> CausalLM:
    """A new `CausalLM` like ``model`` holding ``params`` (a pure dict as from `functional`)."""
    graphdef, state = nnx.split(model)
    return _merge(graphdef, state, params)
