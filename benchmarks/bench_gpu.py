"""GPU measurements of issue 5: scan bandwidth, and MinGRU against GRUs over T.

Run on a machine with a GPU (the numbers mean little on a CPU)::

    python -m benchmarks.bench_gpu --out benchmarks/results/gpu
    python -m benchmarks.bench_gpu --quick          # tiny sizes: checks the harness

What it measures, side by side in one run (median of repeated jitted calls
after a warm-up, ``block_until_ready``; PyTorch rows with CUDA events):

1. **Copy bandwidth** of the device: ``x + 1`` over a 1 GiB float32 array
   with the output donated (bytes read + written per second).
2. **The scan alone**, ``linear_scan(a, b)`` for every implementation that
   runs on the GPU, at the issue's shape ``(8, 4096, 256)`` and a large one
   ``(64, 4096, 1024)``: forward time and its *achieved bandwidth*, the
   scan's minimum bytes (read ``a`` and ``b``, write ``h``: ``3 B T D`` floats)
   over the time, as a fraction of the copy bandwidth; forward+backward time.
3. **MinGRU vs GRU**, one layer ``B = 8, d = 256``, float32, forward+backward
   of ``sum(y)`` w.r.t. params and input, ``T`` from 64 to 4096: our MinGRU
   (``scan_impl`` auto and each GPU impl), ``flax.linen.RNN(GRUCell)``, and,
   when PyTorch with CUDA is importable, ``torch.nn.GRU`` (cuDNN), the
   baseline of the minGRU paper's 175x claim at T = 512.

Output: a markdown table (printed) and JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.harness import Repeats
from flax_minrnn import MinGRU
from flax_minrnn.ops import scan as scan_lib

F32 = 4
SCAN_SHAPES = ((8, 4096, 256), (64, 4096, 1024))
GPU_IMPLS = ("associative", "chunked", "pallas")
TS = (64, 128, 256, 512, 1024, 2048, 4096)
B, D = 8, 256


def _scan_inputs(shape):
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.uniform(k1, shape, jnp.float32, 0.05, 0.999)
    b = jax.random.normal(k2, shape, jnp.float32)
    return a, b


def bench_scan(shapes, impls, repeats: Repeats, log) -> List[Dict[str, Any]]:
    rows = []
    for shape in shapes:
        a, b = _scan_inputs(shape)
        for impl in impls:
            fwd = jax.jit(lambda a, b, impl=impl: scan_lib.linear_scan(a, b, impl=impl)[1])
            grad = jax.jit(jax.grad(
                lambda a, b, impl=impl: jnp.sum(scan_lib.linear_scan(a, b, impl=impl)[1]),
                argnums=(0, 1)))
            try:
                tf = harness.time_calls(fwd, (a, b), repeats)
                tb = harness.time_calls(grad, (a, b), repeats)
            except Exception as e:  # pylint: disable=broad-except
                log(f"scan {shape} {impl}: FAILED {type(e).__name__}: {str(e)[:200]}")
                rows.append(dict(shape=list(shape), impl=impl, error=str(e)[:500]))
                continue
            min_bytes = 3 * int(np.prod(shape)) * F32
            row = dict(shape=list(shape), impl=impl, fwd_ms=tf["median_ms"],
                       fwdbwd_ms=tb["median_ms"], min_bytes=min_bytes,
                       achieved_bytes_per_s=min_bytes / (tf["median_ms"] / 1e3))
            rows.append(row)
            log(f"scan {shape} {impl:12s} fwd {tf['median_ms']:.3f} ms "
                f"({row['achieved_bytes_per_s'] / 1e9:.0f} GB/s)  fwdbwd {tb['median_ms']:.3f} ms")
    return rows


def _torch_gru_ms(t: int, repeats: Repeats) -> Optional[float]:
    """torch.nn.GRU (cuDNN) forward+backward median ms, or None."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.manual_seed(0)
    gru = torch.nn.GRU(D, D, batch_first=True).cuda()
    x = torch.randn(B, t, D, device="cuda", requires_grad=True)

    def call():
        y, _ = gru(x)
        y.sum().backward()

    call()
    torch.cuda.synchronize()
    times = []
    while len(times) < repeats.max_n:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= repeats.min_n and sum(times) / 1e3 >= repeats.budget_s:
            break
    return statistics.median(times)


def bench_layers(ts, impls, repeats: Repeats, log) -> List[Dict[str, Any]]:
    rows = []
    for t in ts:
        x = jax.random.normal(jax.random.key(1), (B, t, D), jnp.float32)
        cands: Dict[str, Callable] = {}
        for impl in ("auto",) + tuple(impls):
            layer = MinGRU(d_h=D, scan_impl=impl)
            cands[f"MinGRU[{impl}]"] = (layer, lambda m, p, x: m.apply(p, x)[1])
        cands["nn.RNN(GRUCell)"] = (nn.RNN(nn.GRUCell(D)), lambda m, p, x: m.apply(p, x))
        row: Dict[str, Any] = dict(T=t)
        for name, (module, apply) in cands.items():
            params = jax.jit(module.init)(jax.random.key(2), x[:, :4])
            f = jax.jit(jax.grad(lambda p, x, m=module, ap=apply: jnp.sum(ap(m, p, x)),
                                 argnums=(0, 1)))
            try:
                row[name] = harness.time_calls(f, (params, x), repeats)["median_ms"]
            except Exception as e:  # pylint: disable=broad-except
                log(f"T={t} {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
                row[name] = None
        row["torch.nn.GRU (cuDNN)"] = _torch_gru_ms(t, repeats)
        rows.append(row)
        log("T=%5d " % t + "  ".join(f"{k} {v:.3f}" for k, v in row.items()
                                     if k != "T" and v is not None))
    return rows


def markdown(res: Dict[str, Any]) -> str:
    m, bw = res["machine"], res["copy_bandwidth"]
    copy = bw["bytes_per_s"]
    out = [f"# bench_gpu ({m.get('device_kind')}, jax {m['jax_version']})", "",
           f"Copy bandwidth (x + 1 in place, 1 GiB): **{copy / 1e9:.0f} GB/s** "
           "(bytes read + written).", "",
           "## linear_scan alone (float32)", "",
           "| shape (B, T, D) | impl | fwd ms | achieved GB/s | of copy bw | fwd+bwd ms |",
           "|---|---|---:|---:|---:|---:|"]
    for r in res["scan"]:
        if "error" in r:
            out.append(f"| {tuple(r['shape'])} | {r['impl']} | failed | | | |")
            continue
        out.append(f"| {tuple(r['shape'])} | {r['impl']} | {r['fwd_ms']:.3f} | "
                   f"{r['achieved_bytes_per_s'] / 1e9:.0f} | "
                   f"{r['achieved_bytes_per_s'] / copy:.0%} | {r['fwdbwd_ms']:.3f} |")
    names = [k for k in res["layers"][0] if k != "T"] if res["layers"] else []
    out += ["", f"## One layer, B = {B}, d = {D}, float32, forward+backward: median ms", "",
            "| T | " + " | ".join(names) + " | GRUCell / MinGRU[auto] | cuDNN GRU / MinGRU[auto] |",
            "|---:|" + "---:|" * (len(names) + 2)]
    for r in res["layers"]:
        ours = r.get("MinGRU[auto]")
        ratio = lambda k: (f"{r[k] / ours:.1f}x" if ours and r.get(k) else "–")
        out.append(f"| {r['T']} | " + " | ".join(
            f"{r[k]:.3f}" if r.get(k) is not None else "–" for k in names)
            + f" | {ratio('nn.RNN(GRUCell)')} | {ratio('torch.nn.GRU (cuDNN)')} |")
    return "\n".join(out)


def run(quick: bool = False, log=print) -> Dict[str, Any]:
    t0 = time.perf_counter()
    repeats = Repeats(max_n=5, min_n=2, budget_s=0.05) if quick else Repeats(
        max_n=50, min_n=10, budget_s=1.0)
    machine = harness.machine_info()
    machine["device_kind"] = jax.devices()[0].device_kind
    bw = harness.measure_bandwidth((1 << 20) if quick else (1 << 30), repeats)
    log(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.0f} GB/s")
    shapes = ((2, 64, 16),) if quick else SCAN_SHAPES
    scan_rows = bench_scan(shapes, GPU_IMPLS, repeats, log)
    layer_rows = bench_layers((16, 32) if quick else TS, GPU_IMPLS, repeats, log)
    return dict(machine=machine, copy_bandwidth=bw, scan=scan_rows, layers=layer_rows,
                settings=dict(quick=quick, B=B, D=D, scan_shapes=[list(s) for s in shapes]),
                total_wall_s=time.perf_counter() - t0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (harness check)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "gpu"))
    args = p.parse_args(argv)
    res = run(quick=args.quick)
    os.makedirs(args.out, exist_ok=True)
    harness.write_json(os.path.join(args.out, "bench_gpu.json"), res)
    text = markdown(res)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as fh:
        fh.write(text + "\n")
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
