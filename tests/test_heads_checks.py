"""Input checks of the losses (causal_lm_loss, weighted_cross_entropy):
errors name the user's arguments and shapes, before the shift; ids are
checked when concrete and skipped (not refused) under jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn.models.heads import causal_lm_loss, weighted_cross_entropy

B, T, V = 2, 4, 5


def _logits(shape=(B, T, V), dtype=jnp.float32):
    return jax.random.normal(jax.random.key(0), shape).astype(dtype)


def _labels():
    return jnp.asarray([[1, 2, -100, 4], [0, 3, 3, -100]], jnp.int32)


# ----------------------------------------------------------------------------
# causal_lm_loss.


@pytest.mark.parametrize("shift", [True, False])
def test_causal_lm_loss_refuses_ids_outside_the_vocabulary(shift):
    # Used to return NaN silently.
    with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab_size=5\), got values "
                                         r"in \[9, 9\].*ignore_index=-100"):
        causal_lm_loss(jnp.zeros((B, T, V)), jnp.full((B, T), 9), shift=shift)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab_size=5\), got values "
                                         r"in \[-1, 4\]"):
        causal_lm_loss(_logits(), _labels().at[0, 2].set(-1), shift=shift)
    # Another ignore_index: -100 is then an id like any other.
    with pytest.raises(ValueError, match=r"labels must lie.*ignore_index=-1"):
        causal_lm_loss(_logits(), _labels(), ignore_index=-1, shift=shift)


def test_causal_lm_loss_dtype_errors_name_the_argument():
    with pytest.raises(TypeError, match="labels must be an integer array.*got dtype float32"):
        causal_lm_loss(_logits(), _labels().astype(jnp.float32))
    with pytest.raises(TypeError, match="labels must be an integer array, got list"):
        causal_lm_loss(_logits(), [[1, 2, 3, 4]] * B)
    with pytest.raises(TypeError, match="logits must be a floating-point array, got dtype int32"):
        causal_lm_loss(jnp.zeros((B, T, V), jnp.int32), _labels())
    with pytest.raises(TypeError, match="ignore_index must be an integer, got -100.0"):
        causal_lm_loss(_logits(), _labels(), ignore_index=-100.0)
    with pytest.raises(ValueError, match="shift must be a bool, got 1"):
        causal_lm_loss(_logits(), _labels(), shift=1)


def test_causal_lm_loss_shape_errors_show_the_users_shapes():
    # Used to be an IndexError ("Too many indices").
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, T, V\), got \(2, 5\)"):
        causal_lm_loss(jnp.zeros((B, V)), _labels())
    # Used to report the shifted shapes (2, 3, 5) and (2, 2) under internal names.
    with pytest.raises(ValueError, match=r"^labels must have shape \(batch, T\) = \(2, 4\) \(the "
                                         r"first two axes of logits \(2, 4, 5\)\), got \(2, 3\)$"):
        causal_lm_loss(_logits(), _labels()[:, :3])
    with pytest.raises(ValueError, match=r"labels must have shape .*got \(4,\)"):
        causal_lm_loss(_logits(), _labels()[0])
    with pytest.raises(ValueError, match=r"logits must have a non-empty vocab axis"):
        causal_lm_loss(jnp.zeros((B, T, 0)), _labels())


def test_causal_lm_loss_under_jit_skips_the_value_check():
    logits, labels = _logits(), _labels()
    want = causal_lm_loss(logits, labels)
    got = jax.jit(causal_lm_loss)(logits, labels)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6)
    assert int(got[1]) == int(want[1]) == 4
    # Traced ids cannot be checked: the documented NaN, not an error.
    loss, n = jax.jit(causal_lm_loss)(jnp.zeros((B, T, V)), jnp.full((B, T), 9))
    assert np.isnan(float(loss)) and int(n) == B * (T - 1)
    # Shape and dtype checks still run while tracing.
    with pytest.raises(TypeError, match="labels must be an integer array"):
        jax.jit(causal_lm_loss)(logits, labels.astype(jnp.float32))
    # Gradients flow as before.
    grad = jax.grad(lambda l: causal_lm_loss(l, labels)[0])(logits)
    assert grad.shape == logits.shape and np.all(np.isfinite(np.asarray(grad)))


# ----------------------------------------------------------------------------
# weighted_cross_entropy.


def test_weighted_cross_entropy_checks():
    logits, targets, weights = _logits(), jnp.zeros((B, T), jnp.int32), jnp.ones((B, T))
    with pytest.raises(ValueError, match=r"targets must have shape logits.shape\[:-1\] = "
                                         r"\(2, 4\) \(logits \(2, 4, 5\)\), got \(2, 3\)"):
        weighted_cross_entropy(logits, targets[:, :3], weights[:, :3])
    # No broadcasting of weights.
    with pytest.raises(ValueError, match=r"weights must have the targets' shape \(2, 4\), "
                                         r"got \(4,\)"):
        weighted_cross_entropy(logits, targets, weights[0])
    with pytest.raises(TypeError, match="targets must be an integer array.*float32"):
        weighted_cross_entropy(logits, targets.astype(jnp.float32), weights)
    with pytest.raises(TypeError, match="weights must be a bool, integer or floating-point "
                                        "array, got dtype complex64"):
        weighted_cross_entropy(logits, targets, weights.astype(jnp.complex64))
    with pytest.raises(TypeError, match="weights must be an array, got float"):
        weighted_cross_entropy(logits, targets, 1.0)
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
        weighted_cross_entropy(jnp.zeros((B, T, V), jnp.int32), targets, weights)
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., vocab\), got \(\)"):
        weighted_cross_entropy(jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.ones(()))
    # Every target is an id, weighted 0 or not (0 * NaN is NaN).
    with pytest.raises(ValueError, match=r"targets must lie in \[0, vocab_size=5\), got "
                                         r"values in \[0, 5\]"):
        weighted_cross_entropy(logits, targets.at[1, 3].set(5), weights.at[1, 3].set(0))
    # bool, int and float weights, any rank, and jit (values unchecked there).
    for w in (weights, weights.astype(bool), weights.astype(jnp.int32)):
        loss, total = weighted_cross_entropy(logits, targets, w)
        assert loss.dtype == total.dtype == jnp.float32 and float(total) == B * T
    loss, total = weighted_cross_entropy(logits[0, 0], jnp.asarray(3), jnp.asarray(True))
    np.testing.assert_allclose(float(loss), -float(jax.nn.log_softmax(logits[0, 0])[3]),
                               rtol=1e-6)
    loss, _ = jax.jit(weighted_cross_entropy)(logits, targets + 9, weights)
    assert np.isnan(float(loss))
