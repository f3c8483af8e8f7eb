"""The true recurrence (two-stage training's stage 2) against a GRU and an LSTM.

Run::

    python -m benchmarks.bench_true_recurrence            # B 16/32, d 128/256, T 256/1024
    python -m benchmarks.bench_true_recurrence --quick    # B 16, d 128, T 256
    python -m benchmarks.bench_true_recurrence --out DIR  # also write the .json and .md
    # refresh the committed files:
    python -m benchmarks.bench_true_recurrence --out benchmarks/results/true_recurrence

Without ``--out`` it prints the report and writes nothing.

One layer, input width = state width = ``d``, float32, under ``jax.jit``:

* ``fwd``: ``sum(y * w)``; ``fwdbwd``: its value and gradient with respect to
  the parameters and ``x``.

Rows, per ``(B, T, d)``:

* ``MinGRU / MinLSTM / GatedLinearRNN true``: ``use_true_recurrence=True``
  (:mod:`flax_minrnn.ops.true_recurrence`), with a non-zero recurrent kernel;
* ``MinGRU true, autodiff lax.scan``: the same function as a ``lax.scan``
  over steps (projection hoisted, the gates and ``h_{t-1} @ U`` per step),
  differentiated by JAX: what the hand-written backward pass replaces;
* ``nn.RNN(GRUCell)``, ``nn.RNN(OptimizedLSTMCell)``: Flax's cells of width
  ``d`` (the reference the issue names);
* ``MinGRU auto (stage 1)``: stage 1's parallel mode, ``MinGRU(d_h=d)`` with
  the default ``scan_impl="auto"`` (``chunked`` from T = 64 on a CPU,
  ``associative`` on a GPU), for the ratio of sequential to scan training.
  Results written before this name was given call it ``MinGRU associative``.

The calls of all rows of one shape are interleaved, round after round (in an
order that changes from round to round, :func:`benchmarks.harness.interleaved`), so
that load from other processes spreads over every row alike; a timing is the
median (and the minimum) over the rounds, after one warm-up call.  The load
average is recorded at the start and the end.
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
from flax_minrnn.nn import gates as gates_lib
from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM
from flax_minrnn.ops import scan as scan_lib

FULL = [(16, 256, 128), (16, 1024, 128), (32, 256, 256), (32, 1024, 256)]
QUICK = [(16, 256, 128)]
BASELINE = "nn.RNN(GRUCell)"
STAGE1 = "MinGRU auto (stage 1)"  # "MinGRU associative" in results written before
MODES = ("fwd", "fwdbwd")


class ScanTrueMinGRU(nn.Module):
    """MinGRU's true recurrence as a ``lax.scan`` over steps (autodiff).

    Same parameters and function as ``MinGRU(d_h=d, use_true_recurrence=True)``
    without ``out_proj``.
    """

    d: int

    @nn.compact
    def __call__(self, x):
        batch = x.shape[0]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 2 * self.d))
        bias = self.param("bias", nn.initializers.zeros, (2 * self.d,))
        u = self.param("recurrent_kernel", nn.initializers.zeros, (self.d, 2 * self.d))
        pre = x @ kernel + bias[None, None, :]

        def step(h, pre_t):
            a, b = gates_lib.mingru_gates(pre_t + h @ u)
            h = a * h + b
            return h, h

        h_last, h = jax.lax.scan(step, jnp.zeros((batch, self.d), x.dtype),
                                 jnp.swapaxes(pre, 0, 1))
        return h_last, jnp.swapaxes(h, 0, 1)


def make_rows(d: int) -> Dict[str, Callable[[], nn.Module]]:
    return {
        "MinGRU true": lambda: MinGRU(d_h=d, use_true_recurrence=True),
        "MinLSTM true": lambda: MinLSTM(d_h=d, use_true_recurrence=True),
        "GatedLinearRNN true": lambda: GatedLinearRNN(d_h=d, use_true_recurrence=True),
        "MinGRU true, autodiff lax.scan": lambda: ScanTrueMinGRU(d),
        BASELINE: lambda: nn.RNN(nn.GRUCell(d)),
        "nn.RNN(OptimizedLSTMCell)": lambda: nn.RNN(nn.OptimizedLSTMCell(d)),
        STAGE1: lambda: MinGRU(d_h=d),
    }


def _prepare(module: nn.Module, x, w, mode: str):
    params = module.init(jax.random.PRNGKey(0), x)
    # A non-zero recurrent kernel (the gates see h_{t-1}).
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(1), v.shape, v.dtype)
        if "recurrent_kernel" in jax.tree_util.keystr(path) else v, params)

    # w is an argument, not a constant captured by the closure: a captured
    # (B, T, d) array would be folded into the executable as a literal.
    def loss(params, x, w):
        out = module.apply(params, x)
        y = out[1] if isinstance(out, tuple) else out
        return jnp.sum(y * w)

    fn = jax.jit(loss if mode == "fwd" else jax.value_and_grad(loss, argnums=(0, 1)))
    return fn, (params, x, w)


def measure(shape, rows: Dict[str, Callable[[], nn.Module]], rounds: int,
            log=print) -> List[Dict[str, Any]]:
    """Interleaved timings of every row at one ``(B, T, d)``."""
    b, t, d = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    calls = {}
    for name, build in rows.items():
        for mode in MODES:
            fn, args = _prepare(build(), x, w, mode)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            calls[(name, mode)] = (fn, args, time.perf_counter() - t0)
    times = harness.interleaved({k: (fn, args) for k, (fn, args, _) in calls.items()}, rounds)
    out = []
    for (name, mode), ms in times.items():
        out.append(dict(name=name, mode=mode, B=b, T=t, d=d, median_ms=statistics.median(ms),
                        min_ms=min(ms), n=len(ms), warmup_s=calls[(name, mode)][2]))
    base = {r["mode"]: r["median_ms"] for r in out if r["name"] == BASELINE}
    for r in out:
        r["vs_gru"] = r["median_ms"] / base[r["mode"]] if r["mode"] in base else None
    scan = {r["mode"]: r["median_ms"] for r in out if r["name"] == STAGE1}
    for r in out:
        if r["name"] == "MinGRU true":
            r["vs_scan"] = r["median_ms"] / scan[r["mode"]]
    log(f"B={b} T={t} d={d}: " + ", ".join(
        f"{r['name']} {r['mode']} {r['median_ms']:.1f} ms" for r in out))
    return out


def markdown(res: Dict[str, Any]) -> str:
    lines = [
        "| B | T | d | layer | fwd ms | fwd+bwd ms (min) | fwd+bwd / GRU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = res["rows"]
    for shape in res["settings"]["shapes"]:
        b, t, d = shape
        here = [r for r in rows if (r["B"], r["T"], r["d"]) == (b, t, d)]
        for name in dict.fromkeys(r["name"] for r in here):
            fwd = next(r for r in here if r["name"] == name and r["mode"] == "fwd")
            fb = next(r for r in here if r["name"] == name and r["mode"] == "fwdbwd")
            lines.append(f"| {b} | {t} | {d} | {name} | {harness.fmt_ms(fwd['median_ms'])} | "
                         f"{harness.fmt_ms(fb['median_ms'])} ({harness.fmt_ms(fb['min_ms'])}) "
                         f"| {fb['vs_gru']:.2f} |")
    lines.append("")
    lines.append(f"Sequential (MinGRU true) / stage 1 ({STAGE1}: "
                 f"{res['settings'].get('stage1_impl', '?')}), fwd+bwd: " + ", ".join(
        f"B={r['B']} T={r['T']} d={r['d']}: {r['vs_scan']:.1f}x" for r in rows
        if r["name"] == "MinGRU true" and r["mode"] == "fwdbwd"))
    m = res["machine"]
    lines.append("")
    lines.append(f"{m['cpu_model']}, {m['cpu_count']} cores, JAX {m['jax_version']}; load "
                 f"average {m['loadavg_at_start']} at the start, {res['loadavg_at_end']} at "
                 f"the end; median of {res['settings']['rounds']} interleaved rounds; "
                 f"{harness.run_stamp(m)}.")
    return "\n".join(lines)


def run(shapes, rounds: int, log=print) -> Dict[str, Any]:
    machine = harness.machine_info()
    t0 = time.perf_counter()
    rows = []
    for shape in shapes:
        rows += measure(shape, make_rows(shape[2]), rounds, log)
    try:
        load_end = list(os.getloadavg())
    except OSError:
        load_end = None
    impls = sorted({scan_lib.default_impl(s[1]).value for s in shapes})
    return dict(machine=machine, settings=dict(shapes=[list(s) for s in shapes],
                                               rounds=rounds, dtype="float32",
                                               stage1_impl=" / ".join(impls)),
                rows=rows, loadavg_at_end=load_end, total_wall_s=time.perf_counter() - t0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="one shape, (B, T, d) = (16, 256, 128), and 3 rounds unless --rounds "
                        "(default: off, the four shapes B 16/32 x T 256/1024)")
    p.add_argument("--rounds", type=harness.positive_int, default=None,
                   help="interleaved rounds per shape, at least 1 (default: 9, or 3 with "
                        "--quick)")
    p.add_argument("--out", default=None,
                   help="write bench_true_recurrence.json and .md into this folder "
                        "(default: print only)")
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    shapes = QUICK if args.quick else FULL
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 9)
    res = run(shapes, rounds)
    md = markdown(res)
    print()
    print(md)
    if args.out:
        paths = harness.write_report(res, args.out, "bench_true_recurrence", md)
        print(f"\nwrote {', '.join(paths.values())}  ({res['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
