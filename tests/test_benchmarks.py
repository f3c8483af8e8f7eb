"""Smoke test of the benchmark harness on tiny sizes (T=16, D=8, one repeat).

Checks that every measurement runs, that the JSON / markdown / PNG are
written, and that the JSON has the expected keys with positive numbers.  It
does not check any speed.
"""

import json
import math
import os
import sys

import pytest

# The benchmarks package lives at the repository root, next to tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_layers, bench_scan
from benchmarks.harness import Repeats

ONE = Repeats(max_n=1, min_n=1, budget_s=0.0)


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
    assert any(r["impl"] == "log" for r in rows)
    assert {r["name"] for r in rows if r["peer"]} == {
        bench_layers.BASELINE, "nn.RNN(OptimizedLSTMCell)", "flax-gated-linear-rnn 1.0.3"}

    for f in data["floors"]:
        for key in ("matmul_ms", "bytes", "bytes_ms", "floor_ms"):
            assert _positive(f[key]), (f["family"], key)
    assert len(data["compile"]) == 3
    assert all(_positive(c["compile_s"]) for c in data["compile"])
    bf = data["bf16"]
    for tag in ("float32", "bfloat16"):
        for mode in ("fwd", "fwdbwd"):
            assert _positive(bf[tag][mode]["median_ms"])
    assert 0 <= bf["max_rel_diff"] < 0.1
    with open(paths["md"]) as fh:
        md = fh.read()
    assert "| MinGRU[auto] |" in md
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


def test_bench_gpu_quick_runs_on_cpu(tmp_path):
    """The GPU script's harness on tiny sizes (on a CPU; it measures nothing)."""
    from benchmarks import bench_gpu
    res = bench_gpu.run(quick=True, log=lambda s: None)
    assert {r["impl"] for r in res["scan"]} == set(bench_gpu.GPU_IMPLS)
    assert all(_positive(r["fwd_ms"]) for r in res["scan"])
    assert all(_positive(r["MinGRU[auto]"]) for r in res["layers"])
    assert "| MinGRU[auto] |" in bench_gpu.markdown(res) or "MinGRU[auto]" in bench_gpu.markdown(res)


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
