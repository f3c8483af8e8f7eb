"""scan_impl="native": the compiled CPU kernels (flax_minrnn/backends/csrc/gates.cc).

The kernels against the Python gate equations of flax_minrnn.nn.gates and the
float64 NumPy reference; outputs and gradients against the pure-JAX tile loop
(impl="chunked"); the fallbacks (masks, resets, float16, layers the kernels
do not know) run the chunked path bit for bit; the limits (second
derivatives, jax.export) raise errors that name scan_impl="chunked"; the
build's failure modes make "native" run "chunked".
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax import export

from flax_minrnn.backends import native as native
from flax_minrnn.nn import gates as gates_lib
from flax_minrnn.ops import gated as gated_lib
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.ops.linear import SecondOrderError
from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM, g_activation
from jit_helpers import jit_tangents
from reference import layer_forward

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"compiled kernels unavailable: {native.unavailable_reason()}")

# d_h = 160: the kernels split the features into two ranges (80 + 80), so
# both the threaded split and its boundary are exercised.  LAYERS holds every
# gate function and candidate the kernels implement (native.GATE_KINDS x
# native.CANDIDATES), once each at least.
B, T, D_IN, D_H = 2, 37, 5, 160

LAYERS = {
    "mingru": (lambda **kw: MinGRU(d_h=D_H, d_model=D_H, **kw), ("mingru", {})),
    "mingru_g": (lambda **kw: MinGRU(d_h=D_H, d_model=D_H, candidate_activation=g_activation,
                                     **kw), ("mingru", {"g": True})),
    "minlstm": (lambda **kw: MinLSTM(d_h=D_H, d_model=D_H, **kw), ("minlstm", {})),
    "minlstm_g": (lambda **kw: MinLSTM(d_h=D_H, d_model=D_H, candidate_activation=g_activation,
                                       **kw), ("minlstm", {"g": True})),
    "minlstm_unnorm": (lambda **kw: MinLSTM(d_h=D_H, d_model=D_H, normalize_gates=False, **kw),
                       ("minlstm", {"normalize": False})),
    "minlstm_unnorm_g": (lambda **kw: MinLSTM(d_h=D_H, d_model=D_H, normalize_gates=False,
                                              candidate_activation=g_activation, **kw),
                         ("minlstm", {"normalize": False, "g": True})),
    # out_proj (d_h != d_model): the readout runs after the kernel.
    "mingru_out_proj": (lambda **kw: MinGRU(d_h=D_H, d_model=4, **kw), ("mingru", {})),
}


def _x(seed=0, shape=(B, T, D_IN), scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _params(layer, x, seed=1, bias_scale=0.5):
    """Initialised params with a random (non-zero) bias."""
    params = layer.init(jax.random.PRNGKey(seed), x)
    proj = dict(params["params"]["in_proj"])
    if "bias" in proj:
        proj["bias"] = bias_scale * jax.random.normal(jax.random.PRNGKey(seed + 1),
                                                      proj["bias"].shape, jnp.float32)
    return {"params": dict(params["params"], in_proj=proj)}


def _h0(seed=7, batch=B):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, D_H), jnp.float32, 0.1, 1.0)


def _small_tiles(monkeypatch):
    """16-step tiles: T = 37 is two full tiles and a partial one."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 16)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 16)


def _runs_kernels(layer, params, *args, **kw) -> bool:
    """Whether the layer's forward pass calls the compiled forward kernel."""
    return "flax_minrnn_native_gates_forward" in str(jax.make_jaxpr(
        lambda p, *a: layer.apply(p, *a, **kw))(params, *args))


def _reference(kind, kw, params, x, h0, reverse):
    """float64 reference; a reverse scan is the forward one on flipped time."""
    if reverse:
        h, y = layer_forward(kind, params, np.asarray(x)[:, ::-1], h0, **kw)
        return h, y[:, ::-1]
    return layer_forward(kind, params, x, h0, **kw)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_matches_float64_reference(name, reverse):
    make, (kind, kw) = LAYERS[name]
    layer = make(scan_impl="native", reverse=reverse)
    x = _x()
    params = _params(layer, x)
    h0 = _h0()
    assert _runs_kernels(layer, params, x, h0)
    carry, y = jax.jit(layer.apply)(params, x, h0)
    ref_h, ref_y = _reference(kind, kw, params["params"], x, h0, reverse)
    np.testing.assert_allclose(carry, ref_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)


def _grads(layer, impl, params, x, h0, g_c, g_y):
    def loss(p, xx, hh):
        c, y = layer.clone(scan_impl=impl).apply(p, xx, hh)
        return jnp.sum(y * g_y) + jnp.sum(c * g_c), (c, y)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, h0)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_gradients_equal_chunked(name, reverse, monkeypatch):
    """Outputs, carry and gradients w.r.t. params (kernel and bias), x and
    h0, for random cotangents, through 16-step tiles with a partial one,
    equal the pure-JAX tile loop's (itself tested against the sequential
    loop and the float64 reference in test_layers.py and test_scan.py)."""
    _small_tiles(monkeypatch)
    layer = LAYERS[name][0](reverse=reverse)
    x = _x(3)
    params = _params(layer, x)
    h0 = _h0()
    rng = np.random.default_rng(3)
    g_c = jnp.asarray(rng.normal(size=(B, D_H)), jnp.float32)
    g_y = jnp.asarray(rng.normal(size=jax.eval_shape(layer.apply, params, x, h0)[1].shape),
                      jnp.float32)
    got = _grads(layer, "native", params, x, h0, g_c, g_y)
    want = _grads(layer, "chunked", params, x, h0, g_c, g_y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", list(LAYERS))
def test_saturated_logits_stay_exact_and_finite(name):
    """Pre-activations of +-hundreds (beyond the kernels' exp clamps and
    MinLSTM's logit clip): outputs match the float64 reference, gradients
    are finite and equal the chunked path's."""
    make, (kind, kw) = LAYERS[name]
    layer = make(scan_impl="native")
    x = _x(5, scale=60.0)
    params = _params(layer, x, bias_scale=30.0)
    h0 = _h0()
    carry, y = layer.apply(params, x, h0)
    ref_h, ref_y = _reference(kind, kw, params["params"], x, h0, False)
    scale = np.abs(ref_y).max()
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(carry, ref_h, rtol=1e-5, atol=1e-6 * scale)
    rng = np.random.default_rng(4)
    g_c = jnp.asarray(rng.normal(size=(B, D_H)), jnp.float32)
    g_y = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    got = _grads(layer, "native", params, x, h0, g_c, g_y)
    want = _grads(layer, "chunked", params, x, h0, g_c, g_y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_without_bias_and_with_small_width():
    """use_bias=False (the kernels add zeros) and d_h = 6 (one feature range)."""
    layer = MinGRU(d_h=6, d_model=6, use_bias=False, scan_impl="native")
    x = _x(6)
    params = layer.init(jax.random.PRNGKey(2), x)
    h0 = jnp.full((B, 6), 0.3, jnp.float32)
    carry, y = layer.apply(params, x, h0)
    ref_h, ref_y = layer_forward("mingru", params["params"], x, h0)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry, ref_h, rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x, h0)[1] ** 2))(params)
    want = jax.grad(lambda p: jnp.sum(layer.clone(scan_impl="sequential").apply(
        p, x, h0)[1] ** 2))(params)
    np.testing.assert_allclose(grads["params"]["in_proj"]["kernel"],
                               want["params"]["in_proj"]["kernel"], rtol=2e-5, atol=1e-6)


def test_split_sequence_with_carry_equals_one_call():
    layer = MinLSTM(d_h=D_H, d_model=D_H, scan_impl="native")
    x = _x(8)
    params = _params(layer, x)
    c, y1 = layer.apply(params, x[:, :20])
    c, y2 = layer.apply(params, x[:, 20:], c)
    c_full, y_full = layer.apply(params, x)
    np.testing.assert_allclose(c, c_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-6)


def test_vmap_equals_loop():
    """Under vmap (the kernels then run once per mapped example)."""
    layer = MinGRU(d_h=D_H, d_model=D_H, scan_impl="native")
    xs = _x(9, (3, B, T, D_IN))
    params = _params(layer, xs[0])
    f = jax.vmap(lambda x: layer.apply(params, x))
    carry, y = f(xs)
    grads = jax.vmap(jax.grad(lambda x: jnp.sum(layer.apply(params, x)[1] ** 2)))(xs)
    for i in range(xs.shape[0]):
        c_i, y_i = layer.apply(params, xs[i])
        g_i = jax.grad(lambda x: jnp.sum(layer.apply(params, x)[1] ** 2))(xs[i])
        np.testing.assert_allclose(carry[i], c_i, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(y[i], y_i, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grads[i], g_i, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_bfloat16_matches_chunked(name, monkeypatch):
    """bfloat16 projections (float32 state): the kernels read and write the
    bf16 projections and their cotangents; outputs, gradients and forward-mode
    tangents agree with the pure-JAX bf16 path to bf16 precision, dtypes
    kept."""
    _small_tiles(monkeypatch)
    layer = LAYERS[name][0](dtype=jnp.bfloat16)
    x = _x(4).astype(jnp.bfloat16)
    params = _params(layer, x)
    assert _runs_kernels(layer.clone(scan_impl="native"), params, x)
    rng = np.random.default_rng(5)
    g_y = jnp.asarray(rng.normal(size=(B, T, D_H)), jnp.float32)
    g_c = jnp.asarray(rng.normal(size=(B, D_H)), jnp.float32)

    def run(impl):
        def loss(p, xx):
            c, y = layer.clone(scan_impl=impl).apply(p, xx)
            return jnp.sum(y.astype(jnp.float32) * g_y) + jnp.sum(c * g_c), y
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (grads, y), (grads_ref, y_ref) = run("native"), run("chunked")
    tangent = lambda impl: jit_tangents(layer.clone(scan_impl=impl), params, x)
    d_out, d_out_ref = tangent("native"), tangent("chunked")
    assert y.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    for got, want in zip(jax.tree.leaves((y, grads, d_out)),
                         jax.tree.leaves((y_ref, grads_ref, d_out_ref))):
        assert got.dtype == want.dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


FALLBACKS = {
    "mask": (lambda: MinGRU(d_h=8), dict(seq_lengths=jnp.asarray([T, 9]))),
    "reset": (lambda: MinLSTM(d_h=8), dict(reset=jnp.zeros((B, T), bool).at[:, 5].set(True))),
    "float16": (lambda: MinGRU(d_h=8, dtype=jnp.float16), {}),
    "custom_candidate": (lambda: MinGRU(d_h=8, candidate_activation=jnp.tanh), {}),
    "glrnn": (lambda: GatedLinearRNN(d_h=8), {}),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fallbacks_run_chunked_bit_for_bit(name):
    """Where the kernels do not apply, impl="native" is impl="chunked"."""
    make, kw = FALLBACKS[name]
    layer = make()
    x = _x(10)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    assert not _runs_kernels(layer.clone(scan_impl="native"), params, x, **kw)

    def run(impl):
        def loss(p, xx):
            c, y = layer.clone(scan_impl=impl).apply(p, xx, **kw)
            return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(c), (c, y)
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    for a, b in zip(jax.tree.leaves(run("native")), jax.tree.leaves(run("chunked"))):
        np.testing.assert_array_equal(a, b)


def test_linear_scan_native_is_chunked(rng):
    a = jnp.asarray(rng.uniform(0.5, 1.0, (2, 40, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 40, 3)), jnp.float32)
    for x, y in zip(scan_lib.linear_scan(a, b, impl="native"),
                    scan_lib.linear_scan(a, b, impl="chunked")):
        np.testing.assert_array_equal(x, y)


def _python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300)


_RUNS = ("import jax, jax.numpy as jnp\n"
         "from flax_minrnn import MinGRU\n"
         "layer = MinGRU(d_h=4, scan_impl='native')\n"
         "x = jnp.ones((1, 80, 4))\n"
         "jaxpr = str(jax.make_jaxpr(layer.init)(jax.random.PRNGKey(0), x))\n"
         "print('flax_minrnn_native' in jaxpr)\n")


def test_disabled_by_environment_runs_chunked():
    proc = _python("from flax_minrnn.backends import native\n"
                   "print(native.available())\n" + _RUNS, FLAX_MINRNN_NATIVE="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    assert "RuntimeWarning" not in proc.stderr


def test_missing_compiler_warns_once_and_falls_back(tmp_path):
    code = ("import warnings\n"
            "from flax_minrnn.backends import native\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = [native.available(), native.available()]\n"
            "print(ok, len(w), w[0].filename)\n"
            "print(native.unavailable_reason())\n" + _RUNS)
    proc = _python(code, CXX="no-such-compiler-xyz", FLAX_MINRNN_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    first, reason, runs = proc.stdout.strip().split("\n")
    # One warning, pointing at the caller's line, not at the package's.
    assert first == "[False, False] 1 <string>"
    assert "no-such-compiler-xyz" in reason
    assert runs == "False"


def test_importing_the_package_builds_and_loads_nothing():
    """The default path never touches the kernels: no compiler is needed to
    import the package or to run a layer with the default scan_impl."""
    proc = _python("import flax_minrnn as fm, sys, jax, jax.numpy as jnp\n"
                   "x = jnp.ones((1, 80, 4))\n"
                   "layer = fm.MinGRU(d_h=4)\n"
                   "p = layer.init(jax.random.PRNGKey(0), x)\n"
                   "print('flax_minrnn.backends.native' in sys.modules,\n"
                   "      'flax_minrnn_native' in str(jax.make_jaxpr(layer.apply)(p, x)))",
                   CXX="no-such-compiler-xyz")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    assert "RuntimeWarning" not in proc.stderr


def _python_gates(kind, candidate, pre, bias, h0, reverse):
    """linear_scan of the coefficients of nn.gates (the one copy of the
    equations) for the kernels' inputs."""
    cand = None if candidate == "identity" else gates_lib.g_activation
    biased = pre + bias[None, None]
    gate = (gates_lib.mingru_gates(biased, cand) if kind == "mingru" else
            gates_lib.minlstm_gates(biased, cand, normalize=kind == "minlstm"))
    return scan_lib.linear_scan(gate.a, gate.b, h0, impl="sequential", reverse=reverse)


def _gate_inputs(rng, kind, batch=2, steps=29, width=7):
    n = 2 if kind == "mingru" else 3
    pre = jnp.asarray(3 * rng.normal(size=(batch, steps, n * width)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(n * width,)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)
    return pre, bias, h0


ALL_GATES = [(kind, cand) for kind in native.GATE_KINDS for cand in native.CANDIDATES]


@pytest.mark.parametrize("kind, candidate", ALL_GATES)
def test_kernels_compute_the_python_gate_equations(rng, kind, candidate):
    """The C++ gates against nn.gates on random pre-activations, bias and
    state, for every gate function and candidate the kernels implement: the
    forward kernel equals linear_scan of the Python gates' coefficients."""
    pre, bias, h0 = _gate_inputs(rng, kind)
    for reverse in (False, True):
        got = native.gates_forward(native._Spec(kind, candidate), pre, bias, h0, reverse)
        want = _python_gates(kind, candidate, pre, bias, h0, reverse)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, candidate", ALL_GATES)
def test_kernels_match_the_python_gates_at_non_finite_inputs(rng, kind, candidate):
    """Pre-activations of +-inf, NaN and +-1e30 give the Python gates'
    values, NaN where they give NaN (a gate of exactly 0 times an infinite
    candidate) and inf where they give inf.  Two steps, so that most rows
    stay finite."""
    pre, bias, h0 = _gate_inputs(rng, kind, batch=64, steps=2)
    specials = np.array([np.inf, -np.inf, np.nan, 1e30, -1e30, 200.0, -200.0], np.float32)
    picks = rng.integers(0, len(specials), size=pre.shape)
    pre = jnp.where(jnp.asarray(rng.random(pre.shape) < 0.1), jnp.asarray(specials[picks]), pre)
    got = native.gates_forward(native._Spec(kind, candidate), pre, bias, h0, False)
    want = _python_gates(kind, candidate, pre, bias, h0, False)
    for a, b in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isnan(b).any() and np.isfinite(b).any()
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b))
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
        np.testing.assert_allclose(a[np.isfinite(b)], b[np.isfinite(b)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(native.GATE_KINDS))
def test_bfloat16_cotangents_are_the_float32_ones_rounded_to_nearest_even(rng, kind):
    """The backward kernel on bfloat16 projections computes in float32 and
    rounds its projection cotangents to nearest even: exactly the float32
    kernel's on the same (bf16-exact) values, cast to bfloat16."""
    pre, bias, h0 = _gate_inputs(rng, kind)
    pre16 = pre.astype(jnp.bfloat16)
    spec = native._Spec(kind, "identity")
    _, h = native.gates_forward(spec, pre16.astype(jnp.float32), bias, h0, False)
    g = jnp.asarray(rng.normal(size=h.shape), jnp.float32)
    dh = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)
    length = pre.shape[1]
    got = native.gates_backward(spec, pre16, bias, h, h0, g, dh, 0, length, False)
    want = native.gates_backward(spec, pre16.astype(jnp.float32), bias, h, h0, g, dh, 0,
                                 length, False)
    assert got[0].dtype == jnp.bfloat16
    # Some of them round otherwise than they truncate (the high 16 bits).
    truncated = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(want[0], jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
    assert np.any(np.asarray(want[0].astype(jnp.bfloat16)) !=
                  np.asarray(truncated.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0].astype(jnp.bfloat16)))
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(a, b)


def test_limits_raise_errors_that_name_the_way_out():
    """First derivatives in both modes work (jvp: chunked's tangent loop over
    the kernels' states and projection, equal to chunked's); second
    derivatives and jax.export raise errors naming scan_impl='chunked'."""
    layer = MinGRU(d_h=D_H, d_model=D_H, scan_impl="native")
    x = _x(11)
    params = _params(layer, x)
    f = lambda impl: (lambda p: jnp.sum(layer.clone(scan_impl=impl).apply(p, x)[1] ** 2))
    t = jax.tree.map(lambda v: jnp.full_like(v, 0.01), params)
    got = jax.jvp(f("native"), (params,), (t,))
    want = jax.jvp(f("chunked"), (params,), (t,))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    with pytest.raises(SecondOrderError, match="scan_impl='chunked'"):
        jax.jvp(jax.grad(f("native")), (params,), (t,))
    with pytest.raises(SecondOrderError, match="scan_impl='chunked'"):
        jax.grad(lambda xx: jnp.sum(jax.grad(
            lambda z: jnp.sum(layer.apply(params, z)[1] ** 2))(xx) ** 2))(x)
    with pytest.raises(ValueError, match="scan_impl='native' cannot be exported.*'chunked'"):
        export.export(jax.jit(f("native")))(params)


def test_failed_build_reports_the_compiler_error(tmp_path):
    """A compiler that fails: available() is False and the reason quotes it."""
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'fake: broken toolchain' >&2; exit 1\n")
    fake.chmod(0o755)
    proc = _python("from flax_minrnn.backends import native\n"
                   "print(native.available()); print(native.unavailable_reason())",
                   CXX=str(fake), FLAX_MINRNN_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False\n")
    assert "broken toolchain" in proc.stdout
    assert not list((tmp_path / "cache").glob("*.so"))


def test_layers_cover_every_kernel():
    """LAYERS runs every gate function and candidate of the kernels."""
    def gate(kind, kw):
        if kind == "minlstm" and not kw.get("normalize", True):
            kind = "minlstm_unnormalized"
        return kind, "g" if kw.get("g") else "identity"
    assert {gate(*spec) for _, spec in LAYERS.values()} == set(ALL_GATES)


def test_truncated_cached_library_is_built_again(tmp_path):
    """A cached library cut short (a crash while it was written: loading it
    would kill the process with SIGBUS) does not match the SHA-256 written
    beside it, so it is built again, whole and readable by every user."""
    import shutil
    import stat
    built = native._build(native._compiler())
    digest = built.with_name(built.name + ".sha256")
    shutil.copy(digest, tmp_path / digest.name)
    (tmp_path / built.name).write_bytes(built.read_bytes()[:100_000])
    proc = _python("from flax_minrnn.backends import native\n"
                   "print(native.available(), native.unavailable_reason())",
                   FLAX_MINRNN_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "None"]
    # Built again (not necessarily byte for byte the same: the build may
    # embed paths), whole, with its own digest.
    lib = tmp_path / built.name
    assert len(lib.read_bytes()) > 100_000 and native._cached(lib)
    assert stat.S_IMODE(lib.stat().st_mode) & 0o444 == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.name, digest.name])


def test_a_cache_that_cannot_be_written_is_passed_over(tmp_path, monkeypatch):
    """A library cached whole in a read-only cache is used; where none is, the
    build goes to the temporary directory's cache; where neither can be
    written, the error names both."""
    import hashlib
    import tempfile
    shared, tmp = tmp_path / "shared", tmp_path / "tmp"
    shared.mkdir()
    tmp.mkdir()
    monkeypatch.setenv("FLAX_MINRNN_CACHE", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    compiled = []

    def compile_into(cxx, lib, writable=(tmp / "flax_minrnn",)):
        if lib.parent not in writable:
            raise PermissionError(13, "Permission denied", str(lib.parent))
        compiled.append(lib)
        return lib

    monkeypatch.setattr(native, "_compile", compile_into)
    lib = native._build(native._compiler())
    assert compiled == [lib] and lib.parent == tmp / "flax_minrnn"
    # A whole library in the shared cache is loaded from there, unbuilt.
    whole = shared / lib.name
    whole.write_bytes(b"library")
    whole.with_name(whole.name + ".sha256").write_text(hashlib.sha256(b"library").hexdigest())
    assert native._build(native._compiler()) == whole and len(compiled) == 1
    whole.write_bytes(b"librar")  # cut short: built again
    monkeypatch.setattr(native, "_compile", lambda cxx, lib: compile_into(cxx, lib, ()))
    with pytest.raises(OSError, match=f"{re.escape(str(shared))}.*{re.escape(str(tmp))}"):
        native._build(native._compiler())


def test_compiler_may_hold_a_launcher(monkeypatch):
    """$CXX is a command: its first word is looked up on the PATH and the rest
    kept ("ccache g++")."""
    import shutil
    monkeypatch.setenv("CXX", "env g++ -O2")
    assert native._compiler() == [shutil.which("env"), "g++", "-O2"]
    monkeypatch.setenv("CXX", "no-such-launcher-xyz g++")
    assert native._compiler() is None


def test_raw_kernels_refuse_to_run_unregistered(monkeypatch):
    """The kernels' own entry points, while they are unavailable: an error
    that says so and names the way out, not XLA's missing FFI handler."""
    monkeypatch.setattr(native, "_state", {"checked": True, "ok": False,
                                            "error": "disabled by FLAX_MINRNN_NATIVE=0"})
    with pytest.raises(RuntimeError, match="unavailable.*FLAX_MINRNN_NATIVE=0.*'chunked'"):
        native.empty((2, 3), jnp.float32)
    with pytest.raises(RuntimeError, match="unavailable"):
        native.gates_forward(native._Spec("mingru", "identity"), jnp.zeros((1, 2, 4)),
                             jnp.zeros((4,)), jnp.zeros((1, 2)), False)
