"""Single-recurrence layers: MinGRU, MinLSTM and GatedLinearRNN (Flax linen).

Every layer maps ``x`` of shape ``(batch, time, features)`` to ``(carry, y)``:
``carry`` is the final state ``(batch, d_h)`` (float32, whatever the compute
dtype) and ``y`` the outputs ``(batch, time, d_out)``.

How a layer runs (one code path for every ``T >= 1``):

1. one fused projection ``in_proj`` of ``x`` gives every pre-activation
   (its bias is added later, inside the scan);
2. a pure gate function turns pre-activations into the recurrence
   coefficients ``a_t`` (decay) and ``b_t`` (input) in float32;
3. :func:`flax_minrnn.scan.gated_scan` runs ``h_t = a_t * h_{t-1} + b_t``,
   applying the gate function as it goes (with ``scan_impl="sequential"``
   the coefficients are never stored for the whole sequence; with
   ``"chunked"`` the projection itself runs inside the scan, tile by tile;
   with ``"native"``, what ``"auto"`` picks on CPU, MinGRU's and MinLSTM's
   gates and recurrence run in compiled kernels, :mod:`flax_minrnn.native`);
4. the readout: ``out_proj(h)`` (MinGRU and MinLSTM when ``d_h !=
   d_model``), or ``out_proj(hidden_activation(h) * gate_activation(o))``
   (GatedLinearRNN, ``o`` from ``in_proj``'s last block), runs inside the
   scan too (:func:`flax_minrnn.scan.gated_scan_with_readout`), so the gated
   states and ``out_proj``'s input are not stored for the whole sequence.

In true-recurrence mode (``use_true_recurrence=True``) the pre-activations
also see the previous state, ``pre_t = in_proj(x_t) + h_{t-1} @ U`` with a
recurrent kernel ``U`` initialised to zero, so the layer runs one step at a
time; each step calls the same gate function and the same ``linear_scan``
(with ``T = 1``).  With ``U = 0`` both modes compute the same function, which
is what two-stage training relies on (see :mod:`flax_minrnn.migrate`).

Options shared by all layers (call arguments): ``carry`` (``None`` = zeros),
``seq_lengths`` or ``mask`` (padded steps keep the state; their outputs are
zero), ``reset`` (a new document starts: the state restarts from zero).  The
``reverse`` field runs the recurrence from the last step to the first.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_minrnn.backends import native as native_lib
from flax_minrnn.nn import dense as dense_lib
from flax_minrnn.ops import checks
from flax_minrnn.ops import parallel as parallel_lib
from flax_minrnn.ops import scan as scan_lib

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

__all__ = ["MinGRU", "MinLSTM", "GatedLinearRNN", "g_activation", "RECURRENT_KERNEL"]

# The parameter a layer gains in true-recurrence mode (two-stage training).
RECURRENT_KERNEL = "recurrent_kernel"


def g_activation(x: Array) -> Array:
    """The minGRU paper's positive candidate activation (appendix).

    ``g(x) = x + 0.5`` for ``x >= 0`` and ``sigmoid(x)`` otherwise: continuous,
    strictly positive, so states started from ``h0 >= 0`` stay positive (the
    domain of ``scan_impl="log"``).
    """
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


class Gates(NamedTuple):
    """What a layer's gate function returns (float32, ``(..., d_h)``)."""

    a: Array  # decay coefficient of h_{t-1}
    b: Array  # input added to the state


# ----------------------------------------------------------------------------
# Input checks shared by the layers.


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


# ----------------------------------------------------------------------------
# The one code path of every layer.


def _check_width(module: nn.Module, x: Array, name: str) -> None:
    params = module.variables.get("params", {})
    if name in params:
        expected = params[name]["kernel"].shape[0]
        if x.shape[-1] != expected:
            raise ValueError(
                f"x has {x.shape[-1]} features but this layer's parameters "
                f"({name}) expect {expected}")


def run_recurrence(
    module: nn.Module,
    x: Array,
    carry: Optional[Array],
    *,
    d_h: int,
    n_proj: int,
    gate_fn: Callable[[Array], Gates],
    bias_offsets: dict,
    output_gate: Optional[Callable[[Array, Array], Array]] = None,
    out_features: Optional[int] = None,
    native_gates: Optional[Tuple[str, Optional[Callable]]] = None,
    seq_lengths=None,
    mask=None,
    reset=None,
) -> Tuple[Array, Array, Optional[Array]]:
    """Projection, gates, scan and readout.  Returns ``(h_last, y, valid)``.

    ``in_proj`` has ``n_proj`` blocks of ``d_h``; ``gate_fn`` maps the blocks
    the recurrence uses to its coefficients.  The readout of the float32
    states ``h`` (zero at invalid steps) is, in the compute dtype::

        y = output_gate(h, o)     with an output gate, else y = h
        y = out_proj(y)           with out_features (a Dense d_h -> out_features)

    where ``o`` are the float32, biased pre-activations of ``in_proj``'s last
    block, which then feeds only the output (GatedLinearRNN).  The readout
    runs inside the scan (:func:`flax_minrnn.scan.gated_scan_with_readout`:
    tile by tile where the implementation tiles time, recomputed in the
    backward pass), so neither ``o``, the gated states nor ``out_proj``'s
    input are stored for the whole sequence.  ``valid`` is the mask or
    ``None``; ``y`` is not zeroed at invalid steps (``out_proj``'s bias).
    Reads the fields ``dtype``, ``param_dtype``, ``kernel_init``,
    ``bias_init``, ``use_bias``, ``use_true_recurrence``, ``scan_impl``,
    ``reverse`` and (if present) ``sequence_axis`` of ``module``.
    ``native_gates``: ``(kind, candidate_activation)`` when ``gate_fn`` is one
    the compiled kernels implement (:mod:`flax_minrnn.native`, for
    ``scan_impl="native"``).
    """
    checks.check_input(x)
    batch, seq_len, _ = x.shape
    impl = scan_lib.resolve_impl(module.scan_impl, seq_len, name="scan_impl")
    scan = layer_scan(module)  # linear_scan, or over sequence_axis
    dtype = module.dtype or x.dtype
    s_dtype = checks.state_dtype(dtype, module.param_dtype)
    h0 = checks.check_carry(carry, batch, d_h, s_dtype)
    valid = checks.valid_mask(batch, seq_len, seq_lengths, mask)
    if reset is not None:
        reset = checks.check_bool_bt("reset", reset, batch, seq_len)

    # in_proj without its bias: the bias is added inside the scan loop (one
    # pass less over the pre-activations, and they are stored unbiased, in
    # the compute dtype); the gate function casts each block to float32.
    _check_width(module, x, "in_proj")
    kernel, bias = dense_lib.DenseParams(
        n_proj * d_h, use_bias=module.use_bias, param_dtype=module.param_dtype,
        kernel_init=module.kernel_init,
        bias_init=_bias_init_with(module.bias_init, d_h, bias_offsets),
        name="in_proj")(x.shape[-1])
    out_proj = None
    if out_features is not None:
        out_proj = dense_lib.DenseParams(out_features, use_bias=module.use_bias,
                               param_dtype=module.param_dtype,
                               kernel_init=module.kernel_init, bias_init=module.bias_init,
                               name="out_proj")(d_h)
    x_c, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    out_proj = jax.tree.map(lambda w: jnp.asarray(w, dtype), out_proj)
    # Columns of in_proj seen by the recurrence, and the output-only ones.
    split = (n_proj - (output_gate is not None)) * d_h
    cols = lambda w, rec: None if w is None else (w[..., :split] if rec else w[..., split:])

    def biased(p: Array, bias: Optional[Array]) -> Array:
        return dense_lib.add_bias(p.astype(s_dtype), None if bias is None else bias.astype(s_dtype))

    # Everything traced that the coefficients and the readout use.
    params = (cols(bias, True), None if output_gate is None else cols(bias, False), out_proj)

    def coeffs(p: Array, params) -> Tuple[Array, Array]:
        return tuple(gate_fn(biased(p, params[0])))

    def readout(h: Array, o: Optional[Array], params) -> Array:
        y = h if output_gate is None else output_gate(h, biased(o, params[1]))
        y = y.astype(dtype)
        if params[2] is not None:
            y = dense_lib.add_bias(dense_lib.matmul(y, params[2][0]), params[2][1])
        return y

    if module.use_true_recurrence or module.sequence_axis is not None:
        if module.use_true_recurrence:
            h_last, h, o = _true_recurrence(module, x_c, kernel, h0, valid, reset, d_h,
                                            n_proj, dtype, coeffs, cols, params,
                                            output_gate is not None)
        else:  # the time axis is split over a mesh axis
            h_last, h = scan(*coeffs(dense_lib.matmul(x_c, cols(kernel, True)), params), h0,
                             impl=impl, reset=reset, mask=valid, reverse=module.reverse)
            o = None if output_gate is None else dense_lib.matmul(x_c, cols(kernel, False))
        # Rematerialised in the backward pass, which keeps only h and o.
        return h_last, jax.checkpoint(readout)(h, o, params), valid
    # The projection runs inside the scan (tile by tile where the
    # implementation tiles time), and so does the readout.  (The internal
    # entry point of gated_scan and gated_scan_with_readout, which also takes
    # the kernels' name for the gates.)
    scan = functools.partial(
        scan_lib._gated, coeffs, x_c, h0, kernel, params, impl,  # pylint: disable=protected-access
        reset=reset, seq_lengths=None, mask=valid, reverse=module.reverse,
        native_gates=_native_spec(native_gates))
    if output_gate is None and out_proj is None:
        h_last, h = scan()
        return h_last, h.astype(dtype), valid
    h_last, y = scan(readout_fn=readout, n_side=kernel.shape[1] - split)
    return h_last, y, valid


def _native_spec(native_gates) -> Optional[native_lib.NativeGates]:
    """The kernels' name for ``(kind, candidate_activation)``, or ``None`` for
    a candidate activation they do not implement."""
    if native_gates is None:
        return None
    kind, candidate = native_gates
    if candidate is None:
        name = "identity"
    elif candidate is g_activation:
        name = "g"
    else:
        return None
    return native_lib.NativeGates(kind, name, lambda params: params[0])


def _true_recurrence(module, x_c, kernel, h0, valid, reset, d_h, n_proj, dtype, coeffs,
                     cols, params, has_out: bool):
    """True-recurrence mode: the gates see ``h_{t-1}``; one step at a time.
    ``coeffs(pre, params)`` as in :func:`run_recurrence`.  Returns ``(h_last,
    h, o)`` (``o`` the output-only columns, unbiased, or ``None``)."""
    batch, seq_len, _ = x_c.shape
    recurrent = module.param(RECURRENT_KERNEL, nn.initializers.zeros,
                             (d_h, n_proj * d_h), module.param_dtype).astype(dtype)
    pre = dense_lib.matmul(x_c, kernel)
    ones = jnp.ones((batch, seq_len), bool)
    valid_ = ones if valid is None else valid
    boundary = (jnp.zeros_like(ones) if reset is None
                else scan_lib.reset_boundaries(reset, module.reverse))

    def step(h, inputs):
        pre_t, valid_t, boundary_t = inputs
        # A document boundary at a valid step: the state (and so the gates'
        # view of it) restarts from zero, as in linear_scan.
        h_in = jnp.where((boundary_t & valid_t)[:, None], jnp.zeros((), h.dtype), h)
        pre_t = pre_t.astype(h.dtype) + jnp.dot(h_in.astype(dtype), recurrent).astype(h.dtype)
        a, b = coeffs(cols(pre_t, True)[:, None], params)
        h_next, h_out = scan_lib.linear_scan(a, b, h_in, impl="sequential",
                                             mask=valid_t[:, None])
        return h_next, (h_out[:, 0], cols(pre_t, False) if has_out else None)

    time_major = lambda t: jnp.swapaxes(t, 0, 1)
    h_last, (h, o) = jax.lax.scan(
        step, h0, (time_major(pre), time_major(valid_), time_major(boundary)),
        reverse=module.reverse)
    return h_last, time_major(h), None if o is None else time_major(o)


def _zero_invalid(y: Array, valid: Optional[Array]) -> Array:
    if valid is None:
        return y
    return jnp.where(valid[:, :, None], y, jnp.zeros((), y.dtype))


# ----------------------------------------------------------------------------
# Gate functions: float32 pre-activations (..., n_proj * d_h) -> Gates.


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
    The result does not depend on ``m``, so its gradient is taken with ``m``
    held constant.
    """
    m = jax.lax.stop_gradient(jnp.maximum(0.0, jnp.maximum(-k_f, -k_i)))
    e0 = jnp.exp(-m)
    u = jnp.exp(-k_f - m)
    v = jnp.exp(-k_i - m)
    r = 1.0 / (2.0 * e0 + u + v)
    return (e0 + v) * r, (e0 + u) * r


def _mingru_gates(pre: Array, candidate_activation) -> Gates:
    k, h_pre = _split(pre, 2)
    cand = h_pre if candidate_activation is None else candidate_activation(h_pre)
    z, one_minus_z = sigmoid_pair(k)
    return Gates(a=one_minus_z, b=z * cand)


def _minlstm_gates(pre: Array, candidate_activation, normalize: bool) -> Gates:
    k_f, k_i, h_pre = _split(pre, 3)
    cand = h_pre if candidate_activation is None else candidate_activation(h_pre)
    if normalize:
        f_n, i_n = normalized_gates(k_f, k_i)
        return Gates(a=f_n, b=i_n * cand)
    return Gates(a=jax.nn.sigmoid(k_f), b=jax.nn.sigmoid(k_i) * cand)


def _glrnn_gates(pre: Array, d_h: int, input_activation, gate_activation,
                 tied: bool) -> Gates:
    """``pre`` = [candidate, input gate] (tied) or [candidate, input, forget]."""
    del d_h
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


# ----------------------------------------------------------------------------
# Layers.

_COMMON_ATTRIBUTES = """
      use_true_recurrence: gates and candidate also see ``h_{t-1}`` through
        a recurrent kernel ``recurrent_kernel`` (initialised to zero); runs
        sequentially.
      reverse: run from the last step to the first (the carry is then the
        state at step 0).
      scan_impl: a :class:`flax_minrnn.scan.ScanImpl` name; never changes the
        parameters, only speed (ignored in true-recurrence mode).
      sequence_axis: a mesh axis name: the time axis is split over it
        (:func:`flax_minrnn.parallel.sequence_parallel_scan`; the mesh is the
        context's, ``jax.set_mesh``); ``None``: one device. Same parameters.
      use_bias: whether ``in_proj`` (and ``out_proj``) have a bias.
      dtype: compute dtype of the projections (``None``: the input's). Gates
        and the state are float32 regardless.
      param_dtype: parameter dtype.
      kernel_init, bias_init: initialisers of the projections."""


class MinGRU(nn.Module):
    """minGRU (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201).

    Gates depend on ``x_t`` only, so the recurrence is linear in ``h``::

        z_t  = sigmoid(W_z x_t + b_z)
        h~_t = W_h x_t + b_h              (or g(W_h x_t + b_h), g > 0)
        h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t
        y_t  = out_proj(h_t)              (only when d_h != d_model)

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

    d_h: Optional[int] = None
    d_model: Optional[int] = None
    expansion_factor: float = 1.0
    use_out_proj: Optional[bool] = None
    candidate_activation: Optional[Callable[[Array], Array]] = None
    forget_bias: float = 0.0
    use_true_recurrence: bool = False
    reverse: bool = False
    scan_impl: str = "auto"
    sequence_axis: Optional[str] = None
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    n_proj = 2  # [z logit, candidate]

    def state_size(self, d_in: int) -> int:
        """The state width ``d_h`` for inputs of width ``d_in``."""
        return _expanded_width(self, d_in)

    def initialize_carry(self, input_shape: Sequence[int]) -> Array:
        """Zero state ``(batch, d_h)`` for inputs of shape ``(batch, ..., d_in)``.

        Needs no parameters and no RNG.
        """
        return _zero_carry(self, input_shape)

    @nn.compact
    def __call__(self, x: Array, carry: Optional[Array] = None, *,
                 seq_lengths: Optional[Array] = None, mask: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[Array, Array]:
        """Runs the layer; returns ``(carry, y)``.

        Args:
          x: float ``(batch, time, d_in)``.
          carry: float32 ``(batch, d_h)`` or ``None`` (zeros).
          seq_lengths: int ``(batch,)`` valid lengths, or
          mask: bool ``(batch, time)`` valid steps.
          reset: bool ``(batch, time)``, True where a new document starts.
        """
        checks.check_input(x)
        d_h = self.state_size(x.shape[-1])
        out_features = _out_features(self, x, d_h)
        h_last, y, valid = run_recurrence(
            self, x, carry, d_h=d_h, n_proj=self.n_proj,
            gate_fn=functools.partial(_mingru_gates,
                                      candidate_activation=self.candidate_activation),
            native_gates=("mingru", self.candidate_activation),
            bias_offsets={0: -self.forget_bias} if self.forget_bias else {},
            seq_lengths=seq_lengths, mask=mask, reset=reset,
            out_features=out_features)
        return h_last, y if out_features is None else _zero_invalid(y, valid)


class MinLSTM(nn.Module):
    """minLSTM (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201).

    Forget and input gates depend on ``x_t`` only::

        f_t  = sigmoid(W_f x_t + b_f),   i_t = sigmoid(W_i x_t + b_i)
        f'_t = f_t / (f_t + i_t),        i'_t = i_t / (f_t + i_t)   (normalised)
        h~_t = W_h x_t + b_h              (or g(...) for positive states)
        h_t  = f'_t * h_{t-1} + i'_t * h~_t
        y_t  = out_proj(h_t)              (only when d_h != d_model)

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

    d_h: Optional[int] = None
    d_model: Optional[int] = None
    expansion_factor: float = 1.0
    use_out_proj: Optional[bool] = None
    normalize_gates: bool = True
    candidate_activation: Optional[Callable[[Array], Array]] = None
    forget_bias: float = 0.0
    use_true_recurrence: bool = False
    reverse: bool = False
    scan_impl: str = "auto"
    sequence_axis: Optional[str] = None
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    n_proj = 3  # [forget logit, input logit, candidate]

    def state_size(self, d_in: int) -> int:
        """The state width ``d_h`` for inputs of width ``d_in``."""
        return _expanded_width(self, d_in)

    def initialize_carry(self, input_shape: Sequence[int]) -> Array:
        """Zero state ``(batch, d_h)``; needs no parameters and no RNG."""
        return _zero_carry(self, input_shape)

    @nn.compact
    def __call__(self, x: Array, carry: Optional[Array] = None, *,
                 seq_lengths: Optional[Array] = None, mask: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[Array, Array]:
        """Runs the layer; returns ``(carry, y)`` (arguments as :class:`MinGRU`)."""
        checks.check_input(x)
        d_h = self.state_size(x.shape[-1])
        out_features = _out_features(self, x, d_h)
        h_last, y, valid = run_recurrence(
            self, x, carry, d_h=d_h, n_proj=self.n_proj,
            gate_fn=functools.partial(_minlstm_gates,
                                      candidate_activation=self.candidate_activation,
                                      normalize=self.normalize_gates),
            native_gates=("minlstm" if self.normalize_gates else "minlstm_unnormalized",
                          self.candidate_activation),
            bias_offsets={0: self.forget_bias} if self.forget_bias else {},
            seq_lengths=seq_lengths, mask=mask, reset=reset,
            out_features=out_features)
        return h_last, y if out_features is None else _zero_invalid(y, valid)


def _expanded_width(layer, d_in: int) -> int:
    checks.check_positive_or_none("d_h", layer.d_h)
    checks.check_positive_or_none("d_model", layer.d_model)
    checks.check_positive_or_none("expansion_factor", layer.expansion_factor)
    if layer.d_h is not None:
        return layer.d_h
    return max(1, int(round(layer.expansion_factor * d_in)))


def _zero_carry(layer, input_shape: Sequence[int]) -> Array:
    return jnp.zeros((input_shape[0], layer.state_size(input_shape[-1])),
                     checks.state_dtype(layer.dtype or jnp.float32, layer.param_dtype))


def _out_features(layer, x: Array, d_h: int) -> Optional[int]:
    """MinGRU/MinLSTM: the width of ``out_proj``, or ``None`` without one."""
    d_out = layer.d_model or x.shape[-1]
    use_out_proj = layer.use_out_proj
    if use_out_proj is None:
        use_out_proj = d_h != d_out
    if not use_out_proj and d_h != d_out:
        raise ValueError(
            f"use_out_proj=False needs d_h == d_model, got d_h={d_h}, d_model={d_out}")
    return d_out if use_out_proj else None


class GatedLinearRNN(nn.Module):
    """Gated linear RNN (Katsch 2023, "GateLoop", arXiv 2311.01927).

    The fields and parameter layout follow the flax-gated-linear-rnn package
    (convert its params with :func:`flax_minrnn.migrate.from_flax_gated_linear_rnn`)::

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

    d_h: Optional[int] = None
    d_model: Optional[int] = None
    input_activation: Callable[[Array], Array] = nn.tanh
    hidden_activation: Callable[[Array], Array] = nn.tanh
    gate_activation: Callable[[Array], Array] = nn.sigmoid
    use_true_recurrence: bool = False
    use_tied_gates: bool = True
    forget_bias: float = 0.0
    reverse: bool = False
    scan_impl: str = "auto"
    sequence_axis: Optional[str] = None
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @property
    def n_proj(self) -> int:
        return 3 if self.use_tied_gates else 4

    def state_size(self, d_in: int) -> int:
        """The state width ``d_h`` (independent of ``d_in``)."""
        del d_in
        if self.d_h is None:
            raise ValueError("GatedLinearRNN needs d_h (the state width)")
        checks.check_positive_or_none("d_h", self.d_h)
        checks.check_positive_or_none("d_model", self.d_model)
        return self.d_h

    def initialize_carry(self, input_shape: Sequence[int]) -> Array:
        """Zero state ``(batch, d_h)``; needs no parameters and no RNG."""
        return _zero_carry(self, input_shape)

    @nn.compact
    def __call__(self, x: Array, carry: Optional[Array] = None, *,
                 seq_lengths: Optional[Array] = None, mask: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[Array, Array]:
        """Runs the layer; returns ``(carry, y)`` (arguments as :class:`MinGRU`)."""
        checks.check_input(x)
        d_h = self.state_size(x.shape[-1])
        if self.use_tied_gates:
            offsets = {1: -self.forget_bias} if self.forget_bias else {}
        else:
            offsets = {2: self.forget_bias} if self.forget_bias else {}
        h_last, y, valid = run_recurrence(
            self, x, carry, d_h=d_h, n_proj=self.n_proj,
            gate_fn=functools.partial(_glrnn_gates, d_h=d_h,
                                      input_activation=self.input_activation,
                                      gate_activation=self.gate_activation,
                                      tied=self.use_tied_gates),
            output_gate=lambda h, o: self.hidden_activation(h) * self.gate_activation(o),
            out_features=self.d_model or d_h, bias_offsets=offsets,
            seq_lengths=seq_lengths, mask=mask, reset=reset)
        return h_last, _zero_invalid(y, valid)


def layer_scan(module) -> Callable[..., Tuple[Array, Array]]:
    """The scan a layer runs: ``linear_scan``, or the sequence-parallel one.

    A layer whose ``sequence_axis`` field is a mesh axis name gets
    :func:`sequence_parallel_scan` over that axis (same call signature);
    ``None`` (or no such field) gets :func:`flax_minrnn.scan.linear_scan`.

    Raises:
      ValueError: ``sequence_axis`` together with ``use_true_recurrence``
        (a true recurrence runs one step at a time: there is nothing to
        split).
    """
    axis = getattr(module, "sequence_axis", None)
    if axis is None:
        return scan_lib.linear_scan
    if getattr(module, "use_true_recurrence", False):
        raise ValueError(
            f"sequence_axis={axis!r} needs use_true_recurrence=False (a true "
            "recurrence runs one step at a time)")
    return functools.partial(parallel_lib.sequence_parallel_scan, axis_name=axis)

