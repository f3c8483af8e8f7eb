"""The API of the ``flax-gated-linear-rnn`` package on this library's layers.

The package's public names are exported here with its constructors and call
signatures, so its README snippets run after changing one import line::

    from flax_gated_linear_rnn import GatedLinearRNN, GatedLinearRNNLM       # before
    from flax_minrnn.compat.flax_gated_linear_rnn import GatedLinearRNN, GatedLinearRNNLM

* :class:`GatedLinearRNN`: :class:`flax_minrnn.GatedLinearRNN` taking the
  package's positional order ``(d_model, d_h, input_activation,
  hidden_activation, gate_activation, use_true_recurrence,
  use_tied_gates)`` (the native layer's starts ``(d_h, d_model, ...)``), and
  ``apply(params, x, carry=None) -> (carry, y)``;
* :class:`GatedLinearRNNLM`: the package's language model;
* :func:`from_flax_gated_linear_rnn`: converts the package's parameters, of
  one ``GatedLinearRNN`` layer or of a whole ``GatedLinearRNNLM``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.models import lm as lm_lib
from flax_minrnn.nn import blocks
from flax_minrnn.nn import dense as dense_lib
from flax_minrnn.nn import recurrent as layers_lib
from flax_minrnn.ops import checks

Array = jax.Array
Params = Any

__all__ = ["GatedLinearRNN", "GatedLinearRNNLM", "from_flax_gated_linear_rnn"]

# The package's constructor order; the native layer's fields start (d_h, d_model, ...).
_LAYER_ORDER = ("d_model", "d_h", "input_activation", "hidden_activation", "gate_activation",
                "use_true_recurrence", "use_tied_gates")


class GatedLinearRNN(layers_lib.GatedLinearRNN):
    """:class:`flax_minrnn.GatedLinearRNN` with the package's positional
    order: ``GatedLinearRNN(d_model, d_h, input_activation, ...)``.  Keyword
    arguments, the fields, the parameters and ``apply`` are the native
    layer's."""


def _package_order_init(native_init):
    @functools.wraps(native_init)
    def __init__(self, *args, **kwargs):
        if len(args) > len(_LAYER_ORDER):
            raise TypeError(f"GatedLinearRNN takes at most {len(_LAYER_ORDER)} positional "
                            f"arguments {_LAYER_ORDER}, got {len(args)}")
        for key, value in zip(_LAYER_ORDER, args):
            if key in kwargs:
                raise TypeError(f"GatedLinearRNN got multiple values for argument {key!r}")
            kwargs[key] = value
        native_init(self, **kwargs)
    return __init__


GatedLinearRNN.__init__ = _package_order_init(GatedLinearRNN.__init__)


class _PackageTimeMixing(nn.Module):
    """``x + h``-then-dropout block of the package: ``dropout(x + glrnn(LN(x)))``."""

    eps: float
    dropout: float
    d_model: int
    d_h: int
    input_activation: Callable
    hidden_activation: Callable
    gate_activation: Callable
    use_true_recurrence: bool
    use_tied_gates: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, training: bool, carry=None, mask=None):
        u = blocks.Norm("layernorm", self.eps, self.dtype, self.param_dtype,
                  name="layer_norm_function")(x)
        h, y = layers_lib.GatedLinearRNN(
            d_h=self.d_h, d_model=self.d_model, input_activation=self.input_activation,
            hidden_activation=self.hidden_activation, gate_activation=self.gate_activation,
            use_true_recurrence=self.use_true_recurrence, use_tied_gates=self.use_tied_gates,
            dtype=self.dtype, param_dtype=self.param_dtype, name="model")(u, carry, mask=mask)
        x = x + y.astype(x.dtype)
        return h, nn.Dropout(rate=self.dropout, deterministic=not training)(x)


class _PackageChannelMixing(nn.Module):
    """``dropout(x + W_2 gelu(W_1 LN(x)))`` (the package's ``ChannelMixing``)."""

    d_model: int
    d_hidden: int
    eps: float
    dropout: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, training: bool):
        u = blocks.Norm("layernorm", self.eps, self.dtype, self.param_dtype, name="layer_norm")(x)
        u = nn.gelu(dense_lib.Dense(self.d_hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="dense_layers_0")(u))
        u = dense_lib.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="dense_layers_1")(u)
        return nn.Dropout(rate=self.dropout, deterministic=not training)(x + u)


class GatedLinearRNNLM(nn.Module):
    """Drop-in for ``flax_gated_linear_rnn.GatedLinearRNNLM`` (same constructor).

    Per layer ``l`` (the package's structure, dropout after the residual)::

        x <- dropout(x + GatedLinearRNN(LayerNorm(x)))          time mixing
        x <- dropout(x + W_2 gelu(W_1 LayerNorm(x)))            channel mixing

    then ``head`` (a Dense to ``output_vocab_size``) when ``use_head``.  The
    input is ``Embed(x) + pe(offset + t)`` (token ids) or ``dense_lib.Dense(x) + pe``
    (features, ``use_word_embedding=False``).

    Differences from the package (its bugs):

    * ``positional_encoding_mode='learned'`` works (the package crashes);
      positions past ``max_seq_length`` raise ``ValueError`` when concrete
      and are clipped under ``jax.jit``.  ``'sinusoidal'`` has no length
      limit.
    * positions continue across calls: pass ``offset`` (int or int
      ``(batch,)``, the number of tokens already consumed; default 0) with
      the ``carry`` of the previous call.  The carry keeps the package's shape
      ``(batch, n_layer, d_h)``, so chunked calls equal one full call.
    * ``mask`` (bool ``(batch, time)``) is honoured: masked steps leave every
      state unchanged and their outputs are zero before the residual.

    Parameter names follow the package (``input_function``, ``wpe``,
    ``time_mixing_layers_{l}/{layer_norm_function, model}``,
    ``channel_mixing_layers_{l}/{layer_norm, dense_layers_0, dense_layers_1}``,
    ``head``), except inside ``model`` (see :func:`from_flax_gated_linear_rnn`).

    Attributes (the package's constructor; those without a default are required):
      n_layer: number of blocks.
      d_model: residual width.
      d_channel_mixing: hidden width of the channel-mixing MLP.
      eps: LayerNorm epsilon.
      channel_mixing_dropout, time_mixing_dropout, embedding_dropout: dropout
        rates after each channel-mixing and time-mixing block and after the
        input embedding (active with ``training=True``).
      input_vocab_size: vocabulary of the token ids (unused, and may be
        ``None``, with ``use_word_embedding=False``).
      output_vocab_size: width of ``head``'s output.
      max_seq_length: number of learned positions (``'learned'`` only).
      use_word_embedding: token ids through ``Embed`` (True) or float features
        through a ``Dense`` (False).
      positional_encoding_mode: ``'none'``, ``'sinusoidal'`` or ``'learned'``.
      d_h: state width of every layer's :class:`flax_minrnn.GatedLinearRNN`.
      input_activation, hidden_activation, gate_activation: the layer's
        activations (default ``tanh``, ``tanh``, ``sigmoid``).
      use_true_recurrence: gates also see ``h_{t-1}`` (default False).
      use_tied_gates: forget gate ``1 - i`` (default True).
      use_head: end with ``head``; else return features.
      dtype: compute dtype (default float32); the carry is float32 (float64
        for a float64 computation).
      param_dtype: parameter dtype (default float32).
    """

    n_layer: int
    d_model: int
    d_channel_mixing: int
    eps: float
    channel_mixing_dropout: float
    time_mixing_dropout: float
    input_vocab_size: Optional[int]
    output_vocab_size: int
    max_seq_length: int
    embedding_dropout: float
    use_word_embedding: bool
    positional_encoding_mode: str
    use_head: bool
    d_h: int
    input_activation: Callable = nn.tanh
    hidden_activation: Callable = nn.tanh
    gate_activation: Callable = nn.sigmoid
    use_true_recurrence: bool = False
    use_tied_gates: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, training: bool = False, carry: Optional[Array] = None,
                 mask: Optional[Array] = None, offset=None) -> Tuple[Array, Array]:
        """Returns ``(carry, y)``: carry float32 ``(batch, n_layer, d_h)``, ``y``
        logits ``(batch, time, output_vocab_size)`` (or features without head).

        Args:
          x: int ``(batch, time)`` ids, or float ``(batch, time,
            input_vocab_size)`` features when ``use_word_embedding=False``.
          training: enables dropout (``'dropout'`` rng).
          carry: ``(batch, n_layer, d_h)`` from the previous call, or ``None``.
          mask: bool ``(batch, time)`` valid steps.
          offset: position of ``x[:, 0]`` (int or int ``(batch,)``).
        """
        checks.check_choice("positional_encoding_mode", self.positional_encoding_mode,
                lm_lib.POSITIONAL_ENCODINGS)
        for name in ("n_layer", "d_model", "d_channel_mixing", "output_vocab_size", "d_h"):
            checks.check_int_at_least(name, getattr(self, name), 1)
        if self.positional_encoding_mode == "learned":
            checks.check_int_at_least("max_seq_length", self.max_seq_length, 1)
        checks.check_positive_number("eps", self.eps)
        for name in ("channel_mixing_dropout", "time_mixing_dropout", "embedding_dropout"):
            # [0, 1] as nn.Dropout allows (the package's own rates stop short of 1).
            checks.check_real(name, getattr(self, name), low=0.0, high=1.0,
                              low_closed=True, high_closed=True)
        for name in ("use_word_embedding", "use_head", "use_true_recurrence", "use_tied_gates"):
            checks.check_bool(name, getattr(self, name))
        if self.use_word_embedding:
            if self.input_vocab_size is None:
                raise ValueError("use_word_embedding=True needs input_vocab_size")
            checks.check_tokens(x, self.input_vocab_size, name="x")
            h = nn.Embed(self.input_vocab_size, self.d_model, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="input_function")(x)
        else:
            checks.check_input(x)
            h = dense_lib.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="input_function")(x)
        batch, seq_len = x.shape[:2]
        if mask is not None:
            mask = checks.check_bool_bt("mask", mask, batch, seq_len)
        if carry is not None and tuple(carry.shape) != (batch, self.n_layer, self.d_h):
            raise ValueError(f"carry must have shape (batch, n_layer, d_h) = "
                             f"({batch}, {self.n_layer}, {self.d_h}), got {tuple(carry.shape)}")
        start = jnp.zeros((batch,), jnp.int32)
        if offset is not None:
            offset = jnp.asarray(offset)
            if (not jnp.issubdtype(offset.dtype, jnp.integer)
                    or offset.shape not in ((), (batch,))):
                raise ValueError(
                    f"offset must be an int or an int array of shape (batch,) = "
                    f"({batch},), got {offset.dtype} {tuple(offset.shape)}")
            value = checks.concrete_or_none(offset)
            if value is not None and value.size and value.min() < 0:
                raise ValueError(f"offset must be >= 0 (tokens already consumed), "
                                 f"got {value.min()}")
            start = jnp.broadcast_to(offset.astype(jnp.int32), (batch,))
        if self.positional_encoding_mode != "none":
            h = blocks.PositionalEncoding(self.positional_encoding_mode, self.max_seq_length,
                                   dtype=self.dtype, param_dtype=self.param_dtype,
                                   mode_name="positional_encoding_mode", name="wpe")(h, blocks.token_positions(start, seq_len, None), mask)
        h = nn.Dropout(rate=self.embedding_dropout, deterministic=not training)(h)
        states = []
        for l in range(self.n_layer):
            state, h = _PackageTimeMixing(
                self.eps, self.time_mixing_dropout, self.d_model, self.d_h,
                self.input_activation, self.hidden_activation, self.gate_activation,
                self.use_true_recurrence, self.use_tied_gates, self.dtype, self.param_dtype,
                name=f"time_mixing_layers_{l}")(
                    h, training, None if carry is None else carry[:, l], mask)
            h = _PackageChannelMixing(self.d_model, self.d_channel_mixing, self.eps,
                                      self.channel_mixing_dropout, self.dtype,
                                      self.param_dtype, name=f"channel_mixing_layers_{l}")(
                h, training)
            states.append(state)
        if self.use_head:
            h = dense_lib.Dense(self.output_vocab_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="head")(h)
        return jnp.stack(states, axis=1), h



def _dense_leaves(d, name: str, *, bias: bool) -> Dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{name} must be a dict with a kernel, got {type(d).__name__}")
    expected = {"kernel", "bias"} if bias else {"kernel"}
    if set(d) != expected:
        raise ValueError(f"{name} must have exactly the keys {sorted(expected)}, got {sorted(d)}")
    if np.ndim(d["kernel"]) != 2:
        raise ValueError(f"{name}/kernel must be 2-D, got shape {tuple(np.shape(d['kernel']))}")
    return dict(d)


def from_flax_gated_linear_rnn(params: Params) -> Params:
    """Converts the package's parameters: a ``GatedLinearRNN`` layer or a whole
    ``GatedLinearRNNLM``.

    A language model's tree (it has ``input_function``) keeps every name
    (:class:`GatedLinearRNNLM` uses the package's) except inside each
    ``time_mixing_layers_{l}/model``, converted as a layer (below), and a
    learned ``wpe/embedding``, which becomes ``wpe/table/embedding``.  Build
    the model with the same constructor arguments as the package's.

    The package's layer (version 1.0.3) computes, with ``W`` its ``proj`` and
    ``U`` its ``model/recurrent_proj`` (true-recurrence mode only)::

        [i~, i, (f,) o]_pre = x_t @ W + b (+ h_{t-1} @ U)
        h_t = f_t * h_{t-1} + i_t * tanh(i~_pre),   f = 1 - i when tied
        y_t = out_proj(tanh(h_t) * o_t)

    :class:`flax_minrnn.GatedLinearRNN` uses the same fused block order, so the
    conversion is a renaming::

        proj                        -> in_proj
        out_proj                    -> out_proj
        model/recurrent_proj/kernel -> recurrent_kernel

    Build the matching layer as ``GatedLinearRNN(d_h=d_h, d_model=d_model,
    use_tied_gates=..., use_true_recurrence='model' in params)``.

    Args:
      params: the parameters of one package ``GatedLinearRNN`` layer
        (``{'proj', 'out_proj', ['model']}``) or of a whole package
        ``GatedLinearRNNLM`` (``{'input_function', 'wpe', ...}``), inner or
        wrapped (``{'params': ...}``); the result has the same form.

    Returns:
      For a layer, ``{'in_proj': ..., 'out_proj': ..., ['recurrent_kernel':
      ...]}``.  For a language model, the same tree for
      :class:`GatedLinearRNNLM`: each ``model`` subtree converted as a layer
      (above), and a learned ``wpe/embedding`` moved to ``wpe/table/embedding``.

    Raises:
      ValueError: unexpected keys or shapes that do not form a 3- or 4-block
        gated linear RNN.
    """
    inner, wrapped = checks.unwrap_params(params)
    if "input_function" in inner:
        result = _lm_from_package(inner)
        return {"params": result} if wrapped else result
    keys = set(inner)
    if not {"proj", "out_proj"} <= keys or not keys <= {"proj", "out_proj", "model"}:
        raise ValueError(
            "params must be a flax_gated_linear_rnn.GatedLinearRNN tree with keys "
            f"'proj', 'out_proj' and optionally 'model', got {sorted(keys)}")
    proj = _dense_leaves(inner["proj"], "proj", bias=True)
    out_proj = _dense_leaves(inner["out_proj"], "out_proj", bias=True)
    d_h = np.shape(out_proj["kernel"])[0]
    width = np.shape(proj["kernel"])[1]
    if width not in (3 * d_h, 4 * d_h):
        raise ValueError(
            f"proj/kernel has {width} outputs; with d_h={d_h} (out_proj/kernel rows) a "
            f"GatedLinearRNN has {3 * d_h} (tied gates) or {4 * d_h} (untied)")
    result = {"in_proj": proj, "out_proj": out_proj}
    if "model" in inner:
        model = inner["model"]
        if not isinstance(model, Mapping) or set(model) != {"recurrent_proj"}:
            raise ValueError(
                "params['model'] must be {'recurrent_proj': {'kernel': ...}} (the "
                f"true-recurrence mode), got {sorted(model) if isinstance(model, Mapping) else model!r}")
        rec = _dense_leaves(model["recurrent_proj"], "model/recurrent_proj", bias=False)
        if tuple(np.shape(rec["kernel"])) != (d_h, width):
            raise ValueError(
                f"model/recurrent_proj/kernel must have shape ({d_h}, {width}), "
                f"got {tuple(np.shape(rec['kernel']))}")
        result[layers_lib.RECURRENT_KERNEL] = rec["kernel"]
    return {"params": result} if wrapped else result


def _lm_from_package(inner: Mapping) -> Dict[str, Any]:
    """``GatedLinearRNNLM`` params of the package -> ours (see the caller)."""
    out = {}
    for key, value in inner.items():
        if key.startswith("time_mixing_layers_"):
            if not isinstance(value, Mapping) or "model" not in value:
                raise ValueError(f"params['{key}'] must hold 'model' (the GatedLinearRNN) and "
                                 f"'layer_norm_function'")
            out[key] = {**value, "model": from_flax_gated_linear_rnn(value["model"])}
        elif key == "wpe":
            if set(value) != {"embedding"}:
                raise ValueError(f"params['wpe'] must be {{'embedding': ...}}, got {sorted(value)}")
            out[key] = {"table": dict(value)}
        elif key in ("input_function", "head") or re.fullmatch(r"channel_mixing_layers_\d+", key):
            out[key] = value
        else:
            raise ValueError(
                f"params has '{key}', which a flax_gated_linear_rnn.GatedLinearRNNLM does not "
                "have (input_function, wpe, time_mixing_layers_L, channel_mixing_layers_L, head)")
    return out
