"""Speed experiment (issue #8, item 4): MinGRU vs GRU training step over T.

The minGRU paper (Feng et al. 2024, arXiv 2410.01201) reports a 175x
training speed-up of minGRU over a cuDNN GRU at T = 512 on a GPU.  This
measures the same ratio on whatever machine it runs on: one layer, B = 8,
d = 256, float32, forward + backward (``value_and_grad`` of ``sum(y)`` w.r.t.
params and input: the loss and its gradients), for T from 64 to 4096: our
MinGRU (``scan_impl="auto"``) against ``flax.linen.RNN(GRUCell)`` and, where
PyTorch with CUDA is installed, ``torch.nn.GRU`` (cuDNN).  At each T the two
JAX layers are compiled, called once untimed, then timed in interleaved
rounds (``benchmarks.harness.interleaved``: outside load falls on both
alike); medians are reported.  The GPU measurements of issue #21 are
``benchmarks/gpu/run.sh``.

Run from the repository root::

    python experiments/speed/run.py                         # plain process, printed only
    python experiments/speed/run.py --out experiments/speed # refresh the committed files
    python experiments/speed/run.py --malloc tuned          # beside the plain run, never instead

Prints the machine and a markdown table; with ``--out DIR`` also writes
``results.json`` and ``speedup.png`` into ``DIR`` (default: print only, like
every script under ``benchmarks/``).
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
    """Per T: median ms of forward + backward (the loss ``sum(y)`` and its
    gradients w.r.t. params and input), MinGRU and GRU in interleaved rounds
    (as many as ``repeats`` gives the mean of the two, after one untimed call
    of each)."""
    rows = []
    for t in ts:
        x = jax.random.normal(jax.random.key(1), (B, t, D), jnp.float32)
        row = dict(T=t)
        calls, first_ms = {}, []
        for name, module, apply in (
                (OURS, MinGRU(d_h=D), lambda m, p, x: m.apply(p, x)[1]),
                (GRU, nn.RNN(nn.GRUCell(D)), lambda m, p, x: m.apply(p, x))):
            params = jax.jit(module.init)(jax.random.key(2), x[:, :4])
            f = jax.jit(jax.value_and_grad(
                lambda p, x, m=module, ap=apply: jnp.sum(ap(m, p, x)), argnums=(0, 1)))
            f = f.lower(params, x).compile()
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, x))
            first_ms.append((time.perf_counter() - t0) * 1e3)
            calls[name] = (f, (params, x))
        rounds = harness.rounds_within(repeats, first_ms)
        times = harness.interleaved(calls, rounds, warmup_rounds=0)
        for name, ms in times.items():
            row[name] = statistics.median(ms)
        row["rounds"] = rounds
        row[CUDNN] = _torch_gru_ms(t, repeats)
        rows.append(row)
        log(f"T={t:5d} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()
                                     if k not in ("T", "rounds") and v is not None))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None,
                   help="write results.json and speedup.png into this folder (default: "
                        "print only; experiments/speed refreshes the committed files)")
    p.add_argument("--T", type=harness.positive_int, nargs="+", default=list(TS))
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    repeats = harness.Repeats(max_n=20, min_n=5, budget_s=1.0)
    rows = rows_for(args.T, repeats)
    res = dict(machine=harness.machine_info(), B=B, D=D, rows=rows)
    lines = [f"{harness.machine_line(res['machine'])}; B={B}, d={D}, float32, medians of "
             "interleaved rounds.",
             "",
             "| T | MinGRU ms | nn.RNN(GRUCell) ms | speed-up | torch cuDNN GRU ms | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours, gru, cud = r[OURS], r[GRU], r[CUDNN]
        lines.append(f"| {r['T']} | {ours:.2f} | {gru:.2f} | {gru / ours:.1f}x | "
                     + (f"{cud:.2f} | {cud / ours:.1f}x |" if cud else "- | - |"))
    print("\n".join(lines))
    if not args.out:
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
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
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, "
          f"{os.path.join(args.out, 'speedup.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
