"""Single-recurrence layers: MinGRU, MinLSTM and GatedLinearRNN (Flax linen).

Every layer maps ``x`` of shape ``(batch, time, features)`` to ``(carry, y)``:
``carry`` is the final state ``(batch, d_h)`` (float32 whatever the compute
dtype, or float64 when the computation is float64) and ``y`` the outputs
``(batch, time, d_out)``.  The three layers are small variations of one
base, :class:`GatedRecurrence`, which runs (one code path for every
``T >= 1``):

1. inputs at padded steps (``seq_lengths`` / ``mask``) are set to zero, so
   whatever they hold (NaN included) never reaches a product or a gradient;
2. one fused projection ``in_proj`` gives every pre-activation (its bias is
   added later, inside the scan);
3. the layer's gate function (:mod:`flax_minrnn.nn.gates`, the one copy of
   the equations) turns them into the coefficients ``a_t`` (decay) and
   ``b_t`` (input) in float32;
4. :func:`flax_minrnn.ops.gated.gated_scan_with_readout` runs
   ``h_t = a_t * h_{t-1} + b_t`` and the readout: ``out_proj(h)`` (MinGRU
   and MinLSTM when ``d_h != d_model``) or
   ``out_proj(hidden_activation(h) * gate_activation(o))`` (GatedLinearRNN,
   ``o`` from ``in_proj``'s last block).  With ``scan_impl="chunked"`` (what
   ``"auto"`` picks on CPU from ``T = 64``) gates, recurrence and readout run
   tile by tile; the projection too in a plain call, while under
   differentiation it is computed for the whole sequence and kept for the
   derivatives (:mod:`flax_minrnn.ops.gated`).

In true-recurrence mode (``use_true_recurrence=True``) the pre-activations
also see the previous state, ``pre_t = in_proj(x_t) + h_{t-1} @ U`` with a
recurrent kernel ``U`` initialised to zero, so the layer runs one step at a
time (:func:`flax_minrnn.ops.true_recurrence.true_recurrence_with_readout`,
the same gate function, a hand-written backward pass; ``T = 1`` decodes).
With ``U = 0`` both modes compute the same function, which is what
two-stage training relies on (:mod:`flax_minrnn.training.migrate`).

Options shared by all layers (call arguments): ``carry`` (``None`` = zeros),
``seq_lengths`` or ``mask`` (padded steps keep the state; their outputs are
zero), ``reset`` (a new document starts: the state restarts from zero).  The
``reverse`` field runs the recurrence from the last step to the first.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_minrnn.nn import dense as dense_lib
from flax_minrnn.nn import gates as gates_lib
from flax_minrnn.nn.gates import g_activation
from flax_minrnn.ops import checks
from flax_minrnn.ops import gated as gated_lib
from flax_minrnn.ops import parallel as parallel_lib
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.ops import true_recurrence as true_recurrence_lib

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

__all__ = ["GatedRecurrence", "MinGRU", "MinLSTM", "GatedLinearRNN", "g_activation",
           "RECURRENT_KERNEL"]

# The parameter a layer gains in true-recurrence mode (two-stage training).
RECURRENT_KERNEL = "recurrent_kernel"


def _bias_init_with(base: Initializer, d_h: int, offsets: dict) -> Initializer:
    """``base`` with the segments ``{index: value}`` of a fused bias set."""
    if not offsets:
        return base

    def init(key, shape, dtype=jnp.float32):
        bias = base(key, shape, dtype)
        for index, value in offsets.items():
            bias = bias.at[index * d_h:(index + 1) * d_h].set(value)
        return bias

    return init


def _check_callable(name: str, value, optional: bool = False) -> None:
    """An activation or initialiser field must be a function."""
    if not callable(value) and not (optional and value is None):
        raise TypeError(f"{name} must be a function{' or None' if optional else ''} "
                        f"(e.g. jax.nn.sigmoid), got {value!r}")


def _zero_invalid(y: Array, valid: Optional[Array]) -> Array:
    if valid is None:
        return y
    return jnp.where(valid[:, :, None], y, jnp.zeros((), y.dtype))


_COMMON_ATTRIBUTES = """
      use_true_recurrence: gates and candidate also see ``h_{t-1}`` through
        a recurrent kernel ``recurrent_kernel`` (initialised to zero); runs
        sequentially (default False).
      reverse: run from the last step to the first (the carry is then the
        state at step 0; default False).
      scan_impl: a :class:`flax_minrnn.ops.scan.ScanImpl` name (default
        ``'auto'``); never changes the parameters, only speed (ignored in
        true-recurrence mode).  ``'native'`` runs ``'chunked'`` for
        GatedLinearRNN (the compiled kernels cover MinGRU/MinLSTM gates only).
      sequence_axis: a mesh axis name: the time axis is split over it
        (:func:`flax_minrnn.ops.parallel.sequence_parallel_scan`; the mesh is
        the context's, ``jax.set_mesh``); ``None``: one device. Same
        parameters.  Needs ``use_true_recurrence=False``.
      use_bias: whether ``in_proj`` (and ``out_proj``) have a bias (default True).
      dtype: compute dtype of the projections (``None``: the input's). Gates,
        ``in_proj``'s bias (added to the projection) and the state are float32
        (float64 when the computation is).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initialisers of the projections."""


class GatedRecurrence(nn.Module):
    """The base of :class:`MinGRU`, :class:`MinLSTM` and :class:`GatedLinearRNN`.

    A subclass says how many ``d_h``-wide blocks ``in_proj`` has
    (:meth:`num_blocks`), which gate function maps them to ``(a, b)``
    (:meth:`gate_fn`), which blocks get an initial bias offset
    (:meth:`bias_offsets`), whether the last block feeds an output gate
    (:meth:`output_gate`) and how wide its output is (:meth:`out_features`).
    Everything else (validation, projection, scan, readout, carry, true
    recurrence) is shared.
    """

    d_h: Optional[int] = None
    d_model: Optional[int] = None
    use_true_recurrence: bool = False
    reverse: bool = False
    scan_impl: str = "auto"
    sequence_axis: Optional[str] = None
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    # --- what a subclass defines

    def num_blocks(self) -> int:
        raise NotImplementedError

    def gate_fn(self) -> Callable[[Array], gates_lib.Gates]:
        raise NotImplementedError

    def bias_offsets(self) -> dict:
        return {}

    def output_gate(self) -> Optional[Callable[[Array, Array], Array]]:
        return None

    def out_features(self, d_in: int, d_h: int) -> Optional[int]:
        """The width of ``out_proj``, or ``None`` without one."""
        d_out = self.d_model or d_in
        return None if d_out == d_h else d_out

    def gate_name(self) -> Optional[Tuple[str, str]]:
        """``(kind, candidate)`` naming :meth:`gate_fn` for the compiled CPU
        kernels (``scan_impl="native"``), or ``None``."""
        return None

    # --- shared

    def _check_attributes(self) -> None:
        """The fields every layer has (run before anything is built); a
        subclass adds its own fields' checks."""
        for name in ("d_h", "d_model"):
            if getattr(self, name) is not None:
                checks.check_int_at_least(name, getattr(self, name), 1)
        for name in ("use_true_recurrence", "reverse", "use_bias"):
            checks.check_bool(name, getattr(self, name))
        if self.sequence_axis is not None and (
                not isinstance(self.sequence_axis, str) or not self.sequence_axis):
            raise ValueError(f"sequence_axis must be None or a mesh axis name (a non-empty "
                             f"str), got {self.sequence_axis!r}")
        checks.check_float_dtype("dtype", self.dtype, optional=True)
        checks.check_float_dtype("param_dtype", self.param_dtype)
        for name in ("kernel_init", "bias_init"):
            _check_callable(name, getattr(self, name))

    def state_size(self, d_in: int) -> int:
        """The state width ``d_h`` for inputs of width ``d_in``."""
        self._check_attributes()
        if self.d_h is None:
            raise ValueError(f"{type(self).__name__} needs d_h (the state width)")
        return self.d_h

    def initialize_carry(self, input_shape: Sequence[int], input_dtype=jnp.float32) -> Array:
        """Zero state ``(batch, d_h)`` for inputs of shape ``(batch, ..., d_in)``
        and dtype ``input_dtype``.

        Needs no parameters and no RNG.  The state is float32, or float64 when
        the computation is: ``dtype`` (``input_dtype`` when ``dtype`` is None)
        or ``param_dtype`` is float64.
        """
        return jnp.zeros((input_shape[0], self.state_size(input_shape[-1])),
                         checks.state_dtype(self.dtype or input_dtype, self.param_dtype))

    @nn.compact
    def __call__(self, x: Array, carry: Optional[Array] = None, *,
                 seq_lengths: Optional[Array] = None, mask: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[Array, Array]:
        """Runs the layer; returns ``(carry, y)``.

        Args:
          x: float ``(batch, time, d_in)``.
          carry: ``(batch, d_h)`` in the state dtype (float32, float64 for a
            float64 computation; see :meth:`initialize_carry`) or ``None`` (zeros).
          seq_lengths: int ``(batch,)`` valid lengths, or
          mask: bool ``(batch, time)`` valid steps.  Invalid steps keep the
            state, their outputs are zero, and their inputs are ignored
            (treated as zeros, so NaN there changes nothing).
          reset: bool ``(batch, time)``, True where a new document starts.

        Returns:
          ``(carry, y)``: the state after the last valid step (state dtype) and
          ``y`` ``(batch, time, d_out)`` in the compute dtype.
        """
        checks.check_input(x)
        batch, seq_len, d_in = x.shape
        d_h = self.state_size(d_in)
        n_proj = self.num_blocks()
        out_features = self.out_features(d_in, d_h)
        output_gate = self.output_gate()
        impl = scan_lib.resolve_impl(self.scan_impl, seq_len, name="scan_impl")
        dtype = self.dtype or x.dtype
        s_dtype = checks.state_dtype(dtype, self.param_dtype)
        h0 = checks.check_carry(carry, batch, d_h, s_dtype)
        valid = checks.valid_mask(batch, seq_len, seq_lengths, mask)
        if reset is not None:
            reset = checks.check_bool_bt("reset", reset, batch, seq_len)
        if self.sequence_axis is not None and self.use_true_recurrence:
            raise ValueError(f"sequence_axis={self.sequence_axis!r} needs "
                             "use_true_recurrence=False (a true recurrence runs one step at "
                             "a time)")

        # in_proj without its bias: the bias is added inside the scan loop
        # (the pre-activations are stored unbiased, in the compute dtype).
        checks.check_param_width(self, x, "in_proj")
        kernel, bias = dense_lib.DenseParams(
            n_proj * d_h, use_bias=self.use_bias, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=_bias_init_with(self.bias_init, d_h, self.bias_offsets()),
            name="in_proj")(d_in)
        out_proj = None
        if out_features is not None:
            out_proj = dense_lib.DenseParams(
                out_features, use_bias=self.use_bias, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init, bias_init=self.bias_init,
                name="out_proj")(d_h)
        x_c, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=dtype)
        # The bias joins the projection in the state dtype (``biased`` below),
        # so it is not rounded to a 16-bit compute dtype on the way: a gate
        # logit of ln(9999) would move by 0.02 in bfloat16.
        bias = None if bias is None else jnp.asarray(bias, s_dtype)
        # Padded steps: zero inputs, so garbage there cannot reach a gradient.
        x_c = _zero_invalid(x_c, valid)
        out_proj = jax.tree.map(lambda w: jnp.asarray(w, dtype), out_proj)
        x_c, kernel, bias, out_proj, h0 = checks.same_varying(x_c, kernel, bias, out_proj, h0)
        # Columns of in_proj seen by the recurrence, and the output-only ones.
        split = (n_proj - (output_gate is not None)) * d_h
        cols = lambda w, rec: None if w is None else (w[..., :split] if rec else w[..., split:])
        gate_fn = self.gate_fn()

        def biased(p: Array, b: Optional[Array]) -> Array:
            # Block by block of d_h columns, the blocks the gate functions
            # split p into: a tile reloaded from its per-block buffers
            # (gated_lib._column_groups) then needs no concatenation.
            p = p.astype(s_dtype)
            if b is None:
                return p
            blocks = p.shape[-1] // d_h
            return jnp.concatenate([dense_lib.add_bias(q, c) for q, c in zip(
                jnp.split(p, blocks, -1), jnp.split(b, blocks))], -1)

        # Everything traced that the coefficients and the readout use.
        params = (cols(bias, True), None if output_gate is None else cols(bias, False),
                  out_proj)

        def coeffs(p: Array, params) -> Tuple[Array, Array]:
            return tuple(gate_fn(biased(p, params[0])))

        def readout(h: Array, o: Optional[Array], params) -> Array:
            y = h if output_gate is None else output_gate(h, biased(o, params[1]))
            y = y.astype(dtype)
            if params[2] is not None:
                y = dense_lib.add_bias(dense_lib.matmul(y, params[2][0]), params[2][1])
            return y

        if self.use_true_recurrence:
            h_last, y = self._true_recurrence(x_c, kernel, h0, valid, reset, d_h, n_proj,
                                              dtype, coeffs, readout, params,
                                              kernel.shape[1] - split)
        elif self.sequence_axis is not None:
            # The time axis is split over a mesh axis.
            a, b = coeffs(dense_lib.matmul(x_c, cols(kernel, True)), params)
            h_last, h = parallel_lib.sequence_parallel_scan(
                a, b, h0, axis_name=self.sequence_axis, impl=impl, reset=reset, mask=valid,
                reverse=self.reverse)
            o = None if output_gate is None else dense_lib.matmul(x_c, cols(kernel, False))
            y = jax.checkpoint(readout)(h, o, params)
        else:
            # Projection, gates, recurrence and readout in one call (with
            # scan_impl="chunked", all but the projection tile by tile).
            run = functools.partial(gated_lib.run, coeffs, x_c, h0, kernel, params, impl,
                                    reset=reset, seq_lengths=None, mask=valid,
                                    reverse=self.reverse, gate_name=self.gate_name())
            if output_gate is None and out_proj is None:
                h_last, h = run()
                return h_last, h.astype(dtype)
            h_last, y = run(readout_fn=readout, n_side=kernel.shape[1] - split)
        return h_last, _zero_invalid(y, valid)

    def _true_recurrence(self, x_c, kernel, h0, valid, reset, d_h, n_proj, dtype, coeffs,
                         readout, params, n_side: int):
        """True-recurrence mode: the gates (and the output gate) see ``h_{t-1}``
        through ``recurrent_kernel``; :func:`flax_minrnn.ops.true_recurrence.
        true_recurrence_with_readout`, one step at a time (the same call for
        ``T = 1`` decodes).  Returns ``(h_last, y)``."""
        recurrent = self.param(RECURRENT_KERNEL, nn.initializers.zeros,
                               (d_h, n_proj * d_h), self.param_dtype).astype(dtype)
        return true_recurrence_lib.true_recurrence_with_readout(
            coeffs, readout, x_c, h0, recurrent_kernel=recurrent, kernel=kernel,
            side_features=n_side, params=params, reset=reset, mask=valid,
            reverse=self.reverse)


class _Expanded(GatedRecurrence):
    """MinGRU and MinLSTM: the state width may follow the input's, and an
    ``out_proj`` maps it back to ``d_model``."""

    expansion_factor: float = 1.0
    use_out_proj: Optional[bool] = None
    candidate_activation: Optional[Callable[[Array], Array]] = None
    forget_bias: float = 0.0

    def _check_attributes(self) -> None:
        super()._check_attributes()
        checks.check_positive_number("expansion_factor", self.expansion_factor)
        if self.use_out_proj is not None:
            checks.check_bool("use_out_proj", self.use_out_proj)
        _check_callable("candidate_activation", self.candidate_activation, optional=True)
        checks.check_real("forget_bias", self.forget_bias)

    def state_size(self, d_in: int) -> int:
        """The state width ``d_h`` for inputs of width ``d_in``."""
        self._check_attributes()
        if self.d_h is not None:
            return self.d_h
        return max(1, int(round(self.expansion_factor * d_in)))

    def out_features(self, d_in: int, d_h: int) -> Optional[int]:
        d_out = self.d_model or d_in
        use_out_proj = self.use_out_proj
        if use_out_proj is None:
            use_out_proj = d_h != d_out
        if not use_out_proj and d_h != d_out:
            raise ValueError(
                f"use_out_proj=False needs d_h == d_model (the output width; the input "
                f"width when d_model is None), got d_h={d_h} and output width {d_out}")
        return d_out if use_out_proj else None

    def _candidate_name(self) -> Optional[str]:
        if self.candidate_activation is None:
            return "identity"
        if self.candidate_activation is g_activation:
            return "g"
        return None


class MinGRU(_Expanded):
    """minGRU (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201).

    Gates depend on ``x_t`` only, so the recurrence is linear in ``h``::

        z_t  = sigmoid(W_z x_t + b_z)
        h~_t = W_h x_t + b_h              (or g(W_h x_t + b_h), g > 0)
        h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t
        y_t  = out_proj(h_t)              (when use_out_proj: by default when d_h != d_model)

    ``h_{-1}`` is ``carry`` (zeros when ``None``).  Usage::

        layer = MinGRU(d_h=256)
        params = layer.init(key, x)                  # x: (batch, time, d_in)
        carry, y = layer.apply(params, x)            # carry: (batch, 256)
        carry, y2 = layer.apply(params, x2, carry)   # continue the sequence

    Attributes:
      d_h: state width; ``None`` means ``round(expansion_factor * d_in)``.
      d_model: output width; ``None`` means the input width.
      expansion_factor: ``d_h / d_in`` when ``d_h`` is ``None``.
      use_out_proj: add ``out_proj`` (``None``: exactly when ``d_h`` differs
        from the output width).
      candidate_activation: applied to the candidate ``h~`` (``None``: the
        identity, as in the paper's main text; :func:`g_activation` for the
        appendix's positive states).
      forget_bias: initial bias of the retention logit: ``1 - z`` starts at
        ``sigmoid(forget_bias)`` (0: 0.5).""" + _COMMON_ATTRIBUTES

    def num_blocks(self) -> int:
        return 2  # [z logit, candidate]

    def gate_fn(self):
        return functools.partial(gates_lib.mingru_gates,
                                 candidate_activation=self.candidate_activation)

    def bias_offsets(self) -> dict:
        return {0: -self.forget_bias} if self.forget_bias else {}

    def gate_name(self):
        name = self._candidate_name()
        return None if name is None else ("mingru", name)


class MinLSTM(_Expanded):
    """minLSTM (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201).

    Forget and input gates depend on ``x_t`` only::

        f_t  = sigmoid(W_f x_t + b_f),   i_t = sigmoid(W_i x_t + b_i)
        f'_t = f_t / (f_t + i_t),        i'_t = i_t / (f_t + i_t)   (normalised)
        h~_t = W_h x_t + b_h              (or g(...) for positive states)
        h_t  = f'_t * h_{t-1} + i'_t * h~_t
        y_t  = out_proj(h_t)              (when use_out_proj: by default when d_h != d_model)

    With ``normalize_gates=False`` the raw ``f_t``, ``i_t`` are used.
    ``h_{-1}`` is ``carry`` (zeros when ``None``).  Usage::

        layer = MinLSTM(d_h=256)
        params = layer.init(key, x)
        carry, y = layer.apply(params, x)

    Attributes:
      d_h: state width; ``None`` means ``round(expansion_factor * d_in)``.
      d_model: output width; ``None`` means the input width.
      expansion_factor: ``d_h / d_in`` when ``d_h`` is ``None``.
      use_out_proj: add ``out_proj`` (``None``: exactly when ``d_h`` differs
        from the output width).
      normalize_gates: use ``f / (f + i)`` and ``i / (f + i)`` (the paper's
        time-independent scale).
      candidate_activation: applied to ``h~`` (``None``: identity;
        :func:`g_activation` for positive states).
      forget_bias: initial bias of the forget-gate logit.""" + _COMMON_ATTRIBUTES

    normalize_gates: bool = True

    def _check_attributes(self) -> None:
        super()._check_attributes()
        checks.check_bool("normalize_gates", self.normalize_gates)

    def num_blocks(self) -> int:
        return 3  # [forget logit, input logit, candidate]

    def gate_fn(self):
        return functools.partial(gates_lib.minlstm_gates,
                                 candidate_activation=self.candidate_activation,
                                 normalize=self.normalize_gates)

    def bias_offsets(self) -> dict:
        return {0: self.forget_bias} if self.forget_bias else {}

    def gate_name(self):
        name = self._candidate_name()
        kind = "minlstm" if self.normalize_gates else "minlstm_unnormalized"
        return None if name is None else (kind, name)


class GatedLinearRNN(GatedRecurrence):
    """Gated linear RNN of Katsch's flax-gated-linear-rnn package (Katsch 2023,
    "GateLoop", arXiv 2311.01927): real-valued gates as below; GateLoop's
    complex-valued transitions and q/k/v readout are not part of it.

    The fields and parameter layout follow the flax-gated-linear-rnn package
    (convert its params with
    :func:`flax_minrnn.compat.flax_gated_linear_rnn.from_flax_gated_linear_rnn`)::

        i~_t = input_activation(W x_t + b)           candidate
        i_t  = gate_activation(W_i x_t + b_i)        input gate
        f_t  = 1 - i_t  (tied)  or  gate_activation(W_f x_t + b_f)  (untied)
        o_t  = gate_activation(W_o x_t + b_o)        output gate
        h_t  = f_t * h_{t-1} + i_t * i~_t
        y_t  = out_proj(hidden_activation(h_t) * o_t)      width d_model

    ``h_{-1}`` is ``carry`` (zeros when ``None``).  Usage::

        layer = GatedLinearRNN(d_h=256, d_model=128)
        params = layer.init(key, x)
        carry, y = layer.apply(params, x)   # carry (batch, 256), y (batch, T, 128)

    Attributes:
      d_h: state width (required).
      d_model: output width; ``None`` means ``d_h`` (as the package's README
        example assumes).
      input_activation, hidden_activation, gate_activation: as above.
      use_tied_gates: ``f = 1 - i`` (``in_proj`` has 3 blocks of ``d_h``:
        candidate, input gate, output gate) or a separate forget gate (4
        blocks: candidate, input, forget, output).
      forget_bias: initial bias of the retention: tied, the input-gate bias is
        ``-forget_bias``; untied, the forget-gate bias is ``forget_bias``.""" + _COMMON_ATTRIBUTES

    input_activation: Callable[[Array], Array] = nn.tanh
    hidden_activation: Callable[[Array], Array] = nn.tanh
    gate_activation: Callable[[Array], Array] = nn.sigmoid
    use_tied_gates: bool = True
    forget_bias: float = 0.0

    def _check_attributes(self) -> None:
        super()._check_attributes()
        for name in ("input_activation", "hidden_activation", "gate_activation"):
            _check_callable(name, getattr(self, name))
        checks.check_bool("use_tied_gates", self.use_tied_gates)
        checks.check_real("forget_bias", self.forget_bias)

    def num_blocks(self) -> int:
        return 3 if self.use_tied_gates else 4

    def gate_fn(self):
        return functools.partial(gates_lib.glrnn_gates,
                                 input_activation=self.input_activation,
                                 gate_activation=self.gate_activation,
                                 tied=self.use_tied_gates)

    def bias_offsets(self) -> dict:
        if not self.forget_bias:
            return {}
        return {1: -self.forget_bias} if self.use_tied_gates else {2: self.forget_bias}

    def output_gate(self):
        return functools.partial(gates_lib.glrnn_readout,
                                 hidden_activation=self.hidden_activation,
                                 gate_activation=self.gate_activation)

    def out_features(self, d_in: int, d_h: int) -> Optional[int]:
        return self.d_model or d_h
