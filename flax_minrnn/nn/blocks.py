"""Building blocks that the language models share: norms, positions, the causal
convolution and the channel-mixing MLP.

* :class:`Norm`: RMSNorm or LayerNorm computed in float32;
* :func:`sinusoidal_encoding`, :class:`PositionalEncoding`,
  :func:`token_positions`, :func:`next_position`: absolute positions that
  continue across calls (and restart at document boundaries);
* :class:`CausalConv`: a depthwise causal convolution that streams through a
  state;
* :class:`ChannelMixing`: the position-wise MLP (plain or gated).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_minrnn.ops import checks
from flax_minrnn.nn import dense as dense_lib

Array = jax.Array

__all__ = ["Norm", "sinusoidal_encoding", "PositionalEncoding", "token_positions",
           "next_position", "CausalConv", "ChannelMixing"]


def frequencies(n: int, dim: int, base: float, dtype) -> Array:
    """``w_i = base^(-2i / dim)`` for ``i < n`` in ``dtype``: the angular
    frequencies of sinusoidal positions and of RoPE."""
    return jnp.exp(jnp.arange(n, dtype=dtype) * jnp.asarray(-2.0 * math.log(base) / dim, dtype))


def sinusoidal_encoding(positions: Array, dim: int, dtype=jnp.float32) -> Array:
    """Sinusoidal encoding (Vaswani et al. 2017), interleaved.

    ``pe(p)[2i] = sin(p w_i)``, ``pe(p)[2i+1] = cos(p w_i)``,
    ``w_i = 10000^(-2i / dim)``; computed for any position (no table).

    Args:
      positions: int ``(...)``.
      dim: encoding width.
      dtype: float32 (the default) or float64, the precision of the angles.

    Returns:
      ``dtype`` ``(..., dim)``.
    """
    half = (dim + 1) // 2
    freqs = frequencies(half, dim, 10000.0, dtype)
    angles = positions.astype(dtype)[..., None] * freqs.reshape((1,) * positions.ndim + (half,))
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pe.reshape(*positions.shape, 2 * half)[..., :dim]


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
    last = jax.lax.index_in_dim(
        jnp.take_along_axis(positions, jnp.maximum(n - 1, 0)[:, None], axis=1), 0, 1,
        keepdims=False)
    return jnp.where(n > 0, last + 1, current)


class PositionalEncoding(nn.Module):
    """Adds the encoding of absolute positions to ``x`` (``'learned'`` or ``'sinusoidal'``).

    Learned positions index a ``(max_seq_length, d)`` table.  A position
    ``>= max_seq_length`` at a valid step raises ``ValueError`` when the
    positions are concrete; under ``jax.jit`` they cannot be checked and are
    clipped to ``max_seq_length - 1``.

    Attributes:
      mode: ``'learned'`` or ``'sinusoidal'``.
      max_seq_length: number of learned positions (``>= 1``; ``'learned'`` only).
      dtype, param_dtype: compute and parameter dtypes of the table.
      mode_name: the name of ``mode`` in the caller's API, used in error
        messages (default ``'positional_encoding'``, :class:`~flax_minrnn.
        models.lm.LMConfig`'s field).
    """

    mode: str
    max_seq_length: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mode_name: str = "positional_encoding"

    @nn.compact
    def __call__(self, x: Array, positions: Array, valid: Optional[Array]) -> Array:
        d = x.shape[-1]
        checks.check_choice(self.mode_name, self.mode, ("learned", "sinusoidal"))
        if self.mode == "sinusoidal":
            return x + sinusoidal_encoding(positions, d, checks.accum_dtype(x.dtype)).astype(x.dtype)
        checks.check_int_at_least("max_seq_length", self.max_seq_length, 1)
        value = checks.concrete_or_none(positions if valid is None
                          else jnp.where(valid, positions, jnp.zeros_like(positions)))
        if value is not None and value.size and value.max() >= self.max_seq_length:
            raise ValueError(
                f"positions up to {value.max()} exceed max_seq_length="
                f"{self.max_seq_length} (learned positional encoding); raise "
                f"max_seq_length or use {self.mode_name}='sinusoidal'")
        table = nn.Embed(self.max_seq_length, d, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="table")
        return x + table(jnp.clip(positions, 0, self.max_seq_length - 1)).astype(x.dtype)


class Norm(nn.Module):
    """RMSNorm or LayerNorm in float32 (float64 for float64 inputs), returned in ``dtype``.

    ``rmsnorm``:   ``y = x / sqrt(mean(x^2) + eps) * scale``
    ``layernorm``: ``y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias``

    Parameters ``scale`` (ones) and ``bias`` (zeros, layernorm), the layout of
    ``flax.linen.RMSNorm`` / ``LayerNorm``.  Written out (instead of using
    those) so that bfloat16 parameters work under strict dtype promotion.

    With ``zero_centered=True`` the parameter is ``scale_delta`` (zeros) and
    the factor is ``1 + scale_delta`` (computed in float32), the layout of
    RecurrentGemma's and Gemma's RMSNorm: a checkpoint stored that way
    converts by copying, bit for bit, in both directions.
    """

    kind: str
    eps: float
    dtype: Any
    param_dtype: Any
    zero_centered: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        checks.check_choice("kind", self.kind, ("rmsnorm", "layernorm"))
        checks.check_positive_number("eps", self.eps)
        checks.check_bool("zero_centered", self.zero_centered)
        d = x.shape[-1]
        f = checks.accum_dtype(x.dtype)
        x = x.astype(f)
        if self.zero_centered:
            delta = self.param("scale_delta", nn.initializers.zeros, (d,), self.param_dtype)
            scale = jnp.asarray(1.0, f) + delta.astype(f)
        else:
            scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype).astype(f)
        eps = jnp.asarray(self.eps, f)
        if self.kind == "rmsnorm":
            y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
        else:
            centred = x - jnp.mean(x, axis=-1, keepdims=True)
            y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                                        + eps)
        y = y * scale.astype(f)[(None,) * (x.ndim - 1)]
        if self.kind == "layernorm":
            bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
            y = y + bias.astype(f)[(None,) * (x.ndim - 1)]
        return y.astype(self.dtype)


def norm(kind: str, eps: float, dtype, param_dtype, name: str) -> nn.Module:
    return Norm(kind, eps, dtype, param_dtype, name=name)


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
        checks.check_int_at_least("width", self.width, 1)
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
        # lax slices: NumPy-style slicing of a symbolic time axis (jax.export)
        # would lower to a gather.
        window = lambda v, j: jax.lax.slice_in_dim(v, j, j + seq_len, axis=1)
        for j in range(k):
            tap = window(buf, j)
            if doc is not None:
                same = window(doc, j) == window(doc, k - 1)
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
        checks.check_int_at_least("d_model", self.d_model, 1)
        checks.check_int_at_least("d_hidden", self.d_hidden, 1)
        checks.check_bool("glu", self.glu)
        dense = lambda n, name, **kw: dense_lib.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                               name=name, **kw)
        if self.glu:
            gate, value = jnp.split(dense(2 * self.d_hidden, "up")(u), 2, axis=-1)
            hidden = nn.gelu(gate) * value
        else:
            hidden = nn.gelu(dense(self.d_hidden, "up")(u))
        down_init = {} if self.down_kernel_init is None else {"kernel_init": self.down_kernel_init}
        return dense(self.d_model, "down", **down_init)(hidden)

