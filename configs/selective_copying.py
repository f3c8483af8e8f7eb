"""Selective copying (Mamba / minGRU paper task), CPU-sized.

8 data tokens hidden among 56 noise tokens must be reproduced, in order,
after 8 marker tokens (sequence length 72).

Command::

    python -m flax_minrnn train --config configs/selective_copying.py \
        --workdir /tmp/selective_copying
    # another time mixing: --config configs/selective_copying.py:minlstm

Expected result (NOT measured yet; only the shrunk 2-step smoke test
runs in tests/test_train.py): the eval accuracy (on the 8 copied tokens) should climb well above chance
(1/8).
"""

from flax_minrnn.training.config import default_config


def get_config(arg=None):
    """Returns the config; ``arg`` picks the time mixing (default mingru)."""
    config = default_config()
    config.data.name = "selective_copying"
    config.data.batch_size = 32
    config.data.eval_batches = 8
    config.data.task_kwargs.num_tokens_to_memorize = 8
    config.data.task_kwargs.noise_length = 56
    config.data.task_kwargs.num_data_tokens = 8
    config.model.time_mixing = arg or "mingru"
    config.model.n_layer = 3
    config.model.d_model = 64
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.0
    config.train.num_steps = 1500
    config.train.eval_every = 250
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    return config
