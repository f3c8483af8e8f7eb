"""Char-level Griffin (RecurrentGemma architecture) on the embedded Tiny Shakespeare corpus.

Three residual blocks (recurrent, recurrent, local attention), width 128, RG-LRU
width 128 with 4 gate blocks, MLP width 384, 4 query heads sharing one
key/value head, attention window 64, tied embeddings, logits soft cap 30.

Command::

    python -m flax_minrnn train --config configs/griffin_shakespeare.py \
        --workdir /tmp/griffin_shakespeare

Expected result: not measured yet.
"""

from flax_minrnn.config import default_config


def get_config(arg=None):
    """Returns the config; ``arg`` (optional) overrides ``block_types``."""
    config = default_config()
    config.seed = 0
    config.data.name = "char"
    config.data.seq_len = 128
    config.data.batch_size = 32
    config.data.eval_batches = 10
    config.model.architecture = "griffin"
    g = config.model.griffin
    g.num_hidden_layers = 3
    g.hidden_size = 128
    g.intermediate_size = 768  # MLP width 384 (HF convention: 2 x the width)
    g.num_attention_heads = 4
    g.num_key_value_heads = 1
    g.lru_width = 0            # = hidden_size
    g.attention_window_size = 64
    g.conv1d_width = 4
    g.logits_soft_cap = 30.0
    g.block_types = arg or "recurrent,recurrent,attention"
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
