"""Parameter migration for two-stage training.

Two-stage training
------------------
Train a model fast in the parallel (associative) mode, then switch its layers
to the true-recurrence mode (``use_true_recurrence=True``) and fine-tune.  In
that mode every layer gains one parameter, ``recurrent_kernel`` ``U`` of shape
``(d_h, n_proj * d_h)``, and its pre-activations become::

    pre_t = in_proj(x_t) + h_{t-1} @ U

With ``U = 0`` both modes compute the same function, so :func:`migrate_params`
fills the missing ``recurrent_kernel`` leaves with zeros by default: the
migrated model's outputs equal the old ones right after the switch.  With
``recurrent_init='random'`` it draws ``U ~ N(0, (scale / sqrt(d_h))^2)``
instead and, given each layer's mean state (``state_means``, from
:func:`flax_minrnn.training.two_stage.mean_states`), subtracts
``E[h_{t-1}] U`` from the layer's ``in_proj`` bias so the start stays close to
the old function (:mod:`flax_minrnn.training.two_stage`, recipe 3, says how
close and when to use which).  Going back is only
lossless while ``U`` is still zero; a non-zero ``U`` is refused unless
``allow_drop_nonzero=True``.

Parameter dicts
---------------
Pass the *inner* parameter dict (``variables['params']``); that is what these
functions are designed for, and what they return.  A wrapped dict
``{'params': inner}`` (exactly one key, ``'params'``) is accepted too and is
returned wrapped the same way.  A variables dict with other collections
(``{'params': ..., 'batch_stats': ...}``) is refused: migrate its
``'params'`` and keep the other collections yourself.  (A model whose only
top-level submodule is literally named ``params`` would be mistaken for a
wrapped dict; name it otherwise.)

The flax-gated-linear-rnn package's parameters are converted by
:func:`flax_minrnn.compat.flax_gated_linear_rnn.from_flax_gated_linear_rnn`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from flax_minrnn.nn.recurrent import RECURRENT_KERNEL
from flax_minrnn.ops import checks

Params = Any
Path = Tuple[str, ...]

__all__ = [
    "migrate_params",
    "to_true_recurrence",
    "to_associative",
]



def _path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _is_all_zero(leaf, path: Path) -> bool:
    try:
        value = np.asarray(leaf)
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError) as err:
        raise ValueError(
            f"cannot inspect params leaf {_path_str(path)} under a JAX transformation "
            "(jit/vmap); call migrate_params eagerly") from err
    return not np.any(value)


def _check_init_kwargs(target: nn.Module, init_kwargs: Mapping[str, Any]) -> None:
    """Every name in ``init_kwargs`` must be a keyword of ``target.__call__``
    (any name when it takes ``**kwargs``); ``TypeError`` naming the first
    unknown one and listing the accepted ones."""
    if not init_kwargs:
        return
    label = f"{type(target).__name__}.__call__"
    try:
        params = inspect.signature(target.__call__).parameters.values()
    except (TypeError, ValueError):  # no signature to check against: init decides
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              inspect.Parameter.KEYWORD_ONLY)]
    unknown = [name for name in init_kwargs if name not in accepted]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, accepted + list(_MIGRATE_OPTIONS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(
            f"unknown keyword argument {name!r}{hint}: neither a keyword of {label} "
            f"{accepted} nor a migration option {list(_MIGRATE_OPTIONS)}")


def migrate_params(params: Params, target: nn.Module, *init_args,
                   allow_drop_nonzero: bool = False, recurrent_init: str = "zeros",
                   recurrent_init_scale: float = 0.1, rng: Optional[jax.Array] = None,
                   state_means: Optional[Mapping[Path, Any]] = None,
                   **init_kwargs) -> Params:
    """Maps ``params`` onto the parameter structure of ``target``.

    The target structure is built abstractly (no FLOPs, no memory)::

        want = jax.eval_shape(target.init, PRNGKey(0), *init_args, **init_kwargs)['params']

    Then, leaf by leaf (paths are tuples of dict keys, at any nesting depth, so
    this works for a single layer, a :class:`~flax_minrnn.nn.wrappers.Stack` or a
    whole model):

    * a path in both: the leaf of ``params`` is copied; its shape and dtype
      must equal the target's;
    * only in the target: a leaf named ``recurrent_kernel`` is filled with
      zeros (``U = 0`` leaves the function unchanged; the default,
      ``recurrent_init='zeros'``) or, with ``recurrent_init='random'``, drawn
      from ``N(0, (recurrent_init_scale / sqrt(d_h))^2)`` (``d_h`` its first
      dimension; when to use it: :mod:`flax_minrnn.training.two_stage`).
      With ``state_means`` the layer's ``in_proj/bias`` becomes
      ``b - state_means[layer] @ U``, so that ``pre_t = in_proj(x_t) + b +
      (h_{t-1} - E[h_{t-1}]) U`` moves only by the state's deviation from
      its mean; any other missing leaf is an error;
    * only in ``params``: a leaf named ``recurrent_kernel`` is dropped if it is
      all zeros (or with ``allow_drop_nonzero=True``, which changes the
      function); any other extra leaf is an error.

    Args:
      params: the source parameters: the inner dict (recommended) or
        ``{'params': inner}``; the result has the same form.
      target: the module whose structure the result must have (e.g.
        ``layer.clone(use_true_recurrence=True)``).
      *init_args: example arguments of ``target.init`` after the rng (an input
        ``x``; only shapes and dtypes matter: ``jax.ShapeDtypeStruct`` works).
      allow_drop_nonzero: drop non-zero ``recurrent_kernel`` leaves instead of
        raising.
      recurrent_init: ``'zeros'`` (the same function) or ``'random'``, how
        missing ``recurrent_kernel`` leaves start.
      recurrent_init_scale: ``s >= 0``: the random ``U`` has standard deviation
        ``s / sqrt(d_h)``.
      rng: PRNG key of the random ``U`` (required for ``'random'``); the
        leaves take ``fold_in(rng, i)``, ``i`` their index in sorted path
        order.
      state_means: ``{layer path: E[h_{t-1}] (d_h,)}`` for every layer that
        gets a random ``U`` (the layer path is the ``recurrent_kernel``'s
        path without its last name); ``None``: no bias compensation.
      **init_kwargs: keyword arguments of ``target.__call__``, passed through
        ``target.init`` (array-like values, as ``init_args``).  Their names
        are checked against its signature before anything runs (any name
        when it takes ``**kwargs``).

    Returns:
      The migrated parameters, same wrapping as ``params``.

    Raises:
      ValueError: naming every offending path: shape/dtype mismatches, missing
        leaves other than ``recurrent_kernel``, extra leaves, non-zero
        ``recurrent_kernel`` to drop (unless allowed).  Also when ``target``
        creates no ``'params'`` at all.
      TypeError: ``params`` is not a dict or ``target`` is not a Module, or
        an ``init_kwargs`` name is not a keyword of ``target.__call__`` (a
        misspelled option, say), naming it and listing the accepted ones.
    """
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be a flax.linen Module, got {type(target).__name__}")
    _check_init_kwargs(target, init_kwargs)
    source, wrapped = checks.unwrap_params(params)
    variables = jax.eval_shape(target.init, jax.random.PRNGKey(0), *init_args, **init_kwargs)
    if "params" not in variables:
        raise ValueError(
            f"target {type(target).__name__} creates no 'params' collection for these inputs")
    want = traverse_util.flatten_dict(unfreeze(variables["params"]))
    have = traverse_util.flatten_dict(source)

    if recurrent_init not in ("zeros", "random"):
        raise ValueError(f"recurrent_init must be 'zeros' or 'random', got {recurrent_init!r}")
    if recurrent_init == "random":
        if rng is None:
            raise ValueError("recurrent_init='random' needs rng (a PRNG key)")
        if not recurrent_init_scale >= 0:
            raise ValueError(f"recurrent_init_scale must be >= 0, got {recurrent_init_scale!r}")
    elif state_means is not None:
        raise ValueError("state_means (bias compensation) needs recurrent_init='random'")
    new_kernels = sorted(p for p in want if p not in have and p[-1] == RECURRENT_KERNEL)

    errors: List[str] = []
    out = {}
    for path, spec in want.items():
        if path in have:
            leaf = have[path]
            shape = tuple(np.shape(leaf))
            dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
            if shape != tuple(spec.shape) or jnp.dtype(dtype) != jnp.dtype(spec.dtype):
                errors.append(
                    f"{_path_str(path)}: params has shape {shape} dtype {jnp.dtype(dtype).name}, "
                    f"target expects shape {tuple(spec.shape)} dtype {jnp.dtype(spec.dtype).name}")
            out[path] = leaf
        elif path[-1] == RECURRENT_KERNEL:
            if recurrent_init == "zeros":
                out[path] = jnp.zeros(spec.shape, spec.dtype)
            else:
                key = jax.random.fold_in(rng, new_kernels.index(path))
                std = float(recurrent_init_scale) / np.sqrt(spec.shape[0])
                out[path] = (std * jax.random.normal(key, spec.shape, jnp.float32)
                             ).astype(spec.dtype)
        else:
            errors.append(f"{_path_str(path)}: missing from params (target expects shape "
                          f"{tuple(spec.shape)} dtype {jnp.dtype(spec.dtype).name})")
    for path, leaf in have.items():
        if path in want:
            continue
        if path[-1] == RECURRENT_KERNEL:
            if not allow_drop_nonzero and not _is_all_zero(leaf, path):
                errors.append(
                    f"{_path_str(path)}: non-zero recurrent_kernel has no place in the "
                    "target; dropping it changes the model's function (pass "
                    "allow_drop_nonzero=True to drop it anyway)")
        else:
            errors.append(f"{_path_str(path)}: in params but not in the target")
    if state_means is not None and not errors:
        _compensate_biases(out, new_kernels, state_means, errors)
    if errors:
        raise ValueError(
            f"params do not fit target {type(target).__name__}:\n  " + "\n  ".join(errors))
    result = traverse_util.unflatten_dict(out)
    return {"params": result} if wrapped else result


# The migration options (keyword-only parameters of migrate_params).
_MIGRATE_OPTIONS = tuple(
    name for name, p in inspect.signature(migrate_params).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _refuse_options(fn: str, init_kwargs: Mapping[str, Any], why: str) -> None:
    """``ValueError`` naming every migration option that reached ``fn``'s
    ``**init_kwargs`` (they would otherwise be passed to migrate_params)."""
    given = [name for name in init_kwargs if name in _MIGRATE_OPTIONS]
    if given:
        raise ValueError(f"{fn} does not take the migration option(s) {given}: {why}")


def _compensate_biases(out: Dict[Path, Any], new_kernels: List[Path],
                       state_means: Mapping[Path, Any], errors: List[str]) -> None:
    """``in_proj/bias <- bias - mean @ U`` for every new random ``U`` (in place)."""
    for path in new_kernels:
        layer = tuple(path[:-1])
        bias_path = layer + ("in_proj", "bias")
        if layer not in state_means:
            errors.append(f"{_path_str(path)}: no state mean for layer {_path_str(layer)} "
                          "(state_means)")
            continue
        if bias_path not in out:
            errors.append(f"{_path_str(path)}: bias compensation needs "
                          f"{_path_str(bias_path)} (a layer with use_bias=True)")
            continue
        u = jnp.asarray(out[path], jnp.float32)
        mean = jnp.asarray(state_means[layer], jnp.float32)
        if mean.shape != (u.shape[0],):
            errors.append(f"{_path_str(path)}: state mean has shape {tuple(mean.shape)}, "
                          f"expected ({u.shape[0]},)")
            continue
        bias = out[bias_path]
        shift = jnp.matmul(mean, u, precision=jax.lax.Precision.HIGHEST)
        out[bias_path] = (jnp.asarray(bias, jnp.float32) - shift).astype(jnp.asarray(bias).dtype)


def _clone_mode(model: nn.Module, use_true_recurrence: bool, fn: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
    if not any(f.name == "use_true_recurrence" for f in dataclasses.fields(model)):
        raise TypeError(
            f"{fn} needs a model with a use_true_recurrence field; "
            f"{type(model).__name__} has none.  Build the target yourself (e.g. a "
            "Stack of layers with use_true_recurrence set) and call migrate_params")
    return model.clone(use_true_recurrence=use_true_recurrence)


def to_true_recurrence(params: Params, model: nn.Module, *init_args, **init_kwargs) -> Params:
    """Associative-mode params -> true-recurrence params (zero ``recurrent_kernel``).

    ``migrate_params(params, model.clone(use_true_recurrence=True), ...)``.
    Only for modules with a ``use_true_recurrence`` field (the layers); for a
    :class:`~flax_minrnn.nn.wrappers.Stack` or your own model, construct the
    true-recurrence target and call :func:`migrate_params`.

    Args:
      params: the model's parameters (inner dict recommended).
      model: the associative-mode module.
      *init_args, **init_kwargs: example arguments of ``model.init``
        (checked as by :func:`migrate_params`).

    Returns:
      Parameters of ``model.clone(use_true_recurrence=True)``, computing the
      same function as ``params`` did.

    Raises:
      ValueError: a migration option of :func:`migrate_params`
        (``recurrent_init``, ``rng``, ...) in ``init_kwargs``, naming it: this
        function always starts ``U`` at zero; call :func:`migrate_params`
        for another start.  And the errors of :func:`migrate_params`.
      TypeError: ``model`` has no ``use_true_recurrence`` field, or an
        unknown keyword (see :func:`migrate_params`).
    """
    _refuse_options("to_true_recurrence", init_kwargs,
                    "it always starts recurrent_kernel at zero (the same function); for "
                    "another start call migrate_params(params, "
                    "model.clone(use_true_recurrence=True), *init_args, ...) with them")
    target = _clone_mode(model, True, "to_true_recurrence")
    return migrate_params(params, target, *init_args, **init_kwargs)


def to_associative(params: Params, model: nn.Module, *init_args,
                   allow_drop_nonzero: bool = False, **init_kwargs) -> Params:
    """True-recurrence params -> associative-mode params (drops ``recurrent_kernel``).

    Raises ``ValueError`` if a ``recurrent_kernel`` is non-zero (the
    associative mode cannot represent it) unless ``allow_drop_nonzero=True``.
    Same restrictions as :func:`to_true_recurrence`.

    Args:
      params: the true-recurrence model's parameters (inner dict recommended).
      model: the module (its ``use_true_recurrence`` is replaced by False).
      *init_args, **init_kwargs: example arguments of ``model.init``.
      allow_drop_nonzero: drop non-zero recurrent kernels instead of raising
        (the function then changes).

    Returns:
      Parameters of ``model.clone(use_true_recurrence=False)``: the same
      function as ``params`` when every ``recurrent_kernel`` is zero.

    Raises:
      ValueError: a non-zero ``recurrent_kernel`` (see above), or a
        migration option of :func:`migrate_params` other than
        ``allow_drop_nonzero`` in ``init_kwargs``, naming it (they concern new
        recurrent kernels, which the associative mode has none of).  And the
        errors of :func:`migrate_params`.
      TypeError: ``model`` has no ``use_true_recurrence`` field, or an
        unknown keyword (see :func:`migrate_params`).
    """
    _refuse_options("to_associative", init_kwargs,
                    "the associative mode has no recurrent_kernel to initialise "
                    "(allow_drop_nonzero is its only option)")
    target = _clone_mode(model, False, "to_associative")
    return migrate_params(params, target, *init_args,
                          allow_drop_nonzero=allow_drop_nonzero, **init_kwargs)


