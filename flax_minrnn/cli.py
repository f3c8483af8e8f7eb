"""Command line: ``flax-minrnn`` / ``python -m flax_minrnn``.

Subcommands::

    train    --config PATH[:arg] --workdir DIR [key=value ...]
             [--step N | --fallback-to-last-good]
             [--distributed | --coordinator-address HOST:PORT
              --num-processes N --process-id I]
    eval     --workdir DIR [--step N] [--no-bucket-lengths] [key=value ...]
    generate --workdir DIR [--prompt TEXT] [--max-new-tokens N]
             [--temperature T] [--top-k K] [--top-p P] [--seed S]
             [--step N] [--no-bucket-lengths]
    check    --workdir DIR
    plot     --workdir DIR [--out PNG]

``train``, ``eval`` and ``generate`` take ``--malloc {tuned,default}``
(default ``tuned``: calls :func:`flax_minrnn.training.runtime.tune_cpu_malloc`
before the first JAX computation, which makes CPU training steps faster, see
benchmarks/README.md for the measurements; ``default`` leaves glibc alone).

User errors (bad config keys or values, unknown prompt characters, missing
files) and corrupt checkpoints print one message on stderr and exit with code
2, without a traceback; a corrupt checkpoint's message names the ``--step``
values that can be used instead. ``check`` lists every checkpoint step as OK
or CORRUPT and exits with 2 if any is corrupt. A diverged training run
(non-finite loss) exits with code 1.
"""

import argparse
import json
import logging
import math
import os
import sys
import warnings
from typing import Sequence

from flax_minrnn.training import runtime

_SUPERSEDED = "checkpoints/superseded/"


def _int_at_least(low: int):
    """An ``argparse`` type: an integer ``>= low`` (argparse names the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def _float_in(low: float, high: float, low_open: bool = False):
    """An ``argparse`` type: a finite number in ``[low, high]`` (``(low, high]``
    with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not (low < value if low_open else low <= value) \
                or not value <= high:
            where = (f">= {low:g}" if high == math.inf else
                     f"in {'(' if low_open else '['}{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text!r}")
        return value
    return parse


def _add_step(p, what: str, note: str = "") -> None:
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help=f"{what} checkpoint step N instead of the latest"
                        f"{note} (default: the latest step)")


def _add_buckets(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--bucket-lengths", dest="bucket_lengths",
                   action="store_true", default=True,
                   help=f"pad {what} to a few bucket lengths (16, 24, 32, 48, "
                        "64, ...) so that different lengths share compiled "
                        "code; same results up to float32 rounding "
                        "(default: on)")
    p.add_argument("--no-bucket-lengths", dest="bucket_lengths",
                   action="store_false", default=True,
                   help="turn bucketing off: compile for each exact length "
                        "(default: bucketing on)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-minrnn",
        description="Train, evaluate and sample minimal gated linear RNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("--config", required=True, metavar="PATH[:ARG]",
                   help="config file defining get_config(); ':ARG' calls "
                        "get_config('ARG') (required, no default)")
    p.add_argument("--workdir", required=True,
                   help="run directory; training resumes from its latest "
                        "checkpoint if it has one (required, no default)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.num_steps=100 "
                        "(default: none)")
    # Either one, and one-stage runs only (a two-stage run resumes each stage
    # from its own workdir).
    resume = p.add_mutually_exclusive_group()
    _add_step(resume, "resume from", f"; newer steps are moved to {_SUPERSEDED}, "
                      "never deleted; not with --fallback-to-last-good nor a two-stage config")
    resume.add_argument("--fallback-to-last-good", action="store_true",
                   help="if the latest checkpoint is corrupt, resume from the "
                        "newest step that restores and say so; the corrupt "
                        f"steps are moved to {_SUPERSEDED}, never deleted; "
                        "not with --step nor a two-stage config "
                        "(default: off, a corrupt latest step is an error)")
    g = p.add_argument_group(
        "several hosts", "one process per host, each calling "
        "jax.distributed.initialize before anything else (README: Multi-device)")
    g.add_argument("--distributed", action="store_true",
                   help="initialize with auto-detection (Slurm, Open MPI, TPU) "
                        "(default: off, one process)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="address of process 0, with --num-processes and "
                        "--process-id (default: none, one process)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="number of processes (default: none, one process)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="index of this process, 0..N-1 (default: none, one "
                        "process)")

    p = sub.add_parser("eval", help="evaluate a run's checkpoint")
    p.add_argument("--workdir", required=True,
                   help="run directory (required, no default)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides other than model.*, e.g. "
                        "data.eval_batches=100 (default: none)")
    _add_step(p, "evaluate")
    _add_buckets(p, "eval sequences")

    p = sub.add_parser("generate", help="sample text from a char-level run")
    p.add_argument("--workdir", required=True,
                   help="run directory (required, no default)")
    p.add_argument("--prompt", default="\n",
                   help="text to continue; its characters must be in the "
                        "run's vocabulary (default: a newline)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=200, metavar="N",
                   help="number of characters to generate (default: "
                        "%(default)s)")
    p.add_argument("--temperature", type=_float_in(0.0, math.inf), default=1.0, metavar="T",
                   help="sampling temperature, 0 = greedy (default: "
                        "%(default)s)")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, metavar="K",
                   help="sample among the K most likely tokens, 0 = all "
                        "(default: %(default)s)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0, metavar="P",
                   help="nucleus sampling: the most likely tokens holding "
                        "probability P, 1 = all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed; the same seed gives the same text "
                        "(default: %(default)s)")
    _add_step(p, "sample from")
    _add_buckets(p, "the prompt and the number of new tokens")

    for name in ("train", "eval", "generate"):
        sub.choices[name].add_argument(
            "--malloc", choices=runtime.MALLOC_SETTINGS, default="tuned",
            help="tuned: keep freed memory mapped (flax_minrnn.tune_cpu_malloc), "
                 "faster on CPU, the process keeps its peak memory; default: "
                 "glibc as is (default: %(default)s)")

    p = sub.add_parser(
        "check", help="read back every checkpoint step: OK or CORRUPT")
    p.add_argument("--workdir", required=True,
                   help="run directory (required, no default)")

    p = sub.add_parser("plot", help="plot learning curves of a run")
    p.add_argument("--workdir", required=True,
                   help="run directory (required, no default)")
    p.add_argument("--out", default=None,
                   help="output PNG (default: WORKDIR/curves.png)")
    return parser


def corrupt_message(err, command: str) -> str:
    """The CLI's one-line message for a :class:`CheckpointCorruptError`,
    naming the command-line options that recover from it."""
    if err.step is None:  # Not one step: the index or every step failed.
        return str(err) if command == "check" else (
            f"{err} Run 'flax-minrnn check --workdir WORKDIR' for details.")
    text = (f"checkpoint step {err.step} at {err.path} is corrupt or "
            f"unreadable ({err.cause}). Nothing was deleted.")
    if not err.older_steps:
        return text + " No older step looks restorable."
    text += (f" Older steps that look restorable: {err.older_steps}; use one "
             f"with --step {err.older_steps[-1]}")
    if command == "train":
        text += (" or resume from the newest one that restores with "
                 f"--fallback-to-last-good (newer steps are moved to "
                 f"{_SUPERSEDED})")
    return text + ". 'flax-minrnn check --workdir WORKDIR' checks every step."


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


def _check(workdir: str) -> int:
    from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
    results = train.check_workdir(workdir)
    for r in results:
        print(f"step {r.step}: {'OK' if r.ok else 'CORRUPT'} ({r.detail})")
    bad = [r.step for r in results if not r.ok]
    if bad:
        good = [r.step for r in results if r.ok]
        hint = (f"; use --step {good[-1]} with train, eval or generate, or "
                "train --fallback-to-last-good" if good else "")
        print(f"flax-minrnn check: error: corrupt steps {bad}, good steps "
              f"{good}{hint}. Nothing was changed.", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "plot":
        print(plot(args.workdir, args.out))
        return 0
    if args.command == "check":
        return _check(args.workdir)
    with warnings.catch_warnings():
        # Not glibc, or JAX already running (main() called in-process): a
        # speed setting only, so the CLI goes on without it.
        warnings.simplefilter("ignore", RuntimeWarning)
        runtime.apply_malloc_setting(args.malloc)
    if args.command == "train":
        from flax_minrnn.training import config as config_lib  # pylint: disable=g-import-not-at-top
        config = config_lib.load_config(args.config, args.overrides)
        explicit = (args.coordinator_address, args.num_processes, args.process_id)
        given = [v is not None for v in explicit]
        if any(given) and not all(given):
            raise ValueError("give all of --coordinator-address, --num-processes and "
                             "--process-id, or none of them (--distributed alone "
                             "auto-detects)")
        if args.distributed or any(given):
            from flax_minrnn.training import mesh as parallel  # pylint: disable=g-import-not-at-top
            parallel.initialize_distributed(*explicit)
        from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
        metrics = train.train_and_evaluate(
            config, args.workdir, step=args.step,
            fallback_to_last_good=args.fallback_to_last_good)
        metrics.pop("sample", None)
        print(json.dumps(metrics, sort_keys=True))
        return 0
    from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
    if args.command == "eval":
        print(json.dumps(train.evaluate(
            args.workdir, args.overrides, step=args.step,
            bucket_lengths=args.bucket_lengths), sort_keys=True))
        return 0
    text = train.generate_text(
        args.workdir, args.prompt, args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, step=args.step, bucket_lengths=args.bucket_lengths)
    print(text)
    return 0


def _drop_orphaned_future_errors(record: logging.LogRecord) -> bool:
    """Reading a corrupt checkpoint leaves orbax's other reads failing in
    futures nobody awaits; asyncio logs each when it is collected, possibly
    at exit, after the one-line error that already names the corrupt step."""
    return not record.getMessage().startswith("Future exception was never retrieved")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (2 for user errors)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes one run of positionals: overrides after an option come
    # back unparsed, and join the others in order.
    if extra and hasattr(args, "overrides") and all(
            "=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.getLogger("asyncio").addFilter(_drop_orphaned_future_errors)
    try:
        return _run(args)
    except FloatingPointError as e:
        print(f"flax-minrnn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        # ConfigError and CheckpointCorruptError are ValueErrors.
        message = str(e)
        if hasattr(e, "older_steps"):  # A CheckpointCorruptError.
            message = corrupt_message(e, args.command)
        elif isinstance(e, FileNotFoundError) and args.command != "train":
            message += _two_stage_hint(args.workdir)
        print(f"flax-minrnn {args.command}: error: {message}", file=sys.stderr)
        return 2


def _two_stage_hint(workdir: str) -> str:
    """Where the runs are when ``workdir`` is a two-stage run's top level."""
    from flax_minrnn.training import two_stage  # pylint: disable=g-import-not-at-top
    stages = [os.path.join(workdir, d) for d in (two_stage.STAGE1_DIR, two_stage.STAGE2_DIR)
              if os.path.isdir(os.path.join(workdir, d))]
    if not stages:
        return ""
    return (f" {workdir} is a two-stage run; each stage is a run of its own: "
            f"--workdir {' or --workdir '.join(stages)}")


if __name__ == "__main__":
    sys.exit(main())
