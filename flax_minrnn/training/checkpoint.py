"""Atomic, bit-exact checkpoints of training state (the only orbax user).

Layout of a checkpoint directory (orbax-checkpoint 0.12 ``CheckpointManager``)::

    <directory>/<step>/state/      the state pytree (params, opt_state, rng...)
    <directory>/<step>/metadata/   JSON: resolved config, data position, ...
    <directory>/<step>/metrics/    JSON metrics (only with ``keep_best``)
    <directory>/<step>/checksums/  JSON: two checksums per state leaf, and
                                   SHA-256 of the metadata (and metrics)
    <directory>/<step>.orbax-checkpoint-tmp/   an interrupted save (ignored)
    <directory>/superseded/<step>/ a step set aside by :meth:`set_aside`
    <directory>/deleting/<step>/   a step retention is deleting (transient)

Atomicity: on a local filesystem orbax writes a step into
``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only after every
file is written (``AtomicRenameTemporaryPath``). Step discovery only matches
plain integer names, so a process killed mid-save leaves an ignored tmp dir
(replaced when that step is saved again). Old steps are deleted only after the
new one is committed. :meth:`Checkpointer.save` returns after the commit.

Retention: ``AnyPreservationPolicy([LatestN(max_to_keep), BestN(n=1)])``: the
last ``max_to_keep`` steps plus the best one by ``metrics[best_metric]``, all
in the same directory (a step without ``best_metric``, or with NaN, ranks
worst and is never :meth:`Checkpointer.best_step`). LatestN keeps the
latest saves, so :meth:`Checkpointer.save` refuses a step that is not above
every existing one (:meth:`Checkpointer.set_aside` moves newer steps away
first). A step to delete is
first renamed into ``deleting/`` (orbax's ``todelete_subdir``) and only then
removed, so that a kill during the removal leaves no half-deleted step among
the steps; whatever is left in ``deleting/`` is removed when a writable
:class:`Checkpointer` opens. Nothing is deleted because it cannot be read: a
corrupt step raises :class:`CheckpointCorruptError`, which names older
candidates.

Verification: every save also records :func:`tree_checksums` of the state
and the SHA-256 of the canonical JSON of the metadata (and of the metrics
when they are written), and every read compares what it read against them:
the state and metadata on every read, the metrics in
:meth:`Checkpointer.verify`. Steps saved before the metadata checksum was
recorded are read without that comparison. A read of the parameters
only (:meth:`Checkpointer.restore_params`, :func:`load_params`) also reads the
rest of the step (optimizer state...) into host memory and checks it, so that
a step which cannot be resumed from is never used silently for evaluation
either. :meth:`Checkpointer.verify` checks a step without restoring it.
"""

import hashlib
import json
import logging
import math
import numbers
import os
import sys
import traceback
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
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


def _is_late_read_failure(unraisable) -> bool:
    """Whether an unraisable exception is an echo of a failed checkpoint read.

    When a read of a corrupt step fails, orbax raises the first error (which
    :class:`Checkpointer` reports) and closes its event loop while
    tensorstore still completes the other reads. Each completion then calls
    ``loop.call_soon_threadsafe`` on the closed loop, and each read
    coroutine left behind fails when collected; Python reports every one
    as unraisable: tens to hundreds of ``RuntimeError('Event loop is
    closed')`` tracebacks and tensorstore spec dumps that bury the error.
    """
    exc, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    if not (isinstance(exc, RuntimeError)
            and str(exc) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return bool(frames) and frames[0].name == "call_soon_threadsafe" and \
        frames[0].filename.endswith(os.path.join("asyncio", "base_events.py"))


def _quiet_unraisable(previous):
    def hook(unraisable):
        try:
            if _is_late_read_failure(unraisable):
                return
        except Exception:  # pylint: disable=broad-except
            pass  # E.g. during interpreter shutdown: report as usual.
        previous(unraisable)
    hook.quiets_late_read_failures = True
    return hook


if not getattr(sys.unraisablehook, "quiets_late_read_failures", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


class CheckpointCorruptError(ValueError):
    """A committed checkpoint exists on disk but cannot be read.

    Attributes:
        step: The unreadable step (None if unknown).
        path: Its directory.
        older_steps: Older steps whose saved state tree (the arrays'
            headers) reads: fall-back candidates for an explicit
            ``restore(step=...)``, not verified (their data, metadata and
            checksums are not read).
        cause: What failed, one line.
    """

    def __init__(self, message: str, step: int | None = None,
                 path: str = "", older_steps: Sequence[int] = (),
                 cause: str = ""):
        super().__init__(message)
        self.step, self.path, self.older_steps = step, path, list(older_steps)
        self.cause = cause


def _cause(err: Exception) -> str:
    """First line of the root of an exception's ``raise ... from`` chain."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    text = str(err).split(" See full TensorStore details")[0].strip()
    lines = text.splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:300]}"


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else raises.

    Python and numpy integers qualify; bools, floats (even integral ones)
    and strings do not: nothing is coerced.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} "
                        f"{value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return int(value)


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


# ----------------------------------------------------------------------------
# Checksums.

_CHECKSUMS = "checksums"     # The checksums item of a step.
_SUPERSEDED = "superseded"   # Where set_aside moves steps (not a step name).
_DELETING = "deleting"       # Where retention moves steps it deletes.
_WEIGHT = 0x9E3779B1          # Odd multiplier of the position weights.
_METADATA_SUM = "<metadata>"  # Checksums entry of the metadata's JSON.
_METRICS_SUM = "<metrics>"    # Checksums entry of the metrics' JSON.


def _summable(dtype: np.dtype) -> bool:
    """Whether :func:`_words` takes ``dtype``: bool, or a number type whose
    elements fill 1, 2, 4 or 8 bytes (complex: per part); not sub-byte
    types (int4, float4...), strings or objects."""
    if dtype == np.bool_ or dtype.kind == "c":
        return True
    for info in (jnp.iinfo, jnp.finfo):
        try:
            bits = info(dtype).bits
        except Exception:  # pylint: disable=broad-except
            continue
        return bits == 8 * dtype.itemsize and dtype.itemsize in (1, 2, 4, 8)
    return False


def _words(x, xp, bitcast):
    """The bits of every element of ``x`` as uint32 words, flattened.

    1-, 2- and 4-byte elements become one word each (bool: 0 or 1), 8-byte
    ones two (low word first); a complex element is its real part's words,
    then its imaginary part's (complex64: the words of its bytes). ``xp`` is
    numpy or jax.numpy, ``bitcast`` its same-size bit reinterpretation, so
    host and device agree. Callers check :func:`_summable` first.
    """
    dtype = np.dtype(x.dtype)
    if dtype.kind == "c":
        return _words(xp.stack([xp.real(x), xp.imag(x)], axis=-1), xp,
                      bitcast)
    if dtype == np.bool_:
        words = x.astype(xp.uint32)
    elif dtype.itemsize in (1, 2, 4):
        unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[dtype.itemsize]
        words = bitcast(x, unsigned).astype(xp.uint32)
    elif dtype.itemsize == 8:
        u = bitcast(x, xp.uint64)
        words = xp.stack([(u & xp.uint64(0xFFFFFFFF)).astype(xp.uint32),
                          (u >> xp.uint64(32)).astype(xp.uint32)], axis=-1)
    else:
        raise TypeError(f"cannot checksum an array of dtype {dtype}")
    return words.reshape(-1)


def _sums(words, xp):
    """``[sum_i w_i, sum_i w_i * c_i] mod 2**32``, ``c_i = (i * K) | 1``."""
    index = xp.arange(words.shape[0], dtype=xp.uint32)
    weights = (index * xp.uint32(_WEIGHT)) | xp.uint32(1)
    return xp.stack([xp.sum(words, dtype=xp.uint32),
                     xp.sum(words * weights, dtype=xp.uint32)])


@jax.jit
def _device_sums(leaves: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: _sums(_words(x, jnp, jax.lax.bitcast_convert_type), jnp)
            for k, x in leaves.items()}


def _host_sums(x: np.ndarray) -> list[int]:
    return [int(v) for v in _sums(_words(x, np, lambda a, t: a.view(t)), np)]


def _fetch(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # Several processes.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def tree_checksums(tree: Any) -> dict[str, list[int]]:
    """Two 32-bit checksums of every leaf of ``tree``, keyed by 'a/0/mu'.

    With ``w_i`` the leaf's elements as uint32 words (:func:`_words`, in
    row-major order) and ``c_i = (i * 0x9E3779B1) | 1`` (odd)::

        s1 = sum_i w_i         mod 2**32
        s2 = sum_i c_i * w_i   mod 2**32

    Integer sums do not depend on the summation order, so the value is the
    same for a jax array under any sharding (computed where it lives, by one
    jitted function per tree structure) and for the numpy copy of it. Any
    change of a single word changes ``s2`` (``c_i`` is odd, so invertible
    modulo ``2**32``). A permutation of the words is not always detected:
    swapping ``w_i != w_j`` changes ``s2`` by ``(c_i - c_j) * (w_j - w_i)
    mod 2**32``, which is 0 when the powers of two in the two factors reach
    ``2**32`` (e.g. ``c_0 - c_1 = -0x9E3779B0`` holds ``2**4``, so words
    0x3F800000 and 0x4F800000, ``2**28`` apart, swap unnoticed). PRNG key
    arrays are summed through their key data, Python scalars and numpy
    arrays on the host.

    Raises:
        TypeError: A leaf's dtype cannot be summed (sub-byte types such as
            int4, strings in arrays, objects); names the leaf and dtype.
    """
    device, out = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = _keystr(path)
        if isinstance(leaf, str):
            out[key] = _host_sums(np.frombuffer(leaf.encode(), np.uint8))
            continue
        if isinstance(leaf, jax.Array) and _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        elif not isinstance(leaf, jax.Array):
            leaf = np.asarray(leaf)
        if not _summable(np.dtype(leaf.dtype)):
            raise TypeError(f"cannot checksum the leaf {key!r} of dtype "
                            f"{np.dtype(leaf.dtype)}: only bool and number "
                            "types of 1, 2, 4 or 8 bytes (complex: per "
                            "part) are supported")
        if isinstance(leaf, jax.Array):
            device[key] = leaf
        else:
            out[key] = _host_sums(leaf)
    if device:
        out.update({k: [int(v) for v in _fetch(s)]
                    for k, s in _device_sums(device).items()})
    return out


def _json_sum(value: Any) -> str:
    """SHA-256 (hex) of ``value``'s canonical JSON (sorted keys, no spaces).

    ``value`` must be as JSON reads it back (string keys, lists, not
    tuples), so that what is hashed on save is what a read hashes.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"),
                      allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _mismatch(tree: Any, expected: Mapping[str, Any]) -> list[str]:
    """Leaves of ``tree`` whose checksums differ from ``expected``."""
    return sorted(k for k, v in tree_checksums(tree).items()
                  if list(expected.get(k, ())) != v)


def _host_target(saved):
    """A restore target reading the saved tree into numpy arrays."""
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype)
        if isinstance(m, ocp.metadata.ArrayMetadata) else _abstract_leaf(None, m),
        saved)


def _metric_value(key: Any, value: Any) -> float:
    """A metric as a float; a real number (Python, numpy or 0-d jax) only."""
    scalar = np.asarray(value) if np.ndim(value) == 0 else None
    if (isinstance(value, (bool, np.bool_)) or scalar is None
            or scalar.dtype.kind not in "fiu"):
        raise TypeError(f"metrics[{key!r}] must be a real number, not "
                        f"{type(value).__name__} {value!r}")
    return float(value)


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints plus the best one.

    Args:
        directory: Checkpoint directory (created unless ``read_only``).
        max_to_keep: Number of most recent steps kept, an int >= 1; None
            keeps all.
        keep_best: Also keep the step with the best ``metrics[best_metric]``.
        best_metric: Metric name used to rank steps.
        best_mode: 'min' or 'max'. NaN metrics rank worst.
        read_only: Never create, write or delete anything. A read-only
            instance reads the metrics only when :meth:`best_step` asks,
            so that one unreadable metrics file does not stop reading the
            other steps.

    Raises:
        CheckpointCorruptError: A writable instance cannot index the steps
            (e.g. a step's metrics file does not parse; the message names
            it).
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3,
                 keep_best: bool = True, best_metric: str = "eval_loss",
                 best_mode: str = "min", read_only: bool = False):
        if best_mode not in ("min", "max"):
            raise ValueError(
                f"best_mode must be 'min' or 'max', not {best_mode!r}")
        if max_to_keep is not None:
            max_to_keep = _check_int("max_to_keep", max_to_keep, 1)
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
            todelete_subdir=None if read_only else _DELETING,
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            lightweight_initialize=read_only)  # Reads no metrics.
        try:
            self._mgr = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # pylint: disable=broad-except
            raise self._index_error(e) from e
        self._pytree = ocp.PyTreeCheckpointHandler()
        self._finish_deletions()

    def _index_error(self, err: Exception) -> CheckpointCorruptError:
        """The error of an index (orbax reads every step's metrics) that
        failed, naming the steps whose metrics file does not parse."""
        bad = {}
        if self.directory.exists():
            for entry in self.directory.iterdir():
                path = entry / "metrics" / "metrics"
                if entry.name.isdigit() and path.exists():
                    try:
                        json.loads(path.read_text())
                    except Exception:  # pylint: disable=broad-except
                        bad[int(entry.name)] = str(path)
        what = (f"the metrics of steps {sorted(bad)} do not parse "
                f"({', '.join(bad[s] for s in sorted(bad))})" if bad else
                "a step's files are unreadable")
        return CheckpointCorruptError(
            f"Cannot index the checkpoints in {self.directory}: {what} "
            f"({_cause(err)}). Nothing was deleted; move the broken step "
            f"directory away (e.g. into {self.directory / _SUPERSEDED}).",
            path=str(self.directory), cause=_cause(err))

    def _finish_deletions(self) -> None:
        """Removes the steps retention has moved to ``deleting/``."""
        root = self.directory / _DELETING
        if self._read_only or jax.process_index() != 0 or not root.exists():
            return
        for entry in sorted(root.iterdir()):
            if entry.is_dir():
                entry.rmtree()
            else:
                entry.unlink()
        root.rmdir()

    def _score(self, metrics: Mapping[str, float]) -> float:
        """Retention's rank of a step (without ``best_metric``: worst)."""
        value = float(metrics.get(self._metric, math.nan))
        if math.isnan(value):
            return math.inf if self._mode == "min" else -math.inf
        return value

    def save(self, step: int, state: Any, *, metadata: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> None:
        """Saves ``state`` and ``metadata`` as ``step``; returns once committed.

        Args:
            step: Training step, an int >= 0 greater than every existing
                step (retention keeps the newest saves, so a lower step
                would make it delete newer ones): to save a lower step
                again, first move the newer steps away with
                :meth:`set_aside`.
            state: Pytree of arrays / scalars (params, optax state, raw PRNG
                key, step...).
            metadata: JSON-serialisable dict, returned by ``restore``.
            metrics: Real-number scalar metrics (not bools). The step
                competes for "best" only if they hold ``best_metric``.

        Raises:
            ValueError: ``step`` is not above the latest existing step.
            TypeError: ``step`` is not an int, a metric is not a real
                number, or ``metadata`` is not JSON-serialisable.
        """
        if self._read_only:
            raise PermissionError(
                f"Checkpointer({self.directory}) is read-only")
        step = _check_int("step", step, 0)
        have = self.all_steps()
        if step in have:
            raise ValueError(
                f"Checkpoint step {step} already exists in {self.directory}; "
                "steps are never overwritten (move it away with "
                "set_aside).")
        if have and step < have[-1]:
            raise ValueError(
                f"step must be greater than the latest step {have[-1]} in "
                f"{self.directory}, not {step}: retention keeps the newest "
                "saves and would delete the newer steps. Move the steps "
                f"above {step} away first with set_aside.")
        metrics = {str(k): _metric_value(k, v)
                   for k, v in (metrics or {}).items()}
        try:
            metadata = json.loads(json.dumps(dict(metadata), allow_nan=True))
        except TypeError as e:
            raise TypeError(f"checkpoint metadata is not JSON-serialisable: "
                            f"{e}") from e
        ranked = self._keep_best and self._metric in metrics
        sums = tree_checksums(state)
        reserved = sorted({_METADATA_SUM, _METRICS_SUM} & set(sums))
        if reserved:
            raise ValueError(f"state has a leaf at {reserved[0]!r}, a name "
                             "reserved for the metadata checksums")
        sums[_METADATA_SUM] = _json_sum(metadata)
        if ranked:
            metrics = json.loads(json.dumps(metrics, allow_nan=True))
            sums[_METRICS_SUM] = _json_sum(metrics)
        self._mgr.save(
            step, force=True, metrics=metrics if ranked else None,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                metadata=ocp.args.JsonSave(metadata),
                **{_CHECKSUMS: ocp.args.JsonSave(sums)}))
        self._mgr.wait_until_finished()
        self._finish_deletions()

    def all_steps(self) -> list[int]:
        """All committed steps, ascending."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The highest committed step (the one ``restore`` picks), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``metrics[best_metric]``, or None.

        Reads every step's metrics and checks them against their checksum.
        A step without metrics, without ``best_metric`` among them or with
        a NaN value is not ranked (None if no step is, or without
        ``keep_best``); of equal values the newest step wins.

        Raises:
            CheckpointCorruptError: A step's metrics cannot be read, or
                differ from what was saved.
        """
        if not self._keep_best:
            return None
        best, best_value = None, math.nan
        for step in self.all_steps():
            try:
                metrics = self._mgr.metrics(step)
                self._check_json("metrics", metrics, self._expected(step))
                value = float((metrics or {}).get(self._metric, math.nan))
            except Exception as e:  # pylint: disable=broad-except
                raise self._corrupt(step, e) from e
            if math.isnan(value):
                continue
            if best is None or (value <= best_value if self._mode == "min"
                                else value >= best_value):
                best, best_value = step, value
        return best

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
        path, cause = str(self.directory / str(step)), _cause(err)
        return CheckpointCorruptError(
            f"Checkpoint step {step} at {path} is corrupt or unreadable "
            f"({cause}). Older steps that look restorable: "
            f"{older or 'none'}; restore one explicitly with "
            "restore(step=...). Nothing was deleted.", step, path, older,
            cause)

    def _check_steps(self) -> list[int]:
        steps = self.all_steps()
        if not steps:
            what = "has no checkpoint" if self.directory.exists() else "missing"
            raise FileNotFoundError(
                f"No checkpoints in {self.directory} (directory {what}).")
        return steps

    def _check_step(self, step: int | None) -> int:
        steps = self._check_steps()
        step = steps[-1] if step is None else _check_int("step", step, 0)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; "
                f"have {steps}.")
        return step

    def _expected(self, step: int) -> dict[str, Any] | None:
        """The saved checksums of ``step`` (None: saved without them)."""
        if not (self.directory / str(step) / _CHECKSUMS).exists():
            return None
        return dict(self._mgr.restore(step, args=ocp.args.Composite(
            **{_CHECKSUMS: ocp.args.JsonRestore()}))[_CHECKSUMS])

    def _restore_items(self, step: int, item: Any) -> Any:
        """The entries of the saved state that ``item`` names, as targeted."""
        return self._pytree.restore(
            self.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=item, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(
                    item)))

    def _check_sums(self, step: int, tree: Any,
                    expected: Mapping[str, Any] | None) -> None:
        if expected is None:
            return
        bad = _mismatch(tree, expected)
        if bad:
            raise ValueError(f"the data read back differs from what was "
                             f"saved (checksum mismatch in {len(bad)} "
                             f"arrays: {', '.join(bad[:4])})")

    def _read_rest(self, step: int, saved: Mapping[str, Any], skip: str,
                   expected: Mapping[str, Any] | None) -> None:
        """Reads every top-level entry but ``skip`` to host memory, checks
        it against ``expected`` and drops it."""
        rest = {k: _host_target(v) for k, v in saved.items() if k != skip}
        if rest:
            self._check_sums(step, self._restore_items(step, rest), expected)

    @staticmethod
    def _check_json(what: str, value: Any,
                    expected: Mapping[str, Any] | None) -> None:
        """Compares ``value`` with its recorded SHA-256 (if one was)."""
        key = {"metadata": _METADATA_SUM, "metrics": _METRICS_SUM}[what]
        if expected is None or key not in expected:
            return  # Saved before the JSON items had checksums.
        if value is None:
            raise FileNotFoundError(f"the {what} saved with the step are "
                                    "missing")
        if _json_sum(value) != expected[key]:
            raise ValueError(f"the {what} read back differ from what was "
                             "saved (checksum mismatch)")

    def _metadata(self, step: int,
                  expected: Mapping[str, Any] | None) -> dict[str, Any]:
        meta = dict(self._mgr.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore())).metadata)
        self._check_json("metadata", meta, expected)
        return meta

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
            expected = self._expected(step)
            if subtree is None:
                out = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(item),
                    metadata=ocp.args.JsonRestore()))
                self._check_sums(step, out.state, expected)
                self._check_json("metadata", dict(out.metadata), expected)
                return out.state, dict(out.metadata)
            state = self._restore_items(step, item)
            self._check_sums(step, state, expected)
            self._read_rest(step, saved, subtree, expected)
            return state[subtree], self._metadata(step, expected)
        except Exception as e:  # pylint: disable=broad-except
            raise self._corrupt(step, e) from e

    def verify(self, step: int | None = None) -> bool:
        """Reads all of ``step`` (default latest) to host memory and checks it.

        Every array is read back (one step at a time, into numpy arrays) and
        compared with the checksums recorded when it was saved, and so are
        the metadata and metrics (for steps saved with their checksums;
        older steps' metadata must parse). Nothing is kept or changed.

        Returns:
            True if the checksums were compared; False for a step saved
            without checksums (by an older version), which read back fine.

        Raises:
            FileNotFoundError: No checkpoints, or no such step.
            CheckpointCorruptError: The step cannot be read or differs from
                what was saved.
        """
        step = self._check_step(step)
        try:
            saved = self._saved_tree(step)
            expected = self._expected(step)
            self._check_sums(step, self._restore_items(
                step, _host_target(saved)), expected)
            self._metadata(step, expected)
            self._check_json("metrics", self._mgr.metrics(step), expected)
        except Exception as e:  # pylint: disable=broad-except
            raise self._corrupt(step, e) from e
        return expected is not None

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
                shardings (``flax_minrnn.training.mesh.MeshPlan.put_state``).
                Dtypes and leaf kinds (jax / numpy / Python scalar) are
                always the saved ones.

        Returns:
            ``(state, metadata)``.

        Raises:
            FileNotFoundError: No checkpoints, or no such step.
            ValueError: ``target``'s key paths or shapes differ from the
                checkpoint's.
            CheckpointCorruptError: The step's files cannot be read, or
                what they hold (state or metadata) differs from what was
                saved (checksums).
        """
        return self._read(self._check_step(step), target, None)

    def restore_last_good(self, target: Any
                          ) -> tuple[int, Any, dict[str, Any],
                                     list[CheckpointCorruptError]]:
        """Restores the newest step that restores; see :meth:`restore`.

        Tries the steps newest first; a step that raises
        :class:`CheckpointCorruptError` is skipped (and kept on disk).

        Returns:
            ``(step, state, metadata, skipped)``, ``skipped`` holding the
            error of every newer step, newest first.

        Raises:
            FileNotFoundError: No checkpoints.
            CheckpointCorruptError: No step restores.
        """
        skipped = []
        for step in reversed(self._check_steps()):
            try:
                state, meta = self.restore(step, target=target)
            except CheckpointCorruptError as e:
                skipped.append(e)
                continue
            return step, state, meta, skipped
        raise CheckpointCorruptError(
            f"No checkpoint in {self.directory} restores: "
            + "; ".join(f"step {e.step}: {e.cause}" for e in skipped)
            + ". Nothing was deleted.", path=str(self.directory))

    def set_aside(self, steps: Sequence[int]) -> list[str]:
        """Moves ``steps`` to ``<directory>/superseded/`` (never deletes).

        A step that is moved aside is no longer a step of this directory
        (not restored, not counted for retention, not overwritten): used
        before training resumes from an older step, so that the newer steps'
        numbers can be saved again. A step moved aside twice gets a suffix
        (``superseded/4.1``). Every process picks the same new paths
        (before process 0, which alone renames, starts).

        Args:
            steps: Distinct existing steps, a sequence of ints (``[4]``,
                not ``4``).

        Returns:
            The new paths, in the order of ``steps``.

        Raises:
            ValueError: ``steps`` is not a sequence of distinct ints >= 0.
            FileNotFoundError: A step does not exist (nothing is moved).
            OSError: A rename failed; the steps renamed before it stay
                moved, and the index is reloaded from the directory either
                way.
        """
        if self._read_only:
            raise PermissionError(
                f"Checkpointer({self.directory}) is read-only")
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
            raise ValueError(f"steps must be a sequence of step numbers "
                             f"(e.g. [4]), not {type(steps).__name__} "
                             f"{steps!r}")
        bad = [s for s in steps if isinstance(s, (bool, np.bool_))
               or not isinstance(s, numbers.Integral) or s < 0]
        if bad or len(set(steps)) != len(steps):
            raise ValueError(f"steps must be distinct ints >= 0, not "
                             f"{list(steps)}")
        steps = [int(s) for s in steps]
        have = self.all_steps()
        missing = [s for s in steps if s not in have]
        if missing:
            raise FileNotFoundError(
                f"No checkpoint for steps {missing} in {self.directory}; "
                f"have {have}.")
        root, moved = self.directory / _SUPERSEDED, []
        for step in steps:
            dest, n = root / str(step), 0
            while dest.exists():
                n += 1
                dest = root / f"{step}.{n}"
            moved.append(str(dest))
        ocp.multihost.sync_global_processes("flax_minrnn_set_aside_start")
        try:
            if jax.process_index() == 0:
                root.mkdir(exist_ok=True)
                for step, dest in zip(steps, moved):
                    (self.directory / str(step)).rename(dest)
        finally:
            ocp.multihost.sync_global_processes("flax_minrnn_set_aside_done")
            try:
                self._mgr.reload()
            except Exception as e:  # pylint: disable=broad-except
                raise self._index_error(e) from e
        return moved

    def restore_best(self, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the best-metric step; see :meth:`restore`."""
        best = self.best_step()
        if best is None:
            raise FileNotFoundError(
                f"No checkpoint ranked by best_metric={self._metric!r} in "
                f"{self.directory}.")
        return self.restore(best, target=target)

    def restore_params(self, step: int | None = None, *, target: Any = None,
                       subtree: str = "params") -> tuple[Any, dict[str, Any]]:
        """Restores only ``state[subtree]`` and the metadata (no optimizer).

        With ``target=None`` the saved structure comes back as nested dicts
        with the saved dtypes (jax arrays; numpy where numpy was saved).

        The rest of the step (optimizer state...) is read too, into host
        memory, checked against its checksums and dropped: a step that
        :meth:`restore` would reject is rejected here as well.

        Raises:
            As :meth:`restore`; ``KeyError`` if there is no ``subtree``.
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
                best_metric: str = "eval_loss", best_mode: str = "min",
                subtree: str = "params") -> tuple[Any, dict[str, Any]]:
    """Loads ``state[subtree]`` and the metadata of a run, read-only.

    For ``init_from`` another run, or generation in a fresh process. The
    whole step is read and checked (:meth:`Checkpointer.restore_params`).

    Args:
        directory: The run's checkpoint directory.
        target: Optional params pytree (arrays / ShapeDtypeStruct).
        step: Step to load; default the latest (the best with ``best``).
        best: Load the best-metric step instead of the latest.
        best_metric: The metric ``best`` ranks steps by (steps without it
            are not ranked; see :meth:`Checkpointer.best_step`).
        best_mode: 'min' or 'max': which value of ``best_metric`` is best.
        subtree: Top-level key of the saved state to load.

    Returns:
        ``(params, metadata)``.
    """
    if not epath.Path(directory).exists():
        raise FileNotFoundError(f"No checkpoints in {directory} (missing).")
    with Checkpointer(directory, read_only=True, best_metric=best_metric,
                      best_mode=best_mode) as ckpt:
        if best and step is None:
            step = ckpt.best_step()
            if step is None:
                raise FileNotFoundError(
                    f"No checkpoint in {directory} is ranked by best_metric="
                    f"{best_metric!r} (none has a non-NaN value of it).")
        return ckpt.restore_params(step, target=target, subtree=subtree)
