"""Parity with length generalisation, CPU-sized.

Train on bit strings of length 1..16 (running parity targets at every bit and
the final parity at the query token); evaluate on lengths 17..32.

Command::

    python -m flax_minrnn train --config configs/parity.py \
        --workdir /tmp/parity
    # another time mixing: --config configs/parity.py:minlstm

Expected result (NOT measured yet; only the shrunk 2-step smoke test
runs in tests/test_train.py): running-parity accuracy near 1 on the training lengths; the
eval accuracy on the longer lengths 17..32 shows length generalisation.
"""

from flax_minrnn.training.config import default_config


def get_config(arg=None):
    """Returns the config; ``arg`` picks the time mixing (default mingru)."""
    config = default_config()
    config.data.name = "parity"
    config.data.batch_size = 32
    config.data.eval_batches = 8
    config.data.task_kwargs.min_len = 1
    config.data.task_kwargs.max_len = 16
    config.data.task_kwargs.running = True
    config.model.time_mixing = arg or "mingru"
    config.model.n_layer = 2
    config.model.d_model = 64
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.0
    config.train.num_steps = 1000
    config.train.eval_every = 250
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    return config
