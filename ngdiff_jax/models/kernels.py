"""The model's matrix-multiply kernels, chosen by one switch: ``kernels="xla"`` or ``"cpu_fast"``.

``modeling.py`` states the architecture with plain einsum equations and calls the two functions
here, `einsums` (projections that read the same input) and `gated_down` (the gated MLP after its
input projections). What they compile to depends on the model's ``kernels`` setting:

``"xla"``
    Plain ``jnp.einsum``: XLA's own kernels and autodiff. Every JAX transform works, forward-mode
    included (``jax.jvp``, ``jax.jacfwd``, forward-over-reverse Hessian-vector products). The
    default on GPU and TPU.
``"cpu_fast"``
    Workarounds for XLA:CPU (the default on CPU; see docs/PERFORMANCE.md): token einsums as 2-D
    ``[B*T, K] @ [K, M]`` matmuls with a hand-written backward whose weight gradients use the
    row-major layout XLA:CPU's fast matmul takes, one shared backward for weights reading the
    same input (q/k/v, gate/up), and a SwiGLU down projection that recomputes ``silu(a) * b`` in
    its backward. Same values as ``"xla"`` (to float rounding), faster reverse mode on CPU; as
    ``jax.custom_vjp`` functions they support reverse mode only (``jax.jvp`` raises).

The setting is fixed when a model is built (``CausalLM(..., kernels=)``, ``from_config(...,
kernels=)``, ``from_pretrained(..., kernels=)``); ``None`` means `default_kernels`: the
``NGDIFF_KERNELS`` environment variable when set, else ``"cpu_fast"`` on the CPU backend and
``"xla"`` elsewhere. It is a static attribute of the model (``model.kernels``, part of its graph
definition), so jitted functions of the model recompile when it changes and never mix the two.

>>> resolve_kernels("xla")
'xla'
>>> resolve_kernels("fast")
Traceback (most recent call last):
...
ValueError: kernels='fast' is not one of 'xla', 'cpu_fast' (or None for the backend default)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array
KERNELS = ("xla", "cpu_fast")
ENV_VAR = "NGDIFF_KERNELS"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("ngdiff_kernels", default=None)


def default_kernels() -> str:
    """``$NGDIFF_KERNELS`` when set, else ``"cpu_fast"`` on the CPU backend and ``"xla"`` elsewhere."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in KERNELS:
            raise ValueError(f"{ENV_VAR}={env!r} is not one of 'xla', 'cpu_fast' (unset it for the backend default)")
        return env
    return "cpu_fast" if jax.default_backend() == "cpu" else "xla"


def resolve_kernels(kernels: str | None) -> str:
    """``kernels`` checked, or `default_kernels` for ``None``."""
    if kernels is None:
        return default_kernels()
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not one of 'xla', 'cpu_fast' (or None for the backend default)")
    return kernels


@contextlib.contextmanager
def use(kernels: str):
    """Run the enclosed model code with ``kernels`` (the model's forward sets this itself)."""
    token = _current.set(resolve_kernels(kernels))
    try:
        yield
    finally:
        _current.reset(token)


def current() -> str:
    """The kernels in effect: those of the enclosing `use`, else `default_kernels`."""
    k = _current.get()
    return k if k is not None else default_kernels()


# ---------------------------------------------------------------------- the API modeling.py uses
def einsums(eqs, x: Array, ws, preferred_element_type=None, *, late: bool = True) -> list[Array]:
    """``[jnp.einsum(eq, x, w, preferred_element_type=...) for eq, w in zip(eqs, ws)]``.

    The equations' input and output start with ``bt`` (batch, time); the contracted axes are the
    trailing axes of ``x`` and the leading (or, as for a tied ``[vocab, embed]`` head, trailing)
    axes of each ``w``. ``late`` (``cpu_fast``, weights below float32): convert each weight for its
    matmul only once ``x`` is ready (see `_fresh`); the LM head, called in a loop over token chunks,
    passes ``False``.
    """
    if current() == "cpu_fast":
        return token_einsums(eqs, x, ws, preferred_element_type, late=late)
    return [jnp.einsum(eq, x, w, preferred_element_type=preferred_element_type) for eq, w in zip(eqs, ws)]


def gated_down(act, gate: Array, up: Array, w: Array) -> Array:
    """``einsum("btm,me->bte", act(gate) * up, w)``: a gated MLP's down projection."""
    if current() == "cpu_fast" and act is jax.nn.silu:
        B, T, M = gate.shape
        return _swiglu_down(gate.reshape(B * T, M), up.reshape(B * T, M), w).reshape(B, T, -1)
    return jnp.einsum("btm,me->bte", act(gate) * up, w)


# ---------------------------------------------------------------------- cpu_fast implementations
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
def _swiglu_down(a: Array, b: Array, w: Array) -> Array:
    """``(silu(a) * b) @ w`` for ``a, b [N, M]``, ``w [M, E]``, with a hand-written backward that
    keeps only ``a`` and ``b`` (and ``w``) as residuals and recomputes ``silu(a) * b`` there. Under
    autodiff the ``[N, M]`` product is a residual of the down projection, which makes XLA:CPU
    materialize ``sigmoid(a)``, ``silu(a)`` and the product in three separate passes in the
    forward; here the product feeds only the matmul and fuses into it, as in a plain forward."""
    (a, b), (w,) = _fresh((a, b), (w,))
    return jnp.dot(jax.nn.silu(a) * b, w)


def _swiglu_down_fwd(a, b, w):
    return _swiglu_down(a, b, w), (a, b, w)


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


_swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)


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
