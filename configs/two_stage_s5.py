"""Two-stage training on the S5 word problem, against the true recurrence from scratch (issue 19).

State tracking in the symmetric group S5 (``data.name='s5'``): the target
at every position is the product of the permutations so far. A diagonal
linear recurrence cannot represent it at any length, the true recurrence
can. Training uses products of 1..16 permutations, evaluation 64..128
(4-8x longer).

``arg = <time mixing>[,<strategy>]``: a recipe of
:mod:`flax_minrnn.training.two_stage` (``zeros`` | ``lr`` | ``random`` |
``blend`` | ``tbptt``; ``configs/two_stage_parity.py`` says what each sets,
except ``lr``, which here sets ``optim.recurrent_lr_multiplier=10``: U's
learning rate x10, the recipe's example value, where the parity config
uses x3) runs stage 1 (associative, 500 updates) and then stage 2 (true
recurrence, up to 1,500 updates); ``scratch`` trains the true recurrence
from the start for up to 1,500 updates. Every stage stops once an
evaluation reaches 0.99.

Command (rerun it to resume after a kill)::

    python -m flax_minrnn train --config configs/two_stage_s5.py:mingru,scratch \
        --workdir runs/two_stage_s5/mingru_scratch

Expected result (``experiments/two_stage/README.md``): at this width and
budget not even the true recurrence from scratch learns the longer
products, so S5 cannot yet separate the strategies.
"""

from flax_minrnn.training.config import default_config
from flax_minrnn.training.two_stage import parse_recipe_arg, set_strategy

STAGE2_STEPS = 1500


def get_config(arg=None):
    """Returns the config for ``arg`` = ``<time mixing>[,<recipe>]``."""
    time_mixing, recipe = parse_recipe_arg(arg)
    config = default_config()
    config.data.name = "s5"
    config.data.batch_size = 64
    config.data.eval_batches = 8
    config.data.task_kwargs.min_len = 1
    config.data.task_kwargs.max_len = 16
    config.data.task_kwargs.eval_min_len = 64
    config.data.task_kwargs.eval_max_len = 128
    config.model.time_mixing = time_mixing
    config.model.n_layer = 2
    config.model.d_model = 128
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 200
    config.optim.weight_decay = 0.0
    config.train.num_steps = 500
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.train.log_every = 50
    config.train.max_to_keep = 1
    config.train.progress_bar = False
    config.train.stop_at_eval_accuracy = 0.99
    return set_strategy(config, recipe, STAGE2_STEPS)
