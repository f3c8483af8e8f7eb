"""Seeded synthetic sequence tasks for causal (left-to-right) models.

Pure NumPy. Every task serves batches in the format of
:class:`~flax_minrnn.training.data.text.CharDataset`::

    {"inputs": int32 (B, T), "targets": int32 (B, T), "weights": float32 (B, T)}

Targets are aligned with inputs: ``targets[:, t]`` is what the model should
output after reading ``inputs[:, :t + 1]``; loss and accuracy count only where
``weights > 0``. Token 0 is the blank/padding token of every task, and
unweighted targets are 0. ``train_batch(step)`` draws from
``np.random.default_rng([seed, 0, step])``, so the batch at step ``n`` depends
only on ``(seed, n)``; ``eval_batches(num_batches)`` returns batches ``0 ..
num_batches - 1`` of the disjoint stream ``default_rng([seed, 1, i])``, the
same on every call. Each task has ``vocab_size`` and ``seq_len`` (the length of
its training sequences) attributes.

Pinned definitions (``B`` = batch size):

* **Selective copying** (Mamba, Gu & Dao 2023, Sec. 3.1; minGRU/minLSTM,
  Feng et al. 2024). ``K = num_tokens_to_memorize``, ``V = num_data_tokens``,
  ``N = noise_length``. Tokens: 0 = noise, ``1..V`` = data, ``V + 1`` =
  marker; ``vocab_size = V + 2``. A sequence has length ``T = N + 2K``: a
  region of length ``N + K`` holding ``K`` data tokens (i.i.d. uniform on
  ``1..V``) at ``K`` distinct uniformly random positions (all else noise),
  then ``K`` markers. At the ``k``-th marker (position ``N + K + k``, k from
  0) the target is the ``k``-th data token in order of appearance, weight 1;
  all other weights are 0.
* **Parity** (length generalisation). Tokens: 0 = padding, 1 = bit 0,
  2 = bit 1, 3 = query; ``vocab_size = 4``. A sequence is ``n`` bits (``n``
  uniform on ``[min_len, max_len]``, bits i.i.d. fair), then the query token,
  then padding up to ``T = max_len + 1`` (or ``pad_to``). The target at the
  query position is ``1 + (number of 1-bits mod 2)``, i.e. 1 = even,
  2 = odd, weight 1 there only. With ``running=True`` every bit position
  ``t`` is also a target, ``1 + (parity of bits 0..t)``, weight 1. Evaluation
  uses lengths in ``[eval_min_len, eval_max_len]`` (default
  ``[max_len + 1, 2 * max_len]``) padded to ``eval_max_len + 1`` (or
  ``pad_to``).
* **S5 word problem** (state tracking; Merrill, Petty & Sabharwal 2024,
  "The Illusion of State in State-Space Models"). The 120 permutations of
  ``{0, .., 4}`` are numbered in lexicographic order of their one-line
  notation (0 = the identity); token ``1 + k`` is permutation ``k`` and 0 is
  padding; ``vocab_size = 121``. A sequence is ``n`` i.i.d. uniform
  permutations ``g_1 .. g_n`` (``n`` uniform on ``[min_len, max_len]``),
  padded with 0 up to ``T = max_len`` (or ``pad_to``). The target at
  position ``t`` is the token of the product ``g_t o ... o g_1`` (apply
  ``g_1`` first, i.e. ``(g o f)(i) = g(f(i))``), weight 1, at every position
  (``running=True``, the default) or only at the last one
  (``running=False``). Evaluation uses lengths in ``[eval_min_len,
  eval_max_len]`` (default ``[max_len + 1, 2 * max_len]``) padded to
  ``eval_max_len`` (or ``pad_to``).
* **Multi-query associative recall** (MQAR; Zoology, Arora et al. 2023).
  ``P = num_kv_pairs``, ``Q = num_queries``. Tokens: 0 = unused, keys
  ``1..num_keys``, values ``num_keys + 1 .. num_keys + num_values``;
  ``vocab_size = 1 + num_keys + num_values``. Layout
  ``k_1 v_1 k_2 v_2 ... k_P v_P q_1 ... q_Q`` with ``T = 2P + Q``: ``P``
  distinct keys (uniform without replacement), values i.i.d. uniform (may
  repeat), queries drawn from the stored keys (without replacement, in random
  order, when ``Q <= P``; with replacement otherwise). The target at query
  position ``2P + j`` is the value stored with key ``q_j``, weight 1; all
  other weights are 0.
"""

import inspect

import numpy as np

from flax_minrnn.ops.checks import check_bool
from flax_minrnn.training.data.text import (CharDataset, check_int, check_seed, check_step,
                                            load_text)

DEFAULT_EVAL_BATCHES = 10
_TRAIN, _EVAL = 0, 1  # Seed streams.


def _distinct(rng: np.random.Generator, batch: int, n: int, k: int
              ) -> np.ndarray:
    """Returns (batch, k) distinct uniform draws from ``range(n)`` per row."""
    return np.argsort(rng.random((batch, n)), axis=1)[:, :k]


class _SyntheticTask:
    """Base class: seeding, the train/eval streams and argument checks."""

    vocab_size: int
    seq_len: int

    def __init__(self, batch_size: int, seed: int):
        self.batch_size = check_int("batch_size", batch_size)
        self.seed = check_seed(seed)

    def _sample(self, rng: np.random.Generator, train: bool
                ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """Returns the batch of ``step``: a function of (seed, step) only."""
        rng = np.random.default_rng([self.seed, _TRAIN, check_step(step)])
        return self._sample(rng, train=True)

    def eval_batches(self, num_batches: int | None = None
                     ) -> list[dict[str, np.ndarray]]:
        """Returns ``num_batches`` (default 10) fixed evaluation batches."""
        n = DEFAULT_EVAL_BATCHES if num_batches is None else check_int(
            "num_batches", num_batches)
        return [self._sample(np.random.default_rng([self.seed, _EVAL, i]),
                             train=False) for i in range(n)]


def _batch(inputs, targets, weights) -> dict[str, np.ndarray]:
    return {"inputs": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "weights": weights.astype(np.float32)}


class SelectiveCopying(_SyntheticTask):
    """Selective copying: recall K scattered data tokens, in order, after noise.

    See the module docstring for the pinned definition.
    """

    def __init__(self, num_tokens_to_memorize: int = 16,
                 noise_length: int = 4064, num_data_tokens: int = 16,
                 batch_size: int = 32, seed: int = 0):
        """Configures the task.

        Args:
          num_tokens_to_memorize: ``K`` (>= 1).
          noise_length: ``N`` (>= 0), noise tokens among the data tokens.
            The defaults give ``T = 4096`` with 16 tokens to memorise, the
            Mamba paper's scale.
          num_data_tokens: ``V`` (>= 1), distinct data symbols.
          batch_size: Rows per batch.
          seed: Non-negative seed.
        """
        super().__init__(batch_size, seed)
        self.num_tokens = check_int("num_tokens_to_memorize",
                                    num_tokens_to_memorize)
        self.noise_length = check_int("noise_length", noise_length, minimum=0)
        self.num_data_tokens = check_int("num_data_tokens", num_data_tokens)
        self.marker = self.num_data_tokens + 1
        self.vocab_size = self.num_data_tokens + 2
        self.seq_len = self.noise_length + 2 * self.num_tokens

    def _sample(self, rng, train):
        B, K = self.batch_size, self.num_tokens
        region = self.noise_length + K
        positions = np.sort(_distinct(rng, B, region, K), axis=1)
        data = rng.integers(1, self.num_data_tokens + 1, size=(B, K))
        inputs = np.zeros((B, self.seq_len), np.int64)
        np.put_along_axis(inputs, positions, data, axis=1)
        inputs[:, region:] = self.marker
        targets = np.zeros_like(inputs)
        targets[:, region:] = data
        weights = np.zeros(inputs.shape, np.float32)
        weights[:, region:] = 1.0
        return _batch(inputs, targets, weights)


class _LengthGeneralisationTask(_SyntheticTask):
    """A task trained on lengths ``min_len..max_len`` and evaluated on longer ones."""

    def _set_lengths(self, min_len, max_len, eval_min_len, eval_max_len, pad_to,
                     extra: int) -> None:
        """Checks and sets the lengths; ``pad_to`` must hold the longest
        sequence plus ``extra`` positions."""
        self.min_len = check_int("min_len", min_len)
        self.max_len = check_int("max_len", max_len, minimum=self.min_len)
        self.eval_min_len = check_int(
            "eval_min_len", self.max_len + 1 if eval_min_len is None else eval_min_len)
        self.eval_max_len = check_int(
            "eval_max_len", max(2 * self.max_len, self.eval_min_len)
            if eval_max_len is None else eval_max_len,
            minimum=self.eval_min_len)
        if pad_to is not None:
            pad_to = check_int("pad_to", pad_to,
                               minimum=max(self.max_len, self.eval_max_len) + extra)
        self.pad_to = pad_to


class Parity(_LengthGeneralisationTask):
    """Parity of a bit string; train short, evaluate long.

    See the module docstring for the pinned definition.
    """

    PAD, ZERO, ONE, QUERY = 0, 1, 2, 3

    def __init__(self, min_len: int = 1, max_len: int = 16,
                 batch_size: int = 32, seed: int = 0,
                 eval_min_len: int | None = None,
                 eval_max_len: int | None = None,
                 pad_to: int | None = None, running: bool = False):
        """Configures the task.

        Args:
          min_len: Shortest training bit string (>= 1).
          max_len: Longest training bit string (>= min_len).
          batch_size: Rows per batch.
          seed: Non-negative seed.
          eval_min_len: Shortest evaluation bit string; default
            ``max_len + 1``.
          eval_max_len: Longest evaluation bit string; default
            ``max(2 * max_len, eval_min_len)``.
          pad_to: Length of every sequence (train and eval), at least
            ``max(max_len, eval_max_len) + 1``; default ``max_len + 1`` for
            training and ``eval_max_len + 1`` for evaluation batches.
          running: Also predict the parity so far at every bit position.
        """
        super().__init__(batch_size, seed)
        self._set_lengths(min_len, max_len, eval_min_len, eval_max_len, pad_to, extra=1)
        check_bool("running", running)
        self.running = running
        self.vocab_size = 4
        self.seq_len = pad_to or self.max_len + 1
        self.eval_seq_len = pad_to or self.eval_max_len + 1

    def _sample(self, rng, train):
        lo, hi, T = ((self.min_len, self.max_len, self.seq_len) if train else
                     (self.eval_min_len, self.eval_max_len, self.eval_seq_len))
        B = self.batch_size
        lengths = rng.integers(lo, hi + 1, size=B)
        valid = np.arange(T)[None, :] < lengths[:, None]
        bits = rng.integers(0, 2, size=(B, T)) * valid
        inputs = np.where(valid, bits + self.ZERO, self.PAD)
        rows = np.arange(B)
        inputs[rows, lengths] = self.QUERY
        targets = np.zeros_like(inputs)
        weights = np.zeros(inputs.shape, np.float32)
        if self.running:
            running = np.cumsum(bits, axis=1) % 2
            targets = np.where(valid, running + self.ZERO, self.PAD)
            weights[valid] = 1.0
        targets[rows, lengths] = bits.sum(axis=1) % 2 + self.ZERO
        weights[rows, lengths] = 1.0
        return _batch(inputs, targets, weights)


def _permutations(n: int) -> np.ndarray:
    """The permutations of ``range(n)`` in lexicographic order, ``(n!, n)``."""
    import itertools  # pylint: disable=import-outside-toplevel
    return np.asarray(list(itertools.permutations(range(n))), np.int64)


class S5WordProblem(_LengthGeneralisationTask):
    """The word problem of the symmetric group S5: track a product of permutations.

    See the module docstring for the pinned definition. ``table[g, f]`` is
    the index of ``g o f`` and ``perms[k]`` the one-line notation of
    permutation ``k``.
    """

    PAD = 0
    N = 5

    def __init__(self, min_len: int = 1, max_len: int = 16,
                 batch_size: int = 32, seed: int = 0,
                 eval_min_len: int | None = None,
                 eval_max_len: int | None = None,
                 pad_to: int | None = None, running: bool = True):
        """Configures the task.

        Args:
          min_len: Shortest training sequence (>= 1).
          max_len: Longest training sequence (>= min_len).
          batch_size: Rows per batch.
          seed: Non-negative seed.
          eval_min_len: Shortest evaluation sequence; default ``max_len + 1``.
          eval_max_len: Longest evaluation sequence; default
            ``max(2 * max_len, eval_min_len)``.
          pad_to: Length of every sequence (train and eval), at least
            ``max(max_len, eval_max_len)``; default ``max_len`` for training
            and ``eval_max_len`` for evaluation batches.
          running: Predict the product at every position (else only at the
            last one).
        """
        super().__init__(batch_size, seed)
        self._set_lengths(min_len, max_len, eval_min_len, eval_max_len, pad_to, extra=0)
        check_bool("running", running)
        self.running = running
        self.perms = _permutations(self.N)
        index = {tuple(p): k for k, p in enumerate(self.perms)}
        # (g o f)(i) = g[f[i]]
        self.table = np.asarray([[index[tuple(g[f])] for f in self.perms]
                                 for g in self.perms], np.int64)
        self.vocab_size = 1 + len(self.perms)
        self.seq_len = pad_to or self.max_len
        self.eval_seq_len = pad_to or self.eval_max_len

    def _sample(self, rng, train):
        lo, hi, T = ((self.min_len, self.max_len, self.seq_len) if train else
                     (self.eval_min_len, self.eval_max_len, self.eval_seq_len))
        B = self.batch_size
        lengths = rng.integers(lo, hi + 1, size=B)
        valid = np.arange(T)[None, :] < lengths[:, None]
        g = rng.integers(0, len(self.perms), size=(B, T))
        prod = np.zeros((B, T), np.int64)
        state = np.zeros(B, np.int64)  # the identity
        for t in range(T):
            state = self.table[g[:, t], state]
            prod[:, t] = state
        inputs = np.where(valid, g + 1, self.PAD)
        targets = np.where(valid, prod + 1, self.PAD)
        weights = valid.astype(np.float32)
        if not self.running:
            rows = np.arange(B)
            weights = np.zeros((B, T), np.float32)
            weights[rows, lengths - 1] = 1.0
            last = targets[rows, lengths - 1]
            targets = np.zeros_like(targets)
            targets[rows, lengths - 1] = last
        return _batch(inputs, targets, weights)


class AssociativeRecall(_SyntheticTask):
    """Multi-query associative recall (MQAR).

    See the module docstring for the pinned definition.
    """

    def __init__(self, num_kv_pairs: int = 8, num_queries: int = 8,
                 num_keys: int = 64, num_values: int = 64,
                 batch_size: int = 32, seed: int = 0):
        """Configures the task.

        Args:
          num_kv_pairs: ``P`` (>= 1), key-value pairs per sequence.
          num_queries: ``Q`` (>= 1), queries per sequence.
          num_keys: Size of the key vocabulary (>= num_kv_pairs).
          num_values: Size of the (disjoint) value vocabulary (>= 1).
          batch_size: Rows per batch.
          seed: Non-negative seed.
        """
        super().__init__(batch_size, seed)
        self.num_kv_pairs = check_int("num_kv_pairs", num_kv_pairs)
        self.num_queries = check_int("num_queries", num_queries)
        self.num_keys = check_int("num_keys", num_keys,
                                  minimum=self.num_kv_pairs)
        self.num_values = check_int("num_values", num_values)
        self.vocab_size = 1 + self.num_keys + self.num_values
        self.seq_len = 2 * self.num_kv_pairs + self.num_queries

    def _sample(self, rng, train):
        B, P, Q = self.batch_size, self.num_kv_pairs, self.num_queries
        keys = _distinct(rng, B, self.num_keys, P) + 1
        values = self.num_keys + 1 + rng.integers(0, self.num_values, (B, P))
        if Q <= P:
            which = _distinct(rng, B, P, Q)
        else:
            which = rng.integers(0, P, size=(B, Q))
        inputs = np.zeros((B, self.seq_len), np.int64)
        inputs[:, 0:2 * P:2] = keys
        inputs[:, 1:2 * P:2] = values
        inputs[:, 2 * P:] = np.take_along_axis(keys, which, axis=1)
        targets = np.zeros_like(inputs)
        targets[:, 2 * P:] = np.take_along_axis(values, which, axis=1)
        weights = np.zeros(inputs.shape, np.float32)
        weights[:, 2 * P:] = 1.0
        return _batch(inputs, targets, weights)


TASKS = {
    "char": CharDataset,
    "selective_copying": SelectiveCopying,
    "parity": Parity,
    "mqar": AssociativeRecall,
    "s5": S5WordProblem,
}


def make_task(name: str, **kwargs):
    """Builds a task by name.

    Args:
      name: One of ``TASKS``: 'char', 'selective_copying', 'parity', 'mqar', 's5'.
      **kwargs: The task class's constructor arguments. For 'char', pass
        either ``text`` or ``path`` (a file; ``None``/``""`` = the embedded
        Tiny Shakespeare, the default).

    Raises:
      ValueError: Unknown ``name``.
      TypeError: An argument the task does not take (all are named).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task name {name!r}; allowed: "
                         f"{', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    allowed = set(inspect.signature(cls).parameters)
    if name == "char":
        allowed.add("path")
    unexpected = sorted(set(kwargs) - allowed)
    if unexpected:
        raise TypeError(f"task {name!r} got unexpected argument(s) "
                        f"{', '.join(unexpected)}; it takes: "
                        f"{', '.join(sorted(allowed))}")
    if name == "char" and "path" in kwargs:
        if "text" in kwargs:
            raise TypeError("task 'char' takes text or path, not both")
        kwargs["text"] = load_text(kwargs.pop("path"))
    elif name == "char" and "text" not in kwargs:
        kwargs["text"] = load_text()
    return cls(**kwargs)
