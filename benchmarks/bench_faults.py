"""Page faults and temporaries of one forward+backward, per layer and T.

Run::

    python -m benchmarks.bench_faults                      # T = 1024 4096, plain process
    python -m benchmarks.bench_faults --malloc tuned --out DIR

Per layer (``MinGRU``, ``MinLSTM``, ``GatedLinearRNN`` at ``scan_impl="auto"``
and the naive minGRU of :mod:`benchmarks.bench_layers`) and T, for
``value_and_grad`` of ``sum(y)`` with respect to parameters and input (the
loss and its gradients, :func:`benchmarks.bench_ab.fwdbwd`; B = 8, d = 256,
float32):

* ``temp MiB``: XLA's temporary allocation (``memory_analysis()``);
* ``faults/call``: minor page faults per call (``getrusage``, after three
  warm-up calls), and the MiB they cover (4 KiB pages);
* ``ms``: median wall time per call;
* ``fault ms``: faults times the cost of one 4 KiB fault on this machine,
  measured here by filling a fresh 32 MiB anonymous ``mmap`` against refilling
  an array already touched (:func:`fault_cost_us`).

Why it matters: the buffer assignment of XLA:CPU puts every temporary of an
executable in one block, allocated on each call.  glibc's ``malloc`` serves a
block above its mmap threshold with a fresh ``mmap``; the threshold adapts to
freed blocks but never exceeds 32 MiB on 64-bit systems (``mallopt(3)``,
``M_MMAP_THRESHOLD``).  A block above 32 MiB is therefore new memory on every
call, and each of its 4 KiB pages faults when first written.
``flax_minrnn.tune_cpu_malloc()`` (``--malloc tuned``) raises the threshold, so
freed blocks are reused and the faults go.
"""

from __future__ import annotations

import argparse
import mmap
import resource
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

import jax
import numpy as np

import flax_minrnn
from benchmarks import harness
from benchmarks.bench_ab import fwdbwd
from benchmarks.bench_layers import NaiveMinGRU, make_input

PAGE = 4096
LAYERS = ("MinGRU", "MinLSTM", "GatedLinearRNN", "naive")


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fresh_block(n_bytes: int) -> mmap.mmap:
    """An anonymous ``mmap`` of 4 KiB pages (huge pages declined where the
    kernel would otherwise give them), as glibc maps a large block."""
    block = mmap.mmap(-1, n_bytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        block.madvise(mmap.MADV_NOHUGEPAGE)
    return block


def fault_cost_us(n_bytes: int = 32 << 20, rounds: int = 9) -> float:
    """Microseconds per 4 KiB page fault: the median time to fill a
    :func:`fresh_block` of ``n_bytes`` (NumPy's own large arrays would get
    huge pages), less the median time to fill an array already touched,
    divided by the faults counted during the fresh fills."""
    n = n_bytes // 4
    touched = np.ones(n, np.float32)
    fresh_s, reuse_s, faults = [], [], 0
    for _ in range(rounds):
        f0, t0 = _minflt(), time.perf_counter()
        block = fresh_block(n_bytes)
        a = np.frombuffer(block, np.float32)
        a.fill(1.0)
        fresh_s.append(time.perf_counter() - t0)
        faults += _minflt() - f0
        del a
        block.close()
        t0 = time.perf_counter()
        touched.fill(1.0)
        reuse_s.append(time.perf_counter() - t0)
    per_round = max(1, faults // rounds)
    extra = max(0.0, statistics.median(fresh_s) - statistics.median(reuse_s))
    return extra / per_round * 1e6


def measure(name: str, b: int, t: int, d: int, calls: int) -> Dict:
    """One row: temporaries, faults and time of ``name``'s forward+backward."""
    x = make_input(b, t, d)
    module = NaiveMinGRU(d) if name == "naive" else getattr(flax_minrnn, name)(d_h=d)
    params = module.init(jax.random.PRNGKey(0), x[:, :4])
    compiled = fwdbwd(module, pair=name != "naive").lower(params, x).compile()
    mem = harness.memory_stats(compiled) or {}
    for _ in range(3):
        jax.block_until_ready(compiled(params, x))
    times, faults = [], []
    for _ in range(calls):
        f0, t0 = _minflt(), time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append((time.perf_counter() - t0) * 1e3)
        faults.append(_minflt() - f0)
    return dict(layer=name, T=t, temp_bytes=mem.get("temp_size_in_bytes"),
                output_bytes=mem.get("output_size_in_bytes"),
                faults_per_call=float(statistics.median(faults)),
                median_ms=float(statistics.median(times)), all_ms=times, all_faults=faults)


def run(ts: Sequence[int], calls: int, b: int = 8, d: int = 256,
        layers: Sequence[str] = LAYERS, log=print) -> Dict:
    results = {"machine": harness.machine_info(), "B": b, "D": d, "calls": calls,
               "fault_cost_us": fault_cost_us(), "rows": []}
    log(f"one page fault: {results['fault_cost_us']:.2f} us")
    for t in ts:
        for name in layers:
            row = measure(name, b, t, d, calls)
            results["rows"].append(row)
            log(f"T={t} {name}: {row['median_ms']:.1f} ms, "
                f"{row['faults_per_call']:.0f} faults/call")
    return results


def report(results: Dict) -> str:
    m = results["machine"]
    cost = results["fault_cost_us"]
    lines = [f"# Page faults per forward+backward (B={results['B']}, d={results['D']}, "
             f"median of {results['calls']} calls, malloc {m.get('malloc')})", "",
             f"Machine: {m['cpu_model']} ({m['cpu_count']} CPUs), jax {m['jax_version']}; "
             f"one page fault costs {cost:.2f} us here; {harness.run_stamp(m)}.", "",
             "| T | layer | temp MiB | faults/call | MiB faulted | ms | fault ms | fault share |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        temp = r["temp_bytes"]
        fault_ms = r["faults_per_call"] * cost / 1e3
        lines.append(harness.md_row([
            r["T"], r["layer"], "–" if temp is None else f"{temp / 2**20:.1f}",
            f"{r['faults_per_call']:.0f}", f"{r['faults_per_call'] * PAGE / 2**20:.1f}",
            f"{r['median_ms']:.1f}", f"{fault_ms:.1f}", f"{fault_ms / r['median_ms']:.0%}"]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=harness.positive_int, default=10,
                   help="timed calls per row, after three warm-up calls (default: 10)")
    harness.add_report_flags(p, "bench_faults")
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    results = run(args.T, args.calls)
    harness.emit_report(results, report(results), args.out, "bench_faults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
