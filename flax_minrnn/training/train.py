"""Training, evaluation and sampling of language models (flax lm1b style).

The one entry point is :func:`train_and_evaluate`::

    from flax_minrnn.training import config as config_lib, train
    config = config_lib.load_config("configs/shakespeare.py")
    metrics = train.train_and_evaluate(config, "/tmp/run")

A workdir holds::

    config.json      the resolved config (written at start)
    checkpoints/     Checkpointer steps: params, opt_state, step, rng, data
                     position; metadata = config JSON, vocab JSON, vocab
                     size, the open train-loss window, samples.txt's size
    metrics.jsonl    one JSON object per train-log / eval line
    tb/              TensorBoard event files (tensorboardX)
    samples.txt      generated text (char tasks)
    *.superseded.*   what a resumed run set aside (see below)

Determinism: batches are a pure function of ``(seed, step)`` and the dropout
key of step ``s`` is ``fold_in(fold_in(key(seed), 1), s)``, so a run that is
interrupted and resumed from its latest checkpoint ends with bit-identical
parameters to an uninterrupted one (on the same machine).

Resuming from an older step (``step=N``, or ``fallback_to_last_good`` past a
corrupt step) first moves the newer steps to ``checkpoints/superseded/``
and their lines of ``metrics.jsonl`` to ``metrics.superseded.jsonl``:
nothing is ever deleted, and their step numbers can be saved again. Any
resume leaves the logs as an uninterrupted run writes them (timings aside):
the samples of later steps move to ``samples.superseded.txt``, TensorBoard
hides the later events of older event files (a purge marker), and a
train-loss line averages the same steps (the window is checkpointed).

The learning-rate schedule is fixed when a run starts: its length
(``schedule_steps``, saved in every checkpoint) is the ``train.num_steps`` of
that start. Resuming with another ``train.num_steps`` keeps it: a larger value
trains on at the schedule's final rate ``learning_rate * min_lr_ratio``, a
smaller one stops early; either way steps up to the original end get the
learning rates of the original run. :func:`schedule_note` says what applies.

Helpers for the CLI: :func:`evaluate`, :func:`load_run`, :func:`generate_text`,
:func:`check_workdir`.
"""

import dataclasses
import io
import json
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from flax.core import unfreeze

from flax_minrnn.models.generate import bucket_length
from flax_minrnn.models.griffin import Griffin, GriffinConfig
from flax_minrnn.models.heads import weighted_cross_entropy
from flax_minrnn.models.lm import LM, LMConfig
from flax_minrnn.training import checkpoint as ckpt_lib
from flax_minrnn.training import config as config_lib
from flax_minrnn.training import mesh as parallel_lib
from flax_minrnn.training import two_stage as two_stage_lib
from flax_minrnn.training.config import ConfigError
from flax_minrnn.training.data import CharDataset, CharVocab, load_text, make_task
from flax_minrnn.training.data.text import check_seed

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
# Metric lines of steps newer than the one a run resumes from: kept here.
SUPERSEDED_METRICS_FILE = "metrics.superseded.jsonl"
SAMPLES_FILE = "samples.txt"
# Samples of steps newer than the one a run resumes from: kept here.
SUPERSEDED_SAMPLES_FILE = "samples.superseded.txt"
TB_DIR = "tb"
# Config keys that may differ between a workdir's run and its resumption:
# they change neither the trained state nor the data order.  The mesh may
# change (a run may resume on another number of devices), the samples use a
# stream of their own, and init_from.workdir is read on a fresh start only (a
# moved two-stage run then still resumes its stage 2).
RESUMABLE_KEYS = ("train.num_steps", "train.progress_bar", "train.sample_every",
                  "train.sample_length", "train.sample_prompt", "train.sample_temperature",
                  "train.sample_top_k", "init_from.workdir", "mesh.shape",
                  "mesh.axis_names", "mesh.data_axis", "mesh.fsdp",
                  "mesh.sequence_axis")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16, "float64": jnp.float64}
# Independent PRNG streams derived from key(seed).
_INIT_STREAM, _DROPOUT_STREAM, _SAMPLE_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------
# Config translation, data, model, optimizer.
# ----------------------------------------------------------------------------

def lm_config(config: ml_collections.ConfigDict, vocab_size: int
              ) -> LMConfig:
    """Translates ``config.model`` into an :class:`LMConfig`, strictly.

    ``d_h=0`` and ``d_channel_mixing=0`` mean None (the model's default);
    dtype strings become jnp dtypes. Every ``config.model`` key must be an
    ``LMConfig`` field.

    Raises:
        ConfigError: A key without an ``LMConfig`` field, an unknown dtype, or
            a value ``LMConfig`` rejects.
    """
    values = config.model.to_dict()
    for key in ("architecture", "griffin"):  # Not LMConfig fields.
        values.pop(key, None)
    _check_fields(values, LMConfig, "model.")
    _zero_means_none(values, ("d_h", "d_channel_mixing"), "model.")
    values.update(_model_dtypes(config))
    values["scan_impl"] = training_scan_impl(config)
    try:
        return LMConfig(vocab_size=int(vocab_size), **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(_keyed(e, values, "model.")) from e


def _zero_means_none(values: dict, keys, prefix: str) -> None:
    """Config keys whose 0 means "derived" (the dataclass's None)."""
    for key in keys:
        value = values[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{prefix}{key} must be >= 0 (0: derived from the other "
                              f"sizes), got {value}")
        values[key] = value or None


def _keyed(error: Exception, values, prefix: str) -> str:
    """The dataclass's error, its leading field name written as the config key."""
    message = str(error)
    field = message.split(" ", 1)[0].split("=", 1)[0]
    if field in values:
        return prefix + message
    return f"Invalid {prefix.rstrip('.')} config: {message}"


def training_scan_impl(config: ml_collections.ConfigDict) -> str:
    """``model.scan_impl``, or ``'native'`` where ``train.cpu_kernels`` turns the
    compiled CPU kernels on.

    Only for ``model.scan_impl='auto'`` and MinGRU/MinLSTM time mixing: the
    kernels compute the same function (the parameters do not change) with
    first derivatives only, which is all training needs.  ``'auto'`` turns
    them on when the default backend is the CPU and they build; ``'native'``
    itself runs the pure-JAX tile loop wherever the kernels do not apply.
    """
    impl, mode = config.model.scan_impl, config.train.cpu_kernels
    if (impl != "auto" or mode == "off"
            or config.model.time_mixing not in ("mingru", "minlstm")):
        return impl
    if mode == "on":
        return "native"
    if jax.default_backend() != "cpu":
        return impl
    from flax_minrnn.backends import native  # pylint: disable=import-outside-toplevel
    return "native" if native.available() else impl


def _check_fields(values: Mapping[str, Any], cls, prefix: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"config.{prefix[:-1]} keys without a field of {cls.__name__}: "
                          f"{', '.join(prefix + k for k in unknown)}")


def _model_dtypes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``model.dtype`` and ``model.param_dtype`` as jnp dtypes."""
    out = {}
    for key in ("dtype", "param_dtype"):
        value = config.model[key]
        if value not in _DTYPES:
            raise ConfigError(f"Config key 'model.{key}' must be one of "
                              f"{sorted(_DTYPES)}, got {value!r}.")
        out[key] = _DTYPES[value]
    return out


def griffin_config(config: ml_collections.ConfigDict, vocab_size: int
                   ) -> GriffinConfig:
    """Translates ``config.model.griffin`` into a :class:`GriffinConfig`, strictly.

    ``lru_width=0`` and ``final_w_init_variance_scale=0`` mean None,
    ``block_types`` is comma-separated; ``dtype``, ``param_dtype`` and
    ``scan_impl`` come from ``config.model``.

    Raises:
        ConfigError: A key without a ``GriffinConfig`` field, an unknown
            dtype, or a value ``GriffinConfig`` rejects (naming the field).
    """
    values = config.model.griffin.to_dict()
    _check_fields(values, GriffinConfig, "model.griffin.")
    _zero_means_none(values, ("lru_width", "final_w_init_variance_scale"), "model.griffin.")
    values["block_types"] = tuple(
        name.strip() for name in str(values["block_types"]).split(","))
    values.update(_model_dtypes(config), scan_impl=config.model.scan_impl)
    try:
        return GriffinConfig(vocab_size=int(vocab_size), **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(_keyed(e, values, "model.griffin.")) from e


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
    """The model of ``config.model``: :class:`LM` or (``architecture='griffin'``)
    :class:`~flax_minrnn.models.griffin.Griffin`."""
    if config.model.architecture == "griffin":
        return Griffin(griffin_config(config, vocab_size))
    return LM(lm_config(config, vocab_size))


def build_dataset(config: ml_collections.ConfigDict,
                  vocab: CharVocab | None = None):
    """Builds the task of ``config.data`` (seeded by ``config.seed``).

    Args:
        config: A validated config.
        vocab: For the char task, encode with this vocabulary (a saved
            run's) instead of the corpus's own.

    Returns:
        A ``CharDataset`` or synthetic task (``train_batch``,
        ``eval_batches``, ``vocab_size``).

    Raises:
        ConfigError: Task arguments the task does not take.
    """
    data = config.data
    kwargs = data.task_kwargs.to_dict()
    if data.name == "char":
        if kwargs:
            raise ConfigError("data.task_kwargs is not used by the char task; "
                              f"got {sorted(kwargs)}.")
        return CharDataset(load_text(data.path or None), data.seq_len,
                           data.batch_size, seed=config.seed,
                           val_fraction=data.val_fraction, vocab=vocab)
    try:
        return make_task(data.name, batch_size=data.batch_size,
                         seed=config.seed, **kwargs)
    except TypeError as e:
        raise ConfigError(f"data.task_kwargs: {e}") from e


def _path_str(path) -> str:
    """'/'-joined names of a pytree key path ('block_0/mixer/kernel')."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k)))
                    for k in path)


def _regex(config_key: str, pattern: str) -> re.Pattern | None:
    """Compiles a config regex ('' = None, matches nothing)."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"Config key {config_key!r}: bad regex "
                          f"{pattern!r} ({e}).") from e


def _labels(params, fn: Callable[[str, Any], Any]):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(_path_str(p), x), params)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           schedule_steps: int | None = None) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to ``lr * min_lr_ratio``.

    With ``n = schedule_steps`` (default ``train.num_steps``), ``w =
    min(warmup_steps, n - 1)``, ``lr = optim.learning_rate`` and ``e = lr *
    min_lr_ratio``, the rate of update ``s`` (0-based) is ``lr * s / w`` for
    ``s < w``, ``e + (lr - e) * (1 + cos(pi * (s - w) / (n - w))) / 2`` for
    ``w <= s < n``, and ``e`` from ``s = n`` on (optax's
    ``warmup_cosine_decay_schedule``).
    """
    o = config.optim
    n = config.train.num_steps if schedule_steps is None else int(schedule_steps)
    warmup = min(o.warmup_steps, max(n - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup,
        decay_steps=max(n, warmup + 1),
        end_value=o.learning_rate * o.min_lr_ratio)


def make_optimizer(config: ml_collections.ConfigDict, params,
                   schedule_steps: int | None = None
                   ) -> optax.GradientTransformation:
    """AdamW + global-norm clipping, decay mask and optional freezing.

    Weight decay skips 1-D params and params whose '/'-joined path matches
    ``optim.no_decay_regex``; params matching ``init_from.freeze_regex`` get
    zero updates (``optax.set_to_zero``). ``schedule_steps``: see
    :func:`learning_rate_schedule`.

    ``optim.recurrent_lr_multiplier = m`` multiplies the final update of
    every ``recurrent_kernel`` by ``m`` (learning rate ``m * lr`` for ``U``,
    weight decay included; two-stage recipe 2,
    :mod:`flax_minrnn.training.two_stage`). ``m = 1`` adds no transform, so
    the optimizer state keeps its structure.
    """
    o = config.optim
    no_decay = _regex("optim.no_decay_regex", o.no_decay_regex)
    decay_mask = _labels(params, lambda path, x: bool(
        np.ndim(x) > 1 and not (no_decay and no_decay.search(path))))
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(learning_rate_schedule(config, schedule_steps),
                    b1=o.b1, b2=o.b2,
                    weight_decay=o.weight_decay, mask=decay_mask))
    m = o.recurrent_lr_multiplier
    if not m > 0:
        raise ConfigError(f"Config key 'optim.recurrent_lr_multiplier' must be > 0, "
                          f"got {m!r}.")
    if m != 1:
        if not two_stage_lib.has_recurrent_kernels(params):
            raise ConfigError(
                "optim.recurrent_lr_multiplier is set but the model has no "
                "recurrent_kernel (it needs model.use_true_recurrence=True).")
        rec = two_stage_lib.recurrent_mask(params)
        tx = optax.chain(tx, optax.multi_transform(
            {"recurrent": optax.scale(m), "other": optax.identity()},
            jax.tree.map(lambda r: "recurrent" if r else "other", rec)))
    freeze = _regex("init_from.freeze_regex", config.init_from.freeze_regex)
    if freeze is None:
        return tx
    labels = _labels(params, lambda path, x: "frozen" if freeze.search(path)
                     else "trainable")
    return optax.multi_transform(
        {"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def _accuracy_terms(logits, targets, weights):
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(correct * weights.astype(jnp.float32))


def _optax_promotion():
    """optax mixes Python floats with int32 counts (``b1 ** count``): allow
    standard promotion there even under ``jax_numpy_dtype_promotion=strict``."""
    return jax.numpy_dtype_promotion("standard")


def _lr(schedule: optax.Schedule, step: int) -> float:
    """The learning rate of update number ``step`` (0-based)."""
    with _optax_promotion():
        return float(schedule(max(int(step), 0)))


def on_mesh(model: LM, plan: "parallel_lib.MeshPlan | None") -> LM:
    """``model`` with its layers' scans split over ``plan.sequence_axis``."""
    if plan is None or plan.sequence_axis is None:
        return model
    if not isinstance(model, LM):
        raise ConfigError("mesh.sequence_axis is supported for model.architecture='lm' "
                          f"only, not for a {type(model).__name__}")
    try:
        config = dataclasses.replace(model.config, sequence_axis=plan.sequence_axis)
    except ValueError as e:
        raise ConfigError(f"mesh.sequence_axis={plan.sequence_axis!r} does not fit the "
                          f"model: {e}") from e
    return model.clone(config=config)


def make_train_step(model: LM, tx: optax.GradientTransformation,
                    dropout_base: jax.Array,
                    plan: "parallel_lib.MeshPlan | None" = None, *,
                    blend_steps: int = 0, tbptt_length: int = 0) -> Callable:
    """Returns ``train_step(params, opt_state, batch, step) -> (p, s, m)``.

    The dropout key of step ``step`` is ``fold_in(dropout_base, step)``.
    ``blend_steps > 0``: the loss sees every ``recurrent_kernel`` times
    ``min(1, step / blend_steps)`` (recipe 4 of
    :mod:`flax_minrnn.training.two_stage`); ``tbptt_length > 0``: truncated
    BPTT every ``tbptt_length`` steps (recipe 5,
    :func:`~flax_minrnn.training.two_stage.truncated_apply`).
    Metrics: loss, accuracy, grad_norm and ``finite`` (loss, gradients and
    new params all finite).  With a ``plan`` (:mod:`flax_minrnn.training.mesh`)
    the step runs on its mesh: params, optimizer state and batch as placed by
    the plan (the new state keeps the plan's shardings).
    """
    model = on_mesh(model, plan)

    def train_step(params, opt_state, batch, step):
        key = jax.random.fold_in(dropout_base, step)

        def loss_fn(p):
            if blend_steps:
                p = two_stage_lib.blend_params(
                    p, two_stage_lib.blend_alpha(step, blend_steps))
            if tbptt_length:
                logits = two_stage_lib.truncated_apply(
                    model, p, batch["inputs"], tbptt_length, training=True,
                    dropout_key=key)
            else:
                _, logits = model.apply({"params": p}, batch["inputs"],
                                        training=True, rngs={"dropout": key})
            loss, total = weighted_cross_entropy(logits, batch["targets"],
                                                 batch["weights"])
            return loss, (logits, total)

        (loss, (logits, total)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params)
        with _optax_promotion():
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        if plan is not None:
            new_params, new_opt_state = plan.constrain_state(
                (new_params, new_opt_state))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(new_params):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        accuracy = _accuracy_terms(logits, batch["targets"],
                                   batch["weights"]) / jnp.maximum(total, 1.0)
        return new_params, new_opt_state, dict(
            loss=loss, accuracy=accuracy, grad_norm=grad_norm, finite=finite)

    return jax.jit(train_step) if plan is None else plan.wrap(jax.jit(train_step))


def make_eval_step(model: LM, plan: "parallel_lib.MeshPlan | None" = None
                   ) -> Callable:
    """Returns ``eval_step(params, batch) -> (loss_sum, correct, weight)``."""
    model = on_mesh(model, plan)

    def eval_step(params, batch):
        _, logits = model.apply({"params": params}, batch["inputs"],
                                training=False)
        loss, total = weighted_cross_entropy(logits, batch["targets"],
                                             batch["weights"])
        return (loss * total,
                _accuracy_terms(logits, batch["targets"], batch["weights"]),
                total)

    return jax.jit(eval_step) if plan is None else plan.wrap(jax.jit(eval_step))


def pad_batch(batch: Mapping[str, np.ndarray], length: int
              ) -> dict[str, np.ndarray]:
    """``batch`` with its time axis right-padded with zeros to ``length``.

    The padded positions have zero inputs, targets and weights, so a causal
    model's weighted loss and accuracy over the batch do not change.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        extra = length - value.shape[1]
        out[key] = value if extra <= 0 else np.pad(
            value, [(0, 0), (0, extra)] + [(0, 0)] * (value.ndim - 2))
    return out


def evaluate_batches(eval_step: Callable, params, batches, *,
                     bucket_lengths: bool = False,
                     max_length: int | None = None) -> dict[str, float]:
    """Weighted loss and accuracy over ``batches`` (sums in float64).

    Args:
        eval_step: From :func:`make_eval_step`.
        params: The model parameters.
        batches: Dicts of ``inputs``, ``targets``, ``weights`` ``(B, T)``.
        bucket_lengths: Pad each batch to ``bucket_length(T, max_length)``
            (:func:`pad_batch`), so batches of many lengths share a few
            compiled steps; same metrics up to float32 rounding.
        max_length: Longest length the model takes (learned positions).
    """
    loss_sum = correct = total = 0.0
    for batch in batches:
        if bucket_lengths:
            batch = pad_batch(batch, bucket_length(
                int(np.shape(batch["inputs"])[1]), max_length))
        l, c, n = jax.device_get(eval_step(params, batch))
        loss_sum, correct, total = (loss_sum + float(l), correct + float(c),
                                    total + float(n))
    total = max(total, 1.0)
    return {"eval_loss": loss_sum / total, "eval_accuracy": correct / total}


# ----------------------------------------------------------------------------
# Initialisation (fresh or from another run).
# ----------------------------------------------------------------------------

def _example_tokens(dataset) -> np.ndarray:
    return np.zeros((1, int(dataset.seq_len)), np.int32)


def _checkpoint_dir(workdir: str) -> str:
    """The checkpoint directory of a run workdir (or the dir itself)."""
    sub = os.path.join(workdir, CHECKPOINT_DIR)
    return sub if os.path.isdir(sub) or not os.path.isdir(workdir) else workdir


def initial_params(config: ml_collections.ConfigDict, model: LM,
                   example_tokens: np.ndarray,
                   vocab: CharVocab | None = None, *,
                   batch_tokens: np.ndarray | None = None):
    """Fresh params, or (two-stage) params migrated from ``init_from``.

    With ``config.init_from.workdir`` set, loads that run's latest params,
    migrates them onto ``model`` (``flax_minrnn.training.migrate.migrate_params``:
    new ``recurrent_kernel``s start at zero, or random with
    ``init_from.recurrent_init='random'``) and keeps, for every param whose
    '/'-joined path matches ``init_from.load_regex``, the migrated value; the
    others keep their fresh initialisation.

    A random ``U`` (recipe 3 of :mod:`flax_minrnn.training.two_stage`) is
    drawn from the init stream folded with 1; with
    ``init_from.compensate_bias`` the biases absorb the mean stage-1 state on
    ``batch_tokens`` (default ``example_tokens``), and the measured
    ``max |logit difference|`` to the source model on that batch is printed.

    Raises:
        ConfigError: The source run has another vocabulary or nothing
            matches ``load_regex``.
        ValueError: The source run's latest checkpoint is corrupt (not a
            ``CheckpointCorruptError``: this run's ``--step`` and
            ``--fallback-to-last-good`` cannot help).
    """
    key = jax.random.fold_in(jax.random.key(config.seed), _INIT_STREAM)
    params = unfreeze(model.init({"params": key}, example_tokens,
                                 training=False)["params"])
    source = config.init_from.workdir
    if not source:
        return params
    source_dir = _checkpoint_dir(source)
    try:
        loaded, meta = ckpt_lib.load_params(source_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init_from.workdir={source!r}: {e}") from e
    except ckpt_lib.CheckpointCorruptError as e:
        # Not a CheckpointCorruptError: the CLI would advise --step and
        # --fallback-to-last-good, which act on this run's own workdir.
        what = (f"step {e.step} at {e.path} is corrupt or unreadable "
                f"({e.cause})" if e.step is not None else str(e))
        raise ValueError(
            f"init_from.workdir={source!r}: its latest checkpoint cannot be "
            f"loaded: {what}. Nothing was deleted. init_from loads the "
            "source run's latest step: move the broken step directory out "
            f"of {source_dir} (e.g. into "
            f"{os.path.join(source_dir, 'superseded')}) to start "
            "from its newest good step; 'flax-minrnn check --workdir "
            f"{source}' lists the good steps.") from e
    if vocab is not None and meta.get("vocab"):
        if CharVocab.from_json(meta["vocab"]) != vocab:
            raise ConfigError(f"init_from.workdir {source!r} was trained with "
                              "another vocabulary.")
    from flax_minrnn.training.migrate import migrate_params  # pylint: disable=g-import-not-at-top
    twin = _dropout_free(model)
    init = config.init_from
    kwargs = {}
    source_model = None
    if init.recurrent_init == "random":
        tokens = example_tokens if batch_tokens is None else batch_tokens
        kwargs = dict(recurrent_init="random",
                      recurrent_init_scale=init.recurrent_init_scale,
                      rng=jax.random.fold_in(key, 1))
        source_model = _associative_twin(twin)
        if init.compensate_bias:
            kwargs["state_means"] = two_stage_lib.mean_states(
                source_model, unfreeze(loaded), tokens, training=False)
    migrated = unfreeze(migrate_params(unfreeze(loaded), twin,
                                       example_tokens, **kwargs))
    if source_model is not None:
        gap = two_stage_lib.init_logit_gap(source_model, unfreeze(loaded), twin,
                                           migrated, tokens)
        blend = (" (before the recurrence blend, i.e. at alpha = 1)"
                 if config.train.recurrence_blend_steps else "")
        _write(f"init_from.recurrent_init='random': max |logit difference| to "
               f"{source!r} on the first training batch{blend}: {gap:.4g}")
    load = _regex("init_from.load_regex", config.init_from.load_regex)
    flat_new = traverse_util.flatten_dict(params, sep="/")
    flat_mig = traverse_util.flatten_dict(migrated, sep="/")
    chosen = {k: k in flat_mig and load is not None and bool(load.search(k))
              for k in flat_new}
    if not any(chosen.values()):
        raise ConfigError(f"init_from.load_regex "
                          f"{config.init_from.load_regex!r} matches no param.")
    out = {k: jnp.asarray(flat_mig[k], dtype=flat_new[k].dtype)
           if chosen[k] else v for k, v in flat_new.items()}
    return traverse_util.unflatten_dict(out, sep="/")


def _associative_twin(model):
    """``model`` (an LM) in associative mode: the stage-1 model."""
    if not isinstance(model, LM):
        raise ConfigError("init_from.recurrent_init='random' needs "
                          "model.architecture='lm'")
    return LM(dataclasses.replace(model.config, use_true_recurrence=False))


def check_recipes(config: ml_collections.ConfigDict, params) -> None:
    """Raises ConfigError for a two-stage recipe field that would do nothing.

    (``optim.recurrent_lr_multiplier`` is checked by :func:`make_optimizer`.)
    """
    t, init, m = config.train, config.init_from, config.model
    true_rec = m.architecture == "lm" and m.use_true_recurrence
    if t.recurrence_blend_steps and not two_stage_lib.has_recurrent_kernels(params):
        raise ConfigError("train.recurrence_blend_steps needs a model with recurrent "
                          "kernels (model.use_true_recurrence=True).")
    if init.recurrent_init != "zeros" and not (true_rec and init.workdir):
        raise ConfigError("init_from.recurrent_init='random' needs init_from.workdir "
                          "and model.use_true_recurrence=True (it sets the new "
                          "recurrent kernels of stage 2).")
    if (init.recurrent_init == "random" and init.compensate_bias
            and t.recurrence_blend_steps):
        raise ConfigError(
            "init_from.compensate_bias=True with train.recurrence_blend_steps: the "
            "blend starts at alpha=0, exactly the stage-1 function only with the "
            "stage-1 biases; set init_from.compensate_bias=false (the blend keeps the "
            "start exact) or train.recurrence_blend_steps=0.")
    if t.tbptt_length:
        if m.architecture != "lm":
            raise ConfigError("train.tbptt_length needs model.architecture='lm'")
        if config.mesh.sequence_axis:
            raise ConfigError("train.tbptt_length cannot be used with "
                              "mesh.sequence_axis (time is split over devices)")
        if m.dropout or m.embedding_dropout:
            raise ConfigError("train.tbptt_length needs model.dropout=0 and "
                              "model.embedding_dropout=0 (its two forward passes "
                              "must see the same dropout masks)")


# ----------------------------------------------------------------------------
# Logging.
# ----------------------------------------------------------------------------

class _Logger:
    """metrics.jsonl, samples.txt, TensorBoard and console.

    Files are written by process 0 only. On creation, whatever the files
    hold past the step a run starts from is set aside, so that a resumed
    run's files equal an uninterrupted run's (but for timings):

    * metrics.jsonl: lines of later steps, and any line a kill left torn,
      move to metrics.superseded.jsonl.
    * samples.txt: the bytes past the size recorded in the checkpoint
      (``samples_bytes``) move to samples.superseded.txt. A checkpoint
      saved before the size was recorded (``None``) leaves it as it is.
    * tb/: a new event file starts with a purge marker at the first new
      step, so that TensorBoard hides the older files' later events.

    Args:
        workdir: The run directory.
        resume_step: The step resumed from; None for a fresh start (then
            all earlier lines and samples are set aside).
        samples_bytes: The size of samples.txt when ``resume_step`` was
            saved.
    """

    def __init__(self, workdir: str, resume_step: int | None,
                 samples_bytes: int | None):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.samples_path = os.path.join(workdir, SAMPLES_FILE)
        self.writer = None
        if jax.process_index() != 0:  # Several hosts: one writer.
            return
        text, kept, superseded = "", [], []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            for line in io.StringIO(text):  # Lines as the file iterates them.
                line = line if line.endswith("\n") else line + "\n"
                try:
                    keep = resume_step is not None and json.loads(line)["step"] <= resume_step
                except (ValueError, KeyError, TypeError):
                    keep = False
                (kept if keep else superseded).append(line)
        kept = "".join(kept)
        if kept != text or not os.path.exists(self.path):
            _set_aside(self.path, kept, "".join(superseded).encode("utf-8"),
                       os.path.join(workdir, SUPERSEDED_METRICS_FILE))
        if resume_step is None:
            samples_bytes = 0
        if samples_bytes is not None and os.path.exists(self.samples_path):
            with open(self.samples_path, "rb") as f:
                head, tail = f.read(samples_bytes), f.read()
            if tail:
                _set_aside(self.samples_path, head.decode("utf-8"), tail,
                           os.path.join(workdir, SUPERSEDED_SAMPLES_FILE))
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        # tensorboardX names files by the second and opens them with "wb":
        # the suffix keeps a restart within the same second from
        # overwriting a file, and sorts files in the order they were made.
        self.writer = SummaryWriter(
            os.path.join(workdir, TB_DIR),
            purge_step=0 if resume_step is None else resume_step + 1,
            filename_suffix=f".{time.time_ns():020d}")

    def log(self, record: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record)) + "\n")
        split, step = record["split"], record["step"]
        for key in ("loss", "accuracy", "lr", "tokens_per_sec", "grad_norm"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"{split}/{key}", record[key], step)
        self.writer.flush()

    def sample(self, step: int, text: str) -> None:
        if self.writer is not None:
            with open(self.samples_path, "a", encoding="utf-8") as f:
                f.write(f"=== step {step} ===\n{text}\n\n")

    def samples_bytes(self) -> int:
        """The size of samples.txt now (0 if absent; process 0's file)."""
        try:
            return os.path.getsize(self.samples_path)
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _set_aside(path: str, kept: str, aside: bytes, aside_path: str) -> None:
    """Appends ``aside`` to ``aside_path`` (synced), then replaces ``path`` by
    ``kept`` atomically: a kill at any point loses nothing (at worst some
    text is in both files)."""
    if aside:
        with open(aside_path, "ab") as f:
            f.write(aside)
            f.flush()
            os.fsync(f.fileno())
    config_lib.write_text_atomically(path, kept)


def _write(message: str) -> None:
    import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.tqdm.write(message, file=sys.stdout)


def _check_resumable(config, workdir: str, also: Sequence[str] = ()) -> None:
    """Raises unless ``config`` equals the workdir's (but RESUMABLE_KEYS and
    ``also``).  Without ``workdir/config.json`` nothing is checked here;
    :func:`train_and_evaluate` then checks the restored checkpoint's own copy."""
    try:
        saved = config_lib.load_saved_config(workdir)
    except FileNotFoundError:
        return
    _check_same_config(saved, config, workdir, also)


def _check_same_config(saved, config, workdir: str, also: Sequence[str] = ()) -> None:
    flat = lambda c: traverse_util.flatten_dict(c.to_dict(), sep=".")
    old, new = flat(saved), flat(config)
    diffs = [f"{k}: saved {old.get(k)!r}, new {new.get(k)!r}"
             for k in sorted(set(old) | set(new))
             if k not in RESUMABLE_KEYS and k not in also and old.get(k) != new.get(k)]
    if diffs:
        raise ConfigError(
            f"Workdir {workdir!r} holds checkpoints of a run with a different "
            f"config ({'; '.join(diffs[:10])}). Only "
            f"{', '.join(RESUMABLE_KEYS)} may change when resuming; use a new "
            "workdir.")


def has_checkpoints(workdir: str) -> bool:
    """Whether the run in ``workdir`` has saved a checkpoint step."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def preflight(config: ml_collections.ConfigDict, source_config=None) -> None:
    """Raises ``ConfigError`` for what :func:`train_and_evaluate` would refuse
    at the start of a run of ``config``, without training or reading
    checkpoints: the task, the model, the sample prompt, the mesh, the
    two-stage recipes and the optimizer, all on abstract parameters. With
    ``source_config`` (the run ``init_from.workdir`` will hold), also that
    its parameters migrate onto ``config``'s model.
    """
    config = config_lib.validate(config)
    dataset, _, model, plan = _build(config)
    on_mesh(model, plan)
    example = _example_tokens(dataset)
    params = _abstract_params(model, example)
    if source_config is not None:
        from flax_minrnn.training.migrate import migrate_params  # pylint: disable=g-import-not-at-top
        source = build_model(config_lib.validate(source_config), dataset.vocab_size)
        loaded = _abstract_params(source, example)
        try:
            jax.eval_shape(lambda p: migrate_params(p, _dropout_free(model), example), loaded)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"the parameters of init_from.workdir's run do not fit this "
                              f"model: {e}") from e
    check_recipes(config, params)
    make_optimizer(config, params)


def _build(config: ml_collections.ConfigDict):
    """``(dataset, vocab, model, plan)`` of a validated ``config``, the
    sample prompt checked against the vocabulary (``ConfigError``)."""
    dataset = build_dataset(config)
    vocab = getattr(dataset, "vocab", None)
    model = build_model(config, dataset.vocab_size)
    if vocab is not None:
        try:
            prompt = _encode_prompt(vocab, config.train.sample_prompt)
        except ValueError as e:
            raise ConfigError(f"train.sample_prompt: {e}") from e
        # What generate() would refuse at the end of training.
        from flax_minrnn.models.generate import check_learned_positions  # pylint: disable=g-import-not-at-top
        try:
            check_learned_positions(getattr(model, "config", None), len(prompt),
                                    config.train.sample_length)
        except ValueError as e:
            raise ConfigError(f"train.sample_length: {e}") from e
    return dataset, vocab, model, _mesh_plan(config, dataset)


def _abstract_params(model, example: np.ndarray):
    """``model``'s parameters as ``ShapeDtypeStruct``s (nothing computed)."""
    return unfreeze(jax.eval_shape(
        lambda: model.init(jax.random.key(0), example, training=False))["params"])


def _dropout_free(model):
    """``model`` without dropout: the same parameters, and ``init`` needs no
    ``'dropout'`` rng."""
    if isinstance(model, LM):
        return LM(dataclasses.replace(model.config, dropout=0.0, embedding_dropout=0.0))
    return model


def _encode_prompt(vocab: CharVocab, prompt: str) -> np.ndarray:
    """The prompt's ids; ``ValueError`` if it is empty or has characters
    outside ``vocab``."""
    if not prompt:
        raise ValueError("the prompt must contain at least one character")
    return vocab.encode(prompt)


def _sample_text(model, params, vocab: CharVocab, prompt: str,
                 max_new_tokens: int, key, *, temperature: float,
                 top_k: int = 0, top_p: float = 1.0,
                 bucket_lengths: bool = False) -> str:
    """Prompt + ``max_new_tokens`` generated characters."""
    from flax_minrnn.models.generate import generate  # pylint: disable=g-import-not-at-top
    ids = _encode_prompt(vocab, prompt)[None, :]
    out = generate(model, params, jnp.asarray(ids, jnp.int32),
                   int(max_new_tokens), rng=key, temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p),
                   bucket_lengths=bucket_lengths)
    return prompt + vocab.decode(np.asarray(jax.device_get(out.tokens))[0])


# ----------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None,
                       step: int | None = None,
                       fallback_to_last_good: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir`` and evaluates it.

    Args:
        config: The experiment config (validated here).
        workdir: Run directory. If it holds checkpoints, the latest one is
            restored and training continues; its saved config must equal
            ``config`` except for ``RESUMABLE_KEYS``.
        stop_at_step: Stop once this step is reached, after checkpointing it,
            as if preempted (the schedule still targets ``num_steps``).
        step: Resume from this step instead of the latest.
        fallback_to_last_good: If the latest step is corrupt, resume from
            the newest step that restores (and say so) instead of raising.
            Either way, steps newer than the one resumed from are moved to
            ``checkpoints/superseded/`` (never deleted).

    With ``two_stage.stage2`` set, runs both stages instead
    (:func:`flax_minrnn.training.two_stage.run_two_stage`; ``stop_at_step``
    then counts the updates of both stages).

    Returns:
        Final metrics: step, train_loss, train_accuracy, eval_loss,
        eval_accuracy, wall_time, finished (num_steps or
        ``train.stop_at_eval_accuracy`` reached) (and sample for char tasks).
        ``train_*`` are the mean over the last log window's steps of each
        step's weighted mean (the objective each step minimised); ``eval_*``
        weigh every target of the evaluation set by its weight.

    Raises:
        ConfigError: Bad config or a mismatched workdir.
        FloatingPointError: A non-finite loss, gradient or param; nothing
            from that step is saved (the last checkpoint stays the last).
        CheckpointCorruptError: The checkpoint to resume from cannot be read
            (with ``fallback_to_last_good``: no checkpoint can).
        FileNotFoundError: ``step`` is not a checkpoint of ``workdir``.
    """
    import tqdm  # pylint: disable=g-import-not-at-top
    config = config_lib.validate(config)
    if config.two_stage.stage2:
        if step is not None or fallback_to_last_good:
            raise ValueError("step (--step) and fallback_to_last_good "
                             "(--fallback-to-last-good) apply to one-stage runs; "
                             "pass the stage's workdir and config")
        return two_stage_lib.run_two_stage(config, workdir, stop_at_step=stop_at_step)
    t = config.train
    if step is not None and fallback_to_last_good:
        raise ValueError("give step (--step) or fallback_to_last_good "
                         "(--fallback-to-last-good), not both")
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    new_dir = not os.path.exists(ckpt_dir)
    ckpt = ckpt_lib.Checkpointer(
        ckpt_dir, max_to_keep=t.max_to_keep,
        keep_best=True, best_metric="eval_loss", best_mode="min")
    try:
        latest = ckpt.latest_step()
        if step is not None and latest is None:
            raise FileNotFoundError(
                f"Cannot resume from step {step}: no checkpoints in "
                f"{ckpt.directory}.")
        if latest is not None:
            _check_resumable(config, workdir)
        dataset, vocab, model, plan = _build(config)
        base = jax.random.key(config.seed)
        example = _example_tokens(dataset)
        if latest is None:
            params = initial_params(config, model, example, vocab,
                                    batch_tokens=dataset.train_batch(0)["inputs"])
        else:  # Only the structure matters: restored below.
            params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  _abstract_params(model, example))
        check_recipes(config, params)
        tx = make_optimizer(config, params)  # The schedule is set below.
        state = {"params": params, "opt_state": tx.init(params), "step": 0,
                 "rng": jax.random.key_data(base), "data_position": 0}
        if plan is not None:  # Restores below land in these shardings too.
            state.update(plan.put_state({k: state[k] for k in
                                         ("params", "opt_state")}),
                         rng=plan.replicate(state["rng"]))
        elapsed0, schedule_steps, stopped_early = 0.0, t.num_steps, False
        if latest is not None:
            resumed, state, meta = _resume(ckpt, state, step,
                                           fallback_to_last_good)
            _check_checkpoint_meta(meta, config, vocab, workdir, resumed)
            elapsed0 = float(meta.get("elapsed", 0.0))
            stopped_early = bool(meta.get("stopped_early"))
            schedule_steps = saved_schedule_steps(meta, t.num_steps)
            tx = make_optimizer(config, params, schedule_steps)
            _write(f"Resuming {workdir} from step {resumed}.")
            note = schedule_note(config, schedule_steps)
            if note and t.num_steps <= resumed:
                note = (f"train.num_steps={t.num_steps} is not past step {resumed}: nothing "
                        f"trains, step {resumed} is evaluated.")
            if note:
                _write(note)
        if jax.process_index() == 0:
            config_lib.save_config(workdir, config)
        metadata = {"config": config_lib.config_to_json(config),
                    "vocab": vocab.to_json() if vocab is not None else None,
                    "vocab_size": int(dataset.vocab_size),
                    "schedule_steps": int(schedule_steps),
                    "stopped_early": stopped_early}
        return _loop(config, workdir, ckpt, model, tx, dataset, vocab, state,
                     metadata, elapsed0,
                     restored=meta if latest is not None else None,
                     stop_at_step=stop_at_step, tqdm_cls=tqdm.tqdm, plan=plan)
    finally:
        ckpt.close()
        # A start that failed before saving leaves no empty checkpoints/.
        if new_dir and os.path.isdir(ckpt_dir) and not os.listdir(ckpt_dir):
            os.rmdir(ckpt_dir)


def _check_checkpoint_meta(meta: Mapping[str, Any], config, vocab, workdir: str,
                           step: int) -> None:
    """The restored step's own config and vocabulary must match this run's
    (``workdir/config.json`` may be missing or replaced): ``ConfigError``."""
    if meta.get("config"):
        _check_same_config(config_lib.config_from_json(meta["config"]), config, workdir)
    saved = meta.get("vocab")
    if (saved is not None and vocab is not None
            and CharVocab.from_json(saved) != vocab):
        raise ConfigError(
            f"Step {step} in {workdir!r} was trained with another vocabulary than "
            "the data gives now (the corpus changed?): the token ids would not "
            "match. Restore the corpus or use a new workdir.")


def _resume(ckpt: ckpt_lib.Checkpointer, target, step: int | None,
            fallback: bool) -> tuple[int, Any, dict[str, Any]]:
    """Restores the step to resume from; sets the newer steps aside."""
    if step is not None:
        chosen = int(step)
        state, meta = ckpt.restore(chosen, target=target)
    elif fallback:
        chosen, state, meta, skipped = ckpt.restore_last_good(target)
        for err in skipped:
            _write(f"Step {err.step} is corrupt or unreadable ({err.cause}).")
        if skipped:
            _write(f"Falling back to step {chosen}, the newest step that "
                   "restores.")
    else:
        chosen = ckpt.latest_step()
        state, meta = ckpt.restore(chosen, target=target)
    newer = [s for s in ckpt.all_steps() if s > chosen]
    if newer:
        moved = ckpt.set_aside(newer)
        _write(f"Moved the newer steps {newer} to "
               f"{os.path.dirname(moved[0])} (kept, not deleted); training "
               f"continues from step {chosen}.")
    return chosen, state, meta


def saved_schedule_steps(meta: Mapping[str, Any], default: int) -> int:
    """The schedule length a checkpoint's run started with.

    ``meta["schedule_steps"]``; for checkpoints saved before it was recorded,
    the ``train.num_steps`` of the config saved with them (else ``default``).
    """
    if "schedule_steps" in meta:
        return int(meta["schedule_steps"])
    if meta.get("config"):
        return int(config_lib.config_from_json(meta["config"]).train.num_steps)
    return int(default)


def schedule_note(config: ml_collections.ConfigDict, schedule_steps: int
                  ) -> str | None:
    """What a resumed run's learning rate does when ``train.num_steps``
    differs from the schedule's length (None when it does not)."""
    n, o = config.train.num_steps, config.optim
    if n == schedule_steps:
        return None
    head = (f"train.num_steps is {n}, the run started with {schedule_steps}: "
            f"the learning-rate schedule keeps its {schedule_steps}-step "
            "length")
    if n > schedule_steps:
        return (f"{head}; steps {schedule_steps + 1}-{n} train at its final "
                f"rate {o.learning_rate * o.min_lr_ratio:.4g} "
                "(learning_rate * min_lr_ratio).")
    rate = _lr(learning_rate_schedule(config, schedule_steps), n - 1)
    return f"{head}; training stops at step {n} (learning rate there {rate:.4g})."


def _mesh_plan(config, dataset) -> "parallel_lib.MeshPlan | None":
    """``config.mesh`` as a checked plan (None: one device, no mesh)."""
    try:
        plan = parallel_lib.plan_from_config(config.mesh)
        if plan is not None:
            plan.check_batch(config.data.batch_size, int(dataset.seq_len),
                             length_from="data.seq_len" if config.data.name == "char"
                             else f"set by the {config.data.name} task's data.task_kwargs")
    except ValueError as e:
        raise ConfigError(f"Invalid mesh config: {e}") from e
    return plan


def _loop(config, workdir, ckpt, model, tx, dataset, vocab, state, metadata,
          elapsed0, *, restored, stop_at_step, tqdm_cls, plan=None
          ) -> dict[str, Any]:
    """The training loop proper (see :func:`train_and_evaluate`).

    ``restored`` is the metadata of the checkpoint resumed from (None for a
    fresh start): it holds the train-loss window still open at that step and
    the size of samples.txt then, so that the resumed run logs what an
    uninterrupted one would.
    """
    resumed = restored is not None
    restored = restored or {}
    t, d = config.train, config.data
    # From host memory: a restored key is committed to one device, which
    # would clash with params on a mesh where it is passed (sampling).
    base = jax.random.wrap_key_data(jnp.asarray(np.asarray(state["rng"])))
    train_step = make_train_step(model, tx,
                                 jax.random.fold_in(base, _DROPOUT_STREAM),
                                 plan, blend_steps=t.recurrence_blend_steps,
                                 tbptt_length=t.tbptt_length)
    # The function at `step` (recurrence blend: U scaled by alpha(step)).
    effective = lambda p, s: (p if not t.recurrence_blend_steps else
                              two_stage_lib.blend_params(p, two_stage_lib.blend_alpha(
                                  s, t.recurrence_blend_steps)))
    eval_step = make_eval_step(model, plan)
    place = (lambda batch: batch) if plan is None else plan.put_batch
    sample_base = jax.random.fold_in(base, _SAMPLE_STREAM)
    # Saved as a global array on a mesh (several hosts cannot save one
    # process's array).
    rng_data = (jax.random.key_data(base) if plan is None
                else plan.replicate(jax.random.key_data(base)))
    schedule = learning_rate_schedule(config, metadata["schedule_steps"])
    params, opt_state = state["params"], state["opt_state"]
    step = int(state["step"])
    eval_data = [place(b) for b in dataset.eval_batches(d.eval_batches)]
    logger = _Logger(workdir, step if resumed else None,
                     restored.get("samples_bytes"))
    t_start = time.time()
    wall = lambda: elapsed0 + time.time() - t_start
    final: dict[str, Any] = {}
    last_saved = step if resumed else None

    def run_eval(log=True):
        m = evaluate_batches(eval_step, effective(params, step), eval_data)
        if log:
            logger.log(dict(step=step, split="eval", loss=m["eval_loss"],
                            accuracy=m["eval_accuracy"],
                            lr=_lr(schedule, step - 1),
                            tokens_per_sec=None, wall_time=wall(),
                            time=time.time()))
        _write(f"step {step}: eval loss {m['eval_loss']:.4f} "
               f"accuracy {m['eval_accuracy']:.4f}")
        final.update(m)
        return m

    def sample():
        key = jax.random.fold_in(sample_base, step)
        text = _sample_text(model, effective(params, step), vocab, t.sample_prompt,
                            t.sample_length, key,
                            temperature=t.sample_temperature,
                            top_k=t.sample_top_k)
        logger.sample(step, text)
        _write(f"--- sample at step {step} ---\n{text}\n---")
        final["sample"] = text

    stopped_early = bool(metadata.get("stopped_early"))
    reached = lambda m: bool(t.stop_at_eval_accuracy and m is not None
                             and m["eval_accuracy"] >= t.stop_at_eval_accuracy)

    def save(eval_metrics):
        nonlocal last_saved
        meta = dict(metadata, step=step, data_position=step,
                    elapsed=wall(), stopped_early=stopped_early,
                    evaluated=eval_metrics is not None,
                    samples_bytes=logger.samples_bytes(),
                    train_window={"loss": window_loss,
                                  "accuracy": window_acc})
        ckpt.save(step, {"params": params, "opt_state": opt_state,
                         "step": step, "rng": rng_data,
                         "data_position": step},
                  metadata=meta,
                  metrics={"eval_loss": eval_metrics["eval_loss"]}
                  if eval_metrics else None)
        last_saved = step

    # The train steps since the last train-log line (kept in checkpoints).
    window = restored.get("train_window") or {}
    window_loss = [float(v) for v in window.get("loss", [])]
    window_acc = [float(v) for v in window.get("accuracy", [])]
    window_n, window_time = 0, 0.0  # This process's tokens and time.
    bar = tqdm_cls(total=t.num_steps, initial=step, disable=not t.progress_bar,
                   dynamic_ncols=True, desc="train")
    try:
        if not resumed or step >= t.num_steps or stopped_early:
            # A finished run re-evaluates; its eval line is logged unless the
            # step saved was an eval step (a step saved without one: num_steps
            # lowered to it).  Checkpoints without the flag log no line, as
            # before it.
            first = run_eval(log=not resumed or not restored.get("evaluated", True))
            if reached(first) and not stopped_early:
                stopped_early = True
                _write(f"step {step}: eval accuracy {first['eval_accuracy']:.4f} "
                       f">= train.stop_at_eval_accuracy; stopping.")
                if last_saved != step:  # A rerun reaches the same verdict.
                    save(first)
        while step < t.num_steps and not stopped_early and (
                stop_at_step is None or step < stop_at_step):
            tic = time.perf_counter()
            batch = dataset.train_batch(step)
            new_params, new_opt_state, m = train_step(
                params, opt_state, place(batch), np.int32(step))
            m = jax.device_get(m)
            window_time += time.perf_counter() - tic
            if not bool(m["finite"]):
                raise FloatingPointError(
                    f"Non-finite training loss/gradients/params at step "
                    f"{step + 1} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); training stopped "
                    f"without saving this state. The last good checkpoint is "
                    f"step {last_saved} in {ckpt.directory}.")
            params, opt_state = new_params, new_opt_state
            step += 1
            window_loss.append(float(m["loss"]))
            window_acc.append(float(m["accuracy"]))
            window_n += int(np.size(batch["inputs"]))
            tokens_per_sec = window_n / max(window_time, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{window_loss[-1]:.3f}",
                            tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            if step % t.log_every == 0 or step == t.num_steps:
                final["train_loss"] = float(np.mean(window_loss))
                final["train_accuracy"] = float(np.mean(window_acc))
                logger.log(dict(step=step, split="train",
                                loss=final["train_loss"],
                                accuracy=final["train_accuracy"],
                                lr=_lr(schedule, step - 1),
                                tokens_per_sec=tokens_per_sec,
                                grad_norm=float(m["grad_norm"]),
                                wall_time=wall(), time=time.time()))
                if not t.progress_bar:
                    _write(f"step {step}: train loss {final['train_loss']:.4f}"
                           f" ({tokens_per_sec:,.0f} tokens/s)")
                window_loss, window_acc, window_n, window_time = [], [], 0, 0.
            eval_metrics = None
            if step % t.eval_every == 0 or step == t.num_steps:
                eval_metrics = run_eval()
                if reached(eval_metrics):
                    stopped_early = True
                    _write(f"step {step}: eval accuracy "
                           f"{eval_metrics['eval_accuracy']:.4f} >= "
                           "train.stop_at_eval_accuracy; stopping.")
                    save(eval_metrics)
                    break
            if (vocab is not None and t.sample_every > 0
                    and step % t.sample_every == 0 and step != t.num_steps):
                sample()
            if (step % t.checkpoint_every == 0 or step == t.num_steps
                    or step == stop_at_step):
                save(eval_metrics)
        if (step >= t.num_steps or stopped_early) and vocab is not None:
            sample()
    finally:
        bar.close()
        logger.close()
    final.update(step=step, wall_time=wall(),
                 finished=bool(step >= t.num_steps or stopped_early))
    return final


# ----------------------------------------------------------------------------
# Using a finished run.
# ----------------------------------------------------------------------------

def load_run(workdir: str, step: int | None = None):
    """Rebuilds a saved run: ``(model, params, vocab, config)``.

    Uses checkpoint ``step`` (default the latest) of ``workdir`` and its
    metadata (config and vocabulary), so it works in a fresh process.
    ``vocab`` is None for synthetic tasks. The whole step is read and checked
    against its checksums (:func:`flax_minrnn.training.checkpoint.load_params`).
    With ``train.recurrence_blend_steps`` the recurrent kernels come scaled
    by the blend factor of the saved step (the function the run was at).

    Raises:
        FileNotFoundError: No checkpoints in ``workdir``, or no such step.
        CheckpointCorruptError: The step cannot be read back as saved.
    """
    return _load_run(workdir, step)[:4]


def _load_run(workdir: str, step: int | None = None):
    """:func:`load_run` plus the checkpoint metadata."""
    directory = _checkpoint_dir(workdir)
    params, meta = (ckpt_lib.load_params(directory) if step is None else
                    ckpt_lib.load_params(directory, step=step))
    if "config" not in meta:
        raise ValueError(f"Checkpoint in {workdir!r} has no config metadata.")
    config = config_lib.config_from_json(meta["config"])
    vocab = CharVocab.from_json(meta["vocab"]) if meta.get("vocab") else None
    if "vocab_size" in meta:
        vocab_size = int(meta["vocab_size"])
    else:
        vocab_size = build_dataset(config, vocab).vocab_size
    if config.train.recurrence_blend_steps:  # The function at the saved step.
        params = two_stage_lib.blend_params(params, two_stage_lib.blend_alpha(
            int(meta.get("step", 0)), config.train.recurrence_blend_steps))
    return build_model(config, vocab_size), params, vocab, config, meta


def evaluate(workdir: str, config_overrides: Sequence[str] = (), *,
             step: int | None = None, bucket_lengths: bool = False
             ) -> dict[str, float]:
    """Evaluates a saved run's params on its held-out split.

    Args:
        workdir: The run directory.
        config_overrides: ``key=value`` overrides (e.g.
            ``data.eval_batches=50``); ``model.*`` may not change.
        step: The checkpoint to evaluate (default the latest).
        bucket_lengths: Pad batches to bucket lengths
            (:func:`evaluate_batches`).

    Returns:
        ``{"step", "eval_loss", "eval_accuracy"}``.
    """
    model, params, vocab, config, meta = _load_run(workdir, step)
    step = meta.get("step")
    new = config_lib.apply_overrides(config, list(config_overrides))
    if new.model.to_dict() != config.model.to_dict():
        raise ConfigError("evaluate: overrides may not change model.* keys.")
    dataset = build_dataset(new, vocab)
    metrics = evaluate_batches(make_eval_step(model), params,
                               dataset.eval_batches(new.data.eval_batches),
                               bucket_lengths=bucket_lengths,
                               max_length=_max_length(model))
    return dict(step=step, **metrics)


def _max_length(model) -> int | None:
    """The longest input ``model`` takes (learned positions), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "positional_encoding", None) == "learned":
        return int(config.max_seq_length)
    return None


def generate_text(workdir: str, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, *, step: int | None = None,
                  bucket_lengths: bool = False) -> str:
    """Samples from a saved char run: returns ``prompt`` + new characters.

    ``step`` selects the checkpoint (default the latest);
    ``bucket_lengths``: see :func:`flax_minrnn.models.generate.generate`.

    Raises:
        ValueError: The run has no text vocabulary, or the prompt is empty or
            has characters outside the run's vocabulary.
    """
    check_seed(seed)
    model, params, vocab, _ = load_run(workdir, step)
    if vocab is None:
        raise ValueError(f"Run {workdir!r} is a synthetic task without a "
                         "text vocabulary; cannot generate text.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return _sample_text(model, params, vocab, prompt, max_new_tokens,
                        jax.random.key(seed), temperature=temperature,
                        top_k=top_k, top_p=top_p,
                        bucket_lengths=bucket_lengths)


class StepCheck(NamedTuple):
    """One step's result of :func:`check_workdir`."""

    step: int
    ok: bool
    detail: str


def check_workdir(workdir: str) -> list[StepCheck]:
    """Reads back every checkpoint step of a run and checks it.

    Each step is read whole into host memory, one at a time, and compared
    with the checksums saved with it (:meth:`Checkpointer.verify`); nothing
    is changed.

    Returns:
        One :class:`StepCheck` per step, ascending.

    Raises:
        FileNotFoundError: No checkpoints in ``workdir``.
    """
    directory = _checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoints in {directory} (missing).")
    out = []
    with ckpt_lib.Checkpointer(directory, read_only=True) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoints in {directory}.")
        for s in steps:
            try:
                summed = ckpt.verify(s)
            except ckpt_lib.CheckpointCorruptError as e:
                out.append(StepCheck(s, False, e.cause))
                continue
            out.append(StepCheck(s, True, "reads back as saved" if summed else
                                 "reads back (saved without checksums)"))
    return out
