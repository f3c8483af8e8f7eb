"""A nonlinear ("true") recurrence: gates that see the previous state.

:func:`true_recurrence` runs, one step at a time::

    h_in_t = 0 where a document starts at t (reset), else h_{t-1}
    p_t    = x_t @ kernel + h_in_t @ U            (x_t itself without kernel)
    (a_t, b_t) = coeff_fn(p_t, params)
    h_t    = a_t * h_in_t + b_t

with the conventions of :func:`flax_minrnn.ops.scan.linear_scan` (``h_{-1} =
h0``, ``(h_last, h)`` returned, invalid steps keep the state and output
zeros, ``reverse`` runs from the last step to the first).  It is the
sequential mode of the layers of :mod:`flax_minrnn.nn.recurrent`
(``use_true_recurrence=True``, two-stage training), and the same call with
``T = 1`` is their decoding step.  :func:`true_recurrence_with_readout` adds
a per-step readout ``y_t = readout_fn(h_t, s_t, params)`` of side columns
``s_t`` of ``p_t`` (an output gate, which also sees ``h_{t-1}``).

What runs
---------
The input projection ``x @ kernel`` is one product over the whole sequence.
The loop visits the steps in blocks of ``_UNROLL`` (one loop iteration per
block, whose inputs are loaded during the previous one); a step is one
product ``h_in @ U`` followed by the gates and the update in one fused
kernel.  ``U`` is the only matrix inside the loop, so it stays in cache.  The
total pre-activations ``p_t`` are kept, so that the backward pass never
recomputes a product of the forward one.

``coeff_fn`` must act on every step and on every state unit independently:
with ``d = d_h`` and ``p_t`` cut into blocks of ``d`` columns, unit ``j`` of
``a_t`` and ``b_t`` depends only on column ``j`` of each block (as every gate
function of :mod:`flax_minrnn.nn.gates` does).  The backward pass relies on
it.

Derivatives
-----------
The loop is a ``jax.custom_jvp`` whose tangent is a
:func:`flax_minrnn.ops.linear.linear_op` (as :mod:`flax_minrnn.ops.gated`):

* forward mode (``jvp``, ``linearize``): a tangent loop over the stored states
  and pre-activations, one product per step (``dh_in_t @ U``), so the
  primal's steps do not run again (:func:`_tangent_loop`); second
  derivatives differentiate the loops with JAX;
* reverse mode: a hand-written backpropagation through time.  With ``lam_t``
  the cotangent of ``h_t`` (``g_t`` plus what flows back from step ``t + 1``)
  and ``k_t`` the gates' per-unit Jacobian at the stored ``p_t`` (computed a
  block of steps at a time, before the steps)::

      dp_t     = k_t (lam_t * h_in_t, lam_t)
      lam_{t-1} = g_{t-1} + lam_t * a_t + dp_t @ U^T      (0 across a reset)

  One product per step (``dp_t @ U^T``).  After the loop, over the whole
  sequence at once: the gates' pullback gives ``d(x @ kernel)`` and the
  gradient of ``params``, ``dU = sum_t h_in_t^T dp_t`` is one product, and
  ``dx``, ``dkernel`` are :func:`flax_minrnn.ops.linear.matmul`'s.

Every transformation composes: ``jit``, ``grad``, ``jvp``, second
derivatives, ``vmap``, ``jax.checkpoint``, ``shard_map`` and ``jax.export``
(plain HLO, no custom call).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.ops import checks
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.ops.linear import linear_op, matmul
from flax_minrnn.ops.scan import at_step

Array = jax.Array

__all__ = ["true_recurrence", "true_recurrence_with_readout"]

# Steps per loop iteration: XLA:CPU pays a fixed cost per iteration of a
# while loop, which a short unrolled block of steps amortises.
_UNROLL = 8


# ----------------------------------------------------------------------------
# The loop on prepared inputs: ``pre`` (B, T, n) and ``h0`` (B, d) in the
# accumulation dtype, ``u`` (d, n) in the compute dtype, ``bnd`` / ``valid``
# bool (B, T) or None (``bnd``: a document starts at a valid step, in scan
# order).


def _expand(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def _recurrent_product(h_in, u, dtype):
    """``h_in @ u`` accumulated in ``dtype`` (the state's)."""
    return jnp.dot(h_in.astype(u.dtype), u, preferred_element_type=dtype).astype(dtype)


def _step(coeff_fn, u, params, h, pre_t, bnd_t, valid_t):
    """One step: ``(h_t, p_t)`` from the carried state ``h``."""
    h_in = h if bnd_t is None else jnp.where(_expand(bnd_t, h), jnp.zeros((), h.dtype), h)
    p = pre_t + _recurrent_product(h_in, u, h.dtype)
    a, b = coeff_fn(p[:, None], params)
    h_new = at_step(a, 0).astype(h.dtype) * h_in + at_step(b, 0).astype(h.dtype)
    if valid_t is not None:
        h_new = jnp.where(_expand(valid_t, h), h_new, h)
    return h_new, p


def _slice(x, start, length):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, length, 1)


def _block_loop(seq_len: int, size: int, reverse: bool, backward: bool, load, run, carry):
    """``carry = run(carry, load(start, length), start, length)`` for every
    block of :func:`flax_minrnn.ops.scan.blocks`, in scan order (or, with
    ``backward``, in the opposite order).

    The blocks of the loop are software-pipelined: iteration ``i`` loads the
    inputs of block ``i + 1`` into the loop carry, so that the per-step code
    reads them with static slices.  (XLA:CPU does not vectorise an
    elementwise fusion that contains a dynamic slice; loaded this way, each
    block's inputs are one copy.)
    """
    num_full, rem, full_start, rem_start = scan_lib.blocks(seq_len, size, reverse)
    if backward and rem:  # the forward pass's last block comes first
        carry = run(carry, load(rem_start, rem), rem_start, rem)
    if num_full:
        order = (lambda i: num_full - 1 - i) if backward else (lambda i: i)

        def body(i, state):
            carry, inputs = state
            following = load(full_start(order(jnp.minimum(i + 1, num_full - 1))), size)
            return run(carry, inputs, full_start(order(i)), size), following

        carry, _ = jax.lax.fori_loop(0, num_full, body,
                                     (carry, load(full_start(order(0)), size)))
    if not backward and rem:
        carry = run(carry, load(rem_start, rem), rem_start, rem)
    return carry


def _forward(coeff_fn, reverse: bool, unroll: int, pre, u, params, h0, bnd, valid,
             keep_pre: bool):
    """``(h_last, h, p)``: every state (the carry after each step, invalid steps
    included) and, with ``keep_pre``, every total pre-activation ``p_t``
    (``None`` otherwise)."""
    batch, seq_len, _ = pre.shape
    size = scan_lib.block_size(seq_len, unroll)
    h_buf = jax.lax.full_like(h0, 0, h0.dtype, (batch, seq_len) + h0.shape[1:])

    def load(start, length):
        return tuple(_slice(v, start, length) for v in (pre, bnd, valid))

    def run(carry, inputs, start, length):
        h, h_buf, p_buf = carry
        pre_blk, bnd_blk, valid_blk = inputs
        hs, ps = [None] * length, [None] * length
        for i in (reversed(range(length)) if reverse else range(length)):
            h, ps[i] = _step(coeff_fn, u, params, h, at_step(pre_blk, i),
                             None if bnd_blk is None else at_step(bnd_blk, i),
                             None if valid_blk is None else at_step(valid_blk, i))
            hs[i] = h
        h_buf = jax.lax.dynamic_update_slice_in_dim(h_buf, jnp.stack(hs, 1), start, 1)
        if keep_pre:
            p_buf = jax.lax.dynamic_update_slice_in_dim(p_buf, jnp.stack(ps, 1), start, 1)
        return h, h_buf, p_buf

    return _block_loop(seq_len, size, reverse, False, load, run,
                       (h0, h_buf, jnp.zeros_like(pre) if keep_pre else None))


def _states_in(h, h0, bnd, reverse):
    """``h_in_t`` for every step: the state before it, zero across a reset."""
    h_in = scan_lib.states_before(h, h0, reverse)
    if bnd is not None:
        h_in = jnp.where(_expand(bnd, h_in), jnp.zeros((), h_in.dtype), h_in)
    return h_in


def _opaque_one(x):
    """The scalar 1 computed from ``x``: a value XLA cannot fold to a constant."""
    first = jax.lax.slice_in_dim(x.reshape(-1), 0, 1)
    return (jnp.where(jnp.isfinite(first), first, 0) * 0 + 1).reshape(())


def _unit_jacobian(coeff_fn, p, params, n_blocks: int, dtype):
    """``(a, jac_a, jac_b)`` of ``(a, b) = coeff_fn(p, params)`` for ``p`` of
    shape ``(B, L, n_blocks * d)``: ``jac_a[..., k, j] = da_j / dp_{k d + j}``
    (likewise ``jac_b``), each ``(B, L, n_blocks, d)``.

    One forward-mode derivative per block of ``p``, vectorised over the
    block's steps: ``coeff_fn`` acts on every state unit independently (unit
    ``j`` of ``a`` and ``b`` depends only on column ``j`` of each of the
    ``n_blocks`` blocks of ``p``), so the tangent that is one on block ``k``
    gives column ``k`` of every unit's Jacobian.
    """
    blocks = jnp.split(jnp.zeros_like(p), n_blocks, axis=-1)
    fun = lambda q: coeff_fn(q, params)
    jac_a, jac_b, a = [], [], None
    for k in range(n_blocks):
        tangent = jnp.concatenate([jnp.ones_like(b) if i == k else b
                                   for i, b in enumerate(blocks)], axis=-1)
        (a, _), (ta, tb) = jax.jvp(fun, (p,), (tangent,))
        jac_a.append(ta.astype(dtype))
        jac_b.append(tb.astype(dtype))
    return a.astype(dtype), jnp.stack(jac_a, axis=2), jnp.stack(jac_b, axis=2)


def _load_with_first(h, h0, reverse: bool, start, length, *arrays):
    """The slices ``[start, start + length)`` of ``h`` and ``arrays`` (``None``
    stays ``None``), and the state before the block's first step in scan
    order (``h0`` at the edge)."""
    seq_len = h.shape[1]
    if jax.export.is_symbolic_dim(start) or jax.export.is_symbolic_dim(seq_len):
        start = jnp.asarray(start, jnp.int32)
    if reverse:
        after = start + length
        first = jnp.where(after < seq_len, jax.lax.dynamic_index_in_dim(
            h, jnp.minimum(after, seq_len - 1), 1, False), h0)
    else:
        first = jnp.where(start > 0, jax.lax.dynamic_index_in_dim(
            h, jnp.maximum(start - 1, 0), 1, False), h0)
    return (_slice(h, start, length), first) + tuple(_slice(v, start, length) for v in arrays)


def _step_jacobian(coeff_fn, params, n_blocks: int, dtype, p_blk, h_in, bnd_blk, valid_blk):
    """``(k, keep)`` for a block of steps: ``h_t`` moves by
    ``keep_t * dh_in_t + sum_k k_t[k] * dp_t[k]`` when the state before the
    step moves by ``dh_in_t`` and the block ``k`` of ``p_t`` by ``dp_t[k]``
    (``keep = a``, 0 across a reset and 1 at an invalid step, where
    ``k = 0``)."""
    a, jac_a, jac_b = _unit_jacobian(coeff_fn, p_blk, params, n_blocks, dtype)
    k = jac_a * h_in[:, :, None] + jac_b
    keep = a
    if valid_blk is not None:
        k = jnp.where(_expand(valid_blk, k), k, jnp.zeros((), dtype))
        keep = jnp.where(_expand(valid_blk, a), a, jnp.ones((), dtype))
    if bnd_blk is not None:
        keep = jnp.where(_expand(bnd_blk, a), jnp.zeros((), dtype), keep)
    return k, keep


def _tangent_loop(coeff_fn, reverse: bool, unroll: int, u, params, h0, bnd, valid, h, p,
                  dpre, du, dparams, dh0):
    """Forward mode: ``(dh_last, dh)`` for the tangents of ``pre``, ``u``,
    ``params`` and ``h0``, from the stored states ``h`` and pre-activations
    ``p``.  At step ``t``, with ``dh_in_t`` the tangent of the state before
    it (0 across a reset)::

        dp_t = q_t + dh_in_t @ U,        q_t = dpre_t + h_in_t @ dU
        dh_t = keep_t * dh_in_t + sum_k k_t[k] * dp_t[k] + s_t

    (:func:`_step_jacobian`; ``s_t`` is the move of ``a_t h_in_t + b_t``
    with ``params``).  ``q`` and ``s`` are computed for the whole sequence
    at once, so a step costs one product, and the primal's steps do not run
    again.
    """
    batch, seq_len, n = p.shape
    dtype = h0.dtype
    size = scan_lib.block_size(seq_len, unroll)
    n_blocks = n // h0.shape[-1]
    one = _opaque_one(p)
    h_in = _states_in(h, h0, bnd, reverse)
    q = dpre.astype(dtype) + _recurrent_product(h_in, du, dtype)
    _, (da, db) = jax.jvp(lambda par: coeff_fn(p, par), (params,), (dparams,))
    s = da.astype(dtype) * h_in + db.astype(dtype)
    if valid is not None:
        s = jnp.where(_expand(valid, s), s, jnp.zeros((), dtype))

    def load(start, length):
        return tuple(_slice(v, start, length) for v in (h_in, p, q, s, bnd, valid))

    def run(carry, inputs, start, length):
        dh, dh_buf = carry
        h_in_blk, p_blk, q_blk, s_blk, bnd_blk, valid_blk = inputs
        k, keep = _step_jacobian(coeff_fn, params, n_blocks, dtype, p_blk, h_in_blk, bnd_blk,
                                 valid_blk)
        outs = [None] * length
        for i in (reversed(range(length)) if reverse else range(length)):
            dh_in = dh if bnd_blk is None else jnp.where(
                _expand(at_step(bnd_blk, i), dh), jnp.zeros((), dtype), dh)
            dp = (at_step(q_blk, i) + _recurrent_product(dh_in, u, dtype)).reshape(
                batch, n_blocks, -1)
            # Divided by a one that XLA cannot fold, as in _backward.
            dh = (at_step(keep, i) * dh_in + jnp.sum(at_step(k, i) * dp, axis=1)
                  + at_step(s_blk, i)) / one
            outs[i] = dh
        dh_buf = jax.lax.dynamic_update_slice_in_dim(dh_buf, jnp.stack(outs, 1), start, 1)
        return dh, dh_buf

    return _block_loop(seq_len, size, reverse, False, load, run,
                       (dh0.astype(dtype), jnp.zeros_like(h)))


def _backward(coeff_fn, reverse: bool, unroll: int, u, params, h0, bnd, valid, h, p,
              g, g_last):
    """The hand-written adjoint: ``(dpre, du, dparams, dh0)`` for the
    cotangents ``g`` of the states and ``g_last`` of the final state.

    The loop carries ``c``, the cotangent that flows into the state before a
    step from the steps after it; at step ``t`` (``lam_t = c + g_t``)::

        dp_t = k_t * lam_t                 (k_t: the gates' Jacobian, per unit)
        c    = keep_t * lam_t + dp_t @ U^T

    with ``keep_t = a_t`` (0 across a reset, 1 at an invalid step, where
    ``k_t = 0``).  The loop stores ``lam``; the gates' pullback then runs
    once over the whole sequence for ``dp`` and ``dparams``.
    """
    batch, seq_len, n = p.shape
    dtype = h0.dtype
    size = scan_lib.block_size(seq_len, unroll)
    n_blocks = n // h0.shape[-1]
    u_t = u.T
    one = _opaque_one(p)

    def load(start, length):
        return _load_with_first(h, h0, reverse, start, length, p, g, bnd, valid)

    def run(carry, inputs, start, length):
        c, lam_buf = carry
        h_blk, first, p_blk, g_blk, bnd_blk, valid_blk = inputs
        # Everything a step needs that does not depend on the cotangents, for
        # the whole block at once.
        k, keep = _step_jacobian(coeff_fn, params, n_blocks, dtype, p_blk,
                                 _states_in(h_blk, first, bnd_blk, reverse), bnd_blk,
                                 valid_blk)
        lams = [None] * length
        for i in (range(length) if reverse else reversed(range(length))):
            lam_t = c + at_step(g_blk, i)
            dp = (at_step(k, i) * lam_t[:, None]).reshape(batch, n)
            back = jnp.dot(dp.astype(u.dtype), u_t, preferred_element_type=dtype).astype(dtype)
            if bnd_blk is not None:
                back = jnp.where(_expand(at_step(bnd_blk, i), back), jnp.zeros((), dtype), back)
            # Divided by a one that XLA cannot fold: the carry is then
            # computed once per step (XLA would otherwise recompute the chain
            # of cheap steps in each of their consumers).
            c = (at_step(keep, i) * lam_t + back) / one
            lams[i] = lam_t
        lam_buf = jax.lax.dynamic_update_slice_in_dim(lam_buf, jnp.stack(lams, 1), start, 1)
        return c, lam_buf

    dh0, lam = _block_loop(seq_len, size, reverse, True, load, run,
                           (g_last, jnp.zeros_like(h)))
    h_in = _states_in(h, h0, bnd, reverse)
    da, db = lam * h_in, lam
    if valid is not None:
        da, db = (jnp.where(_expand(valid, v), v, jnp.zeros((), dtype)) for v in (da, db))
    (a_s, b_s), pullback = jax.vjp(coeff_fn, p, params)
    dp, dparams = pullback((da.astype(a_s.dtype), db.astype(b_s.dtype)))
    dp = dp.astype(p.dtype)
    du = jnp.einsum("btd,btn->dn", h_in.astype(u.dtype), dp.astype(u.dtype),
                    preferred_element_type=checks.accum_dtype(u.dtype)).astype(u.dtype)
    return dp, du, dparams, dh0


# ----------------------------------------------------------------------------
# The differentiable core.


def _outputs(coeff_fn, reverse, unroll, pre, u, params, h0, consts):
    h_last, h, _ = _forward(coeff_fn, reverse, unroll, pre, u, params, h0, *consts,
                            keep_pre=False)
    return h_last, h


def _tangent(static, res, lin):
    """Forward mode: the tangent loop (:func:`_tangent_loop`)."""
    coeff_fn, reverse, unroll = static
    _, u, params, h0, consts, h, p = res
    return _tangent_loop(coeff_fn, reverse, unroll, u, params, h0, *consts, h, p, *lin)


def _adjoint(static, res, ct):
    """Reverse mode: the hand-written backpropagation through time."""
    coeff_fn, reverse, unroll = static
    _, u, params, h0, consts, h, p = res
    g_last, g = ct
    return _backward(coeff_fn, reverse, unroll, u, params, h0, *consts, h, p, g, g_last)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _core(coeff_fn, reverse: bool, unroll: int, pre, u, params, h0, consts):
    return _outputs(coeff_fn, reverse, unroll, pre, u, params, h0, consts)


@_core.defjvp
def _core_jvp(coeff_fn, reverse, unroll, primals, tangents):
    pre, u, params, h0, consts = primals
    dpre, du, dparams, dh0, _ = tangents
    h_last, h, p = _forward(coeff_fn, reverse, unroll, pre, u, params, h0, *consts,
                            keep_pre=True)
    static = (coeff_fn, reverse, unroll)
    tangent = linear_op(functools.partial(_tangent, static),
                        functools.partial(_adjoint, static),
                        (pre, u, params, h0, consts, h, p), (dpre, du, dparams, dh0))
    return (h_last, h), tangent


# ----------------------------------------------------------------------------
# The public functions.


def _run(coeff_fn, x, h0, recurrent_kernel, kernel, params, n_side, reset, seq_lengths,
         mask, reverse):
    """Validates the arguments; returns ``(h_last, h, side, valid)``: ``h``
    the states (zero at invalid steps), ``side`` the side columns of ``p``
    (``None`` without)."""
    checks.check_float("x", x)
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must have shape (batch, time, features), got {np.shape(x)}")
    batch, seq_len, d_x = x.shape
    if seq_len < 1:
        raise ValueError("the time axis (axis 1) of x must be non-empty")
    if kernel is not None:
        checks.check_float("kernel", kernel)
        if kernel.ndim != 2 or kernel.shape[0] != d_x:
            raise ValueError(f"kernel must have shape (d_in, n) with d_in = {d_x} (the last "
                             f"axis of x), got {tuple(kernel.shape)}")
    n = d_x if kernel is None else kernel.shape[1]
    if isinstance(n_side, bool) or not isinstance(n_side, (int, np.integer)):
        raise TypeError(f"side_features must be an int, got {n_side!r}")
    if not 0 <= n_side <= n - 1:
        raise ValueError(f"side_features must be in [0, n - 1] with n = {n} (the width of "
                         f"the pre-activations), got {n_side}")
    n_rec = n - n_side
    checks.check_float("recurrent_kernel", recurrent_kernel)
    if recurrent_kernel.ndim != 2 or recurrent_kernel.shape[1] != n:
        raise ValueError(f"recurrent_kernel must have shape (d_h, n) with n = {n} (the "
                         f"width of the pre-activations), got {tuple(recurrent_kernel.shape)}")
    d_h = recurrent_kernel.shape[0]
    if n_rec % d_h:
        raise ValueError(
            f"the pre-activations that coeff_fn sees ({n_rec} columns) must be whole "
            f"blocks of d_h = {d_h} (recurrent_kernel.shape[0]) columns")
    c_dtype = jnp.result_type(x, recurrent_kernel, *(() if kernel is None else (kernel,)))
    dtype = checks.accum_dtype(c_dtype)
    a_s, b_s = jax.eval_shape(coeff_fn, jax.ShapeDtypeStruct((batch, 1, n_rec), dtype), params)
    checks.check_real_outputs("coeff_fn", a_s, b_s)
    if a_s.shape != (batch, 1, d_h) or b_s.shape != (batch, 1, d_h):
        raise ValueError(
            "coeff_fn must return (a, b) of shape (batch, steps, d_h) with d_h = "
            f"{d_h} (recurrent_kernel.shape[0]); on a one-step slice it gave "
            f"{tuple(a_s.shape)} and {tuple(b_s.shape)}")
    h0 = checks.check_state("h0", h0, (batch, d_h))
    dtype = checks.accum_dtype(dtype, a_s.dtype, b_s.dtype,
                               *(() if h0 is None else (h0.dtype,)))
    valid = checks.valid_mask(batch, seq_len, seq_lengths, mask)
    if reset is not None:
        reset = checks.check_bool_bt("reset", reset, batch, seq_len)
    h0 = (jax.lax.full_like(x, 0, dtype, (batch, d_h)) if h0 is None else h0.astype(dtype))
    if batch == 0:
        zeros = jnp.zeros((0, seq_len, d_h), dtype)
        return jnp.zeros((0, d_h), dtype), zeros, (
            None if not n_side else jnp.zeros((0, seq_len, n_side), dtype)), valid
    x, kernel, recurrent_kernel, params, h0 = checks.same_varying(
        x, kernel, recurrent_kernel, params, h0)
    pre = x.astype(c_dtype) if kernel is None else matmul(x.astype(c_dtype),
                                                          kernel.astype(c_dtype))
    u = recurrent_kernel.astype(c_dtype)
    side = None
    if n_side:
        pre, side = jnp.split(pre, [n_rec], axis=-1)
        u, u_side = jnp.split(u, [n_rec], axis=-1)
    bnd = None
    if reset is not None:
        bnd = scan_lib.reset_boundaries(reset, reverse, valid)
    h_last, h = _core(coeff_fn, bool(reverse), _UNROLL, pre.astype(dtype), u, params, h0,
                      (bnd, valid))
    if n_side:
        # The side columns see the state before each step too (zero at
        # invalid steps): one product over the whole sequence.
        h_in = scan_lib.zero_invalid(_states_in(h, h0, bnd, reverse), valid)
        side = side.astype(dtype) + matmul(h_in.astype(c_dtype), u_side).astype(dtype)
    return h_last, scan_lib.zero_invalid(h, valid), side, valid


def true_recurrence(
    coeff_fn: Callable[[Array, Any], Tuple[Array, Array]],
    x: Array,
    h0: Optional[Array] = None,
    *,
    recurrent_kernel: Array,
    kernel: Optional[Array] = None,
    params: Any = None,
    reset: Optional[Array] = None,
    seq_lengths: Optional[Array] = None,
    mask: Optional[Array] = None,
    reverse: bool = False,
) -> Tuple[Array, Array]:
    """The recurrence ``h_t = a_t * h_{t-1} + b_t`` with gates that see ``h_{t-1}``.

    ::

        p_t        = x_t @ kernel + h_in_t @ recurrent_kernel
        (a_t, b_t) = coeff_fn(p_t, params)
        h_t        = a_t * h_in_t + b_t

    where ``h_in_t`` is ``h_{t-1}`` (``h0`` before the first step), or zero
    where ``reset`` starts a document.  Usage::

        h_last, h = true_recurrence(coeff_fn, x, recurrent_kernel=u, kernel=w)
        # decoding: one step at a time, the same function
        h1, y1 = true_recurrence(coeff_fn, x[:, :1], recurrent_kernel=u, kernel=w)
        h2, y2 = true_recurrence(coeff_fn, x[:, 1:2], h1, recurrent_kernel=u, kernel=w)

    Args:
      coeff_fn: ``(p_slice, params) -> (a, b)``: ``p_slice`` is float32
        (float64 for float64 inputs) ``(batch, steps, n)``, and ``a``, ``b``
        are ``(batch, steps, d_h)``; it must act on every step and every
        state unit independently (see the module docstring), and ``n`` must
        be a multiple of ``d_h``.  Everything traced it uses must come in
        through ``params``.
      x: float ``(batch, time, d_in)``; with ``kernel=None`` the
        pre-activations themselves (``d_in = n``).
      h0: initial state ``(batch, d_h)``; ``None`` means zeros.
      recurrent_kernel: ``U``, float ``(d_h, n)``.
      kernel: optional float ``(d_in, n)`` input projection.
      params: a pytree of arrays passed to every call of ``coeff_fn``.
      reset, seq_lengths, mask, reverse: as
        :func:`~flax_minrnn.ops.scan.linear_scan` (invalid steps keep the
        state and output zeros; a reset zeroes the state the gates see too).

    Returns:
      ``(h_last, h)``: the final state ``(batch, d_h)`` and every state
      ``(batch, time, d_h)`` (zeros at invalid steps), in the accumulation
      dtype (float32, or float64 for float64 inputs).  The products run in
      the promoted dtype of ``x``, ``kernel`` and ``recurrent_kernel``.

    Raises:
      TypeError / ValueError: non-floating arrays, shapes that do not fit
        (naming the argument), as :func:`~flax_minrnn.ops.scan.linear_scan`
        for ``reset`` / ``seq_lengths`` / ``mask``.
    """
    h_last, h, _, _ = _run(coeff_fn, x, h0, recurrent_kernel, kernel, params, 0, reset,
                           seq_lengths, mask, reverse)
    return h_last, h


def true_recurrence_with_readout(
    coeff_fn: Callable[[Array, Any], Tuple[Array, Array]],
    readout_fn: Callable[[Array, Optional[Array], Any], Array],
    x: Array,
    h0: Optional[Array] = None,
    *,
    recurrent_kernel: Array,
    kernel: Optional[Array] = None,
    side_features: int = 0,
    params: Any = None,
    reset: Optional[Array] = None,
    seq_lengths: Optional[Array] = None,
    mask: Optional[Array] = None,
    reverse: bool = False,
) -> Tuple[Array, Array]:
    """:func:`true_recurrence` followed by a per-step readout of the states.

    With ``n`` the width of ``p`` and ``k = side_features``, ``coeff_fn``
    sees the first ``n - k`` columns of ``p_t`` and the readout the last
    ``k``, ``s_t`` (which see ``h_in_t`` through ``recurrent_kernel`` too)::

        y_t = readout_fn(h_t, s_t, params)          (s_t = None when k = 0)

    At invalid steps the readout gets a zero state and the side columns of a
    zero state.  The readout is recomputed in the backward pass (only the
    states and the side columns are kept for it).

    Args:
      readout_fn: ``(h, s, params) -> y`` on ``(batch, steps, ...)`` slices;
        ``h`` and ``s`` in the accumulation dtype.
      side_features: ``k``, an int in ``[0, n - 1]``.
      coeff_fn, x, h0, recurrent_kernel, kernel, params, reset, seq_lengths,
        mask, reverse: as :func:`true_recurrence`.

    Returns:
      ``(h_last, y)``.
    """
    if not callable(readout_fn):
        raise TypeError(f"readout_fn must be callable, got {readout_fn!r}")
    h_last, h, side, _ = _run(coeff_fn, x, h0, recurrent_kernel, kernel, params,
                              side_features, reset, seq_lengths, mask, reverse)
    return h_last, jax.checkpoint(readout_fn)(h, side, params)
