"""``jax.export`` with a fixed time axis against a symbolic one.

Run::

    python -m benchmarks.bench_export                 # T = 1024 4096, plain process
    python -m benchmarks.bench_export --out DIR       # also writes bench_export.{json,md}

Per layer (``MinGRU``, ``MinLSTM``, ``GatedLinearRNN``, ``scan_impl="auto"``,
and each with ``use_true_recurrence=True``; B = 8, d = 256, float32)
and T, the forward pass and ``value_and_grad`` of
``sum(y)`` with respect to parameters and input (the loss and its gradients)
are each exported twice, serialized and deserialized: once for the concrete
``(B, T, d)`` and once for ``symbolic_shape("b, t, 256")`` (batch and time
both symbolic, the width fixed).  Both are called on the same input, in
interleaved rounds after a warm-up round; the table gives the median ms of
each and their ratio.  On CPU a symbolic ``t`` runs the tile loop of a fixed
``T``, laid out for an unknown length (``flax_minrnn.ops.gated._tile_layout``);
the true recurrence runs blocks of 8 steps per loop iteration for a fixed
``T`` and one step per iteration for a symbolic ``t``.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
from jax import export

import flax_minrnn
from benchmarks import harness
from benchmarks.bench_layers import init_params, make_input

# Row label: (layer class, keyword arguments besides d_h).
LAYERS = {**{name: (name, {}) for name in ("MinGRU", "MinLSTM", "GatedLinearRNN")},
          **{f"{name}[true recurrence]": (name, {"use_true_recurrence": True})
             for name in ("MinGRU", "MinLSTM", "GatedLinearRNN")}}
B, D = 8, 256


def _exported(fun, params, spec):
    """``fun`` exported for ``spec``, serialized and deserialized: its ``call``."""
    return export.deserialize(export.export(jax.jit(fun))(params, spec).serialize()).call


def measure(layer_name: str, seq_len: int, rounds: int) -> List[Dict[str, Any]]:
    cls, kwargs = LAYERS[layer_name]
    layer = getattr(flax_minrnn, cls)(d_h=D, **kwargs)
    x = make_input(B, seq_len, D)
    params = init_params(layer, x)
    forward = lambda p, x: layer.apply(p, x)[1]
    # The loss is returned with its gradients, as training has it (with the
    # gradients alone XLA drops forward products that only y needs).
    grad = jax.value_and_grad(lambda p, x: jnp.sum(forward(p, x)), argnums=(0, 1))
    fixed = jax.ShapeDtypeStruct(x.shape, x.dtype)
    symbolic = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, t, {D}"), x.dtype)
    rows = []
    for what, fun in (("forward", forward), ("fwd+bwd", grad)):
        calls = {kind: (_exported(fun, params, spec), (params, x))
                 for kind, spec in (("fixed", fixed), ("symbolic", symbolic))}
        times = harness.interleaved(calls, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(layer=layer_name, T=seq_len, what=what, fixed_ms=med["fixed"],
                         symbolic_ms=med["symbolic"],
                         symbolic_over_fixed=med["symbolic"] / med["fixed"]))
    return rows


def markdown(res: Dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# bench_export: exported with a fixed T vs a symbolic t", "",
             f"{m['cpu_model'] or m['processor']}, {m['cpu_count']} cores, jax "
             f"{m['jax_version']}, malloc {m['malloc']}; {harness.run_stamp(m)}; "
             f"B={B}, d={D}, float32, median of {res['rounds']} interleaved rounds", "",
             harness.md_row(["layer", "T", "", "fixed T ms", "symbolic t ms", "symbolic / fixed"]),
             harness.md_row(["---"] * 3 + ["---:"] * 3)]
    for r in res["rows"]:
        lines.append(harness.md_row([r["layer"], r["T"], r["what"], harness.fmt_ms(r["fixed_ms"]),
                                     harness.fmt_ms(r["symbolic_ms"]),
                                     harness.fmt_ratio(r["symbolic_over_fixed"])]))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_report_flags(p, "bench_export")
    p.add_argument("--rounds", type=harness.positive_int, default=7,
                   help="timed interleaved rounds per pair (default: 7)")
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    rows = [row for name in LAYERS for t in args.T for row in measure(name, t, args.rounds)]
    res = dict(machine=harness.machine_info(), rounds=args.rounds, rows=rows)
    harness.emit_report(res, markdown(res), args.out, "bench_export")


if __name__ == "__main__":
    main()
