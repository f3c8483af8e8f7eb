"""Both stages of two-stage training on parity in one command (issue 19).

Stage 1 trains the associative model (gates see only ``x_t``) on running
parity, bit strings of length 1..40, until ``train.num_steps`` or an eval
accuracy of 0.99 (``train.stop_at_eval_accuracy``); stage 2 switches on the
true recurrence (``use_true_recurrence``), initialises from stage 1 and
fine-tunes with one recipe of :mod:`flax_minrnn.training.two_stage`
(``two_stage.stage2`` holds its overrides):

* ``zeros``  - U = 0, fresh optimizer (starts as the stage-1 function);
* ``lr``     - U = 0 and U's learning rate x10 (``optim.recurrent_lr_multiplier``);
* ``random`` - U ~ N(0, (0.1 / sqrt(d_h))^2), bias compensating the mean state;
* ``blend``  - random U (scale 0.5) let in over 200 steps, alpha 0 -> 1;
* ``tbptt``  - U = 0, truncated BPTT every 16 steps.

Command (stage 1 in ``<workdir>/stage1``, stage 2 in ``<workdir>/stage2``;
rerun the same command to resume after a kill)::

    python -m flax_minrnn train --config configs/two_stage_parity.py:mingru,lr \
        --workdir runs/two_stage_parity/mingru_lr

Time mixing: ``mingru`` | ``minlstm`` | ``glrnn``; recipe default ``zeros``.
Expected result: stage 2's first eval equals stage 1's last (all recipes
but ``random``, which prints how far it starts), and the eval accuracy on
the longer evaluation strings (41..80) improves in stage 2.
"""

from flax_minrnn.training.config import default_config
from flax_minrnn.training.two_stage import RECIPE_OVERRIDES, parse_recipe_arg


def get_config(arg=None):
    """Returns the config for ``arg`` = ``<time mixing>[,<recipe>]``."""
    time_mixing, recipe = parse_recipe_arg(arg)
    config = default_config()
    config.data.name = "parity"
    config.data.batch_size = 64
    config.data.eval_batches = 8
    config.data.task_kwargs.min_len = 1
    config.data.task_kwargs.max_len = 40
    config.data.task_kwargs.eval_min_len = 41
    config.data.task_kwargs.eval_max_len = 80
    config.data.task_kwargs.running = True
    config.model.time_mixing = time_mixing
    config.model.n_layer = 2
    config.model.d_model = 64
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.0
    config.train.num_steps = 2000
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.log_every = 50
    config.train.max_to_keep = 1
    config.train.progress_bar = False
    config.train.stop_at_eval_accuracy = 0.99
    config.two_stage.stage2 = ["optim.learning_rate=1e-3", "optim.warmup_steps=50",
                               "train.stop_at_eval_accuracy=0",
                               *RECIPE_OVERRIDES[recipe]]
    return config
