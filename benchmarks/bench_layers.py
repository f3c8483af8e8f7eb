"""One-layer speed / memory / compile-time benchmark of flax_minrnn vs peers.

Run::

    python -m benchmarks.bench_layers            # full run (T up to 16384), printed only
    python -m benchmarks.bench_layers --quick    # a harness check: T in {256, 1024}, see --help
    python -m benchmarks.bench_layers --out DIR  # also write .json, .md and .png into DIR
    python -m benchmarks.bench_layers --out benchmarks/results  # refresh the committed files

The compile-time and bfloat16 sections run at the largest T measured, at
most ``COMPILE_T_MAX`` = 4096 (4096 in the full run).

Setting (the issue's): one layer, batch B=8, d_in = d_h = D = 256, float32,
T in {256, 1024, 4096, 16384}.  Every layer is timed under ``jax.jit``:

* ``fwd``: ``y = layer(x)``;
* ``fwdbwd``: ``jax.value_and_grad(sum(y))`` with respect to the parameters
  AND ``x``: the loss and its gradients, as a training step computes them
  (returning the gradients alone would let XLA drop the products that only
  the loss's value needs, such as an output projection's forward product).

A timing is the median of repeated calls after a warm-up call, each ended by
``block_until_ready``; at each T every row is compiled and warmed up first,
then all rows are timed in interleaved rounds (``harness.interleaved``).  See
``benchmarks/README.md`` for every column and for the floor / byte / memory
models (also written out in :func:`floor_model` and
:func:`memory_baseline_bytes` below).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.harness import F32_BYTES, Repeats
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM

FULL_TS = (256, 1024, 4096, 16384)
QUICK_TS = (256, 1024)
COMPILE_T_MAX = 4096  # compile time and bf16 run at min(max(Ts), this)
BANDWIDTH_MIB = 512  # the bandwidth test's array (the full run's)
QUICK_BANDWIDTH_MIB = 64
MODES = ("fwd", "fwdbwd")
BASELINE = "nn.RNN(GRUCell)"  # the "speedup vs" column is relative to this config
NAIVE = "naive minGRU (Dense + lax.scan)"
# Each layer's own naive version (the MinGRU's is NAIVE itself).
NAIVE_OF = {"MinGRU": NAIVE, "MinLSTM": "naive minLSTM (Dense + lax.scan)",
            "GatedLinearRNN": "naive GatedLinearRNN (Dense + lax.scan)"}


# ----------------------------------------------------------------------------
# What is benchmarked.


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The shapes that define a layer's floor and memory baseline.

    ``matmuls``: the ``(K, N)`` of each matrix product applied to all
    ``M = B * T`` rows (``in_proj``, ``out_proj``; for the step-by-step peers
    the input and the recurrent kernels, counted as if batched over time -- a
    lower bound they cannot reach).  ``n_proj``: gate/candidate blocks of
    width ``d_h``; ``n_state``: state vectors of width ``d_h`` per step
    (LSTM: h and c).
    """

    matmuls: Tuple[Tuple[int, int], ...]
    n_proj: int
    n_state: int
    d_in: int
    d_h: int
    d_out: int


@dataclasses.dataclass(frozen=True)
class Config:
    name: str                 # row label
    family: str               # layer (floor is per family)
    impl: Optional[str]       # scan impl of ours; None for peers
    peer: bool
    build: Callable[[], nn.Module]
    spec: LayerSpec
    outputs: Callable[[Any], jax.Array]  # module output -> y


def _y_of_pair(out):
    return out[1]


def _y_of_array(out):
    return out


def resolved_auto(family: str, t: int) -> str:
    """What ``scan_impl="auto"`` runs at length ``t`` (never a backend)."""
    del family
    return scan_lib.default_impl(t).value


def _over_time(step, d_h: int, *xs):
    """``lax.scan`` of ``step(h, inputs_t) -> h`` over time from ``h = 0``;
    ``xs``: ``(batch, time, d_h)`` arrays.  Returns every ``h_t``."""

    def body(h, inputs):
        h = step(h, *inputs)
        return h, h

    h0 = jnp.zeros((xs[0].shape[0], d_h), xs[0].dtype)
    _, hs = jax.lax.scan(body, h0, tuple(jnp.swapaxes(v, 0, 1) for v in xs))
    return jnp.swapaxes(hs, 0, 1)


class NaiveMinGRU(nn.Module):
    """The minGRU a user would write in twenty lines: one fused ``Dense``, then
    ``lax.scan`` over time (the baseline of issue #17's speed goal).  It
    computes :class:`~flax_minrnn.MinGRU` (``d_h = d_in``) with ``Dense_0``
    for ``in_proj``."""

    d_h: int

    @nn.compact
    def __call__(self, x):
        k, h_tilde = jnp.split(nn.Dense(2 * self.d_h)(x), 2, axis=-1)
        z = jax.nn.sigmoid(k)
        return _over_time(lambda h, z_t, h_t: (1.0 - z_t) * h + z_t * h_t, self.d_h,
                          z, h_tilde)


class NaiveMinLSTM(nn.Module):
    """The minLSTM written the same way: :class:`~flax_minrnn.MinLSTM`
    (normalised gates, ``d_h = d_in``) with ``Dense_0`` for ``in_proj``."""

    d_h: int

    @nn.compact
    def __call__(self, x):
        f, i, h_tilde = jnp.split(nn.Dense(3 * self.d_h)(x), 3, axis=-1)
        f, i = jax.nn.sigmoid(f), jax.nn.sigmoid(i)
        f, i = f / (f + i), i / (f + i)
        return _over_time(lambda h, f_t, i_t, h_t: f_t * h + i_t * h_t, self.d_h,
                          f, i, h_tilde)


class NaiveGatedLinearRNN(nn.Module):
    """The gated linear RNN written the same way:
    :class:`~flax_minrnn.GatedLinearRNN` (tied gates, tanh activations) with
    ``Dense_0`` for ``in_proj`` and ``Dense_1`` for ``out_proj``."""

    d_h: int
    d_model: int

    @nn.compact
    def __call__(self, x):
        c, i, o = jnp.split(nn.Dense(3 * self.d_h)(x), 3, axis=-1)
        h = _over_time(lambda h, i_t, c_t: (1.0 - i_t) * h + i_t * c_t, self.d_h,
                       jax.nn.sigmoid(i), jnp.tanh(c))
        return nn.Dense(self.d_model)(jnp.tanh(h) * jax.nn.sigmoid(o))


def naive_layer(family: str, d: int) -> nn.Module:
    """The naive version of ``family`` (``NAIVE_OF``) at width ``d``
    (``d_in = d_h = d_model``)."""
    if family == "GatedLinearRNN":
        return NaiveGatedLinearRNN(d, d)
    return {"MinGRU": NaiveMinGRU, "MinLSTM": NaiveMinLSTM}[family](d)


def make_configs(d: int) -> List[Config]:
    """Our three layers for every implementation, ``auto`` and the opt-in
    CPU kernels (``native``), then the peers."""
    from flax_gated_linear_rnn import GatedLinearRNN as PeerGLRNN

    gru_spec = LayerSpec(((d, 2 * d),), 2, 1, d, d, d)
    lstm_spec = LayerSpec(((d, 3 * d),), 3, 1, d, d, d)
    glrnn_spec = LayerSpec(((d, 3 * d), (d, d)), 3, 1, d, d, d)
    configs: List[Config] = []
    for impl in ("associative", "sequential", "chunked", "auto", "native"):
        configs.append(Config(f"MinGRU[{impl}]", "MinGRU", impl, False,
                              lambda impl=impl: MinGRU(d_h=d, scan_impl=impl),
                              gru_spec, _y_of_pair))
    for impl in ("associative", "sequential", "chunked", "auto", "native"):
        configs.append(Config(f"MinLSTM[{impl}]", "MinLSTM", impl, False,
                              lambda impl=impl: MinLSTM(d_h=d, scan_impl=impl),
                              lstm_spec, _y_of_pair))
    for impl in ("associative", "sequential", "chunked", "auto"):
        configs.append(Config(f"GatedLinearRNN[{impl}]", "GatedLinearRNN", impl, False,
                              lambda impl=impl: GatedLinearRNN(d_h=d, d_model=d,
                                                               scan_impl=impl),
                              glrnn_spec, _y_of_pair))
    for family, spec in (("MinGRU", gru_spec), ("MinLSTM", lstm_spec),
                         ("GatedLinearRNN", glrnn_spec)):
        configs.append(Config(NAIVE_OF[family], family, None, True,
                              lambda family=family: naive_layer(family, d), spec, _y_of_array))
    configs.append(Config(BASELINE, "nn.GRUCell", None, True,
                          lambda: nn.RNN(nn.GRUCell(d)),
                          LayerSpec(((d, 3 * d), (d, 3 * d)), 3, 1, d, d, d), _y_of_array))
    configs.append(Config("nn.RNN(OptimizedLSTMCell)", "nn.OptimizedLSTMCell", None, True,
                          lambda: nn.RNN(nn.OptimizedLSTMCell(d)),
                          LayerSpec(((d, 4 * d), (d, 4 * d)), 4, 2, d, d, d), _y_of_array))
    configs.append(Config("flax-gated-linear-rnn 1.0.3", "flax-gated-linear-rnn", None, True,
                          lambda: PeerGLRNN(d_model=d, d_h=d),
                          glrnn_spec, _y_of_pair))
    return configs


def make_fns(model: nn.Module, outputs: Callable, out_dtype=None):
    """Fresh ``fwd(params, x)`` and ``fwdbwd(params, x)`` closures.

    ``fwdbwd`` returns ``(loss, (d params, d x))``: ``loss = sum(y)`` (summed
    in float32) and its gradients with respect to the parameters and the
    input.  The loss is returned so that the compiled function computes ``y``
    in full, as training does: with the gradients alone, XLA removes every
    forward product whose result only ``y`` needs (the output projection's
    ``z W``, whose gradients do not depend on it).
    """

    def fwd(params, x):
        return outputs(model.apply(params, x))

    def loss(params, x):
        return jnp.sum(outputs(model.apply(params, x)).astype(jnp.float32))

    grad = jax.value_and_grad(loss, argnums=(0, 1))

    def fwdbwd(params, x):
        return grad(params, x)

    return {"fwd": fwd, "fwdbwd": fwdbwd}


def make_input(b: int, t: int, d: int, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((b, t, d), dtype=np.float32))


def init_params(model: nn.Module, x: jax.Array):
    # Parameter shapes do not depend on T: initialise on a short prefix (an
    # un-jitted init over T = 16384 steps of a step-by-step peer is slow).
    return model.init(jax.random.PRNGKey(0), x[:, : min(4, x.shape[1])])


# ----------------------------------------------------------------------------
# Floor and memory models.


def floor_model(spec: LayerSpec, b: int, t: int, mode: str, bandwidth_bytes_per_s: float,
                repeats: Repeats, fresh_bytes_per_s: Optional[float] = None) -> Dict[str, Any]:
    """The machine floor of one layer: its matrix products alone + minimum bytes.

    Matrix products (each timed alone, jitted, M = B*T rows, float32):
      fwd:    x @ W                         for every (K, N) in spec.matmuls
      fwdbwd: x @ W  +  dW = x^T g  +  dx = g W^T   for every (K, N)

    Minimum bytes (float32, 4 bytes per element), moved at the measured
    bandwidth of a large jitted ``x + 1.0``:
      fwd:    B*T*(d_in + d_out) * 4
              (read x once, write y once)
      fwdbwd: B*T*(d_in + d_out + 2*(n_proj + n_state)*d_h) * 4
              (read x, write y, and the gates + states written once in the
              forward pass and read once in the backward pass)

    floor_ms = matmul_ms + bytes / bandwidth, where each matrix product's
    time is its fastest call and the bandwidth the in-place one (see
    ``harness.measure_bandwidth``).  ``bytes_ms_fresh`` gives the byte term at
    the fresh-output bandwidth, for reference.  Both terms are lower bounds
    measured on the same machine in the same run; the sum ignores any overlap
    of the two (so it is a floor, not a prediction).
    """
    m = b * t
    parts = {}
    for k, n in spec.matmuls:
        parts[f"{k}x{n}:fwd"] = harness.matmul_ms(m, k, n, "fwd", repeats)
        if mode == "fwdbwd":
            parts[f"{k}x{n}:dW"] = harness.matmul_ms(m, k, n, "dW", repeats)
            parts[f"{k}x{n}:dx"] = harness.matmul_ms(m, k, n, "dx", repeats)
    matmul_total = float(sum(parts.values()))
    elems = spec.d_in + spec.d_out
    if mode == "fwdbwd":
        elems += 2 * (spec.n_proj + spec.n_state) * spec.d_h
    n_bytes = b * t * elems * F32_BYTES
    bytes_ms = n_bytes / bandwidth_bytes_per_s * 1e3
    flops = sum(2 * m * k * n for k, n in spec.matmuls) * (3 if mode == "fwdbwd" else 1)
    out = dict(matmul_ms=matmul_total, matmul_parts_ms=parts, matmul_flops=flops,
               bytes=n_bytes, bytes_ms=bytes_ms, floor_ms=matmul_total + bytes_ms)
    if fresh_bytes_per_s:
        out["bytes_ms_fresh"] = n_bytes / fresh_bytes_per_s * 1e3
    return out


def memory_baseline_bytes(spec: LayerSpec, b: int, t: int) -> int:
    """Storing the layer's inputs, gates and states once (float32):

        B * T * (d_in + n_proj * d_h + n_state * d_h) * 4 bytes

    (n_state = 1 for every layer but the LSTM peer, whose c and h are both
    counted).
    """
    return b * t * (spec.d_in + spec.n_proj * spec.d_h + spec.n_state * spec.d_h) * F32_BYTES


# ----------------------------------------------------------------------------
# The run.


def default_repeats(t: int, quick: bool) -> Repeats:
    if quick:
        return Repeats(max_n=5, min_n=2, budget_s=0.5)
    if t <= 256:
        return Repeats(max_n=30, min_n=5, budget_s=1.5)
    if t <= 1024:
        return Repeats(max_n=20, min_n=5, budget_s=2.0)
    if t <= 4096:
        return Repeats(max_n=7, min_n=3, budget_s=1.5)
    return Repeats(max_n=3, min_n=3, budget_s=0.0)


def _log(msg: str) -> None:
    print(msg, flush=True)


def prepare_one(cfg: Config, model: nn.Module, params, x, mode: str,
                slow_limit_s: float) -> Tuple[Any, Dict[str, Any]]:
    """Compiles one row and runs its warm-up call.

    Returns ``(compiled, info)``: ``info`` holds the compile time, the memory
    analysis and the warm-up call's time; ``compiled`` is ``None`` when that
    call took more than ``slow_limit_s`` (the row then reports that single
    call and is not timed again).
    """
    fn = make_fns(model, cfg.outputs)[mode]
    compiled, compile_s = harness.compile_timed(fn, params, x)
    info = dict(compile_s=compile_s, memory=harness.memory_stats(compiled))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, x))
    warmup_ms = (time.perf_counter() - t0) * 1e3
    info["warmup_ms"] = warmup_ms
    if warmup_ms > slow_limit_s * 1e3:
        info.update(median_ms=warmup_ms, min_ms=warmup_ms, max_ms=warmup_ms, n=0,
                    warmup_only=True)
        return None, info
    info["warmup_only"] = False
    return compiled, info


def run(ts: Sequence[int] = FULL_TS, *, b: int = 8, d: int = 256, quick: bool = False,
        repeats_for: Optional[Callable[[int], Repeats]] = None,
        bandwidth_bytes: int = BANDWIDTH_MIB * 2**20, compile_t: Optional[int] = None,
        compile_repeats: int = 3, bf16_t: Optional[int] = None, slow_limit_s: float = 20.0,
        configs: Optional[List[Config]] = None, log: Callable[[str], None] = _log
        ) -> Dict[str, Any]:
    """Runs every measurement; returns the results dict (what goes to JSON).

    ``compile_t`` and ``bf16_t``, the T of the compile-time and bfloat16
    sections, default to :func:`section_t` of ``ts``."""
    t_start = time.perf_counter()
    compile_t = section_t(ts) if compile_t is None else compile_t
    bf16_t = section_t(ts) if bf16_t is None else bf16_t
    repeats_for = repeats_for or (lambda t: default_repeats(t, quick))
    configs = configs if configs is not None else make_configs(d)
    results: Dict[str, Any] = {
        "machine": harness.machine_info(),
        "settings": dict(B=b, D=d, d_in=d, d_h=d, dtype="float32", Ts=list(ts),
                         quick=quick, slow_limit_s=slow_limit_s, compile_T=compile_t,
                         bf16_T=bf16_t, baseline=BASELINE,
                         repeats={str(t): dataclasses.asdict(repeats_for(t)) for t in ts}),
        "notes": [],
    }

    log(f"# bench_layers  backend={jax.default_backend()}  "
        f"device={results['machine']['device_kind']}  cpus={os.cpu_count()}  "
        f"load={results['machine']['loadavg_at_start']}")

    bw = harness.measure_bandwidth(bandwidth_bytes, Repeats(max_n=10, min_n=3, budget_s=2.0))
    results["bandwidth"] = bw
    log(f"bandwidth (x + 1.0 over {bw['array_bytes'] / 2**20:.0f} MiB): in place "
        f"{bw['bytes_per_s'] / 1e9:.2f} GB/s, fresh output "
        f"{bw['fresh_bytes_per_s'] / 1e9:.2f} GB/s")

    # Floors, per family, T and mode.
    floors: List[Dict[str, Any]] = []
    families = {}
    for cfg in configs:
        families.setdefault(cfg.family, cfg.spec)
    for t in ts:
        for fam, spec in families.items():
            for mode in MODES:
                fl = floor_model(spec, b, t, mode, bw["bytes_per_s"],
                                 Repeats(max_n=10, min_n=3, budget_s=1.0),
                                 bw["fresh_bytes_per_s"])
                floors.append(dict(family=fam, T=t, mode=mode, **fl))
    results["floors"] = floors
    floor_of = {(f["family"], f["T"], f["mode"]): f["floor_ms"] for f in floors}

    # Layers: per T, every row is compiled and warmed up, then all are timed
    # in interleaved rounds (harness.interleaved), so that a slow spell of a
    # shared machine spreads over the rows instead of landing on one.
    rows: List[Dict[str, Any]] = []
    last_ok: Dict[Tuple[str, str], Tuple[int, float]] = {}
    spec_of = {cfg.name: cfg.spec for cfg in configs}
    for t in ts:
        x = make_input(b, t, d)
        rep = repeats_for(t)
        t_rows: List[Dict[str, Any]] = []
        calls: Dict[Tuple[str, str], Tuple[Callable, Sequence[Any]]] = {}
        for cfg in configs:
            model = cfg.build()
            params = init_params(model, x)
            resolved = (resolved_auto(cfg.family, t) if cfg.impl == "auto" else cfg.impl)
            for mode in MODES:
                row = dict(name=cfg.name, family=cfg.family, impl=cfg.impl,
                           resolved_impl=resolved, peer=cfg.peer, T=t, mode=mode)
                prev = last_ok.get((cfg.name, mode))
                if cfg.peer and prev is not None:
                    est_s = prev[1] / 1e3 * t / prev[0]
                    if est_s > slow_limit_s:
                        row["skipped"] = (f"estimated {est_s:.0f} s per call (linear in T "
                                          f"from T={prev[0]}) > {slow_limit_s:.0f} s")
                        rows.append(row)
                        log(f"T={t:6d} {mode:6s} {cfg.name:28s} SKIPPED: {row['skipped']}")
                        continue
                compiled, info = prepare_one(cfg, model, params, x, mode, slow_limit_s)
                row.update(info)
                if compiled is None:
                    row["note"] = (f"one call took {info['warmup_ms'] / 1e3:.1f} s > "
                                   f"{slow_limit_s:.0f} s: reported that single call")
                else:
                    calls[(cfg.name, mode)] = (compiled, (params, x))
                t_rows.append(row)
        n_rounds = harness.rounds_within(rep, [r["warmup_ms"] for r in t_rows
                                               if not r["warmup_only"]])
        times = harness.interleaved(calls, n_rounds, warmup_rounds=0)
        for row in t_rows:
            ms = times.get((row["name"], row["mode"]))
            if ms:
                row.update(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
                           n=len(ms))
            mem = row["memory"]
            base = memory_baseline_bytes(spec_of[row["name"]], b, t)
            row["memory_baseline_bytes"] = base
            if mem is not None:
                row["temp_ratio"] = mem["temp_size_in_bytes"] / base
                row["peak_ratio"] = mem["peak_bytes"] / base
            fl = floor_of[(row["family"], t, row["mode"])]
            row["floor_ms"] = fl
            row["ratio_vs_floor"] = row["median_ms"] / fl
            last_ok[(row["name"], row["mode"])] = (t, row["median_ms"])
            rows.append(row)
            log(f"T={t:6d} {row['mode']:6s} {row['name']:28s} "
                f"{harness.fmt_ms(row['median_ms']):>8s} ms  (n={row['n']}, compile "
                f"{row['compile_s']:.2f} s, {row['ratio_vs_floor']:.1f}x floor)")
        del calls, x
    # Speedup vs the baseline (same T and mode).
    base_ms = {(r["T"], r["mode"]): r["median_ms"] for r in rows
               if r["name"] == BASELINE and "median_ms" in r}
    naive_ms = {(r["name"], r["T"], r["mode"]): r["median_ms"] for r in rows
                if r["name"] in NAIVE_OF.values() and "median_ms" in r}
    for r in rows:
        if "median_ms" not in r:
            continue
        ref = base_ms.get((r["T"], r["mode"]))
        if ref is not None:
            r["speedup_vs_baseline"] = ref / r["median_ms"]
        ref = naive_ms.get((NAIVE, r["T"], r["mode"]))
        if ref is not None:
            r["speedup_vs_naive"] = ref / r["median_ms"]
        # Against the naive version of the same layer (our layers' rows only).
        ref = None if r["peer"] else naive_ms.get((NAIVE_OF.get(r["family"]), r["T"], r["mode"]))
        if ref is not None:
            r["speedup_vs_own_naive"] = ref / r["median_ms"]
    results["layers"] = rows

    results["compile"] = measure_compile(configs, b, d, compile_t, compile_repeats, log)
    results["bf16"] = measure_bf16(b, d, bf16_t, repeats_for(bf16_t), log)

    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        results["notes"].append(
            "skipped (too slow): " + "; ".join(f"{r['name']} {r['mode']} T={r['T']}: "
                                              f"{r['skipped']}" for r in skipped))
    try:
        results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    results["native_kernels"] = harness.native_kernels()
    results["total_wall_s"] = time.perf_counter() - t_start
    return results


def measure_compile(configs: Sequence[Config], b: int, d: int, t: int, n: int,
                    log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Wall time of ``jax.jit(fwdbwd).lower(params, x).compile()`` at T = t.

    Our layers with the default impl (``auto``); the median of ``n`` compiles,
    each of a fresh closure (no jit cache hit).  Nothing is run.
    """
    out = []
    x = make_input(b, t, d)
    for cfg in configs:
        if cfg.peer or cfg.impl != "auto":
            continue
        model = cfg.build()
        params = init_params(model, x)
        times = []
        for _ in range(max(1, n)):
            fn = make_fns(cfg.build(), cfg.outputs)["fwdbwd"]
            compiled, s = harness.compile_timed(fn, params, x)
            times.append(s)
            del compiled
        med = float(np.median(times))
        out.append(dict(name=cfg.name, family=cfg.family, T=t, mode="fwdbwd",
                        resolved_impl=scan_lib.default_impl(t).value,
                        compile_s=med, compile_s_all=times))
        log(f"compile fwdbwd T={t} {cfg.name:28s} {med:.2f} s (median of {len(times)})")
    return out


def measure_bf16(b: int, d: int, t: int, repeats: Repeats,
                 log: Callable[[str], None]) -> Dict[str, Any]:
    """MinGRU (default impl) with ``dtype=bfloat16`` (float32 state) vs float32.

    Same float32 parameters and input.  Differences are of the forward
    outputs: ``max_abs_diff = max |y_bf16 - y_f32|``, ``max_rel_diff =
    max |y_bf16 - y_f32| / max |y_f32|`` (norm-wise, so that outputs near zero
    do not blow it up) and ``mean_rel_diff = mean |diff| / mean |y_f32|``.
    """
    x = make_input(b, t, d)
    m32 = MinGRU(d_h=d)
    m16 = MinGRU(d_h=d, dtype=jnp.bfloat16)
    params = init_params(m32, x)
    out: Dict[str, Any] = dict(layer="MinGRU[auto]", T=t, B=b, D=d,
                               resolved_impl=scan_lib.default_impl(t).value)
    ys = {}
    for tag, model in (("float32", m32), ("bfloat16", m16)):
        fns = make_fns(model, _y_of_pair)
        rec = {}
        for mode in MODES:
            compiled, cs = harness.compile_timed(fns[mode], params, x)
            tm = harness.time_calls(compiled, (params, x), repeats)
            rec[mode] = dict(median_ms=tm["median_ms"], n=tm["n"], compile_s=cs)
            if mode == "fwd":
                ys[tag] = np.asarray(compiled(params, x).astype(jnp.float32))
        # The layer's three products alone in this dtype: whether the backend
        # gains from bfloat16 at all.
        rec["matmul_ms"] = {which: harness.matmul_ms(b * t, d, 2 * d, which, repeats,
                                                     jnp.dtype(tag))
                            for which in ("fwd", "dW", "dx")}
        out[tag] = rec
    diff = np.abs(ys["bfloat16"] - ys["float32"])
    ref = np.abs(ys["float32"])
    out["y_dtype_bf16"] = "bfloat16"
    out["max_abs_diff"] = float(diff.max())
    out["max_rel_diff"] = float(diff.max() / ref.max())
    out["mean_rel_diff"] = float(diff.mean() / ref.mean())
    for mode in MODES:
        out[f"speedup_{mode}"] = out["float32"][mode]["median_ms"] / out["bfloat16"][mode]["median_ms"]
    log(f"bf16 vs f32 MinGRU T={t}: fwd {out['float32']['fwd']['median_ms']:.1f} -> "
        f"{out['bfloat16']['fwd']['median_ms']:.1f} ms, fwdbwd "
        f"{out['float32']['fwdbwd']['median_ms']:.1f} -> "
        f"{out['bfloat16']['fwdbwd']['median_ms']:.1f} ms, max rel diff "
        f"{out['max_rel_diff']:.2e}")
    return out


# ----------------------------------------------------------------------------
# Reports.


def _row_lookup(rows):
    return {(r["name"], r["T"], r["mode"]): r for r in rows}


def headline(results: Dict[str, Any]) -> List[str]:
    """The issue's table: forward+backward of the default path (``auto``)
    against the naive minGRU (the issue's baseline for all three layers), the
    naive version of the same layer, the opt-in CPU kernels and
    ``nn.RNN(GRUCell)``."""
    by = _row_lookup(results["layers"])
    ts = results["settings"]["Ts"]
    lines = [f"## Headline: forward+backward, `auto` vs the naive minGRU "
             f"(malloc: {results['machine'].get('malloc')})", "",
             "| T | layer | auto ms | naive minGRU ms | naive / auto | own naive ms | "
             "own naive / auto | native ms | auto / native | GRU / auto |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in ts:
        naive = by.get((NAIVE, t, "fwdbwd"), {}).get("median_ms")
        for fam in ("MinGRU", "MinLSTM", "GatedLinearRNN"):
            auto = by.get((f"{fam}[auto]", t, "fwdbwd"), {})
            if "median_ms" not in auto:
                continue
            nat = by.get((f"{fam}[native]", t, "fwdbwd"), {}).get("median_ms")
            own = by.get((NAIVE_OF[fam], t, "fwdbwd"), {}).get("median_ms")
            ratio = lambda a, b: "–" if a is None or b is None else f"{a / b:.2f}×"
            lines.append(
                f"| {t} | {fam} | {harness.fmt_ms(auto['median_ms'])} | {harness.fmt_ms(naive)} | "
                f"{ratio(naive, auto['median_ms'])} | {harness.fmt_ms(own)} | "
                f"{ratio(own, auto['median_ms'])} | {harness.fmt_ms(nat)} | "
                f"{ratio(auto['median_ms'], nat)} | "
                f"{harness.fmt_ratio(auto.get('speedup_vs_baseline'))} |")
    return lines + [""]


def markdown_report(results: Dict[str, Any]) -> str:
    rows = results["layers"]
    ts = results["settings"]["Ts"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    by = _row_lookup(rows)
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# bench_layers results",
        "",
        f"Machine: {m['cpu_model'] or m['processor']} ({m['cpu_count']} CPUs), "
        f"backend {m['backend']} ({m['device_kind']}), jax {m['jax_version']}, "
        f"flax {m['flax_version']}; load average at start {m['loadavg_at_start']}, "
        f"at end {m.get('loadavg_at_end')}; {harness.run_stamp(m)}; "
        f"{harness.native_note(results.get('native_kernels'))}.",
        f"Setting: one layer, B={s['B']}, d_in=d_h={s['D']}, float32, "
        f"{'--quick' if s['quick'] else 'full'} run; total {results['total_wall_s']:.0f} s.",
        f"Measured bandwidth (jitted `x + 1.0` over "
        f"{results['bandwidth']['array_bytes'] / 2**20:.0f} MiB, read + write, fastest call): "
        f"{results['bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s in place (donated; used by the "
        f"floor), {results['bandwidth']['fresh_bytes_per_s'] / 1e9:.2f} GB/s into a fresh "
        f"output (first-touch page faults included).",
        "",
    ]
    lines += headline(results)
    for mode, title in (("fwd", "Forward"), ("fwdbwd", "Forward + backward (value_and_grad of sum(y) w.r.t. params and x)")):
        lines += [f"## {title}: median ms", ""]
        hdr = "| layer | " + " | ".join(f"T={t}" for t in ts) + " |"
        lines += [hdr, "|---|" + "---:|" * len(ts)]
        for name in names:
            cells = []
            for t in ts:
                r = by.get((name, t, mode))
                if r is None:
                    cells.append("–")
                elif "skipped" in r:
                    cells.append("skipped")
                else:
                    c = harness.fmt_ms(r["median_ms"])
                    cells.append(c + ("*" if r.get("warmup_only") else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        floor_line = {}
        for f in results["floors"]:
            if f["mode"] == mode:
                floor_line.setdefault(f["family"], {})[f["T"]] = f["floor_ms"]
        for fam, vals in floor_line.items():
            lines.append(f"| *floor {fam}* | " + " | ".join(
                harness.fmt_ms(vals.get(t)) for t in ts) + " |")
        lines += ["", f"## {title}: × floor / speedup vs {BASELINE}", ""]
        lines += [hdr, "|---|" + "---:|" * len(ts)]
        for name in names:
            cells = []
            for t in ts:
                r = by.get((name, t, mode))
                if r is None or "skipped" in r:
                    cells.append("–")
                else:
                    cells.append(f"{harness.fmt_ratio(r.get('ratio_vs_floor'))} / "
                                 f"{harness.fmt_ratio(r.get('speedup_vs_baseline'))}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Floor components (ms): matmuls alone + min bytes / bandwidth", "",
              "| family | mode | " + " | ".join(f"T={t} mm / bytes" for t in ts) + " |",
              "|---|---|" + "---:|" * len(ts)]
    fl = {(f["family"], f["mode"], f["T"]): f for f in results["floors"]}
    for fam in dict.fromkeys(f["family"] for f in results["floors"]):
        for mode in MODES:
            cells = []
            for t in ts:
                f = fl.get((fam, mode, t))
                cells.append("–" if f is None else
                             f"{harness.fmt_ms(f['matmul_ms'])} / {harness.fmt_ms(f['bytes_ms'])}")
            lines.append(f"| {fam} | {mode} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## Memory of forward+backward (XLA memory_analysis)", "",
              "MiB of temporaries / peak (args + outputs + temps - aliased); "
              "ratios to storing inputs, gates and states once, "
              "B*T*(d_in + n_proj*d_h + n_state*d_h)*4 bytes.", "",
              "| layer | " + " | ".join(f"T={t} temp / peak MiB (temp× / peak×)" for t in ts) + " |",
              "|---|" + "---:|" * len(ts)]
    for name in names:
        cells = []
        for t in ts:
            r = by.get((name, t, "fwdbwd"))
            if r is None or "skipped" in r or not r.get("memory"):
                cells.append("–")
            else:
                mm = r["memory"]
                cells.append(f"{mm['temp_size_in_bytes'] / 2**20:.0f} / {mm['peak_bytes'] / 2**20:.0f} "
                             f"({r['temp_ratio']:.1f}× / {r['peak_ratio']:.1f}×)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")

    if results.get("compile"):
        c0 = results["compile"][0]
        lines += [f"## JIT compile time of forward+backward, T={c0['T']} (default impl = {c0['resolved_impl']})", "",
                  "| layer | compile s |", "|---|---:|"]
        for c in results["compile"]:
            lines.append(f"| {c['name']} | {c['compile_s']:.2f} |")
        lines.append("")

    bf = results.get("bf16")
    if bf:
        lines += [f"## bf16 compute vs float32, {bf['layer']} T={bf['T']} (impl {bf['resolved_impl']})", "",
                  "| dtype | fwd ms | fwdbwd ms | its products alone: x W / xᵀ g / g Wᵀ ms (fastest) |",
                  "|---|---:|---:|---:|"]
        for tag in ("float32", "bfloat16"):
            mm = bf[tag].get("matmul_ms")
            mm_cell = ("–" if not mm else " / ".join(harness.fmt_ms(mm[w])
                                                     for w in ("fwd", "dW", "dx")))
            lines.append(f"| {tag} | {harness.fmt_ms(bf[tag]['fwd']['median_ms'])} | "
                         f"{harness.fmt_ms(bf[tag]['fwdbwd']['median_ms'])} | {mm_cell} |")
        lines += ["", f"Output difference: max |Δ| = {bf['max_abs_diff']:.3e}, "
                      f"max |Δ| / max |y| = {bf['max_rel_diff']:.3e}, "
                      f"mean |Δ| / mean |y| = {bf['mean_rel_diff']:.3e}.", ""]
    if any(r.get("warmup_only") for r in rows):
        lines += ["`*`: a single call (it took longer than the slow limit).", ""]
    for note in results.get("notes", []):
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["layers"]
    ts = results["settings"]["Ts"]
    fam_colors = {"MinGRU": "tab:blue", "MinLSTM": "tab:orange", "GatedLinearRNN": "tab:green",
                  "nn.GRUCell": "tab:red", "nn.OptimizedLSTMCell": "tab:purple",
                  "flax-gated-linear-rnn": "tab:brown"}
    impl_style = {"associative": ("-", "o"), "sequential": ("--", "s"), "chunked": ("-.", "^"),
                  "auto": (":", "x"), "native": ("-", "d"), None: ("-", "*")}
    fig, axes = plt.subplots(1, 2, figsize=(16, 6), sharey=False)
    for ax, mode, title in zip(axes, MODES, ("forward", "forward + backward")):
        for name in dict.fromkeys(r["name"] for r in rows):
            pts = [(r["T"], r["median_ms"]) for r in rows
                   if r["name"] == name and r["mode"] == mode and "median_ms" in r]
            if not pts:
                continue
            fam = next(r["family"] for r in rows if r["name"] == name)
            impl = next(r["impl"] for r in rows if r["name"] == name)
            ls, mk = impl_style.get(impl, ("-", "."))
            ax.plot(*zip(*pts), linestyle=ls, marker=mk, color=fam_colors.get(fam, "k"),
                    label=name, linewidth=2.2 if impl is None else 1.4)
        for fam in ("MinGRU", "MinLSTM", "GatedLinearRNN"):
            pts = [(f["T"], f["floor_ms"]) for f in results["floors"]
                   if f["family"] == fam and f["mode"] == mode]
            if pts:
                ax.plot(*zip(*sorted(pts)), color=fam_colors[fam], alpha=0.35,
                        linewidth=5, label=f"floor {fam}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ts)
        ax.set_xticklabels([str(t) for t in ts])
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median ms per call")
        ax.set_title(f"{title} (B={results['settings']['B']}, D={results['settings']['D']}, "
                     f"{results['machine']['backend']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: Dict[str, Any], out_dir: str, stem: str = "bench_layers") -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{stem}.{k}") for k in ("json", "md", "png")}
    harness.write_json(paths["json"], results)
    md = markdown_report(results)
    with open(paths["md"], "w") as fh:
        fh.write(md + "\n")
    plot(results, paths["png"])
    return paths


def section_t(ts: Sequence[int]) -> int:
    """The T of the compile-time and bfloat16 sections: the largest of ``ts``,
    at most :data:`COMPILE_T_MAX` (4096 for the full run's lengths)."""
    return min(max(ts), COMPILE_T_MAX)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a check of the harness, not a measurement: T in "
                        f"{{{', '.join(map(str, QUICK_TS))}}} unless --T, fewer repeats, one "
                        f"compile per row, bandwidth over {QUICK_BANDWIDTH_MIB} MiB "
                        "(default: off)")
    p.add_argument("--out", default=None,
                   help="write bench_layers.json, .md and .png into this folder (default: "
                        "print only; --out benchmarks/results refreshes the committed files)")
    p.add_argument("--T", type=harness.positive_int, nargs="+", default=None,
                   help="sequence lengths (default: "
                        f"{' '.join(map(str, FULL_TS))}; {' '.join(map(str, QUICK_TS))} "
                        "with --quick); compile time and bf16 run at the largest, at most "
                        f"{COMPILE_T_MAX}")
    p.add_argument("--slow-limit-s", type=float, default=20.0,
                   help="peers estimated (or observed) slower than this many seconds per "
                        "call are skipped (default: %(default)s)")
    p.add_argument("--bandwidth-mib", type=harness.positive_int, default=None,
                   help=f"array of the bandwidth test, MiB (default: {BANDWIDTH_MIB}; "
                        f"{QUICK_BANDWIDTH_MIB} with --quick)")
    harness.add_malloc_flag(p)
    args = p.parse_args(argv)
    harness.apply_malloc(args.malloc)
    ts = tuple(args.T) if args.T else (QUICK_TS if args.quick else FULL_TS)
    mib = args.bandwidth_mib or (QUICK_BANDWIDTH_MIB if args.quick else BANDWIDTH_MIB)
    results = run(ts, quick=args.quick, slow_limit_s=args.slow_limit_s,
                  bandwidth_bytes=mib * 2**20, compile_t=section_t(ts), bf16_t=section_t(ts),
                  compile_repeats=1 if args.quick else 3)
    print()
    print(markdown_report(results))
    if args.out:
        paths = write_outputs(results, args.out)
        print(f"\nwrote {', '.join(paths.values())}  ({results['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
