"""Padding given as a Hugging Face ``attention_mask``, left or right.

The models handle right padding natively (``seq_lengths``: padded steps at the
end change no state).  A left-padded row (zeros, then ones) is the same
sequence moved: :func:`mask_to_lengths` finds each row's valid run,
:func:`align_left` moves it to the front (so the row is right-padded, with
``seq_lengths`` = its length) and :func:`restore` moves per-step outputs back
to the input's positions.  The result is exactly that of the unpadded row::

    lengths, starts = mask_to_lengths(attention_mask)
    carry, y = model(align_left(tokens, starts), seq_lengths=lengths)
    y = restore(y, starts)           # y[b, t] belongs to tokens[b, t]
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.ops import checks

Array = jax.Array

__all__ = ["mask_to_lengths", "align_left", "restore"]


def mask_to_lengths(attention_mask, name: str = "attention_mask") -> Tuple[Array, Array]:
    """``(lengths, starts)`` int32 ``(batch,)`` of a ``(batch, time)`` mask.

    Every row's ones must form one contiguous run (left padding, right padding
    or both); ``starts[b]`` is where it begins (0 for a row of zeros).

    Raises:
      ValueError: ``attention_mask`` is not 2-D, or (when concrete) a row's
        ones are not contiguous.  The message names ``name``.
    """
    if not hasattr(attention_mask, "shape") or len(attention_mask.shape) != 2:
        raise ValueError(f"{name} must have shape (batch, time), got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    m = jnp.asarray(attention_mask)
    m = m if m.dtype == jnp.bool_ else m != jnp.zeros((), m.dtype)
    lengths = jnp.sum(m.astype(jnp.int32), axis=1)
    starts = jnp.where(lengths > 0, jnp.argmax(m, axis=1).astype(jnp.int32), 0)
    value = checks.concrete_or_none(m)  # pylint: disable=protected-access
    if value is not None:
        t = np.arange(value.shape[1])[None, :]
        s, n = np.asarray(starts)[:, None], np.asarray(lengths)[:, None]
        if not np.array_equal((t >= s) & (t < s + n), value):
            raise ValueError(f"{name} must mark one contiguous run of tokens per row "
                             "(left padding: zeros then ones; right padding: ones then zeros)")
    return lengths, starts


def _roll_rows(x: Array, shift: Array) -> Array:
    """``y[b, t] = x[b, (t + shift_b) mod T]`` along axis 1."""
    seq_len = x.shape[1]
    idx = (jnp.arange(seq_len, dtype=jnp.int32)[None, :] + shift[:, None]) % seq_len
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def align_left(x: Array, starts: Array) -> Array:
    """Moves each row's valid run (beginning at ``starts[b]``) to position 0."""
    return _roll_rows(x, starts.astype(jnp.int32))


def restore(x: Array, starts: Array) -> Array:
    """The inverse of :func:`align_left`: per-step outputs back to input positions."""
    return _roll_rows(x, -starts.astype(jnp.int32))
