"""attention_mask with left (or right) padding: Griffin and both classifiers
give what the unpadded rows give; the mask helpers; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOL
from flax_minrnn.models import padding
from flax_minrnn.models.griffin import Griffin, GriffinConfig
from flax_minrnn.models.heads import SequenceClassifier, TokenClassifier
from flax_minrnn.models.lm import LMConfig

V = 13
F32 = TOL["float32"]
ROWS = [[3, 1, 4, 1, 5, 9], [2, 6, 5], [5, 8]]


def _left():
    width = max(len(r) for r in ROWS)
    tokens = jnp.asarray([[7] * (width - len(r)) + r for r in ROWS], jnp.int32)
    mask = jnp.asarray([[0] * (width - len(r)) + [1] * len(r) for r in ROWS], jnp.int32)
    return tokens, mask


def test_mask_helpers_move_rows_and_back():
    mask = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    lengths, starts = padding.mask_to_lengths(mask)
    assert lengths.tolist() == [2, 3, 2, 0] and starts.tolist() == [2, 0, 1, 0]
    x = jnp.arange(16).reshape(4, 4)
    moved = padding.align_left(x, starts)
    assert moved.tolist() == [[2, 3, 0, 1], [4, 5, 6, 7], [9, 10, 11, 8], [12, 13, 14, 15]]
    np.testing.assert_array_equal(padding.restore(moved, starts), x)
    with pytest.raises(ValueError, match="contiguous"):
        padding.mask_to_lengths(jnp.asarray([[1, 0, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, time\)"):
        padding.mask_to_lengths(jnp.ones((3,)))


def test_griffin_left_padding_equals_unpadded_rows():
    model = Griffin(GriffinConfig(vocab_size=V, num_hidden_layers=3, hidden_size=16,
                                  intermediate_size=32, num_attention_heads=2,
                                  attention_window_size=2, conv1d_width=3))
    tokens, mask = _left()
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    apply = jax.jit(model.apply)
    carry, logits = apply(variables, tokens, attention_mask=mask)
    width = tokens.shape[1]
    for b, row in enumerate(ROWS):
        alone_carry, alone = apply(variables, jnp.asarray([row], jnp.int32))
        np.testing.assert_allclose(logits[b, width - len(row):], alone[0], **F32)
        for x, y in zip(jax.tree.leaves(carry), jax.tree.leaves(alone_carry)):
            np.testing.assert_allclose(np.asarray(x[b], np.float32),
                                       np.asarray(y[0], np.float32), **F32)
    # The carry continues: one more token after the padded call equals the
    # unpadded rows continued.
    nxt = jnp.asarray([[1], [2], [3]], jnp.int32)
    _, more = apply(variables, nxt, carry)
    for b, row in enumerate(ROWS):
        _, alone = apply(variables, jnp.asarray([row + [int(nxt[b, 0])]], jnp.int32))
        np.testing.assert_allclose(more[b, 0], alone[0, -1], **F32)
    with pytest.raises(ValueError, match="attention_mask or seq_lengths"):
        model.apply(variables, tokens, attention_mask=mask,
                    seq_lengths=jnp.asarray([6, 3, 2], jnp.int32))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifiers_left_padding_equals_unpadded_rows(bidirectional):
    cfg = LMConfig(vocab_size=V, n_layer=1, d_model=8, conv_width=2,
                   positional_encoding="learned", max_seq_length=16)
    tokens, mask = _left()
    width = tokens.shape[1]
    seq = SequenceClassifier(cfg, num_classes=3, pooling="last", bidirectional=bidirectional)
    tok = TokenClassifier(cfg, num_classes=4, bidirectional=bidirectional)
    seq_vars = jax.jit(seq.init)(jax.random.key(0), tokens)
    tok_vars = jax.jit(tok.init)(jax.random.key(1), tokens)
    seq_apply, tok_apply = jax.jit(seq.apply), jax.jit(tok.apply)
    seq_out = seq_apply(seq_vars, tokens, attention_mask=mask)
    tok_out = tok_apply(tok_vars, tokens, attention_mask=mask)
    assert tok_out.shape == (3, width, 4)
    for b, row in enumerate(ROWS):
        one = jnp.asarray([row], jnp.int32)
        np.testing.assert_allclose(seq_out[b], seq_apply(seq_vars, one)[0], **F32)
        np.testing.assert_allclose(tok_out[b, width - len(row):], tok_apply(tok_vars, one)[0],
                                   **F32)
