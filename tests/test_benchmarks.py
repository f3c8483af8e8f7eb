"""Smoke test of the benchmark harness on tiny sizes (T=16, D=8, one repeat).

Checks that every measurement runs, that the JSON / markdown / PNG are
written, and that the JSON has the expected keys with positive numbers.  It
does not check any speed.
"""

import dataclasses
import json
import math
import os
import sys
import types

import numpy as np
import pytest

# The benchmarks package lives at the repository root, next to tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_layers, bench_scan
from benchmarks.harness import Repeats

ONE = Repeats(max_n=1, min_n=1, budget_s=0.0)
TOL32 = dict(rtol=1e-5, atol=1e-5)  # float32 against float32, different op orders


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_layers_tiny(tmp_path):
    configs = bench_layers.make_configs(8)
    res = bench_layers.run([16], b=2, d=8, repeats_for=lambda t: ONE,
                           bandwidth_bytes=1 << 20, compile_t=16, compile_repeats=1,
                           bf16_t=16, configs=configs, log=lambda s: None)
    paths = bench_layers.write_outputs(res, str(tmp_path))
    with open(paths["json"]) as fh:
        data = json.load(fh)
    for key in ("machine", "settings", "bandwidth", "floors", "layers", "compile", "bf16",
                "total_wall_s"):
        assert key in data, key
    for key in ("processor", "cpu_count", "jax_version", "backend", "device_kind"):
        assert key in data["machine"], key
    assert _positive(data["bandwidth"]["bytes_per_s"])

    names = {c.name for c in configs}
    rows = data["layers"]
    assert {r["name"] for r in rows} == names
    assert len(rows) == len(configs) * 2  # fwd and fwdbwd
    for r in rows:
        assert "skipped" not in r
        for key in ("median_ms", "compile_s", "floor_ms", "ratio_vs_floor",
                    "speedup_vs_baseline", "memory_baseline_bytes"):
            assert _positive(r[key]), (r["name"], r["mode"], key, r.get(key))
        if r["mode"] == "fwdbwd":
            assert r["memory"] is not None
            assert r["memory"]["temp_size_in_bytes"] >= 0
            assert _positive(r["memory"]["peak_bytes"])
            assert _positive(r["peak_ratio"])
    assert {r["impl"] for r in rows if not r["peer"]} == {
        "associative", "sequential", "chunked", "auto", "native"}
    assert {r["name"] for r in rows if r["peer"]} == {
        *bench_layers.NAIVE_OF.values(), bench_layers.BASELINE, "nn.RNN(OptimizedLSTMCell)",
        "flax-gated-linear-rnn 1.0.3"}
    for r in rows:
        if not r["peer"]:
            assert _positive(r["speedup_vs_naive"]) and _positive(r["speedup_vs_own_naive"])
            own = next(o for o in rows if o["name"] == bench_layers.NAIVE_OF[r["family"]]
                       and o["T"] == r["T"] and o["mode"] == r["mode"])
            assert math.isclose(r["speedup_vs_own_naive"], own["median_ms"] / r["median_ms"])

    for f in data["floors"]:
        for key in ("matmul_ms", "bytes", "bytes_ms", "floor_ms"):
            assert _positive(f[key]), (f["family"], key)
    assert len(data["compile"]) == 3
    assert all(_positive(c["compile_s"]) for c in data["compile"])
    bf = data["bf16"]
    for tag in ("float32", "bfloat16"):
        for mode in ("fwd", "fwdbwd"):
            assert _positive(bf[tag][mode]["median_ms"])
    assert 0 <= bf["max_rel_diff"] < 2e-2
    with open(paths["md"]) as fh:
        md = fh.read()
    assert "| MinGRU[auto] |" in md
    # Whether the native rows ran the compiled kernels or fell back to chunked.
    from flax_minrnn.backends import native
    assert data["native_kernels"]["available"] is native.available()
    assert "compiled kernels: " in md
    with open(paths["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_scan_tiny(tmp_path):
    res = bench_scan.run([16, 32], b=2, d=8, repeats_for=lambda t: ONE,
                         impls=bench_scan.LINEAR_IMPLS, log=lambda s: None)
    paths = bench_scan.write_outputs(res, str(tmp_path))
    with open(paths["json"]) as fh:
        data = json.load(fh)
    assert len(data["rows"]) == 2 * 3 * 2
    assert all(_positive(r["median_ms"]) for r in data["rows"])
    for mode in ("fwd", "fwdbwd"):
        assert set(data["winners"][mode]["linear"]) == {"16", "32"}
        assert set(data["winners"][mode]["linear"].values()) <= set(bench_scan.LINEAR_IMPLS)


def _gpu_bench_settings(**kw):
    from benchmarks.gpu import bench
    base = dict(ts=(16,), impls=("auto", "sequential", "pallas"),
                corr_scan=(((2, 24, 8), True, "float32"), ((3, 7, 4), False, "bfloat16")),
                lm_cases=(("mingru", "bfloat16"),),
                paper_configs=(("selective_copying", bench.PAPER_CONFIGS[1][1]),))
    base.update(kw)
    return dataclasses.replace(bench.QUICK, **base)


def test_gpu_bench_quick_end_to_end(tmp_path):
    """benchmarks/gpu/bench.py at tiny sizes on the CPU: every section runs,
    writes its three files, and the correctness section compared real values
    (the Pallas kernel in Pallas's interpreter)."""
    from benchmarks.gpu import bench
    settings = _gpu_bench_settings()
    bench.Run(settings, str(tmp_path), budget_s=900, log=lambda s: None).run()
    files = sorted(os.listdir(tmp_path))
    assert files == ["results.json", "summary.md", "time_vs_T.png"]
    with open(tmp_path / "time_vs_T.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("meta", "plan", "sections", "machine", "bandwidth", "correctness", "scan",
                "layers", "torch", "lm", "paper", "derived", "total_wall_s"):
        assert key in data, key
    assert {"jax", "jaxlib", "flax"} <= set(data["machine"]["versions"])
    assert "nvidia_smi" in data["machine"]
    assert data["plan"]["impls"] == ["auto", "sequential", "pallas"]
    for name in ("setup", "correctness", "scan", "layers", "lm", "paper"):
        assert data["sections"][name]["counts"] == {
            "ok": data["sections"][name]["counts"].get("ok")}, (name, data["sections"][name])
        assert _positive(data["plan"]["sections"][name]["est_core_s"])
    assert _positive(data["bandwidth"]["jax"]["bytes_per_s_best"])

    # Correctness: every implementation but the reference, on linear_scan and
    # on each layer in both dtypes, compared element by element.
    cases = data["correctness"]["cases"]
    seen = {(c["kind"], c.get("layer"), c["impl"], c["dtype"]) for c in cases}
    for impl in ("auto", "pallas"):
        for dtype in ("float32", "bfloat16"):
            assert ("linear_scan", None, impl, dtype) in seen
            for layer in bench.LAYERS:
                assert ("layer", layer, impl, dtype) in seen
    assert not any(c["impl"] == "sequential" for c in cases)
    assert any(c["kind"] == "linear_scan" and c["reverse"] for c in cases)
    for c in cases:
        assert c["status"] == "ok", c
        assert c["n_compared"] > 0 and c["ref_max_abs"] > 0, c
        assert 0 <= c["worst_rel_err"] <= bench.TOL[c["dtype"]], c
        parts = c["parts"]
        if c["kind"] == "layer":  # outputs, carry and every gradient
            assert any(k.startswith("['dparams']") for k in parts)
            assert {"['y']", "['carry']", "['dx']", "['dcarry0']"} <= set(parts)
        else:
            assert set(parts) == {"['h']", "['h_last']", "['da']", "['db']", "['dh0']"}
        assert all(p["n"] > 0 and p["ref_max_abs"] > 0 for p in parts.values()), c
        if c["dtype"] == "bfloat16":
            assert c["state_dtype"] == "float32"

    for r in data["scan"]["rows"]:
        assert r["status"] == "ok"
        for mode in ("fwd", "fwdbwd"):
            assert _positive(r[mode]["median_ms"]) and _positive(r[mode]["fraction_of_copy"])
            assert r[mode]["n"] >= settings.min_calls
    rows = data["layers"]["rows"]
    assert {(r["layer"], r["dtype"]) for r in rows} >= {
        ("MinGRU", "float32"), ("MinGRU", "bfloat16"), (bench.GRUCELL, "float32"),
        ("MinLSTM", "float32"), ("GatedLinearRNN", "float32")}
    for r in rows:
        assert r["status"] == "ok", r
        assert _positive(r["median_ms"]) and _positive(r["floor_ms"]) and _positive(r["compile_s"])
    if data["torch"]["status"] == "skipped":
        assert "torch" in data["torch"]["reason"]
    per_t = data["derived"]["per_T"]
    assert [e["T"] for e in per_t] == [16]
    for e in per_t:
        assert _positive(e["GRUCell_over_MinGRU"]) and _positive(e["MinGRU_f32_over_bf16"])
        assert _positive(e["floor_ms_float32"]) and e["floor_ms_bfloat16"] < e["floor_ms_float32"]
    goals = data["derived"]["goals"]
    assert goals["correctness"]["ok"] == goals["correctness"]["total"] == len(cases)
    lm = data["lm"]["rows"]
    assert len(lm) == 1 and lm[0]["finite"] and _positive(lm[0]["tokens_per_s"])
    paper = data["paper"]["rows"]
    assert len(paper) == 1 and paper[0]["steps_done"] == 2 and _positive(paper[0]["est_full_run_s"])
    assert math.isfinite(paper[0]["loss_last10"])
    summary = (tmp_path / "summary.md").read_text()
    assert "Correctness vs sequential: %d/%d ok" % (len(cases), len(cases)) in summary


def test_gpu_bench_correctness_catches_a_wrong_implementation(tmp_path, monkeypatch):
    """A scan that is off by 1e-3 in one output is reported as a mismatch,
    its layer counterpart and the exact ones stay ok."""
    from benchmarks.gpu import bench
    real = bench.scan_fwd_bwd

    def broken(impl, reverse):
        f = real(impl, reverse)
        if impl != "chunked":
            return f
        return lambda *args: {**f(*args), "dh0": f(*args)["dh0"] + 1e-3}

    monkeypatch.setattr(bench, "scan_fwd_bwd", broken)
    monkeypatch.setattr(bench, "LAYERS", ("MinGRU",))
    settings = _gpu_bench_settings(impls=("auto", "sequential", "chunked"),
                                   corr_scan=(((2, 24, 8), False, "float32"),))
    run = bench.Run(settings, str(tmp_path), budget_s=300, log=lambda s: None,
                    sections=["correctness"])
    res = run.run()
    status = {(c["kind"], c["impl"], c["dtype"]): c for c in res["correctness"]["cases"]}
    bad = status[("linear_scan", "chunked", "float32")]
    assert bad["status"] == "mismatch" and bad["worst_part"] == "['dh0']"
    assert status[("linear_scan", "auto", "float32")]["status"] == "ok"
    assert status[("layer", "chunked", "float32")]["status"] == "ok"
    assert res["derived"]["goals"]["correctness"]["mismatch"]
    assert bench.main(["--summary", os.path.join(str(tmp_path), "results.json")]) == 0


def test_gpu_bench_compare_flags_every_kind_of_difference():
    from benchmarks.gpu import bench
    rng = np.random.default_rng(0)
    ref = {"h": rng.standard_normal((2, 5, 3)).astype(np.float32),
           "g": {"w": rng.standard_normal((3, 3)).astype(np.float32)}}
    same = bench.compare(ref, ref, 1e-4)
    assert same["status"] == "ok" and same["worst_rel_err"] == 0 and same["n_compared"] == 39
    scale = float(np.abs(ref["h"]).max())
    off = {"h": ref["h"] + np.float32(2e-3 * scale), "g": ref["g"]}
    r = bench.compare(off, ref, 1e-4)
    assert r["status"] == "mismatch" and r["worst_part"] == "['h']"
    assert abs(r["worst_rel_err"] - 2e-3) < 1e-5
    assert bench.compare(off, ref, 1e-2)["status"] == "ok"
    nan = {"h": np.where(np.arange(30).reshape(2, 5, 3) == 7, np.nan, ref["h"]).astype(np.float32),
           "g": ref["g"]}
    assert bench.compare(nan, ref, 1.0)["status"] == "mismatch"
    wrong_dtype = {"h": ref["h"].astype(np.float16), "g": ref["g"]}
    assert bench.compare(wrong_dtype, ref, 1.0)["status"] == "mismatch"
    missing = {"h": ref["h"]}
    assert bench.compare(missing, ref, 1.0)["status"] == "mismatch"


def test_gpu_bench_schedule_and_skips():
    """Unused time passes forward; a case that does not fit is recorded, not run."""
    from benchmarks.gpu import bench
    sched = bench.Schedule(100.0, start=0.0, caps=[("a", 10.0), ("b", 30.0), ("c", 10.0)])
    assert [round(sched.cap(n), 6) for n in "abc"] == [20.0, 60.0, 20.0]
    assert [round(sched.deadline(n), 6) for n in "abc"] == [20.0, 80.0, 100.0]
    sec = bench.Section("b", deadline=bench.now() + 5.0, log=lambda s: None)
    ran = []
    rec = sec.run({"impl": "x"}, 60.0, ran.append)
    assert not ran and rec["status"] == "skipped" and "budget" in rec["reason"]
    rec = sec.run({"impl": "y"}, 0.1, lambda r: r.update(value=1))
    assert rec["status"] == "ok" and rec["value"] == 1
    rec = sec.run({"impl": "z"}, 0.1, lambda r: 1 / 0)
    assert rec["status"] == "error" and "ZeroDivisionError" in rec["error"]
    assert sec.counts == {"skipped": 1, "ok": 1, "error": 1}


def test_bench_train_step_time_tiny():
    from benchmarks import bench_train
    r = bench_train.step_time("mingru", "sequential", 2, [
        "data.batch_size=2", "data.seq_len=8", "model.d_model=8", "model.n_layer=1"])
    assert r["tokens_per_step"] == 16 and _positive(r["tokens_per_s"])
    assert r["params"] > 0


def test_bench_generate_main_quick(tmp_path, capsys):
    from benchmarks import bench_generate
    out = tmp_path / "gen.json"
    bench_generate.main(["--quick", "--malloc", "default", "--out", str(out), "--recompute-steps", "2"])
    data = json.loads(out.read_text())
    assert data["rows"] and all(_positive(r["carry_tokens_per_s"]) for r in data["rows"])


@pytest.mark.parametrize("family", ["MinGRU", "MinLSTM", "GatedLinearRNN"])
def test_naive_baselines_compute_our_layers(family):
    """Each twenty-line baseline of bench_layers computes the layer it stands
    for: with our layer's parameters (random biases too) it gives our ``y``,
    forward and gradients, so the benchmarks compare like with like."""
    import jax
    import jax.numpy as jnp

    import flax_minrnn

    d, rng = 8, np.random.default_rng(1)
    ours = getattr(flax_minrnn, family)(d_h=d, **({"d_model": d}
                                                  if family == "GatedLinearRNN" else {}))
    naive = bench_layers.naive_layer(family, d)
    x = jnp.asarray(rng.standard_normal((2, 40, d)), jnp.float32)
    params = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape) / 2, v.dtype),
                          ours.init(jax.random.PRNGKey(0), x))
    layers = params["params"]
    mapped = {"params": {"Dense_0": layers["in_proj"],
                         **({"Dense_1": layers["out_proj"]} if "out_proj" in layers else {})}}
    assert set(layers) <= {"in_proj", "out_proj"}
    y = ours.apply(params, x)[1]
    np.testing.assert_allclose(naive.apply(mapped, x), y, **TOL32)
    ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    g_ours = jax.grad(lambda p, x: jnp.vdot(ours.apply(p, x)[1], ct), argnums=(0, 1))(params, x)
    g_naive = jax.grad(lambda p, x: jnp.vdot(naive.apply(p, x), ct), argnums=(0, 1))(mapped, x)
    np.testing.assert_allclose(g_naive[1], g_ours[1], **TOL32)
    for name, leaf in mapped["params"].items():
        ours_name = {"Dense_0": "in_proj", "Dense_1": "out_proj"}[name]
        for k in leaf:
            np.testing.assert_allclose(g_naive[0]["params"][name][k],
                                       g_ours[0]["params"][ours_name][k], **TOL32)


def test_bench_ab_products_are_the_layer_products():
    """The ``products`` reference of bench_ab computes ``x W``, ``g W^T`` and
    ``x^T g`` over the whole sequence (the forward in three 8-wide blocks, the
    backward in 4 tiles of 32 steps), checked in float64; ``dx`` takes the
    first block's buffer (no zero fill), so that block is not returned."""
    from benchmarks import bench_ab

    b, t, d, n = 2, 128, 8, 24
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32)
               for s in ((b, t, d), (d, n), (b, t, n)))
    pre, dx, dk = bench_ab.products_fwdbwd(b, t, d, n)(x, w, g)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    # dx is written over the first d-wide block of x W, as in the layers.
    assert len(pre) == n // d - 1
    np.testing.assert_allclose(np.concatenate(pre, axis=-1), (x64 @ w64)[..., d:],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, np.einsum("bti,bto->io", x64, g64), rtol=1e-5, atol=1e-4)


def test_bench_ab_report_gives_each_layer_its_own_naive_ratio():
    """bench_ab's table: ``naive/head`` against the naive minGRU in every row,
    ``own naive/head`` against the row's own naive version (the naive minGRU
    for MinGRU).  A ratio whose divisor was timed in the MinGRU rounds, not
    the row's own (the GRU's; the naive minGRU's in older results), is marked
    with a dagger."""
    from benchmarks import bench_ab

    def row(family, **ms):
        return dict(T=64, family=family, median_ms={"head[auto]": 10.0, "base[auto]": 20.0,
                                                    **ms})

    results = {"base": "abc", "B": 1, "D": 8, "rounds": 1, "transform": "grad",
               "machine": {"malloc": "default", "cpu_model": "cpu", "cpu_count": 2,
                           "jax_version": "0"},
               "rows": [row("MinGRU", naive=30.0, gru=80.0),
                        row("MinLSTM", own_naive=45.0),
                        row("GatedLinearRNN", naive=40.0, own_naive=50.0)]}
    results["rows"][1]["compile_s"] = {"head[auto]": 0.6, "base[auto]": 0.2, "own_naive": 0.3}
    lines = [l for l in bench_ab.report(results).splitlines() if l.startswith("| 64 |")]
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    header = [c.strip() for c in next(l for l in bench_ab.report(results).splitlines()
                                      if l.startswith("| T |")).strip("|").split("|")]
    col = {name: header.index(name) for name in ("naive/head", "own naive/head", "GRU/head")}
    main = [c for c in cells if len(c) == len(header)]
    assert [c[col["naive/head"]] for c in main] == ["3.00", "3.00†", "4.00"]
    assert [c[col["own naive/head"]] for c in main] == ["3.00", "4.50", "5.00"]
    assert [c[col["GRU/head"]] for c in main] == ["8.0", "8.0†", "8.0†"]
    # The compile table: only the row that recorded compile times.
    assert [c for c in cells if len(c) != len(header)] == [
        ["64", "MinLSTM", "0.60", "0.20", "3.00", "0.30"]]


def test_bench_faults_counts_first_touch_and_reports(tmp_path):
    from benchmarks import bench_faults

    # The counter sees the first touch of fresh pages, and not a second touch.
    n_bytes = 4 << 20
    block = bench_faults.fresh_block(n_bytes)
    a = np.frombuffer(block, np.uint8)
    f0 = bench_faults._minflt()
    a[::bench_faults.PAGE] = 1
    first = bench_faults._minflt() - f0
    f0 = bench_faults._minflt()
    a[::bench_faults.PAGE] = 2
    second = bench_faults._minflt() - f0
    del a
    block.close()
    assert first >= n_bytes // bench_faults.PAGE // 2, first
    assert second < first // 8, (first, second)
    assert _positive(bench_faults.fault_cost_us(n_bytes=4 << 20, rounds=2))

    res = bench_faults.run([16], calls=1, b=2, d=8, log=lambda s: None)
    assert [(r["layer"], r["T"]) for r in res["rows"]] == [
        (name, 16) for name in bench_faults.LAYERS]
    for r in res["rows"]:
        assert _positive(r["median_ms"]) and r["faults_per_call"] >= 0
        assert r["temp_bytes"] is None or r["temp_bytes"] >= 0
    text = bench_faults.report(res)
    assert text.count("\n| 16 |") == len(bench_faults.LAYERS)
    assert bench_faults.main(["--T", "16", "--calls", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "bench_faults.json") as fh:
        assert {r["layer"] for r in json.load(fh)["rows"]} == set(bench_faults.LAYERS)


def test_rounds_within_gives_each_entry_the_budget_of_time_calls():
    """As many interleaved rounds as time_calls would make calls of an entry
    of the mean duration: the budget's worth, clamped to [min_n, max_n]."""
    from benchmarks.harness import rounds_within

    rep = Repeats(max_n=20, min_n=5, budget_s=2.0)
    assert rounds_within(rep, [100.0] * 4) == 20
    assert rounds_within(rep, [50.0, 150.0]) == 20  # the mean call, 100 ms
    assert rounds_within(rep, [250.0]) == 8
    assert rounds_within(rep, [400.0]) == 5
    assert rounds_within(rep, [1000.0]) == 5  # min_n
    assert rounds_within(rep, [10.0]) == 20  # max_n
    assert rounds_within(rep, []) == 0


def test_bench_layers_interleaves_rows_and_reports_slow_ones_once(monkeypatch):
    """bench_layers times every row of a T in the same interleaved rounds,
    and a row whose warm-up call exceeds slow_limit_s reports that call
    alone (n = 0) and is left out of the rounds."""
    from benchmarks import harness

    seen = []
    real = harness.interleaved

    def spy(calls, rounds, **kw):
        seen.append((sorted(calls), rounds))
        return real(calls, rounds, **kw)

    monkeypatch.setattr(harness, "interleaved", spy)
    configs = [c for c in bench_layers.make_configs(8) if c.impl in ("auto", "sequential")
               and c.family == "MinGRU"]
    two = Repeats(max_n=2, min_n=2, budget_s=0.0)
    res = bench_layers.run([16], b=2, d=8, repeats_for=lambda t: two,
                           bandwidth_bytes=1 << 20, compile_t=16, compile_repeats=1,
                           bf16_t=16, configs=configs, log=lambda s: None)
    assert seen == [(sorted((c.name, m) for c in configs for m in bench_layers.MODES), 2)]
    assert all(r["n"] == 2 and not r["warmup_only"] and _positive(r["warmup_ms"])
               for r in res["layers"])
    seen.clear()
    res = bench_layers.run([16], b=2, d=8, repeats_for=lambda t: two,
                           bandwidth_bytes=1 << 20, compile_t=16, compile_repeats=1,
                           bf16_t=16, configs=configs, log=lambda s: None, slow_limit_s=0.0)
    assert seen == [([], 0)]
    for r in res["layers"]:
        assert r["n"] == 0 and r["warmup_only"] and r["median_ms"] == r["warmup_ms"]
        assert "reported that single call" in r["note"]


def test_interleaved_balances_the_order_and_times_each_call():
    """After one untimed round, over twice as many rounds as entries, every
    entry runs twice in every position and right after every other as often
    as right before it; each timing is its own call's (a fake clock that each
    call advances by that entry's duration)."""
    from benchmarks.harness import interleaved

    now, order = [0.0], []

    def call(name, seconds):
        def fn():
            order.append(name)
            now[0] += seconds
            return np.zeros(())
        return fn

    durations = {"a": 0.001, "b": 0.002, "c": 0.004, "d": 0.008}
    n = len(durations)
    calls = {k: (call(k, s), ()) for k, s in durations.items()}
    times = interleaved(calls, rounds=2 * n, clock=lambda: now[0], warmup_rounds=1)
    assert sorted(order[:n]) == sorted(durations)  # the untimed round runs each once
    rounds = [order[i:i + n] for i in range(n, len(order), n)]
    assert len(rounds) == 2 * n and all(sorted(r) == sorted(durations) for r in rounds)
    for position in range(n):
        assert sorted(r[position] for r in rounds) == sorted(2 * list(durations))
    follows = {}
    for r in rounds:
        for first, second in zip(r, r[1:]):
            follows[first, second] = follows.get((first, second), 0) + 1
    for (first, second), count in follows.items():
        assert follows.get((second, first)) == count, (first, second, follows)
    for k, s in durations.items():
        np.testing.assert_allclose(times[k], [s * 1e3] * 2 * n)


def test_machine_info_records_time_and_commit(monkeypatch, tmp_path):
    """machine_info: the UTC time (ISO 8601) and the repository's commit and
    dirty flag; without git, or outside a checkout, the two are None and
    nothing fails."""
    import datetime
    import subprocess

    from benchmarks import harness

    info = harness.machine_info()
    when = datetime.datetime.fromisoformat(info["utc_time"])
    assert when.utcoffset() == datetime.timedelta(0)
    head = subprocess.run(["git", "-C", str(harness.REPO), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert info["git_commit"] == head.stdout.strip()
        assert isinstance(info["git_dirty"], bool)
    assert harness.git_state(tmp_path) == dict(git_commit=None, git_dirty=None)

    def no_git(*args, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert harness.git_state() == dict(git_commit=None, git_dirty=None)
    assert harness.machine_info()["git_commit"] is None


def test_write_json_creates_the_folder(tmp_path):
    from benchmarks import harness

    path = tmp_path / "a" / "b" / "out.json"
    harness.write_json(str(path), {"x": np.float32(1.5)})
    assert json.loads(path.read_text()) == {"x": 1.5}


def test_run_all_writes_nothing_without_out(monkeypatch):
    """run_all passes --out on only when given one (the default prints only)."""
    from benchmarks import bench_generate, bench_train, run_all

    seen = {}
    for module in (bench_scan, bench_layers, bench_train, bench_generate):
        name = module.__name__.rsplit(".", 1)[1]
        monkeypatch.setattr(module, "main", lambda argv, name=name: seen.setdefault(name, argv))
    assert run_all.main(["--quick"]) == 0
    assert all("--out" not in argv and "--quick" in argv for argv in seen.values()), seen
    seen.clear()
    assert run_all.main(["--out", "/tmp/x"]) == 0
    outs = {k: v[v.index("--out") + 1] for k, v in seen.items()}
    assert outs == {"bench_scan": "/tmp/x", "bench_layers": "/tmp/x",
                    "bench_train": os.path.join("/tmp/x", "bench_train.json"),
                    "bench_generate": os.path.join("/tmp/x", "bench_generate.json")}


@pytest.mark.parametrize("module_name", ["bench_layers", "bench_scan", "bench_parallel",
                                         "bench_true_recurrence", "run_all"])
def test_out_defaults_to_print_only(module_name, monkeypatch, capsys):
    """No script writes into the repository unless --out says where."""
    import importlib

    module = importlib.import_module(f"benchmarks.{module_name}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: print only" in text, text


def test_bench_layers_sections_follow_the_lengths(monkeypatch):
    """compile time and bf16 run at the largest T asked for (at most 4096);
    the full run keeps 4096 and the 512 MiB bandwidth test, --quick uses less."""
    seen = []

    def fake_run(ts, **kw):
        seen.append((tuple(ts), kw))
        raise SystemExit(0)

    monkeypatch.setattr(bench_layers, "run", fake_run)
    for argv in ([], ["--quick"], ["--quick", "--T", "64"], ["--T", "32", "8192"]):
        with pytest.raises(SystemExit):
            bench_layers.main(argv)
    (full_ts, full), (quick_ts, quick), (tiny_ts, tiny), (long_ts, long) = seen
    assert full_ts == bench_layers.FULL_TS and full["compile_t"] == full["bf16_t"] == 4096
    assert full["bandwidth_bytes"] == 512 * 2**20 and full["compile_repeats"] == 3
    assert quick_ts == bench_layers.QUICK_TS and quick["compile_t"] == quick["bf16_t"] == 1024
    assert quick["bandwidth_bytes"] < full["bandwidth_bytes"]
    assert tiny_ts == (64,) and tiny["compile_t"] == tiny["bf16_t"] == 64
    assert long["compile_t"] == long["bf16_t"] == 4096


def test_bench_train_runs_native_only_where_it_has_kernels(monkeypatch):
    from benchmarks import bench_train

    calls = []

    def fake(mixing, impl, steps, overrides=()):
        calls.append((mixing, impl))
        return dict(time_mixing=mixing, impl=impl, params=1, tokens_per_step=1,
                    first_step_s=0.0, median_step_ms=1.0, min_step_ms=1.0,
                    tokens_per_s=1000.0, steps=steps)

    monkeypatch.setattr(bench_train, "step_time", fake)
    res = bench_train.run(quick=True, log=lambda s: None)
    assert {m for m, i in calls if i == "native"} == {"mingru", "minlstm"}
    assert {m for m, i in calls if i == "chunked"} == set(bench_train.MIXINGS)
    table = bench_train.markdown(res)
    assert "| glrnn | 1 | 1,000 | 1,000 | – | 1,000 |" in table


def test_bench_ab_bad_base_is_a_one_line_error(capsys):
    from benchmarks import bench_ab

    assert bench_ab.main(["--base", "no-such-ref-xyz", "--T", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--base no-such-ref-xyz" in err and "fatal" in err
    with pytest.raises(bench_ab.BaseRefError):
        bench_ab.resolve_commit("-x")


def test_bench_ab_removes_its_temporary_folder(monkeypatch, tmp_path):
    """The exported base lives in a temporary folder that goes on success and
    on failure."""
    import tempfile

    from benchmarks import bench_ab

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = []

    def failing_export(commit, dest):
        made.append(dest)
        assert dest.is_dir()
        raise RuntimeError("boom")

    monkeypatch.setattr(bench_ab, "export_base", failing_export)
    with pytest.raises(RuntimeError, match="boom"):
        bench_ab.run("HEAD", [16], 1)
    assert made and not made[0].exists() and not os.listdir(tmp_path)
    assert str(made[0]) not in sys.path

    def fake_export(commit, dest):
        made.append(dest)
        return "json"  # any importable module stands in for the base package

    monkeypatch.setattr(bench_ab, "export_base", fake_export)
    monkeypatch.setattr(bench_ab, "_run", lambda base, ref, commit, *a: dict(
        base=ref, base_commit=commit))
    res = bench_ab.run("HEAD", [16], 1)
    assert res["base"] == "HEAD" and len(res["base_commit"]) >= 40
    assert not made[1].exists() and not os.listdir(tmp_path)


def test_bench_buckets_needs_two_lengths(capsys):
    from benchmarks import bench_buckets

    with pytest.raises(SystemExit) as e:
        bench_buckets.main(["--n", "1"])
    assert e.value.code == 2
    assert "at least 2" in capsys.readouterr().err


def test_bench_export_times_both_exports_of_every_layer(tmp_path, monkeypatch):
    from benchmarks import bench_export
    monkeypatch.setattr(bench_export, "B", 2)
    monkeypatch.setattr(bench_export, "D", 8)
    bench_export.main(["--T", "3", "--rounds", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_export.json").read_text())
    assert [(r["layer"], r["what"]) for r in data["rows"]] == [
        (name, what) for name in bench_export.LAYERS for what in ("forward", "fwd+bwd")]
    for r in data["rows"]:
        assert r["T"] == 3 and _positive(r["fixed_ms"]) and _positive(r["symbolic_ms"])
        assert r["symbolic_over_fixed"] == pytest.approx(r["symbolic_ms"] / r["fixed_ms"])
    assert "utc_time" in data["machine"]


def _n_dots(fn, *args):
    import re
    import jax
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if re.search(r"\bdot\(", line))


@pytest.mark.parametrize("name", ["GatedLinearRNN[auto]", "GatedLinearRNN[sequential]",
                                  "naive GatedLinearRNN (Dense + lax.scan)",
                                  "flax-gated-linear-rnn 1.0.3", "MinGRU[auto]",
                                  "naive minGRU (Dense + lax.scan)"])
def test_fwdbwd_keeps_the_output_projection_product(name):
    """The timed forward+backward returns the loss with the gradients, so its
    compiled HLO keeps the output projection's forward product ``z W``,
    which the gradients alone do not need (XLA drops it from ``jax.grad``):
    one matrix product more than the gradients alone for the layers with an
    output projection, the same for the others.  bench_ab's ``fwdbwd`` and
    the GPU bench's ``layer_grad`` likewise."""
    import jax
    import jax.numpy as jnp
    from benchmarks import bench_ab
    from benchmarks.gpu import bench as gpu_bench

    b, t, d = 2, 128, 8
    cfg = next(c for c in bench_layers.make_configs(d) if c.name == name)
    model = cfg.build()
    x = bench_layers.make_input(b, t, d)
    params = bench_layers.init_params(model, x)
    apply = lambda p, v: cfg.outputs(model.apply(p, v))
    grads_only = jax.grad(lambda p, v: jnp.sum(apply(p, v)), argnums=(0, 1))
    extra = 1 if cfg.family in ("GatedLinearRNN", "flax-gated-linear-rnn") else 0
    n_grad = _n_dots(grads_only, params, x)

    fwdbwd = bench_layers.make_fns(model, cfg.outputs)["fwdbwd"]
    assert _n_dots(fwdbwd, params, x) == n_grad + extra
    loss, (d_params, d_x) = jax.jit(fwdbwd)(params, x)
    np.testing.assert_allclose(loss, np.sum(np.asarray(apply(params, x), np.float64)),
                               rtol=1e-4, atol=1e-4)
    assert d_x.shape == x.shape

    ab = bench_ab.fwdbwd(model, pair=cfg.outputs is bench_layers._y_of_pair)
    assert _n_dots(ab, params, x) == n_grad + extra
    np.testing.assert_allclose(ab(params, x)[0], loss, rtol=1e-6)

    g = bench_layers.make_input(b, t, d, seed=3)
    layer_grad = gpu_bench.layer_grad(apply)
    n_vjp = _n_dots(lambda p, v, c: jax.vjp(apply, p, v)[1](c), params, x, g)
    assert _n_dots(layer_grad, params, x, g) == n_vjp + extra
    np.testing.assert_allclose(jax.jit(layer_grad)(params, x, g)[0],
                               np.sum(np.asarray(apply(params, x), np.float64) * g),
                               rtol=1e-4, atol=1e-4)


def test_native_kernels_state_is_reported(monkeypatch):
    """harness.native_kernels records whether the compiled kernels loaded
    (and why not), and bench_train's report says so."""
    from benchmarks import bench_train, harness
    from flax_minrnn.backends import native

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler")
    status = harness.native_kernels()
    assert status == {"available": False, "reason": "no C++ compiler"}
    assert harness.native_kernels("no_such_package_here")["available"] is None
    # An earlier version's flat layout (flax_minrnn/native.py) is found too.
    flat = types.ModuleType("flat_pkg_for_test")
    flat.__path__ = []
    flat_native = types.ModuleType("flat_pkg_for_test.native")
    flat_native.available = lambda: True
    monkeypatch.setitem(sys.modules, "flat_pkg_for_test", flat)
    monkeypatch.setitem(sys.modules, "flat_pkg_for_test.native", flat_native)
    assert harness.native_kernels("flat_pkg_for_test") == {"available": True, "reason": None}
    res = {"machine": {"cpu_model": "cpu", "cpu_count": 2, "backend": "cpu",
                       "jax_version": "0", "malloc": "default"},
           "settings": {"config": "configs/shakespeare.py"},
           "rows": [dict(time_mixing=m, impl=bench_train.IMPLS[0], params=1, tokens_per_s=1.0)
                    for m in bench_train.MIXINGS],
           "native_kernels": status}
    assert "`native` rows ran `chunked` (no C++ compiler)" in bench_train.markdown(res)


def test_bench_generate_memory_sentence_follows_the_numbers():
    """The memory note is derived from the measured bytes: temp bytes that
    shrink are said to shrink (the committed run's case), not to grow."""
    from benchmarks import bench_generate

    mem = {"batch": 64, "by_new_tokens": {
        "256": {"temp_size_in_bytes": 2754832, "output_size_in_bytes": 65808},
        "4096": {"temp_size_in_bytes": 2704656, "output_size_in_bytes": 1048848}}}
    text = bench_generate.memory_sentence(mem)
    assert "temp bytes shrink (-50,176)" in text
    assert "output bytes grow (+983,040)" in text and "accounts for +983,040" in text


def test_bench_true_recurrence_passes_its_weights_as_arguments():
    """The loss weights ``w`` are an argument of the jitted function, not a
    (B, T, d) constant captured by its closure."""
    import re
    import jax.numpy as jnp
    from benchmarks import bench_true_recurrence
    from flax_minrnn import MinGRU

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 8)), jnp.float32)
    for mode in ("fwd", "fwdbwd"):
        fn, args = bench_true_recurrence._prepare(MinGRU(d_h=8), x, 2 * x, mode)
        assert len(args) == 3
        assert not re.search(r"constant.*tensor<2x16x8xf32>", fn.lower(*args).as_text())
