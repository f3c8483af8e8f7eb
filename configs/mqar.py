"""Multi-query associative recall (Zoology), CPU-sized.

8 key-value pairs (64 keys, 64 values), then 8 queries (sequence length 24).

Command::

    python -m flax_minrnn train --config configs/mqar.py --workdir /tmp/mqar
    # another time mixing: --config configs/mqar.py:glrnn

Expected result (NOT measured yet; only the shrunk 2-step smoke test
runs in tests/test_train.py): eval accuracy on the 8 queries well above chance (1/64).
"""

from flax_minrnn.training.config import default_config


def get_config(arg=None):
    """Returns the config; ``arg`` picks the time mixing (default mingru)."""
    config = default_config()
    config.data.name = "mqar"
    config.data.batch_size = 64
    config.data.eval_batches = 8
    config.data.task_kwargs.num_kv_pairs = 8
    config.data.task_kwargs.num_queries = 8
    config.data.task_kwargs.num_keys = 64
    config.data.task_kwargs.num_values = 64
    config.model.time_mixing = arg or "mingru"
    config.model.n_layer = 2
    config.model.d_model = 128
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.0
    config.train.num_steps = 2000
    config.train.eval_every = 250
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    return config
