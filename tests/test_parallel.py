"""Multi-device training and the sequence-parallel scan (flax_minrnn.training.mesh,
flax_minrnn.ops.parallel).

The suite runs on one CPU device.  Checks that need several devices run in
subprocesses with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``:

* ``multidevice_scan.py`` (8 devices, under pytest): the sequence-parallel
  scan equals ``linear_scan`` (outputs, gradients) on 2, 4, 8 shards;
* ``multidevice_train.py`` (8 devices, under pytest): layers and LM with the
  switch on equal off; a sharded training step (data-parallel, FSDP, FSDP +
  sequence-parallel) equals the single-device step; bad meshes name numbers;
* ``multidevice_checkpoint.py`` (a script): a run on 8 devices, resumed from
  its checkpoint on 1 (this process) and 4 devices.

Everything else here runs in this process.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flax_minrnn.training import checkpoint as ckpt_lib
from flax_minrnn.training import config as config_lib
from flax_minrnn.nn import recurrent as layers
from flax_minrnn.models import lm as lm
from flax_minrnn.training import mesh as parallel
from flax_minrnn.training import train as train
from flax_minrnn.ops import scan as scan_lib

from conftest import TOL

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _env(n_devices: int) -> dict:
    # Keeps the inherited XLA flags (conftest's compile settings) but the device count.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}", JAX_PLATFORMS="cpu",
                XLA_FLAGS=" ".join(flags))


def _run(n_devices: int, args, timeout: int = 900) -> str:
    """Runs ``python *args`` on ``n_devices`` host devices; returns its output."""
    proc = subprocess.run([sys.executable, *args], cwd=str(REPO), env=_env(n_devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


def _pytest_on_8_devices(*modules: str) -> None:
    _run(8, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
             "-o", "python_files=multidevice_*.py", *(str(TESTS / m) for m in modules)])


# ----------------------------------------------------------------------------
# Several devices (subprocesses).


def test_scan_layers_lm_and_train_step_sharded_on_8_devices():
    """multidevice_scan.py (sequence-parallel scan on 2, 4 and 8 shards) and
    multidevice_train.py (sharded layers, LM and train step), in one
    8-device process."""
    _pytest_on_8_devices("multidevice_scan.py", "multidevice_train.py")


def _flat(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _train_losses(workdir) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def _ckpt_config(**mesh):
    config = config_lib.shrink(config_lib.default_config())
    config = config_lib.apply_overrides(config, [
        "data.batch_size=8", "data.seq_len=16", "model.dropout=0.1", "train.num_steps=4",
        "train.checkpoint_every=2", "train.eval_every=2", "train.max_to_keep=3",
        "optim.warmup_steps=2"])
    values = config.to_dict()
    values["mesh"].update(mesh)
    return config_lib.validate(values)


def test_checkpoint_from_8_devices_restores_on_1_and_4(tmp_path):
    """A run on 8 devices (FSDP over 'data' = 2, time split over 'seq' = 4)
    checkpoints steps 2 and 4.  Its step 2 restores bit-exactly on 4 devices
    (another mesh: FSDP over 'data' = 4) and on 1 device (no mesh), each into
    its own shardings, and training resumed there to step 4 matches the
    8-device run's step 4 (float tolerance: reductions split differently)."""
    cfg8 = _ckpt_config(shape=(2, 4), axis_names=("data", "seq"), fsdp=True,
                        sequence_axis="seq")
    cfg4 = _ckpt_config(shape=(4,), axis_names=("data",), fsdp=True)
    cfg1 = _ckpt_config()
    runs = {n: tmp_path / f"run{n}" for n in (8, 4, 1)}

    def script(n, config, workdir):
        path = tmp_path / f"config{n}.json"
        path.write_text(config_lib.config_to_json(config))
        dump = tmp_path / f"dump{n}.npz"
        _run(n, [str(TESTS / "multidevice_checkpoint.py"), str(path), str(workdir), str(dump)])
        return dict(np.load(dump))

    dump8 = script(8, cfg8, runs[8])
    for n in (4, 1):  # The 8-device run as it was at step 2.
        shutil.copytree(runs[8], runs[n])
        shutil.rmtree(runs[n] / "checkpoints" / "4")
    dump4 = script(4, cfg4, runs[4])

    # One device: this process (no mesh at all; the default path).
    assert jax.device_count() == 1
    train.train_and_evaluate(cfg1, str(runs[1]))
    ckdir = str(runs[1] / "checkpoints")
    dump1 = {f"{s}/{k}": v for s in (2, 4)
             for k, v in _flat(ckpt_lib.load_params(ckdir, step=s)[0]).items()}

    assert dump8.keys() == dump4.keys() == dump1.keys()
    for key in dump8:
        if key.startswith("2/"):  # Restored: bit-exact on 8, 4 and 1 devices.
            assert dump4[key].tobytes() == dump8[key].tobytes(), key
            assert dump1[key].tobytes() == dump8[key].tobytes(), key
        else:  # Trained on: the same up to float rounding.
            np.testing.assert_allclose(dump4[key], dump8[key], **TOL["float32"], err_msg=key)
            np.testing.assert_allclose(dump1[key], dump8[key], **TOL["float32"], err_msg=key)
    losses = _train_losses(runs[8])
    for n in (4, 1):
        resumed = _train_losses(runs[n])
        assert sorted(resumed) == [1, 2, 3, 4]
        np.testing.assert_allclose([resumed[s] for s in (3, 4)], [losses[s] for s in (3, 4)],
                                   **TOL["float32"])
        assert config_lib.load_saved_config(str(runs[n])).mesh.to_dict() == \
            (cfg4 if n == 4 else cfg1).mesh.to_dict()


# ----------------------------------------------------------------------------
# One device (this process).


@pytest.mark.parametrize("shape, n, spec", [
    ((64, 16), 8, P("data")),             # largest dimension first
    ((16, 65), 8, P("data")),             # 65 is not divisible: the next largest
    ((65, 16), 8, P(None, "data")),
    ((32, 32), 4, P("data")),             # ties: the first
    ((3, 5), 2, P()),                     # nothing divisible: replicated
    ((), 8, P()),                         # scalars (optimizer counts)
    ((4,), 8, P()),                       # smaller than the axis
    ((2, 3, 24), 8, P(None, None, "data")),
])
def test_fsdp_rule(shape, n, spec):
    assert parallel.fsdp_spec(shape, "data", n) == spec


def test_mesh_config_keys_overrides_and_json():
    config = config_lib.apply_overrides(config_lib.default_config(), [
        "mesh.shape=2,4", "mesh.axis_names=(data, seq)", "mesh.fsdp=true",
        "mesh.sequence_axis=seq"])
    assert config.mesh.shape == [2, 4] and config.mesh.axis_names == ["data", "seq"]
    assert config.mesh.fsdp and config.mesh.sequence_axis == "seq"
    assert config.mesh.data_axis == "data"
    text = config_lib.config_to_json(config)
    assert json.loads(text)["mesh"] == config.mesh.to_dict()  # the same values in JSON
    assert config_lib.config_from_json(text).to_dict() == config.to_dict()
    assert config_lib.default_config().mesh.shape == []  # one device by default
    tuples = config_lib.validate({"mesh": {"shape": (2, 4), "axis_names": ("a", "b")}})
    assert tuples.mesh.shape == [2, 4] and tuples.mesh.axis_names == ["a", "b"]
    empty = config_lib.apply_overrides(config, ["mesh.shape=", "mesh.axis_names=[]"])
    assert empty.mesh.shape == [] and empty.mesh.axis_names == []
    with pytest.raises(config_lib.ConfigError, match="mesh.shape"):
        config_lib.apply_overrides(config, ["mesh.shape=2,x"])
    with pytest.raises(config_lib.ConfigError, match=r"mesh.shape.*list of int"):
        config_lib.validate({"mesh": {"shape": 8}})
    with pytest.raises(config_lib.ConfigError, match=r"mesh.axis_names.*list of str"):
        config_lib.validate({"mesh": {"axis_names": ("data", 1)}})
    for key in ("mesh.shape", "mesh.axis_names", "mesh.fsdp", "mesh.sequence_axis",
                "mesh.data_axis"):
        assert key in train.RESUMABLE_KEYS  # resume on another device count


@pytest.mark.parametrize("mesh, match", [
    ("one more than there are", r"needs {n_plus_1} devices but only {n} "),
    (dict(shape=(1, -1, -1), axis_names=("a", "b", "c")), r"at most one -1"),
    (dict(shape=(1, 0), axis_names=("a", "b")), r"positive sizes"),
    (dict(shape=(1,), axis_names=("a", "b")), r"same length"),
    (dict(shape=(1, 1), axis_names=("a", "a")), r"distinct"),
    (dict(shape=(1,), axis_names=("batch",)), r"mesh.data_axis='data' is not one of"),
    (dict(shape=(1,), axis_names=("data",), sequence_axis="seq"),
     r"mesh.sequence_axis='seq' is not one of"),
    (dict(shape=(1,), axis_names=("data",), sequence_axis="data"), r"must differ"),
    (dict(shape=(1,), axis_names=("seq",), data_axis="", fsdp=True), r"fsdp=True needs"),
    (dict(axis_names=("data",)), r"without a mesh.shape"),
    (dict(fsdp=True), r"need a mesh"),
])
def test_bad_mesh_config_is_named(mesh, match):
    n = jax.device_count()
    if mesh == "one more than there are":
        mesh = dict(shape=(n + 1,), axis_names=("data",))
        match = match.format(n=n, n_plus_1=n + 1)
    config = config_lib.validate({"mesh": mesh})
    with pytest.raises(ValueError, match=match):
        parallel.plan_from_config(config.mesh)


def test_mesh_of_all_devices_and_default():
    plan = parallel.plan_from_config(config_lib.validate(
        {"mesh": dict(shape=(-1,), axis_names=("data",), fsdp=True)}).mesh)
    assert plan.mesh.shape == {"data": jax.device_count()} and plan.fsdp
    assert plan.batch_spec() == P("data", None)
    assert parallel.plan_from_config(config_lib.default_config().mesh) is None


def test_sequence_axis_needs_a_mesh_axis_and_a_parallel_recurrence():
    x = jnp.ones((2, 4, 3), jnp.float32)
    layer = layers.MinGRU(d_h=3, sequence_axis="seq")
    with pytest.raises(ValueError, match=r"'seq' is not an axis of the current mesh"):
        layer.init(jax.random.key(0), x)
    with jax.set_mesh(parallel.make_mesh((1,), ("data",))):
        with pytest.raises(ValueError, match=r"'seq' is not an axis.*\('data',\)"):
            layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_true_recurrence=False"):
        layer.clone(use_true_recurrence=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="sequence_axis"):
        lm.LMConfig(vocab_size=5, sequence_axis="seq", use_true_recurrence=True)
    with pytest.raises(ValueError, match="sequence_axis"):
        lm.LMConfig(vocab_size=5, sequence_axis="")


def test_one_shard_is_linear_scan_and_params_do_not_change():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
    reset = jnp.asarray(rng.uniform(size=(2, 6)) < 0.3)
    off = layers.GatedLinearRNN(d_h=4, reverse=True)
    params = off.init(jax.random.key(0), x)
    with jax.set_mesh(parallel.make_mesh((1,), ("seq",))):
        on = off.clone(sequence_axis="seq")
        params_on = jax.jit(on.init)(jax.random.key(0), x)
        got = jax.jit(functools.partial(on.apply, reset=reset))(params, x)
    jax.tree.map(np.testing.assert_array_equal, params_on, params)
    for a, b in zip(got, jax.jit(functools.partial(off.apply, reset=reset))(params, x)):
        np.testing.assert_allclose(a, b, **TOL["float32"])


def test_distributed_arguments_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="all of coordinator_address"):
        parallel.initialize_distributed("localhost:1234", None, 0)
    with pytest.raises(ValueError, match=r"process_id=2 must lie in \[0, num_processes=2\)"):
        parallel.initialize_distributed("localhost:1234", 2, 2)
    from flax_minrnn import cli
    code = cli.main(["train", "--config", str(REPO / "configs" / "shakespeare.py"),
                     "--workdir", str(tmp_path), "--num-processes", "2"])
    assert code == 2 and "--coordinator-address" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_parallel_tiny(tmp_path):
    """The benchmark harness runs (T = 16, one repeat); it measures nothing."""
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_parallel
    from benchmarks.harness import Repeats
    res = bench_parallel.run([16], b=2, d=8, repeats=Repeats(max_n=1, min_n=1, budget_s=0.0),
                             log=lambda s: None)
    paths = bench_parallel.write_outputs(res, str(tmp_path))
    with open(paths["json"]) as fh:
        rows = json.load(fh)["rows"]
    assert {(r["name"], r["mode"]) for r in rows} == {
        (name, mode) for name in ("linear_scan", "sequence_parallel[1]")
        for mode in ("fwd", "fwdbwd")}
    assert all(r["median_ms"] > 0 and r["vs_linear_scan"] > 0 for r in rows)
    with open(paths["md"]) as fh:
        assert "| sequence_parallel[1] |" in fh.read()
    assert bench_parallel.shard_counts(8) == [1, 2, 4, 8]
    assert bench_parallel.shard_counts(6) == [1, 2, 4, 6]


@pytest.mark.slow
def test_two_processes_with_jax_distributed(tmp_path):
    """The README's several-hosts command on one machine: 2 processes x 2 CPU
    devices (gloo collectives), FSDP over 4 devices; equals one device."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    overrides = ["mesh.shape=4", "mesh.axis_names=data", "mesh.fsdp=true",
                 "model.n_layer=1", "model.d_model=16", "data.seq_len=16",
                 "data.batch_size=8", "data.eval_batches=1", "train.num_steps=2",
                 "train.eval_every=1", "train.checkpoint_every=1", "train.sample_length=8",
                 "train.progress_bar=false"]
    workdir = tmp_path / "run"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "flax_minrnn", "train", "--config",
         str(REPO / "configs" / "shakespeare.py"), "--workdir", str(workdir),
         "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
         "--process-id", str(i), *overrides],
        cwd=str(REPO), env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    config = config_lib.load_config(str(REPO / "configs" / "shakespeare.py"),
                                    overrides + ["mesh.shape=", "mesh.axis_names=",
                                                 "mesh.fsdp=false"])
    train.train_and_evaluate(config, str(tmp_path / "single"))
    got = _flat(ckpt_lib.load_params(str(workdir / "checkpoints"))[0])
    want = _flat(ckpt_lib.load_params(str(tmp_path / "single" / "checkpoints"))[0])
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], **TOL["float32"], err_msg=key)


def test_linear_scan_without_h0_inside_a_users_shard_map(rng):
    """A zero initial state works inside shard_map (it is built like ``a``)."""
    mesh = jax.make_mesh((1,), ("b",))
    a = jnp.asarray(rng.uniform(0.5, 1.0, (2, 9, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 9, 3)), jnp.float32)
    spec = jax.sharding.PartitionSpec("b")
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    for impl in ("sequential", "chunked", "associative"):
        f = jax.jit(jax.shard_map(lambda a, b: scan_lib.linear_scan(a, b, impl=impl)[1],
                                  mesh=mesh, in_specs=(spec, spec), out_specs=spec))
        np.testing.assert_allclose(f(put(a), put(b)), scan_lib.linear_scan(a, b, impl=impl)[1],
                                   rtol=1e-6, atol=1e-6)
