"""The linear recurrence ``h_t = a_t * h_{t-1} + b_t``, pure ``jax.numpy``.

Every recurrent layer of flax_minrnn computes its gates and then calls
:func:`linear_scan`; this module holds the only copy of the recurrence math.

Conventions
-----------
* ``a`` and ``b`` have shape ``(batch, time, *features)`` (time is axis 1);
  ``h0`` has shape ``(batch, *features)``; ``None`` means a zero state.
* The state is accumulated in float32 (float64 when the inputs are float64),
  whatever the input dtype: bfloat16 gates give float32 states.
* The return order is ``(h_last, h)``: the final state (the carry) first, then
  every state ``h_0 .. h_{T-1}``, as in the rest of the public API.
* Forward direction (``reverse=False``)::

      h_{-1} = h0
      h_t    = a_t * h_{t-1} + b_t,      t = 0 .. T-1
      h_last = h_{T-1}

  With ``reverse=True`` the time axis runs backwards: ``h_T = h0``,
  ``h_t = a_t * h_{t+1} + b_t`` and ``h_last = h_0``.

Options common to every implementation
--------------------------------------
* ``reset`` (bool ``(batch, time)``): a new document starts at step ``t``;
  the state restarts from zero there (``h_t = b_t``).  In reverse mode the
  boundary is the same (documents are not mixed in either direction).
* ``seq_lengths`` (int ``(batch,)``) or ``mask`` (bool ``(batch, time)``):
  steps that are not valid leave the state unchanged (``a = 1, b = 0``), so the
  final carry is the state at the last valid step, and their outputs are zero.

Implementations (:class:`ScanImpl`), all with this signature:

* ``"associative"``: :func:`jax.lax.associative_scan` in linear space; parallel
  depth ``O(log T)``, the default on accelerators.
* ``"sequential"``: :func:`jax.lax.scan`; the reference.
* ``"chunked"``: a two-level form for CPUs: the time axis is cut into chunks,
  every chunk is scanned in parallel with the others (``O(chunk)`` sequential
  steps over wide vectors), then the chunk boundaries are combined
  (``O(T / chunk)`` steps) and a second pass over the chunks finishes.
* ``"log"``: associative scan on ``(log a, log h)`` with a ``logaddexp``
  combine.  Domain: ``a >= 0``, ``b >= 0``, ``h0 >= 0`` (positive states, as in
  the minGRU paper's ``g()`` parameterisation); outside it the result is NaN.
* ``"heinsen"``: the minGRU paper appendix's ``cumsum`` + ``logcumsumexp``
  form, kept for paper parity only.  Domain: ``a > 0`` (no resets),
  ``b >= 0``, ``h0 >= 0``.  Its float32 error grows with ``T`` (the cumulative
  sum of ``log a`` loses digits); prefer ``"log"``.
* ``"auto"``: chosen from the backend and ``T`` by :func:`default_impl`.

Gradients: all implementations share one hand-written backward
(:func:`jax.custom_vjp`).  The adjoint of a linear recurrence is the reverse
linear recurrence ``lam_t = g_t + a_{t+1} lam_{t+1}``; then ``db_t = lam_t``,
``da_t = lam_t * h_{t-1}`` and ``dh0 = a_0 lam_0``.  It keeps only ``a`` and the
states as residuals, so backward memory is linear in ``T`` (autodiff through
``associative_scan`` would keep ``O(T log T)`` intermediates).
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["ScanImpl", "linear_scan", "default_impl"]


class ScanImpl(str, enum.Enum):
    """Implementations of :func:`linear_scan` (all with the same signature)."""

    AUTO = "auto"
    ASSOCIATIVE = "associative"
    SEQUENTIAL = "sequential"
    CHUNKED = "chunked"
    LOG = "log"
    HEINSEN = "heinsen"


_IMPL_NAMES = tuple(i.value for i in ScanImpl)

# On CPU the chunked form beats both the sequential and the associative scan
# from this length on (measured with benchmarks/; below it the sequential scan
# has fewer passes over memory and wins).
_CPU_CHUNKED_MIN_T = 64


def default_impl(seq_len: int, backend: Optional[str] = None) -> ScanImpl:
    """The implementation ``"auto"`` resolves to.

    Args:
      seq_len: length of the time axis.
      backend: a JAX backend name; defaults to ``jax.default_backend()``.

    Returns:
      ``ASSOCIATIVE`` on GPU/TPU; on CPU ``CHUNKED`` for ``seq_len >= 64``
      and ``SEQUENTIAL`` below.  The choice never changes parameters, only
      speed (all implementations agree to float32 rounding).
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        if seq_len >= _CPU_CHUNKED_MIN_T:
            return ScanImpl.CHUNKED
        return ScanImpl.SEQUENTIAL
    return ScanImpl.ASSOCIATIVE


def resolve_impl(impl: Union[str, ScanImpl], seq_len: int, *,
                 name: str = "impl") -> ScanImpl:
    """Validates ``impl`` and resolves ``"auto"``; raises ``ValueError``.

    ``name`` is the argument named in the error (``scan_impl`` in layers).
    """
    if isinstance(impl, ScanImpl):
        value = impl
    elif isinstance(impl, str) and impl in _IMPL_NAMES:
        value = ScanImpl(impl)
    else:
        raise ValueError(
            f"{name} must be one of {list(_IMPL_NAMES)}, got {impl!r}")
    if value is ScanImpl.AUTO:
        value = default_impl(seq_len)
    return value


# ----------------------------------------------------------------------------
# Input checks.


def _accum_dtype(*dtypes) -> jnp.dtype:
    """float64 if any input is float64, else float32 (bf16/f16 accumulate in f32)."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _check_float(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {x.dtype}")


def _concrete_or_none(x) -> Optional[np.ndarray]:
    """The value of ``x`` if it is known at trace time, else ``None``."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError):
        return None


def lengths_to_mask(seq_lengths: Array, seq_len: int) -> Array:
    """Boolean ``(batch, seq_len)`` mask, True at steps ``t < seq_lengths``."""
    return jnp.arange(seq_len)[None, :] < seq_lengths[:, None]


def check_seq_lengths(seq_lengths, batch: int, seq_len: int) -> Array:
    """Validates ``seq_lengths`` (int, shape ``(batch,)``, values in [0, T])."""
    if not hasattr(seq_lengths, "shape"):
        seq_lengths = np.asarray(seq_lengths)
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(
            f"seq_lengths must be an integer array, got dtype {seq_lengths.dtype}")
    if tuple(seq_lengths.shape) != (batch,):
        raise ValueError(
            f"seq_lengths must have shape (batch,) = ({batch},), "
            f"got {tuple(seq_lengths.shape)}")
    value = _concrete_or_none(seq_lengths)
    if value is not None and value.size and (value.min() < 0 or value.max() > seq_len):
        raise ValueError(
            f"seq_lengths must lie in [0, {seq_len}] (the time axis length), "
            f"got values in [{value.min()}, {value.max()}]")
    return jnp.asarray(seq_lengths)


def reset_boundaries(reset: Array, reverse: bool) -> Array:
    """Where the state is zeroed before the step, in scan order.

    Forward, a document starting at ``t`` zeroes the state before step ``t``.
    Reversed, it is the document starting at ``t + 1`` that must not leak into
    step ``t``, so the boundary moves one step earlier.
    """
    if not reverse:
        return reset
    return jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], axis=1)


def check_bool_bt(name: str, x, batch: int, seq_len: int) -> Array:
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if tuple(x.shape) != (batch, seq_len):
        raise ValueError(
            f"{name} must have shape (batch, time) = ({batch}, {seq_len}), "
            f"got {tuple(x.shape)}")
    if x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {x.dtype}")
    return jnp.asarray(x)


# ----------------------------------------------------------------------------
# Forward implementations on prepared inputs: a, b, h0 share the accumulation
# dtype; a, b are (B, T, *F) and h0 is (B, *F).  Each returns (h_last, h).


def _fold_h0(a: Array, b: Array, h0: Array, reverse: bool) -> Array:
    """Adds ``a_first * h0`` into the first step's ``b`` (scan order)."""
    idx = -1 if reverse else 0
    return b.at[:, idx].add(a[:, idx] * h0)


def _last(h: Array, reverse: bool) -> Array:
    return h[:, 0] if reverse else h[:, -1]


def _combine_linear(x, y):
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2


def _associative(a, b, h0, reverse):
    b = _fold_h0(a, b, h0, reverse)
    _, h = jax.lax.associative_scan(_combine_linear, (a, b), axis=1,
                                    reverse=reverse)
    return _last(h, reverse), h


def _sequential(a, b, h0, reverse):
    def step(h, ab):
        a_t, b_t = ab
        h = a_t * h + b_t
        return h, h

    a_t, b_t = jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)
    h_last, h = jax.lax.scan(step, h0, (a_t, b_t), reverse=reverse)
    return h_last, jnp.swapaxes(h, 0, 1)


def _chunk_size(seq_len: int) -> int:
    # About sqrt(T) balances the in-chunk steps against the chunk count; a
    # power of two keeps the reshapes cheap.
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(seq_len)))))


def _chunked(a, b, h0, reverse):
    seq_len = a.shape[1]
    c = _chunk_size(seq_len)
    n = -(-seq_len // c)
    pad = n * c - seq_len
    if pad:
        # Identity steps at the end (a = 1, b = 0) leave the state unchanged in
        # either direction.
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths, constant_values=0)
    feat = a.shape[2:]
    # Time-major inside chunks: (c, B, n, *F).
    a_c = jnp.moveaxis(a.reshape(a.shape[0], n, c, *feat), 2, 0)
    b_c = jnp.moveaxis(b.reshape(b.shape[0], n, c, *feat), 2, 0)

    def step(h, ab):
        a_t, b_t = ab
        h = a_t * h + b_t
        return h, h

    # Pass 1: every chunk from a zero state, keeping only its final state and
    # the product of its a's (c sequential steps over B * n * F lanes).
    def local(carry, ab):
        h, p = carry
        a_t, b_t = ab
        return (a_t * h + b_t, a_t * p), None

    zeros = jnp.zeros_like(a_c[0])  # like a: varying inside shard_map too
    (h_end, a_prod), _ = jax.lax.scan(local, (zeros, jnp.ones_like(zeros)),
                                      (a_c, b_c), reverse=reverse)
    # Pass 2: the true initial state of every chunk (n sequential steps).
    _, h_after = jax.lax.scan(
        step, h0, (jnp.moveaxis(a_prod, 1, 0), jnp.moveaxis(h_end, 1, 0)),
        reverse=reverse)
    # h_after[k] is the state after chunk k; chunk k starts from the state
    # after its predecessor in scan order.
    h_after = jnp.moveaxis(h_after, 0, 1)  # (B, n, *F)
    h0_chunk = h0[:, None]
    if reverse:
        h_init = jnp.concatenate([h_after[:, 1:], h0_chunk], axis=1)
    else:
        h_init = jnp.concatenate([h0_chunk, h_after[:, :-1]], axis=1)
    # Pass 3: rescan every chunk from its true initial state.
    _, h = jax.lax.scan(step, h_init, (a_c, b_c), reverse=reverse)
    h = jnp.moveaxis(h, 0, 2).reshape(a.shape)[:, :seq_len]
    return _last(h, reverse), h


def _safe_log(x: Array) -> Array:
    # log(0) = -inf is a valid log-space value (a zero state or gate).
    return jnp.log(x)


def _log_space(a, b, h0, reverse):
    def combine(x, y):
        la1, lb1 = x
        la2, lb2 = y
        return la1 + la2, jnp.logaddexp(la2 + lb1, lb2)

    la, lb = _safe_log(a), _safe_log(b)
    idx = -1 if reverse else 0
    lb = lb.at[:, idx].set(jnp.logaddexp(lb[:, idx], la[:, idx] + _safe_log(h0)))
    _, lh = jax.lax.associative_scan(combine, (la, lb), axis=1, reverse=reverse)
    h = jnp.exp(lh)
    return _last(h, reverse), h


def _heinsen(a, b, h0, reverse):
    if reverse:
        a, b = jnp.flip(a, 1), jnp.flip(b, 1)
    la = jnp.log(a)
    # a_star_t = sum_{s<=t} log a_s, with a_star_{-1} = 0 for h0.
    a_star = jnp.concatenate([jnp.zeros_like(la[:, :1]), jnp.cumsum(la, axis=1)], 1)
    values = jnp.concatenate([_safe_log(h0)[:, None], _safe_log(b)], axis=1)
    lh = a_star + jax.lax.cumlogsumexp(values - a_star, axis=1)
    h = jnp.exp(lh[:, 1:])
    if reverse:
        h = jnp.flip(h, 1)
    return _last(h, reverse), h


_FORWARD = {
    ScanImpl.ASSOCIATIVE: _associative,
    ScanImpl.SEQUENTIAL: _sequential,
    ScanImpl.CHUNKED: _chunked,
    ScanImpl.LOG: _log_space,
    ScanImpl.HEINSEN: _heinsen,
}

# The backward pass runs a linear-space scan (cotangents can be negative).
_BACKWARD = {
    ScanImpl.ASSOCIATIVE: _associative,
    ScanImpl.SEQUENTIAL: _sequential,
    ScanImpl.CHUNKED: _chunked,
    ScanImpl.LOG: _associative,
    ScanImpl.HEINSEN: _associative,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a, b, h0, impl: ScanImpl, reverse: bool):
    return _FORWARD[impl](a, b, h0, reverse)


def _scan_fwd(a, b, h0, impl, reverse):
    h_last, h = _FORWARD[impl](a, b, h0, reverse)
    return (h_last, h), (a, h, h0)


def _scan_bwd(impl, reverse, residuals, cotangents):
    a, h, h0 = residuals
    g_last, g = cotangents
    # Adjoint: lam_t = g_t + a_next(t) * lam_next(t), started from g_last,
    # i.e. the same linear recurrence run in the opposite direction with the
    # coefficients shifted by one step.
    ones = jnp.ones_like(a[:, :1])
    if reverse:
        coef = jnp.concatenate([ones, a[:, :-1]], axis=1)
        h_prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
        a_first = a[:, -1]
    else:
        coef = jnp.concatenate([a[:, 1:], ones], axis=1)
        h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
        a_first = a[:, 0]
    lam_first, lam = _BACKWARD[impl](coef, g, g_last, not reverse)
    del lam_first  # lam at the last step in scan order, not needed
    lam_0 = lam[:, -1] if reverse else lam[:, 0]
    return lam * h_prev, lam, a_first * lam_0


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_scan(
    a: Array,
    b: Array,
    h0: Optional[Array] = None,
    *,
    impl: Union[str, ScanImpl] = ScanImpl.AUTO,
    reset: Optional[Array] = None,
    seq_lengths: Optional[Array] = None,
    mask: Optional[Array] = None,
    reverse: bool = False,
) -> Tuple[Array, Array]:
    """Runs ``h_t = a_t * h_{t-1} + b_t`` over axis 1 and returns ``(h_last, h)``.

    Args:
      a: decay coefficients, float ``(batch, time, *features)``.
      b: inputs, float, the same shape as ``a`` (no broadcasting).
      h0: initial state ``(batch, *features)``; ``None`` means zeros.
      impl: one of :class:`ScanImpl` (or its string value); ``"auto"`` picks
        per backend and length (:func:`default_impl`).
      reset: optional bool ``(batch, time)``; True where a new document starts
        (the state restarts from zero at that step).
      seq_lengths: optional int ``(batch,)`` in ``[0, time]``: valid lengths.
        Mutually exclusive with ``mask``.
      mask: optional bool ``(batch, time)``: True at valid steps.
      reverse: scan from the last step to the first.

    Returns:
      ``(h_last, h)``: the final state ``(batch, *features)`` (the state at the
      last valid step in scan order) and all states ``(batch, time,
      *features)`` with zeros at invalid steps, both in the accumulation dtype
      (float32, or float64 for float64 inputs).

    Raises:
      TypeError: non-floating ``a``/``b``/``h0``, non-bool ``reset``/``mask``,
        non-integer ``seq_lengths``.
      ValueError: shapes that do not match, unknown ``impl``, ``seq_lengths``
        outside ``[0, time]`` (checked when its value is known at trace time),
        both ``mask`` and ``seq_lengths``, ``reset`` with ``impl="heinsen"``.
    """
    _check_float("a", a)
    _check_float("b", b)
    if a.ndim < 2:
        raise ValueError(
            f"a must have shape (batch, time, *features), got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            "a and b must have the same shape (batch, time, *features), "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
    batch, seq_len = a.shape[:2]
    if seq_len < 1:
        raise ValueError("the time axis (axis 1) of a and b must be non-empty")
    state_shape = (batch,) + tuple(a.shape[2:])
    if h0 is not None:
        _check_float("h0", h0)
        if tuple(h0.shape) != state_shape:
            raise ValueError(
                f"h0 must have shape (batch, *features) = {state_shape}, "
                f"got {tuple(h0.shape)}")
    impl = resolve_impl(impl, seq_len)
    if mask is not None and seq_lengths is not None:
        raise ValueError("pass either mask or seq_lengths, not both")

    dtype = _accum_dtype(a.dtype, b.dtype, *(() if h0 is None else (h0.dtype,)))
    a = a.astype(dtype)
    b = b.astype(dtype)
    h0 = jnp.zeros(state_shape, dtype) if h0 is None else h0.astype(dtype)

    expand = (slice(None), slice(None)) + (None,) * (a.ndim - 2)
    if reset is not None:
        if impl is ScanImpl.HEINSEN:
            raise ValueError(
                "impl='heinsen' cannot represent a state reset (log 0 in a "
                "cumulative sum); use impl='log' or a linear-space impl")
        reset = check_bool_bt("reset", reset, batch, seq_len)
        a = jnp.where(reset_boundaries(reset, reverse)[expand],
                      jnp.zeros((), dtype), a)
    if seq_lengths is not None:
        seq_lengths = check_seq_lengths(seq_lengths, batch, seq_len)
        mask = lengths_to_mask(seq_lengths, seq_len)
    elif mask is not None:
        mask = check_bool_bt("mask", mask, batch, seq_len)
    if mask is not None:
        m = mask[expand]
        a = jnp.where(m, a, jnp.ones((), dtype))
        b = jnp.where(m, b, jnp.zeros((), dtype))

    h_last, h = _scan(a, b, h0, impl, bool(reverse))
    if mask is not None:
        h = jnp.where(mask[expand], h, jnp.zeros((), dtype))
    return h_last, h
