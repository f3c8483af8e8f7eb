"""Griffin / RecurrentGemma: the recurrent block and the hybrid LM.

Griffin (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local
Attention for Efficient Language Models", arXiv 2402.19427) is the
architecture of RecurrentGemma (Botev et al. 2024, arXiv 2404.07839; Hugging
Face ``RecurrentGemmaForCausalLM``).  Everything here is built on this
library's parts: the RG-LRU is :class:`flax_minrnn.nn.rglru.RGLRU` (on
:func:`flax_minrnn.ops.scan.linear_scan`), the
temporal convolution is :class:`flax_minrnn.nn.blocks.CausalConv`, the norms and the
gated MLP are those of :mod:`flax_minrnn.nn.blocks`, local attention is
:class:`flax_minrnn.nn.attention.LocalAttention`.

The model (:class:`Griffin`, configured by :class:`GriffinConfig`)::

    x^0  = embed(tokens) * bf16(sqrt(hidden_size))      (embeddings_scale_by_sqrt_dim)
    x'   = x^l + temporal^l(rmsnorm(x^l))                recurrent or local attention
    x^{l+1} = x' + W_down (gelu(W_gate u) * (W_up u)),   u = rmsnorm(x')
    logits  = cap * tanh(rmsnorm(x^L) E^T / cap)         tied embeddings, soft cap

with ``temporal^l`` chosen by ``block_types`` (cycled over the layers),
``rmsnorm(x) = x / sqrt(mean(x^2) + eps) * (1 + scale_delta)`` (the
zero-centred layout of the published checkpoints) and ``bf16(.)`` rounding to
bfloat16, as both reference implementations do (``sqrt(2560)`` is used as
``50.5``).  The recurrent temporal block::

    y = gelu(W_y x)
    u = RGLRU(conv1d(W_x x))
    out = W_out (u * y)

Decoding state (:class:`GriffinCarry`): per block the RG-LRU state and the
convolution's last ``conv1d_width - 1`` inputs (recurrent blocks) or a ring
buffer of ``attention_window_size`` keys, values and positions (attention
blocks; a query sees itself and the ``attention_window_size`` previous
tokens), plus the position of the next token.  Its size does not grow with
the sequence, so :func:`flax_minrnn.models.generate.generate` runs the model
unchanged, arbitrarily far past the attention window.

Document starts: a token whose position is 0 (the first token of a fresh
sequence, or after a ``reset``) starts a document in every block: the RG-LRU
restarts (``a = 0``, multiplier 1), the convolution reads no earlier input,
attention sees no earlier key, and RoPE positions restart at 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.models import padding
from flax_minrnn.nn import attention as attention_lib
from flax_minrnn.nn import blocks
from flax_minrnn.nn import dense as dense_lib
from flax_minrnn.nn.rglru import RGLRU
from flax_minrnn.ops import checks
from flax_minrnn.ops import scan as scan_lib

Array = jax.Array
Dtype = Any

__all__ = ["RGLRU", "RecurrentBlock", "RecurrentState", "GriffinConfig", "GriffinCarry",
           "Griffin", "ResidualBlock", "griffin_2b_config", "griffin_9b_config",
           "count_params", "embedding_scale", "BLOCK_TYPES", "HIDDEN_ACTIVATIONS"]

BLOCK_TYPES = ("recurrent", "attention")
# The GriffinConfig fields that do not change the function the weights
# compute: what a converted checkpoint's config may override.
OVERRIDABLE = ("dtype", "param_dtype", "scan_impl", "pad_token_id", "eos_token_id",
               "bos_token_id")


def check_overrides(overrides, source: str) -> None:
    """Raises ``ValueError`` unless every key of ``overrides`` is in
    :data:`OVERRIDABLE` (``source``: where the other fields come from)."""
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"overrides may set only {sorted(OVERRIDABLE)} (the rest comes from "
                         f"{source}), got {bad}")
HIDDEN_ACTIVATIONS = ("gelu_pytorch_tanh",)


def _check_token_id(name: str, value, vocab_size: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be None or a token id in [0, vocab_size={vocab_size}), "
                         f"got {value!r}")


# ----------------------------------------------------------------------------
# The recurrent temporal block.


# Registered so that jax.export can serialize functions that take or return it.
@functools.partial(jax.export.register_namedtuple_serialization,
                   serialized_name="flax_minrnn.RecurrentState")
class RecurrentState(NamedTuple):
    """The decoding state of one recurrent block (a pytree).

    Attributes:
      rg_lru: float32 ``(batch, lru_width)``: the RG-LRU state.
      conv: ``(batch, conv1d_width - 1, lru_width)`` in the compute dtype: the
        convolution's last valid inputs.
    """

    rg_lru: Array
    conv: Array


def _empty_recurrent_state(batch: int, lru_width: int, conv1d_width: int, dtype,
                           param_dtype) -> RecurrentState:
    return RecurrentState(
        jnp.zeros((batch, lru_width), checks.state_dtype(dtype, param_dtype)),
        jnp.zeros((batch, conv1d_width - 1, lru_width), dtype))


def _fan_in(scale: float) -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(scale, "fan_in", "normal")


class RecurrentBlock(nn.Module):
    """Griffin's recurrent temporal block::

        y   = gelu(W_y x + b_y)
        u   = RGLRU(conv1d(W_x x + b_x))
        out = W_out (u * y) + b_out

    ``conv1d`` is :class:`flax_minrnn.nn.blocks.CausalConv` (depthwise, causal, width
    ``conv1d_width``, its state in the carry).  Usage::

        block = RecurrentBlock(lru_width=256, num_heads=4)
        params = block.init(key, x)                   # x: (batch, T, width)
        state, y = block.apply(params, x)             # state: RecurrentState
        state, y2 = block.apply(params, x2, state)

    Attributes:
      lru_width: RG-LRU width (``None``: the input width).
      num_heads: RG-LRU gate blocks (divides ``lru_width``).
      conv1d_width: temporal width of the convolution (``>= 1``).
      w_init_variance_scale: variance scale (fan-in) of the convolution kernel.
      final_w_init_variance_scale: variance scale (fan-in) of ``linear_out``.
      scan_impl: the RG-LRU's scan implementation.
      dtype: compute dtype (``None``: the input's).
      param_dtype: parameter dtype.
    """

    lru_width: Optional[int] = None
    num_heads: int = 1
    conv1d_width: int = 4
    w_init_variance_scale: float = 0.01
    final_w_init_variance_scale: float = 1.0
    scan_impl: str = "auto"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def initialize_carry(self, batch_size: int, width: int,
                         input_dtype=jnp.float32) -> RecurrentState:
        """Zero state for inputs of width ``width`` and dtype ``input_dtype``
        (no params, no RNG)."""
        return _empty_recurrent_state(batch_size, self.lru_width or width, self.conv1d_width,
                                      self.dtype or input_dtype, self.param_dtype)

    @nn.compact
    def __call__(self, x: Array, carry: Optional[RecurrentState] = None, *,
                 seq_lengths: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[RecurrentState, Array]:
        """Returns ``(carry, out)``; arguments as :class:`RGLRU` (no ``mask``)."""
        checks.check_input(x)
        batch, seq_len, width = x.shape
        checks.check_int_at_least("conv1d_width", self.conv1d_width, 1)  # pylint: disable=protected-access
        dtype = self.dtype or x.dtype
        lru_width = self.lru_width or width
        if carry is None:
            carry = self.initialize_carry(batch, width, x.dtype)
        if not isinstance(carry, RecurrentState):
            raise TypeError(f"carry must be a RecurrentState, got {type(carry).__name__}")
        conv_shape = (batch, self.conv1d_width - 1, lru_width)
        if tuple(carry.conv.shape) != conv_shape:
            raise ValueError(f"carry.conv must have shape (batch, conv1d_width - 1, lru_width) "
                             f"= {conv_shape}, got {tuple(carry.conv.shape)}")
        if seq_lengths is not None:
            seq_lengths = checks.check_seq_lengths(seq_lengths, batch, seq_len)
        dense = lambda n, name, init: dense_lib.Dense(n, dtype=dtype, param_dtype=self.param_dtype,
                                               kernel_init=init, name=name)
        x = x.astype(dtype)
        y = nn.gelu(dense(lru_width, "linear_y", _fan_in(1.0))(x))
        u = dense(lru_width, "linear_x", _fan_in(1.0))(x)
        u, conv = blocks.CausalConv(self.conv1d_width, dtype=dtype, param_dtype=self.param_dtype,
                                    kernel_init=_fan_in(self.w_init_variance_scale),
                                    name="conv_1d")(u, carry.conv, seq_lengths=seq_lengths,
                                                    reset=reset)
        h, u = RGLRU(num_heads=self.num_heads, scan_impl=self.scan_impl, dtype=dtype,
                     param_dtype=self.param_dtype, name="rg_lru")(
            u, carry.rg_lru, seq_lengths=seq_lengths, reset=reset)
        out = dense(width, "linear_out", _fan_in(self.final_w_init_variance_scale))(u * y)
        return RecurrentState(h, conv), out


# ----------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    """Hyper-parameters of :class:`Griffin`, named like Hugging Face's ``RecurrentGemmaConfig``.

    Validated on construction: a bad value raises ``ValueError`` naming the
    field and the allowed values.  The defaults are a small model; the
    published shapes are :func:`griffin_2b_config` and :func:`griffin_9b_config`.

    Attributes:
      vocab_size: number of token ids.
      num_hidden_layers: number of residual blocks.
      hidden_size: residual stream width.
      intermediate_size: **twice** the gated MLP's hidden width, as in
        ``RecurrentGemmaConfig`` (whose MLP projects to ``intermediate_size //
        2`` for the gate and the same for the value): the MLP hidden width is
        :attr:`mlp_width` ``= intermediate_size // 2`` (``3 * hidden_size`` in
        the published models).  Must be even.
      num_attention_heads: query heads of the attention blocks and diagonal
        blocks of the RG-LRU gates; divides ``hidden_size`` and ``lru_width``.
      num_key_value_heads: key/value heads (1: multi-query attention); divides
        ``num_attention_heads``.
      lru_width: RG-LRU width (``None``: ``hidden_size``; a value equal to
        ``hidden_size`` is stored as ``None``, so that configs of the same
        model compare equal whichever loader made them).
      attention_window_size: local attention window ``W >= 1``: a query sees
        itself and the ``W`` previous tokens of its document, as in the
        reference implementation (Hugging Face's PyTorch model sees ``W - 1``
        previous tokens; see :mod:`flax_minrnn.nn.attention`); also the number
        of cache slots.
      conv1d_width: temporal width of the recurrent blocks' convolution (``>= 1``).
      logits_soft_cap: ``logits = cap * tanh(logits / cap)``; ``None`` or 0: off.
      rms_norm_eps: epsilon of the RMSNorms.
      block_types: temporal block of each layer, cycled over the layers:
        names in ``('recurrent', 'attention')``.
      partial_rotary_factor: fraction of each head's dimensions with RoPE
        (``head_dim * partial_rotary_factor`` must be an even integer).
      rope_theta: RoPE base.
      w_init_variance_scale: variance scale (fan-in) of the convolution kernels.
      final_w_init_variance_scale: variance scale (fan-in) of the last
        projection of every temporal block and MLP (``None``: ``2 /
        num_hidden_layers``, as in the published configs).  The other
        kernels use LeCun fan-in initialisation, counting each output's true
        fan-in. ``recurrentgemma.jax`` differs in two places, which matters
        only when training from scratch: Flax's ``variance_scaling`` counts
        the block axis of the RG-LRU gates and the gate/value axis of the
        MLP's ``ffw_up`` as fan-in, so its gate kernels have variance
        ``1 / lru_width`` where ours have ``num_attention_heads / lru_width``,
        and its MLP up-projection ``1 / (2 hidden_size)`` where ours has
        ``1 / hidden_size``.
      embeddings_scale_by_sqrt_dim: multiply the embeddings by
        ``sqrt(hidden_size)`` rounded to bfloat16 (as both reference
        implementations do, so converted checkpoints give the same logits).
      hidden_activation: activation of the MLP gate and of the recurrent
        block's ``y`` branch; only ``'gelu_pytorch_tanh'`` (the tanh
        approximation of GELU, Hugging Face's name) is supported.
      attention_bias: biases on the attention's ``q``, ``k``, ``v``
        projections (the published models have none).
      attention_dropout: only ``0.0`` is supported (Griffin has no dropout).
      pad_token_id, eos_token_id, bos_token_id: special token ids (``None``:
        none), carried for tokenizers, :func:`flax_minrnn.generate` and
        checkpoint conversion; ``eos_token_id`` may be a tuple of ids.
      scan_impl: the RG-LRU's scan implementation (a
        :class:`flax_minrnn.ops.scan.ScanImpl` name).
      dtype: compute dtype (the RG-LRU state and the logits are float32, or
        float64 for a float64 computation; the convolution and attention
        caches are in ``dtype``).
      param_dtype: parameter dtype.  Both are stored as ``numpy.dtype``
        objects, so ``'float32'`` and ``jnp.float32`` give equal configs.
    """

    vocab_size: int
    num_hidden_layers: int = 3
    hidden_size: int = 128
    intermediate_size: int = 768
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    lru_width: Optional[int] = None
    attention_window_size: int = 64
    conv1d_width: int = 4
    logits_soft_cap: Optional[float] = 30.0
    rms_norm_eps: float = 1e-6
    block_types: Tuple[str, ...] = ("recurrent", "recurrent", "attention")
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    w_init_variance_scale: float = 0.01
    final_w_init_variance_scale: Optional[float] = None
    embeddings_scale_by_sqrt_dim: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    pad_token_id: Optional[int] = None
    eos_token_id: Any = None
    bos_token_id: Optional[int] = None
    scan_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # One spelling per dtype.
            object.__setattr__(self, name, checks.check_float_dtype(name, getattr(self, name)))
        at_least = checks.check_int_at_least  # pylint: disable=protected-access
        for name in ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
                     "num_key_value_heads", "attention_window_size", "conv1d_width"):
            at_least(name, getattr(self, name), 1)
        at_least("intermediate_size", self.intermediate_size, 2)
        if self.intermediate_size % 2:
            raise ValueError(f"intermediate_size must be even (the MLP width is "
                             f"intermediate_size // 2), got {self.intermediate_size}")
        if self.lru_width is not None:
            at_least("lru_width", self.lru_width, 1)
            if self.lru_width == self.hidden_size:  # One spelling per model.
                object.__setattr__(self, "lru_width", None)
        heads = self.num_attention_heads
        if self.hidden_size % heads:
            raise ValueError(f"num_attention_heads={heads} must divide "
                             f"hidden_size={self.hidden_size}")
        if self.state_width % heads:
            raise ValueError(f"num_attention_heads={heads} must divide lru_width="
                             f"{self.state_width} (the RG-LRU gates have one block per head)")
        if heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={heads}")
        types = self.block_types
        if isinstance(types, str) or not isinstance(types, Sequence) or not types:
            raise ValueError(f"block_types must be a non-empty sequence of names in "
                             f"{list(BLOCK_TYPES)}, got {types!r}")
        for i, kind in enumerate(types):
            if kind not in BLOCK_TYPES:
                raise ValueError(f"block_types[{i}] must be one of {list(BLOCK_TYPES)}, "
                                 f"got {kind!r}")
        object.__setattr__(self, "block_types", tuple(types))  # hashable
        if self.logits_soft_cap is not None and (
                isinstance(self.logits_soft_cap, bool) or not self.logits_soft_cap >= 0):
            raise ValueError(f"logits_soft_cap must be >= 0 (0 or None: off), "
                             f"got {self.logits_soft_cap!r}")
        for name in ("rms_norm_eps", "rope_theta", "w_init_variance_scale"):
            checks.check_positive_number(name, getattr(self, name))
        if self.final_w_init_variance_scale is not None:
            checks.check_positive_number("final_w_init_variance_scale", self.final_w_init_variance_scale)
        attention_lib.rotary_dim(self.head_dim, self.partial_rotary_factor)
        for name in ("embeddings_scale_by_sqrt_dim", "attention_bias"):
            checks.check_bool(name, getattr(self, name))
        if self.hidden_activation not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden_activation must be one of {list(HIDDEN_ACTIVATIONS)} "
                             f"(the tanh approximation of GELU), got {self.hidden_activation!r}")
        if isinstance(self.attention_dropout, bool) or self.attention_dropout != 0:
            raise ValueError(f"attention_dropout must be 0.0 (Griffin has no dropout), "
                             f"got {self.attention_dropout!r}")
        for name in ("pad_token_id", "bos_token_id"):
            _check_token_id(name, getattr(self, name), self.vocab_size)
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            if not eos:
                raise ValueError("eos_token_id must be None, an id or a non-empty tuple of ids, "
                                 "got an empty sequence")
            for i, value in enumerate(eos):
                _check_token_id(f"eos_token_id[{i}]", value, self.vocab_size)
            object.__setattr__(self, "eos_token_id", tuple(int(v) for v in eos))  # hashable
        else:
            _check_token_id("eos_token_id", eos, self.vocab_size)
        scan_lib.resolve_impl(self.scan_impl, 1, name="scan_impl")

    @property
    def mlp_width(self) -> int:
        """Hidden width of the gated MLP: ``intermediate_size // 2``."""
        return self.intermediate_size // 2

    @property
    def state_width(self) -> int:
        """The RG-LRU width (``lru_width`` resolved)."""
        return self.lru_width or self.hidden_size

    @property
    def head_dim(self) -> int:
        """``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_types(self) -> Tuple[str, ...]:
        """The temporal block of every layer (``block_types`` cycled)."""
        n = len(self.block_types)
        return tuple(self.block_types[i % n] for i in range(self.num_hidden_layers))

    @property
    def final_init_scale(self) -> float:
        """``final_w_init_variance_scale`` resolved."""
        return self.final_w_init_variance_scale or 2.0 / self.num_hidden_layers


def _recurrent_gemma(overrides: dict, **shape) -> GriffinConfig:
    """What the published RecurrentGemma configs share, with their ``shape``."""
    values = dict(vocab_size=256_000, num_key_value_heads=1, attention_window_size=2048,
                  conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6,
                  block_types=("recurrent", "recurrent", "attention"),
                  partial_rotary_factor=0.5, rope_theta=10000.0, w_init_variance_scale=0.01,
                  embeddings_scale_by_sqrt_dim=True, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2, **shape)
    values.update(overrides)
    return GriffinConfig(**values)


def griffin_2b_config(**overrides) -> GriffinConfig:
    """RecurrentGemma-2B's shapes (the config.json of google/recurrentgemma-2b).

    26 layers (recurrent, recurrent, attention, ...), width 2560, 10 heads of
    256 with one key/value head, MLP width 7680 (``intermediate_size`` 15360,
    see :class:`GriffinConfig`), window 2048, vocabulary 256000.
    :func:`count_params` gives 2,682,862,080 parameters (655,360,000 of them
    the tied embedding).  ``overrides`` replace fields (e.g. ``dtype``).
    """
    return _recurrent_gemma(overrides, num_hidden_layers=26, hidden_size=2560,
                            intermediate_size=15_360, num_attention_heads=10, lru_width=2560)


def griffin_9b_config(**overrides) -> GriffinConfig:
    """RecurrentGemma-9B's shapes (the config.json of google/recurrentgemma-9b).

    38 layers, width 4096, 16 heads of 256 with one key/value head, MLP width
    12288 (``intermediate_size`` 24576), window 2048, vocabulary 256000.
    :func:`count_params` gives 8,579,977,216 parameters (1,048,576,000 of them
    the tied embedding).  ``overrides`` replace fields.
    """
    return _recurrent_gemma(overrides, num_hidden_layers=38, hidden_size=4096,
                            intermediate_size=24_576, num_attention_heads=16, lru_width=4096)


def embedding_scale(hidden_size: int) -> float:
    """``sqrt(hidden_size)`` rounded to bfloat16, the embedding multiplier of
    both reference implementations (``embeddings_scale_by_sqrt_dim``)."""
    return float(np.asarray(math.sqrt(hidden_size), jnp.bfloat16).astype(np.float32))


def count_params(config: GriffinConfig) -> int:
    """The number of parameters of ``Griffin(config)``, in closed form.

    With ``H = hidden_size``, ``L = lru_width``, ``E = mlp_width``, ``n`` heads
    of ``d = H / n``, ``g`` key/value heads, ``K = conv1d_width``, ``V =
    vocab_size``::

        embedding (tied)   V H
        every layer        2 H (norms) + 3 H E + 2 E + H (gated MLP)
        recurrent block    3 H L + 2 L + H (W_y, W_x, W_out) + K L + L (conv)
                           + L (Lambda) + 2 (L^2 / n + L) (block-diagonal gates)
        attention block    H n d + 2 H g d (q, k, v) + n d H + H (output)
                           (+ n d + 2 g d with attention_bias)
        final norm         H
    """
    if not isinstance(config, GriffinConfig):
        raise TypeError(f"config must be a GriffinConfig, got {type(config).__name__}")
    h, l, e = config.hidden_size, config.state_width, config.mlp_width
    n, d, g, k = (config.num_attention_heads, config.head_dim, config.num_key_value_heads,
                  config.conv1d_width)
    per_layer = 2 * h + 3 * h * e + 2 * e + h
    temporal = {
        "recurrent": 3 * h * l + 2 * l + h + k * l + l + l + 2 * (l * l // n + l),
        "attention": (h * n * d + 2 * h * g * d + n * d * h + h
                      + (n * d + 2 * g * d if config.attention_bias else 0)),
    }
    layers = sum(per_layer + temporal[kind] for kind in config.layer_types)
    return config.vocab_size * h + layers + h


# ----------------------------------------------------------------------------
# The language model.


# Registered so that jax.export can serialize functions that take or return it.
@functools.partial(jax.export.register_namedtuple_serialization,
                   serialized_name="flax_minrnn.GriffinCarry")
class GriffinCarry(NamedTuple):
    """Everything :class:`Griffin` carries between calls (a pytree).

    Attributes:
      blocks: per layer, a :class:`RecurrentState` (RG-LRU state, conv state)
        or a :class:`flax_minrnn.nn.attention.AttentionState` (ring buffer of
        keys, values and their positions).
      position: int32 ``(batch,)``: the absolute position of the next token.
    """

    blocks: tuple
    position: Array


def _norm(cfg: GriffinConfig, name: str) -> blocks.Norm:
    """RecurrentGemma's RMSNorm: ``x / sqrt(mean(x^2) + eps) * (1 + scale_delta)``."""
    return blocks.Norm("rmsnorm", cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype,
                       zero_centered=True, name=name)


class ResidualBlock(nn.Module):
    """One Griffin residual block::

        x' = x + temporal(rmsnorm(x))
        y  = x' + W_down (gelu(W_gate u) * W_up u),   u = rmsnorm(x')

    Submodules: ``temporal_pre_norm``, ``recurrent_block`` or
    ``attention_block``, ``channel_pre_norm``, ``mlp_block``
    (:class:`flax_minrnn.nn.blocks.ChannelMixing` with ``glu=True``).
    """

    config: GriffinConfig
    block_type: str

    @nn.compact
    def __call__(self, x: Array, state, *, positions: Array, starts: Array,
                 seq_lengths: Optional[Array]) -> Tuple[Any, Array]:
        cfg = self.config
        norm = lambda name: _norm(cfg, name)
        u = norm("temporal_pre_norm")(x)
        if self.block_type == "recurrent":
            state, y = RecurrentBlock(
                lru_width=cfg.state_width, num_heads=cfg.num_attention_heads,
                conv1d_width=cfg.conv1d_width, w_init_variance_scale=cfg.w_init_variance_scale,
                final_w_init_variance_scale=cfg.final_init_scale, scan_impl=cfg.scan_impl,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="recurrent_block")(
                u, state, seq_lengths=seq_lengths, reset=starts)
        else:
            state, y = attention_lib.LocalAttention(
                num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                window=cfg.attention_window_size,
                partial_rotary_factor=cfg.partial_rotary_factor, rope_theta=cfg.rope_theta,
                final_w_init_variance_scale=cfg.final_init_scale,
                qkv_bias=cfg.attention_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, name="attention_block")(
                u, state, positions=positions, seq_lengths=seq_lengths, reset=starts)
        x = x + y.astype(x.dtype)
        y = blocks.ChannelMixing(cfg.hidden_size, cfg.mlp_width, glu=True, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype,
                                 down_kernel_init=_fan_in(cfg.final_init_scale),
                                 name="mlp_block")(norm("channel_pre_norm")(x))
        return state, x + y.astype(x.dtype)


class Griffin(nn.Module):
    """The Griffin / RecurrentGemma language model (module docstring for the equations).

    Usage::

        model = Griffin(GriffinConfig(vocab_size=256))
        variables = model.init(key, tokens)                  # tokens (B, T) int
        carry, logits = model.apply(variables, tokens)       # logits (B, T, V) float32
        carry, logits = model.apply(variables, more, carry)  # continue
        out = flax_minrnn.generate(model, variables, prompt, 100, rng=key)

    Submodules: ``embedder`` (tied with the output), ``blocks_{i}``
    (:class:`ResidualBlock`), ``final_norm``.  Token ids are checked against
    ``vocab_size`` when concrete (see :class:`flax_minrnn.models.lm.LM`).

    Attributes:
      config: a :class:`GriffinConfig`.
    """

    config: GriffinConfig

    def initialize_carry(self, batch_size: int) -> GriffinCarry:
        """The carry of a fresh sequence (no parameters, no RNG)."""
        cfg = self.config
        blocks = []
        for kind in cfg.layer_types:
            if kind == "recurrent":
                blocks.append(_empty_recurrent_state(batch_size, cfg.state_width,
                                                     cfg.conv1d_width, cfg.dtype,
                                                     cfg.param_dtype))
            else:
                blocks.append(attention_lib.empty_state(
                    batch_size, cfg.attention_window_size, cfg.num_key_value_heads,
                    cfg.head_dim, cfg.dtype))
        return GriffinCarry(tuple(blocks), jnp.zeros((batch_size,), jnp.int32))

    def _check_carry(self, carry, batch: int) -> GriffinCarry:
        ref = self.initialize_carry(batch)
        if not isinstance(carry, GriffinCarry):
            raise TypeError(f"carry must be a GriffinCarry (see initialize_carry), "
                            f"got {type(carry).__name__}")
        structure = jax.tree.structure(ref)
        if jax.tree.structure(carry) != structure:
            raise ValueError(
                f"carry must hold one state per layer for block types {self.config.layer_types} "
                f"(see initialize_carry), got {jax.tree.structure(carry)}")
        checks.check_carry_leaves(carry, ref, batch)
        return carry

    def __call__(self, tokens: Array, carry: Optional[GriffinCarry] = None, *,
                 training: bool = False, seq_lengths: Optional[Array] = None,
                 reset: Optional[Array] = None,
                 attention_mask: Optional[Array] = None) -> Tuple[GriffinCarry, Array]:
        """Runs the model on ``tokens``; returns ``(carry, logits)``.

        Args:
          tokens: int ``(batch, T)`` ids in ``[0, vocab_size)``.
          carry: a :class:`GriffinCarry` from a previous call, or ``None`` (a
            fresh sequence at position 0).
          training: accepted for the trainer's interface; Griffin has no
            dropout, so it changes nothing.
          seq_lengths: int ``(batch,)`` valid lengths (right padding): padded
            steps change no state (the returned carry is the one after the
            last valid token); logits at padded steps are meaningless.
          reset: bool ``(batch, T)``: a new document starts there (every state
            restarts and positions restart at 0).
          attention_mask: ``(batch, T)`` 0/1 or bool (Hugging Face's): ones on
            the tokens, one contiguous run per row, e.g. left padding.  Each
            row gives what its unpadded tokens give (logits at padded steps
            are meaningless); exclusive with ``seq_lengths``.

        Returns:
          ``(carry, logits)``: the new carry and float32 logits ``(batch, T,
          vocab_size)``.

        Raises:
          ValueError / TypeError: bad ``tokens`` (ids checked when concrete),
            ``carry``, ``seq_lengths`` or ``reset``.
        """
        del training  # no dropout in Griffin
        if attention_mask is None:
            return self._run(tokens, carry, seq_lengths, reset)
        if seq_lengths is not None:
            raise ValueError("pass either attention_mask or seq_lengths, not both")
        mask = jnp.asarray(attention_mask)
        shape = tuple(getattr(tokens, "shape", mask.shape))
        if mask.shape != shape:
            raise ValueError(f"attention_mask must have the tokens' shape {shape}, "
                             f"got {mask.shape}")
        # Padding may hold any id.
        checks.check_tokens(tokens, self.config.vocab_size, valid=mask.astype(bool))
        lengths, starts = padding.mask_to_lengths(attention_mask)
        if reset is not None:
            reset = padding.align_left(jnp.asarray(reset), starts)
        carry, logits = self._run(padding.align_left(tokens, starts), carry, lengths, reset)
        return carry, padding.restore(logits, starts)

    @nn.compact
    def _run(self, tokens, carry, seq_lengths, reset) -> Tuple[GriffinCarry, Array]:
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

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype,
                         embedding_init=nn.initializers.variance_scaling(
                             1.0, "fan_in", "normal", in_axis=1, out_axis=0),
                         name="embedder")
        x = embed(tokens)
        # Padded steps: zero inputs (whatever ids they hold, even ones
        # outside the vocabulary), so they reach no product.
        x = scan_lib.zero_invalid(x, valid)
        if cfg.embeddings_scale_by_sqrt_dim:
            x = x * jnp.asarray(embedding_scale(cfg.hidden_size), x.dtype)
        positions = blocks.token_positions(carry.position, seq_len, reset)
        # Position 0 starts a document (a fresh sequence or a reset).
        starts = positions == 0
        states = []
        for i, kind in enumerate(cfg.layer_types):
            state, x = ResidualBlock(cfg, kind, name=f"blocks_{i}")(
                x, carry.blocks[i], positions=positions, starts=starts, seq_lengths=seq_lengths)
            states.append(state)
        x = _norm(cfg, "final_norm")(x)
        logits = embed.attend(x).astype(checks.accum_dtype(cfg.dtype))
        if cfg.logits_soft_cap:
            cap = jnp.asarray(cfg.logits_soft_cap, logits.dtype)
            logits = cap * jnp.tanh(logits / cap)
        return (GriffinCarry(tuple(states),
                             blocks.next_position(positions, seq_lengths, carry.position)),
                logits)
