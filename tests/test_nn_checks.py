"""Settings of the layers in flax_minrnn.nn are checked by name: a bad value
(a string or bool where a number is expected, a value out of range, an
unknown option) raises an error naming the field and what it allows, instead
of NaN outputs or an unrelated crash."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn.compat import flax_gated_linear_rnn as compat
from flax_minrnn.nn import attention, blocks
from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM
from flax_minrnn.nn.rglru import RGLRU, BlockDiagonalLinear, rglru_lambda_init

KEY = jax.random.PRNGKey(0)
X = jnp.ones((2, 3, 4), jnp.float32)


# ----------------------------------------------------------------------------
# RGLRU


@pytest.mark.parametrize("kw,match", [
    (dict(c=-1.0), r"c must be a finite number > 0, got -1.0"),
    (dict(c=0.0), r"c must be a finite number > 0, got 0.0"),
    (dict(c=math.inf), r"c must be a finite number > 0, got inf"),
    (dict(c=math.nan), r"c must be a finite number > 0, got nan"),
    (dict(c="8"), r"c must be a finite number > 0, got '8'"),
    (dict(c=True), r"c must be a finite number > 0, got True"),
    (dict(min_rad=1.5, max_rad=2.0), r"min_rad must be a finite number in \(0, 1\), got 1.5"),
    (dict(min_rad=0.0), r"min_rad must be a finite number in \(0, 1\), got 0.0"),
    (dict(max_rad=1.0), r"max_rad must be a finite number in \(0, 1\), got 1.0"),
    (dict(max_rad="0.99"), r"max_rad must be a finite number in \(0, 1\), got '0.99'"),
    (dict(min_rad=0.99, max_rad=0.5),
     r"min_rad must be <= max_rad \(0 < min_rad <= max_rad < 1\), got min_rad=0.99, "
     r"max_rad=0.5"),
    (dict(max_sqrt_gradient=0.0), r"max_sqrt_gradient must be a positive number, got 0.0"),
    (dict(max_sqrt_gradient=-1.0), r"max_sqrt_gradient must be a positive number, got -1.0"),
    (dict(w_init_variance_scale=0.0),
     r"w_init_variance_scale must be a positive number, got 0.0"),
    (dict(w_init_variance_scale="1"),
     r"w_init_variance_scale must be a positive number, got '1'"),
    (dict(num_heads=0), r"num_heads must be an integer >= 1, got 0"),
])
def test_rglru_settings_are_checked(kw, match):
    layer = RGLRU(**kw)
    with pytest.raises(ValueError, match=match):
        layer.init(KEY, X)
    with pytest.raises(ValueError, match=match):
        layer.initialize_carry(X.shape)


def test_rglru_edge_settings_are_accepted():
    # min_rad == max_rad is allowed; a small positive max_sqrt_gradient keeps
    # the backward pass finite; ints and numpy floats are numbers.
    layer = RGLRU(c=np.float32(4.0), min_rad=0.5, max_rad=0.5, max_sqrt_gradient=1,
                  w_init_variance_scale=2)
    params = layer.init(KEY, X)
    a = jax.nn.sigmoid(-params["params"]["a_param"])
    np.testing.assert_allclose(a, 0.5, rtol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, X)[1]))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_rglru_lambda_init_checks_the_radii():
    with pytest.raises(ValueError, match=r"min_rad must be <= max_rad"):
        rglru_lambda_init(0.9, 0.5)
    with pytest.raises(ValueError, match=r"max_rad must be a finite number in \(0, 1\)"):
        rglru_lambda_init(0.5, 2.0)


def test_block_diagonal_linear_checks():
    with pytest.raises(ValueError, match=r"num_blocks=3 must divide the input width 4"):
        BlockDiagonalLinear(3).init(KEY, X)
    with pytest.raises(ValueError, match=r"num_blocks must be an integer >= 1, got 0"):
        BlockDiagonalLinear(0).init(KEY, X)
    with pytest.raises(ValueError, match=r"w_init_variance_scale must be a positive number"):
        BlockDiagonalLinear(2, w_init_variance_scale=-1.0).init(KEY, X)


# ----------------------------------------------------------------------------
# MinGRU / MinLSTM / GatedLinearRNN


LAYERS = [MinGRU, MinLSTM, GatedLinearRNN]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", ["x", True, math.nan, -math.inf, None])
def test_forget_bias_must_be_a_finite_number(layer, value):
    module = layer(d_h=4, forget_bias=value)
    with pytest.raises(ValueError, match=r"forget_bias must be a finite number, got "):
        module.init(KEY, X)
    with pytest.raises(ValueError, match=r"forget_bias must be a finite number, got "):
        module.initialize_carry(X.shape)


@pytest.mark.parametrize("value", [1, np.float32(1.0), -2.5])
def test_forget_bias_accepts_numbers(value):
    params = MinGRU(d_h=4, forget_bias=value).init(KEY, X)["params"]
    np.testing.assert_allclose(params["in_proj"]["bias"][:4], -float(value))


@pytest.mark.parametrize("make,error,match", [
    (lambda: MinGRU(d_h=-3), ValueError, r"d_h must be an integer >= 1, got -3"),
    (lambda: MinGRU(d_h=4, d_model=2.0), ValueError, r"d_model must be an integer >= 1"),
    (lambda: MinGRU(expansion_factor="2"), ValueError,
     r"expansion_factor must be a positive number, got '2'"),
    (lambda: MinLSTM(expansion_factor=-1.0), ValueError,
     r"expansion_factor must be a positive number, got -1.0"),
    (lambda: MinGRU(d_h=4, reverse="yes"), ValueError, r"reverse must be a bool, got 'yes'"),
    (lambda: MinGRU(d_h=4, use_bias=1), ValueError, r"use_bias must be a bool, got 1"),
    (lambda: GatedLinearRNN(d_h=4, use_true_recurrence="no"), ValueError,
     r"use_true_recurrence must be a bool, got 'no'"),
    (lambda: MinGRU(d_h=4, use_out_proj="auto"), ValueError,
     r"use_out_proj must be a bool, got 'auto'"),
    (lambda: MinLSTM(d_h=4, normalize_gates=0), ValueError,
     r"normalize_gates must be a bool, got 0"),
    (lambda: GatedLinearRNN(d_h=4, use_tied_gates="tied"), ValueError,
     r"use_tied_gates must be a bool, got 'tied'"),
    (lambda: MinGRU(d_h=4, sequence_axis=""), ValueError,
     r"sequence_axis must be None or a mesh axis name"),
    (lambda: MinGRU(d_h=4, candidate_activation="g"), TypeError,
     r"candidate_activation must be a function or None"),
    (lambda: GatedLinearRNN(d_h=4, gate_activation="sigmoid"), TypeError,
     r"gate_activation must be a function"),
    (lambda: MinLSTM(d_h=4, kernel_init=0.1), TypeError, r"kernel_init must be a function"),
    (lambda: MinGRU(d_h=4, scan_impl="fast"), ValueError, r"scan_impl"),
])
def test_recurrent_layer_fields_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make().init(KEY, X)


# ----------------------------------------------------------------------------
# LocalAttention and the blocks


@pytest.mark.parametrize("kw,match", [
    (dict(rope_theta=0.0), r"rope_theta must be a positive number, got 0.0"),
    (dict(rope_theta="1e4"), r"rope_theta must be a positive number, got '1e4'"),
    (dict(final_w_init_variance_scale=-1.0),
     r"final_w_init_variance_scale must be a positive number, got -1.0"),
    (dict(qkv_bias="yes"), r"qkv_bias must be a bool, got 'yes'"),
    (dict(window=0), r"window must be an integer >= 1, got 0"),
    (dict(partial_rotary_factor="0.5"),
     r"partial_rotary_factor must be a finite number in \(0, 1\], got '0.5'"),
    (dict(partial_rotary_factor=True),
     r"partial_rotary_factor must be a finite number in \(0, 1\], got True"),
    (dict(partial_rotary_factor=1.5),
     r"partial_rotary_factor must be a finite number in \(0, 1\], got 1.5"),
])
def test_local_attention_fields_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        attention.LocalAttention(num_heads=1, **kw).init(KEY, X)


def test_norm_fields_are_checked():
    for kind in ("batchnorm", None):
        with pytest.raises(ValueError, match=r"kind must be one of \['rmsnorm', 'layernorm'\]"):
            blocks.Norm(kind, 1e-5, jnp.float32, jnp.float32).init(KEY, X)
    for eps in (0.0, -1.0, "1e-5"):
        with pytest.raises(ValueError, match=r"eps must be a positive number, got"):
            blocks.Norm("rmsnorm", eps, jnp.float32, jnp.float32).init(KEY, X)
    with pytest.raises(ValueError, match=r"zero_centered must be a bool, got 1"):
        blocks.Norm("rmsnorm", 1e-5, jnp.float32, jnp.float32, zero_centered=1).init(KEY, X)


def test_conv_and_mlp_fields_are_checked():
    state = jnp.zeros((2, 0, 4), jnp.float32)
    for width in (0, 2.0):
        with pytest.raises(ValueError, match=r"width must be an integer >= 1, got"):
            blocks.CausalConv(width).init(KEY, X, state)
    with pytest.raises(ValueError, match=r"d_hidden must be an integer >= 1, got -1"):
        blocks.ChannelMixing(4, -1).init(KEY, X)
    with pytest.raises(ValueError, match=r"d_model must be an integer >= 1, got 0"):
        blocks.ChannelMixing(0, 8).init(KEY, X)
    with pytest.raises(ValueError, match=r"glu must be a bool, got 'yes'"):
        blocks.ChannelMixing(4, 8, glu="yes").init(KEY, X)


def test_positional_encoding_names_the_callers_field():
    positions = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
    pe = lambda mode, n=2, **kw: blocks.PositionalEncoding(mode, n, **kw)
    # Default: LMConfig's field name.
    with pytest.raises(ValueError, match=r"use positional_encoding='sinusoidal'"):
        pe("learned").init(KEY, X, positions, None)
    with pytest.raises(ValueError, match=r"positional_encoding must be one of "
                                         r"\['learned', 'sinusoidal'\], got 'rope'"):
        pe("rope").init(KEY, X, positions, None)
    with pytest.raises(ValueError, match=r"my_mode must be one of"):
        pe("rope", mode_name="my_mode").init(KEY, X, positions, None)
    with pytest.raises(ValueError, match=r"max_seq_length must be an integer >= 1, got 0"):
        pe("learned", 0).init(KEY, X, positions, None)


def test_compat_lm_names_positional_encoding_mode():
    """GatedLinearRNNLM calls its field positional_encoding_mode: the advice
    for positions past max_seq_length uses that name."""
    vocab = 11
    model = compat.GatedLinearRNNLM(
        n_layer=1, d_model=4, d_channel_mixing=8, eps=1e-5, channel_mixing_dropout=0.0,
        time_mixing_dropout=0.0, input_vocab_size=vocab, output_vocab_size=vocab,
        max_seq_length=4, embedding_dropout=0.0, use_word_embedding=True,
        positional_encoding_mode="learned", use_head=True, d_h=4)
    short = jnp.zeros((1, 4), jnp.int32)
    params = model.init(KEY, short)
    with pytest.raises(ValueError, match=r"exceed max_seq_length=4 .*use "
                                         r"positional_encoding_mode='sinusoidal'"):
        model.apply(params, jnp.zeros((1, 6), jnp.int32))


def test_nn_package_has_a_docstring():
    import flax_minrnn.nn as nn_pkg
    assert nn_pkg.__doc__ and "MinGRU" in nn_pkg.__doc__
