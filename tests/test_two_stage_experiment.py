"""The two-stage experiment of issue 19: its configs and its report.

The report is checked on hand-written logs whose times are known exactly;
the runs behind experiments/two_stage/README.md come from
``experiments/run_all.sh two_stage``.
"""

import importlib.util
import json
import os
import pathlib

import pytest

from flax_minrnn.training import config as config_lib
from flax_minrnn.training import two_stage as ts

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY = str(REPO / "configs" / "two_stage_parity.py")


def _load_report():
    spec = importlib.util.spec_from_file_location(
        "two_stage_report", REPO / "experiments" / "two_stage" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()


@pytest.mark.parametrize("recipe", [*ts.RECIPE_OVERRIDES, ts.SCRATCH])
def test_parity_config_of_each_strategy(recipe):
    config = config_lib.load_config(f"{PARITY}:minlstm,{recipe}")
    kw = config.data.task_kwargs
    # Train on lengths up to 64, test on 4-8x longer strings, width >= 128.
    assert kw.max_len <= 64 and kw.eval_min_len >= 4 * kw.max_len
    assert kw.eval_max_len <= 8 * kw.max_len and config.model.d_model >= 128
    assert config.model.time_mixing == "minlstm"
    if recipe == ts.SCRATCH:
        assert config.model.use_true_recurrence and not config.two_stage.stage2
        assert config.train.num_steps == 1000
    else:
        stage1, stage2 = ts.stage_configs(config, "/w")
        assert not stage1.model.use_true_recurrence and stage1.train.num_steps == 100
        assert stage2.model.use_true_recurrence and stage2.train.num_steps == 1000
        # Both stages stop at the same accuracy as the baseline.
        assert stage1.train.stop_at_eval_accuracy == stage2.train.stop_at_eval_accuracy == 0.99
        extra = ["optim.recurrent_lr_multiplier=3"] if recipe == "lr" else []
        assert list(config.two_stage.stage2)[1:] == ts.RECIPE_OVERRIDES[recipe] + extra
        if recipe == "lr":  # The config's multiplier wins over the recipe's example.
            assert stage2.optim.recurrent_lr_multiplier == 3


@pytest.mark.parametrize("arg", ["mingru,fast", "gru", "mingru,zeros,lr"])
def test_bad_strategy_names_the_choices(arg):
    with pytest.raises(ValueError, match=r"<mingru\|minlstm\|glrnn>\[,<zeros\|lr\|random\|"
                                         r"blend\|tbptt\|scratch>\]"):
        ts.parse_recipe_arg(arg)


def _write_run(path, records, batch=2, max_len=9, seq_len=None):
    """A run's config.json and metrics.jsonl: parity with ``max_len`` (a
    training sequence of ``max_len + 1`` tokens) or, given ``seq_len``, the
    char task with windows of ``seq_len``."""
    task = ([f"data.seq_len={seq_len}"] if seq_len else
            ["data.name=parity", f"data.task_kwargs.max_len={max_len}"])
    config_lib.save_config(str(path), config_lib.apply_overrides(
        config_lib.default_config(), [f"data.batch_size={batch}", *task]))
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _train(step, tokens_per_sec):
    return dict(split="train", step=step, tokens_per_sec=tokens_per_sec)


def _eval(step, accuracy, wall, loss=1.0):
    return dict(split="eval", step=step, accuracy=accuracy, wall_time=wall, loss=loss)


def test_report_clocks_thresholds_and_best_recipe(tmp_path):
    # 20 tokens per update (batch 2 x (max_len 9 + 1)).
    _write_run(tmp_path / "mingru_scratch_seed0",
               [_eval(0, 0.1, 1.0), _train(10, 100.0), _eval(10, 0.995, 5.0)])
    (tmp_path / "mingru_scratch_seed0" / "timing.json").write_text("{}")
    for recipe, rate2, acc in (("zeros", 50.0, 0.999), ("random", 200.0, 0.999),
                               ("blend", 400.0, 0.5)):
        run = tmp_path / f"mingru_{recipe}_seed0"
        _write_run(run / "stage1", [_eval(0, 0.1, 1.0), _train(5, 200.0), _eval(5, 0.5, 3.0)])
        _write_run(run / "stage2", [_eval(0, 0.5, 0.5), _train(4, rate2), _eval(4, acc, 2.0)])
        (run / "timing.json").write_text("{}")
    (tmp_path / "mingru_lr_seed0" / "stage1").mkdir(parents=True)
    _write_run(tmp_path / "mingru_lr_seed0" / "stage1", [_eval(0, 0.1, 1.0)])
    (tmp_path / "mingru_lr_seed0" / "failed.json").write_text('{"exit_code": 1}')
    (tmp_path / "mingru_tbptt_seed0").mkdir()  # Not finished: left out.

    runs = report.collect(str(tmp_path))
    assert sorted(k[1] for k in runs) == ["blend", "lr", "random", "scratch", "zeros"]
    scratch = runs[("mingru", "scratch", 0)]
    assert scratch["train_s_to_threshold"] == pytest.approx(10 * 20 / 100.0)
    assert scratch["wall_s_to_threshold"] == 5.0 and scratch["steps"] == 10
    zeros = runs[("mingru", "zeros", 0)]
    # Stage 2's clock starts where stage 1's ended: 0.5 s of stage-1 steps
    # plus 4 updates at 50 tokens/s; wall 3 s + 2 s.
    assert zeros["train_s_to_threshold"] == pytest.approx(5 * 20 / 200.0 + 4 * 20 / 50.0)
    assert zeros["wall_s_to_threshold"] == 5.0
    assert zeros["stage1_accuracy"] == 0.5 and zeros["steps"] == 9
    assert runs[("mingru", "blend", 0)]["train_s_to_threshold"] is None
    assert runs[("mingru", "lr", 0)]["failed"]
    assert report.best_recipe(runs) == "random"
    text = report.tables(runs)
    assert "| lr | - | diverged |" in text and "| random | 0.500 | 0.999 | 0.9 | 5.0 |" in text


def test_report_seed_table_and_ratio(tmp_path):
    for strategy, rate in (("scratch", 100.0), ("zeros", 50.0)):
        for seed in range(3):
            run = tmp_path / f"glrnn_{strategy}_seed{seed}"
            _write_run(run, [_train(10, rate * (seed + 1)), _eval(10, 1.0, 9.0)])
            (run / "timing.json").write_text("{}")
    table = report.tables(report.collect(str(tmp_path)))
    # Medians over seeds of 200 / (rate * (seed + 1)) s: 1.0 and 2.0; ratio 2.
    assert "| glrnn | scratch | 3/3 | 1.000 1.000 1.000 | 2 1 1 | 1.0 | 9.0 | 1.00 |" in table
    assert "| glrnn | zeros | 3/3 | 1.000 1.000 1.000 | 4 2 1 | 2.0 | 9.0 | 2.00 |" in table


def test_shakespeare_equal_time_and_table(tmp_path):
    # Stage 1 runs at 1000 tokens/s after its first (compiling) window,
    # stage 2 at 250: 100 stage-2 updates take as long as 400 of stage 1.
    seed = tmp_path / "seed3"
    s1 = [_train(25, 10.0), _train(50, 1000.0), _train(75, 1000.0), _eval(75, None, 9.0, 2.0)]
    _write_run(seed / "stage1", s1, batch=4, seq_len=8)
    _write_run(seed / "stage2", [_eval(0, None, 0.0, 2.0), _train(50, 10.0),
                                 _train(100, 250.0), _eval(100, None, 9.0, 1.7)],
               batch=4, seq_len=8)
    assert report.equal_steps(str(seed)) == 400
    _write_run(seed / "continued", s1 + [_train(475, 1000.0), _eval(275, None, 20.0, 1.9),
                                         _eval(475, None, 30.0, 1.8)],
               batch=4, seq_len=8)
    (tmp_path / "notes").mkdir()  # Not a seed: left out.
    text, results = report.shakespeare_table(str(tmp_path))
    result = results["seed3"]
    assert list(results) == ["seed3"]
    assert result["stage1"] == dict(step=75, eval_loss=2.0)
    assert result["stage2"]["train_s"] == pytest.approx(100 * 32 / 250.0)
    assert result["continued"]["steps"] == 400
    assert result["continued"]["train_s"] == pytest.approx(400 * 32 / 1000.0)
    assert (result["stage2"]["eval_loss"], result["continued"]["eval_loss"]) == (1.7, 1.8)
    assert "| 3 | 2.0000 (75) | 100, 250, 13 | 1.7000 | 400, 1,000, 13 | 1.8000 | -0.1000 |" \
        in text


FAKE_PY = """#!/usr/bin/env bash
# Stands in for python: logs each call; a "train" makes its workdir and
# fails for the lr recipe; "report.py best" names zeros.
echo "$*" >> "$CALLS"
if [[ $1 == -m ]]; then
  mkdir -p "$7"
  [[ $5 != *,lr ]]
  exit
fi
[[ $2 == best ]] && echo zeros
exit 0
"""


def test_run_all_two_stage_grid_resumes_and_records_failures(tmp_path):
    """experiments/run_all.sh two_stage: the screen, then scratch and the
    best recipe on 3 seeds x 3 layers; a failed run is recorded, not retried,
    and a second invocation trains nothing."""
    import subprocess  # pylint: disable=import-outside-toplevel
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    env = dict(os.environ, RUNS=str(tmp_path / "runs"), PY=str(fake),
               CALLS=str(tmp_path / "calls"))

    def run():
        out = subprocess.run(["bash", str(REPO / "experiments" / "run_all.sh"), "two_stage"],
                             env=env, capture_output=True, text=True, check=True)
        calls = (tmp_path / "calls").read_text().splitlines()
        (tmp_path / "calls").unlink()
        return out.stdout, [c.split()[6] for c in calls if c.startswith("-m ")]

    stdout, trained = run()
    runs = tmp_path / "runs" / "two_stage"
    names = {os.path.relpath(w, runs) for w in trained}
    screen = {f"mingru_{r}_seed0"
              for r in ("scratch", "zeros", "lr", "random", "blend", "tbptt", "lr10")}
    grid = {f"{tm}_{r}_seed{s}" for tm in ("mingru", "minlstm", "glrnn")
            for r in ("scratch", "zeros") for s in range(3)}
    assert len(trained) == len(names) == len(screen | grid)
    assert names == screen | grid
    assert "the screen's best recipe is zeros" in stdout
    failed = {"mingru_lr_seed0", "mingru_lr10_seed0"}  # The fake fails the lr recipe.
    for name in failed:
        assert json.loads((runs / name / "failed.json").read_text()) == {"exit_code": 1}
        assert not (runs / name / "timing.json").exists()
    assert all((runs / n / "timing.json").exists() for n in names - failed)
    stdout, trained = run()
    assert trained == [] and "failed before (failed.json), skipped" in stdout
