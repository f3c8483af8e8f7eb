"""Two-stage training on parity (issue #8, experiment 3).

Task: bit strings of length 1..40 in training, 40..256 in evaluation
(``data.task_kwargs.eval_min_len`` / ``eval_max_len``), with running-parity
targets (the parity so far at every bit, and the parity of the whole string
at the query token).

* Stage 1 (arg ``<time mixing>``): the model in associative mode (gates see
  only the input; parallel scan), trained from scratch.
* Stage 2 (arg ``<time mixing>,stage2``): the same model with
  ``use_true_recurrence=True`` (gates and candidate also see ``h_{t-1}``;
  sequential scan), initialised from the stage-1 run (``init_from.workdir``;
  the new recurrent kernels start at zero, so it starts as the stage-1
  function) and fine-tuned with a fresh optimizer.

* Control (arg ``<time mixing>,scratch``): true recurrence trained from
  scratch with the stage-1 recipe, to separate what the recurrence can learn
  from what fine-tuning an associative solution reaches.

Time mixing: ``mingru`` | ``minlstm`` | ``glrnn``.

Commands::

    python -m flax_minrnn train --config configs/parity_two_stage.py:mingru \
        --workdir runs/parity_two_stage/mingru_stage1
    python -m flax_minrnn train --config configs/parity_two_stage.py:mingru,stage2 \
        --workdir runs/parity_two_stage/mingru_stage2 \
        init_from.workdir=runs/parity_two_stage/mingru_stage1
    python -m flax_minrnn train --config configs/parity_two_stage.py:mingru,scratch \
        --workdir runs/parity_two_stage/mingru_scratch
    # accuracy on the training lengths (the trainer's eval uses 40..256):
    python -m flax_minrnn eval --workdir runs/parity_two_stage/mingru_stage2 \
        data.task_kwargs.eval_min_len=1 data.task_kwargs.eval_max_len=40
    # only the parity of the whole string (the query token):
    python -m flax_minrnn eval --workdir runs/parity_two_stage/mingru_stage2 \
        data.task_kwargs.running=False

``experiments/run_all.sh parity_two_stage`` runs all of it for the three
time mixings. Measured results: ``experiments/two_stage_parity/README.md``.
"""

from flax_minrnn.training.config import default_config


def get_config(arg=None):
    """Returns the config for ``arg`` = ``<time mixing>[,stage2|,scratch]``."""
    time_mixing, *flags = (arg or "mingru").split(",")
    if time_mixing not in ("mingru", "minlstm", "glrnn") or \
            flags not in ([], ["stage2"], ["scratch"]):
        raise ValueError(f"arg must be <mingru|minlstm|glrnn>[,stage2|,scratch]"
                         f", got {arg!r}")
    stage2 = "stage2" in flags
    config = default_config()
    config.data.name = "parity"
    config.data.batch_size = 64
    config.data.eval_batches = 8
    config.data.task_kwargs.min_len = 1
    config.data.task_kwargs.max_len = 40
    config.data.task_kwargs.eval_min_len = 40
    config.data.task_kwargs.eval_max_len = 256
    config.data.task_kwargs.running = True
    config.model.time_mixing = time_mixing
    config.model.n_layer = 2
    config.model.d_model = 64
    config.optim.weight_decay = 0.0
    config.train.log_every = 50
    config.train.max_to_keep = 1
    config.train.progress_bar = False
    config.model.use_true_recurrence = bool(flags)
    if not stage2:
        config.optim.learning_rate = 3e-3
        config.optim.warmup_steps = 100
        config.train.num_steps = 2000
        config.train.eval_every = 250
        config.train.checkpoint_every = 1000
    else:
        config.init_from.workdir = f"runs/parity_two_stage/{time_mixing}_stage1"
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 50
        config.train.num_steps = 1000
        config.train.eval_every = 250
        config.train.checkpoint_every = 500
    return config
