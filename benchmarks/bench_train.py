"""LM training throughput: tokens per second of the trainer's jitted step.

Run::

    python -m benchmarks.bench_train [--quick] [--out FILE.json]
    # refresh the committed file with the plain process (the headline; the
    # committed one was measured with --malloc tuned):
    python -m benchmarks.bench_train --out benchmarks/results/bench_train.json
    # tuned only beside it, into another file:
    python -m benchmarks.bench_train --malloc tuned --out /tmp/bench_train_tuned.json

For each time mixing (MinGRU, MinLSTM, GatedLinearRNN, RG-LRU) and each scan
implementation that runs on the backend (``native`` for MinGRU and MinLSTM
only: the compiled kernels implement no other gates, and the others would
run ``chunked`` under its name), the model of
``configs/shakespeare.py`` (3 layers, d_model 128, batch 32 x 128
characters) is trained with the trainer's own step
(:func:`flax_minrnn.training.train.make_train_step`: forward, backward, AdamW update);
the figure is ``batch * seq_len / median step time`` after a warm-up step,
with ``block_until_ready``.  The data is the embedded corpus's first batch,
reused, so input handling is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from benchmarks import harness
from flax_minrnn.training import config as config_lib
from flax_minrnn.training import train as train_lib

MIXINGS = ("mingru", "minlstm", "glrnn", "rglru")
IMPLS = ("sequential", "chunked", "native", "associative")
# The time mixings whose gates flax_minrnn.backends.native implements
# (native.GATE_KINDS); for the others scan_impl="native" runs chunked.
NATIVE_MIXINGS = ("mingru", "minlstm")
CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "shakespeare.py")


def impls_of(mixing: str) -> Tuple[str, ...]:
    """The scan implementations timed for ``mixing``."""
    return tuple(i for i in IMPLS if i != "native" or mixing in NATIVE_MIXINGS)


def step_time(mixing: str, impl: str, steps: int, overrides: Sequence[str] = ()
              ) -> Dict[str, Any]:
    config = config_lib.load_config(CONFIG, [f"model.time_mixing={mixing}",
                                             f"model.scan_impl={impl}", *overrides])
    dataset = train_lib.build_dataset(config)
    model = train_lib.build_model(config, dataset.vocab_size)
    params = train_lib.initial_params(config, model, np.zeros((1, config.data.seq_len),
                                                              np.int32))
    tx = train_lib.make_optimizer(config, params)
    opt_state = tx.init(params)
    step_fn = train_lib.make_train_step(model, tx, jax.random.key(0))
    batch = dataset.train_batch(0)
    t0 = time.perf_counter()
    params, opt_state, _ = jax.block_until_ready(step_fn(params, opt_state, batch,
                                                         np.int32(0)))
    first = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        params, opt_state, _ = jax.block_until_ready(
            step_fn(params, opt_state, batch, np.int32(i + 1)))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = int(np.size(batch["inputs"]))
    n_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    return dict(time_mixing=mixing, impl=impl, params=n_params, tokens_per_step=tokens,
                first_step_s=first, median_step_ms=med * 1e3, min_step_ms=min(times) * 1e3,
                tokens_per_s=tokens / med, steps=steps)


def run(quick: bool = False, log=print) -> Dict[str, Any]:
    rows: List[Dict[str, Any]] = []
    overrides = ["data.batch_size=4", "data.seq_len=16", "model.d_model=16",
                 "model.n_layer=1"] if quick else []
    for mixing in MIXINGS:
        for impl in impls_of(mixing):
            r = step_time(mixing, impl, 3 if quick else 20, overrides)
            rows.append(r)
            log(f"{mixing:8s} {impl:12s} {r['median_step_ms']:8.2f} ms/step "
                f"{r['tokens_per_s']:10,.0f} tokens/s  (first step {r['first_step_s']:.1f} s, "
                f"{r['params']:,} params)")
    return dict(machine=harness.machine_info(), rows=rows,
                native_kernels=harness.native_kernels(),
                settings=dict(quick=quick, config="configs/shakespeare.py",
                              overrides=overrides))


def markdown(res: Dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"LM training step ({res['settings']['config']}), {m['cpu_model'] or m['processor']}"
             f" ({m['cpu_count']} CPUs), backend {m['backend']}, jax {m['jax_version']}, "
             f"malloc {m.get('malloc')}; {harness.run_stamp(m)}; "
             f"{harness.native_note(res.get('native_kernels'))}:", "",
             "| time mixing | params | " + " | ".join(f"{i} tokens/s" for i in IMPLS) + " |",
             "|---|---:|" + "---:|" * len(IMPLS)]
    by = {(r["time_mixing"], r["impl"]): r for r in res["rows"]}
    for mixing in MIXINGS:
        lines.append(f"| {mixing} | {by[(mixing, IMPLS[0])]['params']:,} | " + " | ".join(
            f"{by[(mixing, i)]['tokens_per_s']:,.0f}" if (mixing, i) in by else "–"
            for i in IMPLS) + " |")
    lines += ["", "–: not run (`native` has kernels for MinGRU's and MinLSTM's gates only)."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 3 steps (a harness check; default: off, the "
                        "configs/shakespeare.py model, 20 steps)")
    p.add_argument("--out", default=None,
                   help="write the JSON results to this file (default: print only)")
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    res = run(quick=args.quick)
    text = markdown(res)
    print()
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(dict(res, markdown=text), fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
