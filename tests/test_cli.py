"""Tests of the command line (``python -m flax_minrnn``)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from flax_minrnn import cli

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
])
def test_bad_override_exits_2_naming_the_key(override, key, tmp_path):
    result = run_cli("train", "--config", SHAKESPEARE, "--workdir",
                     str(tmp_path), override)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.py"),
                     "--workdir", str(tmp_path)]) == 2
    assert "nope.py" in capsys.readouterr().err


def test_missing_run_exits_2(tmp_path, capsys):
    assert cli.main(["generate", "--workdir", str(tmp_path / "none"),
                     "--prompt", "a"]) == 2
    assert "No checkpoints" in capsys.readouterr().err


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
