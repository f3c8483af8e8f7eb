"""The gate equations of every recurrent layer, written once.

Each function maps float32 pre-activations to the coefficients ``(a, b)`` of
``h_t = a_t * h_{t-1} + b_t`` (or, for the readouts, states to outputs).  The
layers of :mod:`flax_minrnn.nn.recurrent` and :mod:`flax_minrnn.nn.rglru`
call them, and the compiled CPU kernels of
:mod:`flax_minrnn.backends.native` are tested against them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["Gates", "g_activation", "sigmoid_pair", "normalized_gates", "mingru_gates",
           "minlstm_gates", "glrnn_gates", "glrnn_readout", "rglru_gates",
           "sqrt_bounded_derivative", "MAX_SQRT_GRADIENT"]


def g_activation(x: Array) -> Array:
    """The minGRU paper's positive candidate activation (appendix).

    ``g(x) = x + 0.5`` for ``x >= 0`` and ``sigmoid(x)`` otherwise: continuous,
    strictly positive, so states started from ``h0 >= 0`` stay positive (the
    domain of the paper's log-space scan, which ``tests/reference.py`` keeps
    as a reference).  Elementwise: the result has ``x``'s shape and dtype.
    """
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


# Registered so that jax.export can serialize functions that take or return it.
@functools.partial(jax.export.register_namedtuple_serialization,
                   serialized_name="flax_minrnn.Gates")
class Gates(NamedTuple):
    """What a layer's gate function returns (float32, ``(..., d_h)``)."""

    a: Array  # decay coefficient of h_{t-1}
    b: Array  # input added to the state


def _split(pre: Array, n: int) -> Sequence[Array]:
    return jnp.split(pre, n, axis=-1)


@jax.custom_jvp
def sigmoid_pair(k: Array) -> Tuple[Array, Array]:
    """``(sigmoid(k), sigmoid(-k))`` from one ``exp``, each exact to rounding.

    With ``m = -|k|`` and ``e = exp(m)`` in ``(0, 1]``, the two values are
    ``1 / (1 + e)`` and ``e / (1 + e)``: no ``1 - sigmoid`` cancellation (the
    retention ``sigmoid(-k)`` stays exact near 1, where memory lives) and no
    overflow.  The derivative is ``sigmoid(k) * sigmoid(-k)`` (and its
    negative), the product of the two exact values: exact too, ``1/4`` at
    ``k = 0``, and a shorter backward graph than autodiff of the selects.
    """
    pos = k >= 0
    e = jnp.exp(jnp.where(pos, -k, k))
    big = 1.0 / (1.0 + e)
    small = e * big
    return jnp.where(pos, big, small), jnp.where(pos, small, big)


@sigmoid_pair.defjvp
def _sigmoid_pair_jvp(primals, tangents):
    (k,), (dk,) = primals, tangents
    z, one_minus_z = sigmoid_pair(k)
    slope = z * one_minus_z
    return (z, one_minus_z), (slope * dk, -slope * dk)


def _normalized_terms(k_f: Array, k_i: Array) -> Tuple[Array, Array, Array, Array]:
    """``(f_n, i_n, u r, v r)`` of :func:`normalized_gates` (``u``, ``v`` and
    ``r`` scaled by ``exp(-m)`` and ``exp(m)``, ``m = max(0, -k_f, -k_i)``)."""
    m = jnp.maximum(0.0, jnp.maximum(-k_f, -k_i))
    e0, u, v = jnp.exp(-m), jnp.exp(-k_f - m), jnp.exp(-k_i - m)
    r = 1.0 / (2.0 * e0 + u + v)
    return (e0 + v) * r, (e0 + u) * r, u * r, v * r


@jax.custom_jvp
def normalized_gates(k_f: Array, k_i: Array) -> Tuple[Array, Array]:
    """minLSTM's ``(f / (f + i), i / (f + i))`` for ``f = sigmoid(k_f)``, ``i = sigmoid(k_i)``.

    With ``u = exp(-k_f)`` and ``v = exp(-k_i)``, ``f = 1 / (1 + u)`` and
    ``i = 1 / (1 + v)``, so exactly::

        f / (f + i) = (1 + v) / (2 + u + v),    i / (f + i) = (1 + u) / (2 + u + v)

    Numerator and denominator are scaled by ``exp(-m)`` with
    ``m = max(0, -k_f, -k_i)``, so every ``exp`` has a non-positive argument
    (no overflow) and one of ``exp(-m)``, ``u exp(-m)``, ``v exp(-m)`` is 1
    (the denominator is in ``[1, 4]``): three ``exp`` and one reciprocal, no
    cancellation, exact to rounding for every finite input, both logits
    hugely negative included (where the ratio depends on ``k_f - k_i``).

    The derivative is written out, as a sum of products of these exact terms
    (``r = 1 / (2 + u + v)``, both scaled alike, so ``u r`` and ``v r`` do not
    depend on ``m``)::

        d f_n = f_n (u r) dk_f - i_n (v r) dk_i,    d i_n = -d f_n

    which equals ``f_n i_n (sigmoid(-k_f) dk_f - sigmoid(-k_i) dk_i)``;
    autodiff of the expression above instead subtracts nearly equal terms
    where ``f_n`` is tiny.
    """
    return _normalized_terms(k_f, k_i)[:2]


@normalized_gates.defjvp
def _normalized_gates_jvp(primals, tangents):
    (k_f, k_i), (dk_f, dk_i) = primals, tangents
    f_n, i_n, ur, vr = _normalized_terms(k_f, k_i)
    d = f_n * ur * dk_f - i_n * vr * dk_i
    return (f_n, i_n), (d, -d)


def mingru_gates(pre: Array, candidate_activation: Optional[Callable] = None) -> Gates:
    """minGRU: ``pre = [k, h~]``; ``a = 1 - sigmoid(k)``, ``b = sigmoid(k) * cand(h~)``."""
    k, h_pre = _split(pre, 2)
    cand = h_pre if candidate_activation is None else candidate_activation(h_pre)
    z, one_minus_z = sigmoid_pair(k)
    return Gates(a=one_minus_z, b=z * cand)


def minlstm_gates(pre: Array, candidate_activation: Optional[Callable] = None,
                  normalize: bool = True) -> Gates:
    """minLSTM: ``pre = [k_f, k_i, h~]``; normalised (or raw) forget and input gates."""
    k_f, k_i, h_pre = _split(pre, 3)
    cand = h_pre if candidate_activation is None else candidate_activation(h_pre)
    if normalize:
        f_n, i_n = normalized_gates(k_f, k_i)
        return Gates(a=f_n, b=i_n * cand)
    return Gates(a=jax.nn.sigmoid(k_f), b=jax.nn.sigmoid(k_i) * cand)


def glrnn_gates(pre: Array, input_activation: Callable, gate_activation: Callable,
                tied: bool) -> Gates:
    """``pre`` = [candidate, input gate] (tied) or [candidate, input, forget]."""
    # jnp.split, not slicing: its cotangent is one concatenation (a slice's
    # is a padded sum that evaluates every branch for every element).
    if tied:
        c_pre, i_pre = _split(pre, 2)
        i = gate_activation(i_pre)
        f = 1.0 - i
    else:
        c_pre, i_pre, f_pre = _split(pre, 3)
        i, f = gate_activation(i_pre), gate_activation(f_pre)
    return Gates(a=f, b=i * input_activation(c_pre))



# The derivative of sqrt is clipped at this value (as in both reference
# implementations): d sqrt(x)/dx = 1 / (2 sqrt(max(x, 1 / (4 * 1000^2)))).
MAX_SQRT_GRADIENT = 1000.0


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def sqrt_bounded_derivative(x: Array, max_gradient: float = MAX_SQRT_GRADIENT) -> Array:
    """``sqrt(x)`` whose derivative is clipped at ``max_gradient``.

    Forward: ``sqrt(x)``.  Derivative: ``1 / (2 sqrt(max(x, 1 / (4
    max_gradient^2))))``, i.e. exact for ``x >= 1 / (4 max_gradient^2)``
    (``2.5e-7`` for the default 1000) and ``max_gradient`` below, so
    ``sqrt(1 - a^2)`` keeps finite gradients when ``a`` rounds to 1.
    """
    del max_gradient
    return jnp.sqrt(x)


@sqrt_bounded_derivative.defjvp
def _sqrt_bounded_jvp(max_gradient, primals, tangents):
    (x,), (t,) = primals, tangents
    floor = 1.0 / (4.0 * float(max_gradient) ** 2)
    return jnp.sqrt(x), t * (0.5 * jax.lax.rsqrt(jnp.maximum(x, floor)))



def glrnn_readout(h: Array, o: Array, hidden_activation: Callable,
                  gate_activation: Callable) -> Array:
    """GatedLinearRNN's gated output ``hidden_activation(h) * gate_activation(o)``."""
    return hidden_activation(h) * gate_activation(o)


def rglru_gates(x: Array, gate_x: Array, gate_a: Array, lam: Array, c: float,
                max_sqrt_gradient: float, reset: Optional[Array] = None) -> Gates:
    """The RG-LRU's coefficients (all float32, ``(batch, time, width)``).

    ::

        i_t     = sigmoid(gate_x_t),    r_t = sigmoid(gate_a_t)
        log a_t = -c * softplus(Lambda) * r_t
        a_t     = exp(log a_t)
        b_t     = sqrt(1 - a_t^2) * (i_t * x_t)

    ``1 - a_t^2`` is ``-expm1(2 log a_t)`` (exact near ``a = 1``) and its
    square root has a derivative bounded by ``max_sqrt_gradient``.  At a
    ``reset`` step the multiplier ``sqrt(1 - a_t^2)`` is 1 (the caller's
    scan zeroes ``a`` there).
    """
    log_a = -c * jax.nn.softplus(lam)[None, None, :] * jax.nn.sigmoid(gate_a)
    a = jnp.exp(log_a)
    multiplier = sqrt_bounded_derivative(-jnp.expm1(2.0 * log_a), max_sqrt_gradient)
    if reset is not None:
        multiplier = jnp.where(reset[:, :, None], jnp.ones((), multiplier.dtype), multiplier)
    return Gates(a=a, b=jax.nn.sigmoid(gate_x) * x * multiplier)
