"""Hugging Face RecurrentGemmaForCausalLM checkpoints (config.json + safetensors):
bit-exact round trips, a file written in the HF key layout from a
``recurrentgemma`` model, shards with an index, errors; and (marker
``interop``) logits against transformers' own PyTorch model."""

import contextlib
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as st

import flax_minrnn as fm
from flax_minrnn.compat import hf as hf_lib

V = 29


def _config(**kw):
    values = dict(vocab_size=V, num_hidden_layers=3, hidden_size=16, intermediate_size=48,
                  num_attention_heads=4, num_key_value_heads=1, attention_window_size=4,
                  conv1d_width=3, logits_soft_cap=4.0, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    values.update(kw)
    return fm.GriffinConfig(**values)


def _random_variables(config, seed=0):
    variables = jax.jit(fm.Griffin(config).init)(jax.random.key(seed),
                                                 jnp.zeros((1, 3), jnp.int32))
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + (0.3 * jax.random.normal(k, x.shape)).astype(x.dtype)
                                     for x, k in zip(leaves, keys)])


def _assert_bitwise(a, b):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_key_value_heads=2, attention_bias=True, block_types=("attention", "recurrent"),
         eos_token_id=(1, 5)),
    dict(lru_width=24, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
])
def test_ours_to_hf_files_to_ours_is_bit_exact(tmp_path, kw):
    config = _config(**kw)
    variables = _random_variables(config)
    fm.save_hf_recurrentgemma(str(tmp_path), config, variables)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded_config, loaded = fm.load_hf_recurrentgemma(str(tmp_path), dtype=config.dtype)
    assert loaded_config == config
    _assert_bitwise(loaded, variables)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    assert hf["intermediate_size"] == 48 and hf["architectures"] == ["RecurrentGemmaForCausalLM"]
    keys = set(st.load_file(str(tmp_path / "model.safetensors")))
    assert "lm_head.weight" not in keys  # tied
    assert "model.layers.0.mlp_block.gate_proj.weight" in keys


def test_sharded_checkpoint_with_an_index(tmp_path):
    config = _config()
    variables = _random_variables(config, seed=3)
    fm.save_hf_recurrentgemma(str(tmp_path), config, variables, max_shard_bytes=4096)
    names = sorted(os.listdir(tmp_path))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in names
    with open(tmp_path / hf_lib.WEIGHTS_INDEX_NAME) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # each shard holds what the index says, nothing else
        held = set(st.load_file(str(tmp_path / shard)))
        assert held == {k for k, v in index["weight_map"].items() if v == shard}
    _, loaded = fm.load_hf_recurrentgemma(str(tmp_path))
    _assert_bitwise(loaded, variables)
    # An index that names a tensor no shard holds is an error.
    index["weight_map"]["model.extra.weight"] = shards[0]
    with open(tmp_path / hf_lib.WEIGHTS_INDEX_NAME, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="model.extra.weight"):
        fm.load_hf_recurrentgemma(str(tmp_path))


def _hf_tensors_by_hand(rg_params, n_layers, kinds):
    """The HF state dict of a recurrentgemma tree, written out here from the
    two layouts (independently of flax_minrnn.compat.hf)."""
    p = jax.tree.map(np.asarray, rg_params["params"])
    out = {"model.embed_tokens.weight": p["embedder"]["input_embedding"],
           "model.final_norm.weight": p["final_norm"]["scale"],
           "lm_head.weight": p["embedder"]["input_embedding"]}
    for i in range(n_layers):
        b, q = p[f"blocks.{i}"], f"model.layers.{i}."
        out[q + "temporal_pre_norm.weight"] = b["temporal_pre_norm"]["scale"]
        out[q + "channel_pre_norm.weight"] = b["channel_pre_norm"]["scale"]
        t = q + "temporal_block."
        if kinds[i] == "recurrent":
            r = b["recurrent_block"]
            for n in ("linear_x", "linear_y", "linear_out"):
                out[t + n + ".weight"] = r[n]["kernel"].T
                out[t + n + ".bias"] = r[n]["bias"]
            out[t + "conv_1d.weight"] = r["conv_1d"]["w"].T[:, None, :]
            out[t + "conv_1d.bias"] = r["conv_1d"]["b"]
            out[t + "rg_lru.recurrent_param"] = r["rg_lru"]["a_param"]
            out[t + "rg_lru.input_gate_weight"] = r["rg_lru"]["input_gate"]["w"]
            out[t + "rg_lru.input_gate_bias"] = r["rg_lru"]["input_gate"]["b"]
            out[t + "rg_lru.recurrent_gate_weight"] = r["rg_lru"]["a_gate"]["w"]
            out[t + "rg_lru.recurrent_gate_bias"] = r["rg_lru"]["a_gate"]["b"]
        else:
            a = b["attention_block"]
            for ours, theirs in (("proj_q", "q_proj"), ("proj_k", "k_proj"),
                                 ("proj_v", "v_proj"), ("proj_final", "o_proj")):
                out[t + theirs + ".weight"] = a[ours]["kernel"].T
            out[t + "o_proj.bias"] = a["proj_final"]["bias"]
        m = b["mlp_block"]
        out[q + "mlp_block.gate_proj.weight"] = m["ffw_up"]["w"][0].T
        out[q + "mlp_block.gate_proj.bias"] = m["ffw_up"]["b"][0, 0, 0]
        out[q + "mlp_block.up_proj.weight"] = m["ffw_up"]["w"][1].T
        out[q + "mlp_block.up_proj.bias"] = m["ffw_up"]["b"][1, 0, 0]
        out[q + "mlp_block.down_proj.weight"] = m["ffw_down"]["kernel"].T
        out[q + "mlp_block.down_proj.bias"] = m["ffw_down"]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def test_a_file_in_hf_layout_from_a_recurrentgemma_model_gives_its_logits(tmp_path):
    rg = pytest.importorskip("recurrentgemma.jax")
    from recurrentgemma import common
    R, A = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION
    rg_config = common.GriffinConfig(vocab_size=V, width=24, mlp_expanded_width=40, num_heads=3,
                                     block_types=(R, A, R), embeddings_scale_by_sqrt_dim=True,
                                     attention_window_size=4, logits_soft_cap=5.0)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, V)
    pos = jnp.tile(jnp.arange(11), (2, 1))
    model = rg.Griffin(rg_config, gradient_checkpointing=False)
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        params = model.init(jax.random.key(1), tokens, pos)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                           for x, k in zip(leaves, keys)])
        ref, _ = jax.jit(model.apply)(params, tokens, pos)
    kinds = ["recurrent", "attention", "recurrent"]
    st.save_file(_hf_tensors_by_hand(params, 3, kinds), str(tmp_path / "model.safetensors"))
    hf_config = {"model_type": "recurrent_gemma", "vocab_size": V, "num_hidden_layers": 3,
                 "hidden_size": 24, "intermediate_size": 80, "num_attention_heads": 3,
                 "num_key_value_heads": 1, "lru_width": 24, "attention_window_size": 4,
                 "conv1d_width": 4, "logits_soft_cap": 5.0, "rms_norm_eps": 1e-6,
                 "block_types": kinds, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                 "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf_config, f)
    config, variables = fm.load_hf_recurrentgemma(str(tmp_path))
    _, ours = jax.jit(fm.Griffin(config).apply)(variables, tokens)
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_errors_name_the_problem(tmp_path):
    config = _config()
    variables = _random_variables(config)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        hf_lib.config_to_hf(_config(logits_soft_cap=None))
    with pytest.raises(ValueError, match="embeddings_scale_by_sqrt_dim"):
        hf_lib.config_to_hf(_config(embeddings_scale_by_sqrt_dim=False))
    hf = hf_lib.config_to_hf(config)
    for change, match in ((dict(model_type="gemma"), "model_type"),
                          (dict(tie_word_embeddings=False), "tie_word_embeddings"),
                          (dict(hidden_activation="silu"), "hidden_activation"),
                          (dict(attention_dropout=0.1), "attention_dropout"),
                          (dict(rope_parameters={"rope_type": "linear"}), "rope_type")):
        with pytest.raises(ValueError, match=match):
            hf_lib.config_from_hf({**hf, **change})
    # Fields a file may omit take transformers' defaults, where ours differ;
    # transformers 4.40 wrote the block pattern as _block_types.
    bare = {k: v for k, v in hf.items() if k not in (
        "attention_window_size", "pad_token_id", "eos_token_id", "bos_token_id", "block_types")}
    pattern = ["attention", "recurrent"]
    assert hf_lib.config_from_hf({**bare, "_block_types": pattern}) == dataclasses.replace(
        config, attention_window_size=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        block_types=tuple(pattern))
    # Overrides may set only what does not change the model's function.
    assert hf_lib.config_from_hf(hf, eos_token_id=7, scan_impl="sequential") == \
        dataclasses.replace(config, eos_token_id=7, scan_impl="sequential")
    for load in (lambda **kw: hf_lib.config_from_hf(hf, **kw),
                 lambda **kw: fm.load_hf_recurrentgemma(str(tmp_path), **kw)):
        with pytest.raises(ValueError, match=r"overrides may set only .*config.json.*"
                                             r"got \['hidden_size'\]"):
            load(hidden_size=32)
    tensors = hf_lib.params_to_hf(config, variables)
    with pytest.raises(ValueError, match="model.final_norm.weight"):
        hf_lib.params_from_hf(config, {k: v for k, v in tensors.items()
                                       if k != "model.final_norm.weight"})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_lib.params_from_hf(config, {**tensors, "lm_head.weight": tensors[
            "model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match="does not use"):
        hf_lib.params_from_hf(config, {**tensors, "model.layers.9.x": np.zeros(2)})
    with pytest.raises(FileNotFoundError, match="config.json"):
        fm.load_hf_recurrentgemma(str(tmp_path))


@contextlib.contextmanager
def _torch_default_dtype(torch):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.interop
def test_transformers_pytorch_model_gives_our_logits(tmp_path):
    """On the first W tokens the two attention windows agree (Hugging Face
    admits W keys, the reference and we W + 1), so the logits must match
    there; past them they differ by design, and the numbers are printed."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    window = 8
    config = _config(num_hidden_layers=3, attention_window_size=window)
    variables = _random_variables(config, seed=5)
    fm.save_hf_recurrentgemma(str(tmp_path), config, variables)
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (2, 2 * window), 0, V))
    _, ours = fm.Griffin(config).apply(variables, jnp.asarray(tokens))
    with _torch_default_dtype(torch):
        model = transformers.RecurrentGemmaForCausalLM.from_pretrained(
            str(tmp_path), attn_implementation="eager").eval()
        with torch.no_grad():
            theirs = model(torch.as_tensor(tokens.copy()), use_cache=False).logits.numpy()
    ours = np.asarray(ours, np.float64)
    scale = np.abs(theirs).max()
    for name, part in (("first W tokens", slice(0, window)), ("after them", slice(window, None))):
        diff = np.abs(ours[:, part] - theirs[:, part])
        print(f"transformers {transformers.__version__} vs flax_minrnn, {name}: max abs "
              f"{diff.max():.3e}, max abs / max |logit| {diff.max() / scale:.3e}, max "
              f"elementwise rel {(diff / np.maximum(np.abs(theirs[:, part]), 1e-6)).max():.3e}")
    np.testing.assert_allclose(ours[:, :window], theirs[:, :window], rtol=1e-5,
                               atol=1e-5 * scale)
    # The whole difference is that one key: our window W - 1 is theirs W.
    narrower = fm.GriffinConfig(**{**config.__dict__, "attention_window_size": window - 1})
    _, ours = fm.Griffin(narrower).apply(variables, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, rtol=1e-5,
                               atol=1e-5 * scale)
