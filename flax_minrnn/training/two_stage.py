"""Two-stage training recipes (issue 19): switching on the true recurrence.

Stage 1 trains a model in associative mode (gates see only ``x_t``; parallel
scan). Stage 2 switches on the true recurrence (``model.use_true_recurrence``:
gates and candidate also see ``h_{t-1}`` through a ``recurrent_kernel`` ``U``)::

    pre_t = in_proj(x_t) + b + h_{t-1} U

and fine-tunes from stage 1's params (``init_from.workdir``). How ``U`` starts
and how it is trained are the recipes below; each is a config field, and
they combine freely.

1. **Zero U, fresh optimizer** (default; ``init_from.recurrent_init='zeros'``).
   ``U = 0``, so stage 2 starts as exactly the stage-1 function (up to the
   float rounding of a sequential versus a parallel scan). Use it first: it
   cannot make stage 2 start worse than stage 1 ended. Its weakness: the
   gradient of ``U`` at ``U = 0`` is ``sum_t h_{t-1}^T dL/dpre_t``, which may
   be small, so ``U`` can stay near zero for a long time.

2. **Learning-rate multiplier on U** (``optim.recurrent_lr_multiplier = m``,
   ``m > 0``). Every ``recurrent_kernel`` update is multiplied by ``m``::

       U <- U + m * update_adamw(g_U)        (other params: m = 1)

   i.e. ``U`` trains at learning rate ``m * lr`` (weight decay included).
   Use it with the zero init when ``U`` grows too slowly (``m > 1``), or to
   fine-tune the stage-1 params gently while ``U`` learns quickly (``m > 1``
   with a low base rate). Needs params with recurrent kernels.

3. **Small random U with a compensating bias**
   (``init_from.recurrent_init='random'``, ``recurrent_init_scale = s``,
   ``compensate_bias``). ``U_ij ~ N(0, (s / sqrt(d_h))^2)`` breaks the
   symmetry at ``U = 0``; with ``compensate_bias`` the fused ``in_proj`` bias
   absorbs the mean recurrent input, ``b' = b - E[h_{t-1}] U``, where
   ``E[h_{t-1}]`` is the mean stage-1 state of each layer over the first
   training batch (all positions, ``h_{-1} = 0`` included). Then::

       pre_t' = pre_t + (h_{t-1} - E[h_{t-1}]) U

   so the pre-activations move only by the state's deviation from its mean
   times ``U``: ``O(s * std(h))`` per unit, first order. The start is close to,
   not equal to, the stage-1 function; the trainer prints the measured
   ``max |logit difference|`` on the first batch
   (:func:`init_logit_gap`), and ``tests/test_two_stage_recipes.py`` measures
   that the compensation shrinks it and that it shrinks with ``s``. Use it
   when the zero init leaves ``U`` stuck near zero.

4. **Recurrence blend** (``train.recurrence_blend_steps = N``). The gates see
   ``alpha_s h_{t-1}`` instead of ``h_{t-1}``, with ``alpha_s = min(1, s / N)``
   at update ``s`` (0-based) ramping from 0 to 1::

       pre_t = in_proj(x_t) + b + alpha_s h_{t-1} U

   implemented by scaling every ``recurrent_kernel`` by ``alpha_s`` inside
   the loss (:func:`blend_params`; checkpoints hold the raw ``U``). At
   ``alpha = 0`` the model is exactly the zero-``U`` function, whatever ``U``
   is. Use it with a random ``U`` (recipe 3) to start from the stage-1
   function and let the recurrence in gradually. Evaluations and
   :func:`flax_minrnn.training.train.load_run` use ``alpha`` of the step they
   are at.

5. **Truncated BPTT** (``train.tbptt_length = L``, 0 = full). The training
   sequence is processed in chunks of ``L`` steps carrying the model's whole
   state (:class:`flax_minrnn.models.lm.LMCarry`: recurrent states, conv
   buffers, positions), with ``stop_gradient`` on the carry between chunks::

       carry_c, logits_c = model(tokens_c, stop_gradient(carry_{c-1}))

   Chunked calls round differently from one call (last-bit differences of
   the matmuls), so the logits are taken from one untruncated forward pass
   and the gradient from the chunked one::

       logits = full + (chunked - stop_gradient(chunked))

   The forward values (loss, accuracy) then equal the untruncated ones
   exactly; only gradients through more than ``L`` steps of state are cut.
   It costs one extra forward pass. Use it when stage 2's sequential BPTT is
   unstable (exploding gradients of the nonlinear recurrence) or to shorten
   credit assignment. It needs ``model.dropout = model.embedding_dropout =
   0`` (the two passes must draw the same masks).

One command for both stages: ``two_stage.stage2`` (a list of ``key=value``
overrides) makes :func:`run_two_stage` train the config as stage 1 in
``workdir/stage1`` and then stage 2 (``model.use_true_recurrence=True``,
``init_from.workdir=workdir/stage1``, then the overrides) in
``workdir/stage2``; both stages resume after a kill. ``train.stop_at_eval_accuracy``
ends a stage early once an evaluation reaches that accuracy.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from flax_minrnn.nn.recurrent import RECURRENT_KERNEL, GatedRecurrence

STAGE1_DIR, STAGE2_DIR = "stage1", "stage2"
# Stage-2 overrides of each recipe with example values (configs/two_stage_*.py).
RECIPE_OVERRIDES = {
    "zeros": [],
    "lr": ["optim.recurrent_lr_multiplier=10"],
    "random": ["init_from.recurrent_init=random", "init_from.recurrent_init_scale=0.1"],
    "blend": ["init_from.recurrent_init=random", "init_from.recurrent_init_scale=0.5",
              "init_from.compensate_bias=false", "train.recurrence_blend_steps=200"],
    "tbptt": ["train.tbptt_length=16"],
}


SCRATCH = "scratch"  # The baseline: one stage, true recurrence from the start.


def parse_recipe_arg(arg) -> tuple[str, str]:
    """``"<time mixing>[,<recipe>]"`` (a two-stage config's argument) as
    ``(time_mixing, recipe)``; the recipe defaults to ``"zeros"``.

    ``recipe`` is a key of :data:`RECIPE_OVERRIDES`, or :data:`SCRATCH` for
    the baseline the two stages are measured against: one stage that trains
    the true recurrence from the start (the config decides its budget).
    """
    time_mixing, *rest = (arg or "mingru").split(",")
    recipe = rest[0] if rest else "zeros"
    choices = [*RECIPE_OVERRIDES, SCRATCH]
    if time_mixing not in ("mingru", "minlstm", "glrnn") or len(rest) > 1 \
            or recipe not in choices:
        raise ValueError(f"arg must be <mingru|minlstm|glrnn>[,<{'|'.join(choices)}>]"
                         f", got {arg!r}")
    return time_mixing, recipe


def set_strategy(config, strategy: str, budget: int):
    """Makes ``config`` (stage 1, as configured) run ``strategy`` and returns it.

    A recipe (a key of :data:`RECIPE_OVERRIDES`) sets ``two_stage.stage2``:
    stage 2 trains for up to ``budget`` updates with the recipe's overrides.
    :data:`SCRATCH` instead trains the true recurrence from the start, for up
    to ``budget`` updates: the baseline, with stage 2's budget and the same
    stopping rule (``train.stop_at_eval_accuracy``).
    """
    if strategy == SCRATCH:
        config.model.use_true_recurrence = True
        config.train.num_steps = budget
    else:
        config.two_stage.stage2 = [f"train.num_steps={budget}", *RECIPE_OVERRIDES[strategy]]
    return config


def has_recurrent_kernels(params) -> bool:
    """Whether any leaf of ``params`` is a ``recurrent_kernel``."""
    return any(p[-1] == RECURRENT_KERNEL
               for p in traverse_util.flatten_dict(unfreeze(params)))


def recurrent_mask(params):
    """A pytree of bools like ``params``: True at ``recurrent_kernel`` leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == RECURRENT_KERNEL, params)


def blend_alpha(step, blend_steps: int):
    """``alpha = min(1, step / blend_steps)`` (float32; 1 when ``blend_steps`` is 0)."""
    if not blend_steps:
        return jnp.float32(1.0)
    return jnp.minimum(jnp.float32(1.0),
                       jnp.asarray(step, jnp.float32) / jnp.float32(blend_steps))


def blend_params(params, alpha):
    """``params`` with every ``recurrent_kernel`` multiplied by ``alpha``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (x * jnp.asarray(alpha, x.dtype)
                         if getattr(path[-1], "key", None) == RECURRENT_KERNEL else x),
        params)


def truncated_apply(model, params, tokens, tbptt_length: int, *,
                    training: bool = False, dropout_key=None):
    """Logits of ``model`` on ``tokens`` with truncated BPTT every ``tbptt_length`` steps.

    Values: one untruncated call. Gradients: chunks of ``L = tbptt_length``
    steps (the last one may be shorter) run one after the other, carrying
    the :class:`~flax_minrnn.models.lm.LMCarry` with ``stop_gradient``
    between chunks (see the module docstring, recipe 5). ``L = 0`` or
    ``L >= T`` is one plain call (full BPTT). Chunk ``c`` would draw dropout
    from ``fold_in(dropout_key, c)``, which is why the trainer refuses
    dropout with TBPTT.

    Returns:
      Float32 logits ``(B, T, V)`` equal to the untruncated ones.
    """
    batch, seq_len = tokens.shape
    L = int(tbptt_length)

    def call(chunk, carry, key):
        rngs = {"dropout": key} if training else None
        return model.apply({"params": params}, chunk, carry, training=training,
                           rngs=rngs)

    if L <= 0 or L >= seq_len:
        return call(tokens, None, dropout_key)[1]
    n_full, rest = divmod(seq_len, L)
    chunks = tokens[:, :n_full * L].reshape(batch, n_full, L).swapaxes(0, 1)
    keys = (jnp.arange(n_full) if dropout_key is None else
            jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(n_full)))

    def body(carry, xs):
        chunk, key = xs
        carry, logits = call(chunk, carry, key if dropout_key is not None else None)
        return jax.lax.stop_gradient(carry), logits

    carry, logits = jax.lax.scan(body, model.initialize_carry(batch), (chunks, keys))
    logits = logits.swapaxes(0, 1).reshape(batch, n_full * L, -1)
    if rest:
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, n_full)
        _, tail = call(tokens[:, n_full * L:], carry, key)
        logits = jnp.concatenate([logits, tail], axis=1)
    return chunked_gradient(call(tokens, None, dropout_key)[1], logits)


def chunked_gradient(full, chunked):
    """``full`` in value, the gradient of ``chunked``: ``full + (chunked - sg(chunked))``."""
    full = jax.lax.stop_gradient(full)
    return full + (chunked - jax.lax.stop_gradient(chunked))


# ----------------------------------------------------------------------------
# Mean states (the bias compensation of recipe 3).
# ----------------------------------------------------------------------------

def _layer_states(module: GatedRecurrence, x, carry):
    """All states ``h_0 .. h_{T-1}`` of an associative-mode layer, float32."""
    params = module.variables["params"]
    if RECURRENT_KERNEL in params:
        raise ValueError("mean_states needs the associative-mode (stage-1) model")
    d_h = module.state_size(x.shape[-1])
    split = (module.num_blocks() - (module.output_gate() is not None)) * d_h
    kernel = jnp.asarray(params["in_proj"]["kernel"], jnp.float32)[:, :split]
    pre = jnp.einsum("btd,dn->btn", x.astype(jnp.float32), kernel,
                     precision=jax.lax.Precision.HIGHEST)
    if "bias" in params["in_proj"]:
        pre = pre + jnp.asarray(params["in_proj"]["bias"], jnp.float32)[None, None, :split]
    a, b = tuple(module.gate_fn()(pre))
    h0 = (jnp.zeros((x.shape[0], d_h), jnp.float32) if carry is None
          else jnp.asarray(carry, jnp.float32))

    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    a_t, b_t = a.swapaxes(0, 1), b.swapaxes(0, 1)
    if module.reverse:
        a_t, b_t = a_t[::-1], b_t[::-1]
    _, h = jax.lax.scan(step, h0, (a_t, b_t))
    if module.reverse:
        h = h[::-1]
    return h0, h.swapaxes(0, 1)


def mean_states(model: nn.Module, params, *args, **kwargs) -> dict:
    """Mean previous state ``E[h_{t-1}]`` of every recurrent layer.

    Runs ``model.apply({'params': params}, *args, **kwargs)`` (an
    associative-mode model) and, for each :class:`GatedRecurrence` layer
    called, averages ``h_{t-1}`` over the batch and the positions
    ``t = 0 .. T-1`` (``h_{-1}`` is the layer's initial carry; padding and
    resets are ignored: pass unpadded training batches).

    Returns:
      ``{layer path (tuple of names, as in params): mean (d_h,) float32}``.
    """
    means = {}

    def interceptor(next_fun, fargs, fkwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, GatedRecurrence):
            x = fargs[0]
            carry = fargs[1] if len(fargs) > 1 else fkwargs.get("carry")
            h0, h = _layer_states(module, x, carry)
            prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
            if module.reverse:
                prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
            means[tuple(module.scope.path)] = np.asarray(prev.mean(axis=(0, 1)))
        return next_fun(*fargs, **fkwargs)

    with nn.intercept_methods(interceptor):
        model.apply({"params": params}, *args, **kwargs)
    return means


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_logits(model, params, tokens):
    return model.apply({"params": params}, tokens, training=False)[1]


def init_logit_gap(model_a, params_a, model_b, params_b, tokens) -> float:
    """``max |logits_a - logits_b|`` of two models on ``tokens`` (eval mode).

    Each model's forward is compiled once (models are static, hashable
    arguments), so measuring several candidate starts costs one compilation.
    """
    la = _eval_logits(model_a, params_a, tokens)
    lb = _eval_logits(model_b, params_b, tokens)
    return float(jnp.max(jnp.abs(la - lb)))


# ----------------------------------------------------------------------------
# Both stages in one run.
# ----------------------------------------------------------------------------

def stage_configs(config, workdir: str):
    """The stage-1 and stage-2 configs of a two-stage ``config``.

    Stage 1 is ``config`` with ``two_stage.stage2 = []``. Stage 2 is stage 1
    with ``model.use_true_recurrence=True`` and ``init_from.workdir =
    workdir/stage1`` (``load_regex='.*'``, ``freeze_regex=''``), then the
    ``two_stage.stage2`` overrides.
    """
    from flax_minrnn.training import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.validate(config)
    if not config.two_stage.stage2:
        raise config_lib.ConfigError("two_stage.stage2 is empty: not a two-stage config")
    if config.model.architecture != "lm" or config.model.use_true_recurrence:
        raise config_lib.ConfigError(
            "two_stage.stage2 needs stage 1 in associative mode: model.architecture='lm' "
            "and model.use_true_recurrence=False")
    stage1 = config_lib.apply_overrides(config, ["two_stage.stage2="])
    stage2 = config_lib.apply_overrides(stage1, [
        "model.use_true_recurrence=true",
        f"init_from.workdir={os.path.join(os.path.abspath(workdir), STAGE1_DIR)}",
        "init_from.load_regex=.*", "init_from.freeze_regex=",
        *config.two_stage.stage2])
    if stage2.two_stage.stage2:
        raise config_lib.ConfigError("two_stage.stage2 may not set two_stage.stage2")
    return stage1, stage2


def run_two_stage(config, workdir: str, *, stop_at_step: int | None = None
                  ) -> dict[str, Any]:
    """Trains stage 1 in ``workdir/stage1``, then stage 2 in ``workdir/stage2``.

    Each stage is an ordinary run (:func:`~flax_minrnn.training.train.
    train_and_evaluate`), so after a kill, rerunning the same command resumes
    whichever stage was interrupted, bit-exactly; a finished stage only
    re-evaluates. Stage 2 starts once stage 1 has finished (``num_steps``
    reached, or ``train.stop_at_eval_accuracy`` reached).

    Args:
      config: A config with a non-empty ``two_stage.stage2``.
      workdir: The run directory (``config.json`` of the whole run, and one
        subdirectory per stage).
      stop_at_step: Stop after this many updates of both stages together
        (as if preempted).

    Returns:
      Stage 2's final metrics (or stage 1's when stopped in stage 1), with
      ``stage`` (1 or 2) and ``stage1`` (stage 1's final metrics).
    """
    from flax_minrnn.training import config as config_lib  # pylint: disable=import-outside-toplevel
    from flax_minrnn.training import train as train_lib  # pylint: disable=import-outside-toplevel
    stage1, stage2 = stage_configs(config, workdir)
    started = [train_lib.has_checkpoints(os.path.join(workdir, d))
               for d in (STAGE1_DIR, STAGE2_DIR)]
    if any(started):
        # Until stage 2 has a checkpoint its overrides may still be fixed:
        # a stage-2 mistake must not cost stage 1.
        train_lib._check_resumable(  # pylint: disable=protected-access
            config, workdir, also=() if started[1] else ("two_stage.stage2",))
    if not started[1]:  # Stage 2's mistakes show before stage 1 trains.
        if not started[0]:
            train_lib.preflight(stage1)
        try:
            train_lib.preflight(stage2, source_config=stage1)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"two_stage.stage2: {e}") from e
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        config_lib.save_config(workdir, config)
    m1 = train_lib.train_and_evaluate(stage1, os.path.join(workdir, STAGE1_DIR),
                                      stop_at_step=stop_at_step)
    if not m1.get("finished"):
        return dict(m1, stage=1, stage1=dict(m1))
    left = None if stop_at_step is None else stop_at_step - int(m1["step"])
    if left is not None and left <= 0:
        return dict(m1, stage=1, stage1=dict(m1))
    m2 = train_lib.train_and_evaluate(stage2, os.path.join(workdir, STAGE2_DIR),
                                      stop_at_step=left)
    return dict(m2, stage=2, stage1={k: v for k, v in m1.items() if k != "sample"})
