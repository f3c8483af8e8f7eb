"""The issue #8 experiment configs (every argument) and experiments/report.py.

Only shrunk 2-step runs; the default argument of each config is also
smoke-tested by tests/test_train.py (which loads every configs/*.py).
"""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from flax_minrnn.training import config as config_lib
from flax_minrnn.training import train as train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import report  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS = REPO / "configs"
SMALL = str(CONFIGS / "selective_copying_small.py")
ABLATION = str(CONFIGS / "selective_copying_ablation.py")
SHAKESPEARE = str(CONFIGS / "shakespeare_equal_params.py")
PARITY = str(CONFIGS / "parity_two_stage.py")
TIME_MIXINGS = ("mingru", "minlstm", "glrnn")


def shrunk(path_arg: str, *overrides: str) -> config_lib.ConfigDict:
    config = config_lib.shrink(config_lib.load_config(path_arg))
    return config_lib.apply_overrides(config, list(overrides))


def param_count(config) -> int:
    return report.model_size(config)[0]


def test_selective_copying_small_task():
    for tm in TIME_MIXINGS:
        config = config_lib.load_config(f"{SMALL}:{tm}")
        task = train.build_dataset(config)
        assert (task.vocab_size, task.seq_len) == (6, 72)
        assert config.train.num_steps <= 2000
        assert config.model.time_mixing == tm


@pytest.mark.parametrize("variant,seq_len,vocab", [("", 256, 16),
                                                   (",gpu", 4096, 16)])
def test_ablation_variants(variant, seq_len, vocab):
    for tm in ("mingru", "minlstm"):
        for layers in (1, 2, 3):
            config = config_lib.load_config(f"{ABLATION}:{tm},{layers}{variant}")
            assert config.model.n_layer == layers
            assert config.model.time_mixing == tm
            kwargs = config.data.task_kwargs
            assert kwargs.num_tokens_to_memorize == 16
            assert kwargs.noise_length + 2 * 16 == seq_len
            assert kwargs.num_data_tokens + 2 == vocab


@pytest.mark.parametrize("arg", ["mingru", "mingru,2,cpu", "lstm,1", "mingru,0"])
def test_ablation_bad_arg(arg):
    with pytest.raises(ValueError, match=r"arg must be <mingru\|minlstm\|glrnn>,<layers>"):
        config_lib.load_config(f"{ABLATION}:{arg}")


@pytest.mark.parametrize("size", ["", ",medium", ",large"])
def test_shakespeare_equal_params(size):
    counts = {tm: param_count(config_lib.load_config(f"{SHAKESPEARE}:{tm}{size}"))
              for tm in TIME_MIXINGS}
    assert max(counts.values()) / min(counts.values()) < 1.001, counts
    if not size:  # the size of configs/shakespeare.py
        base = config_lib.load_config(str(CONFIGS / "shakespeare.py"))
        assert counts["mingru"] == param_count(base)
    elif size == ",medium":
        assert 2.6e6 < counts["glrnn"] < 2.7e6
    else:
        assert 10.6e6 < counts["glrnn"] < 10.8e6


@pytest.mark.parametrize("arg", ["gru", "mingru,huge", "mingru,medium,large"])
def test_shakespeare_bad_arg(arg):
    with pytest.raises(ValueError, match="arg must be"):
        config_lib.load_config(f"{SHAKESPEARE}:{arg}")


@pytest.mark.parametrize("arg", ["minlstm", "mingru,medium", "glrnn,large"])
def test_shakespeare_trains_two_steps(arg, tmp_path):
    metrics = train.train_and_evaluate(shrunk(f"{SHAKESPEARE}:{arg}"),
                                       str(tmp_path))
    assert metrics["step"] == 2 and np.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("tm,layers,variant", [("minlstm", 3, ""),
                                               ("mingru", 1, ",gpu")])
def test_selective_copying_trains_two_steps(tm, layers, variant, tmp_path):
    config = shrunk(f"{ABLATION}:{tm},{layers}{variant}",
                    "data.task_kwargs.noise_length=8",
                    "data.task_kwargs.num_tokens_to_memorize=4")
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert metrics["step"] == 2 and np.isfinite(metrics["eval_loss"])


def test_parity_two_stage(tmp_path):
    """Stage 1, then stage 2 from it: starts at stage 1's eval loss."""
    task = ["data.task_kwargs.max_len=6", "data.task_kwargs.eval_min_len=6",
            "data.task_kwargs.eval_max_len=12"]
    stage1 = str(tmp_path / "stage1")
    m1 = train.train_and_evaluate(shrunk(f"{PARITY}:glrnn", *task), stage1)
    config2 = shrunk(f"{PARITY}:glrnn,stage2", *task,
                     f"init_from.workdir={stage1}", "train.num_steps=2")
    assert config2.model.use_true_recurrence
    stage2 = str(tmp_path / "stage2")
    m2 = train.train_and_evaluate(config2, stage2)
    assert m2["step"] == 2
    first = next(r for r in report.read_metrics(stage2) if r["split"] == "eval")
    assert first["step"] == 0
    np.testing.assert_allclose(first["loss"], m1["eval_loss"], rtol=1e-5)


def test_parity_task_lengths():
    config = config_lib.load_config(f"{PARITY}:minlstm,stage2")
    task = train.build_dataset(config)
    assert task.seq_len == 41 and task.eval_seq_len == 257
    batch = task.eval_batches(1)[0]
    lengths = (batch["inputs"] != 0).sum(axis=1) - 1  # bits, less the query
    assert lengths.min() >= 40 and lengths.max() <= 256
    scratch = config_lib.load_config(f"{PARITY}:mingru,scratch")
    assert scratch.model.use_true_recurrence and not scratch.init_from.workdir
    stage1 = config_lib.load_config(f"{PARITY}:mingru")
    assert not stage1.model.use_true_recurrence
    for bad in ("mingru,stage3", "mingru,stage2,scratch", "gru"):
        with pytest.raises(ValueError, match=r"arg must be <mingru\|minlstm\|glrnn>"
                                             r"\[,stage2\|,scratch\], got '" + bad):
            config_lib.load_config(f"{PARITY}:{bad}")


def _fake_run(workdir, config, evals=None, timing=None):
    os.makedirs(workdir)
    config_lib.save_config(workdir, config)
    records = [
        dict(step=0, split="eval", loss=2.0, accuracy=0.1, wall_time=1.0),
        dict(step=10, split="train", loss=1.5, accuracy=0.5,
             tokens_per_sec=100.0, wall_time=2.0),
        dict(step=10, split="eval", loss=1.0, accuracy=0.995, wall_time=3.0),
        dict(step=20, split="train", loss=0.5, accuracy=0.9,
             tokens_per_sec=300.0, wall_time=4.0),
        dict(step=20, split="eval", loss=1.2, accuracy=0.99, wall_time=5.0),
    ]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write("not json\n")
    if evals:
        os.makedirs(os.path.join(workdir, "evals"))
        for name, value in evals.items():
            with open(os.path.join(workdir, "evals", name + ".json"), "w") as f:
                json.dump(value, f)
    if timing:
        with open(os.path.join(workdir, "timing.json"), "w") as f:
            json.dump(timing, f)


def test_report(tmp_path):
    config = config_lib.load_config(f"{SMALL}:glrnn", ["train.num_steps=20"])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(a, config, evals={"acc_long": {"eval_accuracy": 0.5,
                                             "eval_loss": 0.7, "step": 20}},
              timing={"end_to_end_s": 65.0})
    _fake_run(b, config)
    out = tmp_path / "out"
    out.mkdir()
    readme = out / "README.md"
    readme.write_text("intro\n<!-- small:begin -->\nold\n<!-- small:end -->\n")
    (out / "results.json").write_text(json.dumps({"other": {"runs": []}}))
    assert report.main([f"glrnn a={a}", f"b={b}", "--out", str(out),
                        "--prefix", "small", "--threshold", "0.99",
                        "--readme", str(readme), "--logy", "--loss-max", "3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"other", "small"}
    s = results["small"]["runs"][0]
    assert s["label"] == "glrnn a" and s["workdir"] == a
    assert s["params"] == param_count(config)
    assert (s["steps"], s["seq_len"], s["tokens_seen"]) == (20, 72, 20 * 64 * 72)
    assert (s["eval_loss"], s["best_eval_loss"]) == (1.2, 1.0)
    assert (s["eval_accuracy"], s["best_eval_accuracy"]) == (0.99, 0.995)
    assert (s["first_step_at_threshold"], s["wall_s_at_threshold"]) == (10, 3.0)
    assert (s["train_wall_s"], s["end_to_end_s"]) == (5.0, 65.0)
    assert s["tokens_per_sec"] == 200.0
    assert s["evals"]["acc_long"]["eval_accuracy"] == 0.5
    text = readme.read_text()
    assert text.startswith("intro\n<!-- small:begin -->\n| run |")
    assert "old" not in text and "1m05s" in text and "50.0%" in text
    assert "| b |" in text and text.endswith("<!-- small:end -->\n")
    assert (out / "small_curves.png").stat().st_size > 0
    runs = results["small"]["runs"]
    assert "| 0.7000 |" in report.table(runs, "loss")
    assert report.table(runs, columns=["params", "evals"]).splitlines()[:3] == [
        "| run | params | acc_long acc |", "| --- | --- | --- |",
        f"| glrnn a | {s['params']:,} | 50.0% |"]
    with pytest.raises(ValueError, match=r"unknown columns \['bogus'\]"):
        report.table(runs, columns=["bogus"])


def test_report_facets(tmp_path):
    runs = [("mingru stage 1", "a"), ("mingru stage 2", "b"), ("glrnn", "c")]
    assert report._groups(runs, facet=True) == {  # pylint: disable=protected-access
        "mingru": [("mingru stage 1", "stage 1", "a"),
                   ("mingru stage 2", "stage 2", "b")],
        "glrnn": [("glrnn", "glrnn", "c")]}
    assert list(report._groups(runs, facet=False)) == [""]  # pylint: disable=protected-access
    config = config_lib.load_config(f"{SMALL}:glrnn", ["train.num_steps=20"])
    _fake_run(str(tmp_path / "a"), config)
    out = report.plot([("x one", str(tmp_path / "a")),
                       ("y one", str(tmp_path / "a"))],
                      str(tmp_path / "p.png"), facet=True)
    assert os.path.getsize(out) > 0


def test_report_threshold_not_reached():
    evals = [dict(step=0, accuracy=0.2), dict(step=5, accuracy=0.98)]
    assert report.first_at(evals, 0.99) is None
    assert report.first_at(evals, 0.98) == evals[1]


def test_report_bad_run_arg(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        report.main(["no-equals-sign", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "expected LABEL=WORKDIR, got 'no-equals-sign'" in capsys.readouterr().err


def test_param_count_matches_init():
    config = config_lib.load_config(f"{SMALL}:minlstm")
    model = train.LM(train.lm_config(config, 6))
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32),
                        training=False)
    assert param_count(config) == sum(x.size for x in jax.tree.leaves(params))
