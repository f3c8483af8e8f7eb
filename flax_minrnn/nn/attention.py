"""Local (sliding-window) multi-query / grouped-query attention with a ring-buffer cache.

The temporal block of Griffin's attention layers (De et al. 2024, "Griffin",
arXiv 2402.19427).  For a query at absolute position ``p`` the keys it sees
are those of the same document with positions in ``[p - W, p]`` (itself and
the ``W`` previous tokens; ``W = window``), as in the reference implementation
(google-deepmind/recurrentgemma), whose published weights were trained so::

    q, k, v   = x W_q, x W_k, x W_v                 (biases only with qkv_bias)
    q, k      = rope(q, p), rope(k, p)              on the first rotary dims of each head
    s_{t,j}   = q_t . k_j / sqrt(head_dim)          j in window(t), same document, valid
    y_t       = W_o concat_heads(softmax_j(s_{t,j}) v_j) + b_o

Heads: ``num_heads`` query heads share ``num_kv_heads`` key/value heads
(``num_kv_heads = 1`` is multi-query attention, as in RecurrentGemma).

Rotary embedding (RoPE, Su et al. 2021) on the first ``rot = head_dim *
partial_rotary_factor`` dimensions of every head, split into halves ``(x1,
x2)``, with ``theta_i = p * base^(-2i / rot)``, ``i < rot / 2``::

    x1' = x1 cos(theta) - x2 sin(theta)
    x2' = x2 cos(theta) + x1 sin(theta)

the other ``head_dim - rot`` dimensions pass unchanged.

Decoding state (:class:`AttentionState`): a ring buffer of ``W`` slots holding
keys, values and their absolute positions (``-1`` = empty); the token at
position ``p`` lives in slot ``p mod W``.  Every call, whatever its length,
runs the same code: the new keys are appended to the buffer's, the mask is
computed from absolute positions (so a multi-token call with a filled cache,
i.e. chunked prefill, and a one-token decode step are the same computation),
and the buffer then keeps the last ``W`` valid tokens of the current document.
``W`` slots suffice for ``W + 1`` visible keys: a query at ``p`` needs the
cached ``[p - W, p - 1]`` (at most ``W`` tokens) and the tokens of its own call.

Hugging Face's PyTorch ``RecurrentGemmaForCausalLM`` masks with ``(p - W, p]``
(``W`` keys); it agrees with this module on the first ``W`` tokens of a
document and differs by the key at distance ``W`` after them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_minrnn.nn import blocks
from flax_minrnn.nn import dense as dense_lib
from flax_minrnn.ops import checks

Array = jax.Array

__all__ = ["AttentionState", "LocalAttention", "apply_rope", "rotary_dim", "empty_state"]

# Logit of masked keys: finite, so a query with no visible key (a padded step
# on an empty cache) gives finite (meaningless) outputs instead of NaN.
_MASKED = -1e30


# Registered so that jax.export can serialize functions that take or return it.
@functools.partial(jax.export.register_namedtuple_serialization,
                   serialized_name="flax_minrnn.AttentionState")
class AttentionState(NamedTuple):
    """The ring-buffer cache of one attention layer (a pytree).

    Attributes:
      keys: ``(batch, window, num_kv_heads, head_dim)`` in the compute dtype,
        rotary embedding applied.
      values: ``(batch, window, num_kv_heads, head_dim)``.
      positions: int32 ``(batch, window)``: absolute position of each slot's
        token, ``-1`` for an empty slot.  Slot of position ``p``: ``p mod window``.
    """

    keys: Array
    values: Array
    positions: Array


def empty_state(batch: int, window: int, num_kv_heads: int, head_dim: int,
                dtype) -> AttentionState:
    """An empty ring buffer: zero keys and values, every position ``-1``."""
    shape = (batch, window, num_kv_heads, head_dim)
    return AttentionState(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                          jnp.full((batch, window), -1, jnp.int32))


def rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    """Number of rotated dimensions per head; raises unless it is a positive even integer."""
    checks.check_real("partial_rotary_factor", partial_rotary_factor, low=0.0, high=1.0,
                        high_closed=True)
    rot = head_dim * float(partial_rotary_factor)
    if not rot > 0 or rot != int(rot) or int(rot) % 2:
        raise ValueError(
            f"partial_rotary_factor must lie in (0, 1] and make head_dim * "
            f"partial_rotary_factor an even integer; got partial_rotary_factor="
            f"{partial_rotary_factor!r} with head_dim={head_dim}")
    return int(rot)


def apply_rope(x: Array, positions: Array, rot: int, base: float) -> Array:
    """Rotary embedding of the first ``rot`` dimensions of ``x`` (module docstring).

    Args:
      x: ``(batch, time, ..., head_dim)``.
      positions: int ``(batch, time)`` absolute positions.
      rot: even number of rotated dimensions (``<= head_dim``).
      base: the RoPE base (``rope_theta``).

    Returns:
      ``x`` rotated, same shape and dtype (angles and rotation computed in
      float32, or in float64 for float64 ``x``).
    """
    half = rot // 2
    accum = checks.accum_dtype(x.dtype)
    inv_freq = blocks.frequencies(half, rot, base, accum)
    lead = x.ndim - 1  # batch, time and the head axes
    pos = positions.astype(accum).reshape(positions.shape + (1,) * (lead - 2) + (1,))
    theta = pos * inv_freq.reshape((1,) * lead + (half,))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    xf = x.astype(accum)
    # jnp.split, not NumPy-style slicing, which lowers to a gather when a
    # dimension is symbolic (jax.export).
    x1, x2, rest = jnp.split(xf, [half, rot], axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def _take_rows(x: Array, idx: Array) -> Array:
    """``x[b, idx[b]]`` for ``x`` of shape ``(batch, time)``."""
    return jax.lax.index_in_dim(jnp.take_along_axis(x, idx[:, None], axis=1), 0, 1,
                                keepdims=False)


class LocalAttention(nn.Module):
    """Sliding-window MQA/GQA attention with RoPE and a ring-buffer cache.

    See the module docstring for the equations.  Usage::

        attn = LocalAttention(num_heads=4, num_kv_heads=1, window=64)
        params = attn.init(key, x)                       # x: (batch, T, width)
        cache, y = attn.apply(params, x)                 # y: (batch, T, width)
        cache, y2 = attn.apply(params, x2, cache)        # continue (any length)

    Parameters: ``proj_q`` ``(width, num_heads * head_dim)``, ``proj_k``,
    ``proj_v`` ``(width, num_kv_heads * head_dim)`` (biases only with
    ``qkv_bias``), ``proj_final``
    ``(num_heads * head_dim, width)`` with a bias.

    Attributes:
      num_heads: query heads; must divide the input width (``head_dim =
        width / num_heads``).
      num_kv_heads: key/value heads; must divide ``num_heads``.
      window: ``W >= 1``: a query sees itself and the ``W`` previous tokens
        (``W`` is also the number of cache slots).
      partial_rotary_factor: fraction of each head's dimensions rotated.
      rope_theta: RoPE base.
      final_w_init_variance_scale: variance scale (fan-in) of ``proj_final``.
      qkv_bias: give ``proj_q``, ``proj_k`` and ``proj_v`` biases (Hugging
        Face's ``attention_bias``; the published models have none).
      dtype: compute dtype (``None``: the input's); logits and softmax in float32
        (float64 for a float64 dtype).
      param_dtype: parameter dtype.
    """

    num_heads: int
    num_kv_heads: int = 1
    window: int = 2048
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    final_w_init_variance_scale: float = 1.0
    qkv_bias: bool = False
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def _head_dim(self, width: int) -> int:
        checks.check_int_at_least("num_heads", self.num_heads, 1)  # pylint: disable=protected-access
        checks.check_int_at_least("num_kv_heads", self.num_kv_heads, 1)  # pylint: disable=protected-access
        checks.check_int_at_least("window", self.window, 1)  # pylint: disable=protected-access
        checks.check_positive_number("rope_theta", self.rope_theta)
        checks.check_positive_number("final_w_init_variance_scale",
                                     self.final_w_init_variance_scale)
        checks.check_bool("qkv_bias", self.qkv_bias)
        checks.check_float_dtype("dtype", self.dtype, optional=True)
        checks.check_float_dtype("param_dtype", self.param_dtype)
        if width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the input width {width}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        return width // self.num_heads

    def initialize_carry(self, batch_size: int, width: int,
                         input_dtype=jnp.float32) -> AttentionState:
        """The empty cache (no parameters, no RNG) for inputs of width ``width``
        and dtype ``input_dtype`` (the cache is in the compute dtype)."""
        return empty_state(batch_size, self.window, self.num_kv_heads, self._head_dim(width),
                           self.dtype or input_dtype)

    @nn.compact
    def __call__(self, x: Array, carry: Optional[AttentionState] = None, *,
                 positions: Optional[Array] = None, seq_lengths: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[AttentionState, Array]:
        """Attends over the cache and ``x``; returns ``(carry, y)``.

        Args:
          x: float ``(batch, T, width)``.
          carry: an :class:`AttentionState` (``None``: empty).
          positions: int ``(batch, T)`` absolute positions of ``x``'s tokens,
            consecutive within a document (the ring buffer relies on it);
            ``None``: continue after the newest cached position (0 when empty),
            restarting at 0 after each ``reset``.
          seq_lengths: int ``(batch,)`` valid lengths (right padding): padded
            tokens are neither attended to nor cached; their outputs are
            meaningless (finite).
          reset: bool ``(batch, T)``: a document starts there; queries never
            see keys of another document and the returned cache holds only the
            last document's tokens.

        Returns:
          ``(carry, y)``: the updated cache and ``y`` ``(batch, T, width)``.
        """
        checks.check_input(x)
        batch, seq_len, width = x.shape
        head_dim = self._head_dim(width)
        rot = rotary_dim(head_dim, self.partial_rotary_factor)
        dtype = self.dtype or x.dtype
        if carry is None:
            carry = self.initialize_carry(batch, width, x.dtype)
        carry = self._check_carry(carry, batch, head_dim, dtype)
        valid = checks.valid_mask(batch, seq_len, seq_lengths, None)
        if reset is not None:
            reset = checks.check_bool_bt("reset", reset, batch, seq_len)
        if positions is None:
            start = jnp.max(carry.positions, axis=1) + 1
            positions = blocks.token_positions(start, seq_len, reset)
        elif tuple(positions.shape) != (batch, seq_len):
            raise ValueError(f"positions must have shape (batch, T) = ({batch}, {seq_len}), "
                             f"got {tuple(positions.shape)}")
        positions = positions.astype(jnp.int32)

        dense = lambda n, name, bias, init: dense_lib.Dense(
            n, use_bias=bias, dtype=dtype, param_dtype=self.param_dtype, kernel_init=init,
            name=name)
        fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        kv, groups = self.num_kv_heads, self.num_heads // self.num_kv_heads
        x = x.astype(dtype)
        q = dense(self.num_heads * head_dim, "proj_q", self.qkv_bias, fan_in)(x)
        k = dense(kv * head_dim, "proj_k", self.qkv_bias, fan_in)(x)
        v = dense(kv * head_dim, "proj_v", self.qkv_bias, fan_in)(x)
        q = apply_rope(q.reshape(batch, seq_len, kv, groups, head_dim), positions, rot,
                       self.rope_theta)
        k = apply_rope(k.reshape(batch, seq_len, kv, head_dim), positions, rot, self.rope_theta)
        v = v.reshape(batch, seq_len, kv, head_dim)

        # Keys: the cache's W slots, then this call's T tokens.
        keys = jnp.concatenate([carry.keys, k], axis=1)
        values = jnp.concatenate([carry.values, v], axis=1)
        key_pos = jnp.concatenate([carry.positions, positions], axis=1)
        new_valid = jnp.ones((batch, seq_len), bool) if valid is None else valid
        key_ok = jnp.concatenate([carry.positions >= 0, new_valid], axis=1)
        q_pos = positions[:, :, None]
        mask = (key_ok[:, None, :] & (key_pos[:, None, :] <= q_pos)
                & (key_pos[:, None, :] >= q_pos - self.window))
        doc = None
        if reset is not None:
            # Document of every key: the cache belongs to document 0.
            doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)
            key_doc = jnp.concatenate([jnp.zeros((batch, self.window), jnp.int32), doc], axis=1)
            mask = mask & (key_doc[:, None, :] == doc[:, :, None])

        accum = checks.accum_dtype(dtype)
        logits = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=accum)
        logits = logits * jnp.asarray(1.0 / math.sqrt(head_dim), accum)
        logits = jnp.where(mask[:, None, None], logits, jnp.asarray(_MASKED, accum))
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        # Invalid keys get weight 0; zeroing their values too keeps a NaN
        # there (padding) out of the product.
        values = jnp.where(key_ok[:, :, None, None], values, jnp.zeros((), values.dtype))
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values)
        out = out.reshape(batch, seq_len, self.num_heads * head_dim)
        y = dense(width, "proj_final", True, nn.initializers.variance_scaling(
            self.final_w_init_variance_scale, "fan_in", "normal"))(out)
        return self._update(carry, k, v, positions, new_valid, doc, reset), y

    def _check_carry(self, carry, batch: int, head_dim: int, dtype) -> AttentionState:
        if not isinstance(carry, AttentionState):
            raise TypeError(f"carry must be an AttentionState, got {type(carry).__name__}")
        checks.check_carry_leaves(
            carry, empty_state(batch, self.window, self.num_kv_heads, head_dim, dtype), batch)
        return carry

    def _update(self, carry: AttentionState, k: Array, v: Array, positions: Array,
                valid: Array, doc: Optional[Array], reset: Optional[Array]) -> AttentionState:
        """Writes the last ``W`` valid tokens of the current document into the ring buffer."""
        batch, seq_len = positions.shape
        window = self.window
        n_valid = jnp.sum(valid.astype(jnp.int32), axis=1)
        last = jnp.maximum(n_valid - 1, 0)  # right padding: valid tokens come first
        keep = valid & (positions > (_take_rows(positions, last) - window)[:, None])
        if doc is not None:
            keep = keep & (doc == _take_rows(doc, last)[:, None])
        # Kept tokens have distinct slots; the others are sent out of range and dropped.
        slot = jnp.where(keep, positions % window, window)
        rows = jnp.arange(batch)[:, None]
        keys = carry.keys.at[rows, slot].set(k, mode="drop")
        values = carry.values.at[rows, slot].set(v, mode="drop")
        pos = carry.positions.at[rows, slot].set(positions, mode="drop")
        if reset is None:
            return AttentionState(keys, values, pos)
        # A new document among the valid tokens: older slots belong to another one.
        written = jnp.zeros((batch, window), bool).at[rows, slot].set(True, mode="drop")
        stale = jnp.any(reset & valid, axis=1)[:, None] & ~written
        zero = jnp.zeros((), keys.dtype)
        return AttentionState(jnp.where(stale[:, :, None, None], zero, keys),
                              jnp.where(stale[:, :, None, None], zero, values),
                              jnp.where(stale, jnp.int32(-1), pos))
