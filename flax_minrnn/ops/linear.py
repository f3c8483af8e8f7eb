"""Linear maps with a hand-written transpose that compose with every JAX transformation.

The scan's derivatives in this package are written by hand where autodiff
would be slow (the adjoint of a recurrence is the reverse recurrence), but a
``jax.custom_vjp`` blocks forward mode (``jvp``, ``linearize``,
Hessian-vector products).  Instead every fast path here is a
``jax.custom_jvp`` whose tangent is a call of :func:`linear_op`:

* ``fun(residuals, x)`` is linear in ``x`` (the tangents);
* ``transpose(residuals, ct)`` is its transpose, linear in ``ct``.

:func:`linear_op` binds a primitive whose rules are:

* evaluation and lowering: ``fun`` (plain JAX, so ``jax.export`` works and no
  custom call is emitted);
* transpose (reverse mode, ``grad``): a :func:`linear_op` of ``transpose``,
  whose own transpose is ``fun`` again;
* JVP: ``fun`` on the tangents of ``x`` (the map is linear), plus the
  derivative with respect to the residuals by ``jax.jvp`` of ``fun`` (second
  derivatives: Hessian-vector products, ``grad`` of ``grad``);
* batching (``vmap``): both functions vmapped.

This is ``jax.custom_derivatives.linear_call`` with the two rules it lacks
(``vmap``, and derivatives with respect to the residuals).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir

from flax_minrnn.ops import checks

__all__ = ["linear_op", "matmul", "SecondOrderError", "refuse_export"]


class SecondOrderError(NotImplementedError):
    """Raised when an implementation without second derivatives is differentiated twice."""


class _Spec:
    """The two functions of a :func:`linear_op` call and their pytree layout.

    Compared by identity: every call site builds its own.
    """

    __slots__ = ("fun", "transpose", "res_tree", "lin_tree", "out_tree", "n_res",
                 "no_second_order", "in_avals", "jaxpr")

    def __init__(self, fun, transpose, res_tree, lin_tree, n_res, no_second_order):
        self.fun, self.transpose = fun, transpose
        self.res_tree, self.lin_tree, self.out_tree = res_tree, lin_tree, None
        self.n_res = n_res
        self.no_second_order = no_second_order
        self.in_avals = self.jaxpr = None

    def call(self, flat):
        res = jax.tree.unflatten(self.res_tree, flat[:self.n_res])
        lin = jax.tree.unflatten(self.lin_tree, flat[self.n_res:])
        out = self.fun(res, lin)
        leaves, tree = jax.tree.flatten(out)
        if self.out_tree is None:
            self.out_tree = tree
        elif tree != self.out_tree:
            raise TypeError(f"linear_op: fun returned {tree}, expected {self.out_tree}")
        return leaves

    def trace(self, avals):
        """The closed jaxpr of ``fun`` on ``avals``, traced once per distinct
        ``avals`` that this call site binds with (``fun`` is a whole tile
        loop: tracing it costs more than the rest of a layer); abstract
        evaluation and lowering both read it."""
        avals = tuple(avals)
        if avals != self.in_avals:
            # Traced on the avals themselves, so sharding-in-types annotations
            # (the varying axes inside shard_map) carry over to the outputs.
            self.jaxpr = jax.make_jaxpr(lambda *f: self.call(list(f)))(*avals)
            self.in_avals = avals
        return self.jaxpr


_linear_p = jcore.Primitive("flax_minrnn_linear")
_linear_p.multiple_results = True


def linear_op(fun: Callable[[Any, Any], Any], transpose: Callable[[Any, Any], Any],
              residuals: Any, x: Any, *, no_second_order: Optional[str] = None) -> Any:
    """``fun(residuals, x)``, a map linear in ``x`` whose transpose is ``transpose``.

    Args:
      fun: ``(residuals, x) -> y``, linear in ``x`` (pytrees of arrays).
      transpose: ``(residuals, ct) -> ct_x``, linear in ``ct`` (a pytree like
        ``y``), returning a pytree like ``x``.
      residuals: arrays the map depends on non-linearly (a pytree).
      x: the linear argument (a pytree of arrays).
      no_second_order: ``None``, or the message of the
        :class:`SecondOrderError` raised when the map is differentiated with
        respect to ``residuals`` (for functions that are not differentiable,
        compiled kernels say).

    Returns:
      ``fun(residuals, x)``.
    """
    # Inside shard_map, an operand replicated over a mesh axis (a weight) and
    # one split over it (the batch) must vary alike; the cast's transpose sums
    # the replicated operand's cotangent over that axis.
    residuals, x = checks.same_varying(residuals, x)
    res_flat, res_tree = jax.tree.flatten(residuals)
    lin_flat, lin_tree = jax.tree.flatten(x)
    spec = _Spec(fun, transpose, res_tree, lin_tree, len(res_flat), no_second_order)
    spec.trace([jax.typeof(v) for v in res_flat + lin_flat])  # sets spec.out_tree
    out = _linear_p.bind(*res_flat, *lin_flat, spec=spec)
    return jax.tree.unflatten(spec.out_tree, out)


def _impl(*flat, spec):
    return spec.call(list(flat))


def _abstract_eval(*avals, spec):
    return spec.trace(avals).out_avals


def _lower(ctx, *args, spec):
    return mlir.lower_fun(jcore.jaxpr_as_fun(spec.trace(ctx.avals_in)),
                          multiple_results=True)(ctx, *args)


def _jvp(primals, tangents, *, spec):
    n = spec.n_res
    res, lin = list(primals[:n]), list(primals[n:])
    out = _linear_p.bind(*primals, spec=spec)
    d_lin = [ad.instantiate_zeros(t) for t in tangents[n:]]
    d_out = _linear_p.bind(*res, *d_lin, spec=spec)
    moving = [i for i, t in enumerate(tangents[:n]) if type(t) is not ad.Zero]
    if moving:
        if spec.no_second_order:
            raise SecondOrderError(spec.no_second_order)

        def of_residuals(*changing):
            full = list(res)
            for i, value in zip(moving, changing):
                full[i] = value
            return spec.call(full + lin)

        _, extra = jax.jvp(of_residuals, [res[i] for i in moving],
                           [tangents[i] for i in moving])
        d_out = [a + b for a, b in zip(d_out, extra)]
    return out, d_out


def _transpose(cts, *args, spec):
    n = spec.n_res
    res, lin = args[:n], args[n:]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError("linear_op is not linear in its residuals")
    cts = [ad.instantiate_zeros(c) for c in cts]
    ct_x = linear_op(spec.transpose, spec.fun, jax.tree.unflatten(spec.res_tree, list(res)),
                     jax.tree.unflatten(spec.out_tree, cts),
                     no_second_order=spec.no_second_order)
    ct_flat = jax.tree.leaves(ct_x)
    return [None] * n + [c if ad.is_undefined_primal(l) else None for c, l in zip(ct_flat, lin)]


def _batch(args, dims, *, spec):
    n = spec.n_res
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = list(args)
    res_axes = list(dims[:n])
    # Every linear argument gets the batch axis first (an unbatched one is
    # broadcast: its transpose then sums over the batch, outside this call).
    for i in range(n, len(args)):
        if dims[i] is None:
            args[i] = jnp.broadcast_to(args[i], (size,) + args[i].shape)
        else:
            args[i] = jnp.moveaxis(args[i], dims[i], 0)
    axes = jax.tree.unflatten(spec.res_tree, res_axes)
    out = linear_op(jax.vmap(spec.fun, in_axes=(axes, 0)),
                    jax.vmap(spec.transpose, in_axes=(axes, 0)),
                    jax.tree.unflatten(spec.res_tree, args[:n]),
                    jax.tree.unflatten(spec.lin_tree, args[n:]),
                    no_second_order=spec.no_second_order)
    leaves = jax.tree.leaves(out)
    return leaves, [0] * len(leaves)


_linear_p.def_impl(_impl)
_linear_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_linear_p, _lower)
ad.primitive_jvps[_linear_p] = _jvp
ad.primitive_transposes[_linear_p] = _transpose
batching.primitive_batchers[_linear_p] = _batch


# ----------------------------------------------------------------------------
# The projection ``x @ w``.


def _times_w(w, dx):
    return jnp.einsum("...i,io->...o", dx, w)


def _times_w_t(w, g):
    return jnp.einsum("...o,io->...i", g, w)


def _x_times(x, dw):
    return jnp.einsum("...i,io->...o", x, dw)


def _x_t_times(x, g):
    # x^T g summed over every leading axis (float32 accumulation for 16-bit
    # inputs): the kernel gradient, in the form XLA:CPU runs at the speed of
    # the forward product (autodiff's form is a transpose copy and a slower
    # GEMM).
    accum = checks.accum_dtype(x.dtype)
    out = jnp.einsum("...i,...o->io", x, g, preferred_element_type=accum)
    return out.astype(x.dtype)


@jax.custom_jvp
def _matmul(x, w):
    return jnp.einsum("...i,io->...o", x, w)


def _matmul_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _matmul(x, w)
    dy = None
    if type(dx) is not jax.custom_derivatives.SymbolicZero:
        dy = linear_op(_times_w, _times_w_t, w, dx)
    if type(dw) is not jax.custom_derivatives.SymbolicZero:
        term = linear_op(_x_times, _x_t_times, x, dw)
        dy = term if dy is None else dy + term
    return y, jnp.zeros_like(y) if dy is None else dy


_matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x``: ``(..., i) x (i, o) -> (..., o)``.

    The same function as ``jnp.einsum('...i,io->...o', x, w)`` (both cast to
    their promoted dtype); its derivatives are :func:`linear_op` calls, so
    the kernel gradient ``x^T g`` is one product in the form XLA:CPU runs
    fastest, and every transformation (``jvp``, ``vmap``, second
    derivatives, ``jax.export``) works.
    """
    dtype = jnp.result_type(x, w)
    return _matmul(x.astype(dtype), w.astype(dtype))


# ----------------------------------------------------------------------------
# Backends that jax.export cannot serialise.


_refuse_export_p = jcore.Primitive("flax_minrnn_refuse_export")
_refuse_export_p.def_impl(lambda x, *, message: x)
_refuse_export_p.def_abstract_eval(lambda x, *, message: x)
ad.deflinear2(_refuse_export_p, lambda ct, x, *, message: [ct])
batching.primitive_batchers[_refuse_export_p] = (
    lambda args, dims, *, message: (_refuse_export_p.bind(*args, message=message), dims[0]))


def _refuse_export_lowering(ctx, x, *, message):
    if ctx.module_context.lowering_parameters.for_export:
        raise ValueError(message)
    return [x]


mlir.register_lowering(_refuse_export_p, _refuse_export_lowering)


def refuse_export(x: jax.Array, message: str) -> jax.Array:
    """``x`` itself, except that lowering it for :mod:`jax.export` raises
    ``ValueError(message)``: placed in front of a kernel that cannot be
    serialised, so the error names the way out instead of a custom-call
    target."""
    return _refuse_export_p.bind(x, message=message)
