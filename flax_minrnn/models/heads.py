"""Task heads on the :class:`~flax_minrnn.models.lm.LM` backbone, and the losses.

The backbone is ``LM(config, use_head=False)``: the same blocks as the
language model, returning the final-normed hidden states ``z_t``
(``(batch, time, d_model)``).  Padding is given by ``attention_mask``
(``(batch, time)`` bool/int, Hugging Face's: ones on the tokens, one
contiguous run per row, so left padding (zeros then ones) and right padding
both work) or ``seq_lengths`` (``(batch,)``, right padding); padded steps
change no state, so every head is invariant to the amount and side of
padding (a left-padded row is moved to the front, run, and its per-token
outputs moved back; see :mod:`flax_minrnn.models.padding`).

Bidirectional heads add a backward recurrence: a second backbone
(``backward``) reads each row's valid prefix reversed,
``z^b_t = backbone_b(x_{L-1}, ..., x_t)``, i.e. the recurrence runs from the
last valid token to the first (padding stays at the end, so the backward
pass also starts exactly at the last valid token), and features are
``[z^f_t, z^b_t]``.
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_minrnn.models import padding
from flax_minrnn.models.lm import LM, LMConfig
from flax_minrnn.nn import dense as dense_lib
from flax_minrnn.ops import checks

Array = jax.Array

__all__ = ["SequenceClassifier", "TokenClassifier", "causal_lm_loss",
           "weighted_cross_entropy", "lengths_from_mask", "reverse_valid"]

POOLINGS = ("last", "mean")


def lengths_from_mask(attention_mask) -> Array:
    """``seq_lengths`` (int32 ``(batch,)``) of a right-padded ``(batch, time)`` mask.

    Raises ``ValueError`` when the mask is concrete and not of the form
    ones-then-zeros in every row.
    """
    if not hasattr(attention_mask, "shape") or attention_mask.ndim != 2:
        raise ValueError("attention_mask must have shape (batch, time), got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    m = jnp.asarray(attention_mask)
    m = m if m.dtype == jnp.bool_ else m != jnp.zeros((), m.dtype)
    lengths = jnp.sum(m.astype(jnp.int32), axis=1)
    value = checks.concrete_or_none(m)  # pylint: disable=protected-access
    if value is not None:
        prefix = np.arange(value.shape[1])[None, :] < value.sum(1)[:, None]
        if not np.array_equal(prefix, value):
            raise ValueError("attention_mask must be right-padded (ones then zeros in "
                             "every row)")
    return lengths


def reverse_valid(x: Array, seq_lengths: Array) -> Array:
    """Reverses each row's first ``seq_lengths[b]`` steps (axis 1); padding stays put.

    ``y[b, t] = x[b, L_b - 1 - t]`` for ``t < L_b``, ``x[b, t]`` otherwise.  It
    is its own inverse.
    """
    t = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    lengths = seq_lengths.astype(jnp.int32)[:, None]
    idx = jnp.where(t < lengths, lengths - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _classifier(config: LMConfig, num_classes: int):
    """The output layer: ``config``'s dtypes, logits in float32 (float64 for
    a float64 computation)."""
    dense = dense_lib.Dense(num_classes, dtype=config.dtype, param_dtype=config.param_dtype,
                            name="classifier")
    return lambda z: dense(z).astype(checks.accum_dtype(config.dtype))


class _Features(nn.Module):
    """Backbone features ``(batch, time, d)`` with each row's tokens moved to
    the front, the valid lengths, and where each row's tokens started."""

    config: LMConfig
    bidirectional: bool = False

    @nn.compact
    def __call__(self, tokens, *, attention_mask=None, seq_lengths=None,
                 training: bool = False) -> Tuple[Array, Array, Array]:
        if getattr(tokens, "ndim", None) != 2:  # Ids are the backbone's to check.
            checks.check_tokens(tokens, self.config.vocab_size)
        batch, seq_len = tokens.shape
        if attention_mask is not None and seq_lengths is not None:
            raise ValueError("pass either attention_mask or seq_lengths, not both")
        starts = jnp.zeros((batch,), jnp.int32)
        if attention_mask is not None:
            if tuple(getattr(attention_mask, "shape", ())) != (batch, seq_len):
                raise ValueError(f"attention_mask must have the tokens' shape "
                                 f"{(batch, seq_len)}, got {getattr(attention_mask, 'shape', None)}")
            seq_lengths, starts = padding.mask_to_lengths(attention_mask)
            tokens = padding.align_left(tokens, starts)
        lengths = (jnp.full((batch,), seq_len, jnp.int32) if seq_lengths is None
                   else checks.check_seq_lengths(seq_lengths, batch, seq_len).astype(jnp.int32))
        _, z = LM(self.config, use_head=False, name="backbone")(
            tokens, training=training, seq_lengths=lengths)
        if self.bidirectional:
            _, zb = LM(self.config, use_head=False, name="backward")(
                reverse_valid(tokens, lengths), training=training, seq_lengths=lengths)
            z = jnp.concatenate([z, reverse_valid(zb, lengths)], axis=-1)
        valid = checks.lengths_to_mask(lengths, seq_len)
        return jnp.where(valid[:, :, None], z, jnp.zeros((), z.dtype)), lengths, starts


class SequenceClassifier(nn.Module):
    """Classifies whole sequences: pooled backbone features, then ``classifier``.

    Pooling over the valid steps ``t < L``::

        last:  p = z_{L-1}                       ([z^f_{L-1}, z^b_0] bidirectional)
        mean:  p = (1 / L) sum_{t<L} z_t
        logits = W p + b                         (float32*, (batch, num_classes))

    A row with ``L = 0`` pools zeros.  (*) Logits are float32, or float64
    for a float64 ``config.dtype``; ``W`` and ``b`` have ``config``'s
    ``param_dtype`` and compute in its ``dtype``, as the backbone does.

    Attributes:
      config: the backbone's :class:`~flax_minrnn.models.lm.LMConfig`.
      num_classes: number of classes.
      pooling: ``'last'`` or ``'mean'``.
      bidirectional: add a backward recurrence (module docstring).
    """

    config: LMConfig
    num_classes: int
    pooling: str = "last"
    bidirectional: bool = False

    @nn.compact
    def __call__(self, tokens: Array, *, attention_mask=None, seq_lengths=None,
                 training: bool = False) -> Array:
        """Returns float32 (float64 for a float64 config) logits ``(batch,
        num_classes)``, pooled over the valid tokens only.

        Args:
          tokens: int ``(batch, T)`` ids in ``[0, vocab_size)``.
          attention_mask: ``(batch, T)`` 0/1 or bool (Hugging Face's): ones on
            the tokens, one contiguous run per row (left or right padding).
            Exclusive with ``seq_lengths``.
          seq_lengths: int ``(batch,)`` valid lengths (right padding).
          training: enables dropout (needs a ``'dropout'`` rng).
        """
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        z, lengths, _ = _Features(self.config, self.bidirectional, name="features")(
            tokens, attention_mask=attention_mask, seq_lengths=seq_lengths, training=training)
        d = self.config.d_model
        if self.pooling == "mean":
            pooled = jnp.sum(z, axis=1) / jnp.maximum(lengths, 1).astype(z.dtype)[:, None]
        else:
            last = jnp.take_along_axis(z, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
            if self.bidirectional:
                # The backward direction's summary is its state at step 0.
                last = jnp.concatenate([last[:, :d], z[:, 0, d:]], axis=-1)
            pooled = jnp.where((lengths > 0)[:, None], last, jnp.zeros((), z.dtype))
        return _classifier(self.config, self.num_classes)(pooled)


class TokenClassifier(nn.Module):
    """Per-token classification: ``logits_t = W z_t + b`` (float32, or float64
    for a float64 ``config.dtype``; ``(batch, time, C)``).

    With ``bidirectional=False`` (the default) ``logits_t`` depends only on
    tokens ``<= t``.  Logits at padded steps are those of a zero feature
    vector (the bias); mask them in the loss.

    Attributes:
      config: the backbone's :class:`~flax_minrnn.models.lm.LMConfig`.
      num_classes: number of classes.
      bidirectional: add a backward recurrence (module docstring).
    """

    config: LMConfig
    num_classes: int
    bidirectional: bool = False

    @nn.compact
    def __call__(self, tokens: Array, *, attention_mask=None, seq_lengths=None,
                 training: bool = False) -> Array:
        """Returns float32 (float64 for a float64 config) logits ``(batch, T, num_classes)``; ``logits[b, t]``
        belongs to ``tokens[b, t]`` (meaningless at padding).  The arguments
        are those of :meth:`SequenceClassifier.__call__`.
        """
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        z, _, starts = _Features(self.config, self.bidirectional, name="features")(
            tokens, attention_mask=attention_mask, seq_lengths=seq_lengths, training=training)
        logits = _classifier(self.config, self.num_classes)(z)
        return padding.restore(logits, starts)  # logits[b, t] belongs to tokens[b, t]


# ----------------------------------------------------------------------------
# Losses (float32 whatever the logits' dtype).


def weighted_cross_entropy(logits: Array, targets: Array, weights: Array) -> Tuple[Array, Array]:
    """Weighted mean cross-entropy and the weight total.

    ``loss = sum_i w_i * (-log softmax(logits_i)[y_i]) / max(sum_i w_i, 1)``

    Args:
      logits: ``(..., vocab)`` (any float dtype; computed in float32).
      targets: int ``(...)``.
      weights: ``(...)`` (0 drops a position).

    Returns:
      ``(loss, total)``: float32 scalars.
    """
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)}"
                         f" + (vocab,), and weights {tuple(weights.shape)} the targets' shape")
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    w = weights.astype(jnp.float32)
    total = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(total, jnp.float32(1.0)), total


def causal_lm_loss(logits: Array, labels: Array, ignore_index: int = -100, *,
                   shift: bool = True) -> Tuple[Array, Array]:
    """Mean next-token cross-entropy over labels that are not ``ignore_index``.

    With ``shift=True`` (Hugging Face convention) ``labels`` are the input
    ids: ``logits[:, t]`` is scored against ``labels[:, t + 1]``.  With
    ``shift=False`` they are already aligned with ``logits``.

    ``loss = (1 / N) sum_{(b,t): y != ignore} -log softmax(logits_{b,t})[y_{b,t}]``

    Args:
      logits: float ``(batch, T, V)``.
      labels: int ``(batch, T)`` ids in ``[0, V)`` or ``ignore_index``.
      ignore_index: the label of positions that are not scored.
      shift: score ``logits[:, t]`` against ``labels[:, t + 1]`` (True) or
        against ``labels[:, t]`` (False).

    Returns:
      ``(loss, num_tokens)``: float32 mean (0 when ``N = 0``) and int32 ``N``.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, jnp.zeros((), labels.dtype))
    loss, _ = weighted_cross_entropy(logits, safe, valid)
    return loss, jnp.sum(valid.astype(jnp.int32))
