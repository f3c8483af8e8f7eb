"""Command line: ``flax-minrnn`` / ``python -m flax_minrnn``.

Subcommands::

    train    --config PATH[:arg] --workdir DIR [key=value ...]
             [--distributed | --coordinator-address HOST:PORT
              --num-processes N --process-id I]
    eval     --workdir DIR [key=value ...]
    generate --workdir DIR --prompt TEXT [--max-new-tokens N]
             [--temperature T] [--top-k K] [--top-p P] [--seed S]
    plot     --workdir DIR [--out PNG]

``train``, ``eval`` and ``generate`` take ``--malloc {tuned,default}``
(default ``tuned``: calls :func:`flax_minrnn.runtime.tune_cpu_malloc` before
the first JAX computation, which made CPU training steps about 1.5x faster,
see benchmarks/README.md; ``default`` leaves glibc alone).

User errors (bad config keys or values, unknown prompt characters, missing
files) print one message on stderr and exit with code 2, without a traceback.
A diverged training run (non-finite loss) exits with code 1.
"""

import argparse
import json
import os
import sys
import warnings
from typing import Sequence

from flax_minrnn.training import runtime


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-minrnn",
        description="Train, evaluate and sample minimal gated linear RNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("--config", required=True,
                   help="config file, optionally with ':arg' for get_config")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.num_steps=100")
    g = p.add_argument_group(
        "several hosts", "one process per host, each calling "
        "jax.distributed.initialize before anything else (README: Multi-device)")
    g.add_argument("--distributed", action="store_true",
                   help="initialize with auto-detection (Slurm, Open MPI, TPU)")
    g.add_argument("--coordinator-address", default=None,
                   help="HOST:PORT of process 0 (with --num-processes, --process-id)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)

    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data.eval_batches=100")

    p = sub.add_parser("generate", help="sample text from a char-level run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    for name in ("train", "eval", "generate"):
        sub.choices[name].add_argument(
            "--malloc", choices=runtime.MALLOC_SETTINGS, default="tuned",
            help="tuned (default): keep freed memory mapped (flax_minrnn.tune_cpu_malloc), "
                 "faster on CPU, the process keeps its peak memory; default: glibc as is")

    p = sub.add_parser("plot", help="plot learning curves of a run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None,
                   help="output PNG (default WORKDIR/curves.png)")
    return parser


def plot(workdir: str, out: str | None = None) -> str:
    """Plots train/eval loss vs step and vs wall time; returns the PNG path.

    Raises:
        FileNotFoundError: No ``metrics.jsonl`` in ``workdir``.
        ValueError: It has no loss records.
    """
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No metrics file {path!r}.")
    series = {"train": [], "eval": []}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("split") in series and r.get("loss") is not None:
                series[r["split"]].append(
                    (r["step"], r.get("wall_time", 0.0), r["loss"]))
    if not any(series.values()):
        raise ValueError(f"{path!r} holds no loss records.")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for split, points in series.items():
        if not points:
            continue
        steps, walls, losses = zip(*points)
        style = "-" if split == "train" else "o-"
        axes[0].plot(steps, losses, style, label=split, markersize=3)
        axes[1].plot(walls, losses, style, label=split, markersize=3)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    out = out or os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _run(args: argparse.Namespace) -> int:
    if args.command == "plot":
        print(plot(args.workdir, args.out))
        return 0
    with warnings.catch_warnings():
        # Not glibc, or JAX already running (main() called in-process): a
        # speed setting only, so the CLI goes on without it.
        warnings.simplefilter("ignore", RuntimeWarning)
        runtime.apply_malloc_setting(args.malloc)
    if args.command == "train":
        from flax_minrnn.training import config as config_lib  # pylint: disable=g-import-not-at-top
        config = config_lib.load_config(args.config, args.overrides)
        explicit = (args.coordinator_address, args.num_processes, args.process_id)
        if args.distributed or any(v is not None for v in explicit):
            from flax_minrnn.training import mesh as parallel  # pylint: disable=g-import-not-at-top
            parallel.initialize_distributed(*explicit)
        from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
        metrics = train.train_and_evaluate(config, args.workdir)
        metrics.pop("sample", None)
        print(json.dumps(metrics, sort_keys=True))
        return 0
    from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
    if args.command == "eval":
        print(json.dumps(train.evaluate(args.workdir, args.overrides),
                         sort_keys=True))
        return 0
    text = train.generate_text(
        args.workdir, args.prompt, args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (2 for user errors)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except FloatingPointError as e:
        print(f"flax-minrnn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        # ConfigError and CheckpointCorruptError are ValueErrors.
        print(f"flax-minrnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
