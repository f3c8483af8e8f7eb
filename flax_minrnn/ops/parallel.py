"""The sequence-parallel linear scan: the time axis split over a mesh axis.

:func:`sequence_parallel_scan` has the contract of
:func:`flax_minrnn.ops.scan.linear_scan` (same arguments, validation and
``(h_last, h)``), with the time axis of ``h_t = a_t * h_{t-1} + b_t`` split
over the devices of one mesh axis by :func:`jax.shard_map`.  The layers use it
when their ``sequence_axis`` field names a mesh axis: they read the mesh of
the context (``jax.sharding.get_abstract_mesh()``, set by
``with jax.set_mesh(mesh):``).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from flax_minrnn.ops import checks
from flax_minrnn.ops import scan as scan_lib

Array = jax.Array

__all__ = ["sequence_parallel_scan"]


def _context_mesh(axis_name: str, mesh) -> Any:
    """The mesh to shard over: ``mesh`` or the context's; checks the axis."""
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(
            f"axis_name must be a non-empty mesh axis name, got {axis_name!r}")
    found = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    names = tuple(getattr(found, "axis_names", ()))
    if axis_name not in names:
        where = "the mesh passed" if mesh is not None else (
            "the current mesh (set one with `with jax.set_mesh(mesh):`)")
        raise ValueError(
            f"sequence axis {axis_name!r} is not an axis of {where}; its axes "
            f"are {names}")
    types = dict(zip(names, getattr(found, "axis_types", ())))
    if types.get(axis_name) == AxisType.Manual:
        raise ValueError(
            f"sequence_parallel_scan was called inside a shard_map that is "
            f"already manual over {axis_name!r}; call it on the global arrays")
    return found


def _local_scan(a, b, h0, mask, *, axis_name: str, impl, reverse: bool):
    """Per-shard body of :func:`sequence_parallel_scan` (inside shard_map).

    ``a`` already carries the resets (``a = 0`` at document boundaries).
    Returns the replicated final state and this shard's states.
    """
    feat = (None,) * (a.ndim - 2)
    # Local pass from a zero state and the cumulative product of a: one
    # linear_scan over the two problems stacked on the batch axis.  The
    # initial states derive from `a` so that they vary over the axis like it.
    zero = jnp.zeros_like(scan_lib.at_step(a, 0))
    one = jnp.ones_like(zero)
    stacked_mask = None if mask is None else jnp.concatenate([mask, mask], 0)
    ends, states = scan_lib.linear_scan(
        jnp.concatenate([a, a], 0), jnp.concatenate([b, jnp.zeros_like(b)], 0),
        jnp.concatenate([zero, one], 0), impl=impl, mask=stacked_mask,
        reverse=reverse)
    h_local, a_cum = jnp.split(states, 2, axis=0)
    h_end, a_prod = jnp.split(ends, 2, axis=0)

    # Every shard's (A_k, H_k) on every shard: a psum of one-hot slots, so
    # the summaries (and what is computed from them) are replicated.
    n = jax.lax.axis_size(axis_name)
    k = jax.lax.axis_index(axis_name)
    slot = (jnp.arange(n) == k)[(None, slice(None)) + feat]
    zero_s = jnp.zeros((), a.dtype)
    s_prod, s_end = jax.lax.psum(  # one all-reduce of both summaries
        tuple(jnp.where(slot, x[:, None], zero_s) for x in (a_prod, h_end)), axis_name)

    # Cross-shard combine: s_k = A_k s_{k-1} + H_k (n steps, same recurrence).
    _, s = scan_lib.linear_scan(s_prod, s_end, h0, impl=scan_lib.ScanImpl.SEQUENTIAL,
                                reverse=reverse)
    before, h_last = scan_lib.states_before(s, h0, reverse), scan_lib.last_state(s, reverse)
    h_init = jax.lax.dynamic_index_in_dim(before, k, axis=1, keepdims=False)
    # Local correction; a_cum and h_local are zero at masked steps.
    return h_last, h_local + a_cum * h_init[(slice(None), None) + (slice(None),) * len(feat)]


def sequence_parallel_scan(
    a: Array,
    b: Array,
    h0: Optional[Array] = None,
    *,
    axis_name: str,
    impl: Union[str, scan_lib.ScanImpl] = scan_lib.ScanImpl.AUTO,
    reset: Optional[Array] = None,
    seq_lengths: Optional[Array] = None,
    mask: Optional[Array] = None,
    reverse: bool = False,
    mesh: Optional[Mesh] = None,
) -> Tuple[Array, Array]:
    """:func:`~flax_minrnn.ops.scan.linear_scan` with the time axis split over a mesh axis.

    Same arguments, validation and return value ``(h_last, h)`` as
    :func:`flax_minrnn.ops.scan.linear_scan` (``h_last`` is the true final state,
    replicated over ``axis_name``; ``h`` is split along time).  Call it on
    the global arrays, under ``jax.set_mesh(mesh)`` or with ``mesh``; other
    mesh axes (a data axis splitting the batch) stay automatic.

    With ``n`` shards of ``L = T / n`` steps, shard ``k`` holding steps
    ``kL .. kL + L - 1`` (forward direction):

    1. Local pass, from a zero state, and the cumulative product of ``a``::

           u_t = a_t u_{t-1} + b_t,   u_{kL-1} = 0      H_k = u_{kL+L-1}
           p_t = a_t p_{t-1},         p_{kL-1} = 1      A_k = p_{kL+L-1}

       both with :func:`~flax_minrnn.ops.scan.linear_scan` (``p`` is the scan
       with ``b = 0`` and ``h0 = 1``).  Products may underflow to 0: they are
       only ever multiplied, never logged.
    2. Cross-shard combine of the ``n`` summaries ``(A_k, H_k)``, the same
       recurrence over shards::

           s_{-1} = h0,   s_k = A_k s_{k-1} + H_k

       so shard ``k`` starts from ``s_{k-1}`` and ``h_last = s_{n-1}``.
       Every shard computes it from the psum of the summaries (``n`` tiny
       ``(batch, *features)`` slots).
    3. Local correction: ``h_t = u_t + p_t s_{k-1}``.

    With ``reverse=True`` the shards are visited ``n-1 .. 0``:
    ``s_n = h0``, ``s_k = A_k s_{k+1} + H_k``, shard ``k`` starts from
    ``s_{k+1}`` and ``h_last = s_0``.  Resets set ``a = 0`` at document
    boundaries before the split (in reverse mode the boundary of a document
    starting at the first step of shard ``k+1`` lies at the last step of
    shard ``k``), and invalid steps (``seq_lengths`` / ``mask``) get
    ``a = 1, b = 0`` and zero outputs, so both cross shard boundaries
    correctly.  Gradients are JAX autodiff of the shard_map around
    ``linear_scan``'s own backward pass.

    Args:
      a, b, h0, impl, reset, seq_lengths, mask, reverse: as
        :func:`flax_minrnn.ops.scan.linear_scan` (``impl="auto"`` is resolved
        for the per-shard length ``L``).
      axis_name: the mesh axis the time axis is split over.
      mesh: the mesh; ``None`` means the context mesh
        (``jax.sharding.get_abstract_mesh()``).

    Returns:
      ``(h_last, h)`` as :func:`~flax_minrnn.ops.scan.linear_scan`.

    Raises:
      ValueError: everything :func:`~flax_minrnn.ops.scan.linear_scan` raises;
        ``axis_name`` not in the mesh; a time length not divisible by the
        axis size (the message names both).
      TypeError: as :func:`~flax_minrnn.ops.scan.linear_scan`.
    """
    found = _context_mesh(axis_name, mesh)
    # Validation with linear_scan's own checks and messages (abstract: only
    # traced, never run).
    out = jax.eval_shape(lambda: scan_lib.linear_scan(
        a, b, h0, impl=impl, reset=reset, seq_lengths=seq_lengths, mask=mask,
        reverse=reverse))
    dtype = out[0].dtype
    batch, seq_len = a.shape[:2]
    n = dict(zip(found.axis_names, found.axis_sizes))[axis_name]
    if seq_len % n:
        raise ValueError(
            f"the time axis (length {seq_len}) must be divisible by the {n} "
            f"devices of mesh axis {axis_name!r}")
    local_impl = scan_lib.resolve_impl(impl, seq_len // n)

    a = a.astype(dtype)
    b = b.astype(dtype)
    h0 = jnp.zeros(out[0].shape, dtype) if h0 is None else h0.astype(dtype)
    expand = (slice(None), slice(None)) + (None,) * (a.ndim - 2)
    if seq_lengths is not None:
        mask = checks.lengths_to_mask(jnp.asarray(seq_lengths), seq_len)
    if reset is not None:  # On the whole sequence: a boundary may move across shards.
        boundary = scan_lib.reset_boundaries(jnp.asarray(reset), reverse,
                                             None if mask is None else jnp.asarray(mask))
        a = jnp.where(boundary[expand], jnp.zeros((), dtype), a)
    args, specs = [a, b, h0], [P(None, axis_name), P(None, axis_name), P()]
    if mask is not None:
        args.append(jnp.asarray(mask))
        specs.append(P(None, axis_name))

    def body(a, b, h0, mask=None):
        return _local_scan(a, b, h0, mask, axis_name=axis_name, impl=local_impl,
                           reverse=bool(reverse))

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs),
                         out_specs=(P(), P(None, axis_name)),
                         axis_names={axis_name})(*args)

