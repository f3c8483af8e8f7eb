"""Tests of the command line (``python -m flax_minrnn``)."""

import argparse
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from flax_minrnn import cli
from flax_minrnn.training import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = str(REPO / "configs" / "shakespeare.py")
# The shrunk sizes of config.shrink, as command-line overrides.
TINY = ["model.n_layer=1", "model.d_model=16", "data.seq_len=16",
        "data.batch_size=2", "data.eval_batches=1", "optim.warmup_steps=1",
        "train.num_steps=3", "train.eval_every=3", "train.log_every=1",
        "train.checkpoint_every=3", "train.sample_length=8",
        "train.progress_bar=false"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``python -m flax_minrnn ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "flax_minrnn", *args],
                          cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny char run trained through ``cli.main`` (in process)."""
    workdir = str(tmp_path_factory.mktemp("cli_run"))
    assert cli.main(["train", "--config", SHAKESPEARE, "--workdir", workdir,
                     *TINY]) == 0
    return workdir


@pytest.mark.parametrize("override, key", [
    ("model.d_modle=3", "model.d_modle"),
    ("model.n_layer=abc", "model.n_layer"),
    ("data.name=imagenet", "data.name"),
    ("train.num_steps=-5", "train.num_steps"),
])
def test_bad_override_exits_2_naming_the_key(override, key, tmp_path):
    result = run_cli("train", "--config", SHAKESPEARE, "--workdir",
                     str(tmp_path), override)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_overrides_may_sit_on_both_sides_of_an_option(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert cli.main(["train", "--config", SHAKESPEARE, *TINY[:1], "--workdir", workdir,
                     *TINY[1:], "seed=3"]) == 0
    saved = config_lib.load_saved_config(workdir)
    assert saved.seed == 3 and saved == config_lib.apply_overrides(
        config_lib.load_config(SHAKESPEARE), [*TINY, "seed=3"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", SHAKESPEARE, "--workdir", workdir, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.py"),
                     "--workdir", str(tmp_path)]) == 2
    assert "nope.py" in capsys.readouterr().err


@pytest.mark.parametrize("text, arg, message", [
    ("def get_config(:\n", "", r"failed to load: SyntaxError"),
    ("import no_such_module_here\n", "", r"failed to load: ModuleNotFoundError"),
    ("def get_config():\n    return {}\n", ":big",
     r"cannot be called with 'big' \(the :ARG of --config\)"),
    (None, "", r"is not a file"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, arg, message):
    """No traceback for a config file that does not load: one line, exit 2."""
    path = tmp_path / "c.py"
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)
    assert cli.main(["train", "--config", f"{path}{arg}", "--workdir",
                     str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_oversized_seed_is_refused(tmp_path, capsys):
    assert cli.main(["train", "--config", SHAKESPEARE, "--workdir",
                     str(tmp_path / "run"), "seed=99999999999999999999"]) == 2
    assert "seed must be < 2**32" in capsys.readouterr().err


def test_distributed_without_a_cluster_says_what_to_give(tmp_path):
    env_vars = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")
    assert not any(v in os.environ for v in env_vars)
    result = run_cli("train", "--distributed", "--config", SHAKESPEARE, "--workdir",
                     str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "auto-detection found no cluster" in result.stderr
    assert "--coordinator-address" in result.stderr and "Traceback" not in result.stderr


def test_partial_multi_host_flags_are_refused_by_flag_name(tmp_path, capsys):
    assert cli.main(["train", "--config", SHAKESPEARE, "--workdir", str(tmp_path / "run"),
                     "--num-processes", "2", "--process-id", "0"]) == 2
    assert ("give all of --coordinator-address, --num-processes and --process-id"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_missing_run_exits_2(tmp_path, capsys):
    assert cli.main(["generate", "--workdir", str(tmp_path / "none"),
                     "--prompt", "a"]) == 2
    assert "No checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval"], ["check"], ["plot"],
                                     ["generate", "--prompt", "a"]])
def test_a_two_stage_workdir_points_to_its_stages(command, tmp_path, capsys):
    for stage in ("stage1", "stage2"):
        (tmp_path / stage).mkdir()
    assert cli.main([command[0], "--workdir", str(tmp_path), *command[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        f"is a two-stage run; each stage is a run of its own: --workdir "
        f"{tmp_path / 'stage1'} or --workdir {tmp_path / 'stage2'}")


def test_generate_in_fresh_process_reproduces(run_dir):
    args = ["generate", "--workdir", run_dir, "--prompt", "ROMEO:",
            "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "20",
            "--top-p", "0.95", "--seed", "7"]
    # The second process leaves glibc's allocator alone (the first tunes it,
    # the default): the sample must not depend on it.
    first, second = run_cli(*args), run_cli(*args, "--malloc", "default")
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    text = first.stdout[:-1]  # print() adds a newline.
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 12


def test_bad_malloc_choice_exits_2_naming_the_choices(tmp_path):
    result = run_cli("train", "--config", SHAKESPEARE, "--workdir", str(tmp_path),
                     "--malloc", "fast")
    assert result.returncode == 2
    assert "--malloc" in result.stderr and "'tuned'" in result.stderr


@pytest.mark.parametrize("flag,value,message", [
    ("--max-new-tokens", "0", "must be an integer >= 1, got '0'"),
    ("--temperature", "inf", "must be a finite number >= 0, got 'inf'"),
    ("--temperature", "-1", "must be a finite number >= 0, got '-1'"),
    ("--top-k", "-2", "must be an integer >= 0, got '-2'"),
    ("--top-p", "0", r"must be a finite number in \(0, 1\], got '0'"),
    ("--top-p", "1.5", r"must be a finite number in \(0, 1\], got '1.5'"),
])
def test_generate_flags_are_checked_by_name(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--workdir", str(tmp_path), "--prompt", "a", flag, value])
    assert info.value.code == 2
    assert re.search(f"argument {flag}: {message}", capsys.readouterr().err)


def test_generate_prompt_outside_vocabulary(run_dir):
    result = run_cli("generate", "--workdir", run_dir, "--prompt",
                     "caf\u00e9 \u2603", "--max-new-tokens", "4")
    assert result.returncode == 2
    assert "not in the vocabulary" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_and_plot(run_dir, tmp_path, capsys):
    assert cli.main(["eval", "--workdir", run_dir]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 3 and metrics["eval_loss"] > 0
    # Same eval data as the last eval during training.
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = [json.loads(l) for l in f if '"eval"' in l][-1]
    assert metrics["eval_loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert cli.main(["eval", "--workdir", run_dir, "model.d_model=8"]) == 2
    out = str(tmp_path / "curves.png")
    assert cli.main(["plot", "--workdir", run_dir, "--out", out]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", "--workdir", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------
# Help.

def _subparsers(parser):
    for action in parser._actions:  # pylint: disable=protected-access
        if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
            return action.choices
    raise AssertionError("no subcommands")


def test_every_option_has_help_with_its_default():
    commands = _subparsers(cli._parser())  # pylint: disable=protected-access
    assert {"train", "eval", "generate", "check", "plot"} <= set(commands)
    for name, parser in commands.items():
        formatter = parser._get_formatter()  # pylint: disable=protected-access
        for action in parser._actions:  # pylint: disable=protected-access
            if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._expand_help(action) if action.help else ""  # pylint: disable=protected-access
            assert text.strip(), f"{what} has no help"
            assert "(default: " in text or "(required, no default)" in text, \
                f"{what}: {text!r} does not state its default"
            if action.option_strings:  # (nargs='*' positionals count as required.)
                assert action.required == ("(required, no default)" in text), what
            default = action.default
            if isinstance(default, (int, float, str)) and not isinstance(
                    default, bool) and default != "\n":
                assert f"(default: {default})" in text, f"{what}: {text!r}"


# ----------------------------------------------------------------------------
# Corrupt checkpoints: one message, and the options that recover.

TWO_CHECKPOINTS = [o for o in TINY if not o.startswith(
    ("train.num_steps", "train.eval_every", "train.checkpoint_every"))] + [
    "train.num_steps=4", "train.eval_every=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("two_step_run"))
    assert cli.main(["train", "--config", SHAKESPEARE, "--workdir", workdir,
                     *TWO_CHECKPOINTS]) == 0
    return workdir


def _params(workdir):
    from flax_minrnn.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    params, meta = ckpt_lib.load_params(os.path.join(workdir, "checkpoints"))
    return meta["step"], {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                          jax.tree_util.tree_flatten_with_path(params)[0]}


def _hashes(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _corrupt_copy(run, tmp_path) -> pathlib.Path:
    """A copy of ``run`` whose step 4 has its data files cut in half."""
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    for f in (workdir / "checkpoints" / "4" / "state").rglob("d/*"):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    return workdir


def test_corrupt_latest_checkpoint_is_one_message_naming_options(
        two_step_run, tmp_path):
    workdir = _corrupt_copy(two_step_run, tmp_path)
    before = _hashes(workdir)
    result = run_cli("train", "--config", SHAKESPEARE, "--workdir",
                     str(workdir), *TWO_CHECKPOINTS)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[:3000]
    assert lines[0].startswith("flax-minrnn train: error: checkpoint step 4 ")
    assert "--step 2" in lines[0] and "--fallback-to-last-good" in lines[0]
    assert "Older steps that look restorable: [2]" in lines[0]
    result = run_cli("eval", "--workdir", str(workdir))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[:3000]
    assert "--step 2" in lines[0] and "fallback" not in lines[0]
    assert _hashes(workdir) == before  # Nothing written, moved or deleted.


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_check_step_and_fallback_recover(two_step_run, tmp_path, capsys):
    workdir = _corrupt_copy(two_step_run, tmp_path)
    corrupt_step = _hashes(workdir / "checkpoints" / "4")
    assert cli.main(["check", "--workdir", str(workdir)]) == 2
    out, err = capsys.readouterr()
    assert [l.split(" (")[0] for l in out.splitlines()] == [
        "step 2: OK", "step 4: CORRUPT"]
    assert "corrupt steps [4], good steps [2]" in err and "--step 2" in err

    assert cli.main(["eval", "--workdir", str(workdir), "--step", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 2
    assert cli.main(["generate", "--workdir", str(workdir), "--step", "2",
                     "--prompt", "RO", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out) == len("RO") + 5 + 1

    assert cli.main(["train", "--config", SHAKESPEARE, "--workdir",
                     str(workdir), *TWO_CHECKPOINTS,
                     "--fallback-to-last-good"]) == 0
    out = capsys.readouterr().out
    assert "Step 4 is corrupt" in out
    assert "Falling back to step 2, the newest step that restores." in out
    assert "Moved the newer steps [4]" in out
    # The corrupt step is kept, byte for byte; training redid steps 3-4
    # exactly as the original run did.
    assert _hashes(workdir / "checkpoints" / "superseded" / "4") == corrupt_step
    step, params = _params(workdir)
    want_step, want = _params(two_step_run)
    assert step == want_step == 4
    for key in want:
        np.testing.assert_array_equal(params[key], want[key], err_msg=key)
    assert cli.main(["check", "--workdir", str(workdir)]) == 0


def test_train_from_an_older_step(two_step_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(two_step_run, workdir)
    step4 = _hashes(workdir / "checkpoints" / "4")
    assert cli.main(["train", "--config", SHAKESPEARE, "--workdir",
                     str(workdir), *TWO_CHECKPOINTS, "--step", "2"]) == 0
    assert "Resuming" in capsys.readouterr().out
    assert _hashes(workdir / "checkpoints" / "superseded" / "4") == step4
    _, params = _params(workdir)
    _, want = _params(two_step_run)
    for key in want:
        np.testing.assert_array_equal(params[key], want[key], err_msg=key)
    assert cli.main(["eval", "--workdir", str(workdir), "--step", "3"]) == 2
    assert "No checkpoint for step 3" in capsys.readouterr().err


def test_generate_and_eval_with_and_without_buckets(run_dir, capsys):
    args = ["generate", "--workdir", run_dir, "--prompt", "ROMEO: ",
            "--max-new-tokens", "21", "--seed", "3", "--malloc", "default"]
    assert cli.main(args) == 0
    bucketed = capsys.readouterr().out
    assert cli.main([*args, "--no-bucket-lengths"]) == 0
    assert capsys.readouterr().out == bucketed
    assert len(bucketed) == len("ROMEO: ") + 21 + 1
    args = ["eval", "--workdir", run_dir, "data.seq_len=13"]
    assert cli.main(args) == 0
    bucketed = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "--no-bucket-lengths"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert bucketed["eval_loss"] == pytest.approx(exact["eval_loss"], rel=1e-6)
    assert bucketed["eval_accuracy"] == exact["eval_accuracy"]
