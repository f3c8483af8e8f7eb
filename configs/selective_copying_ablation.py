"""Selective copying, layer ablation of the minGRU paper (issue #8, experiment 1).

Feng et al. 2024 (arXiv 2410.01201, Table 1) train 1, 2 and 3 layers on
the Mamba paper's selective copying (sequence length 4096, 16 tokens to
memorize, vocabulary 16) and report accuracy minGRU 37.0 / 96.8 / 99.5% and
minLSTM 37.6 / 85.7 / 96.0%. "Vocabulary" counts every token id: in our
layout (``flax_minrnn/training/data/synthetic.py``) 0 = noise, ``1..V`` =
data, ``V + 1`` = marker, so vocabulary 16 is ``num_data_tokens = 14``, and
``T = noise_length + 2 * 16``.

Argument: ``<time mixing>,<layers>[,gpu]``, e.g. ``mingru,2`` or
``minlstm,3,gpu``; time mixing ``mingru`` | ``minlstm`` | ``glrnn``,
layers >= 1.

* default (CPU): noise length 224, so ``T = 256``, 16x shorter than the
  paper's; 2,500 steps of batch 32 (20M tokens per run). Measured on the
  shared 2-core AMD EPYC: 1m49s-5m28s of training per run (64k-205k
  tokens/s); with ``train.num_steps=10000`` (82M tokens per run,
  ``experiments/run_all.sh selective_copying_ablation_10k``) 4m22s-27m06s
  (71k-331k tokens/s). Tables: ``experiments/selective_copying/README.md``,
  section 2.
* ``gpu`` (full length): noise length 4064, ``T = 4096``, as in the paper;
  5,000 steps of batch 64 (1.3B tokens per run; set ``train.num_steps``
  from the throughput measured on the GPU: the paper's step budget may be
  larger).

The model is this library's LM (pre-norm residual blocks: time mixing +
MLP), d_model 64, state width 64.

Commands::

    python -m flax_minrnn train --config configs/selective_copying_ablation.py:mingru,1 \
        --workdir runs/selective_copying_ablation_cpu/mingru_1
    python -m flax_minrnn train --config configs/selective_copying_ablation.py:minlstm,3,gpu \
        --workdir runs/selective_copying_ablation_gpu/minlstm_3

``experiments/run_all.sh selective_copying_ablation`` (CPU) and
``selective_copying_ablation_gpu`` run all six. Measured results:
``experiments/selective_copying/README.md``.
"""

from flax_minrnn.training.config import default_config

SIZES = {  # variant -> (noise_length, batch_size, num_steps, eval_batches)
    "cpu": (224, 32, 2500, 8),
    "gpu": (4064, 64, 5000, 16),
}


def get_config(arg=None):
    """Returns the config for ``arg`` = ``<time mixing>,<layers>[,gpu]``."""
    parts = (arg or "mingru,2").split(",")
    variant = "gpu" if parts[2:] == ["gpu"] else "cpu"
    if (len(parts) not in (2, 3) or parts[2:] not in ([], ["gpu"])
            or parts[0] not in ("mingru", "minlstm", "glrnn")
            or not parts[1].isdigit() or int(parts[1]) < 1):
        raise ValueError("arg must be <mingru|minlstm|glrnn>,<layers>[,gpu], "
                         f"got {arg!r}")
    noise_length, batch_size, num_steps, eval_batches = SIZES[variant]
    config = default_config()
    config.data.name = "selective_copying"
    config.data.batch_size = batch_size
    config.data.eval_batches = eval_batches  # x batch x 16 targets
    config.data.task_kwargs.num_tokens_to_memorize = 16
    config.data.task_kwargs.noise_length = noise_length
    config.data.task_kwargs.num_data_tokens = 14  # vocab_size 16
    config.model.time_mixing = parts[0]
    config.model.n_layer = int(parts[1])
    config.model.d_model = 64
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.0
    config.train.num_steps = num_steps
    config.train.eval_every = 250
    config.train.log_every = 50
    config.train.checkpoint_every = 1000
    config.train.max_to_keep = 1
    config.train.progress_bar = False
    return config
