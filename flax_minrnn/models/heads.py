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


def _check_logits(logits, shape_doc: str, ndim=None) -> None:
    """``logits`` must be a floating array of rank ``ndim`` (``None``: any rank
    >= 1; ``shape_doc`` in errors) with a non-empty last (vocab) axis."""
    checks.check_float("logits", logits)
    if logits.ndim < 1 if ndim is None else logits.ndim != ndim:
        raise ValueError(f"logits must have shape {shape_doc}, got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty vocab axis (last), got shape "
                         f"{tuple(logits.shape)}")


def _check_ids(name: str, ids, vocab: int, valid=None, note: str = "") -> None:
    """Values of ``ids`` (any rank) in ``[0, vocab)`` where ``valid``, checked
    when concrete (skipped under ``jax.jit``): :func:`checks.check_tokens` on
    the flattened ids; ``note`` is appended to its error."""
    if not ids.size:
        return
    flat = lambda a: None if a is None else jnp.reshape(a, (1, -1))
    try:
        checks.check_tokens(flat(ids), vocab, name=name, valid=flat(valid))
    except ValueError as err:
        raise ValueError(f"{err}{note}") from None


def weighted_cross_entropy(logits: Array, targets: Array, weights: Array) -> Tuple[Array, Array]:
    """Weighted mean cross-entropy and the weight total.

    ``loss = sum_i w_i * (-log softmax(logits_i)[y_i]) / max(sum_i w_i, 1)``

    Args:
      logits: float ``(..., vocab)`` (any float dtype; computed in float32).
      targets: int ``(...)`` (``logits.shape[:-1]``), ids in ``[0, vocab)``
        at every position (a position with weight 0 too: pad with a valid id).
      weights: bool, int or float ``(...)``, the targets' shape exactly (0
        drops a position).

    Returns:
      ``(loss, total)``: float32 scalars.

    Raises:
      TypeError: an argument is not an array of the stated dtype, naming it.
      ValueError: a shape differs from the stated one, or ``targets`` holds
        an id outside ``[0, vocab)`` (checked when concrete, not under
        ``jax.jit``), naming the argument.
    """
    _check_logits(logits, "(..., vocab)")
    checks.check_int_array("targets", targets, "class / token ids")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)}), "
                         f"got {tuple(targets.shape)}")
    if not hasattr(weights, "shape") or not hasattr(weights, "dtype"):
        raise TypeError(f"weights must be an array, got {type(weights).__name__}")
    if not (weights.dtype == jnp.bool_ or jnp.issubdtype(weights.dtype, jnp.integer)
            or jnp.issubdtype(weights.dtype, jnp.floating)):
        raise TypeError(f"weights must be a bool, integer or floating-point array, "
                        f"got dtype {weights.dtype}")
    if tuple(weights.shape) != tuple(targets.shape):
        raise ValueError(f"weights must have the targets' shape {tuple(targets.shape)}, "
                         f"got {tuple(weights.shape)}")
    _check_ids("targets", targets, logits.shape[-1], note="; vocab_size is logits.shape[-1]")
    return _weighted_cross_entropy(logits, targets, weights)


def _weighted_cross_entropy(logits, targets, weights) -> Tuple[Array, Array]:
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
      labels: int ``(batch, T)`` (the first two axes of ``logits``), ids in
        ``[0, V)`` or ``ignore_index``.  The ids are checked when concrete;
        under ``jax.jit`` they are not (an id outside ``[0, V)`` then gives
        a NaN loss).
      ignore_index: the label of positions that are not scored (an integer).
      shift: score ``logits[:, t]`` against ``labels[:, t + 1]`` (True) or
        against ``labels[:, t]`` (False).

    Returns:
      ``(loss, num_tokens)``: float32 mean (0 when ``N = 0``) and int32 ``N``.

    Raises:
      TypeError: ``logits`` is not a floating array or ``labels`` not an
        integer one, or ``ignore_index`` is not an integer, naming it.
      ValueError: ``logits`` is not 3-D, ``labels`` does not have shape
        ``logits.shape[:2]``, ``labels`` holds an id outside ``[0, V)`` other
        than ``ignore_index`` (when concrete), or ``shift`` is not a bool.
    """
    _check_logits(logits, "(batch, T, V)", ndim=3)
    checks.check_int_array("labels", labels, "class / token ids")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape (batch, T) = {tuple(logits.shape[:2])} "
                         f"(the first two axes of logits {tuple(logits.shape)}), "
                         f"got {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    checks.check_bool("shift", shift)
    valid = labels != ignore_index
    _check_ids("labels", labels, logits.shape[-1], valid=valid,
               note=f"; vocab_size is logits.shape[-1], and ignore_index={ignore_index} is "
                    "allowed too")
    if shift:
        logits, labels, valid = logits[:, :-1], labels[:, 1:], valid[:, 1:]
    safe = jnp.where(valid, labels, jnp.zeros((), labels.dtype))
    loss, _ = _weighted_cross_entropy(logits, safe, valid)
    return loss, jnp.sum(valid.astype(jnp.int32))
