"""Griffin / RecurrentGemma: RG-LRU, local attention and the hybrid LM against
float64 NumPy references written here from the equations; streaming, padding,
resets, causality, generation, presets, config errors, trainer wiring."""

import importlib
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOL
from flax_minrnn.training import config as config_lib
from flax_minrnn.nn import gates as gates_lib
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.training import train as train
from flax_minrnn.nn.attention import AttentionState, LocalAttention
from flax_minrnn.models.generate import generate
from flax_minrnn.models.griffin import (Griffin, GriffinCarry, GriffinConfig, RecurrentBlock,
                                        RecurrentState, count_params, griffin_2b_config,
                                        griffin_9b_config)
from flax_minrnn.nn.gates import sqrt_bounded_derivative
from flax_minrnn.nn.rglru import RGLRU
from flax_minrnn.models.lm import LM, LMConfig
from reference import central_difference

generate_lib = importlib.import_module("flax_minrnn.models.generate")
F32 = TOL["float32"]
V = 13


# ----------------------------------------------------------------------------
# Float64 NumPy references (sequential, from the equations).


def _np(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _gelu(x):  # tanh approximation
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _block_diag(x, p):
    heads, k, _ = p["kernel"].shape
    xb = x.reshape(x.shape[:-1] + (heads, k))
    return (np.einsum("...hi,hij->...hj", xb, p["kernel"]) + p["bias"]).reshape(x.shape)


def rglru_ref(p, x, h0=None, reset=None, valid=None, c=8.0):
    """h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t), one row and one step at a time."""
    batch, seq_len, width = x.shape
    h = np.zeros((batch, width)) if h0 is None else np.array(h0, np.float64)
    y = np.zeros_like(x)
    for b in range(batch):
        for t in range(seq_len):
            if valid is not None and not valid[b, t]:
                continue
            r = _sigmoid(_block_diag(x[b, t], p["a_gate"]))
            i = _sigmoid(_block_diag(x[b, t], p["input_gate"]))
            a = np.exp(-c * _softplus(p["a_param"]) * r)
            mult = np.sqrt(1.0 - a ** 2)
            if reset is not None and reset[b, t]:
                h[b], mult = 0.0, 1.0
            h[b] = a * h[b] + mult * i * x[b, t]
            y[b, t] = h[b]
    return h, y


def _dense(x, p):
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def recurrent_block_ref(p, x, starts):
    """gelu(W_y x) * RGLRU(conv(W_x x)), then W_out; documents never mix."""
    y = _gelu(_dense(x, p["linear_y"]))
    u = _dense(x, p["linear_x"])
    w = p["conv_1d"]["kernel"]
    k = w.shape[0]
    conv = np.zeros_like(u)
    for b in range(x.shape[0]):
        doc_start = 0
        for t in range(x.shape[1]):
            if starts[b, t]:
                doc_start = t
            conv[b, t] = p["conv_1d"]["bias"] + sum(
                w[k - 1 - j] * u[b, t - j] for j in range(k) if t - j >= doc_start)
    _, h = rglru_ref(p["rg_lru"], conv, reset=starts)
    return _dense(h * y, p["linear_out"])


def rope_ref(v, pos, rot, theta):
    half = rot // 2
    ang = pos * theta ** (-2.0 * np.arange(half) / rot)
    x1, x2 = v[:half], v[half:rot]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang), v[rot:]])


def attention_ref(p, x, positions, docs, valid, *, heads, kv, window, rot, theta=10000.0):
    """Naive sliding-window attention: query t sees valid keys s <= t of its
    document with positions[s] >= positions[t] - window (itself and ``window``
    earlier tokens, the reference implementation's window)."""
    batch, seq_len, width = x.shape
    hd = width // heads
    q = _dense(x, p["proj_q"]).reshape(batch, seq_len, heads, hd)
    k = _dense(x, p["proj_k"]).reshape(batch, seq_len, kv, hd)
    v = _dense(x, p["proj_v"]).reshape(batch, seq_len, kv, hd)
    out = np.zeros((batch, seq_len, heads, hd))
    for b in range(batch):
        for t in range(seq_len):
            seen = [s for s in range(t + 1) if valid[b, s] and docs[b, s] == docs[b, t]
                    and positions[b, s] >= positions[b, t] - window]
            for h in range(heads):
                g = h // (heads // kv)
                qt = rope_ref(q[b, t, h], positions[b, t], rot, theta)
                logits = np.array([rope_ref(k[b, s, g], positions[b, s], rot, theta) @ qt
                                   for s in seen]) / math.sqrt(hd)
                w = np.exp(logits - logits.max())
                out[b, t, h] = (w / w.sum()) @ v[b, seen, g]
    return _dense(out.reshape(batch, seq_len, width), p["proj_final"])


def rmsnorm_ref(x, p, eps):
    """RecurrentGemma's zero-centred RMSNorm: the factor is 1 + scale_delta."""
    return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * (1.0 + p["scale_delta"])


def griffin_ref(params, tokens, cfg, reset=None):
    """The whole model, float64, from a fresh carry."""
    p = _np(params)
    batch, seq_len = tokens.shape
    emb = p["embedder"]["embedding"]
    # sqrt(hidden_size) rounded to bfloat16 (8 significant bits), as the references do.
    mantissa, exponent = np.frexp(math.sqrt(cfg.hidden_size))
    x = emb[np.asarray(tokens)] * np.ldexp(np.round(mantissa * 256) / 256, exponent)
    starts = np.zeros((batch, seq_len), bool)
    starts[:, 0] = True
    if reset is not None:
        starts |= np.asarray(reset)
    docs = np.cumsum(starts, axis=1)
    positions = np.zeros((batch, seq_len))
    for b in range(batch):
        for t in range(1, seq_len):
            positions[b, t] = 0 if starts[b, t] else positions[b, t - 1] + 1
    for i, kind in enumerate(cfg.layer_types):
        bp = p[f"blocks_{i}"]
        u = rmsnorm_ref(x, bp["temporal_pre_norm"], cfg.rms_norm_eps)
        if kind == "recurrent":
            x = x + recurrent_block_ref(bp["recurrent_block"], u, starts)
        else:
            x = x + attention_ref(bp["attention_block"], u, positions, docs,
                                  np.ones((batch, seq_len), bool),
                                  heads=cfg.num_attention_heads, kv=cfg.num_key_value_heads,
                                  window=cfg.attention_window_size,
                                  rot=int(cfg.head_dim * cfg.partial_rotary_factor),
                                  theta=cfg.rope_theta)
        u = rmsnorm_ref(x, bp["channel_pre_norm"], cfg.rms_norm_eps)
        gate, value = np.split(_dense(u, bp["mlp_block"]["up"]), 2, axis=-1)
        x = x + _dense(_gelu(gate) * value, bp["mlp_block"]["down"])
    x = rmsnorm_ref(x, p["final_norm"], cfg.rms_norm_eps)
    logits = x @ emb.T
    cap = cfg.logits_soft_cap
    return cap * np.tanh(logits / cap) if cap else logits


# ----------------------------------------------------------------------------
# RG-LRU.

B, T, D, HEADS = 2, 13, 8, 2


def _stream(apply, variables, x, bounds, reset=None):
    """Feeds ``x[:, lo:hi]`` for consecutive ``bounds``, carrying the state;
    returns ``(carry, outputs concatenated)``."""
    carry, ys = None, []
    for lo, hi in zip(bounds, bounds[1:]):
        kw = {} if reset is None else {"reset": reset[:, lo:hi]}
        carry, y = apply(variables, x[:, lo:hi], carry, **kw)
        ys.append(y)
    return carry, jnp.concatenate(ys, axis=1)


def _x(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.fixture(scope="module")
def rglru():
    layer = RGLRU(num_heads=HEADS, scan_impl="sequential")
    params = jax.jit(layer.init)(jax.random.key(0), _x((B, T, D)))
    return layer, params


def test_sqrt_derivative_is_bounded():
    grad = jax.vmap(jax.grad(sqrt_bounded_derivative))
    x = jnp.asarray([1.0, 0.25, 1e-6, 1e-8, 0.0], jnp.float32)
    np.testing.assert_allclose(sqrt_bounded_derivative(x), np.sqrt(np.asarray(x)), **F32)
    # Exact above 1 / (4 * 1000^2) = 2.5e-7, clipped at 1000 below.
    with np.errstate(divide="ignore"):
        want = np.minimum(0.5 / np.sqrt(np.asarray(x, np.float64)), 1000.0)
    np.testing.assert_allclose(grad(x), want, **F32)


def test_lambda_init_gives_a_in_the_published_range(rglru):
    _, params = rglru
    lam = np.asarray(params["params"]["a_param"], np.float64)
    a = np.exp(-_softplus(lam))
    assert a.shape == (D,) and np.all(a >= 0.9 - 1e-7) and np.all(a <= 0.999 + 1e-7)
    big = RGLRU(num_heads=64).init(jax.random.key(1), _x((1, 1, 4096)))["params"]["a_param"]
    a = np.exp(-_softplus(np.asarray(big, np.float64)))
    assert 0.9 - 1e-7 <= a.min() < 0.91 and 0.998 < a.max() <= 0.999 + 1e-7


@pytest.mark.parametrize("impl", ["associative", "sequential", "chunked"])
def test_rglru_matches_reference_every_scan_impl(rglru, impl):
    layer, params = rglru
    x, h0 = _x((B, T, D), 1), _x((B, D), 2)
    carry, y = jax.jit(layer.clone(scan_impl=impl).apply)(params, x, h0)
    ref_h, ref_y = rglru_ref(_np(params["params"]), _np(x), _np(h0))
    np.testing.assert_allclose(y, ref_y, **F32)
    np.testing.assert_allclose(carry, ref_h, **F32)
    assert carry.dtype == jnp.float32 and y.dtype == jnp.float32


def test_rglru_token_by_token_and_chunks_equal_full(rglru):
    layer, params = rglru
    x = _x((B, T, D), 3)

    @jax.jit
    def run(x):
        return layer.apply(params, x), {
            "tokens": _stream(layer.apply, params, x, range(T + 1)),
            "chunks": _stream(layer.apply, params, x, (0, 1, 5, 6, 11, T))}

    (carry, y), outs = run(x)
    for name, (c, ys) in outs.items():
        np.testing.assert_allclose(ys, y, **F32, err_msg=name)
        np.testing.assert_allclose(c, carry, **F32, err_msg=name)


def test_rglru_uses_one_scan_call_for_every_length(rglru, monkeypatch):
    layer, params = rglru
    calls = []
    original = scan_lib.linear_scan

    def counted(*args, **kwargs):
        calls.append(args[0].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(scan_lib, "linear_scan", counted)
    for seq_len in (1, 4):
        layer.apply(params, _x((B, seq_len, D)))
    assert calls == [1, 4]


def test_rglru_resets_equal_separate_documents(rglru):
    layer, params = rglru
    x, h0 = _x((1, T, D), 4), _x((1, D), 5)
    starts = [0, 4, 9]
    reset = np.zeros((1, T), bool)
    reset[0, starts] = True
    carry, y = layer.apply(params, x, h0, reset=jnp.asarray(reset))
    ref_h, ref_y = rglru_ref(_np(params["params"]), _np(x), _np(h0), reset=reset)
    np.testing.assert_allclose(y, ref_y, **F32)
    np.testing.assert_allclose(carry, ref_h, **F32)
    for lo, hi in zip(starts, starts[1:] + [T]):
        first = jnp.zeros((1, hi - lo), bool).at[0, 0].set(True)
        c_doc, y_doc = layer.apply(params, x[:, lo:hi], reset=first)  # from zeros
        np.testing.assert_allclose(y[:, lo:hi], y_doc, **F32)
    np.testing.assert_allclose(carry, c_doc, **F32)


def test_rglru_padding_keeps_the_state_and_zeroes_outputs(rglru):
    layer, params = rglru
    x, h0 = _x((B, T, D), 6), _x((B, D), 7)
    lengths = np.asarray([T, 5])
    carry, y = layer.apply(params, x, h0, seq_lengths=jnp.asarray(lengths, jnp.int32))
    valid = np.arange(T)[None, :] < lengths[:, None]
    ref_h, ref_y = rglru_ref(_np(params["params"]), _np(x), _np(h0), valid=valid)
    np.testing.assert_allclose(y, ref_y, **F32)
    np.testing.assert_allclose(carry, ref_h, **F32)
    assert np.all(np.asarray(y)[1, 5:] == 0)


def test_rglru_gradients_match_central_differences_of_the_reference():
    layer = RGLRU(num_heads=2, scan_impl="associative")
    x, h0 = _x((1, 5, 4), 8), _x((1, 4), 9)
    params = layer.init(jax.random.key(3), x)["params"]
    rng = np.random.default_rng(1)
    g_c, g_y = rng.normal(size=(1, 4)), rng.normal(size=(1, 5, 4))

    def loss(p, xx, hh):
        c, y = layer.apply({"params": p}, xx, hh)
        return jnp.sum(y * g_y.astype(np.float32)) + jnp.sum(c * g_c.astype(np.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, h0)
    p64 = _np(params)
    inputs = {"x": _np(x), "h0": _np(h0), "a_param": p64["a_param"],
              "a_gate": p64["a_gate"]["kernel"], "input_gate": p64["input_gate"]["kernel"]}

    def ref_loss():
        h, y = rglru_ref(p64, inputs["x"], inputs["h0"])
        return np.sum(y * g_y) + np.sum(h * g_c)

    got = {"x": grads[1], "h0": grads[2], "a_param": grads[0]["a_param"],
           "a_gate": grads[0]["a_gate"]["kernel"],
           "input_gate": grads[0]["input_gate"]["kernel"]}
    for key, value in got.items():
        np.testing.assert_allclose(value, central_difference(ref_loss, inputs[key]), **F32,
                                   err_msg=key)


def test_rglru_bfloat16_gradients_finite_near_and_at_a_equal_one(monkeypatch):
    """Lambda = -20: 1 - a_t^2 ~ 1e-8 (the bound is active); Lambda = -110:
    softplus underflows to 0, a_t = 1 and 1 - a_t^2 = 0 where d sqrt is infinite."""
    layer = RGLRU(num_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = _x((2, 6, 4), 10).astype(jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)["params"]
    params["a_param"] = jnp.asarray([-20.0, -110.0, -20.0, -110.0], jnp.bfloat16)

    def grads():
        def loss(p, xx):
            c, y = layer.apply({"params": p}, xx)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(c)
        return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))

    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads())
    # The unbounded square root is not finite there: the bound is what helps.
    monkeypatch.setattr(gates_lib, "sqrt_bounded_derivative", lambda v, m: jnp.sqrt(v))
    assert not all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads())


def test_rglru_errors(rglru):
    layer, params = rglru
    with pytest.raises(ValueError, match="num_heads"):
        RGLRU(num_heads=3).init(jax.random.key(0), _x((1, 2, 8)))
    with pytest.raises(ValueError, match="scan_impl"):
        RGLRU(scan_impl="log").init(jax.random.key(0), _x((1, 2, 8)))
    with pytest.raises(ValueError, match="carry"):
        layer.apply(params, _x((B, 2, D)), jnp.zeros((B, D + 1), jnp.float32))
    with pytest.raises(ValueError, match=rf"x has {D + 4} features but .*\(a_param\) expect {D}"):
        layer.apply(params, _x((B, 2, D + 4)))
    with pytest.raises(TypeError, match="param_dtype must be a floating-point dtype.*int32"):
        RGLRU(num_heads=2, param_dtype=jnp.int32).init(jax.random.key(0), _x((1, 2, 8)))


# ----------------------------------------------------------------------------
# Recurrent block and local attention against the references.


def test_recurrent_block_matches_reference_and_streams():
    block = RecurrentBlock(lru_width=8, num_heads=2, conv1d_width=3, scan_impl="chunked")
    x = _x((2, 9, 6), 11)
    reset = np.zeros((2, 9), bool)
    reset[:, 0] = True
    reset[1, 4] = True

    @jax.jit
    def run(x, reset):
        params = block.init(jax.random.key(0), x)
        return (params, block.apply(params, x, reset=reset),
                _stream(block.apply, params, x, (0, 2, 3, 7, 9), reset))

    params, (state, y), (state2, y2) = run(x, jnp.asarray(reset))
    assert isinstance(state, RecurrentState) and state.conv.shape == (2, 2, 8)
    ref = recurrent_block_ref(_np(params["params"]), _np(x), reset)
    np.testing.assert_allclose(y, ref, **F32)
    np.testing.assert_allclose(y2, y, **F32)
    for a, b in zip(state2, state):
        np.testing.assert_allclose(a, b, **F32)


def test_recurrent_block_float64_input_with_the_default_dtype():
    """dtype=None computes in the input's dtype, so its carry is float64 too."""
    with jax.enable_x64(True):
        block = RecurrentBlock(lru_width=8, num_heads=2, conv1d_width=3)
        x = jnp.asarray(_x((2, 9, 6), 12), jnp.float64)
        params = block.init(jax.random.key(0), x)
        state, y = block.apply(params, x)
        assert y.dtype == state.conv.dtype == state.rg_lru.dtype == jnp.float64
        ref = recurrent_block_ref(_np(params["params"]), np.asarray(x), np.zeros((2, 9), bool))
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
        state2, y2 = _stream(block.apply, params, x, (0, 4, 9), None)
        np.testing.assert_allclose(y2, y, rtol=1e-13, atol=1e-13)


ATT = dict(num_heads=4, num_kv_heads=2, window=3)


def _attention_ref(params, x, positions, docs, valid):
    return attention_ref(_np(params["params"]), _np(x), positions, docs, valid,
                         heads=4, kv=2, window=3, rot=2)


def test_local_attention_matches_naive_reference_chunked_and_with_resets():
    attn = LocalAttention(**ATT)
    x = _x((2, 10, 16), 12)
    reset = np.zeros((2, 10), bool)
    reset[1, 6] = True  # row 1: documents [0, 6) and [6, 10)

    @jax.jit
    def run(x, reset):
        params = attn.init(jax.random.key(0), x)
        return (params, attn.apply(params, x, reset=reset),
                _stream(attn.apply, params, x, (0, 4, 5, 9, 10), reset))

    params, (cache, y), (cache2, y2) = run(x, jnp.asarray(reset))
    positions = np.tile(np.arange(10.0), (2, 1))
    positions[1, 6:] -= 6
    docs = np.cumsum(reset, axis=1)
    ref = _attention_ref(params, x, positions, docs, np.ones((2, 10), bool))
    np.testing.assert_allclose(y, ref, **F32)
    np.testing.assert_allclose(y2, y, **F32)
    # Ring buffer: slot p mod 3 holds position p; row 1 only its last document.
    assert np.asarray(cache.positions).tolist() == [[9, 7, 8], [3, 1, 2]]
    for a, b in zip(cache2, cache):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **F32)


def test_rope_in_float64_matches_reference_at_far_positions():
    """float64 inputs get float64 angles: exact to rounding at position
    10**5, where a float32 angle is off by about 4e-3 rad."""
    from flax_minrnn.nn.attention import apply_rope
    rng = np.random.default_rng(0)
    positions = np.array([[0, 7, 12_345, 100_003]])
    x = rng.normal(size=(1, 4, 2, 8))  # (batch, time, heads, head_dim)
    with jax.enable_x64(True):
        got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions, jnp.int32),
                                    rot=6, base=10000.0))
    assert got.dtype == np.float64
    want = np.stack([[rope_ref(x[0, t, h], positions[0, t], 6, 10000.0) for h in range(2)]
                     for t in range(4)])[None]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_local_attention_qkv_bias_matches_reference():
    """attention_bias (Hugging Face): q, k, v biases, here non-zero."""
    attn = LocalAttention(**ATT, qkv_bias=True)
    x = _x((2, 8, 16), 15)
    params = attn.init(jax.random.key(0), x)
    keys = iter(jax.random.split(jax.random.key(1), 8))
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + jax.random.normal(next(keys), v.shape)
        if "bias" in str(path) else v, params)
    assert all("bias" in params["params"][n] for n in ("proj_q", "proj_k", "proj_v"))
    _, y = attn.apply(params, x)
    ref = _attention_ref(params, x, np.tile(np.arange(8.0), (2, 1)), np.zeros((2, 8)),
                         np.ones((2, 8), bool))
    np.testing.assert_allclose(y, ref, **F32)


def test_local_attention_padding_caches_only_valid_tokens():
    attn = LocalAttention(**ATT)
    x, more = _x((2, 7, 16), 13), _x((2, 2, 16), 14)
    lengths = np.asarray([7, 4])

    @jax.jit
    def run(x, more):
        params = attn.init(jax.random.key(0), x)
        cache, y = attn.apply(params, x, seq_lengths=jnp.asarray(lengths, jnp.int32))
        _, y_more = attn.apply(params, more, cache)
        alone = attn.apply(params, x[1:, :4])
        _, alone_more = attn.apply(params, more[1:], alone[0])
        return params, cache, y, y_more, alone, alone_more

    params, cache, y, y_more, (alone_cache, alone_y), alone_more = run(x, more)
    assert np.asarray(cache.positions).tolist() == [[6, 4, 5], [3, 1, 2]]
    _close_trees(jax.tree.map(lambda v: v[1:], cache), alone_cache)
    np.testing.assert_allclose(y[1, :4], alone_y[0], **F32)
    np.testing.assert_allclose(y_more[1], alone_more[0], **F32)
    # The continuation against the reference on the whole row-1 sequence.
    seq = jnp.concatenate([x[1:, :4], more[1:]], axis=1)
    ref = _attention_ref(params, seq, np.arange(6.0)[None], np.zeros((1, 6)), np.ones((1, 6)))
    np.testing.assert_allclose(y_more[1], ref[0, 4:], **F32)


# ----------------------------------------------------------------------------
# The hybrid LM.

CFG = dict(vocab_size=V, num_hidden_layers=3, hidden_size=16, intermediate_size=32,
           num_attention_heads=2, num_key_value_heads=1, attention_window_size=4,
           conv1d_width=3, logits_soft_cap=5.0)


def _cfg(**kw):
    return GriffinConfig(**{**CFG, **kw})


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


@pytest.fixture(scope="module")
def lm():
    model = Griffin(_cfg())
    params = jax.jit(model.init)(jax.random.key(0), _tokens(1, 4))["params"]
    return model, params


def _decode(model, variables, carry, tokens, reset=None):
    """Feeds ``tokens`` one at a time (a ``lax.scan``: one model copy in the graph)."""
    reset = jnp.zeros(tokens.shape, bool) if reset is None else reset
    carry = model.initialize_carry(tokens.shape[0]) if carry is None else carry

    def step(carry, inputs):
        tok, res = inputs
        carry, logits = model.apply(variables, tok[:, None], carry, reset=res[:, None])
        return carry, logits[:, 0]

    carry, logits = jax.lax.scan(step, carry, (tokens.T, reset.T))
    return carry, jnp.swapaxes(logits, 0, 1)


def _close_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **F32)


def test_padding_may_hold_any_id_eagerly_and_under_jit(lm):
    """Padded steps may hold ids outside the vocabulary (their embeddings
    would be NaN): valid logits equal the clean ones, with and without jit,
    for right padding and for a left-padded attention_mask."""
    model, params = lm
    variables = {"params": params}
    tokens = _tokens(2, 8, seed=21)
    lengths = jnp.asarray([8, 5], jnp.int32)
    bad = tokens.at[1, 5:].set(V + 3)
    for run in (model.apply, jax.jit(model.apply)):  # Bit-equal within one executable.
        _, clean = run(variables, tokens, seq_lengths=lengths)
        _, got = run(variables, bad, seq_lengths=lengths)
        np.testing.assert_array_equal(np.asarray(got[1, :5]), np.asarray(clean[1, :5]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(clean[0]))
    mask = jnp.asarray([[True] * 8, [False] * 3 + [True] * 5])
    left = jnp.concatenate([jnp.full((1, 3), -7, jnp.int32), tokens[1:, :5]], axis=1)
    _, got = model.apply(variables, jnp.concatenate([tokens[:1], left]), attention_mask=mask)
    np.testing.assert_allclose(np.asarray(got[1, 3:]), np.asarray(clean[1, :5]), **F32)
    with pytest.raises(ValueError, match="vocab_size"):  # Valid steps are still checked.
        model.apply(variables, bad, seq_lengths=jnp.asarray([8, 6], jnp.int32))


def test_griffin_matches_float64_reference_with_resets(lm):
    model, params = lm
    # Non-zero norm deltas (they start at zero), so the 1 + delta factor is tested.
    keys = iter(jax.random.split(jax.random.key(9), 16))
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.3 * jax.random.normal(next(keys), v.shape)
        if "scale_delta" in str(path) else v, params)
    tokens = _tokens(2, 11, seed=1)
    reset = np.zeros((2, 11), bool)
    reset[1, 5] = True
    _, logits = jax.jit(model.apply)({"params": params}, tokens, reset=jnp.asarray(reset))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 11, V)
    np.testing.assert_allclose(logits, griffin_ref(params, tokens, model.config, reset), **F32)
    assert np.abs(np.asarray(logits)).max() < 5.0  # soft cap


def test_prefill_then_decode_equals_full_forward_across_the_window(lm):
    """T = 14 > 3 windows; rows prefilled to different lengths, then one token at a time."""
    model, params = lm
    seq = _tokens(2, 14, seed=2)
    lengths = (5, 2)
    steps = 9  # row 0 decodes positions 5..13, row 1 positions 2..10

    @jax.jit
    def run(seq):
        variables = {"params": params}
        full_carry, full = model.apply(variables, seq)
        prompt = seq[:, :5]
        carry, out = model.apply(variables, prompt, None,
                                 seq_lengths=jnp.asarray(lengths, jnp.int32))
        feed = jnp.stack([seq[b, n:n + steps] for b, n in enumerate(lengths)])
        carry, decoded = _decode(model, variables, carry, feed)
        # Row 0 decodes to the end of seq: its carry equals the full forward's.
        return full_carry, full, out, carry, decoded

    full_carry, full, out, carry, decoded = run(seq)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b, :n], full[b, :n], **F32)
        np.testing.assert_allclose(decoded[b], full[b, n:n + steps], **F32)
    assert carry.position.tolist() == [5 + steps, 2 + steps] and isinstance(carry, GriffinCarry)
    _close_trees(jax.tree.map(lambda v: v[:1], carry), jax.tree.map(lambda v: v[:1], full_carry))


def test_chunked_and_token_by_token_with_resets_equal_separate_documents(lm):
    model, params = lm
    tokens = _tokens(2, 13, seed=3)
    reset = np.zeros((2, 13), bool)
    reset[0, 6] = reset[1, 3] = reset[1, 11] = True

    pieces = [(0, 0, 6), (0, 6, 13), (1, 0, 3), (1, 3, 11), (1, 11, 13)]
    # Every document alone, as one right-padded batch.
    docs = np.zeros((len(pieces), 8), np.int32)
    for i, (b, lo, hi) in enumerate(pieces):
        docs[i, :hi - lo] = np.asarray(tokens)[b, lo:hi]

    @jax.jit
    def run(tokens, reset, docs):
        variables = {"params": params}
        full = model.apply(variables, tokens, reset=reset)
        streams = {"tokens": _decode(model, variables, None, tokens, reset),
                   "chunks": _stream(model.apply, variables, tokens, (0, 2, 8, 13), reset)}
        lengths = jnp.asarray([hi - lo for _, lo, hi in pieces], jnp.int32)
        return full, streams, model.apply(variables, docs, seq_lengths=lengths)

    (carry, full), streams, (doc_carry, doc_out) = run(tokens, jnp.asarray(reset), docs)
    for name, (c, out) in streams.items():
        np.testing.assert_allclose(out, full, **F32, err_msg=name)
        _close_trees(c, carry)
    for i, (b, lo, hi) in enumerate(pieces):
        np.testing.assert_allclose(full[b, lo:hi], doc_out[i, :hi - lo], **F32)
    # The carry after the last document equals that document's own carry.
    _close_trees(jax.tree.map(lambda v: v[1:], carry), jax.tree.map(lambda v: v[4:], doc_carry))


def test_causality(lm):
    model, params = lm
    tokens = _tokens(2, 12, seed=4)
    cuts = (0, 5, 9)

    @jax.jit
    def run(tokens):
        outs = [model.apply({"params": params}, tokens)[1]]
        for t in cuts:
            changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % V)
            outs.append(model.apply({"params": params}, changed)[1])
        return outs

    ref, *outs = run(tokens)
    for t, out in zip(cuts, outs):
        np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(ref[:, :t + 1]))
        assert not np.allclose(out[:, t + 1:], ref[:, t + 1:])


def test_generate_greedy_far_past_the_window_and_decode_traced_once(lm, monkeypatch):
    model, params = lm
    counted = chex.assert_max_traces(generate_lib._decode_step, n=1)
    monkeypatch.setattr(generate_lib, "_decode_step", counted)
    prompt = jnp.asarray([[3, 1, 4], [5, 0, 0]], jnp.int32)
    lengths = jnp.asarray([3, 1], jnp.int32)
    n = 14  # 3.5 windows
    out = generate(model, params, prompt, n, rng=jax.random.key(0), prompt_lengths=lengths,
                   temperature=0.0)
    generate(model, params, prompt, n, rng=jax.random.key(1), prompt_lengths=lengths,
             temperature=0.7)  # new seed and temperature: no retrace
    chex.clear_trace_counter()
    apply = jax.jit(model.apply)
    for b, L in enumerate(lengths.tolist()):
        seq = prompt[b, :L].tolist()
        for _ in range(n):  # repeated full forwards in a fixed-width buffer
            _, logits = apply({"params": params}, jnp.asarray([seq + [0] * (20 - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert out.tokens[b].tolist() == seq[L:]


def test_bfloat16_model_trains_with_float32_states_and_logits():
    model = Griffin(_cfg(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, num_hidden_layers=2,
                         block_types=("recurrent", "attention")))
    tokens = _tokens(2, 9, seed=5)

    @jax.jit
    def run(tokens):
        params = model.init(jax.random.key(0), tokens)["params"]

        def loss(p):
            _, logits = model.apply({"params": p}, tokens)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        carry, logits = model.apply({"params": params}, tokens)
        return carry, logits, jax.grad(loss)(params)

    carry, logits, grads = run(tokens)
    assert logits.dtype == jnp.float32 and carry.blocks[0].rg_lru.dtype == jnp.float32
    assert carry.blocks[1].keys.dtype == jnp.bfloat16
    # The same parameters, upcast, in a float32 model: logits and gradients
    # agree to bfloat16's precision.
    f32 = Griffin(_cfg(dtype=jnp.float32, param_dtype=jnp.float32, num_hidden_layers=2,
                       block_types=("recurrent", "attention")))
    params = jax.tree.map(lambda p: p.astype(jnp.float32),
                          jax.jit(model.init)(jax.random.key(0), tokens)["params"])

    def loss32(p):
        _, out = f32.apply({"params": p}, tokens)
        return -jnp.mean(jax.nn.log_softmax(out)[..., 0])

    ref_logits = jax.jit(f32.apply)({"params": params}, tokens)[1]
    ref_grads = jax.jit(jax.grad(loss32))(params)
    np.testing.assert_allclose(logits, ref_logits,
                               rtol=2e-2, atol=2e-2 * float(np.abs(ref_logits).max()))
    # The gradients pass through both blocks twice in bfloat16, so they get
    # the wider of the project's bfloat16 tolerances (3e-2, as the layers').
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), r,
                                   rtol=3e-2, atol=3e-2 * float(np.abs(r).max()))


def test_carry_structure_and_errors(lm):
    model, params = lm
    carry = model.initialize_carry(2)
    assert [type(s) for s in carry.blocks] == [RecurrentState, RecurrentState, AttentionState]
    assert carry.blocks[0].rg_lru.shape == (2, 16) and carry.blocks[0].conv.shape == (2, 2, 16)
    assert carry.blocks[2].keys.shape == (2, 4, 1, 8)
    assert np.all(np.asarray(carry.blocks[2].positions) == -1)
    variables = {"params": params}
    with pytest.raises(ValueError, match="carry"):
        model.apply(variables, _tokens(1, 2), Griffin(_cfg(num_hidden_layers=2))
                    .initialize_carry(1))
    with pytest.raises(ValueError, match=r"carry.blocks\[0\].rg_lru has shape \(2, 16\)"):
        model.apply(variables, _tokens(1, 2), carry)  # batch 2 for 1 row
    # A wrong dtype is an error naming the leaf, never a cast.
    bad_state = carry._replace(blocks=(carry.blocks[0]._replace(
        rg_lru=carry.blocks[0].rg_lru.astype(jnp.int32)),) + carry.blocks[1:])
    with pytest.raises(TypeError, match=r"carry.blocks\[0\].rg_lru has dtype int32, "
                                        "expected float32"):
        model.apply(variables, _tokens(2, 2), bad_state)
    with pytest.raises(TypeError, match="carry.position has dtype float32, expected int32"):
        model.apply(variables, _tokens(2, 2),
                    carry._replace(position=carry.position.astype(jnp.float32) + 0.9))
    with pytest.raises(ValueError, match="vocab_size"):
        model.apply(variables, jnp.asarray([[0, V]], jnp.int32))


@pytest.mark.parametrize("kw", [
    dict(), dict(lru_width=24, num_key_value_heads=2, conv1d_width=1),
    dict(block_types=("attention",), num_hidden_layers=2, logits_soft_cap=None),
    dict(attention_bias=True, num_key_value_heads=2),
])
def test_param_count_closed_form_small(kw):
    cfg = _cfg(**kw)
    shapes = jax.eval_shape(Griffin(cfg).init, jax.random.key(0), _tokens(1, 2))
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == count_params(cfg)


@pytest.mark.parametrize("preset,total,embedding", [
    (griffin_2b_config, 2_682_862_080, 655_360_000),
    (griffin_9b_config, 8_579_977_216, 1_048_576_000),
])
def test_presets_build_abstractly_with_the_closed_form_count(preset, total, embedding):
    cfg = preset()
    shapes = jax.eval_shape(Griffin(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 2), jnp.int32))
    counted = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    print(f"{preset.__name__}: {counted:,} parameters "
          f"({counted - embedding:,} without the embedding)")
    assert counted == count_params(cfg) == total
    with pytest.raises(TypeError, match="config must be a GriffinConfig, got dict"):
        count_params({"hidden_size": 1})
    assert cfg.mlp_width == 3 * cfg.hidden_size and cfg.head_dim == 256
    # Published: "2B non-embedding parameters" (RecurrentGemma, arXiv 2404.07839);
    # the 9B model's name; loose checks only.
    if preset is griffin_2b_config:
        assert 1.95e9 < counted - embedding < 2.1e9
    else:
        assert 8.5e9 < counted < 9.5e9
    # An lru_width equal to hidden_size is spelled None, so the Hugging Face
    # round trip gives an equal config.
    assert cfg.lru_width is None and cfg.state_width == cfg.hidden_size
    from flax_minrnn.compat import hf
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("kw,field", [
    (dict(attention_window_size=0), "attention_window_size"),
    (dict(block_types=("recurrent", "mlp")), "block_types"),
    (dict(block_types=()), "block_types"),
    (dict(block_types="recurrent"), "block_types"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(lru_width=17), "lru_width"),
    (dict(num_key_value_heads=3, num_attention_heads=4), "num_key_value_heads"),
    (dict(intermediate_size=33), "intermediate_size"),
    (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
    (dict(conv1d_width=0), "conv1d_width"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (dict(scan_impl="log"), "scan_impl"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(hidden_activation="relu"), "hidden_activation"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(attention_bias=1), "attention_bias"),
    (dict(pad_token_id=V), "pad_token_id"),
    (dict(bos_token_id=-1), "bos_token_id"),
    (dict(eos_token_id=(1, V)), r"eos_token_id\[1\]"),
    (dict(eos_token_id=()), "eos_token_id"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        _cfg(**kw)


@pytest.mark.parametrize("field,value", [("dtype", jnp.int32), ("param_dtype", "float17")])
def test_config_dtypes_must_be_floating(field, value):
    with pytest.raises(TypeError, match=f"^{field} must be a floating-point dtype"):
        _cfg(**{field: value})


# ----------------------------------------------------------------------------
# 'rglru' in the general LM, and the trainer.


def test_lm_rglru_prefill_then_decode_equals_full_forward():
    cfg = LMConfig(vocab_size=V, time_mixing="rglru", rglru_num_heads=2, n_layer=2, d_model=8,
                   d_channel_mixing=12, conv_width=3, positional_encoding="sinusoidal")
    model = LM(cfg)
    tokens = _tokens(2, 7, seed=6)

    @jax.jit
    def run(tokens):
        variables = model.init(jax.random.key(0), tokens)
        return model.apply(variables, tokens), _stream(model.apply, variables, tokens,
                                                       (0, 3, 4, 5, 6, 7))

    (full_carry, full), (carry, streamed) = run(tokens)
    np.testing.assert_allclose(streamed, full, **F32)
    _close_trees(carry, full_carry)
    assert carry.layers[0].shape == (2, 8)
    # A document after a reset is computed as the same document started
    # fresh (the RG-LRU's first step has no sqrt(1 - a^2) input scale).
    variables = model.init(jax.random.key(0), tokens)
    reset = jnp.zeros((2, 7), bool).at[:, 3].set(True)
    _, packed = model.apply(variables, tokens, reset=reset)
    _, fresh = model.apply(variables, tokens[:, 3:])
    np.testing.assert_allclose(packed[:, 3:], fresh, **F32)
    for kw, field in ((dict(d_h=4), "d_h"), (dict(rglru_num_heads=3), "rglru_num_heads"),
                      (dict(use_true_recurrence=True), "use_true_recurrence"),
                      (dict(scan_impl="heinsen"), "scan_impl")):
        with pytest.raises(ValueError, match=field):
            LMConfig(vocab_size=V, time_mixing="rglru", d_model=8, **kw)


REPO = pathlib.Path(__file__).resolve().parents[1]
GRIFFIN_CONFIG = str(REPO / "configs" / "griffin_shakespeare.py")


def test_trainer_config_translation_and_errors():
    config = config_lib.load_config(GRIFFIN_CONFIG, ["model.griffin.block_types=recurrent, "
                                                     "attention", "model.dtype=bfloat16"])
    model = train.build_model(config, 65)
    assert isinstance(model, Griffin)
    cfg = model.config
    assert cfg.block_types == ("recurrent", "attention") and cfg.lru_width is None
    assert cfg.final_w_init_variance_scale is None and cfg.dtype == jnp.bfloat16
    assert cfg.vocab_size == 65 and cfg.mlp_width == 384
    assert isinstance(train.build_model(config_lib.load_config(
        str(REPO / "configs" / "shakespeare.py")), 65), LM)
    for override, field in (("model.griffin.block_types=recurrent,conv", "block_types"),
                            ("model.griffin.attention_window_size=0", "attention_window_size"),
                            ("model.griffin.num_attention_heads=3", "num_attention_heads")):
        bad = config_lib.apply_overrides(config, [override])
        with pytest.raises(config_lib.ConfigError, match=field):
            train.build_model(bad, 65)
    with pytest.raises(config_lib.ConfigError, match="model.griffin.hidden"):
        config_lib.apply_overrides(config, ["model.griffin.hidden=3"])
    with pytest.raises(config_lib.ConfigError, match="architecture"):
        config_lib.apply_overrides(config, ["model.architecture=mamba"])


def test_load_run_rebuilds_a_griffin_run(monkeypatch):
    config = config_lib.shrink(config_lib.load_config(GRIFFIN_CONFIG))
    meta = {"config": config_lib.config_to_json(config), "vocab": None, "vocab_size": 65}
    monkeypatch.setattr(train.ckpt_lib, "load_params", lambda directory: ({"w": 1}, meta))
    model, params, vocab, loaded = train.load_run("/nonexistent")
    assert isinstance(model, Griffin) and params == {"w": 1} and vocab is None
    assert model.config == train.griffin_config(config, 65)
    assert loaded.model.architecture == "griffin" and model.config.hidden_size == 16


@pytest.mark.slow
def test_trained_griffin_run_evaluates_and_generates(tmp_path):
    config = config_lib.apply_overrides(
        config_lib.shrink(config_lib.load_config(GRIFFIN_CONFIG)),
        ["train.num_steps=1", "train.sample_length=3"])
    workdir = str(tmp_path / "run")
    metrics = train.train_and_evaluate(config, workdir)
    assert metrics["step"] == 1 and np.isfinite(metrics["eval_loss"])
    model, _, _, _ = train.load_run(workdir)
    assert isinstance(model, Griffin) and model.config.hidden_size == 16
    assert train.evaluate(workdir)["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    text = train.generate_text(workdir, "RO", max_new_tokens=3, temperature=0.0)
    assert text.startswith("RO") and len(text) == 5
