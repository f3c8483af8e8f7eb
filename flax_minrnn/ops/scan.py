"""The linear recurrence ``h_t = a_t * h_{t-1} + b_t`` in ``jax.numpy``.

Every recurrent layer of flax_minrnn hands its pre-activations and gate
function to :func:`gated_scan` (:func:`gated_scan_with_readout` when the
layer reads its output out of the states, :func:`linear_scan` when the
coefficients are already computed); this module holds the only copy of the
recurrence math in JAX.  (``impl="native"`` adds compiled CPU kernels for the
gates of MinGRU and MinLSTM, :mod:`flax_minrnn.native`, checked against it.)

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
* ``"sequential"``: a loop over time in the native ``(B, T, ...)`` layout,
  8 steps per iteration; the reference.  In :func:`gated_scan` it is fused:
  the loop computes the coefficients block by block, and the backward loop
  recomputes them, so they are never stored (the least memory).
* ``"chunked"``: for CPUs: the time axis is cut into chunks of tens of steps
  (at most 1.5 MiB of projections each) visited in scan order; a chunk's
  projection (``kernel`` of :func:`gated_scan`), coefficients, recurrence
  and readout (:func:`gated_scan_with_readout`) run while it is in cache
  (vectorised over the chunk, then the sequential loop through it), and the
  backward pass does the same per chunk in reverse order from the stored
  projections and states.  The coefficients are never stored for the whole
  sequence.
* ``"native"``: for CPUs, where :func:`flax_minrnn.native.available` (a C++
  compiler built the kernels): for MinGRU and MinLSTM (float32 or bfloat16
  projections, no mask or reset, no output gate) the forward pass is one
  projection of the whole sequence and one compiled kernel (gates and
  recurrence in one pass); the backward pass runs per tile as ``"chunked"``
  does, with the gates' and recurrence's adjoint in one kernel call per
  tile.  Everything else (a bare :func:`linear_scan`, other gates, masks)
  runs ``"chunked"``.  Same function to float32 rounding.
* ``"log"``: associative scan on ``(log a, log h)`` with a ``logaddexp``
  combine.  Domain: ``a >= 0``, ``b >= 0``, ``h0 >= 0`` (positive states, as in
  the minGRU paper's ``g()`` parameterisation); outside it the result is NaN.
* ``"heinsen"``: the minGRU paper appendix's ``cumsum`` + ``logcumsumexp``
  form, kept for paper parity only.  Domain: ``a > 0`` (no resets),
  ``b >= 0``, ``h0 >= 0``.  Its float32 error grows with ``T`` (the cumulative
  sum of ``log a`` loses digits); prefer ``"log"``.
* ``"pallas"``: a Pallas (Triton) GPU kernel, chunked over time
  (:mod:`flax_minrnn.kernels.linear_scan_pallas`); on other backends it runs
  in Pallas's interpreter (correct, slow: for tests).
* ``"auto"``: chosen from the backend and ``T`` by :func:`default_impl`.

Gradients: all implementations share one hand-written backward
(:func:`jax.custom_vjp`; the fused sequential path runs the same adjoint in
its own loop, :func:`_loop_bwd`, and the chunked path per tile).  The adjoint
of a linear recurrence is the reverse linear recurrence
``lam_t = g_t + a_{t+1} lam_{t+1}`` (the loops carry ``s = a_t lam_t``, see
:func:`_step`); then ``db_t = lam_t``, ``da_t = lam_t * h_{t-1}`` and
``dh0 = a_0 lam_0``.  It keeps only ``a`` (or what computes it) and the
states as residuals, so backward memory is linear in ``T`` (autodiff through
``associative_scan`` would keep ``O(T log T)`` intermediates).
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.backends import native  # stage 1
from flax_minrnn.ops import checks

Array = jax.Array

__all__ = ["ScanImpl", "linear_scan", "gated_scan", "gated_scan_with_readout", "default_impl"]


class ScanImpl(str, enum.Enum):
    """Implementations of :func:`linear_scan` (all with the same signature)."""

    AUTO = "auto"
    ASSOCIATIVE = "associative"
    SEQUENTIAL = "sequential"
    CHUNKED = "chunked"
    NATIVE = "native"  # compiled CPU kernels (flax_minrnn.native); else "chunked"
    LOG = "log"
    HEINSEN = "heinsen"
    PALLAS = "pallas"


_IMPL_NAMES = tuple(i.value for i in ScanImpl)

# From this length on the chunked scan is the fastest on CPU (measured with
# benchmarks/bench_scan.py and bench_layers.py; below it the sequential loop,
# which has fewer passes over memory, wins).
_CPU_CHUNKED_MIN_T = 64


def default_impl(seq_len: int, backend: Optional[str] = None) -> ScanImpl:
    """The implementation ``"auto"`` resolves to.

    Args:
      seq_len: length of the time axis.
      backend: a JAX backend name; defaults to ``jax.default_backend()``.

    Returns:
      On CPU from ``T = 64``: ``NATIVE`` where the compiled kernels built
      (:func:`flax_minrnn.native.available`; it runs ``CHUNKED`` for what
      the kernels do not cover), else ``CHUNKED`` (fastest or tied
      forward+backward of every layer at T = 256..16384 on the two 2-core
      CPUs measured, and the least memory: the projection, gates and scan of
      each chunk stay in cache); ``SEQUENTIAL`` below 64 (the loop that
      computes the gates as it goes).  For a bare :func:`linear_scan` the
      sequential loop was faster on one of the two CPUs; see the crossovers
      in benchmarks/README.md.  ``ASSOCIATIVE`` on GPU/TPU.
      The choice never changes parameters, only speed and memory (all
      implementations agree to float32 rounding).
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        if seq_len >= _CPU_CHUNKED_MIN_T:
            return ScanImpl.NATIVE if native.available() else ScanImpl.CHUNKED
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


def reset_boundaries(reset: Array, reverse: bool) -> Array:
    """Where the state is zeroed before the step, in scan order.

    Forward, a document starting at ``t`` zeroes the state before step ``t``.
    Reversed, it is the document starting at ``t + 1`` that must not leak into
    step ``t``, so the boundary moves one step earlier.
    """
    if not reverse:
        return reset
    return jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], axis=1)


# ----------------------------------------------------------------------------
# The input projection of gated_scan(..., kernel=...).


@jax.custom_vjp
def project(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` over the last axis, with a hand-written backward.

    Autodiff of ``dot_general`` gives the kernel gradient as a transposed
    product that XLA:CPU lowers to a transpose copy plus a slow GEMM form
    (2-2.5x the forward product's time at B*T = 32k rows); written as
    ``einsum('...i,...o->io')`` it runs at the forward product's speed.
    """
    return jnp.einsum("...i,io->...o", x, kernel)


def _project_fwd(x, kernel):
    return project(x, kernel), (x, kernel)


def _project_bwd(residuals, g):
    x, kernel = residuals
    return _project_grads(x, kernel, g)


def _project_grads(x, kernel, g):
    """``(d x, d kernel)`` of ``x @ kernel`` for the output cotangent ``g``."""
    dx = jnp.einsum("...o,io->...i", g, kernel)
    dkernel = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


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


# Steps per iteration of the sequential loops: XLA:CPU pays a fixed cost per
# while-loop iteration (several thunks), so a short unrolled block per
# iteration amortises it (8 was fastest at T = 1024..4096 on the 2-core AMD
# EPYC, see benchmarks/README.md; on the Intel Xeon, MinGRU fwd+bwd at
# T = 4096 was 3% slower with 4 and 29% slower with 16).
_UNROLL = 8


def _blocks(n: int, size: int, reverse: bool):
    """Static block layout of ``n`` steps visited in (reverse) time order.

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


def _take(tree, start, size: int, axis: int):
    return jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis), tree)


def _put(tree, block, start, axis: int):
    return jax.tree.map(
        lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, start, axis),
        tree, block)


def _index(x, i, axis: int):
    return jax.lax.index_in_dim(x, i, axis, keepdims=False)


def _step(h, a_t, b_t, adjoint: bool):
    """One step of the recurrence: returns ``(new carry, output)``.

    Forward: ``h_t = a_t * h_prev + b_t``, output ``h_t``.  Adjoint form
    (the backward pass, with ``b`` the output cotangents ``g``): the output is
    ``lam_t = g_t + s`` and the carry becomes ``s = a_t * lam_t``, which is
    ``lam_t = g_t + a_next * lam_next`` without shifting ``a`` by one step.
    """
    if adjoint:
        out = h + b_t
        return a_t * out, out
    h = a_t * h + b_t
    return h, h


def _loop(coeff_fn, xs, consts, params, h0, reverse: bool, axis: int, *, store: bool,
          adjoint: bool = False, unroll: int = _UNROLL, out=None, offset=0,
          b_in_out: bool = False):
    """The recurrence, a block of ``unroll`` steps per loop iteration.

    ``(a_t, b_t) = coeff_fn(x_t, c_t, params)`` is evaluated on each block of
    steps (slices of the pytrees ``xs`` and ``consts`` along ``axis``), then
    :func:`_step` runs step by step through the block.  The blocks are read
    and written in place (dynamic slices), so the layout is never
    transposed.  Returns ``(carry, out)`` (``out`` is ``None`` unless
    ``store``).

    With ``store``, the outputs go to steps ``offset + t`` of ``out`` along
    ``axis`` (a new buffer of ``h0``'s dtype when ``out`` is ``None``), the
    rest of ``out`` unchanged.  ``b_in_out``: ``xs`` is ``a`` alone and ``b``
    is read from ``out`` at the same steps (``coeff_fn`` is not called), so
    the outputs overwrite ``b`` in place and no other buffer is needed.
    """
    n = jax.tree.leaves(xs)[0].shape[axis]
    size = max(1, min(unroll, n))
    num_full, rem, full_start, rem_start = _blocks(n, size, reverse)
    if store and out is None:
        # Built from h0 (not jnp.zeros) so it has h0's type inside shard_map.
        out_shape = h0.shape[:axis] + (n,) + h0.shape[axis:]
        out = jnp.broadcast_to(jnp.expand_dims(jnp.zeros_like(h0), axis), out_shape)
    elif not store:
        out = None

    def run_block(h, out, start, length):
        if b_in_out:
            a = jax.lax.dynamic_slice_in_dim(xs, start, length, axis)
            b = jax.lax.dynamic_slice_in_dim(out, offset + start, length, axis)
        else:
            a, b = coeff_fn(_take(xs, start, length, axis),
                            _take(consts, start, length, axis), params)
        states = [None] * length
        for u in (reversed(range(length)) if reverse else range(length)):
            h, states[u] = _step(h, _index(a, u, axis), _index(b, u, axis), adjoint)
        if out is not None:
            out = _put(out, jnp.stack(states, axis), offset + start, axis)
            # The carry read back from the stored block: XLA fuses the chain
            # of steps into each consumer, so taking the carry from the chain
            # evaluated it twice per block (one fusion for the block, one for
            # the carry); this is 3-6% faster per layer, same bits.
            last = 0 if reverse else length - 1
            h_out = _index(_take(out, offset + start, length, axis), last, axis)
            h = _index(a, last, axis) * h_out if adjoint else h_out
        return h, out

    def body(i, carry):
        return run_block(*carry, full_start(i), size)

    h, out = jax.lax.fori_loop(0, num_full, body, (h0, out))
    if rem:
        h, out = run_block(h, out, rem_start, rem)
    return h, out


def _loop_bwd(coeff_fn, xs, consts, params, h, h0, g, g_last, reverse: bool,
              unroll: int = _UNROLL):
    """Adjoint of :func:`_loop` along axis 1, recomputing the coefficients.

    With ``next(t)`` the step after ``t`` in scan order, the adjoint state is
    ``lam_t = g_t + s_next(t)`` with ``s_t = a_t * lam_t`` (:func:`_step` in
    adjoint form; ``s`` past the last step is ``g_last``), and
    ``d a_t = lam_t * h_prev(t)``, ``d b_t = lam_t``, ``d h0 = s_first``.  Each block recomputes
    its ``(a, b)`` and pulls ``(d a, d b)`` back through ``coeff_fn`` to
    ``d xs`` (written block by block) and ``d params`` (summed).  (Writing ``d xs`` over ``xs`` in one loop-carried buffer would
    save memory, but XLA then copies the whole buffer every iteration.)
    """
    n = h.shape[1]
    size = max(1, min(unroll, n))
    # The backward pass visits time in the opposite order.
    num_full, rem, full_start, rem_start = _blocks(n, size, not reverse)

    def run_block(s, dxs, dparams, start, length):
        x_blk = _take(xs, start, length, 1)
        c_blk = _take(consts, start, length, 1)
        (a, _), pullback = jax.vjp(lambda x, p: coeff_fn(x, c_blk, p), x_blk, params)
        g_blk = jax.lax.dynamic_slice_in_dim(g, start, length, 1)
        lams = [None] * length
        for u in (range(length) if reverse else reversed(range(length))):
            s, lams[u] = _step(s, _index(a, u, 1), _index(g_blk, u, 1), adjoint=True)
        lam_blk = jnp.stack(lams, axis=1)
        h_prev = _states_before_each(jax.lax.dynamic_slice_in_dim(h, start, length, 1),
                                     _state_before(h, h0, start, length, reverse), reverse)
        dx_blk, dp_blk = pullback((lam_blk * h_prev, lam_blk))
        dparams = _add_grads(dparams, dp_blk)
        dx_blk = jax.tree.map(lambda d, v: _stored(d.astype(v.dtype)), dx_blk, xs)
        return s, _put(dxs, dx_blk, start, 1), dparams

    def body(i, carry):
        return run_block(*carry, full_start(i), size)

    # s past the last step is g_last (the cotangent of the final carry).
    carry = (g_last, jax.tree.map(lambda v: _buffer(v, v.dtype), xs),
             _grad_sums(params))
    carry = jax.lax.fori_loop(0, num_full, body, carry)
    if rem:
        carry = run_block(*carry, rem_start, rem)
    s, dxs, dparams = carry
    return (jax.tree.map(lambda d, v: _loaded(d, v.dtype), dxs, xs),
            _grads_of(dparams, params), s)


def _index_dyn(x, i):
    """``x[:, i]`` for a traced ``i`` (clamped into range)."""
    i = jnp.clip(i, 0, x.shape[1] - 1)
    return jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False)


def _state_before(h, h0, start, length: int, reverse: bool):
    """The state before the first step (in scan order) of steps
    ``[start, start + length)`` of the states ``h`` (``h0`` at the edge)."""
    if reverse:
        return jnp.where(start + length < h.shape[1], _index_dyn(h, start + length), h0)
    return jnp.where(start > 0, _index_dyn(h, start - 1), h0)


def _states_before_each(h, first, reverse: bool):
    """The state before each step of ``h`` in scan order: ``h`` shifted by one
    step, with ``first`` before the first step."""
    if reverse:
        return jnp.concatenate([h[:, 1:], first[:, None]], axis=1)
    return jnp.concatenate([first[:, None], h[:, :-1]], axis=1)


def _no_cotangent(consts):
    """The (float0) cotangent of non-differentiable arrays."""
    return jax.tree.map(lambda c: np.zeros(c.shape, jax.dtypes.float0), consts)


def _grad_sums(params):
    """Zero accumulators for the gradients of ``params`` summed over blocks:
    float32 for 16-bit floats (a bfloat16 sum over hundreds of blocks loses
    digits), the parameter's dtype otherwise."""
    return jax.tree.map(
        lambda p: jnp.zeros_like(p, jnp.float32 if _is_half(p.dtype) else p.dtype), params)


def _add_grads(sums, grads):
    return jax.tree.map(lambda s, g: s + g.astype(s.dtype), sums, grads)


def _grads_of(sums, params):
    """The accumulated gradients in the parameters' dtypes."""
    return jax.tree.map(lambda s, p: s.astype(p.dtype), sums, params)


def _identity_coeffs(ab, consts, params):
    del consts, params
    return ab


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


def _pallas(a, b, h0, reverse):
    from flax_minrnn.backends import pallas as kernel  # pylint: disable=g-import-not-at-top
    batch, seq_len = a.shape[:2]
    flat = lambda x: x.reshape(batch, seq_len, -1)
    h_last, h = kernel.linear_scan_pallas(
        flat(a), flat(b), h0.reshape(batch, -1), reverse=reverse,
        interpret=not kernel.pallas_available())
    return h_last.reshape(h0.shape), h.reshape(a.shape)


# SEQUENTIAL and CHUNKED are not here: they run as _fused and _tiled below.
_FORWARD = {
    ScanImpl.ASSOCIATIVE: _associative,
    ScanImpl.LOG: _log_space,
    ScanImpl.HEINSEN: _heinsen,
    ScanImpl.PALLAS: _pallas,
}

# The backward pass runs a linear-space scan (cotangents can be negative).
_BACKWARD = {
    ScanImpl.ASSOCIATIVE: _associative,
    ScanImpl.LOG: _associative,
    ScanImpl.HEINSEN: _associative,
    ScanImpl.PALLAS: _pallas,
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
        a_first = a[:, -1]
    else:
        coef = jnp.concatenate([a[:, 1:], ones], axis=1)
        a_first = a[:, 0]
    _, lam = _BACKWARD[impl](coef, g, g_last, not reverse)
    lam_0 = lam[:, -1] if reverse else lam[:, 0]
    return lam * _states_before_each(h, h0, reverse), lam, a_first * lam_0


_scan.defvjp(_scan_fwd, _scan_bwd)


# The chunked implementation runs tile by tile (a tile is one chunk): the time
# axis is cut into tiles of a few dozen steps, visited in scan order, and each
# tile's projection (with kernel=...), coefficients and recurrence run one
# after another while the tile is in cache (a whole-sequence pass over B*T*D
# floats misses the cache from T ~ 1024 on).  The backward pass visits the
# tiles in reverse and does the same per tile, from the stored projections and
# states.

# Bytes of projection output per tile, as a power of two of steps: 128 steps
# at B = 8 and 2-3 x 256 float32 features.  On the 2-core Intel Xeon used for
# the current benchmark numbers (2 MiB L2 per core) this was 3-8% faster per
# layer than 64 steps at T = 1024..16384; on the 2-core AMD EPYC used before,
# 64 steps was fastest (see benchmarks/README.md).
_TILE_BYTES = 3 * 2 ** 20
_TILE_MIN, _TILE_MAX = 32, 512


def _tile_size(row_bytes: int, seq_len: int) -> int:
    """Steps per tile for ``row_bytes`` bytes of projection output per step.

    At most a quarter of ``seq_len`` (rounded down to a power of two, at
    least ``_TILE_MIN``): the tile's temporaries are a fixed cost, and with at
    least four tiles they stay small next to the sequence's own buffers (the
    memory bound of issue #5 at T = 256).  Never more than ``seq_len``.
    """
    steps = max(1, _TILE_BYTES // max(1, row_bytes))
    size = min(_TILE_MAX, max(_TILE_MIN, 2 ** int(math.log2(steps))))
    quarter = 2 ** int(math.log2(max(1, seq_len // 4)))
    return int(min(seq_len, max(_TILE_MIN, min(size, quarter))))


def _is_half(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def _stored(x: Array) -> Array:
    """16-bit floats as uint16 bits, other arrays unchanged.

    XLA:CPU widens a bfloat16 dynamic update to float32 and converts the whole
    buffer each time, so the tile buffers of bfloat16 (and float16) values
    hold their bits; a bitcast costs nothing.
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_half(x.dtype) else x


def _loaded(x: Array, dtype) -> Array:
    """The inverse of :func:`_stored` for values of ``dtype``."""
    return jax.lax.bitcast_convert_type(x, dtype) if _is_half(dtype) else x


def _buffer(like: Array, dtype, shape=None) -> Array:
    """A buffer for values of ``dtype`` in :func:`_stored` form that the caller
    writes completely: uninitialised where the compiled kernels can allocate
    it (:func:`flax_minrnn.native.empty`, which saves a pass over memory),
    else zeros built from ``like`` (not ``jnp.zeros``, so they have its type
    inside ``shard_map``)."""
    dtype = jnp.uint16 if _is_half(dtype) else dtype
    if native.usable():
        return native.empty(like.shape if shape is None else shape, dtype)
    return jax.lax.full_like(like, 0, dtype, shape)


def _tiles_forward(coeff_fn, readout, x, kernel, consts, params, h0, reverse, tile,
                   n_side):
    """Returns ``(h_last, h, pre, side, y)``: ``pre`` holds the columns of
    ``x @ kernel`` that ``coeff_fn`` sees (``None`` without a kernel), ``side``
    its last ``n_side`` columns (``None`` when ``n_side`` is 0) and ``y`` the
    readout of each step (``None`` without ``readout``)."""
    batch, seq_len = jax.tree.leaves(x)[0].shape[:2]
    num_full, rem, full_start, rem_start = _blocks(seq_len, tile, reverse)
    h_buf = _buffer(h0, h0.dtype, (batch, seq_len) + h0.shape[1:])
    pre_buf = side_buf = y_buf = None
    if kernel is not None:
        p_dtype = jnp.result_type(x, kernel)
        n_rec = kernel.shape[1] - n_side
        pre_buf = _buffer(x, p_dtype, (batch, seq_len, n_rec))
        if n_side:
            side_buf = _buffer(x, p_dtype, (batch, seq_len, n_side))
    if readout is not None:
        y_spec = _readout_spec(readout, h0, None if not n_side else
                               jax.ShapeDtypeStruct((batch, 1, n_side), p_dtype), params)
        y_buf = _buffer(h0, y_spec.dtype, (batch, seq_len) + y_spec.shape[2:])

    def run_tile(h, bufs, start, length):
        h_buf, pre_buf, side_buf, y_buf = bufs
        pre, side = _take(x, start, length, 1), None
        if kernel is not None:
            pre = project(pre, kernel)
            if n_side:
                pre, side = pre[..., :n_rec], pre[..., n_rec:]
                side_buf = _put(side_buf, _stored(side), start, 1)
            pre_buf = _put(pre_buf, _stored(pre), start, 1)
        c_t = _take(consts, start, length, 1)
        a, b = coeff_fn(pre, c_t, params)
        # The states go straight into h_buf (no tile buffer to fill and copy).
        h, h_buf = _loop(_identity_coeffs, (a, b), (), (), h, reverse, 1, store=True,
                         out=h_buf, offset=start)
        if readout is not None:
            h_tile = _take(h_buf, start, length, 1)
            y_buf = _put(y_buf, _stored(readout(h_tile, side, c_t, params)), start, 1)
        return h, (h_buf, pre_buf, side_buf, y_buf)

    def body(i, carry):
        return run_tile(*carry, full_start(i), tile)

    carry = (h0, (h_buf, pre_buf, side_buf, y_buf))
    carry = jax.lax.fori_loop(0, num_full, body, carry)
    if rem:
        carry = run_tile(*carry, rem_start, rem)
    h_last, (h, pre, side, y) = carry
    if y is not None:
        y = _loaded(y, y_spec.dtype)
    return h_last, h, pre, side, y


def _readout_spec(readout, h0, side_spec, params):
    """The shape and dtype of ``readout`` on one step."""
    h_spec = jax.ShapeDtypeStruct((h0.shape[0], 1) + h0.shape[1:], h0.dtype)
    return jax.eval_shape(lambda h, s, p: readout(h, s, (None, None), p),
                          h_spec, side_spec, params)


def _tiles_backward(coeff_fn, readout, x, kernel, consts, params, h0, h, pre_buf,
                    side_buf, g, g_last, reverse, tile):
    """``(d x, d kernel, d params, d h0)`` of :func:`_tiles_forward`, for the
    cotangents ``g`` of the outputs (the states, or with ``readout`` its
    values) and ``g_last`` of the final state."""
    seq_len = h.shape[1]
    # The backward pass visits the tiles in the opposite order.
    num_full, rem, full_start, rem_start = _blocks(seq_len, tile, not reverse)
    p_dtype = jnp.result_type(x, kernel) if kernel is not None else None

    def run_tile(dh, dx, dkernel, dparams, start, length):
        x_t = _take(x, start, length, 1)
        c_t = _take(consts, start, length, 1)
        pre = x_t if kernel is None else _loaded(_take(pre_buf, start, length, 1), p_dtype)
        (a, _), pullback = jax.vjp(lambda q, p: coeff_fn(q, c_t, p), pre, params)
        h_t = _take(h, start, length, 1)
        g_t, g_side = _take(g, start, length, 1), None
        if readout is not None:
            # The readout's gradient, tile by tile: its cotangent with respect
            # to the states drives the adjoint recurrence below.
            side_t = (None if side_buf is None
                      else _loaded(_take(side_buf, start, length, 1), p_dtype))
            _, pull_out = jax.vjp(lambda s, q, p: readout(s, q, c_t, p), h_t, side_t, params)
            g_t, g_side, dp_out = pull_out(g_t)
            dparams = _add_grads(dparams, dp_out)
        # The adjoint recurrence through the tile, against scan order; its
        # final carry is the cotangent of the state before the tile.  Without
        # a readout, lam overwrites the slice g_t in place (no buffer to fill);
        # with one, g_t comes from the readout's gradient and the in-place
        # form measured 2-5% slower.
        if readout is None:
            dh, lam = _loop(None, a, (), (), dh, not reverse, 1, store=True, adjoint=True,
                            out=g_t, b_in_out=True)
        else:
            dh, lam = _loop(_identity_coeffs, (a, g_t), (), (), dh, not reverse, 1,
                            store=True, adjoint=True)
        h_prev = _states_before_each(h_t, _state_before(h, h0, start, length, reverse),
                                     reverse)
        dpre, dp = pullback((lam * h_prev, lam))
        if kernel is not None:
            if g_side is not None:
                # One product for all columns: the side columns' cotangents
                # join the coefficient columns'.
                dpre = jnp.concatenate([dpre, g_side.astype(dpre.dtype)], axis=-1)
            dx_t, dk_t = _project_grads(x_t, kernel, dpre)
            dkernel = dkernel + dk_t.astype(dkernel.dtype)
        else:
            dx_t = dpre
        dx_t = jax.tree.map(lambda d, v: _stored(d.astype(v.dtype)), dx_t, x)
        return (dh, _put(dx, dx_t, start, 1), dkernel,
                _add_grads(dparams, dp))

    def body(i, carry):
        return run_tile(*carry, full_start(i), tile)

    dkernel = None if kernel is None else jnp.zeros(kernel.shape, jnp.float32)
    carry = (g_last, jax.tree.map(lambda v: _buffer(v, v.dtype), x), dkernel,
             _grad_sums(params))
    carry = jax.lax.fori_loop(0, num_full, body, carry)
    if rem:
        carry = run_tile(*carry, rem_start, rem)
    dh0, dx, dkernel, dparams = carry
    if kernel is not None:
        dkernel = dkernel.astype(kernel.dtype)
    return (jax.tree.map(lambda d, v: _loaded(d, v.dtype), dx, x), dkernel,
            _grads_of(dparams, params), dh0)


# Tile by tile (impl="chunked"): returns (h_last, h), or (h_last, y) with a
# readout.  The states, the coefficient columns of the projection and the side
# columns are kept for the backward pass; everything else is recomputed per
# tile.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 7, 8, 9))
def _tiled(coeff_fn, readout, x, kernel, consts, params, h0, reverse: bool, tile: int,
           n_side: int):
    h_last, h, _, _, y = _tiles_forward(coeff_fn, readout, x, kernel, consts, params, h0,
                                        reverse, tile, n_side)
    return h_last, (h if readout is None else y)


def _tiled_fwd(coeff_fn, readout, x, kernel, consts, params, h0, reverse, tile, n_side):
    h_last, h, pre, side, y = _tiles_forward(coeff_fn, readout, x, kernel, consts, params,
                                             h0, reverse, tile, n_side)
    return (h_last, (h if readout is None else y)), (x, kernel, consts, params, h0, h, pre,
                                                     side)


def _tiled_bwd(coeff_fn, readout, reverse, tile, n_side, residuals, cotangents):
    del n_side
    x, kernel, consts, params, h0, h, pre, side = residuals
    g_last, g = cotangents
    dx, dkernel, dparams, dh0 = _tiles_backward(coeff_fn, readout, x, kernel, consts,
                                                params, h0, h, pre, side, g, g_last,
                                                reverse, tile)
    return dx, dkernel, _no_cotangent(consts), dparams, dh0


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


# impl="native": forward, one projection of the whole sequence and one
# compiled kernel call for the gates and the recurrence
# (flax_minrnn/csrc/gates.cc); backward, the tile loop of _tiled with the
# adjoint of the gates and recurrence of each tile in one kernel call.  The
# projections stay XLA's.  Only for float32 or bfloat16 projections (float32
# state) of layers whose gates the kernels know (native.NativeGates), no mask
# or reset and no side columns (an output gate); _run runs _tiled otherwise.


def _native_bias(spec, params, width: int) -> Array:
    bias = spec.bias(params)
    return jnp.zeros((width,), jnp.float32) if bias is None else bias.astype(jnp.float32)


def _native_forward(spec, x, kernel, params, h0, reverse: bool):
    """Returns ``(h_last, h, pre)``: one product for the whole sequence (its
    output is kept for the backward pass anyway) and one kernel call."""
    pre = project(x, kernel)
    h_last, h = native.gates_forward(spec, pre, _native_bias(spec, params, kernel.shape[1]),
                                     h0, reverse)
    return h_last, h, pre


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _native_tiles(spec, x, kernel, params, h0, reverse: bool, tile: int):
    h_last, h, _ = _native_forward(spec, x, kernel, params, h0, reverse)
    return h_last, h


def _native_tiles_fwd(spec, x, kernel, params, h0, reverse, tile):
    h_last, h, pre = _native_forward(spec, x, kernel, params, h0, reverse)
    return (h_last, h), (x, kernel, params, h0, h, pre)


def _native_tiles_bwd(spec, reverse, tile, residuals, cotangents):
    x, kernel, params, h0, h, pre = residuals
    g_last, g = cotangents
    # The kernel reads g whole: a g that XLA could compute in the loop (the
    # broadcast cotangent of a sum, say) is materialised once, not per tile.
    g = jax.lax.optimization_barrier(g)
    seq_len = x.shape[1]
    bias = _native_bias(spec, params, kernel.shape[1])
    # The backward pass visits the tiles in the opposite order.
    num_full, rem, full_start, rem_start = _blocks(seq_len, tile, not reverse)

    def run_tile(dh, dx, dkernel, dbias, start, length):
        dpre, dh, db = native.gates_backward(spec, pre, bias, h, h0, g, dh, start, length,
                                             reverse)
        dx_t, dk_t = _project_grads(_take(x, start, length, 1), kernel, dpre)
        return (dh, _put(dx, _stored(dx_t), start, 1), dkernel + dk_t.astype(jnp.float32),
                dbias + db)

    def body(i, carry):
        return run_tile(*carry, full_start(i), tile)

    carry = (g_last, _buffer(x, x.dtype), jnp.zeros(kernel.shape, jnp.float32),
             jnp.zeros(bias.shape, jnp.float32))
    carry = jax.lax.fori_loop(0, num_full, body, carry)
    if rem:
        carry = run_tile(*carry, rem_start, rem)
    dh0, dx, dkernel, dbias = carry
    dx, dkernel = _loaded(dx, x.dtype), dkernel.astype(kernel.dtype)
    bias_value, bias_pullback = jax.vjp(spec.bias, params)
    dparams = (bias_pullback(dbias.astype(bias_value.dtype))[0] if bias_value is not None
               else jax.tree.map(jnp.zeros_like, params))
    return dx, dkernel, dparams, dh0


_native_tiles.defvjp(_native_tiles_fwd, _native_tiles_bwd)


def _native_applies(spec, x, kernel, params, h0, dtype, consts, n_side) -> bool:
    """Whether impl="native" can run these arguments (else it runs "chunked")."""
    if spec is None or kernel is None or n_side:
        return False
    if any(c is not None for c in consts):
        return False
    f32 = jnp.dtype(jnp.float32)
    if x.dtype != kernel.dtype or x.dtype not in (f32, jnp.dtype(jnp.bfloat16)):
        return False
    if not h0.dtype == jnp.dtype(dtype) == f32 or h0.ndim != 2:
        return False
    if kernel.shape[1] != spec.blocks * h0.shape[1]:
        return False
    bias = spec.bias(params)
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (kernel.shape[1],)):
        return False
    return native.usable()


# The sequential implementation fuses the coefficient function into the loop:
# the forward pass stores only the states, and the backward pass recomputes
# each block's coefficients from the inputs (see _loop_bwd), so neither the
# coefficients nor their cotangents are ever materialised for the whole
# sequence.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _fused(coeff_fn, xs, consts, params, h0, reverse: bool):
    return _loop(coeff_fn, xs, consts, params, h0, reverse, 1, store=True)


def _fused_fwd(coeff_fn, xs, consts, params, h0, reverse):
    h_last, h = _loop(coeff_fn, xs, consts, params, h0, reverse, 1, store=True)
    return (h_last, h), (xs, consts, params, h, h0)


def _fused_bwd(coeff_fn, reverse, residuals, cotangents):
    xs, consts, params, h, h0 = residuals
    g_last, g = cotangents
    dxs, dparams, dh0 = _loop_bwd(coeff_fn, xs, consts, params, h, h0, g, g_last,
                                  reverse)
    return dxs, _no_cotangent(consts), dparams, dh0


_fused.defvjp(_fused_fwd, _fused_bwd)


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
    checks.check_float("a", a)
    checks.check_float("b", b)
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
    impl, dtype = _check_h0_impl_dtype(h0, state_shape, impl, seq_len, a.dtype, b.dtype)
    if h0 is None:
        # Built from a (not jnp.zeros) so it has a's type inside shard_map too.
        h0 = jnp.zeros_like(a[:, 0], dtype=dtype)
    return _run(_identity_coeffs, (a, b), (), h0, state_shape, dtype, impl,
                reset=reset, seq_lengths=seq_lengths, mask=mask, reverse=reverse)


def gated_scan(
    coeff_fn: Callable[[Any, Any], Tuple[Array, Array]],
    x: Any,
    h0: Optional[Array] = None,
    *,
    kernel: Optional[Array] = None,
    params: Any = None,
    impl: Union[str, ScanImpl] = ScanImpl.AUTO,
    reset: Optional[Array] = None,
    seq_lengths: Optional[Array] = None,
    mask: Optional[Array] = None,
    reverse: bool = False,
) -> Tuple[Array, Array]:
    """:func:`linear_scan` with coefficients computed from ``x``, step by step.

    Runs ``h_t = a_t * h_{t-1} + b_t`` with
    ``(a_t, b_t) = coeff_fn(x_t, params)``.  ``coeff_fn`` must act on every
    time step independently (gates computed from pre-activations, say): it
    receives slices ``x[:, t0:t1]`` of any length (a pytree like ``x``, time on
    axis 1) and ``params``, and returns ``(a, b)`` for those steps, shape
    ``(batch, t1 - t0, *features)``.  Everything it depends on that is traced
    (weights, biases) must come in through ``params``, not a closure;
    gradients flow to ``x``, ``params`` and ``h0``.

    The result equals ``linear_scan(*coeff_fn(x, params), h0, ...)``.  What fusing
    buys: with ``impl="sequential"`` the coefficients are computed block by
    block inside the loop and recomputed in the backward pass, so they are
    never stored for the whole sequence (the layers of this library run on
    it); the other implementations evaluate ``coeff_fn`` on all of ``x`` and
    call the same scan as :func:`linear_scan`.

    With ``kernel``, ``coeff_fn`` receives ``x @ kernel`` (the input
    projection of a layer) instead of ``x``; the product is computed inside
    the scan, so ``impl="chunked"`` runs it tile by tile while the tile is in
    cache, and gradients flow to ``kernel`` too.  The result equals
    ``gated_scan(coeff_fn, x @ kernel, ...)``.

    Args:
      coeff_fn: ``(x_slice, params) -> (a, b)``; outputs are cast to the
        accumulation dtype (float32, or float64 when they are float64).
      x: a pytree of floating arrays ``(batch, time, ...)``; with ``kernel``
        one array ``(batch, time, d_in)``.
      kernel: optional floating ``(d_in, n)`` input projection.
      params: a pytree of arrays (no time axis) passed to every call of
        ``coeff_fn``, e.g. a bias added to the pre-activations inside the loop
        rather than to the whole sequence beforehand.
      h0, impl, reset, seq_lengths, mask, reverse: as :func:`linear_scan`.

    Returns:
      ``(h_last, h)`` as :func:`linear_scan`.

    Raises:
      TypeError / ValueError: as :func:`linear_scan`, and for ``x`` leaves
        that disagree on ``(batch, time)`` or ``coeff_fn`` outputs of
        different shapes.
    """
    return _gated(coeff_fn, x, h0, kernel, params, impl, reset=reset,
                  seq_lengths=seq_lengths, mask=mask, reverse=reverse)


def gated_scan_with_readout(
    coeff_fn: Callable[[Any, Any], Tuple[Array, Array]],
    readout_fn: Callable[[Array, Optional[Array], Any], Array],
    x: Any,
    h0: Optional[Array] = None,
    *,
    kernel: Optional[Array] = None,
    side_features: int = 0,
    params: Any = None,
    impl: Union[str, ScanImpl] = ScanImpl.AUTO,
    reset: Optional[Array] = None,
    seq_lengths: Optional[Array] = None,
    mask: Optional[Array] = None,
    reverse: bool = False,
) -> Tuple[Array, Array]:
    """:func:`gated_scan` followed by a per-step readout of the states.

    Returns ``(h_last, y)`` with ``y_t = readout_fn(h_t, side_t, params)``
    (an output gate, say): with ``n = kernel.shape[1]`` and
    ``k = side_features``, ``coeff_fn`` receives the first ``n - k`` columns of
    ``x @ kernel`` and ``side`` are the last ``k`` (``None`` when ``k`` is 0).
    The result equals::

        h_last, h = gated_scan(coeff_fn, x, h0, kernel=kernel[:, :n - k], ...)
        y = readout_fn(h, x @ kernel[:, n - k:], params)

    (``h`` is zero at invalid steps, as there).  ``readout_fn`` must act on
    every step independently.  What fusing buys: ``impl="chunked"`` computes
    the side columns in the same product as the recurrence's and the readout
    tile by tile, and its backward pass recomputes the readout's gradient
    tile by tile; only ``y``, the states and the projections are stored for
    the whole sequence.  The other implementations compute the readout on the
    whole sequence and recompute it in the backward pass (``jax.checkpoint``).

    Args:
      coeff_fn: ``(pre_slice, params) -> (a, b)`` as :func:`gated_scan`.
      readout_fn: ``(h_slice, side_slice, params) -> y_slice``; ``h_slice``
        float32 (float64 for float64 inputs) ``(batch, steps, *features)``,
        ``side_slice`` ``(batch, steps, k)`` in the promoted dtype of ``x`` and
        ``kernel``; returns ``(batch, steps, ...)`` of any floating dtype.
      kernel: floating ``(d_in, n)``, or ``None`` (then ``side_features`` must
        be 0 and ``x`` may be any pytree, as in :func:`gated_scan`).
      side_features: ``k``, an int in ``[0, n - 1]``.
      x, h0, params, impl, reset, seq_lengths, mask, reverse: as
        :func:`gated_scan`.

    Returns:
      ``(h_last, y)``: ``h_last`` as :func:`gated_scan`; ``y`` the readout at
      every step (at invalid steps, of a zero state).

    Raises:
      TypeError / ValueError: as :func:`gated_scan`, for ``side_features`` that
        is not an int in ``[0, n - 1]`` (or nonzero without a kernel), and for
        a readout that does not return ``(batch, steps, ...)`` floats.
    """
    if isinstance(side_features, bool) or not isinstance(side_features, (int, np.integer)):
        raise TypeError(f"side_features must be an int, got {side_features!r}")
    if kernel is None and side_features:
        raise ValueError("side_features > 0 needs kernel (its last side_features columns)")
    if getattr(kernel, "ndim", 0) == 2 and not 0 <= side_features <= kernel.shape[1] - 1:
        raise ValueError(
            "side_features must be in [0, n - 1] with n = kernel.shape[1] = "
            f"{kernel.shape[1]}, got {side_features}")
    if not callable(readout_fn):
        raise TypeError(f"readout_fn must be callable, got {readout_fn!r}")
    return _gated(coeff_fn, x, h0, kernel, params, impl, readout_fn=readout_fn,
                  n_side=int(side_features), reset=reset, seq_lengths=seq_lengths,
                  mask=mask, reverse=reverse)


def _gated(coeff_fn, x, h0, kernel, params, impl, *, reset, seq_lengths, mask, reverse,
           readout_fn=None, n_side: int = 0, native_gates=None):
    """Validates the arguments of :func:`gated_scan` (and
    :func:`gated_scan_with_readout`) and runs it."""
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError("x must hold at least one array")
    for i, leaf in enumerate(leaves):
        checks.check_float(f"x (leaf {i})", leaf)
        if leaf.ndim < 2 or tuple(leaf.shape[:2]) != tuple(leaves[0].shape[:2]):
            raise ValueError(
                "every leaf of x must have shape (batch, time, ...) with the same "
                f"batch and time, got {[tuple(l.shape) for l in leaves]}")
    batch, seq_len = leaves[0].shape[:2]
    if seq_len < 1:
        raise ValueError("the time axis (axis 1) of x must be non-empty")
    one_step = jax.tree.map(lambda l: jax.ShapeDtypeStruct(
        (batch, 1) + tuple(l.shape[2:]), l.dtype), x)
    if kernel is not None:
        checks.check_float("kernel", kernel)
        if not hasattr(x, "shape") or x.ndim != 3:
            raise ValueError(
                "with kernel, x must be one array of shape (batch, time, d_in), "
                f"got {jax.tree.map(lambda l: tuple(l.shape), x)}")
        if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
            raise ValueError(
                f"kernel must have shape (d_in, n) with d_in = {x.shape[-1]} (the "
                f"last axis of x), got {tuple(kernel.shape)}")
        one_step = jax.ShapeDtypeStruct((batch, 1, kernel.shape[1] - n_side),
                                        jnp.result_type(x, kernel))
    a_s, b_s = jax.eval_shape(coeff_fn, one_step, params)
    if a_s.shape != b_s.shape or tuple(a_s.shape[:2]) != (batch, 1):
        raise ValueError(
            "coeff_fn must return (a, b) of the same shape (batch, steps, "
            f"*features); on a one-step slice it gave {tuple(a_s.shape)} and "
            f"{tuple(b_s.shape)}")
    state_shape = (batch,) + tuple(a_s.shape[2:])
    impl, dtype = _check_h0_impl_dtype(h0, state_shape, impl, seq_len, a_s.dtype, b_s.dtype)
    if readout_fn is not None:
        side_s = (None if not n_side else
                  jax.ShapeDtypeStruct((batch, 1, n_side), one_step.dtype))
        y_s = jax.eval_shape(readout_fn, jax.ShapeDtypeStruct((batch, 1) + state_shape[1:],
                                                              dtype), side_s, params)
        if (not isinstance(y_s, jax.ShapeDtypeStruct) or y_s.ndim < 2
                or tuple(y_s.shape[:2]) != (batch, 1)
                or not jnp.issubdtype(y_s.dtype, jnp.floating)):
            raise ValueError(
                "readout_fn must return one floating array (batch, steps, ...); on a "
                f"one-step slice it gave {y_s}")
    return _run(lambda xs, consts, p: coeff_fn(xs, p), x, params, h0, state_shape,
                dtype, impl, kernel=kernel, readout_fn=readout_fn, n_side=n_side,
                reset=reset, seq_lengths=seq_lengths, mask=mask, reverse=reverse,
                native_gates=native_gates)


def _check_h0_impl_dtype(h0, state_shape, impl, seq_len: int, a_dtype, b_dtype):
    """Validates ``h0``; returns the resolved impl and the accumulation dtype."""
    if h0 is not None:
        checks.check_float("h0", h0)
        if tuple(h0.shape) != state_shape:
            raise ValueError(
                f"h0 must have shape (batch, *features) = {state_shape}, "
                f"got {tuple(h0.shape)}")
    dtype = checks.accum_dtype(a_dtype, b_dtype, *(() if h0 is None else (h0.dtype,)))
    return resolve_impl(impl, seq_len), dtype


def _run(coeff_fn, x, params, h0, state_shape, dtype, impl: ScanImpl, *, reset,
         seq_lengths, mask, reverse, kernel=None, readout_fn=None, n_side: int = 0,
         native_gates=None):
    """Validated inputs -> ``(h_last, h)``, or ``(h_last, y)`` with
    ``readout_fn``; ``coeff_fn(x_slice, None, params)`` (``x_slice @ kernel``
    without its last ``n_side`` columns in place of ``x_slice`` with a
    kernel).  ``native_gates``: a :class:`flax_minrnn.native.NativeGates`
    naming ``coeff_fn`` for ``impl="native"`` (which runs ``"chunked"`` where
    the kernels do not apply)."""
    batch, seq_len = state_shape[0], jax.tree.leaves(x)[0].shape[1]
    if mask is not None and seq_lengths is not None:
        raise ValueError("pass either mask or seq_lengths, not both")
    h0 = jnp.zeros(state_shape, dtype) if h0 is None else h0.astype(dtype)
    boundary = None
    if reset is not None:
        if impl is ScanImpl.HEINSEN:
            raise ValueError(
                "impl='heinsen' cannot represent a state reset (log 0 in a "
                "cumulative sum); use impl='log' or a linear-space impl")
        reset = checks.check_bool_bt("reset", reset, batch, seq_len)
        boundary = reset_boundaries(reset, reverse)
    if seq_lengths is not None:
        seq_lengths = checks.check_seq_lengths(seq_lengths, batch, seq_len)
        mask = checks.lengths_to_mask(seq_lengths, seq_len)
    elif mask is not None:
        mask = checks.check_bool_bt("mask", mask, batch, seq_len)
    expand = (slice(None), slice(None)) + (None,) * (len(state_shape) - 1)

    def coeffs(xs, consts, params):
        # Resets zero the decay (the state restarts); invalid steps are
        # identities (a = 1, b = 0).
        a, b = coeff_fn(xs, None, params)
        a, b = a.astype(dtype), b.astype(dtype)
        boundary_t, valid_t = consts
        if boundary_t is not None:
            a = jnp.where(boundary_t[expand], jnp.zeros((), dtype), a)
        if valid_t is not None:
            a = jnp.where(valid_t[expand], a, jnp.ones((), dtype))
            b = jnp.where(valid_t[expand], b, jnp.zeros((), dtype))
        return a, b

    readout = None
    if readout_fn is not None:
        def readout(h, side, consts, params):
            # Invalid steps read out a zero state (h is zero there).
            valid_t = consts[1]
            if valid_t is not None:
                h = jnp.where(valid_t[expand], h, jnp.zeros((), h.dtype))
            return readout_fn(h, side, params)

    consts = (boundary, mask)

    def tile() -> int:  # steps per tile of the tiled implementations
        if kernel is None:
            row_bytes = sum(math.prod(l.shape[2:]) * l.dtype.itemsize
                            for l in jax.tree.leaves(x))
        else:
            row_bytes = kernel.shape[1] * jnp.result_type(x, kernel).itemsize
        return _tile_size(batch * row_bytes, seq_len)

    if impl is ScanImpl.NATIVE:
        if _native_applies(native_gates, x, kernel, params, h0, dtype, consts, n_side):
            h_last, h = _native_tiles(native_gates, x, kernel, params, h0, bool(reverse),
                                      tile())
            if readout is None:
                return h_last, h
            # A readout without side columns (out_proj) on the whole sequence,
            # recomputed in the backward pass (h is kept anyway).
            return h_last, jax.checkpoint(readout)(h, None, consts, params)
        impl = ScanImpl.CHUNKED
    if impl is ScanImpl.CHUNKED:
        h_last, out = _tiled(coeffs, readout, x, kernel, consts, params, h0, bool(reverse),
                             tile(), n_side)
        if readout is not None:
            return h_last, out
        h = out
    else:
        side = None
        if kernel is not None:
            n_rec = kernel.shape[1] - n_side
            if n_side:
                side = project(x, kernel[:, n_rec:])
            x = project(x, kernel[:, :n_rec] if n_side else kernel)
        if impl is ScanImpl.SEQUENTIAL:
            h_last, h = _fused(coeffs, x, consts, params, h0, bool(reverse))
        else:
            a, b = coeffs(x, consts, params)
            h_last, h = _scan(a, b, h0, impl, bool(reverse))
    if mask is not None:
        h = jnp.where(mask[expand], h, jnp.zeros((), dtype))
    if readout_fn is None:
        return h_last, h
    # Recomputed in the backward pass: only h and side are kept for it.
    return h_last, jax.checkpoint(readout_fn)(h, side, params)
