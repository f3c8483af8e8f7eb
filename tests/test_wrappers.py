"""RNNCell (nn.RNN / nn.Bidirectional), Bidirectional and Stack."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM
from flax_minrnn.nn.wrappers import Bidirectional, RNNCell, Stack
from jit_helpers import jit_apply as _apply, jit_init as _init

B, T, D = 3, 6, 4
LENGTHS = np.array([6, 3, 1], np.int32)
TOL = dict(rtol=1e-5, atol=1e-6)

LAYERS = {
    "mingru": lambda **kw: MinGRU(d_h=5, **kw),
    "minlstm_true": lambda **kw: MinLSTM(d_h=5, d_model=3, use_true_recurrence=True, **kw),
    "glrnn_untied": lambda **kw: GatedLinearRNN(d_h=5, use_tied_gates=False, **kw),
}


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _valid(lengths, seq_len=T):
    return np.arange(seq_len)[None, :] < lengths[:, None]


def _perturb(params, seed=11):
    """Non-zero recurrent kernels, so true-recurrence tests are meaningful."""
    def f(path, leaf):
        if path[-1].key == "recurrent_kernel":
            return 0.3 * jax.random.normal(jax.random.PRNGKey(seed), leaf.shape, leaf.dtype)
        return leaf
    return jax.tree_util.tree_map_with_path(f, params)


# ----------------------------------------------------------------------------
# RNNCell


@pytest.mark.parametrize("name", list(LAYERS))
def test_rnn_cell_matches_layer(name):
    x = _x()
    layer = LAYERS[name]()
    rnn = nn.RNN(RNNCell(layer), return_carry=True)
    variables = _perturb(_init(rnn, jax.random.PRNGKey(1), x))
    layer_params = {"params": variables["params"]["cell"]["rnn"]}
    h0 = jax.random.uniform(jax.random.PRNGKey(2), (B, 5), jnp.float32, -1.0, 1.0)

    c_ref, y_ref = _apply(layer, layer_params, x, h0)
    c, y = _apply(rnn, variables, x, initial_carry=h0)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(c, c_ref, **TOL)

    # seq_lengths: nn.RNN keeps the last valid carry; it does not zero padded
    # outputs, so compare the valid steps only.
    lengths = jnp.asarray(LENGTHS)
    c_ref, y_ref = _apply(layer, layer_params, x, seq_lengths=lengths)
    c, y = _apply(rnn, variables, x, seq_lengths=lengths)
    np.testing.assert_allclose(c, c_ref, **TOL)
    valid = _valid(LENGTHS)
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], **TOL)


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_rnn_cell_float64_layer_matches_the_layer(field):
    with jax.enable_x64(True):
        layer = MinGRU(d_h=5, **{field: jnp.float64})
        x = jnp.asarray(_x(), jnp.float64)
        rnn = nn.RNN(RNNCell(layer), return_carry=True)
        variables = rnn.init(jax.random.PRNGKey(1), x)
        c, y = rnn.apply(variables, x)
        c_ref, y_ref = layer.apply({"params": variables["params"]["cell"]["rnn"]}, x)
        assert c.dtype == y.dtype == jnp.float64
        np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(c, c_ref, rtol=1e-13, atol=1e-13)


def test_rnn_cell_carry_and_errors():
    cell = RNNCell(MinGRU(d_h=7))
    c = cell.initialize_carry(jax.random.PRNGKey(0), (2, 3))
    assert c.shape == (2, 7) and c.dtype == jnp.float32 and not np.any(np.asarray(c))
    assert cell.num_feature_axes == 1
    with pytest.raises(ValueError, match="input_shape"):
        cell.initialize_carry(jax.random.PRNGKey(0), (2, 4, 3))
    with pytest.raises(TypeError, match="layer must be a flax_minrnn layer"):
        RNNCell(nn.Dense(3)).initialize_carry(jax.random.PRNGKey(0), (2, 3))
    with pytest.raises(ValueError, match=r"one time\s+step"):
        cell.init(jax.random.PRNGKey(0), c, _x())


def test_flax_bidirectional_matches_ours():
    """nn.Bidirectional over RNNCells == our Bidirectional with the same weights."""
    x = _x()
    lengths = jnp.asarray(LENGTHS)
    flax_bi = nn.Bidirectional(nn.RNN(RNNCell(MinGRU(d_h=5))),
                               nn.RNN(RNNCell(MinLSTM(d_h=5))), return_carry=True)
    variables = _init(flax_bi, jax.random.PRNGKey(1), x)
    p = variables["params"]
    ours = Bidirectional(MinGRU(d_h=5), MinLSTM(d_h=5))
    our_vars = {"params": {"fwd": p["forward_rnn"]["cell"]["rnn"],
                           "bwd": p["backward_rnn"]["cell"]["rnn"]}}
    for kw in ({}, {"seq_lengths": lengths}):
        (cf_ref, cb_ref), y_ref = _apply(flax_bi, variables, x, **kw)
        (cf, cb), y = _apply(ours, our_vars, x, **kw)
        np.testing.assert_allclose(cf, cf_ref, **TOL)
        np.testing.assert_allclose(cb, cb_ref, **TOL)
        valid = _valid(LENGTHS) if kw else np.ones((B, T), bool)
        np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], **TOL)


# ----------------------------------------------------------------------------
# Bidirectional


def test_bidirectional_is_time_aligned():
    x = _x()
    fwd, bwd = MinGRU(d_h=5, d_model=3), GatedLinearRNN(d_h=6, d_model=3)
    bi = Bidirectional(fwd, bwd)  # bwd has reverse=False: cloned with reverse=True
    variables = _init(bi, jax.random.PRNGKey(1), x)
    p = variables["params"]
    (c_f, c_b), y = _apply(bi, variables, x)
    assert y.shape == (B, T, 3 + 3)
    # Forward half: the forward layer on x.  Backward half: a plain
    # forward-running copy of the backward layer on the time-reversed input,
    # flipped back, so that y[:, t] saw x_t..x_{T-1}.
    c_ref, y_f = _apply(fwd, {"params": p["fwd"]}, x)
    np.testing.assert_allclose(y[..., :3], y_f, **TOL)
    np.testing.assert_allclose(c_f, c_ref, **TOL)
    c_ref, y_b = _apply(bwd, {"params": p["bwd"]}, jnp.flip(x, axis=1))
    np.testing.assert_allclose(y[..., 3:], jnp.flip(y_b, axis=1), **TOL)
    np.testing.assert_allclose(c_b, c_ref, **TOL)  # the state at step 0
    # Explicitly at one step t: the backward output depends on x_t.. only.
    t = 2
    _, y_suffix = _apply(bwd, {"params": p["bwd"]}, jnp.flip(x[:, t:], axis=1))
    np.testing.assert_allclose(y[:, t, 3:], y_suffix[:, -1], **TOL)
    # merge='sum' adds the two halves.
    _, y_sum = _apply(Bidirectional(fwd, bwd, merge="sum"), variables, x)
    np.testing.assert_allclose(y_sum, y[..., :3] + y[..., 3:], **TOL)


def test_bidirectional_seq_lengths_equals_truncated():
    x = _x()
    bi = Bidirectional(MinLSTM(d_h=4), MinLSTM(d_h=4, reverse=True))
    variables = _init(bi, jax.random.PRNGKey(1), x)
    carry = (jax.random.uniform(jax.random.PRNGKey(3), (B, 4), jnp.float32),
             jax.random.uniform(jax.random.PRNGKey(4), (B, 4), jnp.float32))
    (c_f, c_b), y = _apply(bi, variables, x, carry, seq_lengths=jnp.asarray(LENGTHS))
    # Each sequence alone, truncated to its length (no padding at all).
    for i, n in enumerate(LENGTHS[1:], start=1):
        sub = (carry[0][i:i + 1], carry[1][i:i + 1])
        (cf_i, cb_i), y_i = _apply(bi, variables, x[i:i + 1, :n], sub)
        np.testing.assert_allclose(c_f[i:i + 1], cf_i, **TOL)
        np.testing.assert_allclose(c_b[i:i + 1], cb_i, **TOL)
        np.testing.assert_allclose(y[i:i + 1, :n], y_i, **TOL)
        assert not np.any(np.asarray(y[i, n:]))


def test_bidirectional_errors():
    x = _x()
    with pytest.raises(ValueError, match=r"merge must be one of \['concat', 'sum'\], got 'mean'"):
        Bidirectional(MinGRU(d_h=4), MinGRU(d_h=4), merge="mean").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"merge must be one of \['concat', 'sum'\], got \('sum',\)"):
        Bidirectional(MinGRU(d_h=4), MinGRU(d_h=4), merge=["sum"]).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="forward must run forwards"):
        Bidirectional(MinGRU(d_h=4, reverse=True), MinGRU(d_h=4)).init(jax.random.PRNGKey(0), x)
    with pytest.raises(TypeError, match="backward must be"):
        Bidirectional(MinGRU(d_h=4), nn.Dense(4)).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="merge='sum' needs"):
        Bidirectional(MinGRU(d_h=4), MinGRU(d_h=3, d_model=3), merge="sum").init(jax.random.PRNGKey(0), x)
    bi = Bidirectional(MinGRU(d_h=4), MinGRU(d_h=4))
    variables = _init(bi, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"carry must be None or a tuple of 2"):
        _apply(bi, variables, x, jnp.zeros((B, 4), jnp.float32))


# ----------------------------------------------------------------------------
# Stack


def _manual_stack(layers, params, x, carries, *, residual, norm, eps=1e-5, **kw):
    out_carries = []
    for i, layer in enumerate(layers):
        u = x
        if norm:
            u = nn.RMSNorm(epsilon=eps).apply({"params": params[f"norms_{i}"]}, x)
        c, z = _apply(layer, {"params": params[f"rnn_{i}"]}, u, carries[i], **kw)
        out_carries.append(c)
        x = x + z if residual else z
    return tuple(out_carries), x


@pytest.mark.parametrize("residual_norm", [False, True], ids=["plain", "residual_rmsnorm"])
def test_stack_equals_manual_chain(residual_norm):
    x = _x()
    if residual_norm:
        layers = [MinGRU(d_h=6, d_model=D), GatedLinearRNN(d_h=5, d_model=D, use_true_recurrence=True)]
        kw = dict(residual=True, norm="rmsnorm")
    else:
        layers = [MinGRU(d_h=6), MinLSTM(d_h=3), GatedLinearRNN(d_h=5, d_model=2)]
        kw = dict(residual=False, norm=None)
    stack = Stack(layers, **kw)
    variables = _perturb(_init(stack, jax.random.PRNGKey(1), x))
    p = variables["params"]
    carries = tuple(jax.random.uniform(jax.random.PRNGKey(10 + i), (B, l.d_h), jnp.float32)
                    for i, l in enumerate(layers))
    lengths = jnp.asarray(LENGTHS)
    c, y = _apply(stack, variables, x, carries, seq_lengths=lengths)
    c_ref, y_ref = _manual_stack(layers, p, x, carries, residual=kw["residual"],
                                 norm=kw["norm"], seq_lengths=lengths)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert isinstance(c, tuple) and len(c) == len(layers)
    for a, b in zip(c, c_ref):
        np.testing.assert_allclose(a, b, **TOL)


def test_stack_of_bidirectional_nests_carries():
    x = _x()
    bi = Bidirectional(MinGRU(d_h=3, d_model=3), MinGRU(d_h=3, d_model=3))
    top = MinLSTM(d_h=2)
    stack = Stack([bi, top])
    variables = _init(stack, jax.random.PRNGKey(1), x)
    p = variables["params"]
    (c_bi, c_top), y = _apply(stack, variables, x)
    c_bi_ref, y_bi = _apply(bi, {"params": p["rnn_0"]}, x)
    c_top_ref, y_ref = _apply(top, {"params": p["rnn_1"]}, y_bi)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(c_top, c_top_ref, **TOL)
    for a, b in zip(c_bi, c_bi_ref):
        np.testing.assert_allclose(a, b, **TOL)
    assert jax.tree_util.tree_map(jnp.shape, bi.initialize_carry(x.shape)) == ((B, 3), (B, 3))


def test_stack_dropout():
    x = _x()
    layers = [MinGRU(d_h=D), MinGRU(d_h=D), MinGRU(d_h=D)]
    stack = Stack(layers, dropout=0.5, residual=True, norm="layernorm")
    variables = _init(stack, jax.random.PRNGKey(1), x)
    _, y_det = _apply(stack, variables, x)
    _, y_det2 = _apply(stack, variables, x, deterministic=True,
                            rngs={"dropout": jax.random.PRNGKey(5)})
    _, y_nodrop = _apply(Stack(layers, dropout=0.0, residual=True, norm="layernorm"), variables, x)
    np.testing.assert_array_equal(y_det, y_det2)
    np.testing.assert_array_equal(y_det, y_nodrop)
    _, y_a = _apply(stack, variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})
    _, y_b = _apply(stack, variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(6)})
    assert not np.allclose(y_a, y_det) and not np.allclose(y_a, y_b)
    # No dropout after the last layer: with a single layer, training == eval.
    one = Stack(layers[:1], dropout=0.5)
    v1 = _init(one, jax.random.PRNGKey(1), x)
    np.testing.assert_array_equal(
        _apply(one, v1, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})[1],
        _apply(one, v1, x)[1])


def test_stack_chunked_with_carry_equals_full():
    split = 4  # an arbitrary point
    x = _x(shape=(B, 9, D))
    stack = Stack([MinLSTM(d_h=D), GatedLinearRNN(d_h=5, d_model=D, use_tied_gates=False)],
                  residual=True, norm="rmsnorm")
    variables = _init(stack, jax.random.PRNGKey(1), x)
    c_full, y_full = _apply(stack, variables, x)
    c1, y1 = _apply(stack, variables, x[:, :split])
    c2, y2 = _apply(stack, variables, x[:, split:], c1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y_full, **TOL)
    for a, b in zip(c2, c_full):
        np.testing.assert_allclose(a, b, **TOL)


def test_stack_errors():
    x = _x()
    init = lambda m, *a, **k: m.init(jax.random.PRNGKey(0), x, *a, **k)
    # A width change under residual=True is projected now (see the torch-mingru
    # test); malformed per-layer residual options are errors.
    with pytest.raises(ValueError, match="residual must be a bool or a sequence of 2 bools"):
        init(Stack([MinGRU(d_h=4), MinGRU(d_h=4)], residual=[True]))
    with pytest.raises(ValueError, match="residual must be"):
        init(Stack([MinGRU(d_h=4), MinGRU(d_h=4)], residual=[True, 1]))
    with pytest.raises(ValueError, match="norm must be one of .*got 'batchnorm'"):
        init(Stack([MinGRU(d_h=4)], norm="batchnorm"))
    with pytest.raises(ValueError, match=r"norm must be one of .*got \('rmsnorm',\)"):
        init(Stack([MinGRU(d_h=4)], norm=["rmsnorm"]))
    # dropout: a real number in [0, 1) (not a string, not a bool).
    for rate in (1.0, -0.1, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match=r"dropout must be a finite number in \[0, 1\), got"):
            init(Stack([MinGRU(d_h=4)], dropout=rate))
    for eps in (0.0, -1e-5, "1e-5", True):
        with pytest.raises(ValueError, match="eps must be a positive number, got"):
            init(Stack([MinGRU(d_h=4)], norm="rmsnorm", eps=eps))
    with pytest.raises(ValueError, match="layers must be a non-empty"):
        init(Stack([]))
    with pytest.raises(TypeError, match=r"layers\[1\] must be a flax.linen Module"):
        init(Stack([MinGRU(d_h=4), "gru"]))
    stack = Stack([MinGRU(d_h=4), MinGRU(d_h=4)])
    variables = init(stack)
    with pytest.raises(ValueError, match="carry must be None or a tuple of 2 per-layer.*length 1"):
        _apply(stack, variables, x, (jnp.zeros((B, 4), jnp.float32),))


# ----------------------------------------------------------------------------
# torch-mingru's README configuration: input 3, hidden 64, 2 layers, residual
# (the first layer's skip through an input projection), dropout.


def _g(x):
    return np.where(x >= 0, x + 0.5, 1.0 / (1.0 + np.exp(-x)))


def _torch_mingru_ref(p, x, h0, num_layers):
    """torch-mingru's MinGRU stack in float64, one step at a time: per layer
    [gate, hidden] = x W + b, z = sigmoid(gate), h = (1 - z) h + z g(hidden),
    out = h + skip, skip = x W_s + b_s on layer 0 (input 3 -> 64), x after."""
    inp = np.asarray(x, np.float64)
    finals = []
    for l in range(num_layers):
        w = np.asarray(p[f"rnn_{l}"]["in_proj"]["kernel"], np.float64)
        b = np.asarray(p[f"rnn_{l}"]["in_proj"]["bias"], np.float64)
        hidden = w.shape[1] // 2
        h = np.array(h0[l], np.float64)
        out = np.zeros(inp.shape[:2] + (hidden,))
        for t in range(inp.shape[1]):
            pre = inp[:, t] @ w + b
            z = 1.0 / (1.0 + np.exp(-pre[:, :hidden]))
            h = (1.0 - z) * h + z * _g(pre[:, hidden:])
            out[:, t] = h
        finals.append(h)
        if l == 0:
            skip = (inp @ np.asarray(p["skip_proj_0"]["kernel"], np.float64)
                    + np.asarray(p["skip_proj_0"]["bias"], np.float64))
        else:
            skip = inp
        inp = out + skip
    return finals, inp


def test_torch_mingru_readme_configuration_matches_float64_reference():
    from flax_minrnn.nn.recurrent import g_activation
    batch, seq_len, in_dims, hidden, layers = 4, 12, 3, 64, 2
    stack = Stack([MinGRU(d_h=hidden, d_model=hidden, candidate_activation=g_activation)
                   for _ in range(layers)], residual=True, dropout=0.25)
    x = _x(20, (batch, seq_len, in_dims))
    variables = _init(stack, jax.random.PRNGKey(21), x)
    p = variables["params"]
    assert p["skip_proj_0"]["kernel"].shape == (3, 64) and "skip_proj_1" not in p
    # torch-mingru starts from g(0) = 0.5; its README also passes 0.5 explicitly.
    h0 = tuple(jnp.full((batch, hidden), 0.5, jnp.float32) for _ in range(layers))
    ref_c, ref_y = _torch_mingru_ref(p, x, np.full((layers, batch, hidden), 0.5), layers)
    # Parallel (evaluation: dropout off).
    c, y = _apply(stack, variables, x, h0)
    np.testing.assert_allclose(y, ref_y, **TOL)
    for a, b in zip(c, ref_c):
        np.testing.assert_allclose(a, b, **TOL)
    # Step by step, carrying the state, as the README's sequential pattern.
    carry, steps = h0, []
    for t in range(seq_len):
        carry, y_t = _apply(stack, variables, x[:, t:t + 1], carry)
        steps.append(y_t)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), ref_y, **TOL)
    for a, b in zip(carry, ref_c):
        np.testing.assert_allclose(a, b, **TOL)
    # Training mode drops (part of) the first layer's output, never the last's.
    _, y_train = stack.apply(variables, x, h0, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(y_train, y)


def test_stack_per_layer_residual():
    x = _x(30)
    layers = [MinGRU(d_h=6, d_model=5), MinGRU(d_h=5, d_model=5), MinGRU(d_h=4, d_model=5)]
    stack = Stack(layers, residual=[False, True, True])
    variables = _init(stack, jax.random.PRNGKey(2), x)
    p = variables["params"]
    assert set(p) == {"rnn_0", "rnn_1", "rnn_2"}  # widths 4 -> 5 without residual: no projection
    _, y = _apply(stack, variables, x)
    _, z0 = _apply(layers[0], {"params": p["rnn_0"]}, x)
    _, z1 = _apply(layers[1], {"params": p["rnn_1"]}, z0)
    x2 = z0 + z1
    _, z2 = _apply(layers[2], {"params": p["rnn_2"]}, x2)
    np.testing.assert_allclose(y, x2 + z2, **TOL)
