"""Memory and time of many distinct lengths, with and without length buckets.

Without buckets every new prompt length (and every new ``max_new_tokens``)
compiles :func:`flax_minrnn.models.generate.generate` afresh, and every new
sequence length compiles the eval step; each compiled executable stays in
memory. With ``bucket_lengths=True`` the lengths are padded to
:func:`~flax_minrnn.models.generate.bucket_length` (16, 24, 32, 48, 64, 96,
128, ...), so 100 lengths share a handful of executables.

Two workloads, each run once per mode in a fresh process (so that the
resident memory and the compile caches of one mode do not count for the
other; glibc's default allocator, not ``tune_cpu_malloc``, so that freed
memory is returned):

* ``generate``: an LM (the Tiny Shakespeare shape: vocab 65, d_model 128,
  2 layers), batch 1, prompt lengths ``1..N`` (default N = 100), 40 new
  tokens each, greedy;
* ``eval``: :func:`flax_minrnn.training.train.evaluate_batches` with one
  shared eval step over batches ``(8, T)``, ``T = 1..N``.

Reported per mode: resident memory (RSS, ``/proc/self/status``) after a
warm-up call and after the N lengths, wall time of the N calls, number of
XLA compilations (``jax.monitoring``), and the steady-state time of one call
at the longest length (bucketing decodes up to the bucket of
``max_new_tokens``, here 48 for 40, and pads the prefill). The generated
tokens and eval losses of the two modes are compared.

Usage::

    python -m benchmarks.bench_buckets [--n 100] [--out benchmarks/results/bench_buckets.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict

import numpy as np

NEW_TOKENS = 40


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(workload: str, bucketed: bool, n: int) -> Dict[str, Any]:
    """One mode of one workload, in this (fresh) process."""
    import importlib  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax_minrnn.models.lm import LM, LMConfig  # pylint: disable=g-import-not-at-top
    from flax_minrnn.training import train  # pylint: disable=g-import-not-at-top
    generate_lib = importlib.import_module("flax_minrnn.models.generate")

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    model = LM(LMConfig(vocab_size=65, n_layer=2, d_model=128))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    if workload == "generate":
        prompts = [jax.device_put(rng.integers(0, 65, (1, t)).astype(np.int32))
                   for t in range(1, n + 1)]

        def call(i):
            out = generate_lib.generate(model, params, prompts[i], NEW_TOKENS,
                                        rng=jax.random.key(0), temperature=0.0,
                                        bucket_lengths=bucketed)
            return np.asarray(out.tokens)
    else:
        step = train.make_eval_step(model)
        batches = [{"inputs": rng.integers(0, 65, (8, t)).astype(np.int32),
                    "targets": rng.integers(0, 65, (8, t)).astype(np.int32),
                    "weights": np.ones((8, t), np.float32)} for t in range(1, n + 1)]

        def call(i):
            return train.evaluate_batches(step, params, [batches[i]],
                                          bucket_lengths=bucketed)["eval_loss"]

    call(0)  # Warm-up: the first compile of everything.
    rss0, compiles0 = _rss_mb(), len(compiles)
    t0 = time.perf_counter()
    results = [call(i) for i in range(1, n)]
    wall = time.perf_counter() - t0
    rss1 = _rss_mb()
    last = n - 1  # Steady state at the longest length (already compiled).
    times = []
    for _ in range(5):
        tic = time.perf_counter()
        call(last)
        times.append(time.perf_counter() - tic)
    if workload == "generate":
        results = [r.tolist() for r in results]
    return dict(workload=workload, bucketed=bucketed, lengths=n,
                rss_after_warmup_mb=rss0, rss_after_mb=rss1, rss_growth_mb=rss1 - rss0,
                wall_s=wall, compiles=len(compiles) - compiles0,
                compile_s=float(sum(compiles[compiles0:])),
                steady_call_ms=1e3 * float(np.median(times)), results=results)


def run(n: int, log=print) -> Dict[str, Any]:
    from benchmarks import harness  # pylint: disable=g-import-not-at-top
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    rows, agree = [], {}
    for workload in ("generate", "eval"):
        pair = {}
        for bucketed in (False, True):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_buckets", "--child", workload,
                 "--bucketed" if bucketed else "--exact", "--n", str(n)],
                capture_output=True, text=True, check=True, env=env,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            row = json.loads(out.stdout.strip().splitlines()[-1])
            pair[bucketed] = row.pop("results")
            rows.append(row)
            log(f"{workload:8s} {'bucketed' if bucketed else 'exact':8s}: RSS "
                f"{row['rss_after_warmup_mb']:7.1f} -> {row['rss_after_mb']:7.1f} MB, "
                f"{row['wall_s']:6.1f} s, {row['compiles']:3d} compiles, steady call "
                f"{row['steady_call_ms']:.2f} ms")
        if workload == "generate":
            agree[workload] = dict(identical_tokens=pair[False] == pair[True])
        else:
            diff = np.abs(np.asarray(pair[False]) - np.asarray(pair[True]))
            agree[workload] = dict(max_rel_loss_diff=float(
                np.max(diff / np.abs(np.asarray(pair[False])))))
    return dict(settings=dict(lengths=n, new_tokens=NEW_TOKENS, model="LM vocab 65, "
                              "d_model 128, n_layer 2, float32", generate_batch=1,
                              eval_batch=8, malloc="glibc default"),
                machine=harness.machine_info(), rows=rows, agreement=agree)


def markdown(res: Dict[str, Any]) -> str:
    from benchmarks import harness  # pylint: disable=g-import-not-at-top
    n = res["settings"]["lengths"]
    lines = [f"{harness.machine_line(res['machine'], malloc=False)}.", "",
             f"{n} distinct lengths (1..{n}; generate: prompt lengths, "
             f"{res['settings']['new_tokens']} new tokens each; eval: (8, T) batches), "
             "after a warm-up call:", "",
             "| workload | mode | RSS after warm-up MB | RSS after MB | growth MB | "
             "wall s | compiles | compile s | steady call ms (longest) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['workload']} | {'bucketed' if r['bucketed'] else 'exact'} | "
            f"{r['rss_after_warmup_mb']:.0f} | {r['rss_after_mb']:.0f} | "
            f"{r['rss_growth_mb']:.0f} | {r['wall_s']:.1f} | {r['compiles']} | "
            f"{r['compile_s']:.1f} | {r['steady_call_ms']:.2f} |")
    a = res["agreement"]
    lines += ["", f"generate: bucketed tokens identical to exact: "
              f"{a['generate']['identical_tokens']}; eval: largest relative loss "
              f"difference {a['eval']['max_rel_loss_diff']:.1e}."]
    return "\n".join(lines)


def _at_least_two(text: str) -> int:
    """An ``argparse`` type: an integer of at least 2 (one length is the
    warm-up call, the others are measured)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=_at_least_two, default=100,
                   help="number of distinct lengths, 1..N, at least 2 (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="write the JSON results here (default: print only)")
    p.add_argument("--child", choices=("generate", "eval"), default=None,
                   help=argparse.SUPPRESS)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--bucketed", dest="bucketed", action="store_true",
                      help=argparse.SUPPRESS)
    mode.add_argument("--exact", dest="bucketed", action="store_false",
                      help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.bucketed, args.n)))
        return
    t0 = time.perf_counter()
    res = run(args.n)
    res["total_wall_s"] = time.perf_counter() - t0
    print(markdown(res))
    if args.out:
        from benchmarks import harness  # pylint: disable=g-import-not-at-top
        harness.write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
