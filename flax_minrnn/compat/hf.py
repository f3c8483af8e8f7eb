"""Hugging Face ``RecurrentGemmaForCausalLM`` checkpoints: ``config.json`` and safetensors.

:func:`load_hf_recurrentgemma` reads a checkpoint directory (one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``)
into a :class:`~flax_minrnn.GriffinConfig` and :class:`~flax_minrnn.Griffin`
variables; :func:`save_hf_recurrentgemma` writes one.  Tensors go through the
``safetensors`` package's NumPy API: no PyTorch needed.  The pure mappings are
:func:`config_from_hf` / :func:`config_to_hf` and :func:`params_from_hf` /
:func:`params_to_hf`.

The layout (``i`` a layer; Hugging Face's ``nn.Linear`` stores ``(out, in)``,
our kernels ``(in, out)``, hence the transposes ``.T``)::

    model.embed_tokens.weight                 embedder/embedding   (lm_head tied: not stored)
    model.layers.i.{temporal,channel}_pre_norm.weight
                                              blocks_i/{...}/scale_delta  (both 1 + w)
    model.layers.i.temporal_block.linear_{x,y,out}.{weight.T, bias}
                                              blocks_i/recurrent_block/linear_{...}
    model.layers.i.temporal_block.conv_1d.weight (L, 1, K)
                                              .../conv_1d/kernel (K, L)
    model.layers.i.temporal_block.rg_lru.recurrent_param      .../rg_lru/a_param
    model.layers.i.temporal_block.rg_lru.{input,recurrent}_gate_{weight,bias}
                                              .../rg_lru/{input_gate,a_gate}/{kernel,bias}
    model.layers.i.temporal_block.{q,k,v,o}_proj.{weight.T[, bias]}
                                              blocks_i/attention_block/proj_{q,k,v,final}
    model.layers.i.mlp_block.{gate,up}_proj.{weight.T, bias}
                                              blocks_i/mlp_block/up  (gate first, then up)
    model.layers.i.mlp_block.down_proj        blocks_i/mlp_block/down
    model.final_norm.weight                   final_norm/scale_delta

``intermediate_size`` means the same on both sides: twice the MLP width
(Hugging Face's MLP projects to ``intermediate_size // 2``).  Every tensor is
copied, transposed or split, never recomputed, so ours -> files -> ours is
bit-exact.  Hugging Face's attention mask admits ``W`` keys where the
reference (and :class:`~flax_minrnn.Griffin`) admits ``W + 1``; see
:mod:`flax_minrnn.nn.attention`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from flax_minrnn.models import griffin as griffin_lib
from flax_minrnn.ops import checks

__all__ = ["load_hf_recurrentgemma", "save_hf_recurrentgemma", "config_from_hf",
           "config_to_hf", "params_from_hf", "params_to_hf", "WEIGHTS_NAME",
           "WEIGHTS_INDEX_NAME", "CONFIG_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Hugging Face config fields copied as they are.
# RecurrentGemmaConfig's defaults where GriffinConfig's differ (a file may
# omit them; transformers then uses these).
_HF_DEFAULTS = {"attention_window_size": 2048, "pad_token_id": 0, "eos_token_id": 1,
                "bos_token_id": 2}
_SAME = ("vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size",
         "num_attention_heads", "attention_window_size", "conv1d_width", "rms_norm_eps",
         "hidden_activation", "attention_bias", "attention_dropout", "w_init_variance_scale",
         "pad_token_id", "bos_token_id")


def _safetensors():
    try:
        import safetensors.numpy as st  # pylint: disable=import-outside-toplevel
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("reading or writing Hugging Face checkpoints needs the "
                          "'safetensors' package (pip install safetensors)") from err
    return st


# ----------------------------------------------------------------------------
# config.json


def config_from_hf(hf: Mapping[str, Any], **overrides) -> griffin_lib.GriffinConfig:
    """The :class:`~flax_minrnn.GriffinConfig` of a ``RecurrentGemmaConfig`` dict.

    Reads both layouts of the rotary settings: ``rope_theta`` and
    ``partial_rotary_factor`` at the top level (the published config.json) or
    inside ``rope_parameters`` (transformers 5), and ``block_types`` also
    under its transformers 4.40 name ``_block_types``.  Missing fields take
    ``RecurrentGemmaConfig``'s defaults (``num_key_value_heads``:
    ``num_attention_heads``; ``attention_window_size`` 2048; token ids pad 0,
    eos 1, bos 2).

    Args:
      hf: the parsed ``config.json``.
      **overrides: fields that do not change the model's function:
        ``dtype``, ``param_dtype``, ``scan_impl`` (the file does not hold
        them) and the special token ids (which replace the file's).

    Raises:
      ValueError: a model type other than ``recurrent_gemma``, a missing field,
        a setting this library does not support, or an override of a field
        that changes the model (named).
    """
    if not isinstance(hf, Mapping):
        raise TypeError(f"hf must be the config.json dict, got {type(hf).__name__}")
    griffin_lib.check_overrides(overrides, "config.json")
    hf = {**_HF_DEFAULTS, **hf}
    model_type = hf.get("model_type", "recurrent_gemma")
    if model_type != "recurrent_gemma":
        raise ValueError(f"config.json has model_type={model_type!r}; expected 'recurrent_gemma'")
    missing = [k for k in ("vocab_size", "num_hidden_layers", "hidden_size",
                           "intermediate_size", "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings=False is not supported: Griffin's output "
                         "projection is the embedding")
    if not hf.get("embeddings_scale_by_sqrt_dim", True):
        raise ValueError("embeddings_scale_by_sqrt_dim=False: Hugging Face's model scales "
                         "the embeddings regardless, so the file is ambiguous")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported "
                         "(only 'default')")
    values = {k: hf[k] for k in _SAME if k in hf}
    values["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    values["partial_rotary_factor"] = float(rope.get(
        "partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    values["num_key_value_heads"] = int(hf.get("num_key_value_heads")
                                        or hf["num_attention_heads"])
    lru = hf.get("lru_width")
    values["lru_width"] = None if lru in (None, hf["hidden_size"]) else int(lru)
    cap = hf.get("logits_soft_cap", 30.0)
    values["logits_soft_cap"] = float(cap) if cap else None
    values["block_types"] = tuple(hf.get("block_types", hf.get(
        "_block_types", ("recurrent", "recurrent", "attention"))))
    eos = hf.get("eos_token_id", None)
    values["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else eos
    init = hf.get("final_w_init_variance_scale")
    if init is not None and not np.isclose(init, 2.0 / hf["num_hidden_layers"]):
        values["final_w_init_variance_scale"] = float(init)  # not the derived default
    if "attention_dropout" in values:
        values["attention_dropout"] = float(values["attention_dropout"])
    if "head_dim" in hf and hf["head_dim"] != hf["hidden_size"] // hf["num_attention_heads"]:
        raise ValueError(f"head_dim={hf['head_dim']} must be hidden_size // "
                         f"num_attention_heads (the only layout RecurrentGemma has)")
    values.update(overrides)
    return griffin_lib.GriffinConfig(**values)


def config_to_hf(config: griffin_lib.GriffinConfig) -> Dict[str, Any]:
    """The ``config.json`` dict (``RecurrentGemmaConfig``) of ``config``.

    Written in the published checkpoints' layout (``rope_theta`` and
    ``partial_rotary_factor`` at the top level), which transformers 4 and 5
    both read.

    Raises:
      ValueError: ``config`` has no soft cap (Hugging Face always applies
        one) or no embedding scale (always applied there).
    """
    if not isinstance(config, griffin_lib.GriffinConfig):
        raise TypeError(f"config must be a GriffinConfig, got {type(config).__name__}")
    if not config.logits_soft_cap:
        raise ValueError("logits_soft_cap must be set: Hugging Face's model always caps the "
                         "logits (a missing cap divides by zero there)")
    if not config.embeddings_scale_by_sqrt_dim:
        raise ValueError("embeddings_scale_by_sqrt_dim must be True: Hugging Face's model "
                         "always scales the embeddings")
    eos = config.eos_token_id
    out = {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": "recurrent_gemma",
        **{k: getattr(config, k) for k in _SAME},
        "num_key_value_heads": config.num_key_value_heads,
        "lru_width": config.state_width,
        "logits_soft_cap": float(config.logits_soft_cap),
        "block_types": list(config.block_types),
        "rope_theta": float(config.rope_theta),
        "partial_rotary_factor": float(config.partial_rotary_factor),
        "head_dim": config.head_dim,
        "final_w_init_variance_scale": float(config.final_init_scale),
        "embeddings_scale_by_sqrt_dim": True,
        "tie_word_embeddings": True,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "torch_dtype": np.dtype(config.param_dtype).name,
    }
    return out


# ----------------------------------------------------------------------------
# Tensors.


def _linear(tensors, name: str, bias: bool = True) -> Dict[str, np.ndarray]:
    out = {"kernel": np.ascontiguousarray(_take(tensors, f"{name}.weight").T)}
    if bias:
        out["bias"] = _take(tensors, f"{name}.bias")
    return out


def _take(tensors, key: str) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"the checkpoint has no tensor '{key}'")
    return np.asarray(tensors[key])


def params_from_hf(config: griffin_lib.GriffinConfig,
                   tensors: Mapping[str, Any]) -> Dict[str, Any]:
    """``{'params': ...}`` of :class:`~flax_minrnn.Griffin` from Hugging Face tensors.

    Args:
      config: the model's config (from :func:`config_from_hf`).
      tensors: name -> array, the state dict (``lm_head.weight``, if present,
        must equal the embedding: the weights are tied).

    Raises:
      ValueError: a missing, unexpected or misshaped tensor (named).
    """
    used = set()

    class _Tracked(dict):
        def __getitem__(self, key):
            used.add(key)
            return dict.__getitem__(self, key)

    t = _Tracked(tensors)
    p = "model."
    out: Dict[str, Any] = {"embedder": {"embedding": _take(t, p + "embed_tokens.weight")},
                           "final_norm": {"scale_delta": _take(t, p + "final_norm.weight")}}
    e = config.mlp_width
    for i, kind in enumerate(config.layer_types):
        q = f"{p}layers.{i}."
        block = {"temporal_pre_norm": {"scale_delta": _take(t, q + "temporal_pre_norm.weight")},
                 "channel_pre_norm": {"scale_delta": _take(t, q + "channel_pre_norm.weight")}}
        tb = q + "temporal_block."
        if kind == "recurrent":
            conv = _take(t, tb + "conv_1d.weight")
            if conv.ndim != 3 or conv.shape[1] != 1:
                raise ValueError(f"{tb}conv_1d.weight must be (lru_width, 1, conv1d_width) "
                                 f"(depthwise), got {conv.shape}")
            block["recurrent_block"] = {
                **{n: _linear(t, tb + n) for n in ("linear_x", "linear_y", "linear_out")},
                "conv_1d": {"kernel": np.ascontiguousarray(conv[:, 0, :].T),
                            "bias": _take(t, tb + "conv_1d.bias")},
                "rg_lru": {"a_param": _take(t, tb + "rg_lru.recurrent_param"),
                           "input_gate": {"kernel": _take(t, tb + "rg_lru.input_gate_weight"),
                                          "bias": _take(t, tb + "rg_lru.input_gate_bias")},
                           "a_gate": {"kernel": _take(t, tb + "rg_lru.recurrent_gate_weight"),
                                      "bias": _take(t, tb + "rg_lru.recurrent_gate_bias")}}}
        else:
            bias = config.attention_bias
            block["attention_block"] = {
                "proj_q": _linear(t, tb + "q_proj", bias),
                "proj_k": _linear(t, tb + "k_proj", bias),
                "proj_v": _linear(t, tb + "v_proj", bias),
                "proj_final": _linear(t, tb + "o_proj")}
        gate, up = _linear(t, q + "mlp_block.gate_proj"), _linear(t, q + "mlp_block.up_proj")
        for name, lin in (("gate_proj", gate), ("up_proj", up)):
            if lin["kernel"].shape != (config.hidden_size, e):
                raise ValueError(f"{q}mlp_block.{name}.weight must be ({e}, {config.hidden_size})"
                                 f" (intermediate_size // 2, hidden_size), got "
                                 f"{lin['kernel'].T.shape}")
        block["mlp_block"] = {
            "up": {"kernel": np.concatenate([gate["kernel"], up["kernel"]], axis=1),
                   "bias": np.concatenate([gate["bias"], up["bias"]])},
            "down": _linear(t, q + "mlp_block.down_proj")}
        out[f"blocks_{i}"] = block
    if "lm_head.weight" in tensors:
        used.add("lm_head.weight")
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]),
                              out["embedder"]["embedding"]):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight; Griffin "
                             "ties them (tie_word_embeddings)")
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"the checkpoint has tensors this config does not use: {unexpected}")
    from flax_minrnn.compat import recurrentgemma as rg_lib  # pylint: disable=import-outside-toplevel
    rg_lib.check_params(config, out)
    return {"params": out}


def params_to_hf(config: griffin_lib.GriffinConfig, variables) -> Dict[str, np.ndarray]:
    """Hugging Face's state dict (NumPy, contiguous) of Griffin ``variables``.

    ``lm_head.weight`` is left out: Hugging Face ties it to the embedding.
    """
    inner, _ = checks.unwrap_params(variables)
    from flax_minrnn.compat import recurrentgemma as rg_lib  # pylint: disable=import-outside-toplevel
    rg_lib.check_params(config, inner)
    a = lambda x: np.ascontiguousarray(np.asarray(x))
    out = {"model.embed_tokens.weight": a(inner["embedder"]["embedding"]),
           "model.final_norm.weight": a(inner["final_norm"]["scale_delta"])}

    def linear(prefix, lin):
        out[prefix + ".weight"] = a(np.asarray(lin["kernel"]).T)
        if "bias" in lin:
            out[prefix + ".bias"] = a(lin["bias"])

    e = config.mlp_width
    for i, kind in enumerate(config.layer_types):
        src, q = inner[f"blocks_{i}"], f"model.layers.{i}."
        out[q + "temporal_pre_norm.weight"] = a(src["temporal_pre_norm"]["scale_delta"])
        out[q + "channel_pre_norm.weight"] = a(src["channel_pre_norm"]["scale_delta"])
        tb = q + "temporal_block."
        if kind == "recurrent":
            rec = src["recurrent_block"]
            for n in ("linear_x", "linear_y", "linear_out"):
                linear(tb + n, rec[n])
            out[tb + "conv_1d.weight"] = a(np.asarray(rec["conv_1d"]["kernel"]).T[:, None, :])
            out[tb + "conv_1d.bias"] = a(rec["conv_1d"]["bias"])
            lru = rec["rg_lru"]
            out[tb + "rg_lru.recurrent_param"] = a(lru["a_param"])
            out[tb + "rg_lru.input_gate_weight"] = a(lru["input_gate"]["kernel"])
            out[tb + "rg_lru.input_gate_bias"] = a(lru["input_gate"]["bias"])
            out[tb + "rg_lru.recurrent_gate_weight"] = a(lru["a_gate"]["kernel"])
            out[tb + "rg_lru.recurrent_gate_bias"] = a(lru["a_gate"]["bias"])
        else:
            att = src["attention_block"]
            for ours, theirs in (("proj_q", "q_proj"), ("proj_k", "k_proj"),
                                 ("proj_v", "v_proj"), ("proj_final", "o_proj")):
                linear(tb + theirs, att[ours])
        up = src["mlp_block"]["up"]
        kernel, bias = np.asarray(up["kernel"]), np.asarray(up["bias"])
        linear(q + "mlp_block.gate_proj", {"kernel": kernel[:, :e], "bias": bias[:e]})
        linear(q + "mlp_block.up_proj", {"kernel": kernel[:, e:], "bias": bias[e:]})
        linear(q + "mlp_block.down_proj", src["mlp_block"]["down"])
    return out


# ----------------------------------------------------------------------------
# Directories.


def load_hf_recurrentgemma(directory: str, **overrides) -> Tuple[griffin_lib.GriffinConfig,
                                                                  Dict[str, Any]]:
    """Reads a ``RecurrentGemmaForCausalLM`` checkpoint directory.

    Usage::

        config, variables = fm.load_hf_recurrentgemma("recurrentgemma-2b")
        carry, logits = fm.Griffin(config).apply(variables, tokens)

    Args:
      directory: holds ``config.json`` and ``model.safetensors``, or shards
        listed in ``model.safetensors.index.json`` (its ``weight_map``).
      **overrides: as in :func:`config_from_hf`: ``dtype``, ``param_dtype``
        (default: the weights' dtype), ``scan_impl`` and the special token
        ids.  The arrays keep the file's
        dtype (NumPy; bfloat16 via ``ml_dtypes``).

    Returns:
      ``(config, variables)`` for :class:`~flax_minrnn.Griffin`.

    Raises:
      FileNotFoundError: no config or weights; ValueError: see
        :func:`config_from_hf` and :func:`params_from_hf`.
    """
    griffin_lib.check_overrides(overrides, "config.json")  # Before reading the weights.
    st = _safetensors()
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        hf_config = json.load(f)
    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.exists(single):
        tensors = dict(st.load_file(single))
    elif os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, Mapping):
            raise ValueError(f"{index} has no 'weight_map' dict")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            for key, value in st.load_file(os.path.join(directory, shard)).items():
                if weight_map.get(key) != shard:
                    raise ValueError(f"{shard} holds '{key}', which {WEIGHTS_INDEX_NAME} "
                                     f"places in {weight_map.get(key)!r}")
                tensors[key] = value
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{WEIGHTS_INDEX_NAME} lists tensors no shard holds: {absent}")
    else:
        raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
    embedding = tensors.get("model.embed_tokens.weight")
    if embedding is not None and "param_dtype" not in overrides:
        overrides = dict(overrides, param_dtype=jnp.dtype(embedding.dtype).type)
    config = config_from_hf(hf_config, **overrides)
    return config, params_from_hf(config, tensors)


def save_hf_recurrentgemma(directory: str, config: griffin_lib.GriffinConfig, variables, *,
                           max_shard_bytes: Optional[int] = None) -> None:
    """Writes ``config.json`` and the weights as ``RecurrentGemmaForCausalLM`` reads them.

    Args:
      directory: created if needed.
      config: the model's :class:`~flax_minrnn.GriffinConfig`.
      variables: ``Griffin(config)``'s variables.
      max_shard_bytes: split the weights into ``model-0000k-of-0000n.safetensors``
        files of at most this many bytes (a tensor is never split) with a
        ``model.safetensors.index.json``; ``None``: one ``model.safetensors``.
    """
    st = _safetensors()
    hf_config = config_to_hf(config)
    tensors = params_to_hf(config, variables)
    os.makedirs(directory, exist_ok=True)
    shards = [dict(tensors)]
    if max_shard_bytes is not None:
        if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        shards, size = [{}], 0
        for key, value in tensors.items():
            if shards[-1] and size + value.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = value
            size += value.nbytes
    metadata = {"format": "pt"}  # what transformers expects in the header
    if len(shards) == 1 and max_shard_bytes is None:
        st.save_file(shards[0], os.path.join(directory, WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            st.save_file(shard, os.path.join(directory, name), metadata=metadata)
            weight_map.update({key: name for key in shard})
        total = sum(v.nbytes for v in tensors.values())
        with open(os.path.join(directory, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
