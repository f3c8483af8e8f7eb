"""MinGRU, MinLSTM and GatedLinearRNN: references, modes, carries, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn.ops import gated as gated_lib
from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM, g_activation
from flax_minrnn.nn.rglru import RGLRU
from conftest import TOL
from jit_helpers import jit_tangents
from reference import central_difference, layer_forward

B, T, D_IN = 2, 13, 5

LAYERS = {
    "mingru": lambda **kw: MinGRU(d_h=6, **kw),
    "mingru_g_proj": lambda **kw: MinGRU(d_h=6, d_model=4, candidate_activation=g_activation, **kw),
    "minlstm": lambda **kw: MinLSTM(**kw),
    "minlstm_unnorm": lambda **kw: MinLSTM(d_h=7, normalize_gates=False, **kw),
    "glrnn_tied": lambda **kw: GatedLinearRNN(d_h=6, d_model=3, **kw),
    "glrnn_untied": lambda **kw: GatedLinearRNN(d_h=6, use_tied_gates=False, **kw),
}
REF_KW = {
    "mingru": ("mingru", {}),
    "mingru_g_proj": ("mingru", {"g": True}),
    "minlstm": ("minlstm", {}),
    "minlstm_unnorm": ("minlstm", {"normalize": False}),
    "glrnn_tied": ("glrnn", {"tied": True}),
    "glrnn_untied": ("glrnn", {"tied": False}),
}
IMPLS = ["associative", "sequential", "chunked"]


def _x(seed=0, shape=(B, T, D_IN)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _init(layer, x):
    return layer.init(jax.random.PRNGKey(1), x)


def _h0(layer, x, sign):
    h = layer.initialize_carry(x.shape)
    if sign == "zero":
        return h
    v = jax.random.uniform(jax.random.PRNGKey(7), h.shape, jnp.float32, 0.1, 1.0)
    return v if sign == "pos" else -v


def _true_params(layer, params, x):
    """Associative params + a random (non-zero) recurrent kernel."""
    shape = jax.eval_shape(layer.clone(use_true_recurrence=True).init,
                           jax.random.PRNGKey(0), x)["params"]["recurrent_kernel"].shape
    kernel = 0.3 * jax.random.normal(jax.random.PRNGKey(3), shape, jnp.float32)
    return {"params": dict(params["params"], recurrent_kernel=kernel)}


@pytest.mark.parametrize("true_rec", [False, True], ids=["assoc", "true"])
@pytest.mark.parametrize("h0_sign", ["zero", "pos", "neg"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_matches_float64_reference(name, h0_sign, true_rec):
    layer = LAYERS[name]()
    x = _x()
    params = _init(layer, x)
    if true_rec:
        params = _true_params(layer, params, x)
        layer = layer.clone(use_true_recurrence=True)
    if name == "mingru_g_proj" and h0_sign == "neg":
        h0_sign = "pos"
    h0 = _h0(layer, x, h0_sign)
    carry, y = layer.apply(params, x, h0)
    kind, kw = REF_KW[name]
    ref_h, ref_y = layer_forward(kind, params["params"], x, h0, true_recurrence=true_rec, **kw)
    assert carry.dtype == jnp.float32
    np.testing.assert_allclose(carry, ref_h, **TOL["float32"])
    np.testing.assert_allclose(y, ref_y, **TOL["float32"])


@pytest.mark.parametrize("impl", ["auto"] + IMPLS)
@pytest.mark.parametrize("true_rec", [False, True], ids=["assoc", "true"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_float64_layers_match_the_float64_reference(name, true_rec, impl, monkeypatch):
    """In float64 every implementation equals the NumPy recurrence to 1e-12
    (float32 tolerances would hide an error of 1e-6 in a gate); 4-step tiles
    put several tiles and a partial one in T = 13."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 4)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 4)
    with jax.enable_x64(True):
        layer = LAYERS[name](scan_impl=impl, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, D_IN)))
        params = _init(layer, x)
        if true_rec:
            shape = jax.eval_shape(layer.clone(use_true_recurrence=True).init,
                                   jax.random.PRNGKey(0), x)["params"]["recurrent_kernel"].shape
            kernel = 0.3 * np.random.default_rng(3).normal(size=shape)
            params = {"params": dict(params["params"], recurrent_kernel=jnp.asarray(kernel))}
            layer = layer.clone(use_true_recurrence=True)
        h0 = jnp.asarray(np.random.default_rng(4).uniform(0.1, 1.0, (B, layer.state_size(D_IN))))
        carry, y = layer.apply(params, x, h0)
        assert carry.dtype == y.dtype == jnp.float64
        kind, kw = REF_KW[name]
        ref_h, ref_y = layer_forward(kind, params["params"], x, h0, true_recurrence=true_rec,
                                     **kw)
        np.testing.assert_allclose(carry, ref_h, rtol=1e-12, atol=1e-12 * np.abs(ref_h).max())
        np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12 * np.abs(ref_y).max())


@pytest.mark.parametrize("name", list(LAYERS))
def test_all_impls_and_modes_agree(name):
    """parallel (every impl) == true recurrence with U = 0 == token-by-token == chunked."""
    layer = LAYERS[name]()
    x = _x(1)
    params = _init(layer, x)
    h0 = _h0(layer, x, "neg" if name != "mingru_g_proj" else "pos")
    apply = jax.jit(layer.apply)  # One compiled function per shape, reused below.
    ref_c, ref_y = apply(params, x, h0)
    outs = {impl: jax.jit(layer.clone(scan_impl=impl).apply)(params, x, h0)
            for impl in IMPLS + ["auto"]}
    tl = layer.clone(use_true_recurrence=True)
    tp = _true_params(layer, params, x)
    tp["params"]["recurrent_kernel"] = jnp.zeros_like(tp["params"]["recurrent_kernel"])
    outs["true_recurrence_U0"] = jax.jit(tl.apply)(tp, x, h0)
    # Token by token with the carry.
    c, ys = h0, []
    for t in range(T):
        c, y = apply(params, x[:, t:t + 1], c)
        ys.append(y)
    outs["token_by_token"] = (c, jnp.concatenate(ys, 1))
    # Chunked at arbitrary split points.
    c, ys = h0, []
    for lo, hi in [(0, 4), (4, 5), (5, 11), (11, T)]:
        c, y = apply(params, x[:, lo:hi], c)
        ys.append(y)
    outs["chunked_carry"] = (c, jnp.concatenate(ys, 1))
    for key, (c, y) in outs.items():
        np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["mingru", "minlstm", "glrnn_untied"])
def test_true_recurrence_chunked_and_token_by_token(name):
    layer = LAYERS[name](use_true_recurrence=True)
    x = _x(2)
    params = _true_params(LAYERS[name](), _init(LAYERS[name](), x), x)
    h0 = _h0(layer, x, "pos")
    apply = jax.jit(layer.apply)
    ref_c, ref_y = apply(params, x, h0)
    c, ys = h0, []
    for lo, hi in [(0, 1), (1, 7), (7, T)]:
        c, y = apply(params, x[:, lo:hi], c)
        ys.append(y)
    np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), ref_y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("true_rec", [False, True], ids=["assoc", "true"])
@pytest.mark.parametrize("name", ["mingru_g_proj", "minlstm", "glrnn_tied"])
def test_seq_lengths_and_reverse(name, true_rec):
    x = _x(3, (3, T, D_IN))
    base = LAYERS[name]()
    params = _init(base, x)
    if true_rec:
        params = _true_params(base, params, x)
    lengths = np.array([T, 6, 0])
    for reverse in (False, True):
        layer = base.clone(use_true_recurrence=true_rec, reverse=reverse)
        h0 = _h0(layer, x, "pos")
        apply = jax.jit(layer.apply)
        carry, y = apply(params, x, h0, seq_lengths=jnp.asarray(lengths))
        for i, n in enumerate(lengths):
            if n == 0:
                np.testing.assert_array_equal(carry[i], h0[i])
            else:
                ci, yi = apply(params, x[i:i + 1, :n], h0[i:i + 1])
                np.testing.assert_allclose(carry[i], ci[0], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(y[i, :n], yi[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(y[i, n:], 0.0)


def test_reverse_matches_flipped_forward():
    layer = MinGRU(d_h=6)
    x = _x(4)
    params = _init(layer, x)
    c_rev, y_rev = layer.clone(reverse=True).apply(params, x)
    c_fwd, y_fwd = layer.apply(params, jnp.flip(x, 1))
    np.testing.assert_allclose(c_rev, c_fwd, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y_rev, jnp.flip(y_fwd, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("true_rec", [False, True], ids=["assoc", "true"])
@pytest.mark.parametrize("name", ["mingru", "glrnn_untied"])
def test_reset_equals_separate_documents(name, true_rec):
    x = _x(5, (1, T, D_IN))
    base = LAYERS[name]()
    params = _init(base, x)
    if true_rec:
        params = _true_params(base, params, x)
    layer = base.clone(use_true_recurrence=true_rec)
    starts = [0, 4, 9]
    reset = np.zeros((1, T), bool)
    reset[0, starts] = True
    h0 = _h0(layer, x, "neg")
    apply = jax.jit(layer.apply)
    _, y = apply(params, x, h0, reset=jnp.asarray(reset))
    for lo, hi in zip(starts, starts[1:] + [T]):
        _, yd = apply(params, x[:, lo:hi])  # each document from zeros
        np.testing.assert_allclose(y[:, lo:hi], yd, rtol=1e-5, atol=1e-6)


# Layers whose state width equals the input width, so that the adjoint writes
# the input's gradient over the first kept projection block.
SQUARE = {
    "mingru_square": lambda **kw: MinGRU(d_h=D_IN, **kw),
    "glrnn_square": lambda **kw: GatedLinearRNN(d_h=D_IN, **kw),
}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("name", ["mingru_g_proj", "minlstm", "glrnn_tied", "glrnn_untied",
                                  *SQUARE])
def test_chunked_tiles_equal_sequential_outputs_and_gradients(name, reverse, monkeypatch):
    """impl="chunked" runs the input projection inside the scan, tile by tile
    (here 4-step tiles: T = 13 is three full tiles and a partial one).
    Outputs, carry and gradients w.r.t. params, x and h0 (random cotangents,
    with padding and resets) equal those of impl="sequential", whose
    projection runs outside the scan.  MinLSTM (d_h = d_in by default) and
    the ``SQUARE`` layers write the input's gradient over a kept projection
    block; the others into a buffer of its own."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 4)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 4)
    layer = {**LAYERS, **SQUARE}[name](reverse=reverse)
    x = _x(3)
    params = _init(layer, x)
    h0 = _h0(layer, x, "pos")
    lengths = jnp.asarray([T, 9], jnp.int32)
    reset = jnp.zeros((B, T), bool).at[0, 6].set(True).at[1, 2].set(True)
    rng = np.random.default_rng(3)
    c_shape, y_shape = jax.eval_shape(layer.apply, params, x, h0)
    g_c = jnp.asarray(rng.normal(size=c_shape.shape), jnp.float32)
    g_y = jnp.asarray(rng.normal(size=y_shape.shape), jnp.float32)

    def run(impl):
        def loss(p, xx, hh):
            c, y = layer.clone(scan_impl=impl).apply(p, xx, hh, seq_lengths=lengths,
                                                     reset=reset)
            return jnp.sum(y * g_y) + jnp.sum(c * g_c), (c, y)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, h0)

    (grads, out), (grads_ref, out_ref) = run("chunked"), run("sequential")
    for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((out_ref, grads_ref))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # Split == full: the sequence in two calls (7 + 6 steps, cut inside a
    # tile) with the carry equals one call (forward only: the carry order).
    if not reverse:
        chunked = jax.jit(layer.clone(scan_impl="chunked").apply)
        c, y1 = chunked(params, x[:, :7], h0)
        c, y2 = chunked(params, x[:, 7:], c)
        c_full, y_full = chunked(params, x, h0)
        np.testing.assert_allclose(c, c_full, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: MinGRU(d_h=6, dtype=jnp.bfloat16),
    lambda: GatedLinearRNN(d_h=6, d_model=D_IN, dtype=jnp.bfloat16),
    lambda: MinGRU(d_h=D_IN, dtype=jnp.bfloat16)], ids=["mingru", "glrnn", "mingru_square"])
def test_chunked_tiles_bfloat16_match_sequential(make, monkeypatch):
    """bfloat16 compute through 4-step tiles (the tile buffers, and
    GatedLinearRNN's readout buffer, hold the bf16 bits): outputs and
    gradients agree with impl="sequential" to bf16 precision, and the input
    gradient keeps the input's dtype; so do forward-mode tangents (the
    tangent loop reads the bf16 bits of the kept projection)."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 4)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 4)
    layer = make()
    x = _x(4).astype(jnp.bfloat16)
    params = _init(layer, x)
    g_y = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, D_IN)), jnp.float32)

    def run(impl):
        def loss(p, xx):
            c, y = layer.clone(scan_impl=impl).apply(p, xx)
            return jnp.sum(y.astype(jnp.float32) * g_y), y
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (grads, y), (grads_ref, y_ref) = run("chunked"), run("sequential")
    tangent = lambda impl: jit_tangents(layer.clone(scan_impl=impl), params, x)
    d_out, d_out_ref = tangent("chunked"), tangent("sequential")
    assert y.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    assert d_out[1].dtype == jnp.bfloat16
    for got, want in zip(jax.tree.leaves((y, grads, d_out)),
                         jax.tree.leaves((y_ref, grads_ref, d_out_ref))):
        assert got.dtype == want.dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * np.abs(want).max())


# What forward+backward keeps per time step in XLA's temporaries, in
# whole-sequence buffers of (batch, d_h) floats: the projection blocks the
# adjoint reads (minGRU [k, h~], minLSTM [k_f, k_i, h~], GatedLinearRNN
# [candidate, input gate] and the output gate's columns) and the states, less
# the first block, over which the adjoint writes the input's gradient (an
# output, not a temporary: d_in = d_h here).
_KEPT_BLOCKS = {"mingru": 2, "minlstm": 3, "glrnn_tied": 3}


def _tiled_layer(name, d_h, monkeypatch):
    """A ``chunked`` layer whose tiles are 64 steps at every T."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 64)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 64)
    make = {"mingru": MinGRU, "minlstm": MinLSTM, "glrnn_tied": GatedLinearRNN}[name]
    return make(d_h=d_h, scan_impl="chunked")


@pytest.mark.parametrize("name", list(_KEPT_BLOCKS))
def test_chunked_memory_grows_by_the_kept_blocks_and_the_program_not_at_all(name, monkeypatch):
    """With a fixed tile, doubling T adds the kept blocks to XLA's temporaries
    and nothing else (memory linear in T, no other per-step buffer) and leaves
    the compiled program the same size (compile time does not grow with T)."""
    d_h = 16
    layer = _tiled_layer(name, d_h, monkeypatch)

    def compiled(t):
        x = _x(0, (B, t, d_h))
        params = _init(layer, x[:, :4])
        g = _x(1, (B, t, d_h))
        loss = lambda p, xx: jnp.sum(layer.apply(p, xx)[1] * g)
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()

    small, large = compiled(512), compiled(1024)
    grown = (large.memory_analysis().temp_size_in_bytes
             - small.memory_analysis().temp_size_in_bytes)
    # In blocks of 512 more steps; any other per-step buffer adds at least half
    # a block (a 16-bit one), so half a block either way is the resolution.
    blocks = grown / (B * 512 * d_h * 4)
    assert abs(blocks - _KEPT_BLOCKS[name]) < 0.5, blocks
    assert len(large.as_text().splitlines()) == len(small.as_text().splitlines())


@pytest.mark.parametrize("name", list(_KEPT_BLOCKS))
def test_chunked_plain_call_keeps_no_whole_sequence_buffer(name, monkeypatch):
    """Without differentiation nothing is kept for an adjoint: with a fixed
    tile, doubling T adds less than one block of (batch, d_h) floats per step
    to XLA's temporaries (the projection runs tile by tile; the outputs are
    not temporaries), and the result equals the one under ``jax.grad``'s
    forward pass, which computes the projection for the whole sequence."""
    d_h = 16
    layer = _tiled_layer(name, d_h, monkeypatch)

    def compiled(t):
        x = _x(0, (B, t, d_h))
        params = _init(layer, x[:, :4])
        return jax.jit(layer.apply).lower(params, x).compile(), params, x

    (small, _, _), (large, params, x) = compiled(512), compiled(1024)
    grown = (large.memory_analysis().temp_size_in_bytes
             - small.memory_analysis().temp_size_in_bytes)
    assert grown / (B * 512 * d_h * 4) < 0.5, grown
    plain = large(params, x)
    (_, traced), _ = jax.value_and_grad(
        lambda p: (lambda c, y: (jnp.sum(y), (c, y)))(*layer.apply(p, x)), has_aux=True)(params)
    for got, want in zip(jax.tree.leaves(plain), jax.tree.leaves(traced)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mingru", "minlstm", "glrnn_tied"])
def test_gradients_match_float64_reference(name):
    """Gradients w.r.t. x, h0 and in_proj kernel, with random cotangents on the
    outputs and the final carry, against central differences of the float64
    NumPy reference."""
    layer = LAYERS[name]()
    x = _x(6, (1, 6, D_IN))
    params = _init(layer, x)
    h0 = _h0(layer, x, "neg")
    rng = np.random.default_rng(0)
    c_shape, y_shape = jax.eval_shape(layer.apply, params, x, h0)
    g_c = rng.normal(size=c_shape.shape)
    g_y = rng.normal(size=y_shape.shape)
    kind, kw = REF_KW[name]

    def loss(p, xx, hh):
        c, y = layer.apply({"params": p}, xx, hh)
        return jnp.sum(y * g_y.astype(np.float32)) + jnp.sum(c * g_c.astype(np.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))(params["params"], x, h0)
    p64 = jax.tree_util.tree_map(lambda v: np.array(v, np.float64), params["params"])
    inputs = {"x": np.array(x, np.float64), "h0": np.array(h0, np.float64),
              "kernel": p64["in_proj"]["kernel"]}

    def ref_loss():
        h, y = layer_forward(kind, p64, inputs["x"], inputs["h0"], **kw)
        return np.sum(y * g_y) + np.sum(h * g_c)

    for got, key in [(grads[1], "x"), (grads[2], "h0"),
                     (grads[0]["in_proj"]["kernel"], "kernel")]:
        np.testing.assert_allclose(got, central_difference(ref_loss, inputs[key]),
                                   **TOL["float32"], err_msg=key)


def test_bfloat16_compute_float32_state():
    layer = MinGRU(d_h=8, dtype=jnp.bfloat16)
    x = _x(8, (2, 64, 8))
    params = _init(layer, x)
    carry, y = layer.apply(params, x)
    assert carry.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    ref_c, ref_y = MinGRU(d_h=8).apply(params, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref_y, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(carry, ref_c, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["mingru", "minlstm", "glrnn_tied", "glrnn_untied"])
def test_bfloat16_compute_keeps_the_float32_gate_bias(name, impl):
    """Under bfloat16 compute the in_proj bias joins the gates in float32.

    Small-integer inputs and kernel make every bfloat16 projection exact, so
    the float32 state must match the float64 reference to float32 rounding,
    with a bias that bfloat16 cannot hold (a retention logit of ln(9999)).
    The bias gradient of a carry loss must match the float32 layer's."""
    kind, ref_kw = REF_KW[name]
    layer = LAYERS[name](dtype=jnp.bfloat16, scan_impl=impl, forget_bias=np.log(9999.0))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(-2, 3, (B, 16, D_IN)), jnp.float32)
    params = jax.tree.map(np.asarray, _init(layer, x))
    proj = params["params"]["in_proj"]
    proj["kernel"] = rng.integers(-1, 2, proj["kernel"].shape).astype(np.float32) / 4
    bias = rng.standard_normal(proj["bias"].shape) * 2
    d_h = layer.initialize_carry(x.shape).shape[-1]
    for index, value in layer.bias_offsets().items():
        bias[index * d_h:(index + 1) * d_h] = value + rng.standard_normal(d_h) * 0.01
    proj["bias"] = bias.astype(np.float32)
    h_ref, _ = layer_forward(kind, params["params"], x, **ref_kw)
    carry, y = layer.apply(params, x)
    assert carry.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(carry, h_ref, rtol=1e-5, atol=1e-6)

    g = jnp.asarray(rng.standard_normal(carry.shape), jnp.float32)

    def bias_grad(module):
        loss = lambda p: jnp.sum(module.apply(p, x)[0] * g)
        return jax.grad(loss)(params)["params"]["in_proj"]["bias"]

    np.testing.assert_allclose(bias_grad(layer), bias_grad(layer.clone(dtype=jnp.float32)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("true_rec", [False, True], ids=["assoc", "true"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_batch_keeps_the_time_axis(name, true_rec):
    layer = LAYERS[name](use_true_recurrence=true_rec)
    params = _init(layer, _x())
    carry, y = layer.apply(params, jnp.zeros((0, T, D_IN)))
    ref_carry, ref_y = layer.apply(params, _x())
    assert carry.shape == (0,) + ref_carry.shape[1:] and y.shape == (0,) + ref_y.shape[1:]


def test_forget_bias_sets_initial_retention():
    x = _x(9, (1, 3, 4))
    for layer, (seg, value) in [(MinGRU(d_h=4, forget_bias=3.0), (0, -3.0)),
                                (MinLSTM(d_h=4, forget_bias=2.0), (0, 2.0)),
                                (GatedLinearRNN(d_h=4, forget_bias=1.5), (1, -1.5)),
                                (GatedLinearRNN(d_h=4, use_tied_gates=False, forget_bias=1.5), (2, 1.5))]:
        bias = _init(layer, x)["params"]["in_proj"]["bias"]
        np.testing.assert_array_equal(bias[seg * 4:(seg + 1) * 4], value)
        others = np.delete(np.asarray(bias), np.arange(seg * 4, (seg + 1) * 4))
        np.testing.assert_array_equal(others, 0.0)


def test_output_widths_and_projection():
    x = _x(10, (1, 3, 6))
    assert "out_proj" not in _init(MinGRU(), x)["params"]
    assert _init(MinGRU(expansion_factor=2.0), x)["params"]["out_proj"]["kernel"].shape == (12, 6)
    assert GatedLinearRNN(d_h=5).apply(_init(GatedLinearRNN(d_h=5), x), x)[1].shape == (1, 3, 5)
    with pytest.raises(ValueError, match="use_out_proj=False needs d_h == d_model"):
        _init(MinGRU(d_h=4, use_out_proj=False), x)


@pytest.mark.parametrize("name", ["mingru", "glrnn_untied", "rglru"])
def test_float64_inputs_get_a_float64_carry_from_initialize_carry(name):
    """dtype=None computes in the inputs' dtype: initialize_carry(shape, x.dtype)
    gives the state dtype that apply expects, without params."""
    layer = RGLRU(num_heads=2) if name == "rglru" else LAYERS[name]()
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 4)), jnp.float64)
        params = _init(layer, x)
        h0 = layer.initialize_carry(x.shape, x.dtype)
        assert h0.dtype == jnp.float64
        assert layer.initialize_carry(x.shape).dtype == jnp.float32
        carry, y = layer.apply(params, x, h0)
        want_c, want_y = layer.apply(params, x)
        assert carry.dtype == jnp.float64
        np.testing.assert_array_equal(carry, want_c)
        np.testing.assert_array_equal(y, want_y)
        with pytest.raises(TypeError, match=r"dtype float64 .*initialize_carry\(x.shape, x.dtype\)"):
            layer.apply(params, x, layer.initialize_carry(x.shape))


def test_jit_and_no_bias():
    layer = MinLSTM(d_h=4, use_bias=False)
    x = _x(11, (2, 5, 3))
    params = _init(layer, x)
    assert "bias" not in params["params"]["in_proj"]
    carry, y = jax.jit(layer.apply)(params, x, None)
    ref_h, ref_y = layer_forward("minlstm", params["params"], x)
    np.testing.assert_allclose(carry, ref_h, **TOL["float32"])
    np.testing.assert_allclose(y, ref_y, **TOL["float32"])


class TestBadInput:
    layer = MinGRU(d_h=4)
    x = jnp.ones((2, 5, 3), jnp.float32)

    @property
    def params(self):
        return _init(self.layer, self.x)

    def test_rank(self):
        with pytest.raises(ValueError, match=r"x must have shape \(batch, time, features\)"):
            self.layer.apply(self.params, self.x[0])

    def test_feature_size(self):
        with pytest.raises(ValueError, match="x has 4 features but .* expect 3"):
            self.layer.apply(self.params, jnp.ones((2, 5, 4), jnp.float32))

    def test_integer_input(self):
        with pytest.raises(TypeError, match="x must be a floating-point array"):
            self.layer.apply(self.params, jnp.ones((2, 5, 3), jnp.int32))

    def test_carry_shape(self):
        with pytest.raises(ValueError, match=r"carry must have shape \(batch, d_h\) = \(2, 4\)"):
            self.layer.apply(self.params, self.x, jnp.zeros((2, 5), jnp.float32))

    def test_carry_dtype(self):
        with pytest.raises(TypeError, match="carry must have dtype float32"):
            self.layer.apply(self.params, self.x, jnp.zeros((2, 4), jnp.bfloat16))

    def test_seq_lengths_range(self):
        with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, 5\]"):
            self.layer.apply(self.params, self.x, seq_lengths=jnp.asarray([5, 6]))

    def test_unknown_scan_impl(self):
        with pytest.raises(ValueError, match="scan_impl must be one of"):
            self.layer.clone(scan_impl="cuda").apply(self.params, self.x)

    def test_unknown_keyword(self):
        with pytest.raises(TypeError, match="lengths"):
            self.layer.apply(self.params, self.x, lengths=jnp.asarray([5, 5]))

    def test_bad_sizes(self):
        with pytest.raises(ValueError, match="d_h must be an integer >= 1, got 0"):
            _init(MinGRU(d_h=0), self.x)
        with pytest.raises(ValueError, match="GatedLinearRNN needs d_h"):
            _init(GatedLinearRNN(), self.x)
        with pytest.raises(ValueError, match="d_h must be an integer >= 1, got 2.5"):
            _init(MinGRU(d_h=2.5), self.x)
        with pytest.raises(ValueError, match="d_model must be an integer >= 1, got 3.0"):
            MinLSTM(d_h=4, d_model=3.0).initialize_carry(self.x.shape)

    def test_bad_dtypes(self):
        with pytest.raises(TypeError, match="dtype must be a floating-point dtype or None.*int32"):
            _init(MinGRU(d_h=4, dtype=jnp.int32), self.x)
        with pytest.raises(TypeError, match="param_dtype must be a floating-point dtype.*int8"):
            _init(GatedLinearRNN(d_h=4, param_dtype="int8"), self.x)
        with pytest.raises(TypeError, match="dtype must be .* got 'float17'"):
            _init(MinLSTM(d_h=4, dtype="float17"), self.x)


# ----------------------------------------------------------------------------
# Building blocks with hand-written derivatives.


def test_sigmoid_pair_values_and_derivatives():
    from flax_minrnn.nn.gates import sigmoid_pair
    # |k| <= 80: sigmoid(-80) ~ 1.8e-35 is still a normal float32 (XLA flushes
    # denormals to zero).
    k = jnp.asarray([-80.0, -30.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 30.0, 80.0], jnp.float32)
    ref = 1.0 / (1.0 + np.exp(-np.asarray(k, np.float64)))
    z, one_minus_z = sigmoid_pair(k)
    # Both halves are exact to rounding, including the tiny tails.
    np.testing.assert_allclose(z, ref, rtol=2e-7, atol=0)
    np.testing.assert_allclose(one_minus_z, 1.0 / (1.0 + np.exp(np.asarray(k, np.float64))),
                               rtol=2e-7, atol=0)
    dz = jax.vmap(jax.grad(lambda v: sigmoid_pair(v)[0]))(k)
    dzc = jax.vmap(jax.grad(lambda v: sigmoid_pair(v)[1]))(k)
    e = np.exp(-np.abs(np.asarray(k, np.float64)))
    slope = e / (1 + e) ** 2  # sigma'(k), without the 1 - sigma cancellation
    np.testing.assert_allclose(dz, slope, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(dzc, -slope, rtol=1e-6, atol=1e-30)
    assert float(dz[4]) == 0.25  # k = 0 exactly: not the zero slope of |k|


def test_dense_equals_flax_dense_params_outputs_and_gradients():
    """Same param tree and values as nn.Dense; only the backward is ours."""
    import flax.linen as nn
    from flax_minrnn.nn.dense import Dense
    x = _x(3, (2, 7, 5))
    ours, theirs = Dense(4), nn.Dense(4)
    p = ours.init(jax.random.PRNGKey(0), x)
    p_ref = theirs.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(p) == jax.tree.structure(p_ref)
    for got, want in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(got, want)
    g = jax.random.normal(jax.random.PRNGKey(4), (2, 7, 4))
    f = lambda m: lambda p, x: jnp.sum(m.apply(p, x) * g)
    np.testing.assert_allclose(ours.apply(p, x), theirs.apply(p, x), rtol=1e-6, atol=1e-6)
    got = jax.grad(f(ours), argnums=(0, 1))(p, x)
    want = jax.grad(f(theirs), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_normalized_gates_exact_and_finite():
    """minLSTM's normalised gates against float64 f/(f+i), including saturation."""
    from flax_minrnn.nn.gates import normalized_gates
    ks = np.array([-1e4, -200.0, -90.0, -30.0, -3.0, 0.0, 2.5, 30.0, 90.0, 1e4])
    k_f, k_i = (jnp.asarray(v, jnp.float32) for v in np.meshgrid(ks, ks))
    f_n, i_n = normalized_gates(k_f, k_i)
    kf64, ki64 = np.asarray(k_f, np.float64), np.asarray(k_i, np.float64)
    # log-space float64 reference: f/(f+i) = 1 / (1 + exp(log i - log f))
    log_sig = lambda k: -np.logaddexp(0.0, -k)
    with np.errstate(over="ignore"):  # exp(+large) = inf gives the right 0
        ref_f = 1.0 / (1.0 + np.exp(log_sig(ki64) - log_sig(kf64)))
        ref_i = 1.0 / (1.0 + np.exp(log_sig(kf64) - log_sig(ki64)))
    assert bool(jnp.all(jnp.isfinite(f_n))) and bool(jnp.all(jnp.isfinite(i_n)))
    # Exact to rounding everywhere, both logits far below zero included
    # (there the ratio depends on k_f - k_i, e.g. 0.5 at (-1e4, -1e4) and
    # ~1 for the input gate at (-1e4, -200)).
    np.testing.assert_allclose(np.asarray(f_n), ref_f, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(np.asarray(i_n), ref_i, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(f_n + i_n, 1.0, rtol=1e-6)
    # The derivative, against float64: d f_n/dk_f = f_n i_n sigmoid(-k_f),
    # d f_n/dk_i = -f_n i_n sigmoid(-k_i), and i_n = 1 - f_n.  Random
    # cotangents (vjp) and tangents (jvp) so every term is exercised; exact
    # to rounding in relative terms, also where f_n is tiny.
    sig_neg = lambda k: np.exp(log_sig(-k))
    slope_f = ref_f * ref_i * sig_neg(kf64)
    slope_i = -ref_f * ref_i * sig_neg(ki64)
    rng = np.random.default_rng(0)
    w, t_f, t_i = (rng.standard_normal(k_f.shape).astype(np.float32) for _ in range(3))
    _, pullback = jax.vjp(normalized_gates, k_f, k_i)
    zero = np.zeros_like(w)
    # One output's cotangent at a time: a sum over both would cancel in the
    # float32 sum itself (d i_n = -d f_n), not in the gates.
    for cot, sign in (((w, zero), 1.0), ((zero, w), -1.0)):
        g_f, g_i = pullback(tuple(map(jnp.asarray, cot)))
        np.testing.assert_allclose(np.asarray(g_f), sign * w * slope_f, rtol=1e-5, atol=1e-30)
        np.testing.assert_allclose(np.asarray(g_i), sign * w * slope_i, rtol=1e-5, atol=1e-30)
    _, (d_f, d_i) = jax.jvp(normalized_gates, (k_f, k_i), (jnp.asarray(t_f), jnp.asarray(t_i)))
    want = slope_f * t_f + slope_i * t_i
    np.testing.assert_allclose(np.asarray(d_f), want, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(np.asarray(d_i), -want, rtol=1e-5, atol=1e-30)


# ----------------------------------------------------------------------------
# Garbage in padded steps never reaches a gradient.


_PADDED_LAYERS = {
    "mingru": lambda impl: MinGRU(d_h=6, d_model=4, scan_impl=impl),
    "minlstm": lambda impl: MinLSTM(d_h=4, scan_impl=impl),
    "glrnn_tied": lambda impl: GatedLinearRNN(d_h=4, d_model=4, scan_impl=impl),
    "glrnn_untied_true": lambda impl: GatedLinearRNN(d_h=4, d_model=4, use_tied_gates=False,
                                                     use_true_recurrence=True, scan_impl=impl),
    "rglru": lambda impl: __import__("flax_minrnn").RGLRU(num_heads=2, scan_impl=impl),
}


@pytest.mark.parametrize("impl", ["sequential", "associative", "chunked", "pallas", "native"])
@pytest.mark.parametrize("name", list(_PADDED_LAYERS))
def test_nan_and_inf_in_padding_change_nothing(name, impl):
    """NaN and Inf at steps beyond seq_lengths (and masked steps): outputs,
    carry and parameter gradients equal those with zeros there, and are
    finite, for every layer and implementation."""
    layer = _PADDED_LAYERS[name](impl)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 11, 4)), jnp.float32)
    lengths = jnp.asarray([11, 6, 0], jnp.int32)
    pad = np.arange(11)[None, :] >= np.asarray(lengths)[:, None]
    garbage = jnp.where(jnp.asarray(pad)[:, :, None],
                        jnp.asarray(np.where(rng.uniform(size=x.shape) < 0.5, np.nan, np.inf),
                                    jnp.float32), x)
    clean = jnp.where(jnp.asarray(pad)[:, :, None], 0.0, x)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), clean)
    g_c, g_y = (jnp.asarray(rng.normal(size=s.shape), jnp.float32)
                for s in jax.eval_shape(layer.apply, params, x))

    def loss(p, inputs):
        c, y = layer.apply(p, inputs, seq_lengths=lengths)
        return jnp.sum(y * g_y) + jnp.sum(c * g_c), (c, y)

    run = jax.jit(jax.grad(loss, has_aux=True))  # Compiled once, for both inputs.
    got, want = run(params, garbage), run(params, clean)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_array_equal(a, b)
