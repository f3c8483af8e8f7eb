"""Tiny Shakespeare char LMs of equal size (issue #8, experiment 2).

MinGRU, MinLSTM and GatedLinearRNN language models with (nearly) the same
parameter count on the standard 90/10 split of the embedded corpus (65
characters). All three keep the state width ``d_h = d_model``; their time
mixings differ in size (per block: MinGRU ``2 d (d + 1)``, MinLSTM
``3 d (d + 1)``, GatedLinearRNN with tied gates ``3 d (d + 1)`` plus a
``d (d + 1)`` output projection), so the channel-mixing MLP width
(``d_channel_mixing``, ``2 d + 1`` params per unit) absorbs the difference.

Arguments: ``mingru`` | ``minlstm`` | ``glrnn``, optionally ``,medium`` or
``,large``.

* default (CPU): the size of ``configs/shakespeare.py`` (3 blocks,
  d_model 128, seq_len 128, batch 32, 1000 steps, no dropout); MLP widths
  512 / 448 / 384 give 511,809 / 512,001 / 512,193 parameters.
* ``medium`` (CPU, the step toward 1.47 that a 2-core CPU can take in
  about half an hour): 4 blocks, d_model 256, seq_len 256, batch 32,
  dropout 0.1, lr 2e-3 with cosine decay to 2e-4, beta2 0.99, 2000 steps;
  MLP widths 1024 / 896 / 768 give 2,664,257 / 2,664,769 / 2,665,281
  parameters.
* ``large`` (GPU; "push toward nanoGPT's 1.47"): 6 blocks, d_model 384,
  seq_len 256, batch 64, dropout 0.2, lr 1e-3 with cosine decay to 1e-4,
  beta2 0.99, 5000 steps (nanoGPT's shakespeare_char recipe); MLP widths
  1920 / 1728 / 1536 give 10,690,241 / 10,691,393 / 10,692,545
  parameters (nanoGPT's Transformer: 10.7M).

Commands::

    python -m flax_minrnn train --config configs/shakespeare_equal_params.py:mingru \
        --workdir runs/shakespeare_cpu/mingru  # also :minlstm, :glrnn
    python -m flax_minrnn train --config configs/shakespeare_equal_params.py:mingru,medium \
        --workdir runs/shakespeare_medium/mingru
    python -m flax_minrnn train --config configs/shakespeare_equal_params.py:glrnn,large \
        --workdir runs/shakespeare_large/glrnn

Measured results: ``experiments/shakespeare/README.md``.
"""

from flax_minrnn.training.config import default_config

# time mixing -> channel-mixing width, per size.
MLP_WIDTH = {
    "cpu": {"mingru": 512, "minlstm": 448, "glrnn": 384},
    "medium": {"mingru": 1024, "minlstm": 896, "glrnn": 768},
    "large": {"mingru": 1920, "minlstm": 1728, "glrnn": 1536},
}
# Per size: dotted config key -> value.
SIZES = {
    "cpu": {
        "data.seq_len": 128, "data.batch_size": 32, "data.eval_batches": 10,
        "model.n_layer": 3, "model.d_model": 128,
        "optim.learning_rate": 3e-3,
        "train.num_steps": 1000, "train.eval_every": 100,
        "train.checkpoint_every": 500,
    },
    "medium": {
        "data.seq_len": 256, "data.batch_size": 32, "data.eval_batches": 20,
        "model.n_layer": 4, "model.d_model": 256, "model.dropout": 0.1,
        "optim.learning_rate": 2e-3, "optim.b2": 0.99,
        "train.num_steps": 2000, "train.eval_every": 250,
        "train.checkpoint_every": 250,
    },
    "large": {
        "data.seq_len": 256, "data.batch_size": 64, "data.eval_batches": 40,
        "model.n_layer": 6, "model.d_model": 384, "model.dropout": 0.2,
        "optim.learning_rate": 1e-3, "optim.b2": 0.99,
        "train.num_steps": 5000, "train.eval_every": 250,
        "train.checkpoint_every": 1000,
    },
}


def get_config(arg=None):
    """Returns the config for ``arg`` = ``<time mixing>[,medium|,large]``."""
    time_mixing, *flags = (arg or "mingru").split(",")
    if time_mixing not in MLP_WIDTH["cpu"] or len(flags) > 1 or set(flags) - {"medium", "large"}:
        raise ValueError(
            f"arg must be <mingru|minlstm|glrnn>[,medium|,large], got {arg!r}")
    size = flags[0] if flags else "cpu"
    config = default_config()
    config.data.name = "char"
    config.model.time_mixing = time_mixing
    config.model.d_channel_mixing = MLP_WIDTH[size][time_mixing]
    config.optim.warmup_steps = 100
    config.optim.min_lr_ratio = 0.1
    config.optim.weight_decay = 0.1
    config.train.log_every = 50
    config.train.max_to_keep = 2
    config.train.sample_length = 500
    config.train.sample_prompt = "ROMEO:\n"
    config.update_from_flattened_dict(SIZES[size])
    return config
