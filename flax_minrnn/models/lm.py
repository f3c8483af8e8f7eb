"""Language models built from the recurrent layers of :mod:`flax_minrnn.nn.recurrent`.

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
:mod:`flax_minrnn.models.generate` decodes in ``O(1)`` per token.

The ``flax-gated-linear-rnn`` package's language model, on the same layers, is
:class:`flax_minrnn.compat.flax_gated_linear_rnn.GatedLinearRNNLM`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.nn import blocks
from flax_minrnn.nn import dense as dense_lib
from flax_minrnn.nn import recurrent as layers_lib
from flax_minrnn.nn import rglru as rglru_lib
from flax_minrnn.ops import checks
from flax_minrnn.ops import scan as scan_lib

Array = jax.Array

__all__ = ["LMConfig", "LMCarry", "LM", "Block", "make_time_mixing"]

TIME_MIXINGS = ("mingru", "minlstm", "glrnn", "rglru")
NORMS = ("rmsnorm", "layernorm")
POSITIONAL_ENCODINGS = ("none", "learned", "sinusoidal")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of :class:`LM` (validated on construction).

    Attributes:
      vocab_size: number of token ids; ids lie in ``[0, vocab_size)``.
      time_mixing: recurrent layer: ``'mingru'`` (:class:`~flax_minrnn.MinGRU`),
        ``'minlstm'`` (:class:`~flax_minrnn.MinLSTM`), ``'glrnn'``
        (:class:`~flax_minrnn.GatedLinearRNN`) or ``'rglru'``
        (:class:`~flax_minrnn.RGLRU`, Griffin's recurrence; its state has the
        input width, so it needs ``d_h == d_model``, and it has neither a
        true-recurrence mode nor ``sequence_axis``).
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
      use_tied_gates: ``glrnn`` only: ``f = 1 - i`` (False needs ``glrnn``).
      rglru_num_heads: ``rglru`` only (else 1): number of diagonal blocks of the
        RG-LRU's gate weights (must divide ``d_model``).
      scan_impl: :class:`flax_minrnn.ops.scan.ScanImpl` name of every layer.
      sequence_axis: mesh axis the time axis is split over in every layer's
        scan (:func:`flax_minrnn.ops.parallel.sequence_parallel_scan`, the mesh of
        ``jax.set_mesh``); ``None``: one device.  Never changes parameters;
        decode (one step per call) with ``None``.  Needs
        ``use_true_recurrence=False`` and a time mixing other than ``'rglru'``.
      dtype: compute dtype (states and logits are float32, or float64 for float64).
      param_dtype: parameter dtype.  Both are stored as ``numpy.dtype``
        objects, so ``'float32'`` and ``jnp.float32`` give equal configs.
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
        for name in ("dtype", "param_dtype"):  # One spelling per dtype.
            object.__setattr__(self, name, checks.check_float_dtype(name, getattr(self, name)))
        checks.check_int_at_least("vocab_size", self.vocab_size, 1)
        checks.check_choice("time_mixing", self.time_mixing, TIME_MIXINGS)
        checks.check_int_at_least("n_layer", self.n_layer, 1)
        checks.check_int_at_least("d_model", self.d_model, 1)
        if self.d_h is not None:
            checks.check_int_at_least("d_h", self.d_h, 1)
        checks.check_positive_number("expansion_factor", self.expansion_factor)
        if self.d_channel_mixing is not None:
            checks.check_int_at_least("d_channel_mixing", self.d_channel_mixing, 1)
        checks.check_choice("norm", self.norm, NORMS)
        checks.check_positive_number("eps", self.eps)
        for name in ("glu", "tie_embeddings", "use_true_recurrence", "use_tied_gates"):
            checks.check_bool(name, getattr(self, name))
        checks.check_int_at_least("conv_width", self.conv_width, 0)
        checks.check_rate("dropout", self.dropout)
        checks.check_rate("embedding_dropout", self.embedding_dropout)
        checks.check_choice("positional_encoding", self.positional_encoding, POSITIONAL_ENCODINGS)
        checks.check_int_at_least("max_seq_length", self.max_seq_length, 1)
        scan_lib.resolve_impl(self.scan_impl, 1, name="scan_impl")
        checks.check_int_at_least("rglru_num_heads", self.rglru_num_heads, 1)
        # Options of one time mixing are refused elsewhere, not ignored.
        if self.time_mixing != "rglru" and self.rglru_num_heads != 1:
            raise ValueError(f"rglru_num_heads={self.rglru_num_heads} needs "
                             f"time_mixing='rglru', got {self.time_mixing!r}")
        if self.time_mixing != "glrnn" and not self.use_tied_gates:
            raise ValueError(f"use_tied_gates=False needs time_mixing='glrnn', got "
                             f"{self.time_mixing!r}")
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


# Registered so that jax.export can serialize functions that take or return it.
@functools.partial(jax.export.register_namedtuple_serialization,
                   serialized_name="flax_minrnn.LMCarry")
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


def _concrete(x) -> Optional[np.ndarray]:
    return checks.concrete_or_none(x)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Building blocks.


def make_time_mixing(config: LMConfig, *, name: str, reverse: bool = False) -> nn.Module:
    """The recurrent layer ``config.time_mixing`` with output width ``d_model``."""
    if config.time_mixing == "rglru":
        if reverse:
            raise ValueError("time_mixing='rglru' has no reverse mode")
        return rglru_lib.RGLRU(num_heads=config.rglru_num_heads, scan_impl=config.scan_impl,
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
        u = blocks.norm(cfg.norm, cfg.eps, cfg.dtype, cfg.param_dtype, "norm_temporal")(x)
        if cfg.conv_width > 0:
            u, conv_state = blocks.CausalConv(cfg.conv_width, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype, name="conv")(
                u, conv_state, seq_lengths=seq_lengths, reset=reset)
        state, y = make_time_mixing(cfg, name="temporal_mixing")(
            u, state, seq_lengths=seq_lengths, reset=reset)
        x = x + drop(y.astype(x.dtype))
        u = blocks.norm(cfg.norm, cfg.eps, cfg.dtype, cfg.param_dtype, "norm_channel")(x)
        y = blocks.ChannelMixing(cfg.d_model, cfg.channel_mixing_size, cfg.glu, dtype=cfg.dtype,
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

    Token ids at valid steps must lie in ``[0, vocab_size)``: checked
    (``ValueError``) when the ids are concrete; under ``jax.jit`` an id
    ``>= vocab_size`` embeds to NaN and a negative id ``-n``
    (``n <= vocab_size``) wraps to ``vocab_size - n`` (``flax.linen.Embed``
    uses ``jnp.take``).  Padded steps (``seq_lengths``) may hold any id: their
    embeddings are replaced by zeros before any product.

    Submodules: ``embedder``, ``position`` (learned table), ``blocks_{i}``
    (:class:`Block`), ``final_norm``, ``head`` (untied, ``use_head=True``).

    Attributes:
      config: an :class:`LMConfig`.
      use_head: ``False`` returns the final-normed hidden states
        ``(B, T, d_model)`` (float32) instead of logits: the backbone used by
        :mod:`flax_minrnn.models.heads`.
    """

    config: LMConfig
    use_head: bool = True

    def initialize_carry(self, batch_size: int) -> LMCarry:
        """The zero carry of a fresh sequence (no parameters, no RNG)."""
        cfg = self.config
        dtype = checks.state_dtype(cfg.dtype, cfg.param_dtype)
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
        carry = LMCarry(tuple(carry.layers), tuple(carry.conv), carry.position)
        checks.check_carry_leaves(carry, ref, batch)
        return carry

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
        checks.check_tokens(tokens, cfg.vocab_size, seq_lengths=seq_lengths)
        batch, seq_len = tokens.shape
        carry = (self.initialize_carry(batch) if carry is None
                 else self._check_carry(carry, batch))
        valid = None
        if seq_lengths is not None:
            seq_lengths = checks.check_seq_lengths(seq_lengths, batch, seq_len)
            valid = checks.lengths_to_mask(seq_lengths, seq_len)
        if reset is not None:
            reset = checks.check_bool_bt("reset", reset, batch, seq_len)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name="embedder")
        x = embed(tokens)
        # Padded steps: zero inputs (whatever ids they hold), so they cannot
        # reach a product or a gradient.
        x = scan_lib.zero_invalid(x, valid)
        positions = blocks.token_positions(carry.position, seq_len, reset)
        if cfg.positional_encoding != "none":
            x = blocks.PositionalEncoding(cfg.positional_encoding, cfg.max_seq_length,
                                   dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   name="position")(x, positions, valid)
        x = nn.Dropout(rate=cfg.embedding_dropout, deterministic=not training)(x)
        if cfg.time_mixing == "rglru":
            # The RG-LRU treats a document's first token specially (no
            # sqrt(1 - a^2) input scale), so position 0 of a fresh sequence
            # starts a document as a reset does, as in Griffin.
            reset = positions == 0

        states, convs = [], []
        for i in range(cfg.n_layer):
            x, state, conv = Block(cfg, name=f"blocks_{i}")(
                x, carry.layers[i], carry.conv[i], training=training,
                seq_lengths=seq_lengths, reset=reset)
            states.append(state)
            convs.append(conv)
        x = blocks.norm(cfg.norm, cfg.eps, cfg.dtype, cfg.param_dtype, "final_norm")(x)

        new_carry = LMCarry(tuple(states), tuple(convs),
                            blocks.next_position(positions, seq_lengths, carry.position))

        if not self.use_head:
            return new_carry, x.astype(checks.accum_dtype(cfg.dtype))
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense_lib.Dense(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              name="head")(x)
        return new_carry, logits.astype(checks.accum_dtype(cfg.dtype))
