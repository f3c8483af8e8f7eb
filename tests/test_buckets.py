"""Length bucketing: generate() and evaluate_batches() give the same results
with and without it, and new lengths inside a bucket compile nothing."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn.models.griffin import Griffin, GriffinConfig
from flax_minrnn.models.lm import LM, LMConfig
from flax_minrnn.training import train

from conftest import TOL

generate_lib = importlib.import_module("flax_minrnn.models.generate")
bucket_length, generate = generate_lib.bucket_length, generate_lib.generate

V = 13
_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def compiles(fn) -> int:
    """Number of XLA compilations while running ``fn``."""
    before = len(_COMPILES)
    fn()
    return len(_COMPILES) - before


def test_bucket_length():
    sequence = [16, 24, 32, 48, 64, 96, 128, 192, 256]
    for n in range(1, 257):
        b = bucket_length(n)
        assert b == min(s for s in sequence if s >= n), n
        assert b - n < max(n / 2, 16)
    n_buckets = len({bucket_length(n) for n in range(1, 4097)})
    assert n_buckets <= 2 * math.log2(4096 / 16) + 1
    assert bucket_length(17, limit=20) == 20    # Capped...
    assert bucket_length(30, limit=20) == 30    # ...but never below n.
    assert bucket_length(np.int32(40)) == 48
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="length to bucket"):
            bucket_length(bad)


def _lm(**kw):
    cfg = LMConfig(vocab_size=V, n_layer=1, d_model=16, d_h=16, d_channel_mixing=24,
                   conv_width=3, **kw)
    model = LM(cfg)
    return model, jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]


def _griffin():
    cfg = GriffinConfig(vocab_size=V, num_hidden_layers=2, hidden_size=16,
                        intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                        attention_window_size=8, block_types=("recurrent", "attention"))
    model = Griffin(cfg)
    return model, jax.jit(model.init)(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"]


def _prompt(rng, batch, plen):
    """Right-padded prompts (the first row full); made with device_put,
    which compiles nothing (jnp.asarray of numpy compiles per shape)."""
    prompt = rng.integers(0, V, size=(batch, plen)).astype(np.int32)
    lengths = rng.integers(1, plen + 1, size=batch).astype(np.int32)
    lengths[0] = plen
    return jax.device_put(prompt), jax.device_put(lengths)


@pytest.mark.parametrize("which, plen, new", [
    ("lm", 5, 7), ("lm", 33, 20), ("lm_learned", 17, 1), ("lm_learned", 33, 20),
    ("griffin", 5, 7), ("griffin", 33, 20)])
def test_generate_with_buckets_equals_without(which, plen, new, rng):
    model, params = {"lm": lambda: _lm(),
                     "lm_learned": lambda: _lm(positional_encoding="learned",
                                               max_seq_length=plen + new + 1),
                     "griffin": _griffin}[which]()
    prompt, lengths = _prompt(rng, 3, plen)
    kw = dict(rng=jax.random.key(7), prompt_lengths=lengths, temperature=0.9, top_k=6,
              top_p=0.95, eos_id=3, pad_id=0, return_logits=True)
    want = generate(model, params, prompt, new, **kw)
    got = generate(model, params, prompt, new, bucket_lengths=True, **kw)
    assert got.tokens.shape == want.tokens.shape == (3, new)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logits, want.logits, **TOL["float32"])


def test_generate_lengths_count_only_the_requested_tokens(rng):
    """Rows without eos past max_new_tokens: the extra bucketed steps must
    not count."""
    model, params = _lm()
    prompt, lengths = _prompt(rng, 4, 9)
    for eos in (None, 5):
        kw = dict(rng=jax.random.key(0), prompt_lengths=lengths, eos_id=eos)
        want = generate(model, params, prompt, 3, **kw)
        got = generate(model, params, prompt, 3, bucket_lengths=True, **kw)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.tokens, want.tokens)


def test_new_lengths_in_a_bucket_compile_nothing(rng):
    model, params = _lm()
    kw = dict(rng=jax.random.key(0), temperature=0.0)

    def run(plen, new, bucket):
        out = generate(model, params, _prompt(rng, 2, plen)[0], new, bucket_lengths=bucket,
                       **kw)
        jax.block_until_ready(out.tokens)

    run(17, 9, True)  # Compiles the (24, 16) bucket and the small ops.
    assert compiles(lambda: [run(p, n, True) for p, n in
                             [(18, 10), (21, 13), (24, 16)]]) == 0
    # Without buckets each (length, max_new_tokens) compiles (none of these
    # is the (24, 16) the bucketed calls ran).
    assert compiles(lambda: [run(p, n, False) for p, n in
                             [(18, 10), (21, 13), (24, 15)]]) >= 3


def _batches(rng, lengths):
    out = []
    for t in lengths:
        weights = (rng.random((2, t)) < 0.8).astype(np.float32)
        out.append({"inputs": rng.integers(0, V, size=(2, t)).astype(np.int32),
                    "targets": rng.integers(0, V, size=(2, t)).astype(np.int32),
                    "weights": weights})
    return out


def test_evaluate_batches_with_buckets_equals_without(rng):
    model, params = _lm()
    step = train.make_eval_step(model)
    batches = _batches(rng, [17, 20, 24])
    for batch in batches:  # One length at a time: same metrics.
        want = train.evaluate_batches(step, params, [batch])
        got = train.evaluate_batches(step, params, [batch], bucket_lengths=True)
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
        assert got["eval_accuracy"] == want["eval_accuracy"]
    more = _batches(rng, [18, 19, 23])
    assert compiles(lambda: train.evaluate_batches(step, params, more,
                                                   bucket_lengths=True)) == 0
    padded = train.pad_batch(batches[0], 24)
    assert padded["inputs"].shape == (2, 24)
    assert not padded["weights"][:, 17:].any()
    np.testing.assert_array_equal(padded["targets"][:, :17], batches[0]["targets"])
    # Learned positions: never padded past max_seq_length.
    model, params = _lm(positional_encoding="learned", max_seq_length=20)
    step = train.make_eval_step(model)
    batch = _batches(rng, [18])
    want = train.evaluate_batches(step, params, batch)
    got = train.evaluate_batches(step, params, batch, bucket_lengths=True,
                                 max_length=train._max_length(model))  # pylint: disable=protected-access
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
