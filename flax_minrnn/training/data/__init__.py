"""Data for flax_minrnn: character corpora and synthetic tasks (pure NumPy).

Every task serves ``{"inputs", "targets", "weights"}`` batches of shape
``(batch_size, seq_len)`` through ``train_batch(step)`` (a function of the
seed and ``step`` only) and ``eval_batches(num_batches=None)`` (the same fixed
batches on every call).
"""

from flax_minrnn.training.data.synthetic import (TASKS, AssociativeRecall, Parity,
                                        S5WordProblem, SelectiveCopying, make_task)
from flax_minrnn.training.data.text import (SHAKESPEARE_SHA256, CharDataset, CharVocab,
                                   load_text, sha256_of_text)

__all__ = [
    "AssociativeRecall",
    "CharDataset",
    "CharVocab",
    "Parity",
    "S5WordProblem",
    "SHAKESPEARE_SHA256",
    "SelectiveCopying",
    "TASKS",
    "load_text",
    "make_task",
    "sha256_of_text",
]
