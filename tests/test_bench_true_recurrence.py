"""Smoke test of benchmarks/bench_true_recurrence.py on tiny sizes.

Checks that every row runs and is reported, and that the benchmark's
lax.scan row computes the same function as the layer it stands in for.  It
does not check any speed.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_true_recurrence as bench  # noqa: E402
from flax_minrnn.nn.recurrent import MinGRU  # noqa: E402


def test_scan_row_is_the_layers_function():
    d = 6
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, d)), jnp.float32)
    ref = bench.ScanTrueMinGRU(d)
    params = ref.init(jax.random.PRNGKey(0), x)["params"]
    params = dict(params, recurrent_kernel=jnp.asarray(
        np.random.default_rng(1).normal(size=(d, 2 * d)) * 0.3, jnp.float32))
    layer_params = {"in_proj": {"kernel": params["kernel"], "bias": params["bias"]},
                    "recurrent_kernel": params["recurrent_kernel"]}
    want = ref.apply({"params": params}, x)
    got = MinGRU(d_h=d, use_true_recurrence=True).apply({"params": layer_params}, x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_tiny_run_reports_every_row(tmp_path):
    res = bench.run([(2, 16, 8)], rounds=1, log=lambda s: None)
    names = set(bench.make_rows(8))
    assert {r["name"] for r in res["rows"]} == names
    assert len(res["rows"]) == 2 * len(names)
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["vs_gru"] > 0
    md = bench.markdown(res)
    assert "MinGRU true" in md and "Sequential" in md


def test_stage1_row_is_named_for_what_it_runs():
    """The stage-1 row is MinGRU's default path (scan_impl "auto"), named so."""
    rows = bench.make_rows(8)
    assert bench.STAGE1 in rows and "MinGRU associative" not in rows
    assert rows[bench.STAGE1]().scan_impl == "auto"


def test_rounds_below_one_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        bench.main(["--rounds", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err
