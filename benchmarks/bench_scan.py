"""Crossover of the linear_scan implementations alone (no projections).

Run::

    python -m benchmarks.bench_scan [--quick] [--T 16 32 ...] [--out DIR]
    python -m benchmarks.bench_scan --out benchmarks/results   # refresh the committed files

Without ``--out`` it prints the report and writes nothing.

``h_t = a_t * h_{t-1} + b_t`` with ``a, b`` of shape ``(B, T, D)`` = (8, T, 256),
float32, T in {16, 32, 64, 128, 256, 1024, 4096}; ``fwd`` = ``linear_scan``,
``fwdbwd`` = gradient of ``sum(h)`` w.r.t. ``a`` and ``b`` (the shared custom
VJP).  Inputs are positive (``a`` in (0, 1), ``b > 0``).  The impls timed
are the ones ``auto`` picks among (associative, sequential, chunked; the
log-space scans of older results are gone, now test references in
``tests/reference.py``), and the report gives the winner per T among them.
This is what justifies ``flax_minrnn.ops.scan.default_impl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.harness import Repeats
from flax_minrnn.ops import scan as scan_lib

TS = (16, 32, 64, 128, 256, 1024, 4096)
LINEAR_IMPLS = ("associative", "sequential", "chunked")
ALL_IMPLS = LINEAR_IMPLS
MODES = ("fwd", "fwdbwd")


def _inputs(b: int, t: int, d: int):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.05, 0.999, (b, t, d)).astype(np.float32))
    bb = jnp.asarray(rng.uniform(0.0, 1.0, (b, t, d)).astype(np.float32))
    return a, bb


def _fns(impl: str):
    def fwd(a, b):
        return scan_lib.linear_scan(a, b, impl=impl)[1]

    grad = jax.grad(lambda a, b: jnp.sum(scan_lib.linear_scan(a, b, impl=impl)[1]),
                    argnums=(0, 1))

    def fwdbwd(a, b):
        return grad(a, b)

    return {"fwd": fwd, "fwdbwd": fwdbwd}


def default_repeats(t: int, quick: bool) -> Repeats:
    if quick:
        return Repeats(max_n=10, min_n=3, budget_s=0.3)
    return Repeats(max_n=30, min_n=3, budget_s=0.5)


def run(ts: Sequence[int] = TS, *, b: int = 8, d: int = 256, quick: bool = False,
        impls: Sequence[str] = ALL_IMPLS,
        repeats_for: Optional[Callable[[int], Repeats]] = None,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    t_start = time.perf_counter()
    repeats_for = repeats_for or (lambda t: default_repeats(t, quick))
    rows: List[Dict[str, Any]] = []
    for t in ts:
        a, bb = _inputs(b, t, d)
        for impl in impls:
            fns = _fns(impl)
            for mode in MODES:
                compiled, cs = harness.compile_timed(fns[mode], a, bb)
                tm = harness.time_calls(compiled, (a, bb), repeats_for(t))
                rows.append(dict(impl=impl, T=t, mode=mode, compile_s=cs, **tm))
                log(f"T={t:5d} {mode:6s} {impl:12s} {harness.fmt_ms(tm['median_ms']):>8s} ms (n={tm['n']})")
    winners: Dict[str, Dict[str, Any]] = {}
    for mode in MODES:
        w_lin, w_all = {}, {}
        for t in ts:
            cand = [r for r in rows if r["T"] == t and r["mode"] == mode]
            lin = [r for r in cand if r["impl"] in LINEAR_IMPLS]
            if lin:
                w_lin[t] = min(lin, key=lambda r: r["median_ms"])["impl"]
            w_all[t] = min(cand, key=lambda r: r["median_ms"])["impl"]
        winners[mode] = dict(
            linear=w_lin, overall=w_all,
            auto_choice={t: scan_lib.default_impl(t).value for t in ts})
    return dict(machine=harness.machine_info(),
                settings=dict(B=b, D=d, Ts=list(ts), impls=list(impls), quick=quick),
                rows=rows, winners=winners, total_wall_s=time.perf_counter() - t_start)


def markdown_report(res: Dict[str, Any]) -> str:
    ts = res["settings"]["Ts"]
    impls = res["settings"]["impls"]
    by = {(r["impl"], r["T"], r["mode"]): r for r in res["rows"]}
    m = res["machine"]
    lines = ["# bench_scan results (linear_scan alone)", "",
             f"{m['cpu_model'] or m['processor']} ({m['cpu_count']} CPUs), backend "
             f"{m['backend']}, jax {m['jax_version']}; B={res['settings']['B']}, "
             f"D={res['settings']['D']}, float32; load average at start {m['loadavg_at_start']}; "
             f"{harness.run_stamp(m)}.", ""]
    for mode in MODES:
        w = res["winners"][mode]
        lines += [f"## {mode}: median ms", "",
                  "| impl | " + " | ".join(f"T={t}" for t in ts) + " |",
                  "|---|" + "---:|" * len(ts)]
        for impl in impls:
            lines.append(f"| {impl} | " + " | ".join(
                harness.fmt_ms(by[(impl, t, mode)]["median_ms"]) if (impl, t, mode) in by else "–"
                for t in ts) + " |")
        lines.append("| **winner (linear impls)** | " + " | ".join(
            str(w["linear"].get(t, "–")) for t in ts) + " |")
        if set(impls) - set(LINEAR_IMPLS):  # older results: impls beyond auto's choices
            lines.append("| winner (all) | " + " | ".join(
                str(w["overall"].get(t, "–")) for t in ts) + " |")
        lines.append("| chunked / sequential | " + " | ".join(
            f"{by[('chunked', t, mode)]['median_ms'] / by[('sequential', t, mode)]['median_ms']:.2f}"
            if ('chunked', t, mode) in by and ('sequential', t, mode) in by else "–"
            for t in ts) + " |")
        lines.append("| auto picks | " + " | ".join(w["auto_choice"][t] for t in ts) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(res: Dict[str, Any], out_dir: str, stem: str = "bench_scan") -> Dict[str, str]:
    return harness.write_report(res, out_dir, stem, markdown_report(res))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, same lengths (default: off)")
    p.add_argument("--T", type=harness.positive_int, nargs="+", default=list(TS),
                   help=f"sequence lengths (default: {' '.join(str(t) for t in TS)})")
    p.add_argument("--out", default=None,
                   help="write bench_scan.json and bench_scan.md into this folder "
                        "(default: print only)")
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    res = run(args.T, quick=args.quick)
    print()
    print(markdown_report(res))
    if args.out:
        paths = write_outputs(res, args.out)
        print(f"\nwrote {', '.join(paths.values())}  ({res['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
