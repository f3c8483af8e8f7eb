"""Selective copying, small variant (issue #8, experiment 1): minutes on a CPU.

Noise length 64, 4 tokens to memorize, vocabulary 6. "Vocabulary" counts
every token id, as in the Mamba paper's setting (vocabulary 16): in our
layout (``flax_minrnn/training/data/synthetic.py``) id 0 is noise, ``1..V``
are data symbols and ``V + 1`` is the marker, so ``vocab_size = V + 2`` and
vocabulary 6 means ``num_data_tokens = V = 4``. A sequence is 64 noise
tokens with the 4 data tokens scattered among them (a region of 68), then 4
markers: ``T = 64 + 2 * 4 = 72``. Accuracy is measured on the 4 recalled
tokens only (chance 1/4).

Commands (one per time mixing)::

    python -m flax_minrnn train --config configs/selective_copying_small.py:mingru \
        --workdir runs/selective_copying_small/mingru
    python -m flax_minrnn train --config configs/selective_copying_small.py:minlstm \
        --workdir runs/selective_copying_small/minlstm
    python -m flax_minrnn train --config configs/selective_copying_small.py:glrnn \
        --workdir runs/selective_copying_small/glrnn

Measured result: see ``experiments/selective_copying/README.md`` (the
goal is at least 99% eval accuracy within 2,000 steps).
"""

from flax_minrnn.training.config import default_config


def get_config(arg=None):
    """Returns the config; ``arg`` picks the time mixing (default mingru)."""
    config = default_config()
    config.data.name = "selective_copying"
    config.data.batch_size = 64
    config.data.eval_batches = 16  # 16 x 64 sequences x 4 targets = 4096
    config.data.task_kwargs.num_tokens_to_memorize = 4
    config.data.task_kwargs.noise_length = 64
    config.data.task_kwargs.num_data_tokens = 4  # vocab_size 6
    config.model.time_mixing = arg or "mingru"
    config.model.n_layer = 2
    config.model.d_model = 64
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.0
    config.train.num_steps = 2000
    config.train.eval_every = 100
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    config.train.max_to_keep = 1
    config.train.progress_bar = False
    return config
