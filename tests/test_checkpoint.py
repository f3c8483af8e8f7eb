"""Tests for flax_minrnn.training.checkpoint: bit-exact round trips, retention,
atomicity under SIGKILL, corrupt and missing checkpoints."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_minrnn.training.checkpoint import (CheckpointCorruptError, Checkpointer,
                                             load_params, tree_checksums)

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_state(seed: int = 0):
    """A training-state-like pytree with every leaf kind the trainer saves."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    w[0, 0], w[0, 1] = np.nan, -0.0  # Bit patterns that == would hide.
    params = {
        "dense": {"kernel": jnp.asarray(w),
                  "bias": jnp.asarray(rng.standard_normal(4), jnp.bfloat16)},
        "embedding": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16),
        "counts": jnp.asarray(rng.integers(-5, 5, size=3), jnp.int32),
    }
    opt_state = optax.adamw(1e-3).init(params)
    # Fill the moments with distinct random values of the right dtypes.
    opt_state = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * 10, x.dtype),
        opt_state)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": 100 + seed,
        "rng": jax.random.PRNGKey(seed),
        "data_pos": np.int64(2**40 + seed),  # numpy, needs int64
    }


def assert_bit_exact(restored, expected):
    """Same pytree structure, leaf types, dtypes, shapes and bytes."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        if isinstance(want, (int, float)):
            assert type(got) is type(want) and got == want
            continue
        assert isinstance(got, jax.Array) == isinstance(want, jax.Array)
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def abstract(state):
    return jax.eval_shape(lambda: state)


def test_round_trip_bit_exact(tmp_path):
    state = make_state()
    meta = {"config": {"model": {"d_model": 16}, "seed": 0}, "data": [3, 4]}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(7, state, metadata=meta, metrics={"eval_loss": 1.5})
    with Checkpointer(tmp_path / "ckpt") as ckpt:  # A fresh instance.
        assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
        restored, got_meta = ckpt.restore(target=abstract(state))
        assert_bit_exact(restored, state)
        assert got_meta == meta
        assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
        # Concrete arrays as the target work too.
        restored, _ = ckpt.restore(7, target=make_state(seed=1))
        assert_bit_exact(restored, state)
        params, got_meta = ckpt.restore_params()  # Target-less.
        assert_bit_exact(params, state["params"])
        assert got_meta == meta
    params, _ = load_params(str(tmp_path / "ckpt"),
                            abstract(state["params"]))
    assert_bit_exact(params, state["params"])


def test_keep_last_k_and_best(tmp_path):
    losses = {1: 5.0, 2: 2.0, 3: 4.0, 4: float("nan"), 5: 3.0, 6: 6.0}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, make_state(step), metadata={"step": step},
                      metrics={"eval_loss": loss, "acc": 0.5})
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.best_step() == 2
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:  # Survives restarts.
        assert ckpt.all_steps() == [2, 5, 6] and ckpt.best_step() == 2
        restored, meta = ckpt.restore_best(abstract(make_state()))
        assert_bit_exact(restored, make_state(2))
        assert meta == {"step": 2}
        ckpt.save(7, make_state(7), metadata={}, metrics={"eval_loss": 1.0})
        ckpt.save(8, make_state(8), metadata={})  # No metric: never "best".
        assert ckpt.all_steps() == [7, 8] and ckpt.best_step() == 7
    params, meta = load_params(str(tmp_path), best=True)
    assert_bit_exact(params, make_state(7)["params"])


class _Killed(BaseException):
    """Stands for a SIGKILL at a chosen point (nothing after it runs)."""


def test_a_kill_while_retention_deletes_leaves_only_whole_steps(tmp_path, monkeypatch):
    """A kill part-way through removing a step that retention dropped must
    not leave a half-removed step among the steps: ``check`` would call it
    corrupt. The next writable open finishes the removal."""
    from etils import epath
    ckpt = Checkpointer(tmp_path, max_to_keep=1, keep_best=False)
    ckpt.save(1, make_state(1), metadata={"step": 1})

    def killed_rmtree(self, missing_ok=False):
        files = sorted(p for p in pathlib.Path(self).rglob("*") if p.is_file())
        files[0].unlink()  # Part of the tree is gone, then the kill.
        raise _Killed()

    monkeypatch.setattr(type(epath.Path(tmp_path)), "rmtree", killed_rmtree)
    with pytest.raises(_Killed):
        ckpt.save(2, make_state(2), metadata={"step": 2})
    monkeypatch.undo()
    with Checkpointer(tmp_path, read_only=True) as ro:
        assert ro.all_steps() == [2]
        assert ro.verify(2)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()
                 and p.relative_to(tmp_path).parts[0] != "2"]
    assert leftovers  # What the kill left of step 1, outside the steps.
    with Checkpointer(tmp_path, max_to_keep=1, keep_best=False) as again:
        assert again.all_steps() == [2]
        restored, meta = again.restore(target=abstract(make_state()))
        assert_bit_exact(restored, make_state(2))
        assert meta == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]


def test_best_mode_max_and_no_best(tmp_path):
    with Checkpointer(tmp_path / "a", max_to_keep=1, best_metric="acc",
                      best_mode="max") as ckpt:
        for step, acc in [(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.1)]:
            ckpt.save(step, {"x": jnp.zeros(2)}, metadata={},
                      metrics={"acc": acc})
        assert ckpt.all_steps() == [2, 4] and ckpt.best_step() == 2
    with Checkpointer(tmp_path / "b", max_to_keep=1, keep_best=False) as ckpt:
        for step in range(1, 4):
            ckpt.save(step, {"x": jnp.zeros(2)}, metadata={},
                      metrics={"eval_loss": -step})
        assert ckpt.all_steps() == [3] and ckpt.best_step() is None
        with pytest.raises(FileNotFoundError, match="ranked"):
            ckpt.restore_best({"x": jnp.zeros(2)})


CHILD = """
import os, signal, sys
import jax.numpy as jnp
import numpy as np
from flax_minrnn.training.checkpoint import Checkpointer

mode, directory = sys.argv[1], sys.argv[2]
ckpt = Checkpointer(directory)
ckpt.save(1, {"w": jnp.arange(1000, dtype=jnp.float32), "step": 1},
          metadata={"step": 1})
if mode == "before_commit":
    # Die after every byte of step 2 is written, just before the rename of
    # "2.orbax-checkpoint-tmp" to "2" (orbax-checkpoint 0.12 internals).
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def die_before_step_rename(self):
        if self.get().name.startswith("2."):
            os.kill(os.getpid(), signal.SIGKILL)
        await finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = die_before_step_rename
# Incompressible 128 MiB, so that writing step 2 takes a while.
big = jnp.asarray(np.random.default_rng(0).random(2**25, np.float32))
print("SAVED1", flush=True)
ckpt.save(2, {"w": big, "step": 2}, metadata={"step": 2})
print("SAVED2", flush=True)
"""


def _tmp_bytes(directory):
    """Bytes written so far under the tmp dir of step 2."""
    total = 0
    for root, _, files in os.walk(directory):
        if "2.orbax-checkpoint-tmp" in root:
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except OSError:  # Renamed or removed meanwhile.
                    pass
    return total


@pytest.mark.parametrize("mode", ["before_commit", "mid_write"])
def test_sigkill_during_save_keeps_previous(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    directory = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    child = subprocess.Popen([sys.executable, str(script), mode,
                              str(directory)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    assert child.stdout.readline().strip() == "SAVED1"
    if mode == "mid_write":  # Kill once 4 MiB of step 2 are on disk.
        deadline = time.time() + 60
        while _tmp_bytes(directory) < 4 * 2**20:
            assert time.time() < deadline and child.poll() is None
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        if child.wait(timeout=60) == 0:  # Only under extreme CPU starvation.
            pytest.skip("step 2 was committed before the kill arrived")
    assert child.wait(timeout=60) == -signal.SIGKILL
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith("2")]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers

    expected = {"w": np.arange(1000, dtype=np.float32), "step": 1}
    with Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        restored, meta = ckpt.restore(target=expected)
        assert meta == {"step": 1}
        assert_bit_exact(restored, {"w": jnp.asarray(expected["w"]),
                                    "step": 1})
        # Saving step 2 again replaces the stale tmp dir.
        ckpt.save(2, {"w": jnp.zeros(3), "step": 2}, metadata={})
        assert ckpt.all_steps() == [1, 2]
    assert sorted(p.name for p in directory.iterdir()
                  if p.name[0].isdigit()) == ["1", "2"]


def _files(path: pathlib.Path):
    return {str(p.relative_to(path)): p.stat().st_size
            for p in path.rglob("*") if p.is_file()}


def _truncate_data(step_dir):
    for f in (step_dir / "state" / "d").iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)


def _delete_data(step_dir):
    for f in (step_dir / "state" / "d").iterdir():
        f.unlink()


def _delete_tree_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


# tensorstore callbacks of the failed reads hit a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_truncate_data, _delete_data,
                                     _delete_tree_metadata])
def test_corrupt_latest_raises_and_keeps_good(tmp_path, corrupt):
    state1, state2 = make_state(1), make_state(2)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state1, metadata={"step": 1}, metrics={"eval_loss": 1.0})
        ckpt.save(2, state2, metadata={"step": 2}, metrics={"eval_loss": 2.0})
    good_files = _files(tmp_path / "1")
    corrupt(tmp_path / "2")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        with pytest.raises(CheckpointCorruptError) as info:
            ckpt.restore(target=abstract(state1))
        assert info.value.step == 2 and info.value.older_steps == [1]
        message = str(info.value)
        assert str(tmp_path / "2") in message and "[1]" in message
        with pytest.raises(CheckpointCorruptError):
            ckpt.restore_params()
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(2, state2, metadata={})  # Never overwritten.
        # Nothing was cleaned up; the older step restores bit-exactly.
        assert _files(tmp_path / "1") == good_files
        assert (tmp_path / "2").is_dir()
        restored, meta = ckpt.restore(info.value.older_steps[-1],
                                      target=abstract(state1))
        assert_bit_exact(restored, state1)
        assert meta == {"step": 1}
    assert _files(tmp_path / "1") == good_files


def test_target_mismatch_is_not_corruption(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, metadata={})
        with pytest.raises(ValueError, match="opt_state") as info:
            ckpt.restore(target={"params": state["params"]})
        assert not isinstance(info.value, CheckpointCorruptError)
        bad = dict(state, rng=jnp.zeros((3,), jnp.uint32))
        with pytest.raises(ValueError, match="rng"):
            ckpt.restore(target=bad)


def test_missing_or_empty_directory(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_params(str(missing))
    with Checkpointer(missing, read_only=True) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match=str(missing)):
            ckpt.restore(target={})
    assert not missing.exists()
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="empty"):
            ckpt.restore(target={})
        ckpt.save(3, {"x": jnp.zeros(2)}, metadata={})
        with pytest.raises(FileNotFoundError, match=r"step 4.*\[3\]"):
            ckpt.restore(4, target={"x": jnp.zeros(2)})


def test_bad_arguments_and_read_only(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path, best_mode="lowest")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, {"x": jnp.zeros(2)}, metadata={"a": object()})
        assert ckpt.all_steps() == []
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(PermissionError, match="is read-only"):
            ckpt.save(1, {"x": jnp.zeros(2)}, metadata={})


# ----------------------------------------------------------------------------
# Checksums: every read is checked against what was saved.

def _reference_sums(a: np.ndarray) -> list[int]:
    """tree_checksums' two sums, in Python integers, from the raw bytes."""
    a = np.ascontiguousarray(a)
    size = a.dtype.itemsize
    raw = a.tobytes()
    words = []
    for i in range(a.size):
        element = int.from_bytes(raw[i * size:(i + 1) * size], "little")
        words += [element] if size <= 4 else [element & 0xFFFFFFFF,
                                              element >> 32]
    s1 = sum(words) % 2**32
    s2 = sum((((i * 0x9E3779B1) % 2**32) | 1) * w
             for i, w in enumerate(words)) % 2**32
    return [s1, s2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int32",
                                   "int8", "uint8", "bool"])
def test_tree_checksums_match_a_reference_on_host_and_device(dtype, rng):
    a = (rng.random((5, 7)) < 0.5 if dtype == "bool"
         else (rng.standard_normal((5, 7)) * 50).astype(dtype))
    a.flat[3] = a.flat[4]  # Equal words at two positions.
    got = tree_checksums({"device": jnp.asarray(a), "host": a,
                          "scalar": 2**40 + 3, "float": -1.5})
    assert got["device"] == got["host"] == _reference_sums(a)
    assert got["scalar"] == _reference_sums(np.asarray(2**40 + 3, np.int64))
    assert got["float"] == _reference_sums(np.asarray(-1.5, np.float64))
    # Flipping any one bit changes the second sum.
    bits = a.view(f"u{a.dtype.itemsize}")
    for i in range(a.size):
        for bit in (0, 8 * a.dtype.itemsize - 1):
            if dtype == "bool" and bit:
                continue
            b = bits.copy()
            b.flat[i] ^= 1 << bit
            flipped = b.view(a.dtype)
            assert tree_checksums(jnp.asarray(flipped))[""][1] != got["device"][1]
    # Swapping two different elements does too.
    j = int(np.flatnonzero(a.reshape(-1) != a.flat[0])[0])
    b = a.copy()
    b.flat[0], b.flat[j] = a.flat[j], a.flat[0]
    assert tree_checksums(b)[""] != got["host"]


def _state_store(step_dir):
    """The OCDBT key-value store of a step's state (tensorstore)."""
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    return ts.KvStore.open({"driver": "ocdbt",
                            "base": f"file://{step_dir / 'state'}/"}).result()


def _rewrite_array(step_dir, name: str, fn):
    """Replaces saved array ``name`` ('params.dense.kernel') by
    ``fn(value)``: a valid write, so only a checksum can tell."""
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    array = ts.open({"driver": "zarr", "kvstore": {
        "driver": "ocdbt", "base": f"file://{step_dir / 'state'}/",
        "path": name + "/"}}).result()
    array.write(fn(array.read().result())).result()


def _truncate_chunks(step_dir, prefix: bytes):
    """Cuts every stored chunk of the arrays under ``prefix`` in half (the
    damage a truncated data file does, confined to those arrays)."""
    store = _state_store(step_dir)
    keys = [k for k in store.list().result()
            if k.startswith(prefix) and not k.endswith(b".zarray")]
    assert keys
    for key in keys:
        value = store.read(key).result().value
        store.write(key, value[:len(value) // 2]).result()


def test_changed_data_is_detected_by_its_checksum(tmp_path):
    state = make_state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, metadata={"step": 1})
        ckpt.save(2, make_state(2), metadata={"step": 2})

    def bump(x):
        x = np.array(x)
        x[3, 2] = np.nextafter(x[3, 2], np.float32(np.inf))  # One ulp.
        return x
    _rewrite_array(tmp_path / "2", "params.dense.kernel", bump)
    with Checkpointer(tmp_path) as ckpt:
        for read in (lambda: ckpt.restore(target=abstract(state)),
                     ckpt.restore_params, ckpt.verify):
            with pytest.raises(CheckpointCorruptError,
                               match=r"checksum mismatch in 1 arrays: "
                                     r"params/dense/kernel") as info:
                read()
            assert info.value.step == 2 and info.value.older_steps == [1]
            assert "params/dense/kernel" in info.value.cause
        assert ckpt.verify(1) is True
        restored, _ = ckpt.restore(1, target=abstract(state))
        assert_bit_exact(restored, state)


# tensorstore callbacks of the failed reads hit a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_params_read_also_checks_the_rest_of_the_step(tmp_path):
    """Damage confined to the optimizer state: reading only the params
    used to succeed while a resume failed; both fail now."""
    state = make_state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, metadata={"step": 1})
        ckpt.save(2, make_state(2), metadata={"step": 2})
    _truncate_chunks(tmp_path / "2", b"opt_state.0.mu.")
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(CheckpointCorruptError, match="step 2"):
            ckpt.restore(target=abstract(state))
        with pytest.raises(CheckpointCorruptError, match="opt_state"):
            ckpt.restore_params()
        with pytest.raises(CheckpointCorruptError, match="opt_state"):
            ckpt.verify()
    with pytest.raises(CheckpointCorruptError, match="opt_state"):
        load_params(str(tmp_path), abstract(state["params"]))
    params, meta = load_params(str(tmp_path), step=1)
    assert_bit_exact(params, state["params"])
    assert meta == {"step": 1}


def test_steps_saved_without_checksums_still_restore(tmp_path):
    state = make_state(3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, metadata={"step": 1})
    shutil.rmtree(tmp_path / "1" / "checksums")  # As an older version saved.
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.verify(1) is False
        restored, _ = ckpt.restore(target=abstract(state))
        assert_bit_exact(restored, state)


# ----------------------------------------------------------------------------
# Falling back past a corrupt step; moving steps aside.

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_last_good_and_set_aside(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(step), metadata={"step": step})
    _truncate_data(tmp_path / "3")
    corrupt_files = _files(tmp_path / "3")
    target = abstract(make_state())
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        step, state, meta, skipped = ckpt.restore_last_good(target)
        assert step == 2 and meta == {"step": 2}
        assert_bit_exact(state, make_state(2))
        assert [e.step for e in skipped] == [3] and skipped[0].cause
        assert ckpt.all_steps() == [1, 2, 3]  # Nothing moved or deleted.
        moved = ckpt.set_aside([3])
        assert moved == [str(tmp_path / "superseded" / "3")]
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        assert _files(tmp_path / "superseded" / "3") == corrupt_files
        ckpt.save(3, make_state(4), metadata={"step": 3})  # Free again.
        assert ckpt.set_aside([3]) == [str(tmp_path / "superseded" / "3.1")]
        with pytest.raises(FileNotFoundError, match=r"\[7\]"):
            ckpt.set_aside([7])
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:  # A fresh index.
        assert ckpt.all_steps() == [1, 2]
        _, state, _, _ = ckpt.restore_last_good(target)
        assert_bit_exact(state, make_state(2))
    for step in (1, 2):
        _truncate_data(tmp_path / str(step))
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(CheckpointCorruptError,
                           match=r"No checkpoint in .* restores: step 2: .*"
                                 r"step 1: ") as info:
            ckpt.restore_last_good(target)
        assert info.value.step is None
        with pytest.raises(PermissionError, match="is read-only"):
            ckpt.set_aside([1])


# ----------------------------------------------------------------------------
# Step order and argument validation.

def test_saving_below_the_latest_step_is_refused_and_deletes_nothing(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        ckpt.save(5, make_state(5), metadata={}, metrics={"eval_loss": 1.0})
        ckpt.save(6, make_state(6), metadata={}, metrics={"eval_loss": 2.0})
        with pytest.raises(ValueError, match=r"step must be greater than "
                                             r"the latest step 6.*set_aside"):
            ckpt.save(3, make_state(3), metadata={})
        with pytest.raises(ValueError, match=r"step 6 already exists.*"
                                             r"set_aside"):
            ckpt.save(6, make_state(3), metadata={})
        assert ckpt.all_steps() == [5, 6] and ckpt.latest_step() == 6
        restored, _ = ckpt.restore(target=abstract(make_state()))
        assert_bit_exact(restored, make_state(6))
        # Moving the newer steps aside frees the lower numbers again.
        ckpt.set_aside([6])
        ckpt.save(6, make_state(7), metadata={})
        assert ckpt.all_steps() == [5, 6] and ckpt.latest_step() == 6


@pytest.mark.parametrize("step,error", [(-1, ValueError), (1.0, TypeError),
                                        ("2", TypeError), (True, TypeError),
                                        (None, TypeError)])
def test_save_rejects_a_step_that_is_not_a_non_negative_int(tmp_path, step,
                                                            error):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(error, match="step must be"):
            ckpt.save(step, {"x": jnp.zeros(2)}, metadata={})
        assert ckpt.all_steps() == []
        ckpt.save(np.int64(4), {"x": jnp.zeros(2)}, metadata={})
        assert ckpt.all_steps() == [4]


@pytest.mark.parametrize("value", [1.5, "3", True])
def test_max_to_keep_must_be_a_positive_int(tmp_path, value):
    with pytest.raises((TypeError, ValueError), match="max_to_keep must be"):
        Checkpointer(tmp_path, max_to_keep=value)


def test_restore_rejects_a_step_that_is_not_an_int(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        ckpt.save(1, {"x": jnp.zeros(2)}, metadata={})
        for step in (1.7, 1.0, "x"):
            with pytest.raises(TypeError, match="step must be an int"):
                ckpt.restore(step, target={"x": jnp.zeros(2)})
            with pytest.raises(TypeError, match="step must be an int"):
                ckpt.restore_params(step)


@pytest.mark.parametrize("value", [None, "1.0", True, [1.0], 1 + 2j])
def test_metrics_must_be_real_numbers(tmp_path, value):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"metrics\['eval_loss'\] must be"):
            ckpt.save(1, {"x": jnp.zeros(2)}, metadata={},
                      metrics={"eval_loss": value})
        assert ckpt.all_steps() == []
        ckpt.save(1, {"x": jnp.zeros(2)}, metadata={},
                  metrics={"eval_loss": jnp.float32(0.5), "n": np.int64(3)})
        assert ckpt.best_step() == 1


# ----------------------------------------------------------------------------
# The metadata and metrics are checked against checksums too.

def _edit_json(path: pathlib.Path, edit) -> None:
    """Rewrites a JSON file as valid JSON with ``edit`` applied."""
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_edited_metadata_is_corruption_and_falls_back(tmp_path):
    from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
    # Tuples, int keys and NaN change in the JSON round trip: what is read
    # back is what the checksum was taken of.
    meta = {"schedule_steps": 4, "t": (1, 2), 3: "int key",
            "loss": float("nan")}
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(step), metadata=dict(meta, step=step),
                      metrics={"eval_loss": 1.0})
        _, got = ckpt.restore(target=abstract(make_state()))
        assert got["t"] == [1, 2] and got["3"] == "int key"
        assert ckpt.verify(2) is True
    _edit_json(tmp_path / "2" / "metadata" / "metadata",
               lambda m: m.update(schedule_steps=9))
    target = abstract(make_state())
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for read in (lambda: ckpt.restore(target=target),
                     lambda: ckpt.restore_params(), ckpt.verify):
            with pytest.raises(CheckpointCorruptError,
                               match="metadata read back differ") as info:
                read()
            assert info.value.step == 2 and info.value.older_steps == [1]
        step, state, got, skipped = ckpt.restore_last_good(target)
        assert step == 1 and got["schedule_steps"] == 4
        assert [e.step for e in skipped] == [2]
        assert_bit_exact(state, make_state(1))
    with pytest.raises(CheckpointCorruptError, match="metadata"):
        load_params(str(tmp_path))
    assert [(r.step, r.ok) for r in train.check_workdir(str(tmp_path))] == [
        (1, True), (2, False)]
    # A step saved before the metadata had a checksum loads as it reads.
    _edit_json(tmp_path / "2" / "checksums" / "metadata",
               lambda sums: sums.pop("<metadata>"))
    with Checkpointer(tmp_path, max_to_keep=None, read_only=True) as ckpt:
        assert ckpt.verify(2) is True
        state, got = ckpt.restore(target=target)
        assert got["schedule_steps"] == 9
        assert_bit_exact(state, make_state(2))


def test_edited_or_missing_metrics_fail_verify(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(step), metadata={},
                      metrics={"eval_loss": float(step)})
    _edit_json(tmp_path / "2" / "metrics" / "metrics",
               lambda m: m.update(eval_loss=0.5))
    shutil.rmtree(tmp_path / "1" / "metrics")
    with Checkpointer(tmp_path, max_to_keep=None, read_only=True) as ckpt:
        with pytest.raises(CheckpointCorruptError,
                           match="metrics read back differ"):
            ckpt.verify(2)
        with pytest.raises(CheckpointCorruptError, match="metrics.*missing"):
            ckpt.verify(1)



# ----------------------------------------------------------------------------
# Ranking: unreadable metrics, other metrics, NaN.

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_unreadable_metrics_file_is_named_and_blocks_only_its_step(
        tmp_path):
    from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(step), metadata={"step": step},
                      metrics={"eval_loss": float(step)})
    broken = tmp_path / "2" / "metrics" / "metrics"
    broken.write_text("{not json")
    with pytest.raises(CheckpointCorruptError,
                       match=r"metrics of steps \[2\] do not parse \(" +
                             str(broken)):
        Checkpointer(tmp_path, max_to_keep=None)
    # Reading the other steps does not need the metrics.
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3] and ckpt.latest_step() == 3
        _, meta = ckpt.restore(target=abstract(make_state()))
        assert meta == {"step": 3}
        with pytest.raises(CheckpointCorruptError) as info:
            ckpt.best_step()
        assert info.value.step == 2
        with pytest.raises(CheckpointCorruptError) as info:
            ckpt.verify(2)
        assert info.value.step == 2
    params, meta = load_params(str(tmp_path))
    assert meta == {"step": 3}
    assert_bit_exact(params, make_state(3)["params"])
    assert [(r.step, r.ok) for r in train.check_workdir(str(tmp_path))] == [
        (1, True), (2, False), (3, True)]


def test_a_run_ranked_by_another_metric(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="acc",
                      best_mode="max") as ckpt:
        for step, acc in [(1, 0.9), (2, 0.1), (3, 0.2)]:
            ckpt.save(step, make_state(step), metadata={"step": step},
                      metrics={"acc": acc})
        assert ckpt.all_steps() == [1, 3] and ckpt.best_step() == 1
    params, meta = load_params(str(tmp_path), best=True, best_metric="acc",
                               best_mode="max")
    assert meta == {"step": 1}
    assert_bit_exact(params, make_state(1)["params"])
    with pytest.raises(FileNotFoundError, match="best_metric='eval_loss'"):
        load_params(str(tmp_path), best=True)
    # Ranked by eval_loss, the acc-only steps are not ranked.
    with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        assert ckpt.best_step() is None
        ckpt.save(4, make_state(4), metadata={}, metrics={"eval_loss": 2.0})
        ckpt.save(5, make_state(5), metadata={}, metrics={"eval_loss": 3.0})
        assert ckpt.all_steps() == [4, 5] and ckpt.best_step() == 4


def test_nan_metrics_are_never_best_and_ties_go_to_the_newest(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state(step), metadata={},
                      metrics={"eval_loss": float("nan")})
        assert ckpt.best_step() is None
        with pytest.raises(FileNotFoundError, match="eval_loss"):
            ckpt.restore_best(abstract(make_state()))
        for step in (3, 4):
            ckpt.save(step, make_state(step), metadata={},
                      metrics={"eval_loss": 1.0})
        ckpt.save(5, make_state(5), metadata={}, metrics={"eval_loss": 1.5})
        assert ckpt.best_step() == 4


# ----------------------------------------------------------------------------
# set_aside: argument checks, and a failure part-way.

@pytest.mark.parametrize("steps", [2, "2", [2, 2], [1.0], [True], [-1]])
def test_set_aside_rejects_bad_steps_and_moves_nothing(tmp_path, steps):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"x": jnp.full(2, step)}, metadata={})
        with pytest.raises(ValueError, match="steps must be"):
            ckpt.set_aside(steps)
        assert ckpt.all_steps() == [1, 2]
        assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_set_aside_failing_part_way_leaves_a_true_index(tmp_path,
                                                        monkeypatch):
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"x": jnp.full(2, step)}, metadata={"s": step})
        path_type = type(ckpt.directory)
        rename = path_type.rename

        def failing_rename(self, target):
            if self.name == "3":
                raise OSError("disk gone")
            return rename(self, target)

        monkeypatch.setattr(path_type, "rename", failing_rename)
        with pytest.raises(OSError, match="disk gone"):
            ckpt.set_aside([2, 3])
        monkeypatch.undo()
        assert ckpt.all_steps() == [1, 3] and ckpt.latest_step() == 3
        assert sorted(os.listdir(tmp_path / "superseded")) == ["2"]
        _, meta = ckpt.restore(target={"x": jnp.zeros(2, jnp.int32)})
        assert meta == {"s": 3}
        assert ckpt.set_aside([3]) == [str(tmp_path / "superseded" / "3")]
        assert ckpt.all_steps() == [1]


# ----------------------------------------------------------------------------
# Leaf dtypes: complex is summed, sub-byte types are refused.

def test_complex_leaves_are_summed_as_real_then_imaginary_words(tmp_path,
                                                                rng):
    a = (rng.standard_normal((3, 4))
         + 1j * rng.standard_normal((3, 4))).astype(np.complex64)
    parts = np.stack([a.real, a.imag], axis=-1)  # float32 words re, im.
    got = tree_checksums({"device": jnp.asarray(a), "host": a})
    assert got["device"] == got["host"] == _reference_sums(parts)
    assert got["host"] == _reference_sums(a)  # Words of complex64's bytes.
    c = a.astype(np.complex128)
    assert tree_checksums(c)[""] == _reference_sums(
        np.stack([c.real, c.imag], axis=-1))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"z": jnp.asarray(a)}, metadata={})
        assert ckpt.verify(1) is True
        restored, _ = ckpt.restore(target={"z": jnp.zeros_like(a)})
    assert restored["z"].dtype == np.complex64
    assert np.asarray(restored["z"]).tobytes() == a.tobytes()


@pytest.mark.parametrize("dtype", ["int4", "uint4", "float4_e2m1fn"])
def test_sub_byte_leaves_are_refused_by_path_before_writing(tmp_path, dtype):
    for leaf in (jnp.zeros(4, dtype), np.zeros(4, jnp.dtype(dtype))):
        state = {"params": {"q": leaf, "w": jnp.ones(2)}}
        with Checkpointer(tmp_path) as ckpt:
            with pytest.raises(TypeError,
                               match=f"leaf 'params/q' of dtype {dtype}"):
                ckpt.save(1, state, metadata={})
            assert ckpt.all_steps() == []
        assert not [p for p in tmp_path.iterdir() if p.name[0].isdigit()]
