"""generate() and sample_logits(): exact expectations, tracing, batching, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import importlib

# The module (flax_minrnn.generate is also the name of the exported function).
generate_lib = importlib.import_module("flax_minrnn.models.generate")
from flax_minrnn.models.generate import GenerateOutput, generate, sample_logits
from flax_minrnn.models.lm import LM, LMConfig

V = 11


@pytest.fixture(scope="module")
def lm():
    cfg = LMConfig(vocab_size=V, n_layer=1, d_model=8, d_h=8, d_channel_mixing=12,
                   conv_width=2, positional_encoding="learned", max_seq_length=32)
    model = LM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


def _prompts():
    prompt = jnp.asarray([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [9, 8, 7, 0, 0]], jnp.int32)
    return prompt, jnp.asarray([5, 2, 3], jnp.int32)


class FakeLM(nn.Module):
    """Logits depend only on the last fed token: ``table[token]`` (no params).

    The carry is the last valid token, so it follows the generate protocol.
    """

    table: tuple  # (V, V) nested tuples (hashable)

    @nn.compact
    def __call__(self, tokens, carry=None, *, seq_lengths=None):
        table = jnp.asarray(self.table, jnp.float32)
        n = tokens.shape[1] if seq_lengths is None else seq_lengths
        last = jnp.take_along_axis(tokens, (jnp.asarray(n) - 1).reshape(-1, 1), axis=1)[:, 0]
        return last, table[tokens]


def _fake(rows):
    return FakeLM(tuple(tuple(float(v) for v in r) for r in rows))


# ----------------------------------------------------------------------------
# sample_logits.


def test_sample_logits_exact_filters():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]], jnp.float32))
    key = jax.random.key(3)
    neg = -jnp.inf
    # Each filtered draw equals categorical() on the hand-masked logits.
    cases = [
        (dict(top_k=2), [neg, 1, 1, neg]),
        (dict(top_p=0.7), [neg, 1, 1, neg]),   # 0.5 < 0.7 <= 0.8
        (dict(top_p=0.85), [neg, 1, 1, 1]),    # 0.8 < 0.85
        (dict(top_p=0.45), [neg, 1, neg, neg]),
        (dict(top_k=3, top_p=0.9), [neg, 1, 1, neg]),  # renormalised after top-k
    ]
    for kw, keep in cases:
        masked = jnp.where(jnp.asarray(keep)[None, :] > 0, logits / 0.5, neg)
        for seed in range(5):
            key = jax.random.key(seed)
            want = jax.random.categorical(key, masked, axis=-1)
            got = sample_logits(logits, key, temperature=0.5, **kw)
            assert got.dtype == jnp.int32 and got.tolist() == want.tolist(), kw
    # top_k=1 and temperature=0 are deterministic.
    for seed in range(5):
        assert sample_logits(logits, jax.random.key(seed), 1.0, top_k=1).tolist() == [1]
        assert sample_logits(logits, jax.random.key(seed), 0.0).tolist() == [1]
    # Sampled frequencies of top_k=2 at temperature 1: 0.5/0.8 and 0.3/0.8.
    many = jnp.broadcast_to(logits, (4000, 4))
    draws = np.asarray(sample_logits(many, jax.random.key(0), 1.0, top_k=2))
    assert set(np.unique(draws)) == {1, 2}
    assert abs(np.mean(draws == 1) - 0.625) < 0.03


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_sampling_arguments_are_validated(lm, kw, name):
    args = dict(temperature=1.0, top_k=0, top_p=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        sample_logits(jnp.zeros((1, 3)), jax.random.key(0), **args)
    model, params = lm
    with pytest.raises(ValueError, match=name):
        generate(model, params, _prompts()[0], 2, rng=jax.random.key(0), **kw)


# ----------------------------------------------------------------------------
# generate with a fake model: exact tokens.


def test_fake_model_exact_tokens_topk_topp_and_eos():
    # From token i the best next token is i+1, then i+2 (mass 0.6, 0.3, rest 0.1).
    rows = []
    for i in range(V):
        p = np.full(V, 0.1 / (V - 2))
        p[(i + 1) % V], p[(i + 2) % V] = 0.6, 0.3
        rows.append(np.log(p))
    model = _fake(rows)
    prompt = jnp.asarray([[0, 0], [5, 0]], jnp.int32)
    lengths = jnp.asarray([1, 1], jnp.int32)
    for kw in (dict(top_k=1), dict(top_p=0.5), dict(temperature=0.0)):
        out = generate(model, {}, prompt, 4, rng=jax.random.key(1), prompt_lengths=lengths,
                       **kw)
        assert out.tokens.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]], kw
        assert out.lengths.tolist() == [4, 4] and out.logits is None
    # top_k=2 / top_p=0.85: every step moves by +1 or +2, never elsewhere.
    for kw in (dict(top_k=2), dict(top_p=0.85)):
        for seed in range(3):
            toks = np.asarray(generate(model, {}, prompt, 6, rng=jax.random.key(seed),
                                       prompt_lengths=lengths, **kw).tokens)
            prev = np.concatenate([[[0], [5]], toks[:, :-1]], axis=1)
            assert set(np.unique((toks - prev) % V)) <= {1, 2}, kw
    # eos: row 0 reaches 3 at step 3 and stops; later tokens are pad_id.
    out = generate(model, {}, prompt, 5, rng=jax.random.key(0), prompt_lengths=lengths,
                   temperature=0.0, eos_id=3, pad_id=10)
    assert out.tokens.tolist() == [[1, 2, 3, 10, 10], [6, 7, 8, 9, 10]]
    assert out.lengths.tolist() == [3, 5]
    out = generate(model, {}, prompt, 5, rng=jax.random.key(0), prompt_lengths=lengths,
                   temperature=0.0, eos_id=3)
    assert out.tokens.tolist()[0] == [1, 2, 3, 3, 3]


def test_decode_step_is_traced_once(monkeypatch):
    counted = chex.assert_max_traces(generate_lib._decode_step, n=1)
    monkeypatch.setattr(generate_lib, "_decode_step", counted)
    model = _fake(np.eye(7) * 3.0)  # a model no other test compiles
    prompt = jnp.asarray([[1, 2], [3, 0]], jnp.int32)
    for seed, temp, top_k, top_p in [(0, 1.0, 2, 0.9), (1, 0.5, 3, 0.8), (2, 0.0, 1, 0.5)]:
        # 12 new tokens, new seeds and new filter values: no retrace.
        out = generate(model, {}, prompt, 12, rng=jax.random.key(seed),
                       prompt_lengths=jnp.asarray([2, 1], jnp.int32),
                       temperature=temp, top_k=top_k, top_p=top_p)
        assert out.tokens.shape == (2, 12)
    chex.clear_trace_counter()


# ----------------------------------------------------------------------------
# generate with the LM.


def _greedy_reference(model, params, row, n, width=16):
    """Repeated full forwards (no carry) of the growing sequence.

    The sequence sits in a fixed-width zero-padded buffer (one compile); by
    causality the logits at its last token ignore the padding.
    """
    apply = jax.jit(model.apply)
    seq = list(row)
    for _ in range(n):
        buf = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
        _, logits = apply({"params": params}, buf)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(row):]


def test_greedy_equals_argmax_of_full_forwards_and_batch_equals_alone(lm):
    model, params = lm
    prompt, lengths = _prompts()
    n = 5
    out = generate(model, params, prompt, n, rng=jax.random.key(0), prompt_lengths=lengths,
                   temperature=0.0, return_logits=True)
    assert isinstance(out, GenerateOutput) and out.tokens.shape == (3, n)
    assert out.logits.shape == (3, n, V) and out.logits.dtype == jnp.float32
    for b, L in enumerate(lengths.tolist()):
        row = prompt[b, :L].tolist()
        assert out.tokens[b].tolist() == _greedy_reference(model, params, row, n)
        alone = generate(model, params, jnp.asarray([row], jnp.int32), n,
                         rng=jax.random.key(0), temperature=0.0)
        assert alone.tokens[0].tolist() == out.tokens[b].tolist()
    # The returned logits are the full forward's next-token logits.
    full = jnp.concatenate([prompt[:1], out.tokens[:1, :-1]], axis=1)
    _, ref = model.apply({"params": params}, full)
    np.testing.assert_allclose(np.asarray(out.logits[0]), np.asarray(ref[0, 4:]),
                               rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible(lm):
    model, params = lm
    prompt, lengths = _prompts()
    kw = dict(prompt_lengths=lengths, temperature=1.0, top_k=5, top_p=0.95)
    a = generate(model, params, prompt, 6, rng=jax.random.key(7), **kw)
    b = generate(model, params, prompt, 6, rng=jax.random.key(7), **kw)
    c = generate(model, {"params": params}, prompt, 6, rng=jax.random.key(8), **kw)
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.tokens.tolist() != c.tokens.tolist()
    assert a.logits is None and len(a) == 3


def test_generate_errors(lm):
    model, params = lm
    prompt, lengths = _prompts()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, params, prompt.at[0, 0].set(V), 2, rng=key)
    with pytest.raises(ValueError, match="max_seq_length"):
        generate(model, params, prompt, 29, rng=key)  # 5 + 29 - 1 > 32
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, params, prompt, 2, rng=key,
                 prompt_lengths=jnp.asarray([5, 0, 3], jnp.int32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, prompt, -1, rng=key)
    out = generate(model, params, prompt, 0, rng=key)
    assert out.tokens.shape == (3, 0) and out.logits is None


def test_decode_memory_does_not_grow_with_length(lm):
    model, params = lm
    prompt, lengths = _prompts()
    cfg = LMConfig(vocab_size=V, n_layer=1, d_model=8, d_h=8, d_channel_mixing=12)
    model = LM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), prompt)["params"]
    temps = []
    for n in (16, 256):
        compiled = generate_lib._generate.lower(
            model, {"params": params}, prompt, lengths, jax.random.key(0),
            generate_lib._Sampling(*(jnp.asarray(v, d) for v, d in [
                (1.0, jnp.float32), (0, jnp.int32), (1.0, jnp.float32), ([-1], jnp.int32),
                (0, jnp.int32), (1.0, jnp.float32), (0, jnp.int32),
                (np.zeros((0, 1)), jnp.int32)])),
            max_new_tokens=n, flags=generate_lib._Flags(False, False, False, False)).compile()
        ma = compiled.memory_analysis()
        if ma is None:
            pytest.skip("memory_analysis unavailable on this backend")
        temps.append(ma.temp_size_in_bytes)
    # Only the (batch, n) int32 output buffer may scale with n.
    assert temps[1] - temps[0] <= 2 * 3 * 4 * (256 - 16), temps
