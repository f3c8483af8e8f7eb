"""The linear recurrence ``h_t = a_t * h_{t-1} + b_t`` in ``jax.numpy``.

This module holds the only copy of the recurrence in JAX.  Every recurrent
layer of flax_minrnn computes its coefficients and hands them to
:func:`linear_scan`, or hands its projection and gate function to
:func:`flax_minrnn.ops.gated.gated_scan`, which runs the same recurrence tile
by tile.

Conventions
-----------
* ``a`` and ``b`` have shape ``(batch, time, *features)`` (time is axis 1);
  ``h0`` has shape ``(batch, *features)``; ``None`` means a zero state.
* The state is accumulated in float32 (float64 when the inputs are float64),
  whatever the input dtype: bfloat16 coefficients give float32 states.
* The return order is ``(h_last, h)``: the final state (the carry) first, then
  every state ``h_0 .. h_{T-1}``, as in the rest of the public API.
* Forward direction (``reverse=False``)::

      h_{-1} = h0
      h_t    = a_t * h_{t-1} + b_t,      t = 0 .. T-1
      h_last = h_{T-1}

  With ``reverse=True`` the time axis runs backwards: ``h_T = h0``,
  ``h_t = a_t * h_{t+1} + b_t`` and ``h_last = h_0``.
* ``reset`` (bool ``(batch, time)``): a new document starts at step ``t``, and
  documents never mix: forward, the state restarts from zero at a
  document's first step (``h_t = b_t`` where ``reset[t]``); with
  ``reverse=True``, at its last step (``h_{t-1} = b_{t-1}``, the step before
  the next ``reset``).  Where that step is invalid (below), the restart
  moves to the next valid step in scan order, so a masked separator between
  packed documents keeps them apart; a restart with no valid step after it
  in the call does nothing.
* ``seq_lengths`` (int ``(batch,)``) or ``mask`` (bool ``(batch, time)``):
  invalid steps leave the state unchanged (``a = 1, b = 0``), so the final
  carry is the state at the last valid step, and their outputs are zero.

Implementations (:class:`ScanImpl`), one signature:

* ``"associative"``: :func:`jax.lax.associative_scan`; parallel depth
  ``O(log T)``; the default on GPU and TPU.
* ``"sequential"``: a loop over time in the ``(batch, time, ...)`` layout,
  ``_UNROLL`` steps per iteration, writing the states over ``b`` in place;
  the default on CPU below ``T = 64``.
* ``"chunked"``: for a bare :func:`linear_scan` the same loop as
  ``"sequential"``; for the layers (:mod:`flax_minrnn.ops.gated`) the time
  axis is cut into tiles whose projection, gates and recurrence run while
  the tile is in cache.  The default on CPU from ``T = 64``.
* Backends, loaded only when named (:mod:`flax_minrnn.backends`):
  ``"pallas"``, a Pallas GPU kernel (interpreted on CPU, for tests), and
  ``"native"``, compiled CPU kernels for the gates of MinGRU and MinLSTM
  (``"chunked"`` for a bare scan).
* ``"auto"``: chosen from the backend and ``T`` by :func:`default_impl`.

Derivatives
-----------
The tangent of a linear recurrence is a linear recurrence with the same
``a``::

    dh_t = a_t dh_{t-1} + (da_t h_{t-1} + db_t),     dh_{-1} = dh0

so :func:`linear_scan` is a ``jax.custom_jvp`` whose tangent is the scan
itself, applied through :func:`flax_minrnn.ops.linear.linear_op` with its
transpose written by hand: the adjoint ``lam_t = g_t + a_{t+1} lam_{t+1}``
(started from the cotangent of ``h_last``) is the same recurrence run the
other way over the coefficients shifted by one step, then ``db_t = lam_t``,
``da_t = lam_t h_{t-1}`` and ``dh0 = a_first lam_first``.  Every
implementation, kernels included, is therefore differentiated only through
these rules (never by autodiff through a kernel), in forward and reverse mode
and to any order, and keeps only ``a`` and the states as residuals (memory
linear in ``T``).
"""

from __future__ import annotations

import enum
import functools
import importlib
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

from flax_minrnn.ops import checks
from flax_minrnn.ops.linear import linear_op

Array = jax.Array

__all__ = ["ScanImpl", "linear_scan", "default_impl", "resolve_impl", "reset_boundaries",
           "backend_module", "IMPLEMENTATIONS"]


class ScanImpl(str, enum.Enum):
    """Implementations of the scan (all with the same signature and results).

    ``AUTO``: the default, resolved per backend by :func:`default_impl`;
    ``ASSOCIATIVE``: ``jax.lax.associative_scan`` (depth ``log T``);
    ``SEQUENTIAL``: a loop over time, a few steps per iteration;
    ``CHUNKED``: for the layers, a loop over tiles of steps that runs each
    tile's projection, gates and recurrence in cache
    (:mod:`flax_minrnn.ops.gated`), and for a bare scan the sequential loop;
    ``PALLAS`` and ``NATIVE``: the opt-in backends of
    :mod:`flax_minrnn.backends`, used only when named.  The module
    docstring says more.
    """

    AUTO = "auto"
    ASSOCIATIVE = "associative"
    SEQUENTIAL = "sequential"
    CHUNKED = "chunked"
    PALLAS = "pallas"  # backend: flax_minrnn.backends.pallas
    NATIVE = "native"  # backend: flax_minrnn.backends.native


# The one list of implementations (the names users pass as impl / scan_impl).
IMPLEMENTATIONS = tuple(i.value for i in ScanImpl)

# Backends: loaded on first use, by name only.  Each module defines
# ``forward(a, b, h0, reverse) -> (h_last, h)`` for the bare scan and may
# define ``gated`` for the layers (see flax_minrnn.ops.gated).
_BACKEND_MODULES = {ScanImpl.PALLAS: "flax_minrnn.backends.pallas",
                    ScanImpl.NATIVE: "flax_minrnn.backends.native"}

# From this length on the tiled scan is the faster one on the CPUs measured
# (benchmarks/README.md); below it the plain loop, which makes fewer passes.
_CPU_TILED_MIN_T = 64
# The platforms default_impl knows.
_BACKENDS = ("cpu", "gpu", "cuda", "rocm", "tpu")


def default_impl(seq_len: int, backend: Optional[str] = None) -> ScanImpl:
    """The implementation ``"auto"`` resolves to.

    Args:
      seq_len: length of the time axis.
      backend: a JAX platform name (``'cpu'``, ``'gpu'``, ``'cuda'``,
        ``'rocm'``, ``'tpu'``); defaults to ``jax.default_backend()``, where
        any platform but ``'cpu'`` is treated as an accelerator.

    Returns:
      On CPU ``CHUNKED`` from ``T = 64`` and ``SEQUENTIAL`` below;
      ``ASSOCIATIVE`` on GPU and TPU.  For a symbolic ``seq_len``
      (``jax.export``) ``CHUNKED`` on CPU and ``SEQUENTIAL`` elsewhere.
      Never a backend: the default path is
      plain JAX.  The choice changes speed and memory only, never parameters.
      The implementations agree to rounding, which they accumulate in
      different orders: over long runs of gates near 1 it grows like ``T``
      times the epsilon (in float32, about 1e-4 relative at ``T = 16384``
      with ``a = 1 - 1e-6``), so a model can differ at that level between a
      CPU (``chunked``) and a GPU (``associative``); float64 computes it
      to about ``T`` times 1e-16.
    """
    if backend is None:
        backend = jax.default_backend()  # Another plugin's platform counts as a GPU's.
    elif backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {list(_BACKENDS)}, got {backend!r}")
    if jax.export.is_symbolic_dim(seq_len):
        # jax.export with a symbolic time axis: no associative scan, which
        # needs a concrete length.
        return ScanImpl.CHUNKED if backend == "cpu" else ScanImpl.SEQUENTIAL
    if backend == "cpu":
        return ScanImpl.CHUNKED if seq_len >= _CPU_TILED_MIN_T else ScanImpl.SEQUENTIAL
    return ScanImpl.ASSOCIATIVE


def resolve_impl(impl: Union[str, ScanImpl], seq_len: int, *,
                 name: str = "impl") -> ScanImpl:
    """Validates ``impl`` and resolves ``"auto"``; raises ``ValueError``.

    ``name`` is the argument named in the error (``scan_impl`` in layers).
    A symbolic ``seq_len`` (``jax.export`` with a polymorphic time axis)
    allows ``"auto"``, ``"chunked"`` and ``"sequential"``, whose loops need
    no concrete length (:func:`default_impl`); any other named
    implementation is refused.
    """
    if isinstance(impl, ScanImpl):
        value = impl
    elif isinstance(impl, str) and impl in IMPLEMENTATIONS:
        value = ScanImpl(impl)
    else:
        raise ValueError(f"{name} must be one of {list(IMPLEMENTATIONS)}, got {impl!r}")
    if jax.export.is_symbolic_dim(seq_len) and value not in (
            ScanImpl.AUTO, ScanImpl.CHUNKED, ScanImpl.SEQUENTIAL):
        raise ValueError(
            f"{name}={value.value!r} needs a concrete sequence length, but the time axis "
            f"has the symbolic size {seq_len}: use {name}='auto', 'chunked' or 'sequential' "
            "(or export with a fixed T)")
    if value is ScanImpl.AUTO:
        value = default_impl(seq_len)
    return value


def backend_module(impl: ScanImpl):
    """The module of a backend implementation (imported on first use)."""
    return importlib.import_module(_BACKEND_MODULES[impl])


def reset_boundaries(reset: Array, reverse: bool, valid: Optional[Array] = None) -> Array:
    """Where the state is zeroed before the step, in scan order.

    Forward, a document starting at ``t`` zeroes the state before step ``t``.
    Reversed, it is the document starting at ``t + 1`` that must not leak into
    step ``t``, so the boundary moves one step earlier.

    With ``valid`` (``(batch, time)``), a boundary that falls on an invalid
    step moves to the next valid step in scan order: invalid steps keep the
    state, so the zeroing must reach the first step that uses it (a masked
    separator between two packed documents).  A boundary with no valid step
    after it in this call does nothing: the carry is the state at the last
    valid step.
    """
    boundary = reset
    if reverse:
        boundary = jnp.concatenate([time_slice(reset, 1, None),
                                    jnp.zeros_like(time_slice(reset, 0, 1))], axis=1)
    if valid is None:
        return boundary
    if reverse:
        boundary, valid = flip_time(boundary), flip_time(valid)
    # A valid step restarts if a boundary lies in (the last valid step
    # before it, itself]: the boundaries seen so far outnumber those seen up
    # to that step (the count never decreases, so its running maximum over
    # the valid steps is the count at the last one).
    seen = jnp.cumsum(boundary.astype(jnp.int32), axis=1)
    upto_valid = jax.lax.cummax(jnp.where(valid, seen, 0), axis=1)
    seen_before = jnp.concatenate([jnp.zeros_like(time_slice(seen, 0, 1)),
                                   time_slice(upto_valid, 0, -1)], axis=1)
    moved = valid & (seen > seen_before)
    return flip_time(moved) if reverse else moved


# ----------------------------------------------------------------------------
# Implementations on prepared inputs: a, b, h0 share the accumulation dtype;
# a, b are (B, T, *F) and h0 is (B, *F).  Each returns (h_last, h).


# Indexing of the time axis (axis 1) by lax ops: NumPy-style indexing of an
# array with a symbolic dimension (jax.export) lowers to a gather, whose
# transpose is a scatter that XLA may spend seconds constant-folding; these
# lower to slices, as the indexing does for concrete shapes.


def at_step(x: Array, i: int) -> Array:
    """``x[:, i]`` for a static ``i`` (0 or -1 on a symbolic time axis)."""
    return jax.lax.index_in_dim(x, i, 1, keepdims=False)


def time_slice(x: Array, start: int, stop) -> Array:
    """``x[:, start:stop]`` (``stop`` may be ``None``, negative or symbolic)."""
    return jax.lax.slice_in_dim(x, start, stop, axis=1)


def flip_time(x: Array) -> Array:
    """``x[:, ::-1]``."""
    return jax.lax.rev(x, (1,))


def last_state(h: Array, reverse: bool) -> Array:
    return at_step(h, 0 if reverse else -1)


def states_before(h: Array, h0: Array, reverse: bool) -> Array:
    """The state before each step in scan order: ``h`` shifted by one step,
    with ``h0`` before the first."""
    if reverse:
        return jnp.concatenate([time_slice(h, 1, None), h0[:, None]], axis=1)
    return jnp.concatenate([h0[:, None], time_slice(h, 0, -1)], axis=1)


def _combine(x, y):
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2


def _associative(a, b, h0, reverse):
    first = a.shape[1] - 1 if reverse else 0
    b = jax.lax.dynamic_update_index_in_dim(
        b, at_step(b, first) + at_step(a, first) * h0, first, 1)
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=1, reverse=reverse)
    return last_state(h, reverse), h


# Steps per iteration of the loop: XLA:CPU pays a fixed cost per while-loop
# iteration, which a short unrolled block of steps amortises.
_UNROLL = 8


def block_size(n, unroll: int) -> int:
    """Steps per loop iteration for ``n`` steps: ``unroll``, at most ``n``;
    1 for a symbolic ``n`` (``jax.export``), whose remainder block would
    have a symbolic length."""
    if jax.export.is_symbolic_dim(n):
        return 1
    return max(1, min(unroll, n))


def blocks(n: int, size: int, reverse: bool):
    """Static layout of ``n`` steps in blocks of ``size``, visited in scan order.

    Returns ``(num_full, rem, full_start, rem_start)``: ``num_full`` blocks of
    ``size`` steps, the ``i``-th in visiting order starting at
    ``full_start(i)``, then one block of ``rem < size`` steps at
    ``rem_start``.  The remainder is visited last: it sits at the end of time
    forwards and at the start of time in reverse.
    """
    num_full, rem = divmod(n, size)
    if reverse:
        return num_full, rem, (lambda i: rem + (num_full - 1 - i) * size), 0
    return num_full, rem, (lambda i: i * size), num_full * size


def sequential_into(a: Array, out: Array, h: Array, reverse: bool, *, b: Optional[Array] = None,
                    offset=0, adjoint: bool = False,
                    unroll: int = _UNROLL) -> Tuple[Array, Array]:
    """The recurrence over ``a`` (``(B, L, *F)``), written into ``out``.

    ``b_t`` is ``b[:, t]``, or ``out[:, offset + t]`` when ``b`` is ``None``;
    the output of step ``t`` goes to ``out[:, offset + t]`` (so without ``b``
    the states overwrite their inputs: each block is read before it is
    written, and no other buffer is needed).  Returns ``(carry, out)``.  A
    block of ``unroll`` steps runs per loop iteration.

    Forward form: ``h_t = a_t h + b_t``, output and carry ``h_t``.  Adjoint
    form (``adjoint=True``, ``b`` the output cotangents ``g``): output
    ``lam_t = g_t + s`` and carry ``s = a_t lam_t``, i.e.
    ``lam_t = g_t + a_next lam_next`` without shifting ``a`` by one step;
    the final carry is the cotangent of the state before the first step.
    """
    n = a.shape[1]
    size = block_size(n, unroll)
    num_full, rem, full_start, rem_start = blocks(n, size, reverse)

    def run_block(h, out, start, length):
        a_blk = jax.lax.dynamic_slice_in_dim(a, start, length, 1)
        b_blk = (jax.lax.dynamic_slice_in_dim(out, offset + start, length, 1) if b is None
                 else jax.lax.dynamic_slice_in_dim(b, start, length, 1))
        states = [None] * length
        for u in (reversed(range(length)) if reverse else range(length)):
            if adjoint:
                states[u] = h + at_step(b_blk, u)
                h = at_step(a_blk, u) * states[u]
            else:
                h = at_step(a_blk, u) * h + at_step(b_blk, u)
                states[u] = h
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.stack(states, 1), offset + start, 1)
        # The carry is read back from the stored block: XLA fuses the chain of
        # steps into each of its consumers, so taking it from the chain would
        # evaluate the block twice.
        last = 0 if reverse else length - 1
        h = jax.lax.dynamic_index_in_dim(out, offset + start + last, 1, keepdims=False)
        if adjoint:
            h = at_step(a_blk, last) * h
        return h, out

    def body(i, carry):
        return run_block(*carry, full_start(i), size)

    h, out = jax.lax.fori_loop(0, num_full, body, (h, out))
    if rem:
        h, out = run_block(h, out, rem_start, rem)
    return h, out


def _sequential(a, b, h0, reverse):
    return sequential_into(a, b, h0, reverse)


def _forward(impl: ScanImpl, a, b, h0, reverse: bool):
    """``(h_last, h)`` by ``impl`` (a concrete, non-auto implementation)."""
    if impl is ScanImpl.ASSOCIATIVE:
        return _associative(a, b, h0, reverse)
    if impl in (ScanImpl.SEQUENTIAL, ScanImpl.CHUNKED, ScanImpl.NATIVE):
        return _sequential(a, b, h0, reverse)
    return backend_module(impl).forward(a, b, h0, reverse)


# ----------------------------------------------------------------------------
# The differentiable core.


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def core(a: Array, b: Array, h0: Array, impl: ScanImpl, reverse: bool):
    """``(h_last, h)`` of the recurrence on prepared inputs (see the module
    docstring for its derivatives)."""
    return _forward(impl, a, b, h0, reverse)


def _apply(impl, reverse, a, x):
    u, dh0 = x
    return core(a, u, dh0, impl, reverse)


def adjoint(impl, reverse, a, ct):
    """Transpose of ``(u, dh0) -> core(a, u, dh0)``: the cotangents of ``u``
    and ``dh0`` for the cotangents ``(g_last, g)`` of ``(h_last, h)``."""
    g_last, g = ct
    ones = jnp.ones_like(time_slice(a, 0, 1))
    if reverse:
        shifted, a_first = jnp.concatenate([ones, time_slice(a, 0, -1)], axis=1), at_step(a, -1)
    else:
        shifted, a_first = jnp.concatenate([time_slice(a, 1, None), ones], axis=1), at_step(a, 0)
    _, lam = core(shifted, g, g_last, impl, not reverse)
    lam_first = at_step(lam, -1 if reverse else 0)
    return lam, a_first * lam_first


@core.defjvp
def _core_jvp(impl, reverse, primals, tangents):
    a, b, h0 = primals
    da, db, dh0 = tangents
    h_last, h = core(a, b, h0, impl, reverse)
    u = db + da * states_before(h, h0, reverse)
    tangent = linear_op(functools.partial(_apply, impl, reverse),
                        functools.partial(adjoint, impl, reverse), a, (u, dh0))
    return (h_last, h), tangent


# ----------------------------------------------------------------------------
# The public scan.


def prepare(a: Array, b: Array, h0: Array, dtype, *, reset, valid, reverse):
    """Casts to ``dtype`` and folds resets and invalid steps into ``(a, b)``:
    ``a = 0`` before a document starts (in scan order), ``a = 1, b = 0`` at
    invalid steps."""
    expand = (slice(None), slice(None)) + (None,) * (a.ndim - 2)
    a, b, h0 = a.astype(dtype), b.astype(dtype), h0.astype(dtype)
    if reset is not None:
        boundary = reset_boundaries(reset, reverse, valid)
        a = jnp.where(boundary[expand], jnp.zeros((), dtype), a)
    if valid is not None:
        a = jnp.where(valid[expand], a, jnp.ones((), dtype))
        b = jnp.where(valid[expand], b, jnp.zeros((), dtype))
    return a, b, h0


def zero_invalid(h: Array, valid: Optional[Array]) -> Array:
    """``h`` with zeros at invalid steps (``valid`` of shape ``(batch, time)``)."""
    if valid is None:
        return h
    expand = (slice(None), slice(None)) + (None,) * (h.ndim - 2)
    return jnp.where(valid[expand], h, jnp.zeros((), h.dtype))


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

    Usage::

        h_last, h = linear_scan(a, b)                      # a, b: (batch, T, d)
        h_last, h = linear_scan(a, b, h0, reset=starts)    # documents restart
        h_last, h = linear_scan(a, b, seq_lengths=lens)    # right padding

    Args:
      a: decay coefficients, float ``(batch, time, *features)``.
      b: inputs, float, the same shape as ``a`` (no broadcasting).
      h0: initial state ``(batch, *features)``; ``None`` means zeros.
      impl: one of :class:`ScanImpl` (or its string value); ``"auto"`` picks
        per backend and length (:func:`default_impl`).
      reset: optional bool ``(batch, time)``; True where a new document starts.
        The state restarts from zero at each document's first step in scan
        order: the ``reset`` step itself, or with ``reverse=True`` the step
        before the next ``reset`` (documents never mix); from an invalid step,
        the next valid one in scan order (none left in the call: no effect,
        so a streamed call ending in masked steps with a ``reset`` drops it;
        mark the next call's first step instead).  A reverse scan
        streamed in chunks (later chunk first, its ``h_last`` as the earlier
        chunk's ``h0``) cannot see a ``reset`` at the later chunk's first
        step: pass a zero ``h0`` there.
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
        outside ``[0, time]`` (checked when its value is known at trace time,
        see :func:`flax_minrnn.ops.checks.check_seq_lengths`), both ``mask``
        and ``seq_lengths``.
    """
    checks.check_float("a", a)
    checks.check_float("b", b)
    if a.ndim < 2:
        raise ValueError(f"a must have shape (batch, time, *features), got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError("a and b must have the same shape (batch, time, *features), "
                         f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
    batch, seq_len = a.shape[:2]
    if seq_len < 1:
        raise ValueError("the time axis (axis 1) of a and b must be non-empty")
    state_shape = (batch,) + tuple(a.shape[2:])
    h0 = checks.check_state("h0", h0, state_shape)
    dtype = checks.accum_dtype(a.dtype, b.dtype, *(() if h0 is None else (h0.dtype,)))
    impl = resolve_impl(impl, seq_len)
    valid = checks.valid_mask(batch, seq_len, seq_lengths, mask)
    if reset is not None:
        reset = checks.check_bool_bt("reset", reset, batch, seq_len)
    if h0 is None:
        # Built from a (not jnp.zeros) so it has a's type inside shard_map too.
        h0 = jnp.zeros_like(at_step(a, 0), dtype=dtype)
    if batch == 0:
        return (jnp.zeros(state_shape, dtype), jnp.zeros(a.shape, dtype))
    a, b, h0 = checks.same_varying(*prepare(a, b, h0, dtype, reset=reset, valid=valid,
                                            reverse=reverse))
    h_last, h = core(a, b, h0, impl, bool(reverse))
    return h_last, zero_invalid(h, valid)
