"""Interop with the official ``recurrentgemma`` JAX package: logits parity on
random-initialised small configs, greedy decoding parity with the package's
own sampler past the attention window, bit-exact round trips, and the 2B / 9B
trees converted abstractly."""

import contextlib
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_minrnn as fm
from flax_minrnn.compat import recurrentgemma as rg_compat

rg = pytest.importorskip("recurrentgemma.jax")
from recurrentgemma import common as rg_common  # noqa: E402  (after the skip)

R, A = rg_common.TemporalBlockType.RECURRENT, rg_common.TemporalBlockType.ATTENTION
V = 37


@contextlib.contextmanager
def _package_numerics():
    """The package relies on standard dtype promotion and implicit rank
    promotion, which conftest turns into errors for our code."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def _rg_config(block_types, **kw):
    values = dict(vocab_size=V, width=32, mlp_expanded_width=48, num_heads=4,
                  block_types=tuple(block_types), embeddings_scale_by_sqrt_dim=True,
                  attention_window_size=5, logits_soft_cap=3.0, lru_width=None)
    values.update(kw)
    return rg_common.GriffinConfig(**values)


def _randomised(params, seed):
    """Every leaf perturbed (norm scales and biases start at zero in the package)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def _package_model(rg_config, tokens, segment_pos, seed=0):
    model = rg.Griffin(rg_config, gradient_checkpointing=False)
    with _package_numerics():
        params = jax.jit(model.init)(jax.random.key(seed), tokens, segment_pos)
    return model, _randomised(params, seed + 100)


def _segment_pos(batch, seq_len, starts):
    """Positions restarting at 0 at every ``(row, t)`` in ``starts``."""
    pos = np.zeros((batch, seq_len), np.int32)
    for b in range(batch):
        for t in range(1, seq_len):
            pos[b, t] = 0 if (b, t) in starts else pos[b, t - 1] + 1
    return jnp.asarray(pos)


def _assert_logits_close(ours, ref):
    """<= 1e-5 relative to the logits' scale (max |ref|), element by element."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    assert scale > 0.1  # a real comparison, not of zeros
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)


CASES = {
    # window 5 < T = 17, MQA, soft cap, a document reset in row 1
    "griffin": dict(block_types=(R, A, R)),
    # attention only, no soft cap, no embedding scale, window 3
    "attention_only": dict(block_types=(A, A), logits_soft_cap=0.0,
                           embeddings_scale_by_sqrt_dim=False, attention_window_size=3),
    # lru_width != width, more recurrent blocks
    "wide_lru": dict(block_types=(R, R, A, R), lru_width=48),
    # Hawk: recurrent only
    "hawk": dict(block_types=(R, R)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_the_package(case):
    rg_config = _rg_config(**CASES[case])
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, V)
    segment_pos = _segment_pos(2, 17, {(1, 7), (0, 12)})
    model, params = _package_model(rg_config, tokens, segment_pos)
    with _package_numerics():
        ref, _ = jax.jit(model.apply)(params, tokens, segment_pos)
    config, variables = fm.from_recurrentgemma(params, rg_config)
    assert config.layer_types == tuple(
        {R: "recurrent", A: "attention"}[k] for k in rg_config.block_types)
    _, ours = jax.jit(fm.Griffin(config).apply)(variables, tokens, reset=segment_pos == 0)
    _assert_logits_close(ours, ref)
    if rg_config.logits_soft_cap:
        assert np.abs(np.asarray(ours)).max() < rg_config.logits_soft_cap


def test_streaming_past_the_window_equals_the_package():
    """Our chunked calls and token-by-token decoding against the package's
    full forward, far past the attention window."""
    rg_config = _rg_config((R, A, R), attention_window_size=3)
    tokens = jax.random.randint(jax.random.key(2), (2, 15), 0, V)
    segment_pos = _segment_pos(2, 15, set())
    model, params = _package_model(rg_config, tokens, segment_pos, seed=3)
    with _package_numerics():
        ref, _ = jax.jit(model.apply)(params, tokens, segment_pos)
    config, variables = fm.from_recurrentgemma(params, rg_config)
    ours = fm.Griffin(config)

    @jax.jit
    def streamed(tokens):
        carry, chunks = None, []
        for lo, hi in ((0, 4), (4, 5), (5, 11)):
            carry, logits = ours.apply(variables, tokens[:, lo:hi], carry)
            chunks.append(logits)
        for t in range(11, 15):
            carry, logits = ours.apply(variables, tokens[:, t:t + 1], carry)
            chunks.append(logits)
        return jnp.concatenate(chunks, axis=1)

    _assert_logits_close(streamed(tokens), ref)


class _IdVocab:
    """The sampler's vocabulary interface over space-separated ids."""

    def __init__(self, bos, eos, pad):
        self._bos, self._eos, self._pad = bos, eos, pad

    def EncodeAsIds(self, text):  # noqa: N802 (the sentencepiece name)
        return [int(t) for t in text.split()]

    def DecodeIds(self, ids):  # noqa: N802
        return " ".join(str(i) for i in ids)

    def bos_id(self):
        return self._bos

    def eos_id(self):
        return self._eos

    def pad_id(self):
        return self._pad


def test_greedy_decoding_equals_the_package_sampler_past_the_window():
    rg_config = _rg_config((R, R, A), attention_window_size=4)
    prompts = ["5 9 13 2 7", "30 1 8 8 21"]
    bos, eos, pad = 2, 1, 0
    n_new = 14  # prompt (6 with BOS) + 14 = 5 windows of 4
    probe = jnp.zeros((1, 6), jnp.int32)
    model, params = _package_model(rg_config, probe, jnp.arange(6)[None], seed=7)
    sampler = rg.Sampler(model, _IdVocab(bos, eos, pad), params["params"],
                         deterministic_sampling=True)
    with _package_numerics():
        out = sampler(prompts, total_generation_steps=n_new, end_sampling_at_eos_token=False)
    theirs = np.stack([np.asarray(t) for t in out.tokens])
    assert theirs.shape == (2, n_new)
    assert len(set(theirs.ravel().tolist())) > 3  # not a constant sequence

    config, variables = fm.from_recurrentgemma(params, rg_config, bos_token_id=bos,
                                               eos_token_id=eos, pad_token_id=pad)
    prompt = jnp.asarray([[bos] + [int(t) for t in p.split()] for p in prompts], jnp.int32)
    ours = fm.generate(fm.Griffin(config), variables, prompt, n_new, rng=jax.random.key(0),
                       do_sample=False)
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trips_are_bit_exact(case):
    rg_config = _rg_config(**CASES[case])
    tokens = jnp.zeros((1, 3), jnp.int32)
    _, params = _package_model(rg_config, tokens, jnp.arange(3)[None], seed=11)
    config, variables = fm.from_recurrentgemma(params, rg_config)
    back, rg_back = fm.to_recurrentgemma(config, variables)
    assert rg_back == rg_config
    _assert_same_tree(back, params)
    # ours -> package -> ours, from our own random init
    ours = jax.jit(fm.Griffin(config).init)(jax.random.key(3), tokens)
    ours = _randomised(ours, 4)
    config2, again = fm.from_recurrentgemma(*fm.to_recurrentgemma(config, ours))
    assert config2 == config
    _assert_same_tree(again, ours)
    # bfloat16 weights: param_dtype is theirs, as the Hugging Face loader sets it.
    half = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    config3, _ = fm.from_recurrentgemma(half, rg_config)
    assert config3 == dataclasses.replace(config, param_dtype=jnp.bfloat16)


def _assert_same_tree(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("preset,ours", [
    (rg_common.Preset.RECURRENT_GEMMA_2B_V1, fm.griffin_2b_config),
    (rg_common.Preset.RECURRENT_GEMMA_9B_V1, fm.griffin_9b_config),
])
def test_published_trees_convert_abstractly(preset, ours):
    rg_config = rg_common.GriffinConfig.from_preset(preset)
    model = rg.Griffin(rg_config)
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    with _package_numerics():
        shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)
    config = rg_compat.config_from_recurrentgemma(rg_config, pad_token_id=0, eos_token_id=1,
                                                  bos_token_id=2)
    assert config == ours()
    converted = jax.eval_shape(lambda p: fm.from_recurrentgemma(p, rg_config)[1], shapes)
    want = jax.eval_shape(fm.Griffin(config).init, jax.random.key(0), tokens)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), converted) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), want)
    count = lambda tree: sum(math.prod(s.shape) for s in jax.tree.leaves(tree))
    assert count(converted) == count(shapes) == fm.count_params(config)
    back = jax.eval_shape(lambda p: fm.to_recurrentgemma(config, p)[0], converted)
    assert jax.tree.map(lambda s: s.shape, back) == jax.tree.map(lambda s: s.shape, shapes)


@pytest.mark.parametrize("scan_type,impl", [
    (rg_common.ScanType.AUTO, "auto"), (rg_common.ScanType.LINEAR_NATIVE, "sequential"),
    (rg_common.ScanType.ASSOCIATIVE_NATIVE, "associative"),
    (rg_common.ScanType.LINEAR_PALLAS, "pallas")])
def test_scan_type_maps_to_scan_impl_both_ways(scan_type, impl):
    rg_config = _rg_config((R, A), scan_type=scan_type)
    config = rg_compat.config_from_recurrentgemma(rg_config)
    assert config.scan_impl == impl
    assert rg_compat.config_to_recurrentgemma(config) == rg_config
    # An override wins; implementations the package lacks become AUTO.
    assert rg_compat.config_from_recurrentgemma(rg_config, scan_impl="chunked").scan_impl \
        == "chunked"
    for ours in ("chunked", "native"):
        back = rg_compat.config_to_recurrentgemma(dataclasses.replace(config, scan_impl=ours))
        assert back.scan_type == rg_common.ScanType.AUTO
    with pytest.raises(ValueError, match="rg_config.scan_type must be a recurrentgemma ScanType"):
        rg_compat.config_from_recurrentgemma(_rg_config((R, A), scan_type="FAST"))


def test_conversion_errors_name_the_problem():
    rg_config = _rg_config((R, A))
    tokens = jnp.zeros((1, 3), jnp.int32)
    _, params = _package_model(rg_config, tokens, jnp.arange(3)[None])
    with pytest.raises(ValueError, match="blocks.1"):
        inner = dict(params["params"])
        del inner["blocks.1"]
        fm.from_recurrentgemma(inner, rg_config)
    with pytest.raises(ValueError, match="overrides may set only"):
        fm.from_recurrentgemma(params, rg_config, num_key_value_heads=2)
    with pytest.raises(TypeError, match="rg_config"):
        fm.from_recurrentgemma(params, {"width": 32})
    with pytest.raises(ValueError, match=r"ffw_up must have w \(2, 16, 48\)"):
        fm.from_recurrentgemma(params, rg_config._replace(width=16))
    with pytest.raises(ValueError, match=r"recurrent_block/linear_x/.* has shape \(32,?.*config needs \(16"):
        fm.from_recurrentgemma(params, rg_config._replace(lru_width=16))
    # Tensors the package's model would not have are refused, not dropped.
    inner = params["params"]
    for path in ("lm_head/kernel", "blocks.0/recurrent_block/rg_lru/a_imag_param",
                 "blocks.1/mlp_block/ffw_up/extra", "blocks.2/temporal_pre_norm/scale",
                 "blocks.x/temporal_pre_norm/scale"):
        *parents, leaf = path.split("/")
        extended = jax.tree.map(lambda v: v, inner)  # A copy.
        node = extended
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.zeros(3)
        with pytest.raises(ValueError, match=re.escape(f"'{path}'")):
            fm.from_recurrentgemma(extended, rg_config)
    with pytest.raises(ValueError, match=r"blocks.0 is a recurrent block, but "
                                         r"rg_config.block_types\[0\] is ATTENTION"):
        fm.from_recurrentgemma(params, rg_config._replace(block_types=(A, R)))
    config, variables = fm.from_recurrentgemma(params, rg_config)
    for field, value in (("num_key_value_heads", 2), ("conv1d_width", 3),
                         ("rope_theta", 500.0), ("attention_bias", True)):
        other = fm.GriffinConfig(**{**config.__dict__, field: value})
        with pytest.raises(ValueError, match=field):
            fm.to_recurrentgemma(other, variables)
    odd = fm.GriffinConfig(**{**config.__dict__, "num_attention_heads": 1, "lru_width": 9})
    with pytest.raises(ValueError, match=r"even RG-LRU width; config has lru_width=9"):
        fm.to_recurrentgemma(odd, variables)
