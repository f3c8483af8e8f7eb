"""Language models built from the recurrent layers of :mod:`flax_minrnn.layers`.

:class:`LM` is a pre-norm residual stack (one ``LMConfig`` describes it)::

    x^0      = dropout_e(embed(tokens_t) + pe(p_t))
    u^l      = conv^l(norm_t^l(x^l))                 (causal depthwise, optional)
    x^l'     = x^l + dropout(mix^l(u^l))              time mixing (MinGRU, ...)
    x^{l+1}  = x^l' + dropout(mlp^l(norm_c^l(x^l')))  channel mixing
    logits_t = head(final_norm(x^L_t))                (or embed.attend(...), tied)

with ``mlp(u) = W_2 gelu(W_1 u)`` or, with ``glu=True``,
``mlp(u) = W_2 (gelu(W_g u) * (W_v u))``.  ``p_t`` is the absolute position of
token ``t``: ``carry.position + t`` (restarting at 0 after a ``reset``), so
the positional encoding continues correctly across calls.

Everything recurrent lives in an :class:`LMCarry` (a pytree): the recurrence
state of every layer, the last ``conv_width - 1`` inputs of every causal
convolution, and the position of the next token.  Feeding a sequence in
chunks, carrying the :class:`LMCarry` from one call to the next, gives the
same logits as one call on the whole sequence; this is how
:mod:`flax_minrnn.generate` decodes in ``O(1)`` per token.

:class:`GatedLinearRNNLM` reproduces the constructor and call signature of the
``flax-gated-linear-rnn`` package's language model on the same layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn import layers as layers_lib
from flax_minrnn import scan as scan_lib

Array = jax.Array

__all__ = ["LMConfig", "LMCarry", "LM", "GatedLinearRNNLM", "CausalConv",
           "ChannelMixing", "Block", "sinusoidal_encoding"]

TIME_MIXINGS = ("mingru", "minlstm", "glrnn", "rglru")
# Scan implementations for time mixings whose inputs can be negative (RG-LRU).
LINEAR_SCAN_IMPLS = ("auto", "associative", "sequential", "chunked", "native")
NORMS = ("rmsnorm", "layernorm")
POSITIONAL_ENCODINGS = ("none", "learned", "sinusoidal")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _at_least(name: str, value, low) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _rate(name: str, value) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of :class:`LM` (validated on construction).

    Attributes:
      vocab_size: number of token ids; ids lie in ``[0, vocab_size)``.
      time_mixing: recurrent layer: ``'mingru'`` (:class:`~flax_minrnn.MinGRU`),
        ``'minlstm'`` (:class:`~flax_minrnn.MinLSTM`), ``'glrnn'``
        (:class:`~flax_minrnn.GatedLinearRNN`) or ``'rglru'``
        (:class:`~flax_minrnn.RGLRU`, Griffin's recurrence; its state has the
        input width, so it needs ``d_h == d_model``, and it has no
        true-recurrence mode nor log-space scan).
      n_layer: number of blocks.
      d_model: residual stream width.
      d_h: recurrence state width; ``None`` means
        ``round(expansion_factor * d_model)``.
      expansion_factor: ``d_h / d_model`` when ``d_h`` is ``None``.
      d_channel_mixing: hidden width of the channel-mixing MLP; ``None`` means
        ``4 * d_model``.
      glu: gated channel mixing ``W_2 (gelu(W_g u) * W_v u)``.
      norm: ``'rmsnorm'`` or ``'layernorm'`` (every pre-norm and the final one).
      eps: epsilon of the norms.
      conv_width: width of a causal depthwise convolution applied before each
        recurrence (``0``: none).
      dropout: rate of the time- and channel-mixing residual branch dropout.
      embedding_dropout: dropout rate on the (token + position) embedding.
      tie_embeddings: logits ``= embedder.attend(h)`` instead of a ``head``.
      positional_encoding: ``'none'``, ``'learned'`` (a table of
        ``max_seq_length`` rows) or ``'sinusoidal'`` (computed, any position).
      max_seq_length: number of learned positions (unused otherwise).
      use_true_recurrence: layers' gates also see ``h_{t-1}`` (sequential).
      use_tied_gates: ``glrnn`` only: ``f = 1 - i``.
      rglru_num_heads: ``rglru`` only: number of diagonal blocks of the
        RG-LRU's gate weights (must divide ``d_model``).
      scan_impl: :class:`flax_minrnn.scan.ScanImpl` name of every layer.
      sequence_axis: mesh axis the time axis is split over in every layer's
        scan (:func:`flax_minrnn.parallel.sequence_parallel_scan`, the mesh of
        ``jax.set_mesh``); ``None``: one device.  Never changes parameters;
        decode (one step per call) with ``None``.
      dtype: compute dtype (states are float32 regardless; logits are float32).
      param_dtype: parameter dtype.
    """

    vocab_size: int
    time_mixing: str = "mingru"
    n_layer: int = 2
    d_model: int = 128
    d_h: Optional[int] = None
    expansion_factor: float = 1.0
    d_channel_mixing: Optional[int] = None
    glu: bool = False
    norm: str = "rmsnorm"
    eps: float = 1e-5
    conv_width: int = 0
    dropout: float = 0.0
    embedding_dropout: float = 0.0
    tie_embeddings: bool = False
    positional_encoding: str = "none"
    max_seq_length: int = 2048
    use_true_recurrence: bool = False
    use_tied_gates: bool = True
    rglru_num_heads: int = 1
    scan_impl: str = "auto"
    sequence_axis: Optional[str] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _at_least("vocab_size", self.vocab_size, 1)
        _choice("time_mixing", self.time_mixing, TIME_MIXINGS)
        _at_least("n_layer", self.n_layer, 1)
        _at_least("d_model", self.d_model, 1)
        if self.d_h is not None:
            _at_least("d_h", self.d_h, 1)
        if not float(self.expansion_factor) > 0:
            raise ValueError(
                f"expansion_factor must be positive, got {self.expansion_factor!r}")
        if self.d_channel_mixing is not None:
            _at_least("d_channel_mixing", self.d_channel_mixing, 1)
        _choice("norm", self.norm, NORMS)
        if not float(self.eps) > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        _at_least("conv_width", self.conv_width, 0)
        _rate("dropout", self.dropout)
        _rate("embedding_dropout", self.embedding_dropout)
        _choice("positional_encoding", self.positional_encoding, POSITIONAL_ENCODINGS)
        _at_least("max_seq_length", self.max_seq_length, 1)
        scan_lib.resolve_impl(self.scan_impl, 1, name="scan_impl")
        _at_least("rglru_num_heads", self.rglru_num_heads, 1)
        if self.time_mixing == "rglru":
            if self.state_size != self.d_model:
                raise ValueError(
                    f"time_mixing='rglru' needs d_h == d_model (the RG-LRU state has the "
                    f"input width); got d_h={self.state_size}, d_model={self.d_model}")
            if self.d_model % self.rglru_num_heads:
                raise ValueError(f"rglru_num_heads={self.rglru_num_heads} must divide "
                                 f"d_model={self.d_model}")
            if self.use_true_recurrence:
                raise ValueError("use_true_recurrence must be False with time_mixing='rglru'")
            if self.sequence_axis is not None:
                raise ValueError("sequence_axis is not supported with time_mixing='rglru' "
                                 f"(got {self.sequence_axis!r}); use mingru/minlstm/glrnn")
            _choice("scan_impl (time_mixing='rglru')", self.scan_impl, LINEAR_SCAN_IMPLS)
        if self.sequence_axis is not None and (
                not isinstance(self.sequence_axis, str) or not self.sequence_axis
                or self.use_true_recurrence):
            raise ValueError(
                f"sequence_axis must be None or a mesh axis name and needs "
                f"use_true_recurrence=False; got sequence_axis={self.sequence_axis!r}, "
                f"use_true_recurrence={self.use_true_recurrence}")

    @property
    def state_size(self) -> int:
        """The recurrence state width ``d_h`` (resolved)."""
        if self.d_h is not None:
            return self.d_h
        return max(1, int(round(self.expansion_factor * self.d_model)))

    @property
    def channel_mixing_size(self) -> int:
        """The channel-mixing hidden width (resolved)."""
        return self.d_channel_mixing or 4 * self.d_model


class LMCarry(NamedTuple):
    """Everything :class:`LM` carries from one call to the next (a pytree).

    Attributes:
      layers: per layer, the recurrence state, float32 ``(batch, d_h)``.
      conv: per layer, the last ``conv_width - 1`` valid inputs of the causal
        convolution, ``(batch, conv_width - 1, d_model)`` in the compute dtype
        (``(batch, 0, d_model)`` when there is no convolution).
      position: int32 ``(batch,)``: the absolute position of the next token.
    """

    layers: tuple
    conv: tuple
    position: Array


# ----------------------------------------------------------------------------
# Positions.


def sinusoidal_encoding(positions: Array, dim: int) -> Array:
    """Sinusoidal encoding (Vaswani et al. 2017), interleaved, float32.

    ``pe(p)[2i] = sin(p w_i)``, ``pe(p)[2i+1] = cos(p w_i)``,
    ``w_i = 10000^(-2i / dim)``; computed for any position (no table).

    Args:
      positions: int ``(...)``.
      dim: encoding width.

    Returns:
      float32 ``(..., dim)``.
    """
    half = (dim + 1) // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-2.0 * math.log(10000.0) / dim))
    angles = positions.astype(jnp.float32)[..., None] * freqs.reshape((1,) * positions.ndim + (half,))
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pe.reshape(*positions.shape, 2 * half)[..., :dim]


def _concrete(x) -> Optional[np.ndarray]:
    return scan_lib._concrete_or_none(x)  # pylint: disable=protected-access


def token_positions(start: Array, seq_len: int, reset: Optional[Array]) -> Array:
    """Absolute positions ``(batch, seq_len)`` int32.

    ``p_t = start + t``, except after a reset at step ``r <= t`` (the latest
    one), where ``p_t = t - r`` (a new document starts at position 0).
    """
    t = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    pos = start.astype(jnp.int32)[:, None] + t
    if reset is None:
        return pos
    last = jax.lax.cummax(jnp.where(reset, t, jnp.int32(-1)), axis=1)
    return jnp.where(last >= 0, t - last, pos)


def next_position(positions: Array, seq_lengths: Optional[Array], current: Array) -> Array:
    """Position of the next token after a call: one past the last valid token's.

    Rows without a valid token keep ``current``.
    """
    batch, seq_len = positions.shape
    n = jnp.full((batch,), seq_len, jnp.int32) if seq_lengths is None \
        else seq_lengths.astype(jnp.int32)
    last = jnp.take_along_axis(positions, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.where(n > 0, last + 1, current)


def check_leaf_shapes(carry, ref, batch: int) -> None:
    """Raises ``ValueError`` unless every leaf of ``carry`` has the shape of ``ref``'s."""
    for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(ref)):
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"carry leaf has shape {tuple(got.shape)}, expected "
                             f"{tuple(want.shape)} (batch {batch})")


def check_tokens(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Integer ``(batch, time)`` ids; values checked against ``vocab_size`` when concrete."""
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise TypeError(f"{name} must be an integer array, got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, time), got {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array (token ids), got dtype {tokens.dtype}")
    if tokens.shape[1] < 1:
        raise ValueError(f"{name} must have at least one step")
    value = _concrete(tokens)
    if value is not None and value.size and (value.min() < 0 or value.max() >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, vocab_size={vocab_size}), got values in "
            f"[{value.min()}, {value.max()}]")


class PositionalEncoding(nn.Module):
    """Adds the encoding of absolute positions to ``x`` (``'learned'`` or ``'sinusoidal'``).

    Learned positions index a ``(max_seq_length, d)`` table.  A position
    ``>= max_seq_length`` at a valid step raises ``ValueError`` when the
    positions are concrete; under ``jax.jit`` they cannot be checked and are
    clipped to ``max_seq_length - 1``.
    """

    mode: str
    max_seq_length: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array, valid: Optional[Array]) -> Array:
        d = x.shape[-1]
        if self.mode == "sinusoidal":
            return x + sinusoidal_encoding(positions, d).astype(x.dtype)
        value = _concrete(positions if valid is None
                          else jnp.where(valid, positions, jnp.zeros_like(positions)))
        if value is not None and value.size and value.max() >= self.max_seq_length:
            raise ValueError(
                f"positions up to {value.max()} exceed max_seq_length="
                f"{self.max_seq_length} (learned positional encoding); raise "
                "max_seq_length or use positional_encoding='sinusoidal'")
        table = nn.Embed(self.max_seq_length, d, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="table")
        return x + table(jnp.clip(positions, 0, self.max_seq_length - 1)).astype(x.dtype)


# ----------------------------------------------------------------------------
# Building blocks.


class _Norm(nn.Module):
    """RMSNorm or LayerNorm in float32, returned in the compute dtype ``dtype``.

    ``rmsnorm``:   ``y = x / sqrt(mean(x^2) + eps) * scale``
    ``layernorm``: ``y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias``

    Parameters ``scale`` (ones) and ``bias`` (zeros, layernorm), the layout of
    ``flax.linen.RMSNorm`` / ``LayerNorm``.  Written out (instead of using
    those) so that bfloat16 parameters work under strict dtype promotion.
    """

    kind: str
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x = x.astype(jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        eps = jnp.float32(self.eps)
        if self.kind == "rmsnorm":
            y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
        else:
            centred = x - jnp.mean(x, axis=-1, keepdims=True)
            y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                                        + eps)
        y = y * scale.astype(jnp.float32)[(None,) * (x.ndim - 1)]
        if self.kind == "layernorm":
            bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)[(None,) * (x.ndim - 1)]
        return y.astype(self.dtype)


def _norm(kind: str, eps: float, dtype, param_dtype, name: str) -> nn.Module:
    return _Norm(kind, eps, dtype, param_dtype, name=name)


def _last_valid(buf: Array, end: Array, width: int) -> Array:
    """``buf[b, end_b - width : end_b]`` for every row (``end_b >= width``)."""
    idx = end[:, None] - width + jnp.arange(width, dtype=end.dtype)[None, :]
    idx = idx.reshape(idx.shape + (1,) * (buf.ndim - 2))
    return jnp.take_along_axis(buf, idx, axis=1)


class CausalConv(nn.Module):
    """Causal depthwise convolution that streams through a state.

    With inputs ``u`` and the ``K - 1`` previous inputs in ``state``
    (``buf = [state, u]``)::

        y_t = bias + sum_{k=0}^{K-1} w_k * buf_{t+k}     (so y_t sees u_{t-K+1..t})

    Taps that would cross a document boundary (``reset``) read zero, as at the
    start of a sequence.  The returned state holds the last ``K - 1`` *valid*
    inputs (``seq_lengths``); padded steps never enter it.

    Attributes:
      width: ``K >= 1``.
      dtype, param_dtype: compute and parameter dtypes.
      kernel_init: initialiser of the ``(K, d)`` kernel (``None``:
        ``normal(1 / sqrt(K))``).
    """

    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Optional[Callable[..., Array]] = None

    @nn.compact
    def __call__(self, u: Array, state: Array, *, seq_lengths: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[Array, Array]:
        batch, seq_len, d = u.shape
        k = self.width
        init = self.kernel_init or nn.initializers.normal(stddev=1.0 / math.sqrt(k))
        kernel = self.param("kernel", init, (k, d), self.param_dtype).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype).astype(self.dtype)
        u = u.astype(self.dtype)
        buf = jnp.concatenate([state.astype(self.dtype), u], axis=1)  # (B, K-1+T, d)
        doc = None
        if reset is not None:
            # Document id of every buffer slot; the state belongs to document 0.
            doc = jnp.concatenate([jnp.zeros((batch, k - 1), jnp.int32),
                                   jnp.cumsum(reset.astype(jnp.int32), axis=1)], axis=1)
        y = jnp.broadcast_to(bias, (batch, seq_len, d))
        for j in range(k):
            tap = buf[:, j:j + seq_len]
            if doc is not None:
                same = doc[:, j:j + seq_len] == doc[:, k - 1:]
                tap = jnp.where(same[:, :, None], tap, jnp.zeros((), tap.dtype))
            y = y + tap * kernel[j][None, None, :]
        if k == 1:
            return y, state
        end = (jnp.full((batch,), seq_len, jnp.int32) if seq_lengths is None
               else seq_lengths.astype(jnp.int32)) + (k - 1)
        new_state = _last_valid(buf, end, k - 1)
        if doc is not None:
            # Inputs before the latest boundary are another document's.
            cur = jnp.take_along_axis(doc, (end - 1)[:, None], axis=1)
            keep = _last_valid(doc, end, k - 1) == cur
            new_state = jnp.where(keep[:, :, None], new_state, jnp.zeros((), buf.dtype))
        return y, new_state.astype(state.dtype)


class ChannelMixing(nn.Module):
    """Position-wise MLP ``W_2 gelu(W_1 u)`` or, GLU, ``W_2 (gelu(W_g u) * W_v u)``.

    Attributes:
      d_model: output width.
      d_hidden: hidden width.
      glu: gated variant (``up`` projects to ``2 * d_hidden``: gate, value).
      dtype, param_dtype: compute and parameter dtypes.
      down_kernel_init: initialiser of ``down``'s kernel (``None``: the
        ``Dense`` default).
    """

    d_model: int
    d_hidden: int
    glu: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    down_kernel_init: Optional[Callable[..., Array]] = None

    @nn.compact
    def __call__(self, u: Array) -> Array:
        dense = lambda n, name, **kw: layers_lib.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                               name=name, **kw)
        if self.glu:
            gate, value = jnp.split(dense(2 * self.d_hidden, "up")(u), 2, axis=-1)
            hidden = nn.gelu(gate) * value
        else:
            hidden = nn.gelu(dense(self.d_hidden, "up")(u))
        down_init = {} if self.down_kernel_init is None else {"kernel_init": self.down_kernel_init}
        return dense(self.d_model, "down", **down_init)(hidden)


def make_time_mixing(config: LMConfig, *, name: str, reverse: bool = False) -> nn.Module:
    """The recurrent layer ``config.time_mixing`` with output width ``d_model``."""
    if config.time_mixing == "rglru":
        if reverse:
            raise ValueError("time_mixing='rglru' has no reverse mode")
        # Imported here: flax_minrnn.griffin builds on this module.
        from flax_minrnn.griffin import RGLRU  # pylint: disable=import-outside-toplevel
        return RGLRU(num_heads=config.rglru_num_heads, scan_impl=config.scan_impl,
                     dtype=config.dtype, param_dtype=config.param_dtype, name=name)
    common = dict(d_h=config.state_size, d_model=config.d_model,
                  use_true_recurrence=config.use_true_recurrence, reverse=reverse,
                  scan_impl=config.scan_impl, sequence_axis=config.sequence_axis,
                  dtype=config.dtype,
                  param_dtype=config.param_dtype, name=name)
    if config.time_mixing == "mingru":
        return layers_lib.MinGRU(**common)
    if config.time_mixing == "minlstm":
        return layers_lib.MinLSTM(**common)
    return layers_lib.GatedLinearRNN(use_tied_gates=config.use_tied_gates, **common)


class Block(nn.Module):
    """One pre-norm residual block of :class:`LM` (time mixing, then channel mixing).

    ``x' = x + dropout(mix(conv(norm_temporal(x))))`` and
    ``y = x' + dropout(mlp(norm_channel(x')))``.

    Submodules: ``norm_temporal``, ``conv`` (when ``conv_width > 0``),
    ``temporal_mixing``, ``norm_channel``, ``channel_mixing``.
    """

    config: LMConfig

    @nn.compact
    def __call__(self, x: Array, state: Array, conv_state: Array, *, training: bool,
                 seq_lengths: Optional[Array] = None, reset: Optional[Array] = None
                 ) -> Tuple[Array, Array, Array]:
        cfg = self.config
        drop = nn.Dropout(rate=cfg.dropout, deterministic=not training)
        u = _norm(cfg.norm, cfg.eps, cfg.dtype, cfg.param_dtype, "norm_temporal")(x)
        if cfg.conv_width > 0:
            u, conv_state = CausalConv(cfg.conv_width, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype, name="conv")(
                u, conv_state, seq_lengths=seq_lengths, reset=reset)
        state, y = make_time_mixing(cfg, name="temporal_mixing")(
            u, state, seq_lengths=seq_lengths, reset=reset)
        x = x + drop(y.astype(x.dtype))
        u = _norm(cfg.norm, cfg.eps, cfg.dtype, cfg.param_dtype, "norm_channel")(x)
        y = ChannelMixing(cfg.d_model, cfg.channel_mixing_size, cfg.glu, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name="channel_mixing")(u)
        x = x + drop(y.astype(x.dtype))
        return x, state, conv_state


# ----------------------------------------------------------------------------
# The language model.


class LM(nn.Module):
    """Recurrent language model (see the module docstring for the equations).

    Usage::

        model = LM(LMConfig(vocab_size=256))
        variables = model.init(key, tokens)                   # tokens (B, T) int
        carry, logits = model.apply(variables, tokens)        # logits (B, T, V) f32
        carry, logits = model.apply(variables, more, carry)   # continue
        carry, logits = model.apply(variables, tokens, training=True,
                                    rngs={'dropout': key})

    Token ids must lie in ``[0, vocab_size)``: checked (``ValueError``) when
    the ids are concrete; under ``jax.jit`` an id ``>= vocab_size`` embeds to
    NaN and a negative id ``-n`` (``n <= vocab_size``) wraps to
    ``vocab_size - n`` (``flax.linen.Embed`` uses ``jnp.take``).

    Submodules: ``embedder``, ``position`` (learned table), ``blocks_{i}``
    (:class:`Block`), ``final_norm``, ``head`` (untied, ``use_head=True``).

    Attributes:
      config: an :class:`LMConfig`.
      use_head: ``False`` returns the final-normed hidden states
        ``(B, T, d_model)`` (float32) instead of logits: the backbone used by
        :mod:`flax_minrnn.heads`.
    """

    config: LMConfig
    use_head: bool = True

    def initialize_carry(self, batch_size: int) -> LMCarry:
        """The zero carry of a fresh sequence (no parameters, no RNG)."""
        cfg = self.config
        dtype = layers_lib.state_dtype(cfg.dtype, cfg.param_dtype)
        conv = max(cfg.conv_width - 1, 0)
        return LMCarry(
            layers=tuple(jnp.zeros((batch_size, cfg.state_size), dtype)
                         for _ in range(cfg.n_layer)),
            conv=tuple(jnp.zeros((batch_size, conv, cfg.d_model), cfg.dtype)
                       for _ in range(cfg.n_layer)),
            position=jnp.zeros((batch_size,), jnp.int32))

    def _check_carry(self, carry, batch: int) -> LMCarry:
        ref = self.initialize_carry(batch)
        if not isinstance(carry, LMCarry):
            raise TypeError(f"carry must be an LMCarry (see initialize_carry), "
                            f"got {type(carry).__name__}")
        if len(carry.layers) != len(ref.layers) or len(carry.conv) != len(ref.conv):
            raise ValueError(f"carry must hold n_layer={self.config.n_layer} layer and conv "
                             f"states, got {len(carry.layers)} and {len(carry.conv)}")
        check_leaf_shapes(carry, ref, batch)
        return LMCarry(tuple(carry.layers), tuple(c.astype(self.config.dtype) for c in carry.conv),
                       carry.position.astype(jnp.int32))

    @nn.compact
    def __call__(self, tokens: Array, carry: Optional[LMCarry] = None, *,
                 training: bool = False, seq_lengths: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[LMCarry, Array]:
        """Runs the model on ``tokens``; returns ``(carry, logits)``.

        Args:
          tokens: int ``(batch, time)`` ids in ``[0, vocab_size)``.
          carry: an :class:`LMCarry` from a previous call, or ``None`` (a fresh
            sequence, position 0).
          training: enables dropout (needs a ``'dropout'`` rng).
          seq_lengths: int ``(batch,)`` valid lengths (right padding).  Padded
            steps change no state: the returned carry is the one after the last
            valid token and its position advances by ``seq_lengths``.  Logits
            at padded steps are meaningless.
          reset: bool ``(batch, time)``: a new document starts at that step
            (every state restarts from zero and positions from 0).

        Returns:
          ``(carry, out)``: the new :class:`LMCarry` and float32 logits
          ``(batch, time, vocab_size)`` (hidden states ``(batch, time,
          d_model)`` when ``use_head=False``).

        Raises:
          ValueError / TypeError: bad ``tokens`` (ids checked when concrete),
            carry, ``seq_lengths``, ``reset``, or learned positions past
            ``max_seq_length`` (when concrete).
        """
        cfg = self.config
        check_tokens(tokens, cfg.vocab_size)
        batch, seq_len = tokens.shape
        carry = (self.initialize_carry(batch) if carry is None
                 else self._check_carry(carry, batch))
        valid = None
        if seq_lengths is not None:
            seq_lengths = scan_lib.check_seq_lengths(seq_lengths, batch, seq_len)
            valid = scan_lib.lengths_to_mask(seq_lengths, seq_len)
        if reset is not None:
            reset = scan_lib.check_bool_bt("reset", reset, batch, seq_len)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name="embedder")
        x = embed(tokens)
        positions = token_positions(carry.position, seq_len, reset)
        if cfg.positional_encoding != "none":
            x = PositionalEncoding(cfg.positional_encoding, cfg.max_seq_length,
                                   dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   name="position")(x, positions, valid)
        x = nn.Dropout(rate=cfg.embedding_dropout, deterministic=not training)(x)

        states, convs = [], []
        for i in range(cfg.n_layer):
            x, state, conv = Block(cfg, name=f"blocks_{i}")(
                x, carry.layers[i], carry.conv[i], training=training,
                seq_lengths=seq_lengths, reset=reset)
            states.append(state)
            convs.append(conv)
        x = _norm(cfg.norm, cfg.eps, cfg.dtype, cfg.param_dtype, "final_norm")(x)

        new_carry = LMCarry(tuple(states), tuple(convs),
                            next_position(positions, seq_lengths, carry.position))

        if not self.use_head:
            return new_carry, x.astype(jnp.float32)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = layers_lib.Dense(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              name="head")(x)
        return new_carry, logits.astype(jnp.float32)


# ----------------------------------------------------------------------------
# The flax-gated-linear-rnn package's language model.


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
        u = _Norm("layernorm", self.eps, self.dtype, self.param_dtype,
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
        u = _Norm("layernorm", self.eps, self.dtype, self.param_dtype, name="layer_norm")(x)
        u = nn.gelu(layers_lib.Dense(self.d_hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="dense_layers_0")(u))
        u = layers_lib.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="dense_layers_1")(u)
        return nn.Dropout(rate=self.dropout, deterministic=not training)(x + u)


class GatedLinearRNNLM(nn.Module):
    """Drop-in for ``flax_gated_linear_rnn.GatedLinearRNNLM`` (same constructor).

    Per layer ``l`` (the package's structure, dropout after the residual)::

        x <- dropout(x + GatedLinearRNN(LayerNorm(x)))          time mixing
        x <- dropout(x + W_2 gelu(W_1 LayerNorm(x)))            channel mixing

    then ``head`` (a Dense to ``output_vocab_size``) when ``use_head``.  The
    input is ``Embed(x) + pe(offset + t)`` (token ids) or ``Dense(x) + pe``
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
    ``head``), except inside ``model`` (see :func:`flax_minrnn.migrate.from_flax_gated_linear_rnn`).
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
    d_h: int
    input_activation: Callable = nn.tanh
    hidden_activation: Callable = nn.tanh
    gate_activation: Callable = nn.sigmoid
    use_true_recurrence: bool = False
    use_tied_gates: bool = True
    use_head: bool = True
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
        _choice("positional_encoding_mode", self.positional_encoding_mode,
                POSITIONAL_ENCODINGS)
        if self.use_word_embedding:
            if self.input_vocab_size is None:
                raise ValueError("use_word_embedding=True needs input_vocab_size")
            check_tokens(x, self.input_vocab_size, name="x")
            h = nn.Embed(self.input_vocab_size, self.d_model, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="input_function")(x)
        else:
            layers_lib.check_input(x)
            h = layers_lib.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="input_function")(x)
        batch, seq_len = x.shape[:2]
        if mask is not None:
            mask = scan_lib.check_bool_bt("mask", mask, batch, seq_len)
        if carry is not None and tuple(carry.shape) != (batch, self.n_layer, self.d_h):
            raise ValueError(f"carry must have shape (batch, n_layer, d_h) = "
                             f"({batch}, {self.n_layer}, {self.d_h}), got {tuple(carry.shape)}")
        if self.positional_encoding_mode != "none":
            start = jnp.zeros((batch,), jnp.int32) if offset is None else \
                jnp.broadcast_to(jnp.asarray(offset, jnp.int32), (batch,))
            h = PositionalEncoding(self.positional_encoding_mode, self.max_seq_length,
                                   dtype=self.dtype, param_dtype=self.param_dtype,
                                   name="wpe")(h, token_positions(start, seq_len, None), mask)
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
            h = layers_lib.Dense(self.output_vocab_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="head")(h)
        return jnp.stack(states, axis=1), h
