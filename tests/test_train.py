"""Tests of the training loop: configs, resume, corruption, NaN, two-stage."""

import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn.training import checkpoint as ckpt_lib
from flax_minrnn.training import config as config_lib
from flax_minrnn.training import train as train

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.py")))
# Shrunk task sizes (``shrink`` leaves ``data.task_kwargs`` alone).
SMALL_TASKS = {
    "selective_copying": ["data.task_kwargs.noise_length=8",
                          "data.task_kwargs.num_tokens_to_memorize=4"],
    "parity": ["data.task_kwargs.max_len=6"],
    "mqar": ["data.task_kwargs.num_kv_pairs=4",
             "data.task_kwargs.num_queries=4"],
    "s5": ["data.task_kwargs.max_len=6"],
}


def small_config(path: str, *overrides: str) -> config_lib.ConfigDict:
    """Loads ``path``, shrinks it and applies ``overrides``."""
    config = config_lib.shrink(config_lib.load_config(path))
    task = SMALL_TASKS.get(config.data.name, [])
    return config_lib.apply_overrides(config, [*task, *overrides])


SHAKESPEARE = str(REPO / "configs" / "shakespeare.py")
STAGE2 = str(REPO / "configs" / "shakespeare_stage2.py")


def flat_params(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def final_params(workdir) -> dict:
    params, _ = ckpt_lib.load_params(os.path.join(workdir, "checkpoints"))
    return flat_params(params)


def assert_params_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


_TIMINGS = ("tokens_per_sec", "wall_time", "time")


def logged(workdir) -> dict:
    """What a run logged, but for timings: metric lines, samples, and the
    TensorBoard scalars as TensorBoard shows them."""
    lines = [{k: v for k, v in r.items() if k not in _TIMINGS}
             for r in read_metrics(workdir)]
    samples = pathlib.Path(workdir, train.SAMPLES_FILE).read_text("utf-8")
    return dict(lines=lines, samples=samples,
                tb=[e for e in tb_scalars(workdir)
                    if not e[0].endswith("tokens_per_sec")])


def tb_scalars(workdir) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of every scalar in ``workdir/tb``, read as
    TensorBoard does: files in name order, and an event carrying
    ``SessionLog.START`` at step s hides the earlier-read events at steps
    >= s."""
    from tensorboardX.proto import event_pb2
    shown = []
    for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
        data, i = pathlib.Path(path).read_bytes(), 0
        while i < len(data):  # TFRecords: u64 length, u32 crc, data, u32 crc.
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if (event.HasField("session_log") and event.session_log.status
                    == event_pb2.SessionLog.START):
                shown = [e for e in shown if e[1] < event.step]
            shown += [(v.tag, event.step, v.simple_value)
                      for v in event.summary.value]
    return shown


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A tiny finished char run: 4 steps, checkpoints at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("char_run"))
    config = small_config(SHAKESPEARE, "train.num_steps=4",
                          "train.checkpoint_every=2", "train.eval_every=2")
    metrics = train.train_and_evaluate(config, workdir)
    return workdir, config, metrics


def test_char_run_artifacts(char_run):
    workdir, _, metrics = char_run
    assert metrics["step"] == 4 and np.isfinite(metrics["eval_loss"])
    assert isinstance(metrics["sample"], str) and metrics["sample"]
    names = set(os.listdir(workdir))
    assert {"config.json", "checkpoints", "metrics.jsonl", "tb",
            "samples.txt"} <= names
    assert os.listdir(os.path.join(workdir, "tb"))
    records = read_metrics(workdir)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    trains = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in trains] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "lr", "tokens_per_sec", "wall_time"):
        assert key in trains[0]
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               read_only=True) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    _, meta = ckpt_lib.load_params(os.path.join(workdir, "checkpoints"))
    assert config_lib.config_from_json(meta["config"]).to_dict() == \
        char_run[1].to_dict()
    assert meta["vocab"] and meta["data_position"] == 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_loads_and_trains_two_steps(path, tmp_path, char_run):
    config = config_lib.load_config(path)
    assert config.train.num_steps >= 100  # The real (unshrunk) job.
    overrides = []
    if config.init_from.workdir:  # Stage 2: start from the tiny stage-1 run.
        overrides.append(f"init_from.workdir={char_run[0]}")
    config = small_config(path, *overrides)
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert metrics["step"] == 2
    assert np.isfinite(metrics["eval_loss"])
    assert np.isfinite(metrics["train_loss"])


def test_lm_config_translation():
    config = config_lib.load_config(SHAKESPEARE, ["model.d_h=0",
                                                  "model.param_dtype=bfloat16"])
    lm = train.lm_config(config, 65)
    assert lm.vocab_size == 65 and lm.d_h is None
    assert lm.d_channel_mixing is None
    assert np.dtype(lm.param_dtype) == np.dtype("bfloat16")
    bad = config_lib.apply_overrides(config, ["model.dtype=float8"])
    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        train.lm_config(bad, 65)
    # Errors name the config key, and the range the key allows.
    for override, match in (("model.d_model=0", r"^model\.d_model must be"),
                            ("model.d_h=-3", r"^model\.d_h must be >= 0 \(0: derived")):
        with pytest.raises(config_lib.ConfigError, match=match):
            train.lm_config(config_lib.apply_overrides(config, [override]), 65)
    griffin = config_lib.load_config("configs/griffin_shakespeare.py")
    for override, match in (("model.griffin.lru_width=-1", r"^model\.griffin\.lru_width must "
                                                           r"be >= 0"),
                            ("model.griffin.num_attention_heads=3",
                             r"^model\.griffin\.num_attention_heads=3 must divide")):
        with pytest.raises(config_lib.ConfigError, match=match):
            train.griffin_config(config_lib.apply_overrides(griffin, [override]), 65)


def test_weight_decay_mask_and_freeze():
    config = config_lib.load_config(SHAKESPEARE, [
        "optim.no_decay_regex=bias", "init_from.freeze_regex=^w$"])
    params = {"w": np.ones((2, 2), np.float32),
              "v": np.ones((2, 2), np.float32),
              "bias": np.ones((2, 2), np.float32),
              "scale": np.ones((2,), np.float32)}
    tx = train.make_optimizer(config, params)
    state = tx.init(params)
    grads = jax.tree.map(np.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict.
        for _ in range(3):  # lr is 0 at step 0 (warmup).
            updates, state = tx.update(grads, state, params)
    updates = {k: np.asarray(v) for k, v in updates.items()}
    assert np.all(updates["w"] == 0)          # Frozen.
    assert np.all(updates["v"] < 0)           # Decayed (zero gradient).
    assert np.all(updates["bias"] == 0)       # Matches no_decay_regex.
    assert np.all(updates["scale"] == 0)      # 1-D.


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import jax
    # The same numerics flags as tests/conftest.py (bit-exact comparison).
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_disable_most_optimizations", True)
    from flax_minrnn.training import checkpoint as checkpoint
    from flax_minrnn.training import config as config_lib
    from flax_minrnn.training import train as train
    config_path, workdir, flag, block_from, *overrides = sys.argv[1:]
    original = checkpoint.Checkpointer.save
    def save(self, step, *args, **kwargs):
        if step >= int(block_from):  # Hang here until SIGKILLed.
            open(flag, "w").close()
            time.sleep(600)
        return original(self, step, *args, **kwargs)
    checkpoint.Checkpointer.save = save
    config = config_lib.load_config(config_path, overrides)
    train.train_and_evaluate(config, workdir)
""")


# Log every 2 steps and sample every 3 steps: steps 3 and 5 (checkpoints
# below) fall inside a train-loss window.
RESUME = ["train.num_steps=8", "train.checkpoint_every=3",
          "train.eval_every=4", "train.log_every=2", "train.sample_every=3",
          "model.dropout=0.1",
          "model.embedding_dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    train.train_and_evaluate(small_config(SHAKESPEARE, *RESUME), workdir)
    return workdir


def test_sigkilled_then_resumed_is_bit_exact(uninterrupted, tmp_path):
    """A subprocess is SIGKILLed after checkpoint 3, while it is about to
    save step 6 (steps 4-6 computed, unsaved); resuming recomputes them."""
    workdir, flag = str(tmp_path / "run"), str(tmp_path / "blocked")
    config = small_config(SHAKESPEARE, *RESUME)
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from flax_minrnn.training.config import config_from_json\n"
        f"def get_config():\n    return config_from_json({config_lib.config_to_json(config)!r})\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(config_file), workdir, flag,
         "4"], cwd=str(REPO), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 100
        while not os.path.exists(flag):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "subprocess never reached step 6"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               read_only=True) as ckpt:
        assert ckpt.all_steps() == [3]
    # What the killed process logged after step 3 is set aside.
    killed = logged(workdir)
    assert max(r["step"] for r in killed["lines"]) > 3
    assert "=== step 6 ===" in killed["samples"]
    metrics = train.train_and_evaluate(config, workdir)
    assert metrics["step"] == 8
    assert_params_equal(final_params(workdir), final_params(uninterrupted))
    assert logged(workdir) == logged(uninterrupted)
    superseded = pathlib.Path(workdir, train.SUPERSEDED_SAMPLES_FILE).read_text("utf-8")
    assert superseded.startswith("=== step 6 ===\n")
    assert superseded in logged(uninterrupted)["samples"]


def test_stopped_then_resumed_is_bit_exact(uninterrupted, tmp_path):
    config = small_config(SHAKESPEARE, *RESUME)
    workdir = str(tmp_path)
    assert train.train_and_evaluate(config, workdir,
                                    stop_at_step=5)["step"] == 5
    train.train_and_evaluate(config, workdir)
    assert_params_equal(final_params(workdir), final_params(uninterrupted))
    # The train-loss line of step 6 averages steps 5 and 6, one from each
    # process; samples and TensorBoard show one run.
    expected = logged(uninterrupted)
    assert [r["step"] for r in expected["lines"] if r["split"] == "train"] == [2, 4, 6, 8]
    assert expected["samples"].count("=== step") == 3  # Steps 3, 6 and 8.
    assert logged(workdir) == expected
    # Resuming a finished run only re-evaluates: it logs nothing new, and
    # its final sample replaces the one it rewrites.
    again = train.train_and_evaluate(config, workdir)
    assert again["step"] == 8
    assert_params_equal(final_params(workdir), final_params(uninterrupted))
    assert logged(workdir) == expected


def test_resume_with_other_config_is_an_error(char_run):
    workdir, config, _ = char_run
    other = config_lib.apply_overrides(config, ["optim.learning_rate=0.5"])
    with pytest.raises(config_lib.ConfigError, match="optim.learning_rate"):
        train.train_and_evaluate(other, workdir)


def test_resume_checks_the_checkpoints_own_config(char_run, tmp_path):
    """Without workdir/config.json the restored step's saved config is the
    reference; keys read only on a fresh start may change."""
    workdir = tmp_path / "run"
    shutil.copytree(char_run[0], workdir)
    os.remove(workdir / config_lib.CONFIG_FILENAME)
    other = config_lib.apply_overrides(char_run[1], ["optim.learning_rate=0.5", "seed=7"])
    with pytest.raises(config_lib.ConfigError, match="optim.learning_rate.*seed"):
        train.train_and_evaluate(other, str(workdir))
    same = config_lib.apply_overrides(char_run[1], [
        "init_from.workdir=/moved/stage1", "train.sample_length=5",
        "train.sample_prompt=A", "train.sample_temperature=0.5"])
    assert train.train_and_evaluate(same, str(workdir))["step"] == 4


def test_resume_with_a_changed_corpus_is_an_error(char_run, tmp_path):
    """Same size of vocabulary, other characters: ids would shift."""
    text = (REPO / "flax_minrnn" / "training" / "data" / "tinyshakespeare"
            / "input.txt").read_text()
    assert "#" not in text and "z" in text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    config = config_lib.apply_overrides(char_run[1], [f"data.path={corpus}",
                                                      "train.num_steps=2"])
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    corpus.write_text(text.replace("z", "#"))
    more = config_lib.apply_overrides(config, ["train.num_steps=4"])
    with pytest.raises(config_lib.ConfigError, match="another vocabulary"):
        train.train_and_evaluate(more, workdir)


def test_sample_past_learned_positions_is_refused_before_training(char_run, tmp_path):
    # Positions 0 .. prompt + length - 2 are fed to the model.
    longest = 32 - len(char_run[1].train.sample_prompt) + 1
    config = config_lib.apply_overrides(char_run[1], [
        "model.positional_encoding=learned", "model.max_seq_length=32",
        f"train.sample_length={longest + 1}"])
    with pytest.raises(config_lib.ConfigError,
                       match=rf"train.sample_length: prompt length {32 - longest + 1} \+ "
                             rf"max_new_tokens {longest + 1} - 1 exceeds max_seq_length=32"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    fits = config_lib.apply_overrides(config, [f"train.sample_length={longest}",
                                               "train.num_steps=1"])
    assert "sample" in train.train_and_evaluate(fits, str(tmp_path / "run"))


@pytest.mark.parametrize("threshold", [0.0, 0.1], ids=["plain", "stop_at_accuracy"])
def test_lowering_num_steps_to_a_step_saved_without_eval(tmp_path, capsys, threshold):
    """The re-evaluation of a step saved without an eval is logged, and
    reaching train.stop_at_eval_accuracy there does not save it again."""
    config = small_config(str(REPO / "configs" / "parity.py"), "train.num_steps=10",
                          "train.eval_every=100", "train.checkpoint_every=4",
                          "optim.learning_rate=0.02",
                          f"train.stop_at_eval_accuracy={threshold}")
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, stop_at_step=4)
    evals = lambda: [(r["step"], r["accuracy"]) for r in read_metrics(workdir)
                     if r["split"] == "eval"]
    assert [s for s, _ in evals()] == [0] and evals()[0][1] < 0.1
    shorter = config_lib.apply_overrides(config, ["train.num_steps=4"])
    capsys.readouterr()
    metrics = train.train_and_evaluate(shorter, workdir)
    assert "train.num_steps=4 is not past step 4: nothing trains" in capsys.readouterr().out
    assert metrics["finished"] and metrics["step"] == 4
    assert evals()[1:] == [(4, metrics["eval_accuracy"])]
    assert metrics["eval_accuracy"] > 0.1
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
        assert ckpt.all_steps() == [4]


def test_a_missing_stage_one_run_names_init_from(tmp_path):
    config = small_config(STAGE2, f"init_from.workdir={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match=r"^init_from.workdir=.*nowhere.*No checkpoints"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_stage_one_run_names_init_from_and_how_to_recover(
        char_run, tmp_path):
    source = tmp_path / "stage1"
    shutil.copytree(char_run[0], source)
    for f in (source / "checkpoints" / "4" / "state" / "d").iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    config = small_config(STAGE2, f"init_from.workdir={source}")
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    # Not a CheckpointCorruptError, whose CLI message advises this run's
    # --step / --fallback-to-last-good.
    assert not isinstance(info.value, ckpt_lib.CheckpointCorruptError)
    message = str(info.value)
    assert message.startswith(f"init_from.workdir={str(source)!r}")
    assert str(source / "checkpoints" / "4") in message
    assert str(source / "checkpoints" / "superseded") in message
    assert "--step" not in message and "fallback" not in message


def _hashes(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint(char_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(char_run[0], workdir)
    ckdir = workdir / "checkpoints"
    good = _hashes(ckdir / "2")
    for f in (ckdir / "4" / "state" / "d").iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    config = config_lib.apply_overrides(char_run[1], ["train.num_steps=6"])
    with pytest.raises(ckpt_lib.CheckpointCorruptError) as info:
        train.train_and_evaluate(config, str(workdir))
    assert info.value.step == 4 and info.value.older_steps == [2]
    assert "corrupt" in str(info.value)
    assert _hashes(ckdir / "2") == good
    assert (ckdir / "4").is_dir()
    with ckpt_lib.Checkpointer(str(ckdir), read_only=True) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    corrupt = _hashes(ckdir / "4")
    with pytest.raises(ValueError, match="not both"):
        train.train_and_evaluate(config, str(workdir), step=2,
                                 fallback_to_last_good=True)
    # Falling back redoes steps 3-4 exactly as the original run did and
    # keeps the corrupt step, moved aside.
    metrics = train.train_and_evaluate(char_run[1], str(workdir),
                                       fallback_to_last_good=True)
    assert metrics["step"] == 4
    assert_params_equal(final_params(workdir), final_params(char_run[0]))
    assert _hashes(ckdir / "superseded" / "4") == corrupt
    assert [e["step"] for e in read_metrics(workdir)
            if e["split"] == "eval"] == [0, 2, 4]
    # The metric lines of the steps redone are kept aside, not deleted.
    with open(workdir / train.SUPERSEDED_METRICS_FILE) as f:
        superseded = [json.loads(line) for line in f]
    assert superseded == [r for r in read_metrics(char_run[0]) if r["step"] > 2]
    assert superseded


def test_empty_sample_prompt_is_refused_before_training(char_run, tmp_path):
    config = config_lib.apply_overrides(char_run[1], ["train.sample_prompt="])
    with pytest.raises(config_lib.ConfigError, match="train.sample_prompt: .*one character"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _schedule_reference(lr, warmup, n, min_ratio, s):
    """Warmup + cosine of learning_rate_schedule, in float64."""
    end = lr * min_ratio
    if s < warmup:
        return lr * s / warmup
    if s >= n:
        return end
    return end + (lr - end) * (1 + np.cos(np.pi * (s - warmup) / (n - warmup))) / 2


def test_resume_with_more_steps_keeps_the_schedule(char_run, tmp_path,
                                                   capsys):
    """The rule: the schedule keeps the length of the run's first start;
    steps past it train at the final rate."""
    workdir = str(tmp_path / "run")
    shutil.copytree(char_run[0], workdir)
    config = char_run[1]
    o = config.optim
    for n in (4, 7):
        schedule = train.learning_rate_schedule(config, n)
        for s in range(10):
            np.testing.assert_allclose(
                train._lr(schedule, s),  # pylint: disable=protected-access
                _schedule_reference(o.learning_rate, min(o.warmup_steps, n - 1),
                                    n, o.min_lr_ratio, s), rtol=1e-6)
    original = {r["step"]: r["lr"] for r in read_metrics(workdir)
                if r["split"] == "train"}
    capsys.readouterr()
    longer = config_lib.apply_overrides(config, ["train.num_steps=7"])
    assert train.train_and_evaluate(longer, workdir)["step"] == 7
    out = capsys.readouterr().out
    end = o.learning_rate * o.min_lr_ratio
    assert ("train.num_steps is 7, the run started with 4: the learning-rate "
            "schedule keeps its 4-step length; steps 5-7 train at its final "
            f"rate {end:.4g}") in out
    lrs = {r["step"]: r["lr"] for r in read_metrics(workdir)
           if r["split"] == "train"}
    assert {s: lrs[s] for s in original} == original
    for s in (5, 6, 7):
        assert lrs[s] == pytest.approx(end, rel=1e-6)
    _, meta = ckpt_lib.load_params(os.path.join(workdir, "checkpoints"))
    assert meta["step"] == 7 and meta["schedule_steps"] == 4
    assert train.schedule_note(config, 4) is None
    assert "training stops at step 3" in train.schedule_note(
        config_lib.apply_overrides(config, ["train.num_steps=3"]), 4)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = small_config(SHAKESPEARE, "optim.learning_rate=1e30",
                          "optim.weight_decay=0.0", "train.num_steps=20",
                          "train.eval_every=100")
    with pytest.raises(FloatingPointError, match=r"at step \d+") as info:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert 1 < bad_step <= 20
    ckdir = str(tmp_path / "checkpoints")
    with ckpt_lib.Checkpointer(ckdir, read_only=True) as ckpt:
        steps = ckpt.all_steps()
    assert steps and steps[-1] == bad_step - 1  # checkpoint_every=1
    params, meta = ckpt_lib.load_params(ckdir)
    assert meta["step"] == bad_step - 1
    for leaf in jax.tree.leaves(params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert f"step {bad_step - 1}" in str(info.value)


def test_bad_config_is_named(tmp_path):
    config = config_lib.load_config(SHAKESPEARE).to_dict()
    config["model"]["d_modle"] = 3
    with pytest.raises(config_lib.ConfigError, match="model.d_modle"):
        train.train_and_evaluate(config, "/nonexistent/never/created")
    bad = config_lib.load_config(
        SHAKESPEARE, ["train.sample_prompt=\u00e9t\u00e9"])
    with pytest.raises(config_lib.ConfigError, match="sample_prompt"):
        train.train_and_evaluate(bad, str(tmp_path))


def test_two_stage_starts_where_stage_one_ended(char_run, tmp_path):
    stage1, _, stage1_metrics = char_run
    # Freeze everything but the new recurrent kernels.
    config = small_config(STAGE2, f"init_from.workdir={stage1}",
                          "init_from.freeze_regex=^(?!.*recurrent_kernel)")
    assert config.model.use_true_recurrence
    dataset = train.build_dataset(config)
    model = train.LM(train.lm_config(config, dataset.vocab_size))
    params = train.initial_params(config, model,
                                  np.zeros((1, 16), np.int32), dataset.vocab)
    flat = flat_params(params)
    recurrent = [k for k in flat if "recurrent_kernel" in k]
    assert recurrent
    for k in recurrent:
        assert np.all(flat[k] == 0), k
    loaded = final_params(stage1)
    for k, v in loaded.items():
        np.testing.assert_array_equal(flat[k], v, err_msg=k)

    workdir = str(tmp_path / "stage2")
    train.train_and_evaluate(config, workdir)
    first_eval = [r for r in read_metrics(workdir) if r["split"] == "eval"][0]
    assert first_eval["step"] == 0
    last_stage1 = [r for r in read_metrics(stage1) if r["split"] == "eval"][-1]
    np.testing.assert_allclose(first_eval["loss"], last_stage1["loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(first_eval["loss"],
                               stage1_metrics["eval_loss"], rtol=1e-5)
    trained = final_params(workdir)
    for k, v in loaded.items():  # Frozen.
        np.testing.assert_array_equal(trained[k], v, err_msg=k)


def test_cpu_kernels_switch_only_the_auto_mingru_minlstm_scan():
    """train.cpu_kernels turns the compiled CPU kernels on for MinGRU/MinLSTM
    when model.scan_impl is 'auto' (on a CPU where they build), and nowhere
    else; the model's parameters do not depend on it."""
    from flax_minrnn.backends import native  # pylint: disable=import-outside-toplevel
    base = config_lib.default_config()
    on_cpu = "native" if native.available() else "auto"
    cases = [
        ({}, "auto"),  # off by default: plain JAX
        ({"train.cpu_kernels": "auto"}, on_cpu),
        ({"train.cpu_kernels": "off"}, "auto"),
        ({"train.cpu_kernels": "on"}, "native"),
        ({"model.scan_impl": "chunked"}, "chunked"),
        ({"model.time_mixing": "glrnn"}, "auto"),
        ({"model.time_mixing": "minlstm", "train.cpu_kernels": "on"}, "native"),
    ]
    for overrides, want in cases:
        cfg = config_lib.apply_overrides(base, [f"{k}={v}" for k, v in overrides.items()])
        assert train.training_scan_impl(cfg) == want, overrides
        assert train.lm_config(cfg, 11).scan_impl == want
    with pytest.raises(config_lib.ConfigError, match="train.cpu_kernels"):
        config_lib.apply_overrides(base, ["train.cpu_kernels=yes"])
    cfgs = [config_lib.apply_overrides(base, [f"train.cpu_kernels={m}"]) for m in ("on", "off")]
    shapes = [jax.tree.map(lambda v: (v.shape, v.dtype), jax.eval_shape(
        train.build_model(c, 11).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
        for c in cfgs]
    assert shapes[0] == shapes[1]
