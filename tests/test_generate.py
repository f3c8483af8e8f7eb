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


def test_sample_logits_checks_logits():
    key = jax.random.key(0)
    # The docstring says float: integer logits are refused, naming logits.
    with pytest.raises(TypeError, match="logits must be a floating-point array, got dtype int32"):
        sample_logits(jnp.zeros((1, 3), jnp.int32), key)
    with pytest.raises(TypeError, match="logits must be an array, got list"):
        sample_logits([[0.0, 1.0]], key)
    # 0-d (no vocab axis) used to be an IndexError.
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., vocab\) with "
                                         r"vocab >= 1, got \(\)"):
        sample_logits(jnp.zeros(()), key)
    with pytest.raises(ValueError, match=r"logits must have shape .*got \(2, 0\)"):
        sample_logits(jnp.zeros((2, 0)), key)
    # (vocab,) and bfloat16 are fine; so is jit.
    assert sample_logits(jnp.asarray([0.0, 5.0, 1.0]), key, 0.0).tolist() == 1
    assert sample_logits(jnp.asarray([[0.0, 5.0]], jnp.bfloat16), key, 0.0).tolist() == [1]
    assert jax.jit(sample_logits)(jnp.asarray([[0.0, 5.0]]), key, 0.0).tolist() == [1]


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
                (1.0, jnp.float32), (0, jnp.int32), (1.0, jnp.float32), (-1, jnp.int32),
                (0, jnp.int32)])),
            max_new_tokens=n, flags=generate_lib._Flags(False, False, False, False)).compile()
        ma = compiled.memory_analysis()
        if ma is None:
            pytest.skip("memory_analysis unavailable on this backend")
        temps.append(ma.temp_size_in_bytes)
    # Only the (batch, n) int32 output buffer may scale with n.
    assert temps[1] - temps[0] <= 2 * 3 * 4 * (256 - 16), temps


# ----------------------------------------------------------------------------
# Hugging Face options: hand-computed tokens on the fake model, a float64 NumPy
# re-implementation of the processors over no-cache full forwards, masks.


def test_repetition_penalty_min_new_tokens_and_several_eos_by_hand():
    greedy = lambda rows, first, n, **kw: generate(
        _fake(rows), {}, jnp.asarray([[first]], jnp.int32), n, do_sample=False,
        **kw).tokens.tolist()[0]
    # Every row: token 2 scores 2.0, token 3 1.5, token 4 1.2, the rest 0.
    rows = np.zeros((V, V))
    rows[:, 2], rows[:, 3], rows[:, 4] = 2.0, 1.5, 1.2
    assert greedy(rows, 2, 4) == [2, 2, 2, 2]
    # Penalty 1.5, prompt 2: 2 -> 1.33 < 1.5 (3 unseen); then 2 -> 1.33 beats
    # 3 -> 1.0 and 4 -> 1.2.
    assert greedy(rows, 2, 4, repetition_penalty=1.5) == [3, 2, 2, 2]
    # Penalty 2: 2 -> 1.0 < 1.5; then 4 (1.2) beats 2 (1.0) and 3 (0.75); then
    # 2 (1.0) beats 3 (0.75), 4 (0.6) and the zeros.
    assert greedy(rows, 2, 4, repetition_penalty=2.0) == [3, 4, 2, 2]
    # Negative logits are multiplied, not divided: seen 6 goes from -1.0 to
    # -2.0, below the unseen 7 at -1.2; then seen 7 is -2.4 and 6 wins.
    neg = np.full((V, V), -3.0)
    neg[:, 6], neg[:, 7] = -1.0, -1.2
    assert greedy(neg, 6, 3) == [6, 6, 6]
    assert greedy(neg, 6, 3, repetition_penalty=2.0) == [7, 6, 6]
    # From token i: i + 1 scores 1.0, i itself 0.5, the rest -1.
    step = np.full((V, V), -1.0)
    for i in range(V):
        step[i, (i + 1) % V], step[i, i] = 1.0, 0.5
    assert greedy(step, 1, 6) == [2, 3, 4, 5, 6, 7]
    # Two EOS ids: the first of them stops the row, the rest is the first EOS id.
    out = generate(_fake(step), {}, jnp.asarray([[1]], jnp.int32), 6, do_sample=False,
                   eos_id=[4, 3])
    assert out.tokens.tolist() == [[2, 3, 4, 4, 4, 4]] and out.lengths.tolist() == [2]
    # min_new_tokens=3 bans 3 and 4 for tokens 0..2: from 2 the best allowed is
    # 2 itself (0.5), twice; token 3 (index 3) may be EOS again.
    out = generate(_fake(step), {}, jnp.asarray([[1]], jnp.int32), 6, do_sample=False,
                   eos_id=[4, 3], min_new_tokens=3)
    assert out.tokens.tolist() == [[2, 2, 2, 3, 4, 4]] and out.lengths.tolist() == [4]


def test_stop_sequences_and_max_length_by_hand():
    rows = np.full((V, V), -1.0)
    for i in range(V):
        rows[i, (i + 1) % V] = 1.0
    model = _fake(rows)
    prompt = jnp.asarray([[3, 4], [7, 8]], jnp.int32)
    out = generate(model, {}, prompt, 6, do_sample=False, stop_sequences=[[6, 7], [9]],
                   pad_id=0)
    # Row 0: 5 6 7 stops (6, 7); row 1: 9 stops at once.
    assert out.tokens.tolist() == [[5, 6, 7, 0, 0, 0], [9, 0, 0, 0, 0, 0]]
    assert out.lengths.tolist() == [3, 1]
    # A stop sequence that begins in the prompt: (4, 5) ends at the first token.
    out = generate(model, {}, prompt, 4, do_sample=False, stop_sequences=[[4, 5]], pad_id=0)
    assert out.tokens.tolist() == [[5, 0, 0, 0], [9, 10, 0, 1]]
    # max_length counts the prompt width: 2 + 3 new tokens.
    a = generate(model, {}, prompt, max_length=5, do_sample=False)
    b = generate(model, {}, prompt, 3, do_sample=False)
    assert a.tokens.tolist() == b.tokens.tolist() == [[5, 6, 7], [9, 10, 0]]


def _np_process(logits, seen, step, penalty, min_new, eos_ids):
    """Hugging Face's processors in float64: repetition penalty, then min_new_tokens."""
    logits = np.array(logits, np.float64)
    pen = np.where(logits > 0, logits / penalty, logits * penalty)
    logits = np.where(seen, pen, logits)
    if step < min_new:
        logits[eos_ids] = -np.inf
    return logits


def test_sampler_equals_a_no_cache_recompute(lm):
    """Sampling with penalty, min_new_tokens, top-k and two EOS ids: every step
    recomputed from full forwards of the whole sequences (no carry), processed
    in NumPy, sampled with the same key (rows share a key per step, so the
    batch is sampled together)."""
    model, params = lm
    prompt, lengths = _prompts()
    n, eos, kw = 7, [4, 9], dict(temperature=0.8, top_k=6)
    rng = jax.random.key(5)
    out = generate(model, params, prompt, n, rng=rng, prompt_lengths=lengths, eos_id=eos,
                   repetition_penalty=1.3, min_new_tokens=3, pad_id=0, **kw)
    apply = jax.jit(model.apply)
    seqs = [prompt[b, :L].tolist() for b, L in enumerate(lengths.tolist())]
    done, want = [False] * 3, [[] for _ in range(3)]
    for step in range(n):
        buf = jnp.asarray([s + [0] * (16 - len(s)) for s in seqs], jnp.int32)
        logits = np.asarray(apply({"params": params}, buf)[1])
        proc = np.stack([_np_process(logits[b, len(s) - 1], np.isin(np.arange(V), s), step,
                                     1.3, 3, eos) for b, s in enumerate(seqs)])
        toks = np.asarray(sample_logits(jnp.asarray(proc, jnp.float32),
                                        jax.random.fold_in(rng, step), **kw))
        for b in range(3):
            tok = 0 if done[b] else int(toks[b])
            want[b].append(tok)
            if not done[b]:
                seqs[b].append(tok)
                done[b] = tok in eos
    assert out.tokens.tolist() == want
    assert out.lengths.tolist() == [len(s) - L for s, L in zip(seqs, lengths.tolist())]


@pytest.mark.parametrize("kind", ["lm", "griffin"])
def test_left_padded_prompts_through_attention_mask(lm, kind):
    if kind == "lm":
        model, params = lm
    else:
        from flax_minrnn.models.griffin import Griffin, GriffinConfig
        model = Griffin(GriffinConfig(vocab_size=V, num_hidden_layers=2, hidden_size=8,
                                      intermediate_size=16, num_attention_heads=2,
                                      attention_window_size=2, conv1d_width=2,
                                      block_types=("recurrent", "attention")))
        params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 3), jnp.int32))["params"]
    rows = [[1, 2, 3, 4, 5], [6, 7], [9, 8, 7]]
    left = jnp.asarray([[0] * (5 - len(r)) + r for r in rows], jnp.int32)
    mask = jnp.asarray([[0] * (5 - len(r)) + [1] * len(r) for r in rows], jnp.int32)
    kw = dict(rng=jax.random.key(2), temperature=0.9, return_logits=True)
    out = generate(model, params, left, 6, attention_mask=mask, **kw)
    right, lengths = _prompts()
    via_lengths = generate(model, params, right, 6, prompt_lengths=lengths, **kw)
    via_right_mask = generate(model, params, right, 6, attention_mask=right != 0, **kw)
    for other in (via_lengths, via_right_mask):
        assert out.tokens.tolist() == other.tokens.tolist()
        np.testing.assert_allclose(out.logits, other.logits, rtol=1e-6, atol=1e-6)
    # Each row alone, unpadded (greedy: sampling keys are shared across a batch).
    kw = dict(do_sample=False, return_logits=True)
    out = generate(model, params, left, 6, attention_mask=mask, **kw)
    for b, r in enumerate(rows):
        alone = generate(model, params, jnp.asarray([r], jnp.int32), 6, **kw)
        assert out.tokens[b].tolist() == alone.tokens[0].tolist()
        np.testing.assert_allclose(out.logits[b], alone.logits[0], rtol=1e-5, atol=1e-6)


def test_do_sample_false_is_greedy_and_option_errors(lm):
    model, params = lm
    prompt, lengths = _prompts()
    greedy = generate(model, params, prompt, 5, prompt_lengths=lengths, temperature=0.0)
    for kw in (dict(temperature=0.7, top_k=3, rng=jax.random.key(1)), dict(top_p=0.5)):
        out = generate(model, params, prompt, 5, prompt_lengths=lengths, do_sample=False, **kw)
        assert out.tokens.tolist() == greedy.tokens.tolist()
    cases = [
        (dict(rng=None), "rng"),
        (dict(do_sample=True, temperature=0.0), "do_sample"),
        (dict(do_sample="yes"), "do_sample"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
        (dict(stop_sequences=[[]]), r"stop_sequences\[0\]"),
        (dict(stop_sequences=[[1, V]]), r"stop_sequences\[0\]"),
        (dict(stop_sequences="ab"), "stop_sequences"),
        (dict(eos_id=[1, V]), "eos_id"),
        (dict(eos_id=[]), "eos_id"),
        (dict(attention_mask=jnp.asarray([[1, 0, 1, 0, 0]] * 3)), "attention_mask"),
        (dict(attention_mask=prompt != 0, prompt_lengths=lengths), "attention_mask"),
        (dict(max_length=6, max_new_tokens=2), "exactly one"),
        (dict(max_length=4), "max_length"),
    ]
    for kw, match in cases:
        kw = {"rng": jax.random.key(0), "max_new_tokens": 2, **kw}
        if "max_length" in kw and kw["max_new_tokens"] == 2 and match == "max_length":
            del kw["max_new_tokens"]
        with pytest.raises(ValueError, match=match):
            generate(model, params, prompt, **kw)
