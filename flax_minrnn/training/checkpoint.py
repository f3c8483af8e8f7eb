"""Atomic, bit-exact checkpoints of training state (the only orbax user).

Layout of a checkpoint directory (orbax-checkpoint 0.12 ``CheckpointManager``)::

    <directory>/<step>/state/      the state pytree (params, opt_state, rng...)
    <directory>/<step>/metadata/   JSON: resolved config, data position, ...
    <directory>/<step>/metrics/    JSON metrics (only with ``keep_best``)
    <directory>/<step>.orbax-checkpoint-tmp/   an interrupted save (ignored)

Atomicity: on a local filesystem orbax writes a step into
``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only after every
file is written (``AtomicRenameTemporaryPath``). Step discovery only matches
plain integer names, so a process killed mid-save leaves an ignored tmp dir
(replaced when that step is saved again). Old steps are deleted only after the
new one is committed. :meth:`Checkpointer.save` returns after the commit.

Retention: ``AnyPreservationPolicy([LatestN(max_to_keep), BestN(n=1)])``: the
last ``max_to_keep`` steps plus the best one by ``metrics[best_metric]``, all
in the same directory. Nothing is deleted because it cannot be read: a corrupt
step raises :class:`CheckpointCorruptError`, which names older candidates.
"""

import json
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO chatter and its 'no metrics given' warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        message = record.getMessage()
        return (record.levelno >= logging.WARNING
                and "did not provide metrics" not in message
                and "directory is read only" not in message)


class _QuietTensorstoreTasks(logging.Filter):
    """Drops asyncio's 'never retrieved' dumps of tensorstore read errors.

    Reading a corrupt step fails many concurrent reads; orbax reports the
    first (wrapped in CheckpointCorruptError) and asyncio would log every
    other one with a full tensorstore spec.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved")
                    and "tensorstore" in message)


logging.getLogger("absl").addFilter(_QuietOrbax())
logging.getLogger("asyncio").addFilter(_QuietTensorstoreTasks())


class CheckpointCorruptError(ValueError):
    """A committed checkpoint exists on disk but cannot be read.

    Attributes:
        step: The unreadable step (None if unknown).
        path: Its directory.
        older_steps: Older steps whose metadata reads fine (fall-back
            candidates for an explicit ``restore(step=...)``).
    """

    def __init__(self, message: str, step: int | None = None,
                 path: str = "", older_steps: Sequence[int] = ()):
        super().__init__(message)
        self.step, self.path, self.older_steps = step, path, list(older_steps)


def _cause(err: Exception) -> str:
    """First line of an exception, for error messages."""
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:300]}"


def _keystr(path) -> str:
    """'a/0/mu' for a jax key path (dict keys, attribute names, indices)."""
    return "/".join(
        str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
        for k in path)


def _sharding(meta) -> jax.sharding.Sharding:
    """The saved sharding if it exists on this host, else device 0."""
    try:
        return meta.sharding.to_jax_sharding()
    except Exception:  # pylint: disable=broad-except
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _is_key(leaf) -> bool:
    """Whether ``leaf`` is a typed PRNG key array (``jax.random.key``)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype,
                                                        jax.dtypes.prng_key)


def _abstract_leaf(leaf, meta):
    """The restore target of one leaf (``None``: rebuilt from ``meta``).

    Dtypes and leaf kinds always come from the checkpoint (a Python int stays
    an int, a numpy int64 stays int64 even if ``jax.eval_shape`` made the
    target int32); the target contributes structure and jax shardings.
    """
    if _is_key(leaf):
        return leaf  # Typed PRNG keys: orbax restores them from the target.
    if isinstance(meta, ocp.metadata.StringMetadata):
        return ""
    if isinstance(meta, ocp.metadata.ScalarMetadata):  # A Python scalar.
        return np.zeros((), meta.dtype).item()
    if isinstance(meta, ocp.metadata.ArrayMetadata):
        if meta.sharding is None:  # Saved from numpy: restore as numpy.
            return jax.ShapeDtypeStruct(meta.shape, meta.dtype)
        return jax.ShapeDtypeStruct(
            meta.shape, meta.dtype,
            sharding=getattr(leaf, "sharding", None) or _sharding(meta))
    return meta if leaf is None else leaf


def _match(target, saved, where: str):
    """Checks ``target`` against the saved metadata tree; returns the item."""
    if target is None:
        return jax.tree.map(lambda m: _abstract_leaf(None, m), saved)
    saved_flat = {_keystr(p): m
                  for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    keys = [_keystr(p) for p, _ in leaves]
    missing = [k for k in keys if k not in saved_flat]
    extra = sorted(set(saved_flat) - set(keys))
    shapes = [f"{k}: {tuple(np.shape(x))} vs saved {tuple(saved_flat[k].shape)}"
              for k, (_, x) in zip(keys, leaves)
              if k in saved_flat and hasattr(saved_flat[k], "shape")
              and not _is_key(x)
              and tuple(np.shape(x)) != tuple(saved_flat[k].shape)]
    if missing or extra or shapes:
        raise ValueError(
            f"{where} does not match the restore target: not in checkpoint: "
            f"{missing[:8]}; not in target: {extra[:8]}; shapes: {shapes[:8]}")
    return jax.tree_util.tree_unflatten(
        treedef, [_abstract_leaf(x, saved_flat[k])
                  for k, (_, x) in zip(keys, leaves)])


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints plus the best one.

    Args:
        directory: Checkpoint directory (created unless ``read_only``).
        max_to_keep: Number of most recent steps kept; None keeps all.
        keep_best: Also keep the step with the best ``metrics[best_metric]``.
        best_metric: Metric name used to rank steps.
        best_mode: 'min' or 'max'. NaN metrics rank worst.
        read_only: Never create, write or delete anything.
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3,
                 keep_best: bool = True, best_metric: str = "eval_loss",
                 best_mode: str = "min", read_only: bool = False):
        if best_mode not in ("min", "max"):
            raise ValueError(
                f"best_mode must be 'min' or 'max', not {best_mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, not "
                             f"{max_to_keep}")
        self.directory = epath.Path(directory).absolute()
        self._keep_best, self._metric = keep_best, best_metric
        self._mode, self._read_only = best_mode, read_only
        policies = [ocm.LatestN(n=max_to_keep)]
        if keep_best:
            policies.append(ocm.BestN(
                get_metric_fn=self._score, n=1, reverse=best_mode == "min",
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, create=not read_only,
            save_interval_steps=0 if read_only else 1,
            read_only=read_only, best_fn=self._score if keep_best else None,
            best_mode=best_mode,
            preservation_policy=ocm.AnyPreservationPolicy(policies))
        try:
            self._mgr = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointCorruptError(
                f"Cannot index the checkpoints in {self.directory}: a step's "
                f"files are unreadable ({_cause(e)}). Nothing was deleted; "
                "move the broken step directory away.",
                path=str(self.directory)) from e
        self._pytree = ocp.PyTreeCheckpointHandler()

    def _score(self, metrics: Mapping[str, float]) -> float:
        value = float(metrics[self._metric])
        if math.isnan(value):
            return math.inf if self._mode == "min" else -math.inf
        return value

    def save(self, step: int, state: Any, *, metadata: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> None:
        """Saves ``state`` and ``metadata`` as ``step``; returns once committed.

        Args:
            step: Training step; must not exist yet.
            state: Pytree of arrays / scalars (params, optax state, raw PRNG
                key, step...).
            metadata: JSON-serialisable dict, returned by ``restore``.
            metrics: Scalar metrics. The step competes for "best" only if
                they hold ``best_metric``.
        """
        if self._read_only:
            raise PermissionError(
                f"Checkpointer({self.directory}) is read-only")
        try:
            metadata = json.loads(json.dumps(dict(metadata), allow_nan=True))
        except TypeError as e:
            raise TypeError(f"checkpoint metadata is not JSON-serialisable: "
                            f"{e}") from e
        if int(step) in self._mgr.all_steps():
            raise ValueError(
                f"Checkpoint step {step} already exists in {self.directory}; "
                "steps are never overwritten (move a broken one away).")
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        ranked = self._keep_best and self._metric in metrics
        self._mgr.save(
            int(step), force=True, metrics=metrics if ranked else None,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    metadata=ocp.args.JsonSave(metadata)))
        self._mgr.wait_until_finished()

    def all_steps(self) -> list[int]:
        """All committed steps, ascending."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """The step with the best metric, or None if no step was ranked."""
        return self._mgr.best_step() if self._keep_best else None

    def _saved_tree(self, step: int):
        """The saved state's metadata tree (opens every array's header)."""
        return self._pytree.metadata(self.directory / str(step) / "state").tree

    def _corrupt(self, step: int, err: Exception) -> CheckpointCorruptError:
        older = []
        for s in self.all_steps():
            try:
                if s < step:
                    self._saved_tree(s)
                    older.append(s)
            except Exception:  # pylint: disable=broad-except
                pass
        path = str(self.directory / str(step))
        return CheckpointCorruptError(
            f"Checkpoint step {step} at {path} is corrupt or unreadable "
            f"({_cause(err)}). Older steps that look restorable: "
            f"{older or 'none'}; restore one explicitly with "
            "restore(step=...). Nothing was deleted.", step, path, older)

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            what = "has no checkpoint" if self.directory.exists() else "missing"
            raise FileNotFoundError(
                f"No checkpoints in {self.directory} (directory {what}).")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; "
                f"have {steps}.")
        return step

    def _read(self, step: int, target: Any, subtree: str | None):
        try:
            saved = self._saved_tree(step)
        except Exception as e:  # pylint: disable=broad-except
            raise self._corrupt(step, e) from e
        where = f"Checkpoint step {step} in {self.directory}"
        if subtree is not None:
            if not isinstance(saved, Mapping) or subtree not in saved:
                raise KeyError(f"{where} has no {subtree!r} subtree")
            item = {subtree: _match(target, saved[subtree], where)}
        else:
            item = _match(target, saved, where)
        try:
            if subtree is None:
                out = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(item),
                    metadata=ocp.args.JsonRestore()))
                return out.state, dict(out.metadata)
            state = self._pytree.restore(
                self.directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(
                    item=item, partial_restore=True,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                        item)))
            meta = self._mgr.restore(step, args=ocp.args.Composite(
                metadata=ocp.args.JsonRestore())).metadata
            return state[subtree], dict(meta)
        except Exception as e:  # pylint: disable=broad-except
            raise self._corrupt(step, e) from e

    def restore(self, step: int | None = None, *, target: Any
                ) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` (default latest) bit-exactly into ``target``.

        Args:
            step: Step to restore; None means the latest committed step. A
                corrupt latest step raises; it never silently falls back.
            target: Pytree of arrays / ``jax.ShapeDtypeStruct`` with the saved
                structure (e.g. ``jax.eval_shape`` of the initial state), so
                optax NamedTuples come back as such. Leaves with a sharding
                (concrete arrays included) restore with it, whatever the
                sharding they were saved with: a state saved on 8 devices
                restores on 1 or 4 when the target carries the new mesh's
                shardings (``flax_minrnn.parallel.MeshPlan.put_state``).
                Dtypes and leaf kinds (jax / numpy / Python scalar) are
                always the saved ones.

        Returns:
            ``(state, metadata)``.

        Raises:
            FileNotFoundError: No checkpoints, or no such step.
            ValueError: ``target``'s key paths or shapes differ from the
                checkpoint's.
            CheckpointCorruptError: The step's files cannot be read.
        """
        return self._read(self._check_step(step), target, None)

    def restore_best(self, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the best-metric step; see :meth:`restore`."""
        best = self.best_step()
        if best is None:
            raise FileNotFoundError(
                f"No checkpoint ranked by {self._metric!r} in "
                f"{self.directory}.")
        return self.restore(best, target=target)

    def restore_params(self, step: int | None = None, *, target: Any = None,
                       subtree: str = "params") -> tuple[Any, dict[str, Any]]:
        """Restores only ``state[subtree]`` and the metadata (no optimizer).

        With ``target=None`` the saved structure comes back as nested dicts
        with the saved dtypes (jax arrays; numpy where numpy was saved).
        """
        return self._read(self._check_step(step), target, subtree)

    def close(self) -> None:
        """Waits for pending work and releases orbax resources."""
        self._mgr.close()
        self._pytree.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_params(directory: str, target: Any = None, *,
                step: int | None = None, best: bool = False,
                subtree: str = "params") -> tuple[Any, dict[str, Any]]:
    """Loads ``state[subtree]`` and the metadata of a run, read-only.

    For ``init_from`` another run, or generation in a fresh process.

    Args:
        directory: The run's checkpoint directory.
        target: Optional params pytree (arrays / ShapeDtypeStruct).
        step: Step to load; default the latest (the best with ``best``).
        best: Load the best-metric step instead of the latest.
        subtree: Top-level key of the saved state to load.

    Returns:
        ``(params, metadata)``.
    """
    if not epath.Path(directory).exists():
        raise FileNotFoundError(f"No checkpoints in {directory} (missing).")
    with Checkpointer(directory, read_only=True) as ckpt:
        if best and step is None:
            step = ckpt.best_step()
            if step is None:
                raise FileNotFoundError(f"No ranked checkpoint in {directory}.")
        return ckpt.restore_params(step, target=target, subtree=subtree)
