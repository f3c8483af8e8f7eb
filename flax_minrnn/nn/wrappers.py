"""Wrappers around the recurrent layers: a Flax RNN cell, bidirectional, stacks.

* :class:`RNNCell` adapts a layer to :class:`flax.linen.RNNCellBase`, so that
  ``nn.RNN(RNNCell(MinGRU(d_h=8)))`` and ``nn.Bidirectional`` work.
* :class:`Bidirectional` runs a forward and a backward layer (separate
  weights) over the whole sequence and merges their time-aligned outputs.
* :class:`Stack` chains layers, optionally with pre-norm, residual
  connections (per layer, projected where a layer changes the width) and
  dropout between layers.

All wrappers take the layers' call signature ``(x, carry=None, *,
seq_lengths=None, mask=None, reset=None) -> (carry, y)``; carries of wrappers
are tuples of the inner carries.

Every wrapper *clones* the modules it is given in ``setup``, so the parameters
live under names chosen here (not under the constructor's caller, even when a
layer is constructed inside another module's ``@nn.compact`` method):

* ``RNNCell``: ``{'rnn': <layer params>}``;
* ``Bidirectional``: ``{'fwd': ..., 'bwd': ...}``;
* ``Stack``: ``{'rnn_0': ..., 'rnn_1': ..., 'norms_0': ..., 'skip_proj_0': ...}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_minrnn.ops import checks

Array = jax.Array
Carry = Any

__all__ = ["RNNCell", "Bidirectional", "Stack"]

_LAYER_METHODS = ("initialize_carry", "state_size")


def _check_layer(name: str, layer) -> None:
    """``layer`` must be a module with the layers' carry API."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name} must be a flax.linen Module, got {type(layer).__name__}")
    for method in _LAYER_METHODS:
        if not callable(getattr(layer, method, None)):
            raise TypeError(
                f"{name} must be a flax_minrnn layer (a module with "
                f"{' and '.join(_LAYER_METHODS)}), got {type(layer).__name__} "
                f"without {method}()")


def _has_field(module: nn.Module, field: str) -> bool:
    return any(f.name == field for f in dataclasses.fields(module))


class RNNCell(nn.RNNCellBase):
    """A flax_minrnn layer as a one-step :class:`flax.linen.RNNCellBase`.

    One step runs the layer on a length-1 sequence::

        carry', y = layer(x[:, None], carry);   y = y[:, 0]

    so ``nn.RNN(RNNCell(layer))`` computes what ``layer`` computes on the whole
    sequence (one step at a time, as the true-recurrence mode does), and the
    cell composes with ``nn.RNN``'s ``seq_lengths`` and ``nn.Bidirectional``::

        rnn = nn.RNN(RNNCell(MinGRU(d_h=8)), return_carry=True)
        variables = rnn.init(key, x)            # x: (batch, time, d_in)
        carry, y = rnn.apply(variables, x)      # params: {'cell': {'rnn': ...}}

    Padding is handled by ``nn.RNN(..., seq_lengths=...)``: it keeps the carry
    of the last valid step but (unlike the layers) does not zero the outputs at
    padded steps, and for a row of length 0 it returns the carry after the
    whole padded row (Flax indexes step ``-1``), not the initial one.
    ``nn.RNN`` has no document resets (call the layer directly with
    ``reset=`` for those).  The layer's ``reverse`` field has no effect on
    a single step; use ``nn.RNN(..., reverse=True)``.  Prefer the layer itself
    for training: its parallel scan is much faster than stepping.

    Attributes:
      layer: a :class:`~flax_minrnn.MinGRU`, :class:`~flax_minrnn.MinLSTM` or
        :class:`~flax_minrnn.GatedLinearRNN` (or any module with the same
        ``__call__``/``initialize_carry`` API and an array carry).  It is
        cloned; its parameters live under ``'rnn'``.
    """

    layer: nn.Module

    def setup(self):
        _check_layer("layer", self.layer)
        self.rnn = self.layer.clone()

    def __call__(self, carry: Array, x: Array) -> Tuple[Array, Array]:
        """One step.

        Args:
          carry: the state ``(batch, d_h)``.
          x: the input of this step, float ``(batch, d_in)``.

        Returns:
          ``(carry', y)``: the new state ``(batch, d_h)`` and the output
          ``(batch, d_out)``.
        """
        if not hasattr(x, "ndim") or x.ndim != 2:
            raise ValueError(
                "RNNCell input x must have shape (batch, features) (one time "
                f"step), got {getattr(x, 'shape', type(x).__name__)}")
        carry, y = self.rnn(x[:, None], carry)
        return carry, y[:, 0]

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: Tuple[int, ...]) -> Array:
        """Zero state ``(batch, d_h)`` from the layer.

        ``RNNCellBase`` passes no input dtype, so the state dtype is the
        layer's for float32 inputs: float32, or float64 when the layer's
        ``dtype`` or ``param_dtype`` is.  A float64 input to a layer with
        neither set to float64 then fails the carry's dtype check.

        Args:
          rng: unused (the state starts at zero); kept for ``RNNCellBase``.
          input_shape: ``(batch, d_in)``, the shape of one step's input.
        """
        del rng
        _check_layer("layer", self.layer)
        if len(input_shape) != 2:
            raise ValueError(
                f"input_shape must be (batch, features), got {tuple(input_shape)}")
        return self.layer.initialize_carry(tuple(input_shape))

    @property
    def num_feature_axes(self) -> int:
        """One feature axis: inputs are ``(batch, time, features)``."""
        return 1


def _split_carry(carry, n: int, what: str) -> Tuple[Any, ...]:
    """``None`` -> n Nones; else a tuple/list of length n (clear error)."""
    if carry is None:
        return (None,) * n
    if not isinstance(carry, (tuple, list)) or len(carry) != n:
        got = (f"a {type(carry).__name__} of length {len(carry)}"
               if isinstance(carry, (tuple, list)) else type(carry).__name__)
        raise ValueError(f"carry must be None or a tuple of {n} {what}, got {got}")
    return tuple(carry)


class Bidirectional(nn.Module):
    """A forward and a backward layer with separate weights, time-aligned.

    With ``h^f`` the forward states (``h^f_t`` has seen ``x_0 .. x_t``) and
    ``h^b`` the backward states (``h^b_t`` has seen ``x_t .. x_{T-1}``)::

        y_t = concat(y^f_t, y^b_t)     (merge='concat', width d_f + d_b)
        y_t = y^f_t + y^b_t            (merge='sum', widths must match)

    where ``y^f``/``y^b`` are the two layers' outputs.  The backward layer runs
    with ``reverse=True``: if the module passed as ``backward`` has
    ``reverse=False`` it is cloned with ``reverse=True``, so the same
    constructor can be used for both directions::

        bi = Bidirectional(MinGRU(d_h=8), MinGRU(d_h=8))
        variables = bi.init(key, x)                # {'fwd': ..., 'bwd': ...}
        (c_fwd, c_bwd), y = bi.apply(variables, x)

    A ``forward`` module with ``reverse=True`` is an error.

    The carry is the tuple ``(fwd_carry, bwd_carry)``: the forward state at the
    last valid step and the backward state at step 0.  With ``seq_lengths`` or
    ``mask`` the padded steps leave both states unchanged, so the backward
    direction effectively starts at each sequence's last valid step (from
    ``bwd_carry`` when given): it equals the backward layer run on the
    truncated sequence.  Outputs at padded steps are zero.  ``reset`` marks
    document starts in both directions (documents never mix).

    Attributes:
      forward: the forward-direction layer (``reverse=False``).
      backward: the backward-direction layer (cloned with ``reverse=True``).
      merge: ``'concat'`` (feature axis; the default) or ``'sum'``.
    """

    forward: nn.Module
    backward: nn.Module
    merge: str = "concat"

    def setup(self):
        _check_layer("forward", self.forward)
        _check_layer("backward", self.backward)
        for name, module in (("forward", self.forward), ("backward", self.backward)):
            if not _has_field(module, "reverse"):
                raise TypeError(
                    f"{name} must have a 'reverse' field (a flax_minrnn layer), "
                    f"got {type(module).__name__}")
        if self.forward.reverse:
            raise ValueError(
                "forward must run forwards (reverse=False), got a module with "
                "reverse=True; pass it as backward instead")
        checks.check_choice("merge", self.merge, ("concat", "sum"))
        self.fwd = self.forward.clone()
        self.bwd = self.backward.clone(reverse=True)

    @nn.nowrap
    def initialize_carry(self, input_shape: Sequence[int],
                         input_dtype=jnp.float32) -> Tuple[Array, Array]:
        """Zero carries ``(fwd, bwd)`` for inputs ``(batch, ..., d_in)`` of dtype
        ``input_dtype``; no params needed."""
        _check_layer("forward", self.forward)
        _check_layer("backward", self.backward)
        return (self.forward.initialize_carry(input_shape, input_dtype),
                self.backward.initialize_carry(input_shape, input_dtype))

    def __call__(self, x: Array, carry: Optional[Tuple[Any, Any]] = None, *,
                 seq_lengths: Optional[Array] = None, mask: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[Tuple[Any, Any], Array]:
        """Runs both directions; returns ``((fwd_carry, bwd_carry), y)``.

        Args:
          x: float ``(batch, time, d_in)``.
          carry: ``None`` or ``(fwd_carry, bwd_carry)`` (either may be ``None``,
            meaning zeros).  ``bwd_carry`` is the state "after" the last step,
            i.e. the state the backward scan starts from.
          seq_lengths: int ``(batch,)`` valid lengths, or
          mask: bool ``(batch, time)`` valid steps.
          reset: bool ``(batch, time)``, True where a new document starts.
        """
        c_fwd, c_bwd = _split_carry(carry, 2, "(fwd_carry, bwd_carry)")
        c_fwd, y_fwd = self.fwd(x, c_fwd, seq_lengths=seq_lengths, mask=mask, reset=reset)
        c_bwd, y_bwd = self.bwd(x, c_bwd, seq_lengths=seq_lengths, mask=mask, reset=reset)
        if self.merge == "concat":
            y = jnp.concatenate([y_fwd, y_bwd.astype(y_fwd.dtype)], axis=-1)
        else:
            if y_fwd.shape != y_bwd.shape:
                raise ValueError(
                    "merge='sum' needs forward and backward outputs of the same "
                    f"shape, got {tuple(y_fwd.shape)} and {tuple(y_bwd.shape)}")
            y = y_fwd + y_bwd.astype(y_fwd.dtype)
        return (c_fwd, c_bwd), y


_NORMS = {"rmsnorm": nn.RMSNorm, "layernorm": nn.LayerNorm}


def _per_layer_residual(residual, n: int) -> Tuple[bool, ...]:
    if isinstance(residual, bool):
        return (residual,) * n
    if isinstance(residual, (tuple, list)) and len(residual) == n \
            and all(isinstance(r, bool) for r in residual):
        return tuple(residual)
    raise ValueError(f"residual must be a bool or a sequence of {n} bools (one per layer), "
                     f"got {residual!r}")


class _SkipProjection(nn.Module):
    """``x W + b`` (``W``: lecun normal, ``b``: zeros), mapping a residual to a
    layer's output width, which is known only when the layer has run."""

    @nn.compact
    def __call__(self, x: Array, features: int) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        y = jnp.einsum("...i,ij->...j", x, kernel.astype(x.dtype))
        return y + bias.astype(x.dtype)[(None,) * (x.ndim - 1)]


class Stack(nn.Module):
    """Layers applied one after the other (a multi-layer RNN).

    With ``x^0 = x`` and layer ``l = 0 .. L-1``::

        u^l     = norm_l(x^l)                  (pre-norm; identity if norm=None)
        c^l, z^l = layer_l(u^l, carry^l)
        z^l     = dropout(z^l)                 (not after the last layer)
        x^{l+1} = s_l(x^l) + z^l  (residual[l])   or   z^l
        y       = x^L

    where the skip ``s_l`` is the identity, or, when layer ``l`` changes the
    width (e.g. a first layer reading 3 input features into 64), the input
    projection ``s_l(x) = x W_l + b_l`` (parameters ``skip_proj_<l>``, created
    only then), as torch-mingru's ``residual=True`` does for its first layer.

    Every layer gets the same ``seq_lengths``/``mask``/``reset``.  The carry is
    the tuple ``(c^0, .., c^{L-1})``, so a long sequence can be processed in
    chunks by feeding back the returned carry::

        stack = Stack([MinGRU(d_h=16), MinGRU(d_h=16)], residual=True,
                      norm="rmsnorm", dropout=0.1)
        variables = stack.init(key, x)
        carry, y = stack.apply(variables, x)                       # eval
        carry, y = stack.apply(variables, x, deterministic=False,
                               rngs={"dropout": key})              # training

    Like torch-mingru's ``MinGRU(input_dims, hidden_dims, num_layers,
    dropout, residual)``, which is ``Stack([MinGRU(d_h=H, d_model=H,
    candidate_activation=g_activation)] * L, residual=True, dropout=p)``
    started from ``carry = 0.5`` (its ``g(0)``); ``dropout`` acts on each
    layer's output (the residual branch; torch-mingru drops the sum) and needs
    a ``'dropout'`` rng when ``deterministic`` is False.

    Attributes:
      layers: the layers (cloned; parameters under ``'rnn_<l>'``): modules
        with the layers' call signature ``layer(x, carry, *, seq_lengths,
        mask, reset) -> (carry, y)``, e.g. MinGRU, MinLSTM, GatedLinearRNN or
        :class:`Bidirectional`.
      dropout: dropout rate in ``[0, 1)`` between layers (default 0).
      residual: add each layer's input (projected where the layer changes the
        width) to its output: a bool for every layer, or one bool per layer
        (default False).
      norm: ``None`` (the default: no norm), ``'rmsnorm'`` or
        ``'layernorm'``: pre-norm on each layer's input (parameters under
        ``'norms_<l>'``).
      eps: epsilon of the norm, ``> 0`` (default 1e-5).
    """

    layers: Sequence[nn.Module]
    dropout: float = 0.0
    residual: Union[bool, Sequence[bool]] = False
    norm: Optional[str] = None
    eps: float = 1e-5

    def setup(self):
        if not isinstance(self.layers, (tuple, list)) or not self.layers:
            raise ValueError(
                f"layers must be a non-empty sequence of layers, got {self.layers!r}")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(
                    f"layers[{i}] must be a flax.linen Module, got {type(layer).__name__}")
        checks.check_rate("dropout", self.dropout)
        checks.check_choice("norm", self.norm, [None, *_NORMS])
        checks.check_positive_number("eps", self.eps)
        self._residual = _per_layer_residual(self.residual, len(self.layers))
        self.rnn = [layer.clone() for layer in self.layers]
        self.skip_proj = [_SkipProjection() for _ in self.layers]
        if self.norm is not None:
            self.norms = [_NORMS[self.norm](epsilon=self.eps) for _ in self.layers]
        self.drop = nn.Dropout(rate=self.dropout)

    def __call__(self, x: Array, carry: Optional[Sequence[Any]] = None, *,
                 seq_lengths: Optional[Array] = None, mask: Optional[Array] = None,
                 reset: Optional[Array] = None,
                 deterministic: bool = True) -> Tuple[Tuple[Any, ...], Array]:
        """Runs the stack; returns ``(carries, y)``.

        Args:
          x: float ``(batch, time, d_in)``.
          carry: ``None`` or a tuple with one carry per layer (entries may be
            ``None``: zeros).
          seq_lengths: int ``(batch,)`` valid lengths, or
          mask: bool ``(batch, time)`` valid steps.
          reset: bool ``(batch, time)``, True where a new document starts.
          deterministic: disable dropout (evaluation).  When False and
            ``dropout > 0`` a ``'dropout'`` rng is required.

        Returns:
          The tuple of final carries (one per layer) and the last layer's
          output ``(batch, time, d_out)``.
        """
        n = len(self.layers)
        carries = _split_carry(carry, n, f"per-layer carries (one per layer, {n} layers)")
        new_carries = []
        for i, layer in enumerate(self.rnn):
            u = self.norms[i](x) if self.norm is not None else x
            c, z = layer(u, carries[i], seq_lengths=seq_lengths, mask=mask, reset=reset)
            new_carries.append(c)
            if self.dropout > 0.0 and i < n - 1:
                z = self.drop(z, deterministic=deterministic)
            if self._residual[i]:
                skip = x if z.shape[-1] == x.shape[-1] else self.skip_proj[i](x, z.shape[-1])
                z = skip.astype(z.dtype) + z
            x = z
        return tuple(new_carries), x
