"""Sequence-parallel scan vs ``linear_scan``: the cost of splitting time.

Run::

    python -m benchmarks.bench_parallel [--quick] [--out DIR] [--T 1024 4096 ...]
    # N host devices on a CPU (the shard rows need several devices):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m benchmarks.bench_parallel --quick

``h_t = a_t * h_{t-1} + b_t`` with ``a, b`` of shape ``(B, T, D)``, float32,
timed three ways, each ``fwd`` (the states) and ``fwdbwd`` (gradient of
``sum(g * h)`` w.r.t. ``a`` and ``b``):

* ``linear_scan``: one device, no mesh;
* ``sequence_parallel[1]``: :func:`flax_minrnn.ops.parallel.sequence_parallel_scan`
  on a mesh of one device: the overhead of the sequence-parallel path
  (a second scan for the cumulative product of ``a``, the combine, the
  correction) where there is nothing to split;
* ``sequence_parallel[n]``: on ``n`` devices (powers of two up to
  ``jax.device_count()``), inputs already split along time.

Every time is the median of repeated calls after one warm-up call (compile),
each ended by ``block_until_ready`` (``benchmarks.harness.time_calls``).
Prints the table; with ``--out DIR`` also writes ``bench_parallel.{md,json}``
there (without it, nothing is written).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import harness
from benchmarks.harness import Repeats
from flax_minrnn.training import mesh as parallel
from flax_minrnn.ops import parallel as ops_parallel
from flax_minrnn.ops.scan import linear_scan

TS = (1024, 4096, 16384)
QUICK_TS = (1024,)
MODES = ("fwd", "fwdbwd")
BASELINE = "linear_scan"


def _fns(scan: Callable) -> Dict[str, Callable]:
    def fwd(a, b):
        return scan(a, b)[1]

    def loss(a, b, g):
        return jnp.sum(g * scan(a, b)[1])

    grad = jax.grad(loss, argnums=(0, 1))
    return {"fwd": fwd, "fwdbwd": grad}


def shard_counts(n_devices: int) -> List[int]:
    """1 and the powers of two up to ``n_devices`` (and ``n_devices`` itself)."""
    counts = {1, n_devices}
    n = 2
    while n < n_devices:
        counts.add(n)
        n *= 2
    return sorted(counts)


def _variants(t: int, impl: str, n_devices: int):
    """``(name, n_shards, mesh or None, fns)`` of every timed variant."""
    yield BASELINE, 1, None, _fns(lambda a, b: linear_scan(a, b, impl=impl))
    for n in shard_counts(n_devices):
        if t % n:
            continue
        mesh = parallel.make_mesh((n,), ("seq",))
        scan = lambda a, b, mesh=mesh: ops_parallel.sequence_parallel_scan(
            a, b, axis_name="seq", impl=impl, mesh=mesh)
        yield f"sequence_parallel[{n}]", n, mesh, _fns(scan)


def run(ts: Sequence[int] = TS, *, b: int = 8, d: int = 256, impl: str = "auto",
        quick: bool = False, repeats: Optional[Repeats] = None,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Times every variant at every ``T``; returns the JSON-able result."""
    t_start = time.perf_counter()
    repeats = repeats or (Repeats(max_n=10, min_n=3, budget_s=0.3) if quick
                          else Repeats(max_n=30, min_n=5, budget_s=1.0))
    rng = np.random.default_rng(0)
    rows: List[Dict[str, Any]] = []
    for t in ts:
        a = rng.uniform(0.05, 0.999, (b, t, d)).astype(np.float32)
        bb = rng.normal(size=(b, t, d)).astype(np.float32)
        g = rng.normal(size=(b, t, d)).astype(np.float32)
        for name, n, mesh, fns in _variants(t, impl, jax.device_count()):
            put = (jnp.asarray if mesh is None else
                   lambda x, mesh=mesh: jax.device_put(x, NamedSharding(mesh, P(None, "seq"))))
            args = {"fwd": (put(a), put(bb)), "fwdbwd": (put(a), put(bb), put(g))}
            for mode in MODES:
                tm = harness.time_calls(jax.jit(fns[mode]), args[mode], repeats)
                rows.append(dict(name=name, shards=n, T=t, mode=mode, **tm))
                log(f"T={t:6d} {mode:6s} {name:24s} {harness.fmt_ms(tm['median_ms']):>8s} ms "
                    f"(n={tm['n']})")
    base = {(r["T"], r["mode"]): r["median_ms"] for r in rows if r["name"] == BASELINE}
    for r in rows:
        r["vs_linear_scan"] = r["median_ms"] / base[(r["T"], r["mode"])]
    return dict(machine=harness.machine_info(),
                settings=dict(B=b, D=d, Ts=list(ts), impl=impl, quick=quick,
                              n_devices=jax.device_count()),
                rows=rows, total_wall_s=time.perf_counter() - t_start)


def markdown_report(res: Dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    names = list(dict.fromkeys(r["name"] for r in res["rows"]))
    by = {(r["name"], r["T"], r["mode"]): r for r in res["rows"]}
    lines = ["# bench_parallel results (sequence-parallel scan vs linear_scan)", "",
             f"{m['cpu_model'] or m['processor']} ({m['cpu_count']} CPUs), backend "
             f"{m['backend']} ({m['device_kind']}, {m['n_devices']} devices), jax "
             f"{m['jax_version']}; B={s['B']}, D={s['D']}, impl={s['impl']}, float32"
             f"{', --quick' if s['quick'] else ''}; load average at start "
             f"{m['loadavg_at_start']}; {harness.run_stamp(m)}.", ""]
    for mode in MODES:
        lines += [f"## {mode}: median ms (× linear_scan)", "",
                  "| variant | " + " | ".join(f"T={t}" for t in s["Ts"]) + " |",
                  "|---|" + "---:|" * len(s["Ts"])]
        for name in names:
            cells = []
            for t in s["Ts"]:
                r = by.get((name, t, mode))
                cells.append("–" if r is None else
                             f"{harness.fmt_ms(r['median_ms'])} "
                             f"({r['vs_linear_scan']:.2f}×)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(res: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    return harness.write_report(res, out_dir, "bench_parallel", markdown_report(res))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"T = {' '.join(map(str, QUICK_TS))}, B = 4, D = 64, fewer repeats "
                        "(seconds on a CPU; default: off)")
    p.add_argument("--out", default=None,
                   help="write bench_parallel.json and bench_parallel.md into this folder "
                        "(default: print only)")
    p.add_argument("--T", type=harness.positive_int, nargs="+", default=None,
                   help=f"sequence lengths (default: {' '.join(map(str, TS))}; "
                        f"{' '.join(map(str, QUICK_TS))} with --quick)")
    p.add_argument("--B", type=harness.positive_int, default=None,
                   help="batch size (default: 8; 4 with --quick)")
    p.add_argument("--D", type=harness.positive_int, default=None,
                   help="state width (default: 256; 64 with --quick)")
    p.add_argument("--impl", default="auto",
                   help="linear_scan impl, also of each shard (default: auto)")
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    ts = args.T or (QUICK_TS if args.quick else TS)
    b = args.B or (4 if args.quick else 8)
    d = args.D or (64 if args.quick else 256)
    res = run(ts, b=b, d=d, impl=args.impl, quick=args.quick)
    md = markdown_report(res)
    print()
    print(md)
    if args.out:
        paths = write_outputs(res, args.out)
        print(f"\nwrote {', '.join(paths.values())}  ({res['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
