"""Char-level Griffin (RecurrentGemma architecture) on the embedded Tiny Shakespeare corpus.

Three residual blocks (recurrent, recurrent, local attention), width 128, RG-LRU
width 128 with 4 gate blocks, MLP width 384, 4 query heads sharing one
key/value head, attention window 64, tied embeddings, logits soft cap 30.

Command::

    python -m flax_minrnn train --config configs/griffin_shakespeare.py \
        --workdir /tmp/griffin_shakespeare

Argument (optional): ``block_types``, comma-separated names (``recurrent`` |
``attention``) cycled over the three blocks; default
``recurrent,recurrent,attention``. E.g. recurrent blocks only::

    python -m flax_minrnn train --config configs/griffin_shakespeare.py:recurrent \
        --workdir /tmp/griffin_shakespeare_recurrent

Expected result (measured once with this branch's code, 1000 steps of 32x128
characters, on a 2-core CPU shared with other jobs and test runs, load average
3-5, 1.4k-4.6k tokens/s): eval loss 1.4769 nats/char (accuracy 0.554) at step
1000, train loss 1.29; 30 min 44 s wall end to end. Eval loss 1.81 / 1.62 /
1.56 / 1.50 at steps 200 / 400 / 600 / 800. (Throughput under this load says
little; Griffin's speed against the MinGRU baseline was not compared under
equal load.) The final sample starts::

    ROMEO:
    Nay,
    And sinking my trade is will corn.

    QUEEN MARGARET:
    I like hence that must not repose
"""

import os

import ml_collections

from flax_minrnn.training.config import default_config, load_config


def get_config(arg=None):
    """Returns the config; ``arg`` (optional) overrides ``block_types``.

    Data, optimiser and schedule are those of ``configs/shakespeare.py`` (the
    MinGRU baseline), so the two runs compare directly; only the model differs.
    """
    baseline = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "shakespeare.py"))
    config = ml_collections.ConfigDict(baseline.to_dict())
    config.model = default_config().model
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
    return config
