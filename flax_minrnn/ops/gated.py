"""The recurrence of a layer: projection, gates, scan and readout in one call.

:func:`gated_scan` runs ``h_t = a_t * h_{t-1} + b_t`` with the coefficients
computed from the inputs, ``(a_t, b_t) = coeff_fn(x_t @ kernel, params)``,
and :func:`gated_scan_with_readout` adds a per-step readout
``y_t = readout_fn(h_t, side_t, params)`` (an output gate, an output
projection).  The layers of :mod:`flax_minrnn.nn` run on these.

With ``impl="chunked"`` (what ``"auto"`` picks on CPU from ``T = 64``) the
time axis is cut into tiles of a few dozen steps, visited in scan order, and
a tile's coefficients, recurrence and readout run one after another while
the tile is in cache (a whole-sequence pass over ``B * T * D`` floats misses
the cache from ``T ~ 1024`` on).  Under differentiation (the ``custom_jvp``
rule below, whose residuals reverse mode reads) the projection ``x @ kernel``
is computed for the whole sequence before the loop and kept; a plain call
computes it tile by tile and stores it nowhere.  The derivatives follow the
scheme of :mod:`flax_minrnn.ops.scan`: a ``jax.custom_jvp`` whose tangent is a
:func:`flax_minrnn.ops.linear.linear_op`, so that

* reverse mode runs a hand-written adjoint that visits the tiles in reverse
  and, per tile, recomputes the gates from the stored projection, runs the
  adjoint recurrence, and forms ``dx_t = dpre_t W^T`` and
  ``dW += x_t^T dpre_t`` while the tile is in cache;
* forward mode (``jvp``, ``linearize``) runs a tangent loop that visits the
  tiles in scan order and, per tile, forms the projection's tangent
  ``dx_t W + x_t dW``, the gates' tangents (``jax.jvp`` of the gate
  function at the stored projection) and the tangent recurrence
  ``dh_t = a_t dh_{t-1} + (da_t h_{t-1} + db_t)`` from the stored states, so
  the primal's projection and recurrence do not run twice;
* second derivatives differentiate these loops with JAX.

The other implementations compute the projection and the coefficients for
the whole sequence and call :func:`flax_minrnn.ops.scan.linear_scan`'s core;
the gates and the readout are recomputed in the backward pass
(``jax.checkpoint``), so only the projections and the states are stored.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.ops import checks
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.ops.linear import linear_op, matmul
from flax_minrnn.ops.scan import ScanImpl

Array = jax.Array

__all__ = ["gated_scan", "gated_scan_with_readout", "tile_size"]

# Bytes of projection output per tile, at most (rounded down to a power of two
# of steps): 128 steps at B = 8 and 2 x 256 float32 features, 64 at 3 x 256.
# A tile's projection then fits in a core's L2 cache, and the tile loop's
# temporaries, which all scale with the tile, stay small next to the
# whole-sequence buffers.
_TILE_BYTES = 2 * 2 ** 20
_TILE_MIN, _TILE_MAX = 32, 512
# The batch a tile is sized for when the batch is symbolic (jax.export).
_NOMINAL_ROWS = 8


def tile_size(row_bytes: int, seq_len: int) -> int:
    """Steps per tile for ``row_bytes`` bytes of projection output per step.

    At most a quarter of ``seq_len`` (rounded down to a power of two, at
    least ``_TILE_MIN``): with at least four tiles, the tiles' temporaries
    stay small next to the sequence's own buffers.  Never more than
    ``seq_len``.  A symbolic ``seq_len`` (``jax.export``) bounds nothing.
    """
    steps = max(1, _TILE_BYTES // max(1, row_bytes))
    size = min(_TILE_MAX, max(_TILE_MIN, 2 ** int(math.log2(steps))))
    if jax.export.is_symbolic_dim(seq_len):
        return size
    quarter = 2 ** int(math.log2(max(1, seq_len // 4)))
    return int(min(seq_len, max(_TILE_MIN, min(size, quarter))))


# ----------------------------------------------------------------------------
# Tile helpers.


def _take(tree, start, size: int):
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, 1), tree)


def _put(tree, block, start):
    return jax.tree.map(lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, start, 1),
                        tree, block)


def _is_half(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def _stored(x: Array) -> Array:
    """16-bit floats as uint16 bits, other arrays unchanged.

    XLA:CPU widens a bfloat16 dynamic update to float32 and converts the whole
    buffer each time, so the tile buffers of 16-bit values hold their bits; a
    bitcast costs nothing.
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_half(x.dtype) else x


def _loaded(x: Array, dtype) -> Array:
    """The inverse of :func:`_stored` for values of ``dtype``."""
    return jax.lax.bitcast_convert_type(x, dtype) if _is_half(dtype) else x


def _stored_dtype(dtype):
    """The dtype in which :func:`_stored` keeps values of ``dtype``."""
    return jnp.uint16 if _is_half(dtype) else dtype


def _buffer(like: Array, dtype, shape) -> Array:
    """A zero buffer for values of ``dtype`` in :func:`_stored` form, built from
    ``like`` (not ``jnp.zeros``, so it has its type inside ``shard_map``)."""
    return jax.lax.full_like(like, 0, _stored_dtype(dtype), shape)


# More blocks than any gate function splits into (MinLSTM and the untied
# GatedLinearRNN use three) would only add buffers to the loop.
_MAX_COLUMN_GROUPS = 4


def _column_groups(n_rec: int, h0: Array) -> int:
    """Into how many buffers the forward pass stores the ``n_rec`` projection
    columns that ``coeff_fn`` sees: one per state-width group of columns
    (``[k, h~]`` of minGRU, say) when they divide evenly, else one.

    XLA:CPU runs a fusion that reads two column ranges of one sliced buffer
    several times slower than one that reads whole operands, and every gate
    function reads several ranges; from separate buffers the slices of the
    reloaded tile resolve to whole operands.
    """
    width = h0.shape[-1] if h0.ndim == 2 else 0
    if not width or n_rec % width or n_rec // width > _MAX_COLUMN_GROUPS:
        return 1
    return n_rec // width


def _load_columns(bufs, start, length: int, dtype) -> Array:
    """A tile of the projection columns stored by :func:`tiles_forward`."""
    return jnp.concatenate([_loaded(b, dtype) for b in _take(bufs, start, length)], axis=-1)


def _tile_states(h, h0, start, length: int, reverse: bool, seq_len):
    """``(h_t, h_prev)``: the states ``h`` of steps ``[start, start + length)``
    and the state before each of them in scan order (``h0`` before the
    sequence's first step; the sequence has ``seq_len`` steps, and ``h`` may
    hold more after them)."""

    def at(i):
        i = jnp.clip(i, 0, seq_len - 1)
        return jax.lax.dynamic_index_in_dim(h, i, 1, keepdims=False)

    if reverse:
        first = jnp.where(start + length < seq_len, at(start + length), h0)
    else:
        first = jnp.where(start > 0, at(start - 1), h0)
    h_t = jax.lax.dynamic_slice_in_dim(h, start, length, 1)
    return h_t, scan_lib.states_before(h_t, first, reverse)


def _grad_sums(params):
    """Zero accumulators for gradients summed over tiles: float32 for 16-bit
    parameters (a bfloat16 sum over hundreds of tiles loses digits)."""
    return jax.tree.map(
        lambda p: jax.lax.full_like(p, 0, jnp.float32 if _is_half(p.dtype) else p.dtype), params)


def _add_grads(sums, grads):
    return jax.tree.map(lambda s, g: s + g.astype(s.dtype), sums, grads)


def _grads_of(sums, params):
    return jax.tree.map(lambda s, p: s.astype(p.dtype), sums, params)


# ----------------------------------------------------------------------------
# impl="chunked": the tile loop.

# Steps per block past the last whole tile of a symbolic length.
_UNIT = 8


def _tile_layout(seq_len, tile: int, reverse: bool):
    """The tiles of ``seq_len`` steps in scan order: ``[(count, start, length,
    loop)]``, ``count`` tiles of ``length`` steps, the ``i``-th of them
    starting at ``start(i)``, run by a loop (``loop``) or by one call.

    A concrete length has the layout of :func:`flax_minrnn.ops.scan.blocks`.
    A symbolic one (``jax.export``) has ``seq_len // tile`` whole tiles and
    then blocks of ``_UNIT`` steps up to the end, at the end of time in
    either direction; the last block may run up to ``_UNIT - 1`` steps past
    the end, so the arrays must hold ``tile`` more steps, identities
    (:func:`_append_steps`).
    """
    if not jax.export.is_symbolic_dim(seq_len):
        num_full, rem, full_start, rem_start = scan_lib.blocks(seq_len, tile, reverse)
        return [(num_full, full_start, tile, True)] + (
            [(1, lambda i: rem_start, rem, False)] if rem else [])
    unit = min(_UNIT, tile)
    full = seq_len // tile
    units = (seq_len - full * tile + unit - 1) // unit
    edge = lambda: jnp.asarray(full * tile, jnp.int32)
    if reverse:
        return [(units, lambda i: edge() + (units - 1 - i) * unit, unit, True),
                (full, lambda i: (full - 1 - i) * tile, tile, True)]
    return [(full, lambda i: i * tile, tile, True),
            (units, lambda i: edge() + i * unit, unit, True)]


def _visit_tiles(run_tile, carry, seq_len, tile: int, reverse: bool, against: bool = False):
    """``carry = run_tile(carry, start, length)`` over the tiles of
    :func:`_tile_layout`, in scan order, or against it (``against``: the
    adjoint's order)."""
    layout = _tile_layout(seq_len, tile, reverse)
    if against:
        layout = [(count, (lambda i, start=start, count=count: start(count - 1 - i)), length,
                   loop) for count, start, length, loop in reversed(layout)]
    for count, start, length, loop in layout:
        if loop:
            carry = jax.lax.fori_loop(
                0, count, lambda i, c, start=start, length=length: run_tile(c, start(i), length),
                carry)
        else:
            carry = run_tile(carry, start(0), length)
    return carry


def _append_steps(x, steps: int):
    """``x`` (a pytree of ``(batch, time, ...)`` arrays, or ``None``) with
    ``steps`` steps of zeros (False) appended to the time axis."""
    def append(v):
        tail = jax.lax.full_like(v, 0, v.dtype, (v.shape[0], steps) + tuple(v.shape[2:]))
        return jnp.concatenate([v, tail], axis=1)
    return jax.tree.map(append, x)


def _readout_buffer(readout, h0, params, seq_len: int, n_side: int, p_dtype):
    """``(dtype, buffer)``: the dtype of ``readout``'s output and a zero
    buffer (in :func:`_stored` form) for its ``seq_len`` steps."""
    batch = h0.shape[0]
    h_spec = jax.ShapeDtypeStruct((batch, 1) + h0.shape[1:], h0.dtype)
    side_spec = jax.ShapeDtypeStruct((batch, 1, n_side), p_dtype) if n_side else None
    spec = jax.eval_shape(lambda h, s, p: readout(h, s, (None, None), p),
                          h_spec, side_spec, params)
    return spec.dtype, _buffer(h0, spec.dtype, (batch, seq_len) + spec.shape[2:])


def tiles_forward(coeff_fn, readout, x, kernel, consts, params, h0, reverse: bool,
                  tile: int, n_side: int, seq_len, *, store: bool):
    """The forward tile loop over the ``seq_len`` steps of ``x``'s time axis
    (which may hold more: :func:`_tile_layout`).

    ``store``: keep what the derivatives read, the states and the projection
    (which is then computed for the whole sequence before the loop); else
    the outputs alone, for a plain call, with the projection computed tile by
    tile and never stored whole.

    Returns ``(h_last, h, pre, side, y)``: the states (``None`` when there is
    a readout and nothing is stored); ``pre`` the columns of ``x @ kernel``
    that ``coeff_fn`` sees, as a tuple of buffers of consecutive column
    groups (:func:`_column_groups`), and ``side`` its last ``n_side`` columns
    (both only with ``store`` and a kernel; ``side`` only with side columns);
    ``y`` the readout of each step (``None`` without ``readout``).
    """
    batch, length = jax.tree.leaves(x)[0].shape[:2]
    h_buf = (_buffer(h0, h0.dtype, (batch, length) + h0.shape[1:])
             if store or readout is None else None)
    pre_buf = side_buf = y_buf = y_dtype = None
    p_dtype = None if kernel is None else jnp.result_type(x, kernel)
    if store and kernel is not None:
        # The projection is kept for the adjoint anyway, so it is computed
        # for the whole sequence, one product per stored buffer: one large
        # product runs faster than one per tile, and the tile loop then
        # copies no slices of x.
        pre_buf, side_buf = _project_stored(x, kernel, n_side, _column_groups(
            kernel.shape[1] - n_side, h0))
    if readout is not None:
        y_dtype, y_buf = _readout_buffer(readout, h0, params, length, n_side, p_dtype)

    def run_tile(carry, start, length):
        h, (h_buf, y_buf) = carry
        pre, side = _tile_projection(x, kernel, n_side, pre_buf, side_buf, start, length)
        c_t = _take(consts, start, length)
        a, b = coeff_fn(pre, c_t, params)
        if h_buf is not None:
            # The states go straight into h_buf.
            h, h_buf = scan_lib.sequential_into(a, h_buf, h, reverse, b=b, offset=start)
            h_tile = jax.lax.dynamic_slice_in_dim(h_buf, start, length, 1)
        else:
            h, h_tile = scan_lib.sequential_into(a, b, h, reverse)
        if readout is not None:
            y_buf = _put(y_buf, _stored(readout(h_tile, side, c_t, params)), start)
        return h, (h_buf, y_buf)

    h_last, (h, y) = _visit_tiles(run_tile, (h0, (h_buf, y_buf)), seq_len, tile, reverse)
    if y is not None:
        y = _loaded(y, y_dtype)
    return h_last, h, pre_buf, side_buf, y


def _project_stored(x, kernel, n_side: int, groups: int):
    """``x @ kernel`` for the whole sequence, in :func:`_stored` form: the
    ``groups`` buffers of the columns ``coeff_fn`` sees and the buffer of the
    last ``n_side`` columns (``None`` without side columns), each its own
    product."""
    n_rec = kernel.shape[1] - n_side
    width = n_rec // groups

    def product(lo, hi):
        return _stored(jnp.einsum("bti,io->bto", x, kernel[:, lo:hi]))

    pre = tuple(product(k * width, (k + 1) * width) for k in range(groups))
    return pre, (product(n_rec, n_rec + n_side) if n_side else None)


def _tile_projection(x, kernel, n_side: int, pre_buf, side_buf, start, length: int):
    """A tile's ``(pre, side)``: read from the buffers of
    :func:`_project_stored` when the projection was kept, else computed
    (:func:`_project`)."""
    if pre_buf is None:
        return _project(x, kernel, n_side, start, length)
    p_dtype = jnp.result_type(x, kernel)
    side = None if side_buf is None else _loaded(_take(side_buf, start, length), p_dtype)
    return _load_columns(pre_buf, start, length, p_dtype), side


def _project(x, kernel, n_side: int, start, length: int):
    """The tile's projection: ``(pre, side)`` (``x`` itself without a kernel)."""
    x_t = _take(x, start, length)
    if kernel is None:
        return x_t, None
    pre = jnp.einsum("bti,io->bto", x_t, kernel)
    if not n_side:
        return pre, None
    n_rec = kernel.shape[1] - n_side
    return tuple(jnp.split(pre, [n_rec], axis=-1))


def tiles_backward(coeff_fn, readout, x, kernel, consts, params, h0, h, pre_buf, side_buf,
                   g, g_last, reverse: bool, tile: int, n_side: int, seq_len):
    """``(dx, dkernel, dparams, dh0)`` of :func:`tiles_forward` for the
    cotangents ``g`` of the outputs (the states, or the readout) and
    ``g_last`` of the final state: the hand-written adjoint, from the stored
    states and projections (``h``, ``pre_buf``, ``side_buf``).
    """
    p_dtype = jnp.result_type(x, kernel) if kernel is not None else None

    # dx is written tile by tile over the first stored projection buffer when
    # the two have one shape and dtype: each tile of it is read before the
    # tile of dx goes in, and is not read again.  dx then needs neither a
    # buffer of its own nor a fill of zeros.
    # (pre_buf exists only with a kernel, and then x is one array.)
    reuse = (pre_buf is not None and pre_buf[0].shape == x.shape
             and pre_buf[0].dtype == _stored_dtype(x.dtype))

    def run_tile(carry, start, length):
        dh, dx, dkernel, dparams = carry
        x_t = _take(x, start, length)
        c_t = _take(consts, start, length)
        bufs = (dx,) + pre_buf[1:] if reuse else pre_buf
        pre, side_t = _tile_projection(x, kernel, n_side, bufs, side_buf, start, length)
        (a, _), pullback = jax.vjp(lambda q, p: coeff_fn(q, c_t, p), pre, params)
        h_t, h_prev = _tile_states(h, h0, start, length, reverse, seq_len)
        g_t, g_side = jax.lax.dynamic_slice_in_dim(g, start, length, 1), None
        if readout is not None:
            # The readout's gradient, tile by tile: its cotangent with respect
            # to the states drives the adjoint recurrence below.
            _, pull_out = jax.vjp(lambda s, q, p: readout(s, q, c_t, p), h_t, side_t, params)
            g_t, g_side, dp_out = pull_out(g_t)
            dparams = _add_grads(dparams, dp_out)
        # The adjoint recurrence through the tile, against scan order, over
        # the slice g_t in place; its final carry is the cotangent of the
        # state before the tile.
        dh, lam = scan_lib.sequential_into(a, g_t, dh, not reverse, adjoint=True)
        dpre, dp = pullback((lam * h_prev, lam))
        if kernel is not None:
            if g_side is not None:
                # One product for all columns: the side columns' cotangents
                # join the coefficient columns'.
                dpre = jnp.concatenate([dpre, g_side.astype(dpre.dtype)], axis=-1)
            dpre = dpre.astype(p_dtype)
            dx_t = jnp.einsum("bto,io->bti", dpre, kernel)
            dk_t = jnp.einsum("bti,bto->io", x_t, dpre, preferred_element_type=dkernel.dtype)
            dkernel = dkernel + dk_t
        else:
            dx_t = dpre
        dx_t = jax.tree.map(lambda d, v: _stored(d.astype(v.dtype)), dx_t, x)
        return dh, _put(dx, dx_t, start), dkernel, _add_grads(dparams, dp)

    dkernel = (None if kernel is None else
               jax.lax.full_like(kernel, 0, checks.accum_dtype(kernel.dtype)))
    dx = pre_buf[0] if reuse else jax.tree.map(lambda v: _buffer(v, v.dtype, v.shape), x)
    # The forward pass's tiles, visited in the opposite order.
    dh0, dx, dkernel, dparams = _visit_tiles(run_tile, (g_last, dx, dkernel, _grad_sums(params)),
                                             seq_len, tile, reverse, against=True)
    if kernel is not None:
        dkernel = dkernel.astype(kernel.dtype)
    return (jax.tree.map(lambda d, v: _loaded(d, v.dtype), dx, x), dkernel,
            _grads_of(dparams, params), dh0)


def tiles_tangent(coeff_fn, readout, x, kernel, consts, params, h0, h, pre_buf, side_buf,
                  dx, dkernel, dparams, dh0, reverse: bool, tile: int, n_side: int, seq_len):
    """``(dh_last, dout)``: the tangent of :func:`tiles_forward` for the
    tangents ``(dx, dkernel, dparams, dh0)`` of its inputs (forward mode),
    from the stored states and projections (``h``, ``pre_buf``, ``side_buf``).

    Per tile, in scan order: the projection's tangent
    ``dp_t = dx_t W + x_t dW``, the coefficients' tangents
    ``(da_t, db_t)`` (``jax.jvp`` of ``coeff_fn`` at the stored projection),
    the tangent recurrence ``dh_t = a_t dh_{t-1} + (da_t h_{t-1} + db_t)``
    (the scan's own, so :func:`flax_minrnn.ops.scan.sequential_into` runs it),
    and the readout's tangent.  The primal's projection and recurrence are
    read, not run again.
    """
    if readout is None:
        out_dtype, out_buf = h.dtype, _buffer(h0, h.dtype, h.shape)
    else:
        out_dtype, out_buf = _readout_buffer(readout, h0, params, h.shape[1], n_side,
                                             None if kernel is None else
                                             jnp.result_type(x, kernel))

    def tangent_projection(start, length):
        if kernel is None:
            return _take(dx, start, length), None
        d_pre, d_side = _project(dx, kernel, n_side, start, length)
        k_pre, k_side = _project(x, dkernel, n_side, start, length)
        return d_pre + k_pre, (None if d_side is None else d_side + k_side)

    def run_tile(carry, start, length):
        dh, out_buf = carry
        c_t = _take(consts, start, length)
        pre, side_t = _tile_projection(x, kernel, n_side, pre_buf, side_buf, start, length)
        d_pre, d_side = tangent_projection(start, length)
        (a, _), (da, db) = jax.jvp(lambda q, p: coeff_fn(q, c_t, p), (pre, params),
                                   (d_pre, dparams))
        h_t, h_prev = _tile_states(h, h0, start, length, reverse, seq_len)
        u = (da * h_prev + db).astype(dh.dtype)
        dh, dh_t = scan_lib.sequential_into(a, u, dh, reverse)
        if readout is not None:
            dh_t = jax.jvp(lambda s, q, p: readout(s, q, c_t, p), (h_t, side_t, params),
                           (dh_t, d_side, dparams))[1]
        return dh, _put(out_buf, _stored(dh_t), start)

    dh_last, out = _visit_tiles(run_tile, (dh0, out_buf), seq_len, tile, reverse)
    return dh_last, _loaded(out, out_dtype)


def _tiled_outputs(coeff_fn, readout, reverse, tile, n_side, seq_len, x, kernel, consts, params,
                   h0):
    h_last, h, _, _, y = tiles_forward(coeff_fn, readout, x, kernel, consts, params, h0,
                                       reverse, tile, n_side, seq_len, store=False)
    return h_last, (h if readout is None else y)


def _tiled_tangent(static, res, lin):
    """Forward mode: the tangent loop (:func:`tiles_tangent`)."""
    coeff_fn, readout, reverse, tile, n_side, seq_len = static
    x, kernel, consts, params, h0, h, pre, side = res
    return tiles_tangent(coeff_fn, readout, x, kernel, consts, params, h0, h, pre, side,
                         *lin, reverse, tile, n_side, seq_len)


def _tiled_adjoint(static, res, ct):
    """Reverse mode: the hand-written adjoint (:func:`tiles_backward`)."""
    coeff_fn, readout, reverse, tile, n_side, seq_len = static
    x, kernel, consts, params, h0, h, pre, side = res
    g_last, g = ct
    return tiles_backward(coeff_fn, readout, x, kernel, consts, params, h0, h, pre, side,
                          g, g_last, reverse, tile, n_side, seq_len)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 7, 8, 9, 10))
def _tiled(coeff_fn, readout, x, kernel, consts, params, h0, reverse: bool, tile: int,
           n_side: int, seq_len):
    """The tile loop over the first ``seq_len`` steps of the time axis
    (:func:`_tile_layout`): ``(h_last, states or readout)``, as long as the
    axis."""
    return _tiled_outputs(coeff_fn, readout, reverse, tile, n_side, seq_len, x, kernel, consts,
                          params, h0)


@_tiled.defjvp
def _tiled_jvp(coeff_fn, readout, reverse, tile, n_side, seq_len, primals, tangents):
    x, kernel, consts, params, h0 = primals
    dx, dkernel, _, dparams, dh0 = tangents
    # The states and the projection, which both the tangent and the adjoint read.
    h_last, h, pre, side, y = tiles_forward(coeff_fn, readout, x, kernel, consts, params, h0,
                                            reverse, tile, n_side, seq_len, store=True)
    static = (coeff_fn, readout, reverse, tile, n_side, seq_len)
    tangent = linear_op(functools.partial(_tiled_tangent, static),
                        functools.partial(_tiled_adjoint, static),
                        (x, kernel, consts, params, h0, h, pre, side),
                        (dx, dkernel, dparams, dh0))
    return (h_last, h if readout is None else y), tangent


# ----------------------------------------------------------------------------
# The public functions.


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
    """:func:`~flax_minrnn.ops.scan.linear_scan` with coefficients computed from ``x``.

    Runs ``h_t = a_t * h_{t-1} + b_t`` with ``(a_t, b_t) = coeff_fn(p_t,
    params)``, where ``p = x @ kernel`` (or ``p = x`` without a kernel).
    ``coeff_fn`` must act on every time step independently: it receives
    slices ``p[:, t0:t1]`` of any length and ``params``, and returns ``(a,
    b)`` of shape ``(batch, t1 - t0, *features)``.  Everything it depends on
    that is traced (biases, say) must come in through ``params``, not a
    closure; gradients flow to ``x``, ``kernel``, ``params`` and ``h0``.

    The result equals ``linear_scan(*coeff_fn(x @ kernel, params), h0,
    ...)``; see the module docstring for what each implementation stores.

    Args:
      coeff_fn: ``(p_slice, params) -> (a, b)``; outputs are cast to the
        accumulation dtype (float32, or float64 when they are float64).
      x: a pytree of floating arrays ``(batch, time, ...)``; with ``kernel``
        one array ``(batch, time, d_in)``.
      h0: initial state; ``None`` means zeros.
      kernel: optional floating ``(d_in, n)`` input projection.
      params: a pytree of arrays (no time axis) passed to every call of
        ``coeff_fn``.
      impl, reset, seq_lengths, mask, reverse: as
        :func:`~flax_minrnn.ops.scan.linear_scan`.

    Returns:
      ``(h_last, h)`` as :func:`~flax_minrnn.ops.scan.linear_scan`.

    Raises:
      TypeError / ValueError: as :func:`~flax_minrnn.ops.scan.linear_scan`,
        and for ``x`` leaves that disagree on ``(batch, time)`` or
        ``coeff_fn`` outputs of different shapes.
    """
    return run(coeff_fn, x, h0, kernel, params, impl, reset=reset, seq_lengths=seq_lengths,
               mask=mask, reverse=reverse)


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

    Returns ``(h_last, y)`` with ``y_t = readout_fn(h_t, side_t, params)``:
    with ``n = kernel.shape[1]`` and ``k = side_features``, ``coeff_fn``
    receives the first ``n - k`` columns of ``x @ kernel`` and ``side`` are
    the last ``k`` (``None`` when ``k`` is 0).  The result equals::

        h_last, h = gated_scan(coeff_fn, x, h0, kernel=kernel[:, :n - k], ...)
        y = readout_fn(h, x @ kernel[:, n - k:], params)

    (``h`` is zero at invalid steps, as there).  ``readout_fn`` must act on
    every step independently.  With ``impl="chunked"`` the side columns come
    out of the same product as the recurrence's and the readout runs tile by
    tile, forward and backward.

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
    """
    if isinstance(side_features, bool) or not isinstance(side_features, (int, np.integer)):
        raise TypeError(f"side_features must be an int, got {side_features!r}")
    if kernel is None and side_features:
        raise ValueError("side_features > 0 needs kernel (its last side_features columns)")
    if getattr(kernel, "ndim", 0) == 2 and not 0 <= side_features <= kernel.shape[1] - 1:
        raise ValueError("side_features must be in [0, n - 1] with n = kernel.shape[1] = "
                         f"{kernel.shape[1]}, got {side_features}")
    if not callable(readout_fn):
        raise TypeError(f"readout_fn must be callable, got {readout_fn!r}")
    return run(coeff_fn, x, h0, kernel, params, impl, readout_fn=readout_fn,
               n_side=int(side_features), reset=reset, seq_lengths=seq_lengths, mask=mask,
               reverse=reverse)


def run(coeff_fn, x, h0, kernel, params, impl, *, reset, seq_lengths, mask, reverse,
        readout_fn=None, n_side: int = 0, gate_name=None):
    """Validates the arguments of :func:`gated_scan` (and
    :func:`gated_scan_with_readout`) and runs them.

    ``gate_name`` names ``coeff_fn`` for a backend that implements those
    gates itself (``impl="native"``, see :mod:`flax_minrnn.backends.native`);
    where the backend does not cover a call, ``"chunked"`` runs it.
    """
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
    checks.check_real_outputs("coeff_fn", a_s, b_s)
    if a_s.shape != b_s.shape or tuple(a_s.shape[:2]) != (batch, 1):
        raise ValueError(
            "coeff_fn must return (a, b) of the same shape (batch, steps, "
            f"*features); on a one-step slice it gave {tuple(a_s.shape)} and "
            f"{tuple(b_s.shape)}")
    state_shape = (batch,) + tuple(a_s.shape[2:])
    h0 = checks.check_state("h0", h0, state_shape)
    dtype = checks.accum_dtype(a_s.dtype, b_s.dtype, *(() if h0 is None else (h0.dtype,)))
    impl = scan_lib.resolve_impl(impl, seq_len)
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
    valid = checks.valid_mask(batch, seq_len, seq_lengths, mask)
    if reset is not None:
        reset = checks.check_bool_bt("reset", reset, batch, seq_len)
    h0 = jnp.zeros(state_shape, dtype) if h0 is None else h0.astype(dtype)
    x, kernel, params, h0 = checks.same_varying(x, kernel, params, h0)
    if batch == 0:
        out = (jnp.zeros((0, seq_len) + state_shape[1:], dtype) if readout_fn is None
               else jnp.zeros((0, seq_len) + y_s.shape[2:], y_s.dtype))
        return jnp.zeros(state_shape, dtype), out
    boundary = None if reset is None else scan_lib.reset_boundaries(reset, reverse, valid)
    expand = (slice(None), slice(None)) + (None,) * (len(state_shape) - 1)

    def coeffs(xs, consts, params):
        # Resets zero the decay (the state restarts); invalid steps are
        # identities (a = 1, b = 0).
        a, b = coeff_fn(xs, params)
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
            # Invalid steps read out a zero state.
            valid_t = consts[1]
            if valid_t is not None:
                h = jnp.where(valid_t[expand], h, jnp.zeros((), h.dtype))
            return readout_fn(h, side, params)

    consts = (boundary, valid)

    def tile() -> int:
        if kernel is None:
            row_bytes = sum(math.prod(l.shape[2:]) * l.dtype.itemsize for l in leaves)
        else:
            row_bytes = kernel.shape[1] * jnp.result_type(x, kernel).itemsize
        # A symbolic batch (jax.export) is sized as _NOMINAL_ROWS rows: the
        # tile only changes speed, never the results beyond rounding.
        rows = _NOMINAL_ROWS if jax.export.is_symbolic_dim(batch) else batch
        return tile_size(rows * row_bytes, seq_len)

    if impl is ScanImpl.NATIVE:
        out = scan_lib.backend_module(impl).gated(
            gate_name, coeffs, readout, x, kernel, consts, params, h0, bool(reverse), tile(),
            n_side)
        if out is not None:
            return out
        impl = ScanImpl.CHUNKED
    if impl is ScanImpl.CHUNKED:
        size = tile()
        symbolic = jax.export.is_symbolic_dim(seq_len)
        if symbolic:
            # The last block may run past the end (_tile_layout): invalid
            # steps (identities) follow it.
            if valid is None:
                valid = jax.lax.full_like(leaves[0], True, jnp.bool_, (batch, seq_len))
            x, (boundary, valid) = _append_steps(x, size), _append_steps((boundary, valid), size)
        h_last, out = _tiled(coeffs, readout, x, kernel, (boundary, valid), params, h0,
                             bool(reverse), size, n_side, seq_len)
        out = scan_lib.zero_invalid(out, valid) if readout is None else out
        return h_last, (scan_lib.time_slice(out, 0, seq_len) if symbolic else out)
    side = None
    if kernel is not None:
        n_rec = kernel.shape[1] - n_side
        if n_side:
            side = matmul(x, kernel[:, n_rec:])
            x = matmul(x, kernel[:, :n_rec])
        else:
            x = matmul(x, kernel)
    # The coefficients are recomputed in the backward pass: only the
    # projection is kept for them.
    a, b = jax.checkpoint(coeffs)(x, consts, params)
    h_last, h = scan_lib.core(a, b, h0, impl, bool(reverse))
    h = scan_lib.zero_invalid(h, valid)
    if readout_fn is None:
        return h_last, h
    # Recomputed in the backward pass: only h and side are kept for it.
    return h_last, jax.checkpoint(readout_fn)(h, side, params)
