"""Stage 2 of two-stage training: fine-tune with true recurrence.

Loads the stage-1 run (``configs/shakespeare.py``), migrates its params onto a
model with ``use_true_recurrence=True`` (the new recurrent kernels start at
zero, so the model starts as the stage-1 function) and fine-tunes everything
with a lower learning rate and a fresh optimizer. True recurrence runs
step by step, so this is much slower per step than stage 1.

Commands::

    python -m flax_minrnn train --config configs/shakespeare.py \
        --workdir /tmp/shakespeare_run
    python -m flax_minrnn train --config configs/shakespeare_stage2.py \
        --workdir /tmp/shakespeare_stage2 \
        init_from.workdir=/tmp/shakespeare_run

(``configs/shakespeare_stage2.py:/tmp/shakespeare_run`` also sets the
stage-1 workdir.) Stage 2 rebuilds the model from ``configs/shakespeare.py``,
not from the stage-1 run, so any ``model.*`` overrides given to stage 1 must
be repeated for stage 2 (and ``data.*`` ones, to train on the same data).
Expected result: the first eval (step 0) equals stage 1's last eval loss,
then the loss goes down slightly.
"""

from flax_minrnn.training.config import default_config

import importlib.util
import os


def _stage1():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "shakespeare.py")
    spec = importlib.util.spec_from_file_location("_shakespeare_stage1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg=None):
    """Returns the config; ``arg`` (optional) is the stage-1 workdir."""
    config = default_config()
    stage1 = _stage1()
    config.seed = stage1.seed
    config.data = stage1.data
    config.model = stage1.model
    config.model.use_true_recurrence = True
    config.model.scan_impl = "auto"
    config.init_from.workdir = arg or "/tmp/shakespeare_run"
    config.init_from.load_regex = ".*"
    config.init_from.freeze_regex = ""
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 10
    config.optim.weight_decay = 0.1
    config.train.num_steps = 100
    config.train.eval_every = 50
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.train.max_to_keep = 2
    config.train.sample_length = 300
    config.train.sample_prompt = stage1.train.sample_prompt
    return config
