"""Char-level MinGRU language model on the embedded Tiny Shakespeare corpus.

The default main job: a few minutes on a 2-core CPU.

Command::

    python -m flax_minrnn train --config configs/shakespeare.py \
        --workdir /tmp/shakespeare_run

Expected result (measured with this commit's code, 3-layer MinGRU, d_model
128, seq_len 128, batch 32, 1000 steps): eval loss about 1.51 nats/char
(accuracy about 0.54) at step 1000, train loss about 1.35; 4 min 53 s wall
end to end on a 2-core CPU shared with other jobs (load average ~3;
10-20k tokens/s),
and a sample in ``samples.txt`` with Shakespeare-like speaker names, line
breaks and mostly real words, e.g.::

    ROMEO:
    My mother in his face.

    First Gentleman:
    Montague and 'tis that thou we will not
"""

from flax_minrnn.training.config import default_config


def get_config(arg=None):
    """Returns the config; ``arg`` (optional) picks the time mixing."""
    config = default_config()
    config.seed = 0
    config.data.name = "char"
    config.data.seq_len = 128
    config.data.batch_size = 32
    config.data.eval_batches = 10
    config.model.time_mixing = arg or "mingru"
    config.model.n_layer = 3
    config.model.d_model = 128
    config.model.dropout = 0.0
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.1
    config.train.num_steps = 1000
    config.train.eval_every = 200
    config.train.log_every = 50
    config.train.checkpoint_every = 250
    config.train.max_to_keep = 2
    config.train.sample_length = 500
    config.train.sample_prompt = "ROMEO:\n"
    config.train.sample_temperature = 0.8
    return config
