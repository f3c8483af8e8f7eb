"""Speed experiment (issue #8, item 4): MinGRU vs GRU training step over T.

The minGRU paper (Feng et al. 2024, arXiv 2410.01201) reports a 175x
training speed-up of minGRU over a cuDNN GRU at T = 512 on a GPU.  This
measures the same ratio on whatever machine it runs on: one layer, B = 8,
d = 256, float32, forward + backward of ``sum(y)`` w.r.t. params and input,
for T from 64 to 4096: our MinGRU (``scan_impl="auto"``) against
``flax.linen.RNN(GRUCell)`` and, where PyTorch with CUDA is installed,
``torch.nn.GRU`` (cuDNN).  Medians of repeated jitted calls after a warm-up
(``benchmarks/harness.py``).  The GPU measurements of issue #21 are
``benchmarks/gpu/run.sh``.

Run from the repository root::

    python experiments/speed/run.py [--out experiments/speed] [--malloc tuned|default]

Writes ``results.json`` and ``speedup.png`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))

import flax.linen as nn  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top

from benchmarks import harness  # noqa: E402  pylint: disable=g-import-not-at-top
from flax_minrnn import MinGRU  # noqa: E402  pylint: disable=g-import-not-at-top

TS = (64, 128, 256, 512, 1024, 2048, 4096)
B, D = 8, 256
OURS, GRU, CUDNN = "MinGRU[auto]", "nn.RNN(GRUCell)", "torch.nn.GRU (cuDNN)"


def _torch_gru_ms(t: int, repeats: harness.Repeats):
    """torch.nn.GRU (cuDNN) forward + backward of sum(y), median ms; None without CUDA."""
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
        torch.cuda.synchronize()

    call()
    times = []
    while len(times) < repeats.max_n:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= repeats.min_n and sum(times) / 1e3 >= repeats.budget_s:
            break
    return statistics.median(times)


def rows_for(ts, repeats: harness.Repeats, log=print):
    """Per T: median ms of forward + backward of sum(y) w.r.t. params and input."""
    rows = []
    for t in ts:
        x = jax.random.normal(jax.random.key(1), (B, t, D), jnp.float32)
        row = dict(T=t)
        for name, module, apply in (
                (OURS, MinGRU(d_h=D), lambda m, p, x: m.apply(p, x)[1]),
                (GRU, nn.RNN(nn.GRUCell(D)), lambda m, p, x: m.apply(p, x))):
            params = jax.jit(module.init)(jax.random.key(2), x[:, :4])
            f = jax.jit(jax.grad(lambda p, x, m=module, ap=apply: jnp.sum(ap(m, p, x)),
                                 argnums=(0, 1)))
            row[name] = harness.time_calls(f, (params, x), repeats)["median_ms"]
        row[CUDNN] = _torch_gru_ms(t, repeats)
        rows.append(row)
        log(f"T={t:5d} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()
                                     if k != "T" and v is not None))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--T", type=int, nargs="+", default=list(TS))
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    repeats = harness.Repeats(max_n=20, min_n=5, budget_s=1.0)
    rows = rows_for(args.T, repeats)
    res = dict(machine=harness.machine_info(), B=B, D=D, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    lines = ["| T | MinGRU ms | nn.RNN(GRUCell) ms | speed-up | torch cuDNN GRU ms | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours, gru, cud = r[OURS], r[GRU], r[CUDNN]
        lines.append(f"| {r['T']} | {ours:.2f} | {gru:.2f} | {gru / ours:.1f}x | "
                     + (f"{cud:.2f} | {cud / ours:.1f}x |" if cud else "- | - |"))
    print("\n".join(lines))
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = [r["T"] for r in rows]
    ax.plot(ts, [r["nn.RNN(GRUCell)"] / r["MinGRU[auto]"] for r in rows], "o-",
            label="nn.RNN(GRUCell) / MinGRU")
    if all(r["torch.nn.GRU (cuDNN)"] for r in rows):
        ax.plot(ts, [r["torch.nn.GRU (cuDNN)"] / r["MinGRU[auto]"] for r in rows], "s-",
                label="cuDNN GRU / MinGRU")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("speed-up of MinGRU (fwd+bwd)")
    ax.set_title(f"{res['machine'].get('cpu_model') or res['machine'].get('backend')}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "speedup.png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
