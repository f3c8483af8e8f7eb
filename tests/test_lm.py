"""LM, GatedLinearRNNLM and the heads: streaming, padding, causality, errors."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn.models.heads import (SequenceClassifier, TokenClassifier, causal_lm_loss,
                               weighted_cross_entropy)
from flax_minrnn.compat.flax_gated_linear_rnn import GatedLinearRNNLM
from flax_minrnn.models.griffin import GriffinConfig
from flax_minrnn.models.lm import LM, LMCarry, LMConfig

V = 13
TOL = dict(rtol=1e-5, atol=1e-6)


def _cfg(**kw):
    base = dict(vocab_size=V, n_layer=1, d_model=8, d_h=6, d_channel_mixing=12,
                max_seq_length=64)
    base.update(kw)
    return LMConfig(**base)


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _init(cfg, tokens):
    model = LM(cfg)
    return model, jax.jit(model.init)(jax.random.key(0), tokens)


def _assert_carry_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


# ----------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("field,value", [
    ("time_mixing", "lstm"), ("norm", "batchnorm"), ("positional_encoding", "rope"),
    ("n_layer", 0), ("d_model", 0), ("conv_width", -1), ("dropout", 1.0),
    ("vocab_size", 0), ("scan_impl", "fast"), ("eps", "1e-5"), ("eps", 0.0),
    ("expansion_factor", None), ("glu", "yes"), ("tie_embeddings", 1)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value})


def test_options_of_another_time_mixing_are_refused():
    with pytest.raises(ValueError, match="rglru_num_heads=2 needs time_mixing='rglru', "
                                         "got 'mingru'"):
        _cfg(time_mixing="mingru", rglru_num_heads=2)
    with pytest.raises(ValueError, match="use_tied_gates=False needs time_mixing='glrnn', "
                                         "got 'minlstm'"):
        _cfg(time_mixing="minlstm", use_tied_gates=False)
    _cfg(time_mixing="rglru", rglru_num_heads=2, d_h=8)
    _cfg(time_mixing="glrnn", use_tied_gates=False)


@pytest.mark.parametrize("field,value", [("dtype", jnp.int32), ("param_dtype", "float17")])
def test_config_dtypes_must_be_floating(field, value):
    with pytest.raises(TypeError, match=f"^{field} must be a floating-point dtype"):
        _cfg(**{field: value})


@pytest.mark.parametrize("make", [_cfg, lambda **kw: GriffinConfig(vocab_size=V, **kw)],
                         ids=["LMConfig", "GriffinConfig"])
def test_config_dtype_spellings_give_one_config(make):
    spelled = [make(dtype=d, param_dtype=p) for d, p in
               [("bfloat16", "float32"), (jnp.bfloat16, jnp.float32),
                (np.dtype("bfloat16"), np.float32)]]
    assert all(c == spelled[0] and hash(c) == hash(spelled[0]) for c in spelled)
    assert spelled[0] != make(dtype="float32", param_dtype="float32")
    assert spelled[0].dtype == np.dtype("bfloat16")


def test_config_resolved_sizes():
    cfg = LMConfig(vocab_size=5, d_model=8, expansion_factor=1.5)
    assert cfg.state_size == 12 and cfg.channel_mixing_size == 32


# ----------------------------------------------------------------------------
# Structure.


def test_param_names_carry_and_tied_head():
    cfg = _cfg(conv_width=3, positional_encoding="learned", tie_embeddings=True, n_layer=2)
    model, variables = _init(cfg, _tokens(2, 4))
    p = variables["params"]
    assert set(p) == {"embedder", "position", "blocks_0", "blocks_1", "final_norm"}
    assert set(p["blocks_0"]) == {"norm_temporal", "conv", "temporal_mixing",
                                  "norm_channel", "channel_mixing"}
    carry = model.initialize_carry(2)
    assert isinstance(carry, LMCarry)
    assert [c.shape for c in carry.layers] == [(2, 6), (2, 6)]
    assert [c.shape for c in carry.conv] == [(2, 2, 8), (2, 2, 8)]
    assert carry.position.dtype == jnp.int32 and carry.layers[0].dtype == jnp.float32
    untied = jax.eval_shape(LM(_cfg()).init, jax.random.key(0), _tokens(2, 4))["params"]
    assert "head" in untied and "conv" not in untied["blocks_0"]
    assert LM(_cfg()).initialize_carry(3).conv[0].shape == (3, 0, 8)


def test_jit_with_carry_and_dropout():
    cfg = _cfg(dropout=0.3, embedding_dropout=0.3, conv_width=2)
    model, variables = _init(cfg, _tokens(2, 5))
    apply = jax.jit(lambda v, t, c, k: model.apply(v, t, c, training=True,
                                                   rngs={"dropout": k}))
    carry, logits = apply(variables, _tokens(2, 5), model.initialize_carry(2),
                          jax.random.key(1))
    assert logits.shape == (2, 5, V) and logits.dtype == jnp.float32
    assert carry.position.tolist() == [5, 5]
    _, again = apply(variables, _tokens(2, 5), model.initialize_carry(2), jax.random.key(2))
    _, eval_ = model.apply(variables, _tokens(2, 5))
    assert not np.allclose(logits, again) and not np.allclose(logits, eval_)


# ----------------------------------------------------------------------------
# Causality and streaming.


@pytest.mark.parametrize("time_mixing", ["mingru", "minlstm", "glrnn"])
def test_causality(time_mixing):
    cfg = _cfg(time_mixing=time_mixing, conv_width=3, positional_encoding="sinusoidal")
    tokens = _tokens(2, 8)
    cuts = (0, 3, 6)

    model = LM(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    # One executable for every input, so an unchanged prefix must be bit-equal.
    apply = jax.jit(lambda tokens: model.apply(variables, tokens)[1])
    ref = apply(tokens)
    outs = [apply(tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % V)) for t in cuts]
    for t, out in zip(cuts, outs):
        np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(ref[:, :t + 1]))
        assert not np.allclose(out[:, t + 1:], ref[:, t + 1:])


# Fast tier: every (time mixing, positional) pair once; conv on/off alternates
# and the true recurrence is on in three cases, so every time mixing meets
# conv on and off and both recurrence modes, and every (conv, recurrence) pair
# occurs.  The full 36-way product runs in the slow tier.
_PAIRS = list(itertools.product(["mingru", "minlstm", "glrnn"],
                                ["none", "learned", "sinusoidal"]))
_DECODE_CASES = [(tm, pe, 3 if i % 2 == 0 else 0, (i + i // 3) % 3 == 1)
                 for i, (tm, pe) in enumerate(_PAIRS)]
_ALL_DECODE_CASES = [(tm, pe, conv, rec) for (tm, pe) in _PAIRS
                     for conv in (0, 3) for rec in (False, True)]


def _streamed(cfg, tokens, splits):
    """One compiled run: the full forward, and the same tokens fed in chunks."""

    @jax.jit
    def run(tokens):
        model = LM(cfg)
        variables = model.init(jax.random.key(0), tokens)
        full = model.apply(variables, tokens)
        carry, outs, start = None, [], 0
        for end in list(splits) + [tokens.shape[1]]:
            carry, out = model.apply(variables, tokens[:, start:end], carry)
            outs.append(out)
            start = end
        return full, (carry, jnp.concatenate(outs, axis=1))

    return run(tokens)


@pytest.mark.parametrize("time_mixing,positional,conv_width,true_rec", _DECODE_CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in _ALL_DECODE_CASES
    if case not in _DECODE_CASES])
def test_prefill_then_decode_equals_full_forward(time_mixing, positional, conv_width,
                                                 true_rec):
    cfg = _cfg(time_mixing=time_mixing, positional_encoding=positional,
               conv_width=conv_width, use_true_recurrence=true_rec,
               scan_impl="associative")
    # Prefill 3 tokens, then decode the other 3 one at a time.
    (full_carry, full), (carry, streamed) = _streamed(cfg, _tokens(2, 6, seed=1), (3, 4, 5))
    np.testing.assert_allclose(np.asarray(streamed), np.asarray(full), **TOL)
    _assert_carry_close(carry, full_carry)


@pytest.mark.parametrize("splits", [(1, 5), (2, 3, 8)])
def test_chunked_streaming_equals_one_shot(splits):
    cfg = _cfg(time_mixing="glrnn", conv_width=4, positional_encoding="learned", glu=True,
               norm="layernorm", n_layer=2)
    (full_carry, full), (carry, streamed) = _streamed(cfg, _tokens(3, 9, seed=2), splits)
    np.testing.assert_allclose(np.asarray(streamed), np.asarray(full), **TOL)
    _assert_carry_close(carry, full_carry)


# ----------------------------------------------------------------------------
# Padding (seq_lengths) and resets.


@pytest.mark.parametrize("time_mixing,conv_width,positional", [
    ("mingru", 3, "learned"), ("glrnn", 2, "sinusoidal")])
def test_padding_changes_no_valid_logit_nor_the_carry(time_mixing, conv_width, positional):
    cfg = _cfg(time_mixing=time_mixing, conv_width=conv_width,
               positional_encoding=positional)
    lengths = (7, 2, 5)
    tokens, first, follow = _tokens(3, 7, seed=3), _tokens(3, 3, seed=4), _tokens(3, 2, seed=5)

    @jax.jit
    def run(tokens, first, follow):
        model = LM(cfg)
        variables = model.init(jax.random.key(0), tokens)
        carry0, _ = model.apply(variables, first)
        carry, out = model.apply(variables, tokens, carry0,
                                 seq_lengths=jnp.asarray(lengths, jnp.int32))
        _, next_out = model.apply(variables, follow, carry)
        rows = []
        for b, n in enumerate(lengths):
            sub = jax.tree.map(lambda x: x[b:b + 1], carry0)
            c_b, o_b = model.apply(variables, tokens[b:b + 1, :n], sub)
            _, n_b = model.apply(variables, follow[b:b + 1], c_b)
            rows.append((c_b, o_b, n_b))
        return carry, out, next_out, rows

    carry, out, next_out, rows = run(tokens, first, follow)
    for b, (n, (c_b, o_b, n_b)) in enumerate(zip(lengths, rows)):
        np.testing.assert_allclose(np.asarray(out[b, :n]), np.asarray(o_b[0]), **TOL)
        _assert_carry_close(jax.tree.map(lambda x: x[b:b + 1], carry), c_b)
        assert int(carry.position[b]) == 3 + n
        # The padded call's carry continues exactly like the unpadded one's.
        np.testing.assert_allclose(np.asarray(next_out[b]), np.asarray(n_b[0]), **TOL)


def test_reset_restarts_every_state_and_position():
    cfg = _cfg(conv_width=3, positional_encoding="learned")
    tokens = _tokens(2, 8, seed=6)
    starts = (5, 2)
    reset = jnp.zeros((2, 8), bool).at[0, starts[0]].set(True).at[1, starts[1]].set(True)

    @jax.jit
    def run(tokens, reset):
        model = LM(cfg)
        variables = model.init(jax.random.key(0), tokens)
        start = model.initialize_carry(2)._replace(position=jnp.full((2,), 10, jnp.int32))
        both = model.apply(variables, tokens, start, reset=reset)
        return both, [model.apply(variables, tokens[b:b + 1, r:]) for b, r in enumerate(starts)]

    (carry, out), alone = run(tokens, reset)
    for b, (r, (c_b, o_b)) in enumerate(zip(starts, alone)):
        np.testing.assert_allclose(np.asarray(out[b, r:]), np.asarray(o_b[0]), **TOL)
        _assert_carry_close(jax.tree.map(lambda x: x[b:b + 1], carry), c_b)


# ----------------------------------------------------------------------------
# Bad input.


def test_learned_positions_past_max_seq_length():
    cfg = _cfg(positional_encoding="learned", max_seq_length=6)
    model, variables = _init(cfg, _tokens(1, 4))
    with pytest.raises(ValueError, match="max_seq_length"):
        model.apply(variables, _tokens(1, 7))
    carry, _ = model.apply(variables, _tokens(1, 4))
    model.apply(variables, _tokens(1, 2), carry)  # positions 4, 5: fine
    with pytest.raises(ValueError, match="max_seq_length"):
        model.apply(variables, _tokens(1, 3), carry)
    # Padded steps past the limit are not used: no error.
    model.apply(variables, _tokens(1, 3), carry, seq_lengths=jnp.asarray([2], jnp.int32))
    # Under jit positions are clipped (documented), not checked: positions
    # 4, 5, 6 run as 4, 5, 5.
    tokens = _tokens(1, 3, seed=1)
    _, out = jax.jit(model.apply)(variables, tokens, carry)
    carry2, want = model.apply(variables, tokens[:, :2], carry)
    _, last = model.apply(variables, tokens[:, 2:], carry2._replace(position=carry2.position - 1))
    np.testing.assert_allclose(out, jnp.concatenate([want, last], axis=1), **TOL)


def test_bad_tokens_and_carry():
    model, variables = _init(_cfg(), _tokens(1, 3))
    with pytest.raises(ValueError, match="vocab_size"):
        model.apply(variables, jnp.asarray([[0, V]], jnp.int32))
    with pytest.raises(ValueError, match="vocab_size"):
        model.apply(variables, jnp.asarray([[-1, 0]], jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        model.apply(variables, jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="carry"):
        model.apply(variables, _tokens(1, 3), LM(_cfg(n_layer=2)).initialize_carry(1))
    # A wrong dtype is an error naming the leaf, never a cast.
    conv_model, conv_vars = _init(_cfg(conv_width=3), _tokens(1, 3))
    carry = conv_model.initialize_carry(1)
    with pytest.raises(TypeError, match=r"carry.conv\[0\] has dtype int32, expected float32"):
        conv_model.apply(conv_vars, _tokens(1, 3),
                         carry._replace(conv=(carry.conv[0].astype(jnp.int32),)))
    with pytest.raises(TypeError, match="carry.position has dtype float32, expected int32"):
        conv_model.apply(conv_vars, _tokens(1, 3),
                         carry._replace(position=carry.position.astype(jnp.float32) + 0.9))
    with pytest.raises(ValueError, match=r"carry.layers\[0\] has shape \(2, 6\)"):
        conv_model.apply(conv_vars, _tokens(1, 3), conv_model.initialize_carry(2))
    # A missing leaf is named, not paired with the next one.
    with pytest.raises(TypeError, match="carry.position must be an array, got NoneType"):
        conv_model.apply(conv_vars, _tokens(1, 3), carry._replace(position=None))
    with pytest.raises(TypeError, match=r"carry.layers\[0\] must be an array, got NoneType"):
        conv_model.apply(conv_vars, _tokens(1, 3), carry._replace(layers=(None,)))


# ----------------------------------------------------------------------------
# Heads and losses.


@pytest.mark.parametrize("pooling,bidirectional", [("last", False), ("mean", False),
                                                   ("last", True), ("mean", True)])
def test_sequence_classifier_is_invariant_to_padding(pooling, bidirectional):
    cfg = _cfg(n_layer=1, conv_width=2, positional_encoding="learned")
    model = SequenceClassifier(cfg, num_classes=3, pooling=pooling,
                               bidirectional=bidirectional)
    tokens = _tokens(2, 5, seed=7)
    variables = model.init(jax.random.key(0), tokens)
    lengths = jnp.asarray([5, 3], jnp.int32)
    ref = model.apply(variables, tokens, seq_lengths=lengths)
    padded = jnp.concatenate([tokens, _tokens(2, 4, seed=8)], axis=1)
    mask = (jnp.arange(9)[None, :] < lengths[:, None]).astype(jnp.int32)
    out = model.apply(variables, padded, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)
    alone = model.apply(variables, tokens[1:, :3])
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(alone[0]), **TOL)
    if bidirectional:  # the backward direction sees the last token
        changed = tokens.at[0, 4].set((tokens[0, 4] + 1) % V)
        assert not np.allclose(model.apply(variables, changed, seq_lengths=lengths)[0], ref[0])


def test_token_classifier_padding_and_causality():
    cfg = _cfg(n_layer=1)
    model = TokenClassifier(cfg, num_classes=4)
    tokens = _tokens(2, 6, seed=9)
    variables = model.init(jax.random.key(0), tokens)
    out = model.apply(variables, tokens, seq_lengths=jnp.asarray([6, 4], jnp.int32))
    alone = model.apply(variables, tokens[1:, :4])
    np.testing.assert_allclose(np.asarray(out[1, :4]), np.asarray(alone[0]), **TOL)
    with pytest.raises(ValueError, match="contiguous"):  # left padding is fine, holes are not
        model.apply(variables, tokens, attention_mask=jnp.asarray([[1, 0, 1, 1, 1, 1]] * 2))
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch, time\)"):
        model.apply(variables, tokens[0])


def test_classifier_layers_follow_the_config_dtypes():
    """The classification layer has the backbone's param_dtype, and a
    float64 model gives float64 logits equal to a float64 NumPy head on the
    backbone's features."""
    tokens = _tokens(2, 5, seed=10)
    with jax.enable_x64(True):
        cfg = _cfg(n_layer=1, dtype=jnp.float64, param_dtype=jnp.float64)
        model = TokenClassifier(cfg, num_classes=3)
        variables = model.init(jax.random.key(0), tokens)
        params = variables["params"]
        _, z = LM(cfg, use_head=False).apply(
            {"params": params["features"]["backbone"]}, tokens)
        out = model.apply(variables, tokens)
        assert out.dtype == jnp.float64
        w, b = (np.asarray(params["classifier"][k]) for k in ("kernel", "bias"))
        assert w.dtype == b.dtype == np.float64
        np.testing.assert_allclose(np.asarray(out), np.asarray(z) @ w + b, rtol=0, atol=1e-12)
    half = SequenceClassifier(_cfg(n_layer=1, param_dtype=jnp.bfloat16), num_classes=3)
    head = half.init(jax.random.key(0), tokens)["params"]["classifier"]
    assert head["kernel"].dtype == jnp.bfloat16


def test_losses():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
    labels = jnp.asarray([[1, 2, -100, 4], [0, 3, 3, -100]], jnp.int32)
    loss, n = causal_lm_loss(logits, labels)
    logp = np.asarray(jax.nn.log_softmax(logits))
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(3)
             if labels[b, t + 1] != -100]
    assert int(n) == len(terms) == 4
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-6)
    loss2, n2 = causal_lm_loss(logits, labels, shift=False)
    terms2 = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(4)
              if labels[b, t] != -100]
    assert int(n2) == len(terms2) == 6 and loss2.dtype == jnp.float32
    np.testing.assert_allclose(float(loss2), np.mean(terms2), rtol=1e-6)
    # Weighted: sum(w * nll) / max(sum(w), 1) from a float64 log-softmax, of
    # float32 and bf16 logits, with total weights above and below 1.
    targets = jnp.maximum(labels, 0)
    base = np.random.default_rng(0).uniform(0, 2, (2, 4))
    for dtype in (jnp.float32, jnp.bfloat16):
        x = np.asarray(logits.astype(dtype), np.float64)
        lp = x - x.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]
        for scale in (1.0, 0.05):
            weights = jnp.asarray(scale * base, jnp.float32)
            w = np.asarray(weights, np.float64)
            wl, total = weighted_cross_entropy(logits.astype(dtype), targets, weights)
            assert wl.dtype == jnp.float32
            np.testing.assert_allclose(float(total), w.sum(), rtol=1e-6)
            np.testing.assert_allclose(float(wl), (w * nll).sum() / max(w.sum(), 1.0),
                                       rtol=1e-6)
    wl, total = weighted_cross_entropy(logits, targets, jnp.zeros((2, 4), jnp.float32))
    assert float(wl) == 0.0 and float(total) == 0.0


# ----------------------------------------------------------------------------
# GatedLinearRNNLM (the package's constructor).


def _glrnn_lm(**kw):
    args = dict(n_layer=2, d_model=8, d_channel_mixing=16, eps=1e-5,
                channel_mixing_dropout=0.0, time_mixing_dropout=0.0, input_vocab_size=V,
                output_vocab_size=V, max_seq_length=32, embedding_dropout=0.0,
                use_word_embedding=True, positional_encoding_mode="sinusoidal", use_head=True,
                d_h=6)
    args.update(kw)
    return GatedLinearRNNLM(**args)


@pytest.mark.parametrize("mode", ["sinusoidal", "learned"])
def test_glrnn_lm_chunked_equals_full(mode):
    model = _glrnn_lm(positional_encoding_mode=mode)
    drop = _glrnn_lm(positional_encoding_mode=mode, time_mixing_dropout=0.5)
    x = _tokens(2, 7, seed=10)

    @jax.jit
    def run(x):
        params = model.init(jax.random.key(0), x, training=False)
        h1, y1 = model.apply(params, x[:, :3], training=False)
        h2, y2 = model.apply(params, x[:, 3:], training=False, carry=h1, offset=3)
        dropped = drop.apply(params, x, training=True, rngs={"dropout": jax.random.key(1)})
        return model.apply(params, x, training=False), (h2, jnp.concatenate([y1, y2], 1)), dropped

    (h, y), (h2, y12), (_, dropped) = run(x)
    assert h.shape == (2, 2, 6) and y.shape == (2, 7, V)
    np.testing.assert_allclose(np.asarray(y12), np.asarray(y), **TOL)
    np.testing.assert_allclose(np.asarray(h2), np.asarray(h), **TOL)
    assert not np.allclose(dropped, y)  # training mode applies dropout


def test_glrnn_lm_mask_is_honoured():
    model = _glrnn_lm()
    x = _tokens(2, 6, seed=11)
    params = model.init(jax.random.key(0), x, training=False)
    mask = jnp.arange(6)[None, :] < jnp.asarray([6, 4])[:, None]
    h, y = model.apply(params, x, training=False, mask=mask)
    h_b, y_b = model.apply(params, x[1:, :4], training=False)
    np.testing.assert_allclose(np.asarray(h[1]), np.asarray(h_b[0]), **TOL)
    np.testing.assert_allclose(np.asarray(y[1, :4]), np.asarray(y_b[0]), **TOL)


def test_glrnn_lm_matches_the_package_on_renamed_params():
    fglr = pytest.importorskip("flax_gated_linear_rnn")
    kw = dict(n_layer=2, d_model=8, d_channel_mixing=16, eps=1e-5,
              channel_mixing_dropout=0.0, time_mixing_dropout=0.0, input_vocab_size=V,
              output_vocab_size=V, max_seq_length=16, embedding_dropout=0.0,
              use_word_embedding=True, positional_encoding_mode="sinusoidal", d_h=6)
    theirs = fglr.GatedLinearRNNLM(use_head=True, **kw)
    x = _tokens(2, 5, seed=12)
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        p = jax.jit(lambda x: theirs.init(jax.random.key(0), x, training=False))(x)
        h_ref, y_ref = jax.jit(lambda p, x: theirs.apply(p, x, training=False))(p, x)

    def rename(tree):
        if isinstance(tree, dict):
            return {("in_proj" if k == "proj" else k): rename(v) for k, v in tree.items()}
        return tree

    ours = GatedLinearRNNLM(use_head=True, **kw)
    h, y = jax.jit(lambda p, x: ours.apply(p, x, training=False))(rename(dict(p)), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-5, atol=1e-6)


def test_glrnn_lm_features_input_and_errors():
    model = _glrnn_lm(use_word_embedding=False, positional_encoding_mode="none",
                      use_head=False)
    x = jax.random.normal(jax.random.key(0), (2, 4, V))
    params = model.init(jax.random.key(0), x, training=False)
    assert model.apply(params, x)[1].shape == (2, 4, 8)
    with pytest.raises(ValueError, match="positional_encoding_mode"):
        _glrnn_lm(positional_encoding_mode="rotary").init(jax.random.key(0), _tokens(1, 2))
    learned = _glrnn_lm(positional_encoding_mode="learned", max_seq_length=4)
    params = learned.init(jax.random.key(0), _tokens(1, 2))
    with pytest.raises(ValueError, match="max_seq_length"):
        learned.apply(params, _tokens(1, 3), offset=2)
    for offset in (1.0, jnp.asarray([1, 1], jnp.int32)):
        with pytest.raises(ValueError, match=r"offset must be an int .* \(1,\), got"):
            learned.apply(params, _tokens(1, 1), offset=offset)


def test_bfloat16_compute_keeps_float32_states_and_logits():
    cfg = _cfg(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, conv_width=2, norm="layernorm",
               positional_encoding="sinusoidal")
    tokens = _tokens(2, 4)
    (carry, logits), (s_carry, s_logits) = _streamed(cfg, tokens, (2,))
    assert logits.dtype == jnp.float32 and carry.layers[0].dtype == jnp.float32
    assert carry.conv[0].dtype == jnp.bfloat16
    # Streaming passes float32 states between chunks, so it equals the
    # one-shot call to float32 rounding; a state rounded to bfloat16 between
    # chunks would be off by ~1e-2.
    np.testing.assert_allclose(s_logits, logits, rtol=1e-5,
                               atol=1e-6 * float(np.abs(logits).max()))
    # The same parameters, upcast, in a float32 model.
    params = jax.tree.map(lambda p: p.astype(jnp.float32),
                          LM(cfg).init(jax.random.key(0), tokens))
    f32 = LM(dataclasses.replace(cfg, dtype=jnp.float32, param_dtype=jnp.float32))
    ref_carry, ref_logits = jax.jit(f32.apply)(params, tokens)
    np.testing.assert_allclose(logits, ref_logits,
                               rtol=2e-2, atol=2e-2 * float(np.abs(ref_logits).max()))
    np.testing.assert_allclose(carry.layers[0], ref_carry.layers[0], rtol=2e-2,
                               atol=2e-2 * float(np.abs(ref_carry.layers[0]).max()))


def test_sinusoidal_encoding_in_float64_is_float64():
    """A float64 model's positions are float64 (float32 angles are off by
    about p * 6e-8 rad, 6e-3 at p = 10**5)."""
    from flax_minrnn.nn import blocks
    positions = np.array([[0, 3, 77, 12_345, 100_003]])
    dim = 7
    w = 10000.0 ** (-2.0 * np.arange(4) / dim)
    angles = positions[..., None] * w
    want = np.stack([np.sin(angles), np.cos(angles)], -1).reshape(1, 5, 8)[..., :dim]
    with jax.enable_x64(True):
        got = blocks.sinusoidal_encoding(jnp.asarray(positions, jnp.int32), dim, jnp.float64)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)
        x = jnp.zeros((1, 5, dim), jnp.float64)
        enc = blocks.PositionalEncoding("sinusoidal", 8)
        out = enc.apply({}, x, jnp.asarray(positions, jnp.int32), None)
        np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-10)
