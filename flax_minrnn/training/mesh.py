"""Multi-device training: meshes, sharding rules and several hosts.

Everything here is JAX's own SPMD machinery: a :class:`jax.sharding.Mesh` of
devices with named axes, :class:`~jax.sharding.NamedSharding` to place
arrays on it, and :func:`jax.distributed.initialize` for several hosts.  The
one place where per-device code is written by hand, the sequence-parallel
scan, is :func:`flax_minrnn.ops.parallel.sequence_parallel_scan`.

Two pieces:

* **Meshes** (:func:`make_mesh`, :func:`plan_from_config`): a mesh built from
  a shape and axis names, validated against the devices there are; errors
  name the numbers.  Mesh axes are ``AxisType.Auto``: code outside
  ``shard_map`` is written for the global arrays and XLA partitions it.
* **Sharding rules** (:class:`MeshPlan`): the batch ``(batch, time)`` is
  split over the data axis (and the time axis over the sequence axis, when
  there is one); parameters and optimizer state are replicated, or, with
  ``fsdp=True``, every leaf is split along one dimension over the data axis
  (:func:`fsdp_spec`: its largest dimension divisible by the axis size; a
  leaf without one is replicated).
How a layer with a ``sequence_axis`` finds the mesh: a layer with ``sequence_axis="seq"`` reads the
mesh of the context, ``jax.sharding.get_abstract_mesh()``, i.e. the one set
by ``with jax.set_mesh(mesh):`` around the (jitted) call; without such a
context, or when the mesh has no axis ``"seq"``, it raises ``ValueError``.
The trainer sets the context itself (:meth:`MeshPlan.wrap`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


Array = jax.Array

__all__ = ["make_mesh", "fsdp_spec",
           "MeshPlan", "plan_from_config", "initialize_distributed"]


# ----------------------------------------------------------------------------
# The sequence-parallel scan.


# ----------------------------------------------------------------------------
# Meshes.


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], *,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh of ``prod(shape)`` devices with named ``AxisType.Auto`` axes.

    Args:
      shape: devices per axis; one entry may be ``-1``: the remaining
        devices (``jax.device_count()`` divided by the others).
      axis_names: one distinct non-empty name per axis.
      devices: the devices to use (default ``jax.devices()``, all processes);
        the mesh takes the first ``prod(shape)`` of them.

    Raises:
      ValueError: names and sizes that do not match, non-positive sizes,
        more than one ``-1``, or a mesh larger than the device count (the
        message names both numbers).
    """
    shape, names = tuple(shape), tuple(axis_names)
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(names) or not shape:
        raise ValueError(
            f"mesh.shape {shape} and mesh.axis_names {names} must be non-empty "
            "and of the same length (one size per axis name)")
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"mesh.axis_names must be distinct non-empty strings, got {names}")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
           or (s < 1 and s != -1) for s in shape) or shape.count(-1) > 1:
        raise ValueError(
            f"mesh.shape must hold positive sizes and at most one -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(
                f"mesh.shape {shape}: the {len(devices)} devices are not "
                f"divisible by the product {known} of the other axes")
        shape = tuple(len(devices) // known if s == -1 else int(s) for s in shape)
    needed = math.prod(shape)
    if needed > len(devices):
        raise ValueError(
            f"mesh.shape {shape} needs {needed} devices but only {len(devices)} "
            "are available (jax.device_count())")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices[:needed])


def fsdp_spec(shape: Sequence[int], axis_name: str, axis_size: int) -> P:
    """FSDP rule: split the largest dimension divisible by ``axis_size``.

    Ties go to the first such dimension; a leaf without one (a scalar, a
    bias of odd width) is replicated, ``P()``.
    """
    best = None
    for i, size in enumerate(shape):
        if size >= axis_size and size % axis_size == 0 and (
                best is None or size > shape[best]):
            best = i
    if best is None:
        return P()
    return P(*([None] * best + [axis_name]))


def _axis_size(mesh: Mesh, name: Optional[str]) -> int:
    return 1 if name is None else dict(zip(mesh.axis_names, mesh.axis_sizes))[name]


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """Where the trainer puts its arrays on a mesh.

    Attributes:
      mesh: the device mesh.
      data_axis: mesh axis the batch is split over (``None``: replicated).
      sequence_axis: mesh axis the time axis is split over; the model's
        layers then run :func:`sequence_parallel_scan` over it.
      fsdp: split parameters and optimizer state over ``data_axis``
        (:func:`fsdp_spec`); otherwise they are replicated.
    """

    mesh: Mesh
    data_axis: Optional[str] = None
    sequence_axis: Optional[str] = None
    fsdp: bool = False

    def __post_init__(self):
        names = tuple(self.mesh.axis_names)
        for key, axis in (("mesh.data_axis", self.data_axis),
                          ("mesh.sequence_axis", self.sequence_axis)):
            if axis is not None and axis not in names:
                raise ValueError(f"{key}={axis!r} is not one of mesh.axis_names {names}")
        if self.data_axis is not None and self.data_axis == self.sequence_axis:
            raise ValueError(
                f"mesh.data_axis and mesh.sequence_axis must differ, both are "
                f"{self.data_axis!r}")
        if self.fsdp and self.data_axis is None:
            raise ValueError("mesh.fsdp=True needs a mesh.data_axis to shard over")

    # -- shardings ----------------------------------------------------------

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def batch_spec(self, ndim: int = 2) -> P:
        """``(batch, time, ...)`` split over ``(data_axis, sequence_axis)``."""
        spec = [self.data_axis, self.sequence_axis][:ndim]
        return P(*(spec + [None] * (ndim - len(spec))))

    def state_spec(self, shape: Sequence[int]) -> P:
        """Parameters / optimizer state: :func:`fsdp_spec` or replicated."""
        if not self.fsdp:
            return P()
        return fsdp_spec(shape, self.data_axis, _axis_size(self.mesh, self.data_axis))

    def state_shardings(self, tree):
        """A ``NamedSharding`` for every array leaf of ``tree`` (params, opt state)."""
        return jax.tree.map(lambda x: self.sharding(self.state_spec(np.shape(x))), tree)

    # -- placement ----------------------------------------------------------

    def check_batch(self, batch_size: int, seq_len: int, *,
                    what: str = "data.batch_size", length_from: str = "data.seq_len") -> None:
        """Raises ``ValueError`` (naming the numbers) unless the mesh divides the batch."""
        n_data = _axis_size(self.mesh, self.data_axis)
        if batch_size % n_data:
            raise ValueError(
                f"{what}={batch_size} is not divisible by the {n_data} devices "
                f"of mesh axis {self.data_axis!r} (mesh.data_axis)")
        n_seq = _axis_size(self.mesh, self.sequence_axis)
        if seq_len % n_seq:
            raise ValueError(
                f"the sequence length {seq_len} ({length_from}) is not divisible "
                f"by the {n_seq} devices of mesh axis {self.sequence_axis!r} "
                "(mesh.sequence_axis)")

    def put(self, x, spec: P) -> Array:
        """A global array with sharding ``spec`` from a host value.

        Every process holds the same full value (batches are a pure function
        of ``(seed, step)``, parameters of the seed) and places the slices
        its own devices hold, so this works on one host and on several.
        """
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, self.sharding(spec),
                                            lambda index: host[index])

    def replicate(self, x) -> Array:
        """``x`` on every device of the mesh (a global, replicated array)."""
        return self.put(x, P())

    def put_batch(self, batch: Mapping[str, Any]) -> dict:
        """Places a batch dict (``(batch, time, ...)`` arrays) on the mesh."""
        out = {}
        for key, value in batch.items():
            shape = np.shape(value)
            if len(shape) >= 2:
                self.check_batch(shape[0], shape[1], what=f"batch[{key!r}].shape[0]",
                                 length_from=f"batch[{key!r}].shape[1]")
            out[key] = self.put(value, self.batch_spec(len(shape)))
        return out

    def put_state(self, tree):
        """Places params / optimizer state (by :meth:`state_spec`)."""
        return jax.tree.map(lambda x: self.put(x, self.state_spec(np.shape(x))), tree)

    def constrain_state(self, tree):
        """``with_sharding_constraint`` to :meth:`state_spec` (inside jit)."""
        return jax.lax.with_sharding_constraint(tree, self.state_shardings(tree))

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` called under ``jax.set_mesh(self.mesh)`` (the layers' mesh)."""

        @functools.wraps(fn)
        def on_mesh(*args, **kwargs):
            with jax.set_mesh(self.mesh):
                return fn(*args, **kwargs)

        return on_mesh


def plan_from_config(mesh_config, *, devices: Optional[Sequence[Any]] = None
                     ) -> Optional[MeshPlan]:
    """The :class:`MeshPlan` of a config's ``mesh`` section (``None``: no mesh).

    Keys: ``shape`` (``()``: one device, the default, no mesh at all),
    ``axis_names``, ``data_axis``, ``sequence_axis`` (``''``: none) and
    ``fsdp``; see the README's "Multi-device" section.

    Raises:
      ValueError: an invalid mesh (see :func:`make_mesh`, :class:`MeshPlan`).
    """
    if not tuple(mesh_config.shape):
        if tuple(mesh_config.axis_names):
            raise ValueError(
                f"mesh.axis_names={tuple(mesh_config.axis_names)} without a "
                "mesh.shape; set both (or neither, for one device)")
        if mesh_config.fsdp or mesh_config.sequence_axis:
            raise ValueError(
                "mesh.fsdp and mesh.sequence_axis need a mesh (mesh.shape and "
                "mesh.axis_names)")
        return None
    mesh = make_mesh(mesh_config.shape, mesh_config.axis_names, devices=devices)
    return MeshPlan(mesh, data_axis=mesh_config.data_axis or None,
                    sequence_axis=mesh_config.sequence_axis or None,
                    fsdp=bool(mesh_config.fsdp))


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """:func:`jax.distributed.initialize` for a run on several hosts.

    Call it once per process, before any other JAX call.  All three
    arguments ``None`` lets JAX detect a Slurm / Open MPI / TPU cluster;
    otherwise give all three (``process_id`` in ``[0, num_processes)``).

    Raises:
      ValueError: some but not all arguments, or a ``process_id`` out of range.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "give all of coordinator_address, num_processes and process_id, "
            f"or none (auto-detection); got {coordinator_address!r}, "
            f"{num_processes!r}, {process_id!r}")
    if all(given) and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise ValueError(
            f"process_id={process_id} must lie in [0, num_processes={num_processes})")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as e:
        if any(given):
            raise
        raise ValueError(
            f"auto-detection found no cluster (Slurm, Open MPI or TPU) to join ({e}); give "
            "coordinator_address, num_processes and process_id (the CLI's "
            "--coordinator-address, --num-processes and --process-id)") from e
