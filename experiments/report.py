"""Tables, plots and results.json from run workdirs (issue #8 experiments).

Reads each workdir's ``config.json`` and ``metrics.jsonl`` (written by
``flax_minrnn.training.train``), plus, when present, ``timing.json`` (end-to-end
seconds, written by ``experiments/run_all.sh``) and ``evals/<name>.json``
(``flax-minrnn eval`` outputs, one extra table column each), and writes to
``--out``:

* ``results.json``: under the key ``<prefix>``, one summary per run (the
  table's numbers); other prefixes' entries are kept;
* ``<prefix>_curves.png``: eval/train loss and eval accuracy against steps
  and against wall time;
* the markdown table on stdout; with ``--readme``, it also replaces the block between
  ``<!-- <prefix>:begin -->`` and ``<!-- <prefix>:end -->`` in that file.

Usage::

    python experiments/report.py --out experiments/shakespeare --prefix cpu \
        --readme experiments/shakespeare/README.md \
        mingru=runs/shakespeare/mingru minlstm=runs/shakespeare/minlstm
"""

import argparse
import glob
import json
import os
import re
import sys
from typing import Any, Sequence

import numpy as np


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (unreadable lines skipped)."""
    records = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "split" in record:
                records.append(record)
    return records


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def model_size(config) -> tuple[int, int]:
    """``(parameter count, training sequence length)`` of a run's config."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax_minrnn.training import train as train  # pylint: disable=g-import-not-at-top
    dataset = train.build_dataset(config)
    model = train.LM(train.lm_config(config, dataset.vocab_size))
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), np.zeros((1, 8), np.int32), training=False))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    return count, int(dataset.seq_len)


def first_at(evals: Sequence[dict[str, Any]], threshold: float
             ) -> dict[str, Any] | None:
    """The first eval record whose accuracy is at least ``threshold``."""
    for r in evals:
        if r.get("accuracy") is not None and r["accuracy"] >= threshold:
            return r
    return None


def summarize(label: str, workdir: str, threshold: float | None = None
              ) -> dict[str, Any]:
    """The numbers of one run (see the module docstring)."""
    from flax_minrnn.training import config as config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.load_saved_config(workdir)
    records = read_metrics(workdir)
    evals = [r for r in records if r["split"] == "eval"]
    trains = [r for r in records if r["split"] == "train"]
    if not evals:
        raise ValueError(f"{workdir!r}: no eval records in metrics.jsonl")
    params, seq_len = model_size(config)
    steps = max(r["step"] for r in records)
    last = evals[-1]
    summary = {
        "label": label,
        "workdir": workdir,
        "time_mixing": config.model.time_mixing,
        "n_layer": config.model.n_layer,
        "d_model": config.model.d_model,
        "use_true_recurrence": config.model.use_true_recurrence,
        "task": config.data.name,
        "task_kwargs": config.data.task_kwargs.to_dict(),
        "params": params,
        "steps": steps,
        "num_steps_configured": config.train.num_steps,
        "batch_size": config.data.batch_size,
        "seq_len": seq_len,
        "tokens_seen": steps * config.data.batch_size * seq_len,
        "eval_loss": last["loss"],
        "eval_accuracy": last["accuracy"],
        "best_eval_loss": min(r["loss"] for r in evals),
        "best_eval_accuracy": max(r["accuracy"] for r in evals),
        "train_loss": trains[-1]["loss"] if trains else None,
        "train_wall_s": max(r.get("wall_time", 0.0) for r in records),
        "tokens_per_sec": (float(np.median([r["tokens_per_sec"]
                                            for r in trains]))
                           if trains else None),
        "end_to_end_s": None,
        "evals": {},
    }
    if threshold is not None:
        summary["threshold"] = threshold
        reached = first_at(evals, threshold)
        summary["first_step_at_threshold"] = reached and int(reached["step"])
        summary["wall_s_at_threshold"] = reached and reached.get("wall_time")
    timing = _read_json(os.path.join(workdir, "timing.json"))
    if timing:
        summary["end_to_end_s"] = timing.get("end_to_end_s")
    for path in sorted(glob.glob(os.path.join(workdir, "evals", "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        summary["evals"][name] = _read_json(path)
    return summary


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _threshold_step(s: dict[str, Any]) -> str:
    if "threshold" not in s:
        return "-"
    step = s.get("first_step_at_threshold")
    return "not reached" if step is None else str(step)


def _tokens_per_sec(s: dict[str, Any]) -> str:
    return "-" if s["tokens_per_sec"] is None else f"{s['tokens_per_sec']:,.0f}"


# Column key -> (header, cell of a summary).
COLUMNS = {
    "params": ("params", lambda s: f"{s['params']:,}"),
    "steps": ("steps", lambda s: str(s["steps"])),
    "tokens": ("tokens seen", lambda s: f"{s['tokens_seen'] / 1e6:.2f}M"),
    "eval_loss": ("eval loss", lambda s: f"{s['eval_loss']:.4f}"),
    "best_eval_loss": ("best eval loss",
                       lambda s: f"{s['best_eval_loss']:.4f}"),
    "eval_acc": ("eval acc", lambda s: _pct(s["eval_accuracy"])),
    "best_eval_acc": ("best eval acc",
                      lambda s: _pct(s["best_eval_accuracy"])),
    "threshold_step": ("first step >= {thr}", _threshold_step),
    "threshold_wall": ("train wall then",
                       lambda s: _duration(s.get("wall_s_at_threshold"))),
    "train_wall": ("train wall", lambda s: _duration(s["train_wall_s"])),
    "end_to_end": ("end to end", lambda s: _duration(s["end_to_end_s"])),
    "tokens_per_sec": ("tokens/s", _tokens_per_sec),
}
DEFAULT_COLUMNS = ("params", "steps", "tokens", "eval_loss", "best_eval_loss",
                   "eval_acc", "best_eval_acc", "threshold_step",
                   "threshold_wall", "train_wall", "end_to_end",
                   "tokens_per_sec", "evals")


def table(summaries: Sequence[dict[str, Any]], eval_metric: str = "accuracy",
          columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """A markdown table of ``summaries``, one row per run.

    Args:
      summaries: :func:`summarize` outputs.
      eval_metric: What the extra evals' columns (``evals/<name>.json``)
        show: their ``eval_accuracy`` or ``eval_loss``.
      columns: Keys of ``COLUMNS``, and ``evals`` for the extra evals (in
        name order). The threshold columns appear only if a summary has a
        threshold.
    """
    unknown = sorted(set(columns) - set(COLUMNS) - {"evals"})
    if unknown:
        raise ValueError(f"unknown columns {unknown}; known: "
                         f"{sorted(COLUMNS)} and 'evals'")
    thresholds = [s["threshold"] for s in summaries if "threshold" in s]
    keys = [k for k in columns
            if thresholds or k not in ("threshold_step", "threshold_wall")]
    extra = sorted({name for s in summaries for name in s["evals"]})
    short = {"accuracy": "acc", "loss": "loss"}[eval_metric]
    header, cells = ["run"], [lambda s: s["label"]]
    for key in keys:
        if key == "evals":
            for name in extra:
                header.append(f"{name} {short}")
                cells.append(lambda s, name=name: _eval_cell(s, name,
                                                             eval_metric))
        else:
            title, cell = COLUMNS[key]
            thr = f"{100 * thresholds[0]:g}%" if thresholds else ""
            header.append(title.format(thr=thr))
            cells.append(cell)
    rows = [header, ["---"] * len(header)]
    rows += [[cell(s) for cell in cells] for s in summaries]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def _eval_cell(s: dict[str, Any], name: str, eval_metric: str) -> str:
    value = (s["evals"].get(name) or {}).get("eval_" + eval_metric)
    if eval_metric == "accuracy" or value is None:
        return _pct(value)
    return f"{value:.4f}"


def _groups(runs: Sequence[tuple[str, str]], facet: bool
            ) -> dict[str, list[tuple[str, str, str]]]:
    """``{group: [(label, series name, workdir)]}``: with ``facet``, the
    label's first word is the group and the rest names the series."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for label, workdir in runs:
        group, _, rest = label.partition(" ") if facet else ("", "", label)
        groups.setdefault(group, []).append((label, rest or label, workdir))
    return groups


def plot(runs: Sequence[tuple[str, str]], out: str, title: str = "",
         logy: bool = False, loss_max: float | None = None,
         facet: bool = False) -> str:
    """Loss and eval accuracy against steps and wall time, a line per run.

    One row of four panels (loss/step, loss/wall, accuracy/step,
    accuracy/wall); with ``facet``, one row per first word of the labels,
    the same color for the same rest of the label in every row.
    """
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    groups = _groups(runs, facet)
    fig, axes = plt.subplots(len(groups), 4, squeeze=False,
                             figsize=(18, 3.8 * len(groups)))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors: dict[str, str] = {}
    for row, (group, members) in enumerate(groups.items()):
        for _, series, workdir in members:
            color = colors.setdefault(series,
                                      palette[len(colors) % len(palette)])
            records = read_metrics(workdir)
            for split, style, alpha in (("train", "-", 0.3),
                                        ("eval", "o-", 1.0)):
                rs = [r for r in records if r["split"] == split]
                xs = ([r["step"] for r in rs],
                      [r.get("wall_time", 0.0) for r in rs])
                for col in range(2):
                    axes[row, col].plot(
                        xs[col], [r["loss"] for r in rs], style, color=color,
                        alpha=alpha, markersize=3, label=f"{series} ({split})")
                    if split == "eval":
                        axes[row, 2 + col].plot(
                            xs[col], [r["accuracy"] for r in rs], style,
                            color=color, markersize=3, label=series)
        for col in range(4):
            ax = axes[row, col]
            ax.set_xlabel("step" if col % 2 == 0 else "wall time (s)")
            ax.set_ylabel(("loss (nats/token)", "eval accuracy")[col // 2])
            ax.grid(alpha=0.3)
            if group:
                ax.set_title(group, fontsize=9)
        if logy:
            for col in range(2):
                axes[row, col].set_yscale("log")
        if loss_max is not None:
            for col in range(2):
                axes[row, col].set_ylim(top=loss_max)
        axes[row, 0].legend(fontsize=7)
        axes[row, 2].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def update_readme(path: str, prefix: str, text: str) -> bool:
    """Replaces the ``<!-- prefix:begin/end -->`` block; False if absent."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        content = f.read()
    begin, end = f"<!-- {prefix}:begin -->", f"<!-- {prefix}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        return False
    content = pattern.sub(lambda _: f"{begin}\n{text}{end}", content)
    with open(path, "w") as f:
        f.write(content)
    return True


def _run_arg(text: str) -> tuple[str, str]:
    label, sep, workdir = text.partition("=")
    if not sep or not label or not workdir:
        raise argparse.ArgumentTypeError(f"expected LABEL=WORKDIR, got {text!r}")
    return label, workdir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=_run_arg,
                        metavar="LABEL=WORKDIR")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--prefix", default="report",
                        help="output file prefix and README block name")
    parser.add_argument("--threshold", type=float, default=None,
                        help="report the first eval step reaching this "
                             "accuracy")
    parser.add_argument("--readme", default=None,
                        help="README whose <!-- prefix:begin/end --> block "
                             "gets the table")
    parser.add_argument("--title", default="")
    parser.add_argument("--eval-metric", default="accuracy",
                        choices=("accuracy", "loss"),
                        help="what the extra evals' columns show")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                        help="comma-separated table columns: "
                             f"{', '.join(COLUMNS)}, evals")
    parser.add_argument("--loss-max", type=float, default=None,
                        help="upper limit of the loss axes")
    parser.add_argument("--facet", action="store_true",
                        help="one row of plots per first word of the labels")
    parser.add_argument("--logy", action="store_true",
                        help="log-scale loss axes")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summaries = [summarize(label, workdir, args.threshold)
                 for label, workdir in args.runs]
    text = table(summaries, args.eval_metric, args.columns.split(","))
    results_path = os.path.join(args.out, "results.json")
    results = _read_json(results_path) or {}
    results[args.prefix] = {"title": args.title, "runs": summaries}
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    plot(args.runs, os.path.join(args.out, args.prefix + "_curves.png"),
         args.title, args.logy, args.loss_max, args.facet)
    if args.readme and not update_readme(args.readme, args.prefix, text):
        print(f"note: no <!-- {args.prefix}:begin --> block in "
              f"{args.readme}; table not inserted", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
