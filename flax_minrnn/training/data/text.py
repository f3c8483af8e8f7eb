"""Character-level text corpora: vocabulary, loading and batching.

Pure NumPy. A :class:`CharDataset` splits a text into train (first
``1 - val_fraction``) and validation (the rest) and serves batches as dicts::

    {"inputs": int32 (B, T), "targets": int32 (B, T), "weights": float32 (B, T)}

with ``targets[:, t] == inputs[:, t + 1]`` within the text (next-character
prediction). ``train_batch(step)`` draws random windows with
``np.random.default_rng([seed, step])``, so the batch at step ``n`` depends
only on ``(seed, n)`` and a resumed run sees exactly the data it would have
seen. ``eval_batches()`` tiles the validation split with fixed,
non-overlapping windows (zero weights mark padding) so that the weighted mean
loss over all of them is the per-character loss over the whole split.
"""

import hashlib
import importlib.resources
import json
import os
from typing import Iterable

import numpy as np

SHAKESPEARE_SHA256 = (
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")
_SHAKESPEARE = "tinyshakespeare/input.txt"


def load_text(path: str | os.PathLike | None = None) -> str:
    """Reads a UTF-8 text corpus.

    Args:
      path: A local text file. ``None`` or ``""`` means the embedded Tiny
        Shakespeare corpus (read with ``importlib.resources``, so it also
        works from an installed wheel).

    Returns:
      The text, exactly as stored (no newline translation).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: The file is not valid UTF-8.
    """
    if path is None or str(path) == "":
        resource = importlib.resources.files(__package__) / _SHAKESPEARE
        return resource.read_bytes().decode("utf-8")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not valid UTF-8: {e}") from None


def sha256_of_text(text: str) -> str:
    """Returns the hex sha256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class CharVocab:
    """A character vocabulary: id ``i`` is the character ``chars[i]``.

    Attributes:
      chars: The symbols in id order.
    """

    def __init__(self, chars: Iterable[str]):
        """Builds a vocabulary from an ordered sequence of distinct characters.

        Args:
          chars: Single characters, in id order. Use :meth:`from_text` to
            build the usual sorted vocabulary of a corpus.

        Raises:
          ValueError: Empty, duplicate or multi-character symbols.
        """
        chars = list(chars)
        if not chars:
            raise ValueError("chars: a vocabulary needs at least one symbol")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars: every symbol must be a single character")
        if len(set(chars)) != len(chars):
            raise ValueError("chars: symbols must be distinct")
        self.chars = "".join(chars)
        codes = _codepoints(self.chars)
        self._order = np.argsort(codes)  # Sorted position -> id.
        self._sorted_codes = codes[self._order]
        # object, not '<U1': numpy strips a trailing NUL from '<U1' items.
        self._char_array = np.array(chars, dtype=object)

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        """Returns the vocabulary of a text's sorted distinct characters."""
        return cls(sorted(set(text)))

    @property
    def size(self) -> int:
        """The number of symbols."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Maps a string to an int32 array of ids.

        Raises:
          ValueError: ``text`` contains characters outside the vocabulary;
            the message names the first few and their positions.
        """
        codes = _codepoints(text)
        pos = np.searchsorted(self._sorted_codes, codes)
        pos = np.minimum(pos, self.size - 1)
        unknown = np.flatnonzero(self._sorted_codes[pos] != codes)
        if unknown.size:
            shown = ", ".join(f"{text[i]!r} (position {i})"
                              for i in unknown[:5])
            if unknown.size > 5:
                shown += f", ... ({unknown.size} in total)"
            raise ValueError("text contains characters not in the vocabulary "
                             f"of this run: {shown}")
        return self._order[pos].astype(np.int32)

    def decode(self, ids) -> str:
        """Maps a sequence of ids (any integer array-like, 1-D) to a string.

        Raises:
          ValueError: An id is outside ``[0, size)``.
        """
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            return ""
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        bad = np.flatnonzero((ids < 0) | (ids >= self.size))
        if bad.size:
            raise ValueError(f"id {int(ids[bad[0]])} (position {bad[0]}) is "
                             f"outside the vocabulary [0, {self.size})")
        return "".join(self._char_array[ids].tolist())

    def to_json(self) -> str:
        """Serialises the vocabulary (to save alongside a trained run)."""
        return json.dumps({"type": "char", "chars": self.chars})

    @classmethod
    def from_json(cls, s: str) -> "CharVocab":
        """Inverse of :meth:`to_json`."""
        d = json.loads(s)
        if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(
                d.get("chars"), str):
            raise ValueError("not a serialised CharVocab: expected "
                             '{"type": "char", "chars": "..."}')
        return cls(d["chars"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharVocab(size={self.size})"


def check_int(name: str, value, minimum: int = 1) -> int:
    """Returns ``value`` as an int; raises unless it is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_seed(seed) -> int:
    """Validates a random seed: an int in ``[0, 2**32)``.

    Without ``jax_enable_x64``, ``jax.random.key`` keeps only the low 32
    bits of a seed, so ``seed + 2**32`` would initialise and drop out exactly
    as ``seed`` does; such seeds are refused rather than aliased.
    """
    seed = check_int("seed", seed, minimum=0)
    if seed >= 2 ** 32:
        raise ValueError(f"seed must be < 2**32 (jax.random.key keeps only a "
                         f"seed's low 32 bits), got {seed}")
    return seed


def check_step(step) -> int:
    """Validates a training step index (a non-negative int)."""
    return check_int("step", step, minimum=0)


class CharDataset:
    """Next-character prediction batches over a text, with a train/val split.

    Attributes:
      vocab: The :class:`CharVocab` (of the whole text unless given).
      vocab_size: ``vocab.size``.
      seq_len: Window length ``T``.
      batch_size: Rows per batch ``B``.
      seed: Seed of the training-window stream.
      train_data: int32 ids of the first ``int(n * (1 - val_fraction))``
        characters.
      val_data: int32 ids of the remaining characters.
    """

    def __init__(self, text: str, seq_len: int, batch_size: int,
                 seed: int = 0, val_fraction: float = 0.1,
                 vocab: CharVocab | None = None):
        """Encodes and splits the text.

        Args:
          text: The corpus.
          seq_len: Window length ``T`` (>= 1).
          batch_size: Rows per batch (>= 1).
          seed: Non-negative seed of the training windows.
          val_fraction: Fraction of the text (its end) held out for
            validation, in ``(0, 1)``. The train split is the first
            ``int(len(text) * (1 - val_fraction))`` characters.
          vocab: A vocabulary to encode with (e.g. a saved run's); default
            the sorted distinct characters of ``text``.

        Raises:
          ValueError: A bad argument (named in the message), or a split too
            short for one window.
        """
        self.seq_len = check_int("seq_len", seq_len)
        self.batch_size = check_int("batch_size", batch_size)
        self.seed = check_seed(seed)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in (0, 1), got {val_fraction}")
        self.vocab = vocab if vocab is not None else CharVocab.from_text(text)
        self.vocab_size = self.vocab.size
        data = self.vocab.encode(text)
        n_train = int(len(data) * (1.0 - val_fraction))
        self.train_data, self.val_data = data[:n_train], data[n_train:]
        if len(self.train_data) < self.seq_len + 1:
            raise ValueError(
                f"text too short: the train split has {len(self.train_data)} "
                f"characters, seq_len={self.seq_len} needs at least "
                f"{self.seq_len + 1}")
        if len(self.val_data) < 2:
            raise ValueError(
                f"text too short: val_fraction={val_fraction} leaves "
                f"{len(self.val_data)} validation characters, need at least 2")

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """Returns random training windows, a function of (seed, step) only."""
        rng = np.random.default_rng([self.seed, check_step(step)])
        high = len(self.train_data) - self.seq_len  # Last start + 1.
        starts = rng.integers(0, high, size=self.batch_size)
        chunks = self.train_data[starts[:, None] + np.arange(self.seq_len + 1)]
        return {"inputs": np.ascontiguousarray(chunks[:, :-1]),
                "targets": np.ascontiguousarray(chunks[:, 1:]),
                "weights": np.ones((self.batch_size, self.seq_len), np.float32)}

    @property
    def num_eval_windows(self) -> int:
        """The eval window count, ``ceil((len(val_data) - 1) / seq_len)``."""
        return -(-(len(self.val_data) - 1) // self.seq_len)

    def eval_batches(self, num_batches: int | None = None
                     ) -> list[dict[str, np.ndarray]]:
        """Returns the validation split as fixed, non-overlapping windows.

        Window ``i`` has inputs ``val[iT:iT+T]``, targets ``val[iT+1:iT+T+1]``;
        positions past the end of the split (in the last window, and whole
        padding rows of the last batch) have zero inputs, targets and weights.
        Every call returns the same batches.

        Args:
          num_batches: Return only the first this many batches; ``None``
            returns all ``ceil(num_eval_windows / batch_size)``.
        """
        if num_batches is not None:
            check_int("num_batches", num_batches)
        T, B = self.seq_len, self.batch_size
        n_windows = self.num_eval_windows
        n_batches = -(-n_windows // B)
        if num_batches is not None:
            n_batches = min(n_batches, num_batches)
        # All windows back to back (zero-padded); targets are shifted by one.
        n_rows = n_batches * B
        padded = np.zeros(n_rows * T + 1, np.int32)
        used = min(len(self.val_data), n_rows * T + 1)
        padded[:used] = self.val_data[:used]
        weights = np.zeros(n_rows * T, np.float32)
        weights[:used - 1] = 1.0  # Targets padded[1:used] are real.
        inputs = padded[:-1].reshape(n_batches, B, T)
        targets = padded[1:].reshape(n_batches, B, T)
        weights = weights.reshape(n_batches, B, T)
        return [{"inputs": inputs[i], "targets": targets[i],
                 "weights": weights[i]} for i in range(n_batches)]
