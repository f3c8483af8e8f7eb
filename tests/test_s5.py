"""The S5 word problem (flax_minrnn.training.data.synthetic.S5WordProblem)."""

import itertools

import numpy as np
import pytest

from flax_minrnn.training.data import S5WordProblem, make_task

PERMS = list(itertools.permutations(range(5)))  # lexicographic, as documented


def _compose(g, f):
    """(g o f)(i) = g(f(i)) on one-line notations."""
    return tuple(g[f[i]] for i in range(5))


def _reference(inputs):
    """The running products of one row of tokens (0 = padding)."""
    state, out = tuple(range(5)), []
    for tok in inputs:
        if tok == 0:
            break
        state = _compose(PERMS[tok - 1], state)
        out.append(PERMS.index(state) + 1)
    return out


def test_targets_are_running_products():
    task = S5WordProblem(min_len=1, max_len=12, batch_size=32, seed=3)
    assert task.vocab_size == 121 and task.seq_len == 12
    for batch in (task.train_batch(0), task.train_batch(7), *task.eval_batches(2)):
        for inp, tgt, w in zip(batch["inputs"], batch["targets"], batch["weights"]):
            want = _reference(inp)
            n = len(want)
            assert n >= 1
            np.testing.assert_array_equal(tgt[:n], want)
            np.testing.assert_array_equal(w, np.arange(len(w)) < n)
            assert not np.any(tgt[n:]) and not np.any(inp[n:])


def test_lengths_final_only_and_determinism():
    task = make_task("s5", min_len=3, max_len=8, batch_size=64, seed=1,
                     eval_min_len=20, eval_max_len=30, running=False)
    train, evals = task.train_batch(5), task.eval_batches(3)
    n_train = (train["inputs"] > 0).sum(1)
    assert n_train.min() >= 3 and n_train.max() <= 8 and train["inputs"].shape == (64, 8)
    for b in evals:
        n = (b["inputs"] > 0).sum(1)
        assert n.min() >= 20 and n.max() <= 30 and b["inputs"].shape == (64, 30)
        # Only the last position is a target, with the product of the whole row.
        assert np.all(b["weights"].sum(1) == 1)
        rows = np.arange(64)
        for r in rows:
            assert b["targets"][r, n[r] - 1] == _reference(b["inputs"][r])[-1]
    again = make_task("s5", min_len=3, max_len=8, batch_size=64, seed=1,
                      eval_min_len=20, eval_max_len=30, running=False)
    for a, c in zip((train, *evals), (again.train_batch(5), *again.eval_batches(3))):
        for k in a:
            np.testing.assert_array_equal(a[k], c[k])
    other = make_task("s5", min_len=3, max_len=8, batch_size=64, seed=2)
    assert not np.array_equal(other.train_batch(5)["inputs"], train["inputs"])


@pytest.mark.parametrize("kwargs,name", [
    (dict(min_len=0), "min_len"),
    (dict(min_len=5, max_len=4), "max_len"),
    (dict(eval_min_len=20, eval_max_len=10), "eval_max_len"),
    (dict(max_len=8, eval_max_len=16, pad_to=9), "pad_to"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        S5WordProblem(**kwargs)
