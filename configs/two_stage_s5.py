"""Both stages of two-stage training on the S5 word problem (issue 19).

State tracking in the symmetric group S5 (``data.name='s5'``): the target
at every position is the product of the permutations so far. A diagonal
linear recurrence cannot represent it at any length, the true recurrence
can, so this is where stage 2 should matter. Stage 1 trains the
associative model on products of 1..16 permutations; stage 2 switches on
the true recurrence and fine-tunes with one recipe of
:mod:`flax_minrnn.training.two_stage` (``zeros`` | ``lr`` | ``random`` |
``blend`` | ``tbptt``; see ``configs/two_stage_parity.py`` for what each
sets). Evaluation uses 17..32 permutations.

Command (rerun it to resume after a kill)::

    python -m flax_minrnn train --config configs/two_stage_s5.py:mingru,random \
        --workdir runs/two_stage_s5/mingru_random

Expected result: stage 1's eval accuracy stays low on the longer products;
stage 2 is where any gain over it shows.
"""

from flax_minrnn.training.config import default_config
from flax_minrnn.training.two_stage import RECIPE_OVERRIDES, parse_recipe_arg


def get_config(arg=None):
    """Returns the config for ``arg`` = ``<time mixing>[,<recipe>]``."""
    time_mixing, recipe = parse_recipe_arg(arg)
    config = default_config()
    config.data.name = "s5"
    config.data.batch_size = 64
    config.data.eval_batches = 8
    config.data.task_kwargs.min_len = 1
    config.data.task_kwargs.max_len = 16
    config.data.task_kwargs.eval_min_len = 17
    config.data.task_kwargs.eval_max_len = 32
    config.model.time_mixing = time_mixing
    config.model.n_layer = 2
    config.model.d_model = 128
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.optim.weight_decay = 0.0
    config.train.num_steps = 5000
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.log_every = 100
    config.train.max_to_keep = 1
    config.train.progress_bar = False
    config.two_stage.stage2 = ["optim.learning_rate=3e-4", "optim.warmup_steps=50",
                               *RECIPE_OVERRIDES[recipe]]
    return config
