"""The XLA:CPU kernels behind `ngdiff_jax.backends.cpu.CPUFast` (reverse-mode ``custom_vjp``s).

Same values as the portable primitives of `ngdiff_jax.backends.Backend` (to float rounding),
faster or leaner reverse mode on XLA:CPU (docs/PERFORMANCE.md):

* `token_einsums`: token einsums as 2-D ``[B*T, K] @ [K, M]`` matmuls with a hand-written
  backward whose weight gradients use the row-major layout XLA:CPU's fast matmul takes, one
  shared backward for weights reading the same input (q/k/v, gate/up);
* `swiglu_down`: a SwiGLU down projection that recomputes ``silu(a) * b`` in its backward;
* `recompute_late`: a remat block whose recomputation waits for its cotangent;
* `remat_scan`: a fully rematerialized layer scan whose weights cross the loops as bits;
* `head_logprobs`: the LM head's log-probs over row x vocabulary blocks;
* `lookup`: an embedding lookup whose gradient writes summed rows (no float32 ``[V, E]`` zeros).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from ngdiff_jax.bits import from_bits, to_bits

Array = jax.Array


# ---------------------------------------------------------------------- token matmuls
def _dot_nt(a: Array, b: Array, preferred_element_type=None) -> Array:
    """``a @ b.T`` for 2-D ``a [N, K]``, ``b [M, K]``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=preferred_element_type)


def _weight_grad(x: Array, g: Array, dtype, preferred_element_type=None) -> Array:
    """``x.T @ g`` for ``x [N, K]``, ``g [N, M]`` (the weight gradient of ``x @ w``); see
    `_token_matmuls_bwd` for the layout."""
    dt = preferred_element_type
    if x.shape[1] > g.shape[1]:
        # More inputs than outputs (down/o projections): transposing the smaller ``g`` and then
        # the ``[M, K]`` result moves less memory than ``x.T`` (the second barrier keeps the
        # result's transpose from being folded into the dot).
        gt, x_ = jax.lax.optimization_barrier((g.T, x))
        return jax.lax.optimization_barrier(jnp.dot(gt, x_, preferred_element_type=dt)).T.astype(dtype)
    xt, g_ = jax.lax.optimization_barrier((x.T, g))
    return jnp.dot(xt, g_, preferred_element_type=dt).astype(dtype)


@jax.custom_vjp
def swiglu_down(a: Array, b: Array, w: Array) -> Array:
    """``(silu(a) * b) @ w`` for ``a, b [N, M]``, ``w [M, E]``, with a hand-written backward that
    keeps only ``a`` and ``b`` (and ``w``) as residuals and recomputes ``silu(a) * b`` there. Under
    autodiff the ``[N, M]`` product is a residual of the down projection, which makes XLA:CPU
    materialize ``sigmoid(a)``, ``silu(a)`` and the product in three separate passes in the
    forward; here the product feeds only the matmul and fuses into it, as in a plain forward."""
    (a, b), (w,) = _fresh((a, b), (w,))
    return jnp.dot(jax.nn.silu(a) * b, w)


def _swiglu_down_fwd(a, b, w):
    return swiglu_down(a, b, w), (a, b, w)


def _swiglu_down_bwd(res, g):
    # The barrier (which also takes ``g``) keeps XLA from merging this recomputation with the
    # forward's (common-subexpression elimination), which would bring the three passes back.
    a, b, g = jax.lax.optimization_barrier((*res[:2], g))
    (g,), (w,) = _fresh((g,), (res[2],))
    s = jax.nn.sigmoid(a)
    h = a * s * b
    dh = _dot_nt(g, w)
    da = (dh * b * (s * (1 + a * (1 - s)))).astype(a.dtype)
    db = (dh * (a * s)).astype(b.dtype)
    return da, db, _weight_grad(h, g, w.dtype)


swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)


def _mm(x: Array, w: Array, w_transposed: bool, preferred_element_type) -> Array:
    if w_transposed:
        return _dot_nt(x, w, preferred_element_type)
    return jnp.dot(x, w, preferred_element_type=preferred_element_type)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _token_matmuls(x: Array, ws: tuple, w_transposed: bool, preferred_element_type, late: bool = True) -> tuple:
    """``tuple(x [N, K] @ w [K, M] for w in ws)`` (``@ w.T`` for ``w [M, K]`` when ``w_transposed``)."""
    x, ws = _fresh(x, ws, late)
    return tuple(_mm(x, w, w_transposed, preferred_element_type) for w in ws)


def _fresh(x, ws, late: bool = True):
    """``(x, ws)`` with every weight that is not float32 made to depend on ``x`` (unchanged in
    value, see `never`): XLA:CPU computes a bfloat16 matmul in float32, converting the weight.
    Without the dependency the conversions of one weight at its every use (both tasks' forward
    passes, GeN's probes) are merged into one float32 copy, made at the start of the step and
    alive until its last use (an optimization barrier does not prevent that: XLA:CPU removes
    barriers before scheduling). With it, each conversion is made when ``x`` is ready and lives
    only for its matmul (SmolLM2, bfloat16, 8 blocks: step temporaries 651 -> 514 MB).

    ``late=False`` keeps the former optimization barrier, which stops the merging only until
    XLA:CPU removes it: for the LM head, whose matmul runs in a loop over token chunks, the
    dependency on each chunk made XLA keep a float32 copy of the ``[vocab, embed]`` weight per
    iteration next to the head's gradient (SmolLM2: +190 MB)."""
    if all(w.dtype == jnp.float32 for w in ws):
        return x, ws
    if not late:
        return jax.lax.optimization_barrier((x, tuple(ws)))
    n = never(x)
    return x, tuple(w if w.dtype == jnp.float32 else jnp.where(n, jnp.zeros_like(w), w) for w in ws)


def never(x) -> Array:
    """A boolean scalar that is always false but depends on (the first array leaf of) ``x`` and
    that XLA cannot fold: ``||x|| < 0`` (also false for a NaN or infinite norm). ``where(never(x),
    0, y)`` is ``y`` computed no earlier than ``x``: a data dependency, which XLA:CPU's scheduler
    keeps (unlike an optimization barrier). The norm runs over the whole array: XLA folds
    ``abs(v) < 0`` and ``sqrt(v * v)`` of a single element."""
    leaf = jax.tree_util.tree_leaves(x)[0]
    return jnp.sqrt(jnp.sum(jnp.square(leaf.astype(jnp.float32)))) < 0


def _token_matmuls_fwd(x, ws, w_transposed, preferred_element_type, late=True):
    return _token_matmuls(x, ws, w_transposed, preferred_element_type, late), (x, ws)


def _token_matmuls_bwd(w_transposed, preferred_element_type, late, res, gs):
    # The weight gradient contracts the token axis, the *major* axis of both ``x [N, K]`` and
    # ``g [N, M]``. Autodiff's ``dot_general(x, g, contracting=(0, 0))`` is not taken by XLA:CPU's
    # fast (YNNPACK) matmul but by a multi-threaded Eigen contraction (see docs/PERFORMANCE.md).
    # So the weight gradient is a plain row-major matmul on an explicitly transposed operand:
    # ``x.T @ g``, with one ``x.T`` shared by every weight that reads ``x`` (q/k/v, gate/up). The
    # optimization barrier keeps XLA from folding the transpose back into the dot and, since it
    # also takes the cotangents, from hoisting it into the forward pass (where it would stay live
    # until the backward).
    x, ws = res
    gs, ws = _fresh(tuple(gs), ws, late)
    dt = preferred_element_type
    dx = None
    for g, w in zip(gs, ws):
        d = jnp.dot(g, w, preferred_element_type=dt) if w_transposed else _dot_nt(g, w, dt)
        dx = d if dx is None else dx + d
    if w_transposed:  # y = x @ w.T: dw = g.T @ x
        gts, x_ = jax.lax.optimization_barrier(([g.T for g in gs], x))
        dws = [jnp.dot(gt, x_, preferred_element_type=dt) for gt in gts]
    elif len(ws) == 1:
        dws = [_weight_grad(x, gs[0], ws[0].dtype, dt)]
    else:
        xt, gs_ = jax.lax.optimization_barrier((x.T, list(gs)))
        dws = [jnp.dot(xt, g, preferred_element_type=dt) for g in gs_]
    return dx.astype(x.dtype), tuple(dw.astype(w.dtype) for dw, w in zip(dws, ws))


_token_matmuls.defvjp(_token_matmuls_fwd, _token_matmuls_bwd)


def _token_plan(eq: str, x_shape, w_shape):
    """``(K, w2_shape, w_transposed, out_free_shape)`` for `token_einsums`'s 2-D form of ``eq``."""
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


def token_einsums(eqs, x: Array, ws, preferred_element_type=None, *, late: bool = True) -> list[Array]:
    """`einsums` as 2-D matmuls ``[B*T, K] @ [K, M]`` with a custom backward (``cpu_fast``).

    Same results as the einsums, but on XLA:CPU the backward of the 3-D einsum transposes the
    cotangent and misses the fast matmul path (2.7x slower LM-head gradient), and the weight
    gradients need the layout chosen in `_token_matmuls_bwd`. Weights that share ``x`` (q/k/v,
    gate/up) share one backward.
    """
    B, T = x.shape[:2]
    plans = [_token_plan(eq, x.shape, w.shape) for eq, w in zip(eqs, ws)]
    K, _, w_transposed, _ = plans[0]
    if any(p[2] != w_transposed for p in plans):
        raise ValueError("token_einsums: mixed weight layouts")
    ys = _token_matmuls(x.reshape(B * T, K), tuple(w.reshape(p[1]) for w, p in zip(ws, plans)),
                        w_transposed, preferred_element_type, late)
    return [y.reshape((B, T) + p[3]) for y, p in zip(ys, plans)]


# ---------------------------------------------------------------------- the layer scan
def remat_scan(block, trained, frozen, x: Array, aux):
    """``h = block(h, trained[i], frozen[i], aux)`` for every layer ``i`` of the stacked trees
    ``trained`` and ``frozen`` (leading layer axis), fully rematerialized: the forward pass keeps
    each block's input, the backward pass recomputes one block at a time. Differentiable in
    ``trained`` and ``x`` (reverse mode); ``frozen`` (its ``uint16`` leaves are bfloat16 bits)
    and ``aux`` are not differentiated.

    The same values and gradients as ``lax.scan`` over ``jax.checkpoint(block)``, with one
    difference in what XLA:CPU sees: XLA:CPU converts a bfloat16 array that a loop slices to
    float32 *before* the loop, so the plain scan kept a float32 copy of every stacked bfloat16
    weight alive for the whole step (SmolLM2 in bfloat16: 425 MB). Here the bfloat16 weights and
    the saved block inputs enter the loops as their bits (``uint16``: a bitcast, no copy) and
    become bfloat16 inside the block; the weight gradients leave the backward loop in the
    weights' dtype."""
    return _remat_scan(block, trained, frozen, x, aux)


def _block_of_bits(block, h, tb, fb, aux):
    return block(from_bits(h), jax.tree.map(from_bits, tb), jax.tree.map(from_bits, fb), aux)


def _remat_forward(block, trained, frozen, x, aux, keep_inputs: bool):
    def step(h, ws):
        return _block_of_bits(block, h, *ws, aux), (to_bits(h) if keep_inputs else None)

    return jax.lax.scan(step, x, (jax.tree.map(to_bits, trained), jax.tree.map(to_bits, frozen)))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _remat_scan(block, trained, frozen, x, aux):
    return _remat_forward(block, trained, frozen, x, aux, False)[0]


def _remat_scan_fwd(block, trained, frozen, x, aux):
    y, hs = _remat_forward(block, trained, frozen, x, aux, True)
    return y, (jax.tree.map(to_bits, trained), jax.tree.map(to_bits, frozen), hs, aux)


def _remat_scan_bwd(block, res, g):
    t_bits, f_bits, hs, aux = res

    def step(carry, xs):
        gh, dts = carry
        i, tb, fb, hb = xs
        f = jax.tree.map(from_bits, fb)
        _, vjp = jax.vjp(lambda h, t: block(h, t, f, aux), from_bits(hb), jax.tree.map(from_bits, tb))
        dh, dt = vjp(gh)
        # stacked as bits too: a bfloat16 update of the stack is widened
        dts = jax.tree.map(lambda acc, d: jax.lax.dynamic_update_index_in_dim(acc, to_bits(d), i, 0), dts, dt)
        return (dh, dts), None

    # The stacked weight gradients are the loop's carry, filled layer by layer, and start as
    # zeros made when this backward pass starts, one buffer per leaf (`_late_zeros`). As the
    # scan's own outputs, XLA merged the zeros of every same-shaped leaf of both tasks' backward
    # passes into one buffer made at the start of the step, then copied it into each loop: ~200 MB
    # of zeros alive through the first task's backward pass and the second task's forward pass.
    leaves, tree = jax.tree.flatten(t_bits)
    dts = tree.unflatten([_late_zeros(t.shape, t.dtype, g, fill=k) for k, t in enumerate(leaves)])
    (dx, dtrained), _ = jax.lax.scan(step, (g, dts), (jnp.arange(hs.shape[0]), t_bits, f_bits, hs), reverse=True)
    return jax.tree.map(from_bits, dtrained), None, dx, None


_remat_scan.defvjp(_remat_scan_fwd, _remat_scan_bwd)


# ---------------------------------------------------------------------- the LM head's log-probs
def head_logprobs(x: Array, w: Array, bias: Array | None, targets: Array, *, vocab_major: bool,
                  token_chunk: int, chunk_elements: int) -> Array:
    """``log_softmax(x @ W + bias)[targets]`` per row of ``x [n, E]`` (float32 ``[n]``), with
    ``W = w.T`` for a vocabulary-major ``w [V, E]`` (a tied embedding) and ``W = w [E, V]``
    otherwise. ``n`` is a multiple of ``token_chunk``.

    Both passes run over blocks of rows (a multiple of ``token_chunk``) by *vocabulary* columns,
    about ``chunk_elements`` logits each, reading the weight one vocabulary chunk at a time (as
    bits, see `remat_scan`). The forward pass keeps a running log-sum-exp per row; the backward
    pass recomputes each block's logits, and each vocabulary chunk's weight gradient is complete
    when its loop iteration ends: it is written once, in the weight's dtype, after a float32
    accumulation. Under autodiff, the token-chunked loop of `CausalLM.token_logprobs` read the
    whole weight in every iteration (XLA:CPU converted a bfloat16 one to float32 once and kept
    it) and its backward accumulated the ``[V, E]`` weight gradient across iterations: a float32
    product per chunk next to a running sum (bfloat16 for a bfloat16 weight, rounded at every
    chunk) and its initial zeros (SmolLM2: ~430 MB).

    `CausalLM.token_logprobs` uses it for a bfloat16 compute dtype. For a float32 head it saved
    58 MB without remat but cost 195 MB with remat (SmolLM2, 30 unrolled blocks: its ``[V, E]``
    gradient chunks and the tied lookup's gradient are summed in a third buffer), so float32 keeps
    autodiff's loop."""
    return _head_lp(vocab_major, token_chunk, chunk_elements, x, w, bias, targets)


def _head_logits(xc: Array, w: Array, bias, vocab_major: bool) -> Array:
    lg = _dot_nt(xc, w, jnp.float32) if vocab_major else jnp.dot(xc, w, preferred_element_type=jnp.float32)
    return lg if bias is None else lg + bias.astype(jnp.float32)


def _vocab_chunk(wb, bias, V: int, cols: int, v_axis: int, j):
    """Chunk ``j`` of the weight (from its bits ``wb``) and bias: ``(start, w_j, b_j, fresh)``. The
    last chunk starts at ``V - cols`` and may overlap the one before: ``fresh`` marks the columns
    no earlier chunk covered."""
    start = jnp.minimum(j * cols, V - cols)
    wj = from_bits(jax.lax.dynamic_slice_in_dim(wb, start, cols, v_axis))
    bj = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, cols)
    return start, wj, bj, (start + jnp.arange(cols)) >= j * cols


def _head_forward(vocab_major, chunk, chunk_elements, x, w, bias, targets):
    """``(log-prob of each target, log-sum-exp of each row)``, over blocks of rows x vocabulary
    columns with a running log-sum-exp: the loops read slices of the weight (as bits), never the
    whole weight, which XLA:CPU would convert to float32 once per step and keep."""
    n, E = x.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    rows, cols = _head_plan(n, V, chunk, chunk_elements)
    v_axis = 0 if vocab_major else 1
    wb = to_bits(w)
    row_xs = (to_bits(x).reshape(n // rows, rows, E), targets.reshape(-1, rows))

    def vocab_chunk(carry, j):
        m, s, picked = carry
        start, wj, bj, fresh = _vocab_chunk(wb, bias, V, cols, v_axis, j)

        def row_chunk(_, xs):
            xb, tr = xs
            lg = jnp.where(fresh[None, :], _head_logits(from_bits(xb), wj, bj, vocab_major), -jnp.inf)
            bm = jnp.max(lg, axis=-1)
            hit = ((tr[:, None] - start) == jnp.arange(cols)[None, :]) & fresh[None, :]
            return None, (bm, jnp.sum(jnp.exp(lg - bm[:, None]), axis=-1), jnp.sum(jnp.where(hit, lg, 0.0), axis=-1))

        _, (bm, bs, pk) = jax.lax.scan(row_chunk, None, row_xs)
        bm, bs, pk = bm.reshape(n), bs.reshape(n), pk.reshape(n)
        m_new = jnp.maximum(m, bm)
        return (m_new, s * jnp.exp(m - m_new) + bs * jnp.exp(bm - m_new), picked + pk), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s, picked), _ = jax.lax.scan(vocab_chunk, init, jnp.arange(-(-V // cols)))
    lse = m + jnp.log(s)
    return picked - lse, lse


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _head_lp(vocab_major, chunk, chunk_elements, x, w, bias, targets):
    return _head_forward(vocab_major, chunk, chunk_elements, x, w, bias, targets)[0]


def _head_lp_fwd(vocab_major, chunk, chunk_elements, x, w, bias, targets):
    lp, lse = _head_forward(vocab_major, chunk, chunk_elements, x, w, bias, targets)
    return lp, (x, w, bias, targets, lse)


def _head_plan(n: int, vocab: int, chunk: int, chunk_elements: int) -> tuple[int, int]:
    """``(rows, columns)`` of one backward block: ``chunk_elements / 512`` vocabulary columns (at
    most the vocabulary), and the rows of the largest ``chunk * 2^k`` dividing ``n`` that keeps
    the block within ``chunk_elements`` (at least ``chunk``)."""
    cols = max(1, min(vocab, chunk_elements // 512))
    rows = chunk
    while n % (rows * 2) == 0 and rows * 2 * cols <= chunk_elements:
        rows *= 2
    return rows, cols


def _head_lp_bwd(vocab_major, chunk, chunk_elements, res, g):
    x, w, bias, targets, lse = res
    n, E = x.shape
    V = w.shape[0] if vocab_major else w.shape[1]
    rows, cols = _head_plan(n, V, chunk, chunk_elements)
    v_axis = 0 if vocab_major else 1
    wb = to_bits(w)
    row_xs = (to_bits(x).reshape(n // rows, rows, E), lse.reshape(-1, rows),
              g.astype(jnp.float32).reshape(-1, rows), targets.reshape(-1, rows))

    def vocab_chunk(carry, j):
        # overlapping columns of the last chunk: left out of dx, dropped in _assemble
        start, wj, bj, fresh = _vocab_chunk(wb, bias, V, cols, v_axis, j)
        wj = wj.astype(jnp.float32)

        def row_chunk(carry, xs):
            dw, db = carry
            xb, ls, gr, tr = xs
            xc = from_bits(xb)
            p = jnp.exp(_head_logits(xc, wj, bj, vocab_major) - ls[:, None])
            onehot = ((tr[:, None] - start) == jnp.arange(cols)[None, :]).astype(jnp.float32)
            dl = gr[:, None] * (onehot - p)  # the cotangent of this block's logits
            xf = xc.astype(jnp.float32)
            dw = dw + (jnp.dot(dl.T, xf) if vocab_major else jnp.dot(xf.T, dl))
            dl_fresh = jnp.where(fresh[None, :], dl, 0.0)
            dxc = jnp.dot(dl_fresh, wj) if vocab_major else _dot_nt(dl_fresh, wj)
            return (dw, db + dl.sum(0)), dxc

        dw0 = jnp.zeros((cols, E) if vocab_major else (E, cols), jnp.float32)
        (dw, db), dxs = jax.lax.scan(row_chunk, (dw0, jnp.zeros((cols,), jnp.float32)), row_xs)
        dx, dws = carry
        dws = jax.lax.dynamic_update_index_in_dim(dws, to_bits(dw.astype(w.dtype)), j, 0)
        return (dx + dxs.reshape(n, E), dws), db

    k = -(-V // cols)
    dws = _late_zeros((k, cols, E) if vocab_major else (k, E, cols), to_bits(w[:0]).dtype, (lse, g))
    (dx, dw_chunks), db_chunks = jax.lax.scan(vocab_chunk, (jnp.zeros((n, E), jnp.float32), dws), jnp.arange(k))
    dw = from_bits(_assemble(dw_chunks, V, cols, v_axis))
    db = None if bias is None else _assemble(db_chunks, V, cols, 0).astype(bias.dtype)
    return dx.astype(x.dtype), dw, db, None


def _late_zeros(shape, dtype, after, fill: int = 0) -> Array:
    """Zeros made no earlier than ``after`` (see `never`): XLA:CPU's scheduler otherwise makes a
    loop's or a scatter's zero-filled output buffer at the start of the step, where it stays
    until that (late) use. A distinct ``fill`` (the value the never-taken branch would hold)
    keeps XLA from merging same-shaped zeros into one buffer that each user then copies."""
    return jnp.full(shape, jnp.where(never(after), fill + 1, 0).astype(dtype))


def _assemble(chunks: Array, V: int, cols: int, axis: int) -> Array:
    """The ``[k, ...]`` per-chunk results of `_head_lp_bwd` as one array with ``V`` entries along
    ``axis``: chunk ``j < k - 1`` holds entries ``j*cols ...``, the last one ``V - cols ...``."""
    k = chunks.shape[0]
    parts = jnp.moveaxis(chunks, 0, axis)  # the chunk axis just before the chunk's own
    merged = parts.reshape(parts.shape[:axis] + (k * cols,) + parts.shape[axis + 2:])
    tail = V - (k - 1) * cols
    if tail == cols:
        return merged
    return jnp.concatenate([jax.lax.slice_in_dim(merged, 0, (k - 1) * cols, axis=axis),
                            jax.lax.slice_in_dim(merged, k * cols - tail, k * cols, axis=axis)], axis=axis)


_head_lp.defvjp(_head_lp_fwd, _head_lp_bwd)


# ---------------------------------------------------------------------- embedding lookups
def lookup(table: Array, ids: Array) -> Array:
    """``jnp.take(table, ids, axis=0)`` for a 2-D ``table``, with a backward pass that sums the
    cotangent rows of repeated ids in float32 (sorting the ``n`` ids) and *writes* the ``n``
    summed rows into a table of zeros, in the table's dtype (as bits for bfloat16: an integer
    scatter). Autodiff's scatter-add of a bfloat16 table ran in float32 on XLA:CPU, into float32
    zeros that XLA made at the start of the step and kept (SmolLM2: 2 x 108 MB)."""
    return _lookup((table.shape, jnp.dtype(table.dtype)), table, ids)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(spec, table, ids):
    return from_bits(jnp.take(to_bits(table), ids, axis=0))  # rows of bits: an integer gather


def _lookup_fwd(spec, table, ids):
    return _lookup(spec, table, ids), ids


def _lookup_bwd(spec, ids, g):
    (V, E), dtype = spec
    flat = ids.reshape(-1)
    n = flat.shape[0]
    order = jnp.argsort(flat)
    sorted_ids = flat[order]
    first = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])
    segment = jnp.cumsum(first) - 1  # each sorted id's row among the distinct ids
    rows = jax.ops.segment_sum(g.reshape(n, E).astype(jnp.float32)[order], segment, num_segments=n,
                               indices_are_sorted=True)  # fmt: skip
    # the distinct ids in order; the rows past their count go nowhere (index V: dropped)
    targets = jnp.full((n,), V, flat.dtype).at[segment].set(sorted_ids)
    values = to_bits(rows.astype(dtype))
    # (not unique_indices: the dropped rows share the index V)
    table = _late_zeros((V, E), values.dtype, rows).at[targets].set(values, mode="drop")
    return from_bits(table), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


# ---------------------------------------------------------------------- remat of one block
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def recompute_late(f, state, x, positions, kv_valid):
    """``f(state, x, positions, kv_valid)`` (a ``jax.checkpoint``-ed block) whose backward pass
    cannot start its recomputation before the cotangent arrives: the saved activations (leaves
    shaped like ``x``'s leading ``[B, T]``) and the saved weights stored below float32 (which
    XLA:CPU converts to float32 for its matmuls) pass through a ``select`` on `never` of the
    cotangent: a data dependency, which, unlike an optimization barrier, XLA:CPU's scheduler
    keeps. XLA:CPU drops the optimization barriers ``jax.checkpoint`` relies on before it
    schedules, and then ran every block's recomputation early in the backward pass, so all of
    them were alive at once and remat saved nothing. Values are unchanged."""
    return f(state, x, positions, kv_valid)


def _recompute_late_fwd(f, state, x, positions, kv_valid):
    y, vjp = jax.vjp(lambda s, h: f(s, h, positions, kv_valid), state, x)
    return y, (vjp, x.shape[:2])


def _recompute_late_bwd(f, res, g):
    vjp, bt = res
    late_ = never(g)

    def late(r):
        if not jnp.issubdtype(r.dtype, jnp.floating) or (r.dtype == jnp.float32 and tuple(r.shape[:2]) != bt):
            return r
        return jnp.where(late_, jnp.zeros_like(r), r)

    d_state, dx = jax.tree.map(late, vjp)(g)
    return d_state, dx, None, None


recompute_late.defvjp(_recompute_late_fwd, _recompute_late_bwd)
