"""Decode throughput of :func:`flax_minrnn.models.generate.generate` vs recomputing the prefix.

Two ways to produce ``N`` new tokens from a small :class:`~flax_minrnn.models.lm.LM`:

* ``carry`` (ours): parallel prefill, then one ``(batch, 1)`` step on the
  carry per token: ``O(1)`` work per token, ``O(N)`` in total;
* ``recompute`` (the baseline a stateless model needs): every step runs the
  full forward over a fixed buffer of length ``L = P + N`` and samples at the
  current position: ``O(L)`` per token, ``O(N L)`` in total.  Beyond
  ``--max-recompute-len`` it is not run (said so in the table), and it is
  timed over at most ``--recompute-steps`` steps (its per-token cost does not
  depend on the step, so tokens/s over a few steps is its rate for the whole
  generation).

Also reported: XLA's ``memory_analysis()`` temp bytes of the compiled
``generate`` at two lengths (flat up to the ``(batch, N)`` output buffer).

Timings: median of repeated calls after a warm-up call, ``block_until_ready``.
Usage::

    python -m benchmarks.bench_generate --quick --out /tmp/gen.json
    python -m benchmarks.bench_generate                                # full size, printed only
    # full size, refreshing the committed file with the plain process (the
    # headline; the committed one was measured with --malloc tuned):
    python -m benchmarks.bench_generate --out benchmarks/results/bench_generate.json
    # tuned only beside it, into another file:
    python -m benchmarks.bench_generate --malloc tuned --out /tmp/bench_generate_tuned.json
"""

from __future__ import annotations

import argparse
import importlib
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp

from benchmarks import harness
from flax_minrnn.models.lm import LM, LMConfig

# The package exports the function ``generate`` under the module's name.
generate_lib = importlib.import_module("flax_minrnn.models.generate")
PROMPT_LEN = 8


def _model(d_model: int, vocab: int, n_layer: int):
    cfg = LMConfig(vocab_size=vocab, n_layer=n_layer, d_model=d_model)
    model = LM(cfg)
    params = jax.jit(model.init)(jax.random.key(0),
                                 jnp.zeros((1, PROMPT_LEN), jnp.int32))["params"]
    return model, params


def _carry_fn(model, params, batch: int, n: int):
    prompt = jax.random.randint(jax.random.key(1), (batch, PROMPT_LEN), 0,
                                model.config.vocab_size, jnp.int32)

    def run(seed):
        return generate_lib.generate(model, params, prompt, n, rng=jax.random.key(seed),
                                     temperature=1.0).tokens

    return run


def _recompute_fn(model, params, batch: int, length: int, steps: int):
    """``steps`` decode steps, each a full forward over a ``(batch, length)`` buffer.

    The parameters are an argument of the jitted function (as they are of
    ``generate`` on the carry path), not constants folded into it."""
    vocab = model.config.vocab_size

    @jax.jit
    def run_with(params, key):
        buf = jax.random.randint(key, (batch, length), 0, vocab, jnp.int32)

        def step(i, buf):
            _, logits = model.apply({"params": params}, buf)
            pos = PROMPT_LEN - 1 + i
            tok = jax.random.categorical(jax.random.fold_in(key, i),
                                         jax.lax.dynamic_index_in_dim(logits, pos, 1, False))
            return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(jnp.int32), pos + 1, 1)

        return jax.lax.fori_loop(0, steps, step, buf)

    return lambda key: run_with(params, key)


def _memory(model, params, batch: int, n: int):
    prompt = jnp.zeros((batch, PROMPT_LEN), jnp.int32)
    sampling = generate_lib._Sampling(  # pylint: disable=protected-access
        jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0), jnp.int32(-1), jnp.int32(0))
    flags = generate_lib._Flags(False, False, False, False)  # pylint: disable=protected-access
    compiled = generate_lib._generate.lower(  # pylint: disable=protected-access
        model, {"params": params}, prompt, jnp.full((batch,), PROMPT_LEN, jnp.int32),
        jax.random.key(0), sampling, max_new_tokens=n, flags=flags).compile()
    return harness.memory_stats(compiled)


def run(batches: List[int], lengths: List[int], *, d_model: int, vocab: int, n_layer: int,
        max_recompute_len: int, recompute_steps: int, repeats: harness.Repeats,
        log=print) -> Dict[str, Any]:
    model, params = _model(d_model, vocab, n_layer)
    rows = []
    for batch in batches:
        for n in lengths:
            carry = harness.time_calls(_carry_fn(model, params, batch, n), [0], repeats)
            ours = batch * n / (carry["median_ms"] / 1e3)
            row = dict(batch=batch, new_tokens=n, carry_ms=carry["median_ms"],
                       carry_tokens_per_s=ours, recompute_ms=None,
                       recompute_tokens_per_s=None, recompute_steps=None, note="")
            length = PROMPT_LEN + n
            if length > max_recompute_len:
                row["note"] = (f"recompute not run: buffer {length} > --max-recompute-len "
                               f"{max_recompute_len} (too slow on this machine)")
            else:
                steps = min(n - 1, recompute_steps)
                base = harness.time_calls(
                    _recompute_fn(model, params, batch, length, steps),
                    [jax.random.key(0)], repeats)
                row.update(recompute_ms=base["median_ms"], recompute_steps=steps,
                           recompute_tokens_per_s=batch * steps / (base["median_ms"] / 1e3),
                           note=f"recompute timed over {steps} steps at context {length}")
            rows.append(row)
            log(f"batch {batch:3d} N {n:5d}: carry {ours:10.0f} tok/s  "
                f"recompute {row['recompute_tokens_per_s'] or float('nan'):10.0f} tok/s")
    memory = {str(n): _memory(model, params, batches[-1], n) for n in (lengths[0], lengths[-1])}
    return dict(settings=dict(batches=batches, lengths=lengths, d_model=d_model, vocab=vocab,
                              n_layer=n_layer, prompt_len=PROMPT_LEN,
                              max_recompute_len=max_recompute_len,
                              recompute_steps=recompute_steps,
                              repeats=dict(max_n=repeats.max_n, min_n=repeats.min_n,
                                           budget_s=repeats.budget_s)),
                machine=harness.machine_info(), rows=rows,
                memory=dict(batch=batches[-1], by_new_tokens=memory))


def markdown(res: Dict[str, Any]) -> str:
    fmt = lambda x: "—" if x is None else f"{x:,.0f}"
    lines = [f"{harness.machine_line(res['machine'])}.", "",
             "| batch | new tokens | carry tok/s | recompute tok/s | speed-up | note |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        ratio = (None if r["recompute_tokens_per_s"] is None
                 else r["carry_tokens_per_s"] / r["recompute_tokens_per_s"])
        lines.append(f"| {r['batch']} | {r['new_tokens']} | {fmt(r['carry_tokens_per_s'])} | "
                     f"{fmt(r['recompute_tokens_per_s'])} | "
                     f"{'—' if ratio is None else f'{ratio:.1f}x'} | {r['note']} |")
    mem = res["memory"]
    lines += ["", f"Compiled `generate` memory (batch {mem['batch']}, XLA memory_analysis):", "",
              "| new tokens | temp bytes | output bytes |", "|---:|---:|---:|"]
    for n, m in mem["by_new_tokens"].items():
        if m is None:
            lines.append(f"| {n} | n/a | n/a |")
        else:
            lines.append(f"| {n} | {m['temp_size_in_bytes']:,} | {m['output_size_in_bytes']:,} |")
    lines += ["", memory_sentence(mem)]
    return "\n".join(lines)


def memory_sentence(mem: Dict[str, Any]) -> str:
    """What the measured temp and output bytes do from the shortest to the
    longest length (derived from the numbers, not assumed)."""
    known = {int(n): v for n, v in mem["by_new_tokens"].items() if v is not None}
    if len(known) < 2:
        return "Memory: fewer than two lengths measured, no comparison."
    lo, hi = min(known), max(known)
    d_temp = known[hi]["temp_size_in_bytes"] - known[lo]["temp_size_in_bytes"]
    d_out = known[hi]["output_size_in_bytes"] - known[lo]["output_size_in_bytes"]
    tokens = (hi - lo) * mem["batch"] * 4
    word = lambda d: "grow" if d > 0 else ("shrink" if d < 0 else "stay the same")
    return (f"From {lo} to {hi} new tokens, temp bytes {word(d_temp)} ({d_temp:+,}) and "
            f"output bytes {word(d_out)} ({d_out:+,}); the (batch, new tokens) int32 token "
            f"output alone accounts for {tokens:+,}.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny run (d_model 32, batches 1/8, lengths 32/128; default: off, "
                        "d_model 128, batches 1/64, lengths 256/4096)")
    p.add_argument("--out", default=None,
                   help="write the JSON results to this file (default: print only)")
    p.add_argument("--max-recompute-len", type=int, default=4200,
                   help="longest buffer (prompt + new tokens) for which the recompute "
                        "baseline runs; longer ones are reported as not run "
                        "(default: %(default)s)")
    p.add_argument("--recompute-steps", type=harness.positive_int, default=16,
                   help="decode steps over which the recompute baseline is timed, at "
                        "least 1 (default: %(default)s)")
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    if args.quick:
        kw = dict(batches=[1, 8], lengths=[32, 128], d_model=32, vocab=64, n_layer=2,
                  repeats=harness.Repeats(max_n=3, min_n=1, budget_s=0.5))
    else:
        kw = dict(batches=[1, 64], lengths=[256, 4096], d_model=128, vocab=256, n_layer=2,
                  repeats=harness.Repeats(max_n=5, min_n=3, budget_s=3.0))
    t0 = time.perf_counter()
    res = run(max_recompute_len=args.max_recompute_len,
              recompute_steps=args.recompute_steps, **kw)
    res["total_wall_s"] = time.perf_counter() - t0
    print(markdown(res))
    if args.out:
        harness.write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
