"""Input validation shared by the package: every check that more than one
module makes, and the helpers (ints, numbers, dtypes, choices, shapes,
carries) that the modules' own checks are built from.

The public entry points (the scan, the layers, the models, the trainer's
configs) validate their arguments with these helpers, so a bad input gets the
same kind of error everywhere: a ``TypeError`` or ``ValueError`` that names
the argument, says what was expected and what was given.  Checks of values
(ranges of lengths and ids) run when the value is known at trace time; under
``jax.jit`` they cannot, and the documented clamp of each caller applies
(see :func:`check_seq_lengths` for a run-time check).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from jax.experimental import checkify

Array = jax.Array


def accum_dtype(*dtypes) -> jnp.dtype:
    """float64 if any input is float64, else float32 (bf16/f16 accumulate in f32)."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def check_float(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {x.dtype}")


def concrete_or_none(x) -> Optional[np.ndarray]:
    """The value of ``x`` if it is known at trace time, else ``None``."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError):
        return None


def check_real_outputs(name: str, *outputs) -> None:
    """``outputs`` (``ShapeDtypeStruct``s of a user function's results) must
    be real (float or integer): a complex value would lose its imaginary part
    in the float state."""
    for out in outputs:
        if not (jnp.issubdtype(out.dtype, jnp.floating) or jnp.issubdtype(out.dtype, jnp.integer)):
            raise TypeError(f"{name} must return real (float or integer) arrays, got dtype "
                            f"{out.dtype}")


def lengths_to_mask(seq_lengths: Array, seq_len: int) -> Array:
    """Boolean ``(batch, seq_len)`` mask, True at steps ``t < seq_lengths``."""
    # At least 32 bits: a narrower step counter would wrap (uint8 past 255).
    dtype = seq_lengths.dtype if np.iinfo(seq_lengths.dtype).bits >= 32 else jnp.int32
    return jnp.arange(seq_len, dtype=dtype)[None, :] < seq_lengths.astype(dtype)[:, None]


_runtime = threading.local()


@contextlib.contextmanager
def runtime_checks(enabled: bool = True):
    """Adds run-time checks of traced values (``seq_lengths``) while tracing.

    Under ``jax.jit`` the values of ``seq_lengths`` are unknown at trace
    time, so :func:`check_seq_lengths` cannot reject them there; without this
    context they are clamped (a length above ``T`` acts as ``T``, a negative
    one as ``0``).  Trace inside this context and wrap the function with
    :func:`jax.experimental.checkify.checkify` to have them checked when the
    function runs::

        from jax.experimental import checkify
        with fm.runtime_checks():
            checked = jax.jit(checkify.checkify(f, errors=checkify.user_checks))
            err, out = checked(params, x, lengths)   # traced here
        err.throw()          # ValueError naming seq_lengths, if out of range

    (A function traced in this context must be checkified: JAX refuses to
    stage a check that is not.)

    Args:
      enabled: turn the run-time checks on (default) or, inside an enclosing
        ``runtime_checks()``, off for this block.

    Yields:
      Nothing; the previous setting is restored on exit.
    """
    check_bool("enabled", enabled)
    previous = getattr(_runtime, "enabled", False)
    _runtime.enabled = enabled
    try:
        yield
    finally:
        _runtime.enabled = previous


def check_seq_lengths(seq_lengths, batch: int, seq_len: int,
                      name: str = "seq_lengths") -> Array:
    """Validates ``seq_lengths`` (called ``name`` in errors): integer, shape
    ``(batch,)``, values in ``[0, T]``.

    The values are checked when they are known at trace time.  Traced values
    (under ``jax.jit``) are clamped where they are used: above ``T`` acts as
    ``T`` and negative as ``0``; see :func:`runtime_checks` for a check when
    the function runs.
    """
    if not hasattr(seq_lengths, "shape"):
        seq_lengths = np.asarray(seq_lengths)
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array, got dtype {seq_lengths.dtype}")
    if tuple(seq_lengths.shape) != (batch,):
        raise ValueError(
            f"{name} must have shape (batch,) = ({batch},), "
            f"got {tuple(seq_lengths.shape)}")
    value = concrete_or_none(seq_lengths)
    if value is not None and value.size and (value.min() < 0 or value.max() > seq_len):
        raise ValueError(
            f"{name} must lie in [0, {seq_len}] (the time axis length), "
            f"got values in [{value.min()}, {value.max()}]")
    seq_lengths = jnp.asarray(seq_lengths)
    if value is None and getattr(_runtime, "enabled", False) and batch:
        checkify.check(jnp.all((seq_lengths >= 0) & (seq_lengths <= seq_len)),
                       f"{name} must lie in [0, {seq_len}] (the time axis length), "
                       "got values in [{}, {}]", jnp.min(seq_lengths), jnp.max(seq_lengths))
    return seq_lengths


def check_state(name: str, state, shape) -> Optional[Array]:
    """``None``, or a floating array of exactly ``shape`` (an initial state)."""
    if state is None:
        return None
    check_float(name, state)
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape (batch, *features) = {tuple(shape)}, "
                         f"got {tuple(state.shape)}")
    return state


def check_bool_bt(name: str, x, batch: int, seq_len: int) -> Array:
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if tuple(x.shape) != (batch, seq_len):
        raise ValueError(
            f"{name} must have shape (batch, time) = ({batch}, {seq_len}), "
            f"got {tuple(x.shape)}")
    if x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {x.dtype}")
    return jnp.asarray(x)



def check_input(x: Array, name: str = "x") -> None:
    """x must be a floating ``(batch, time, features)`` array."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(
            f"{name} must have shape (batch, time, features), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {x.dtype} "
            "(token ids need an embedding first)")


def state_dtype(*dtypes) -> jnp.dtype:
    """The carry dtype: float32, or float64 when the computation is float64."""
    return accum_dtype(*dtypes)


def check_carry(carry, batch: int, d_h: int, dtype) -> Array:
    """Returns a zero state for ``None``; validates shape and dtype otherwise."""
    if carry is None:
        return jnp.zeros((batch, d_h), dtype)
    if not hasattr(carry, "shape") or not hasattr(carry, "dtype"):
        raise TypeError(f"carry must be an array, got {type(carry).__name__}")
    if tuple(carry.shape) != (batch, d_h):
        raise ValueError(
            f"carry must have shape (batch, d_h) = ({batch}, {d_h}), "
            f"got {tuple(carry.shape)}")
    if carry.dtype != dtype:
        raise TypeError(
            f"carry must have dtype {jnp.dtype(dtype).name} (the state dtype for these "
            f"inputs; initialize_carry(x.shape, x.dtype) makes one), got {carry.dtype}")
    return carry


def valid_mask(batch: int, seq_len: int, seq_lengths, mask) -> Optional[Array]:
    """The ``(batch, time)`` mask of valid steps (``None`` = all valid)."""
    if mask is not None and seq_lengths is not None:
        raise ValueError("pass either mask or seq_lengths, not both")
    if seq_lengths is not None:
        lengths = check_seq_lengths(seq_lengths, batch, seq_len)
        return lengths_to_mask(lengths, seq_len)
    if mask is not None:
        return check_bool_bt("mask", mask, batch, seq_len)
    return None


def check_float_dtype(name: str, value, *, optional: bool = False):
    """``value`` must name a floating-point dtype (or be ``None`` when
    ``optional``); ``TypeError`` naming ``name`` otherwise.

    Returns the dtype as a ``numpy.dtype`` (``None`` for ``None``), one
    spelling for ``'float32'``, ``jnp.float32`` and ``np.float32``.
    """
    if value is None and optional:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        allowed = "a floating-point dtype" + (" or None" if optional else "")
        given = dtype.name if dtype is not None else repr(value)
        raise TypeError(f"{name} must be {allowed} (float32, bfloat16, ...), got {given}")
    return dtype


def check_param_width(module, x: Array, name: str) -> None:
    """When ``module`` has parameters, ``x``'s last axis must be the input
    width of its parameter ``name`` (a layer's ``kernel`` or a vector)."""
    params = module.variables.get("params", {})
    if name in params:
        param = params[name]
        expected = (param["kernel"] if isinstance(param, Mapping) else param).shape[0]
        if x.shape[-1] != expected:
            raise ValueError(f"x has {x.shape[-1]} features but this layer's parameters "
                             f"({name}) expect {expected}")



def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_int_at_least(name: str, value, low) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_rate(name: str, value) -> None:
    """A dropout rate: a finite number in ``[0, 1)``."""
    check_real(name, value, low=0.0, high=1.0, low_closed=True)


def check_carry_leaves(carry, ref, batch: int) -> None:
    """Every leaf of ``carry`` must have the shape and dtype of ``ref``'s (a
    fresh carry of the same structure): ``ValueError`` / ``TypeError`` naming
    the leaf (``carry.blocks[0].rg_lru``), never a silent cast."""
    got = {jax.tree_util.keystr(path): leaf for path, leaf in
           jax.tree_util.tree_flatten_with_path(carry, is_leaf=lambda v: v is None)[0]}
    for path, want in jax.tree_util.tree_flatten_with_path(ref)[0]:
        key = jax.tree_util.keystr(path)
        name = "carry" + key
        if key not in got:
            raise ValueError(f"{name} is missing (see initialize_carry)")
        leaf = got.pop(key)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(leaf).__name__}")
        if tuple(leaf.shape) != tuple(want.shape):
            raise ValueError(f"{name} has shape {tuple(leaf.shape)}, expected "
                             f"{tuple(want.shape)} (batch {batch}; see initialize_carry)")
        if leaf.dtype != want.dtype:
            raise TypeError(f"{name} has dtype {leaf.dtype}, expected {want.dtype} "
                            "(see initialize_carry)")
    if got:
        raise ValueError(f"carry has leaves a fresh carry does not have: "
                         f"{['carry' + k for k in got]} (see initialize_carry)")


def check_int_array(name: str, x, what: str) -> None:
    """``x`` must be an array of integers (``what`` they hold, for the error)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an integer array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array ({what}), got dtype {x.dtype}")


def check_tokens(tokens, vocab_size: int, name: str = "tokens",
                 seq_lengths=None, valid=None) -> None:
    """Integer ``(batch, time)`` ids; values checked against ``vocab_size`` when concrete.

    With ``seq_lengths`` (right padding) or a bool ``(batch, time)`` ``valid``
    mask only the valid steps are checked: padding may hold any id (the
    models ignore it).
    """
    check_int_array(name, tokens, "token ids")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, time), got {tuple(tokens.shape)}")
    if tokens.shape[1] < 1:
        raise ValueError(f"{name} must have at least one step")
    value = concrete_or_none(tokens)
    if seq_lengths is not None:
        lengths = concrete_or_none(check_seq_lengths(seq_lengths, *tokens.shape))
        mask = (None if lengths is None
                else np.arange(tokens.shape[1])[None, :] < lengths[:, None])
    else:
        mask = None if valid is None else concrete_or_none(valid)
    if value is not None and mask is not None:
        value = value[np.asarray(mask, bool)]
    elif seq_lengths is not None or valid is not None:
        value = None  # padding unknown at trace time: nothing to check reliably
    if value is not None and value.size and (value.min() < 0 or value.max() >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, vocab_size={vocab_size}), got values in "
            f"[{value.min()}, {value.max()}]")


def check_real(name: str, value, *, low: Optional[float] = None,
               high: Optional[float] = None, low_closed: bool = False,
               high_closed: bool = False) -> None:
    """``value`` must be a finite real number (an int or float, not a bool,
    not a string) in the given range; ``ValueError`` naming ``name`` otherwise.

    ``low`` / ``high`` bound the range (``None``: unbounded), open unless
    ``low_closed`` / ``high_closed``.
    """
    if low is not None and high is not None:
        allowed = (f" in {'[' if low_closed else '('}{low:g}, "
                   f"{high:g}{']' if high_closed else ')'}")
    elif low is not None:
        allowed = f" {'>=' if low_closed else '>'} {low:g}"
    elif high is not None:
        allowed = f" {'<=' if high_closed else '<'} {high:g}"
    else:
        allowed = ""
    ok = (not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real)
          and math.isfinite(value))
    if ok and low is not None:
        ok = value >= low if low_closed else value > low
    if ok and high is not None:
        ok = value <= high if high_closed else value < high
    if not ok:
        raise ValueError(f"{name} must be a finite number{allowed}, got {value!r}")


def check_positive_number(name: str, value) -> None:
    """``value`` must be a real number (not a bool or a string) ``> 0``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")



def unwrap_params(params, name: str = "params") -> Tuple[Dict, bool]:
    """Returns ``(inner_dict, was_wrapped)``; validates the container."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict of parameters, got {type(params).__name__}")
    params = unfreeze(params) if not isinstance(params, dict) else params
    if "params" in params:
        if len(params) != 1:
            others = sorted(k for k in params if k != "params")
            raise ValueError(
                f"{name} looks like a variables dict with collections {others} "
                "besides 'params'; pass variables['params'] (the inner dict) and "
                "keep the other collections yourself")
        inner = params["params"]
        if not isinstance(inner, Mapping):
            raise TypeError(f"{name}['params'] must be a dict, got {type(inner).__name__}")
        return unfreeze(inner) if not isinstance(inner, dict) else inner, True
    return params, False



def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over (inside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def same_varying(*trees):
    """The trees with every leaf varying over the same manual mesh axes.

    Inside ``shard_map`` a loop's carry must keep its type, so an operand
    replicated over a manual axis (a parameter) and one split over it (the
    batch) are first cast to vary over the same axes (``jax.lax.pcast``,
    whose transpose sums the cotangents over them).  Outside ``shard_map``
    the trees are returned unchanged.
    """
    leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
    axes = frozenset().union(*(varying_axes(leaf) for leaf in leaves))
    if not axes:
        return trees

    def cast(leaf):
        missing = tuple(sorted(axes - varying_axes(leaf)))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return tuple(jax.tree.map(cast, tree) for tree in trees)


def shape_like(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """A ``ShapeDtypeStruct`` that varies over the same manual mesh axes as
    ``like``, for kernels (``pallas_call``) that declare their outputs.

    Inside ``shard_map`` with ``check_vma`` an output type must say how it
    varies across the mesh; outside it this is a plain ``ShapeDtypeStruct``.
    """
    aval = jax.typeof(like)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    vma = getattr(aval, "vma", None)
    if vma:
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    return jax.ShapeDtypeStruct(shape, dtype)
