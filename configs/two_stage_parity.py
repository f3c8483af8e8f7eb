"""Two-stage training on running parity, against the true recurrence from scratch (issue 19).

The task: bit strings of length 1..64; the target at every bit is the
parity so far. Evaluation uses strings of length 256..512, 4-8x longer
than any seen in training, so ``eval_accuracy`` measures length
generalisation. A diagonal recurrence with gates in (0, 1) (stage 1) cannot
represent parity; the true recurrence (gates see ``h_{t-1}``) can.

``arg = <time mixing>[,<strategy>]``:

* a recipe of :mod:`flax_minrnn.training.two_stage` runs both stages: stage 1
  trains the associative model for ``train.num_steps`` = 100 updates; stage 2
  switches on the true recurrence (``use_true_recurrence``), starts from
  stage 1 and fine-tunes for up to 1,000 updates, stopping once an
  evaluation reaches 0.99:

  * ``zeros``  - U = 0, fresh optimizer (starts as the stage-1 function);
  * ``lr``     - U = 0 and U's learning rate x3 (``optim.recurrent_lr_multiplier``; x10,
    the recipe's example value, diverges here);
  * ``random`` - U ~ N(0, (0.1 / sqrt(d_h))^2), bias compensating the mean state;
  * ``blend``  - random U (scale 0.5) let in over 200 updates, alpha 0 -> 1;
  * ``tbptt``  - U = 0, truncated BPTT every 16 steps;

* ``scratch`` trains the true recurrence from the start, with stage 2's
  budget and stopping rule (the baseline).

Command (both stages in ``<workdir>/stage1`` and ``<workdir>/stage2``;
rerun the same command to resume after a kill)::

    python -m flax_minrnn train --config configs/two_stage_parity.py:mingru,lr \
        --workdir runs/two_stage_parity/mingru_lr

Time mixing: ``mingru`` | ``minlstm`` | ``glrnn``; strategy default ``zeros``.
``experiments/run_all.sh two_stage`` runs the grid (recipes x layers x
seeds) and ``experiments/two_stage/README.md`` holds the result. Expected
result: stage 1 stays at chance on the long strings; the true recurrence
(from scratch or in stage 2) reaches 0.99 within a few hundred updates.
"""

from flax_minrnn.training.config import default_config
from flax_minrnn.training.two_stage import parse_recipe_arg, set_strategy

STAGE2_STEPS = 1000


def get_config(arg=None):
    """Returns the config for ``arg`` = ``<time mixing>[,<strategy>]``."""
    time_mixing, recipe = parse_recipe_arg(arg)
    config = default_config()
    config.data.name = "parity"
    config.data.batch_size = 64
    config.data.eval_batches = 4
    config.data.task_kwargs.min_len = 1
    config.data.task_kwargs.max_len = 64
    config.data.task_kwargs.eval_min_len = 256
    config.data.task_kwargs.eval_max_len = 512
    config.data.task_kwargs.running = True
    config.model.time_mixing = time_mixing
    config.model.n_layer = 2
    config.model.d_model = 128
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 0.0
    config.train.num_steps = 100
    config.train.eval_every = 25
    config.train.checkpoint_every = 250
    config.train.log_every = 25
    config.train.max_to_keep = 1
    config.train.progress_bar = False
    config.train.stop_at_eval_accuracy = 0.99
    config = set_strategy(config, recipe, STAGE2_STEPS)
    if recipe == "lr":
        config.two_stage.stage2 = [*config.two_stage.stage2, "optim.recurrent_lr_multiplier=3"]
    return config
