"""Checkpoints of the official ``recurrentgemma`` JAX package, both ways.

:func:`from_recurrentgemma` turns the parameters of
``recurrentgemma.jax.Griffin`` (and its ``recurrentgemma.GriffinConfig``) into
a :class:`~flax_minrnn.GriffinConfig` and variables of
:class:`~flax_minrnn.Griffin` that give the same logits;
:func:`to_recurrentgemma` goes back.  Every tensor is copied, reshaped or
concatenated, never recomputed, so a round trip is bit-exact, and both
functions trace (``jax.eval_shape`` converts the 2B and 9B trees without
memory).

The correspondence (``i`` a layer, the package's names on the left)::

    embedder/input_embedding                 embedder/embedding
    blocks.i/{temporal,channel}_pre_norm/scale
                                             blocks_i/{...}/scale_delta  (both 1 + s)
    blocks.i/recurrent_block/linear_{x,y,out}  same names
    blocks.i/recurrent_block/conv_1d/{w, b}  .../conv_1d/{kernel, bias}
    blocks.i/recurrent_block/rg_lru/{a_gate, input_gate}/{w, b}
                                             .../rg_lru/{...}/{kernel, bias}
    blocks.i/recurrent_block/rg_lru/a_param  same
    blocks.i/attention_block/proj_{q,k,v,final}  same
    blocks.i/mlp_block/ffw_up/w  (2, H, E)   blocks_i/mlp_block/up/kernel (H, 2E)
    blocks.i/mlp_block/ffw_up/b  (2,1,1,E)   blocks_i/mlp_block/up/bias (2E,)
    blocks.i/mlp_block/ffw_down              blocks_i/mlp_block/down
    final_norm/scale                         final_norm/scale_delta

What the package's config cannot express (it has one key/value head, a
width-4 convolution, RoPE on half of each head with base 10000, RMSNorm
epsilon ``1e-6``, GELU (tanh), no attention biases) is fixed on the way in
and checked on the way out.  The package is imported only by
:func:`to_recurrentgemma`, which builds its config object.
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple

import jax.numpy as jnp

from flax_minrnn.models import griffin as griffin_lib
from flax_minrnn.ops import checks

__all__ = ["from_recurrentgemma", "to_recurrentgemma", "config_from_recurrentgemma",
           "config_to_recurrentgemma", "check_params"]

# What recurrentgemma.jax.Griffin hard-codes.
_FIXED = dict(num_key_value_heads=1, conv1d_width=4, partial_rotary_factor=0.5,
              rope_theta=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
              attention_bias=False)
_KINDS = {"RECURRENT": "recurrent", "ATTENTION": "attention"}
# recurrentgemma.ScanType names and our scan_impl of the same algorithm; the
# implementation never changes the function, only how it is computed.
_SCAN_TYPES = {"AUTO": "auto", "LINEAR_NATIVE": "sequential",
               "ASSOCIATIVE_NATIVE": "associative", "LINEAR_PALLAS": "pallas"}


def _scan_impl(rg_config) -> str:
    value = getattr(rg_config, "scan_type", None)
    if value is None:
        return "auto"
    name = getattr(value, "name", value)
    if not isinstance(name, str) or name.upper() not in _SCAN_TYPES:
        raise ValueError(f"rg_config.scan_type must be a recurrentgemma ScanType "
                         f"({', '.join(_SCAN_TYPES)}), got {value!r}")
    return _SCAN_TYPES[name.upper()]


def _kind(value, i: int) -> str:
    name = getattr(value, "name", value)
    if not isinstance(name, str) or name.upper() not in _KINDS:
        raise ValueError(f"rg_config.block_types[{i}] must be a recurrentgemma "
                         f"TemporalBlockType (RECURRENT or ATTENTION), got {value!r}")
    return _KINDS[name.upper()]


def _period(kinds: Tuple[str, ...]) -> Tuple[str, ...]:
    """The shortest pattern whose cycle gives ``kinds`` (GriffinConfig cycles block_types)."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return kinds[:p]
    return kinds


def config_from_recurrentgemma(rg_config, **overrides) -> griffin_lib.GriffinConfig:
    """The :class:`~flax_minrnn.GriffinConfig` of a ``recurrentgemma.GriffinConfig``.

    ``overrides`` set the fields the package's config does not have and that
    do not change the model's function: ``dtype``, ``param_dtype``,
    ``scan_impl`` and the special token ids.  ``scan_impl`` defaults to the
    implementation of ``rg_config.scan_type`` (``AUTO``: ``'auto'``,
    ``LINEAR_NATIVE``: ``'sequential'``, ``ASSOCIATIVE_NATIVE``:
    ``'associative'``, ``LINEAR_PALLAS``: ``'pallas'``).
    """
    fields = ("vocab_size", "width", "mlp_expanded_width", "num_heads", "block_types",
              "embeddings_scale_by_sqrt_dim", "attention_window_size", "logits_soft_cap")
    missing = [f for f in fields if not hasattr(rg_config, f)]
    if missing:
        raise TypeError(f"rg_config must be a recurrentgemma.GriffinConfig; "
                        f"{type(rg_config).__name__} has no {missing}")
    griffin_lib.check_overrides(overrides, "rg_config")
    kinds = tuple(_kind(v, i) for i, v in enumerate(rg_config.block_types))
    cap = float(rg_config.logits_soft_cap)
    values = dict(_FIXED, vocab_size=int(rg_config.vocab_size),
                  num_hidden_layers=len(kinds), hidden_size=int(rg_config.width),
                  intermediate_size=2 * int(rg_config.mlp_expanded_width),
                  num_attention_heads=int(rg_config.num_heads),
                  lru_width=(None if getattr(rg_config, "lru_width", None) is None
                             else int(rg_config.lru_width)),
                  attention_window_size=int(rg_config.attention_window_size),
                  logits_soft_cap=cap if cap else None, block_types=_period(kinds),
                  embeddings_scale_by_sqrt_dim=bool(rg_config.embeddings_scale_by_sqrt_dim),
                  scan_impl=_scan_impl(rg_config))
    values.update(overrides)
    return griffin_lib.GriffinConfig(**values)


def config_to_recurrentgemma(config: griffin_lib.GriffinConfig):
    """The ``recurrentgemma.GriffinConfig`` of ``config``.

    ``scan_type`` is the package's name for ``config.scan_impl`` (see
    :func:`config_from_recurrentgemma`); ``'chunked'`` and ``'native'``, which
    the package lacks, become ``AUTO``.

    Raises:
      ImportError: the ``recurrentgemma`` package is not installed.
      ValueError: ``config`` uses something the package cannot express (the
        message names the field).
    """
    _check_expressible(config)
    from recurrentgemma import common as rg_common  # pylint: disable=import-outside-toplevel

    scan_type = {v: k for k, v in _SCAN_TYPES.items()}.get(config.scan_impl, "AUTO")
    kinds = {"recurrent": rg_common.TemporalBlockType.RECURRENT,
             "attention": rg_common.TemporalBlockType.ATTENTION}
    return rg_common.GriffinConfig(
        vocab_size=config.vocab_size, width=config.hidden_size,
        mlp_expanded_width=config.mlp_width, num_heads=config.num_attention_heads,
        block_types=tuple(kinds[k] for k in config.layer_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window_size,
        logits_soft_cap=float(config.logits_soft_cap or 0.0),
        lru_width=config.lru_width, scan_type=rg_common.ScanType[scan_type])


def _check_expressible(config: griffin_lib.GriffinConfig) -> None:
    if not isinstance(config, griffin_lib.GriffinConfig):
        raise TypeError(f"config must be a GriffinConfig, got {type(config).__name__}")
    for name, value in _FIXED.items():
        if getattr(config, name) != value:
            raise ValueError(f"recurrentgemma.jax.Griffin has {name}={value!r}; "
                             f"config has {name}={getattr(config, name)!r}")
    if config.state_width % 2:
        raise ValueError(f"recurrentgemma.jax.Griffin needs an even RG-LRU width; config has "
                         f"lru_width={config.lru_width!r} (width {config.state_width})")
    init = 2.0 / config.num_hidden_layers
    if config.final_w_init_variance_scale not in (None, init):
        raise ValueError(f"recurrentgemma.jax.Griffin has final_w_init_variance_scale = "
                         f"2 / num_hidden_layers = {init}; config has "
                         f"final_w_init_variance_scale={config.final_w_init_variance_scale!r}")


def _get(tree: Mapping, path: str):
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"params has no '{path}' (missing '{key}'); is it a "
                             f"recurrentgemma.jax.Griffin tree?")
        node = node[key]
    return node


def from_recurrentgemma(params, rg_config, **overrides) -> Tuple[griffin_lib.GriffinConfig,
                                                                  Any]:
    """Converts a ``recurrentgemma.jax.Griffin`` checkpoint.

    Usage::

        config, variables = fm.from_recurrentgemma(rg_params, rg_config)
        carry, logits = fm.Griffin(config).apply(variables, tokens)

    Args:
      params: the package's parameters, ``{'params': ...}`` or the inner dict
        (e.g. from ``recurrentgemma.jax.load_parameters``); arrays, tracers or
        ``jax.ShapeDtypeStruct`` under ``jax.eval_shape``.
      rg_config: its ``recurrentgemma.GriffinConfig``.
      **overrides: ``dtype``, ``param_dtype``, ``scan_impl`` or token ids of
        the :class:`~flax_minrnn.GriffinConfig` (``param_dtype`` defaults to
        the embedding's dtype, as :func:`~flax_minrnn.load_hf_recurrentgemma`
        does).

    Returns:
      ``(config, variables)``: a :class:`~flax_minrnn.GriffinConfig` and
      ``{'params': ...}`` for :class:`~flax_minrnn.Griffin`, holding the same
      arrays (dtype unchanged).

    Raises:
      TypeError / ValueError: ``rg_config`` is not a package config, or
        ``params`` lacks a tensor of it, has one of another shape, or has a
        tensor that ``recurrentgemma.jax.Griffin(rg_config)`` does not have.
    """
    inner, _ = checks.unwrap_params(params)
    if "param_dtype" not in overrides:
        embedding = _get(inner, "embedder/input_embedding")
        overrides = dict(overrides, param_dtype=jnp.dtype(embedding.dtype).type)
    config = config_from_recurrentgemma(rg_config, **overrides)
    read = set()  # The package's paths of the leaves copied.

    def get(path):
        node = _get(inner, path)
        if isinstance(node, Mapping):
            read.update(p for p, _ in _flatten(node, path))
        else:
            read.add(path)
        return node

    out = {"embedder": {"embedding": get("embedder/input_embedding")},
           "final_norm": {"scale_delta": get("final_norm/scale")}}
    for i, kind in enumerate(config.layer_types):
        src = f"blocks.{i}"
        if not isinstance(inner.get(src), Mapping):
            raise ValueError(f"params has no '{src}' but rg_config has "
                             f"{config.num_hidden_layers} blocks")
        other = "attention" if kind == "recurrent" else "recurrent"
        if f"{kind}_block" not in inner[src] and f"{other}_block" in inner[src]:
            raise ValueError(f"params' {src} is {'an' if other == 'attention' else 'a'} "
                             f"{other} block, but rg_config.block_types[{i}] is "
                             f"{kind.upper()}")
        block = {"temporal_pre_norm": {"scale_delta": get(f"{src}/temporal_pre_norm/scale")},
                 "channel_pre_norm": {"scale_delta": get(f"{src}/channel_pre_norm/scale")}}
        if kind == "recurrent":
            rec = f"{src}/recurrent_block"
            block["recurrent_block"] = {
                **{name: dict(get(f"{rec}/{name}"))
                   for name in ("linear_x", "linear_y", "linear_out")},
                "conv_1d": {"kernel": get(f"{rec}/conv_1d/w"),
                            "bias": get(f"{rec}/conv_1d/b")},
                "rg_lru": {"a_param": get(f"{rec}/rg_lru/a_param"),
                           **{g: {"kernel": get(f"{rec}/rg_lru/{g}/w"),
                                  "bias": get(f"{rec}/rg_lru/{g}/b")}
                              for g in ("a_gate", "input_gate")}}}
        else:
            att = f"{src}/attention_block"
            block["attention_block"] = {name: dict(get(f"{att}/{name}"))
                                        for name in ("proj_q", "proj_k", "proj_v", "proj_final")}
        w, b = get(f"{src}/mlp_block/ffw_up/w"), get(f"{src}/mlp_block/ffw_up/b")
        e = config.mlp_width
        if tuple(w.shape) != (2, config.hidden_size, e) or tuple(b.shape) != (2, 1, 1, e):
            raise ValueError(f"{src}/mlp_block/ffw_up must have w (2, {config.hidden_size}, {e})"
                             f" and b (2, 1, 1, {e}), got {tuple(w.shape)} and {tuple(b.shape)}")
        block["mlp_block"] = {
            "up": {"kernel": jnp.concatenate([w[0], w[1]], axis=1),
                   "bias": jnp.concatenate([b[0, 0, 0], b[1, 0, 0]], axis=0)},
            "down": dict(get(f"{src}/mlp_block/ffw_down"))}
        out[f"blocks_{i}"] = block
    unexpected = sorted(set(p for p, _ in _flatten(inner)) - read)
    if unexpected:
        raise ValueError(
            f"params has tensors that recurrentgemma.jax.Griffin(rg_config) does not have "
            f"(rg_config has {config.num_hidden_layers} blocks): {unexpected[:8]}"
            + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    check_params(config, out)
    return config, {"params": out}


def check_params(config: griffin_lib.GriffinConfig, params) -> None:
    """Raises ``ValueError`` unless ``params`` (the inner dict) has exactly the
    tensors of ``Griffin(config)``, with its shapes (checked abstractly)."""
    import jax  # pylint: disable=import-outside-toplevel

    want = jax.eval_shape(griffin_lib.Griffin(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"]
    want_flat = dict(_flatten(want))
    got_flat = dict(_flatten(params))
    if set(want_flat) != set(got_flat):
        missing = sorted(set(want_flat) - set(got_flat))
        unexpected = sorted(set(got_flat) - set(want_flat))
        raise ValueError(f"params do not match Griffin(config): missing {missing}, "
                         f"unexpected {unexpected}")
    for key, leaf in got_flat.items():
        if tuple(leaf.shape) != tuple(want_flat[key].shape):
            raise ValueError(f"params tensor for {key} has shape {tuple(leaf.shape)}; the "
                             f"config needs {tuple(want_flat[key].shape)}")


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            yield from _flatten(value, path)
        else:
            yield path, value


def to_recurrentgemma(config: griffin_lib.GriffinConfig, variables) -> Tuple[Any, Any]:
    """Converts :class:`~flax_minrnn.Griffin` variables to the package's layout.

    Usage::

        rg_params, rg_config = fm.to_recurrentgemma(config, variables)
        model = recurrentgemma.jax.Griffin(rg_config)
        logits, cache = model.apply(rg_params, tokens, segment_pos)

    Args:
      config: the :class:`~flax_minrnn.GriffinConfig`.
      variables: ``{'params': ...}`` (or the inner dict) of ``Griffin(config)``.

    Returns:
      ``(params, rg_config)``: ``{'params': ...}`` for
      ``recurrentgemma.jax.Griffin`` and its ``recurrentgemma.GriffinConfig``.

    Raises:
      ImportError: ``recurrentgemma`` is not installed (only the config needs it).
      ValueError: ``config`` uses a feature the package lacks (named), or the
        variables do not match ``config``.
    """
    rg_config = config_to_recurrentgemma(config)
    inner, _ = checks.unwrap_params(variables)
    check_params(config, inner)
    out = {"embedder": {"input_embedding": inner["embedder"]["embedding"]},
           "final_norm": {"scale": inner["final_norm"]["scale_delta"]}}
    e = config.mlp_width
    for i, kind in enumerate(config.layer_types):
        src = inner[f"blocks_{i}"]
        block = {"temporal_pre_norm": {"scale": src["temporal_pre_norm"]["scale_delta"]},
                 "channel_pre_norm": {"scale": src["channel_pre_norm"]["scale_delta"]}}
        if kind == "recurrent":
            rec = src["recurrent_block"]
            block["recurrent_block"] = {
                **{name: dict(rec[name]) for name in ("linear_x", "linear_y", "linear_out")},
                "conv_1d": {"w": rec["conv_1d"]["kernel"], "b": rec["conv_1d"]["bias"]},
                "rg_lru": {"a_param": rec["rg_lru"]["a_param"],
                           **{g: {"w": rec["rg_lru"][g]["kernel"], "b": rec["rg_lru"][g]["bias"]}
                              for g in ("a_gate", "input_gate")}}}
        else:
            block["attention_block"] = {name: dict(src["attention_block"][name])
                                        for name in ("proj_q", "proj_k", "proj_v", "proj_final")}
        up = src["mlp_block"]["up"]
        block["mlp_block"] = {
            "ffw_up": {"w": jnp.stack([up["kernel"][:, :e], up["kernel"][:, e:]], axis=0),
                       "b": jnp.stack([up["bias"][:e], up["bias"][e:]], axis=0)
                       .reshape(2, 1, 1, e)},
            "ffw_down": dict(src["mlp_block"]["down"])}
        out[f"blocks.{i}"] = block
    return {"params": out}, rg_config
