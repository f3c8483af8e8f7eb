"""Tables and a plot of the two-stage experiment (issue 19).

Reads the runs of ``experiments/run_all.sh two_stage``: one workdir per
``<layer>_<strategy>_seed<k>``, where the strategy is ``scratch`` (one
stage, true recurrence from the start; ``metrics.jsonl`` in the workdir) or
a recipe (``stage1/`` and ``stage2/``, each with its ``metrics.jsonl``).

Time of a run is counted two ways, both from the runs' own logs:

* ``train_s``: seconds inside training steps (compilation included), from
  the train-log windows (tokens / tokens per second); evaluation and
  checkpointing excluded;
* ``wall_s``: the run's wall clock, ``wall_time`` of its eval records
  (evaluations and checkpoints included).

Stage 2's clock starts where stage 1's ended. The time to the threshold is
that of the first evaluation at or above it.

Usage::

    python experiments/two_stage/report.py best RUNS/two_stage
    python experiments/two_stage/report.py report RUNS/two_stage --out experiments/two_stage
    python experiments/two_stage/report.py equal-steps RUNS/two_stage_shakespeare/seed0
    python experiments/two_stage/report.py shakespeare RUNS/two_stage_shakespeare
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Any, Sequence

THRESHOLD = 0.99
LAYERS = ("mingru", "minlstm", "glrnn")
NAME = re.compile(r"^(mingru|minlstm|glrnn)_([a-z0-9]+)_seed(\d+)$")


def _records(path: str) -> list[dict[str, Any]]:
    with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tokens_per_step(path: str) -> int:
    """Tokens of one training batch of the run in ``path``: its saved
    config's batch size times its task's training sequence length."""
    from flax_minrnn.training import config as config_lib  # pylint: disable=import-outside-toplevel
    from flax_minrnn.training import train  # pylint: disable=import-outside-toplevel
    config = config_lib.load_saved_config(path)
    return config.data.batch_size * int(train.build_dataset(config).seq_len)


def stage_curve(path: str, t0: float = 0.0, w0: float = 0.0) -> list[dict[str, float]]:
    """The eval points of one stage: step, accuracy, train_s and wall_s
    (offset by ``t0`` and ``w0``)."""
    per_step = _tokens_per_step(path)
    train_s, last_step, points = t0, 0, []
    for r in _records(path):
        if r["split"] == "train":
            train_s += (r["step"] - last_step) * per_step / r["tokens_per_sec"]
            last_step = r["step"]
        elif r["split"] == "eval":
            points.append(dict(step=r["step"], accuracy=r["accuracy"], train_s=train_s,
                               wall_s=w0 + r["wall_time"]))
    return points


def run_curve(workdir: str) -> list[dict[str, float]]:
    """The eval points of a run, both stages on one clock (``stage`` 1 or 2)."""
    if not os.path.isdir(os.path.join(workdir, "stage1")):
        return [dict(p, stage=1) for p in stage_curve(workdir)]
    one = stage_curve(os.path.join(workdir, "stage1"))
    if not os.path.isdir(os.path.join(workdir, "stage2")):
        return [dict(p, stage=1) for p in one]
    two = stage_curve(os.path.join(workdir, "stage2"), one[-1]["train_s"], one[-1]["wall_s"])
    return [dict(p, stage=1) for p in one] + [dict(p, stage=2) for p in two]


def summarize(workdir: str) -> dict[str, Any]:
    curve = run_curve(workdir)
    hit = next((p for p in curve if p["accuracy"] >= THRESHOLD), None)
    stage1 = [p for p in curve if p["stage"] == 1]
    return dict(
        final_accuracy=curve[-1]["accuracy"],
        best_accuracy=max(p["accuracy"] for p in curve),
        stage1_accuracy=stage1[-1]["accuracy"] if len(stage1) < len(curve) else None,
        steps=curve[-1]["step"] + (stage1[-1]["step"] if len(stage1) < len(curve) else 0),
        train_s_to_threshold=hit and hit["train_s"],
        wall_s_to_threshold=hit and hit["wall_s"],
        train_s=curve[-1]["train_s"], wall_s=curve[-1]["wall_s"], curve=curve)


def collect(runs_dir: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    out = {}
    for name in sorted(os.listdir(runs_dir)):
        m = NAME.match(name)
        path = os.path.join(runs_dir, name)
        failed = os.path.exists(os.path.join(path, "failed.json"))
        if m and (failed or os.path.exists(os.path.join(path, "timing.json"))):
            out[(m[1], m[2], int(m[3]))] = dict(summarize(path), failed=failed)
    return out


def best_recipe(runs: dict) -> str:
    """The two-stage recipe of the MinGRU seed-0 screen that reached the
    threshold in the least training time (else the best final accuracy);
    failed runs last."""
    screen = {k[1]: s for k, s in runs.items()
              if k[0] == "mingru" and k[2] == 0 and k[1] != "scratch"}
    if not screen:
        raise SystemExit("no finished screen runs (mingru_<recipe>_seed0)")
    key = lambda r: (screen[r]["failed"], screen[r]["train_s_to_threshold"] is None,
                     screen[r]["train_s_to_threshold"] or 0.0, -screen[r]["final_accuracy"])
    return min(screen, key=key)


def _fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def tables(runs: dict) -> str:
    screen = sorted((k[1], s) for k, s in runs.items() if k[0] == "mingru" and k[2] == 0)
    lines = ["Screen (MinGRU, seed 0). Times in seconds to the first evaluation at "
             f">= {THRESHOLD} on the evaluation lengths; stage 2's clock starts where stage "
             "1's ended.",
             "",
             "| strategy | stage-1 acc | final acc | train s to 0.99 | wall s to 0.99 |",
             "|---|---|---|---|---|"]
    for recipe, s in screen:
        final = "diverged" if s["failed"] else f"{s['final_accuracy']:.3f}"
        lines.append(f"| {recipe} | {_fmt(s['stage1_accuracy'], '.3f')} | "
                     f"{final} | {_fmt(s['train_s_to_threshold'], '.1f')} | "
                     f"{_fmt(s['wall_s_to_threshold'], '.1f')} |")
    if not any(sum(1 for j in runs if j[:2] == k[:2]) > 1 for k in runs):
        return "\n".join(lines)  # One seed per strategy: no seed table.
    lines += ["", "Seeds. Per strategy: runs reaching 0.99 / runs; median train and wall "
              "seconds to 0.99 over the runs that reached it; ratio = median train seconds / "
              "scratch's.", "",
              "| layer | strategy | reached | final acc (seeds) | train s to 0.99 (seeds) | "
              "median train s | median wall s | ratio to scratch |",
              "|---|---|---|---|---|---|---|---|"]
    for layer in LAYERS:
        strategies = sorted({k[1] for k in runs if k[0] == layer},
                            key=lambda r: (r != "scratch", r))
        seeds = lambda r: [runs[k] for k in sorted(runs) if k[0] == layer and k[1] == r]
        ref = _median(s["train_s_to_threshold"] for s in seeds("scratch"))
        for recipe in strategies:
            ss = seeds(recipe)
            if len(ss) < 2:  # Screen only.
                continue
            med = _median(s["train_s_to_threshold"] for s in ss)
            reached = sum(s["train_s_to_threshold"] is not None for s in ss)
            lines.append(
                f"| {layer} | {recipe} | {reached}/{len(ss)} | "
                f"{' '.join(format(s['final_accuracy'], '.3f') for s in ss)} | "
                f"{' '.join(_fmt(s['train_s_to_threshold'], '.0f') for s in ss)} | "
                f"{_fmt(med, '.1f')} | "
                f"{_fmt(_median(s['wall_s_to_threshold'] for s in ss), '.1f')} | "
                f"{_fmt(med / ref if med is not None and ref else None, '.2f')} |")
    return "\n".join(lines)


def plot(runs: dict, path: str, title: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(1, len(LAYERS), figsize=(5 * len(LAYERS), 3.8), sharey=True)
    colors = {"scratch": "black", "zeros": "C0", "lr": "C3", "random": "C2", "blend": "C1",
              "tbptt": "C4"}
    for ax, layer in zip(axes, LAYERS):
        for (lay, recipe, seed), s in sorted(runs.items()):
            if lay != layer:
                continue
            # Strategies run on one seed only (the screen) are dashed.
            screen = sum(1 for k in runs if k[0] == layer and k[1] == recipe) < 2
            color = colors.get(recipe, "C5")
            label = None if seed else recipe + (" (diverged)" if s["failed"] else "")
            ax.plot([p["wall_s"] for p in s["curve"]], [p["accuracy"] for p in s["curve"]],
                    color=color, alpha=0.8, lw=1.2, ls="--" if screen else "-", label=label)
        ax.axhline(THRESHOLD, color="gray", lw=0.6, ls=":")
        ax.set_title(layer)
        ax.set_xlabel("wall-clock seconds (1 core)")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("eval accuracy (longer lengths)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(path: str, text: str, mark: str) -> None:
    """Replaces the text between the two ``mark`` lines of ``path``."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    start = doc.index(mark) + len(mark)
    end = doc.index(mark, start)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc[:start] + "\n" + text + "\n" + doc[end:])


# ----------------------------------------------------------------------------
# Shakespeare: stage 2 against stage 1 continued for the same time.

SHAKESPEARE_MARK = "<!-- two-stage-shakespeare -->"


def steady_tokens_per_sec(path: str) -> float:
    """Median tokens/s of a run's train-log windows, the first (which holds
    the compilation) left out."""
    rates = [r["tokens_per_sec"] for r in _records(path) if r["split"] == "train"]
    return statistics.median(rates[1:] or rates)


def equal_steps(runs_dir: str) -> int:
    """Updates of stage 1 that take as long as stage 2's (same tokens per
    update, measured throughputs); ``runs_dir`` holds one seed's runs."""
    stage2 = [r for r in _records(os.path.join(runs_dir, "stage2")) if r["split"] == "train"]
    ratio = (steady_tokens_per_sec(os.path.join(runs_dir, "stage1"))
             / steady_tokens_per_sec(os.path.join(runs_dir, "stage2")))
    return max(1, round(stage2[-1]["step"] * ratio))


def shakespeare_result(seed_dir: str) -> dict[str, Any]:
    """Stage 1's last evaluation, then stage 2 and stage 1 continued: their
    updates, throughput, seconds inside training steps and validation loss."""
    evals = lambda name: [r for r in _records(os.path.join(seed_dir, name))
                          if r["split"] == "eval"]
    s1, s2, cont = evals("stage1"), evals("stage2"), evals("continued")
    start = s1[-1]
    after = [r for r in cont if r["step"] > start["step"]]
    rate1 = steady_tokens_per_sec(os.path.join(seed_dir, "stage1"))
    rate2 = steady_tokens_per_sec(os.path.join(seed_dir, "stage2"))
    per_step = _tokens_per_step(os.path.join(seed_dir, "stage1"))
    steps2, steps_c = s2[-1]["step"], after[-1]["step"] - start["step"]
    return dict(
        stage1=dict(step=start["step"], eval_loss=start["loss"]),
        stage2=dict(steps=steps2, eval_loss=s2[-1]["loss"], tokens_per_sec=rate2,
                    train_s=steps2 * per_step / rate2),
        continued=dict(steps=steps_c, eval_loss=after[-1]["loss"], tokens_per_sec=rate1,
                       train_s=steps_c * per_step / rate1))


def shakespeare_table(runs_dir: str) -> tuple[str, dict[str, Any]]:
    """One row per ``seed<k>`` directory of ``runs_dir``."""
    seeds = sorted(d for d in os.listdir(runs_dir) if re.fullmatch(r"seed\d+", d))
    results = {d: shakespeare_result(os.path.join(runs_dir, d)) for d in seeds}
    lines = ["Validation loss in nats/char. Stage 2 and the continuation each get the same "
             "seconds inside training steps.", "",
             "| seed | stage 1 (update) | stage 2: updates, tokens/s, s | val loss | "
             "stage 1 continued: updates, tokens/s, s | val loss | stage 2 - continued |",
             "|---|---|---|---|---|---|---|"]
    for d, r in results.items():
        two, cont = r["stage2"], r["continued"]
        lines.append(
            f"| {d[4:]} | {r['stage1']['eval_loss']:.4f} ({r['stage1']['step']}) | "
            f"{two['steps']}, {two['tokens_per_sec']:,.0f}, {two['train_s']:.0f} | "
            f"{two['eval_loss']:.4f} | "
            f"{cont['steps']}, {cont['tokens_per_sec']:,.0f}, {cont['train_s']:.0f} | "
            f"{cont['eval_loss']:.4f} | {two['eval_loss'] - cont['eval_loss']:+.4f} |")
    return "\n".join(lines), results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("best", "report", "equal-steps", "shakespeare"))
    parser.add_argument("runs_dir")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--name", default="parity",
                        help="report: the task; names the outputs and the README block")
    parser.add_argument("--title", default="Running parity, trained on lengths 1..64, "
                        "evaluated on 256..512: two stages vs true recurrence from scratch")
    args = parser.parse_args(argv)
    if args.command == "equal-steps":
        print(equal_steps(args.runs_dir))
        return 0
    if args.command == "shakespeare":
        text, result = shakespeare_table(args.runs_dir)
        with open(os.path.join(args.out, "shakespeare.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        update_readme(os.path.join(args.out, "README.md"), text, SHAKESPEARE_MARK)
        print(text)
        return 0
    runs = collect(args.runs_dir)
    if args.command == "best":
        print(best_recipe(runs))
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}_results.json"), "w", encoding="utf-8") as f:
        json.dump({"/".join(map(str, k)): s for k, s in sorted(runs.items())}, f, indent=1)
    plot(runs, os.path.join(args.out, f"{args.name}_accuracy_vs_wall.png"), args.title)
    text = tables(runs)
    update_readme(os.path.join(args.out, "README.md"), text, f"<!-- two-stage-{args.name} -->")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
