"""The Real-Gated Linear Recurrent Unit of Griffin (De et al. 2024, arXiv 2402.19427).

:class:`RGLRU` is the recurrence of Griffin / RecurrentGemma's recurrent
blocks; it runs on :func:`flax_minrnn.ops.scan.linear_scan`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_minrnn.nn import gates as gates_lib
from flax_minrnn.ops import checks
from flax_minrnn.ops import scan as scan_lib

Array = jax.Array
Dtype = Any

__all__ = ["RGLRU", "BlockDiagonalLinear", "rglru_lambda_init"]


def _check_radii(min_rad, max_rad) -> None:
    """``0 < min_rad <= max_rad < 1`` (outside it ``Lambda`` is NaN)."""
    checks.check_real("min_rad", min_rad, low=0.0, high=1.0)
    checks.check_real("max_rad", max_rad, low=0.0, high=1.0)
    if min_rad > max_rad:
        raise ValueError(f"min_rad must be <= max_rad (0 < min_rad <= max_rad < 1), "
                         f"got min_rad={min_rad!r}, max_rad={max_rad!r}")


def rglru_lambda_init(min_rad: float = 0.9, max_rad: float = 0.999, eps: float = 1e-8):
    """Initialiser of ``Lambda`` with ``a = exp(-softplus(Lambda))`` in ``[min_rad, max_rad]``.

    ``a^2`` is drawn uniformly from ``[min_rad^2, max_rad^2]`` (uniform on the
    ring's area, the scheme of the LRU (Orvieto et al. 2023) that the
    recurrentgemma reference implementation uses), then
    ``Lambda = softplus^{-1}(-log a) = log(expm1(-log a))``.

    Raises:
      ValueError: unless ``0 < min_rad <= max_rad < 1``.
    """
    _check_radii(min_rad, max_rad)

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        log_a = 0.5 * jnp.log(u * (max_rad ** 2 - min_rad ** 2) + min_rad ** 2 + eps)
        return jnp.log(jnp.expm1(-log_a)).astype(dtype)

    return init


class BlockDiagonalLinear(nn.Module):
    """``y = x W + b`` with ``W`` block-diagonal: ``num_blocks`` blocks of ``width / num_blocks``.

    Parameters ``kernel`` ``(num_blocks, k, k)`` (normal, variance
    ``w_init_variance_scale / k``) and ``bias`` ``(num_blocks, k)`` (zeros).
    """

    num_blocks: int
    w_init_variance_scale: float = 1.0
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        checks.check_int_at_least("num_blocks", self.num_blocks, 1)
        checks.check_positive_number("w_init_variance_scale", self.w_init_variance_scale)
        if width % self.num_blocks:
            raise ValueError(f"num_blocks={self.num_blocks} must divide the input width {width}")
        k = width // self.num_blocks
        kernel = self.param("kernel", nn.initializers.normal(
            stddev=math.sqrt(self.w_init_variance_scale / k)),
            (self.num_blocks, k, k), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.num_blocks, k), self.param_dtype)
        dtype = self.dtype or x.dtype
        xb = x.astype(dtype).reshape(x.shape[:-1] + (self.num_blocks, k))
        y = jnp.einsum("...hi,hij->...hj", xb, kernel.astype(dtype))
        y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 2) + bias.shape)
        return y.reshape(x.shape)



class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit (De et al. 2024, "Griffin", arXiv 2402.19427).

    For an input ``x_t`` of width ``D`` (the state has the same width)::

        r_t   = sigmoid(W_a x_t + b_a)                 recurrence gate
        i_t   = sigmoid(W_x x_t + b_x)                 input gate
        log a_t = -c * softplus(Lambda) * r_t          c = 8, so a_t = a^(c r_t)
        h_t   = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
        y_t   = h_t

    ``W_a``, ``W_x`` are block-diagonal with ``num_heads`` blocks of
    ``D / num_heads``.  ``Lambda`` (a ``D``-vector) starts with
    ``a = exp(-softplus(Lambda))`` in ``[0.9, 0.999]`` (:func:`rglru_lambda_init`).
    ``exp(-softplus(Lambda)) = sigmoid(-Lambda)``: the paper writes
    ``a = sigmoid(Lambda)``, so ``Lambda`` here (recurrentgemma's convention,
    and its checkpoints') has the opposite sign.
    ``1 - a_t^2`` is computed as ``-expm1(2 log a_t)`` (exact near ``a = 1``)
    and its square root has a derivative bounded by ``max_sqrt_gradient``
    (:func:`sqrt_bounded_derivative`), so bfloat16 training stays finite.

    Documents: at a step with ``reset`` the state restarts: ``a_t = 0`` and the
    multiplier ``sqrt(1 - a_t^2)`` is replaced by 1 (``h_t = i_t * x_t``).  The
    first step of a call without ``reset`` continues from ``carry`` (zeros when
    ``None``) with the usual multiplier; :class:`Griffin` marks the token at
    position 0 as a reset, as the reference implementations do.

    Gates and the state are float32 (float64 for float64 inputs) whatever
    ``dtype``; every sequence length, including ``T = 1`` decoding, goes
    through the same single call of :func:`flax_minrnn.ops.scan.linear_scan`.

    Usage::

        layer = RGLRU(num_heads=4)
        params = layer.init(key, x)                  # x: (batch, T, 256)
        carry, y = layer.apply(params, x)            # carry (batch, 256) float32
        carry, y2 = layer.apply(params, x2, carry)   # continue the sequence

    Parameters: ``a_param`` (``Lambda``, ``(D,)``), ``input_gate`` and
    ``a_gate`` (:class:`BlockDiagonalLinear`, ``kernel (H, D/H, D/H)``, ``bias
    (H, D/H)``).

    Attributes:
      num_heads: number of diagonal blocks of the gate weights; divides ``D``.
      c: the constant ``c`` (8 in the paper); a finite number ``> 0``.
      min_rad, max_rad: initial range of ``a = exp(-softplus(Lambda))``
        (defaults 0.9 and 0.999); ``0 < min_rad <= max_rad < 1``.
      max_sqrt_gradient: bound of the derivative of the square root (``> 0``,
        default 1000).
      w_init_variance_scale: variance scale of the gate weights (fan-in;
        ``> 0``, default 1).
      scan_impl: a :class:`flax_minrnn.ops.scan.ScanImpl` name (``'native'``
        runs ``'chunked'``: the compiled kernels cover MinGRU/MinLSTM gates
        only).
      dtype: compute dtype of the gate projections (``None``: the input's);
        ``y`` is returned in it.
      param_dtype: parameter dtype.
    """

    num_heads: int = 1
    c: float = 8.0
    min_rad: float = 0.9
    max_rad: float = 0.999
    max_sqrt_gradient: float = gates_lib.MAX_SQRT_GRADIENT
    w_init_variance_scale: float = 1.0
    scan_impl: str = "auto"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    def _check_attributes(self) -> None:
        """The settings (``ValueError`` naming the field and its range)."""
        checks.check_int_at_least("num_heads", self.num_heads, 1)
        checks.check_real("c", self.c, low=0.0)
        _check_radii(self.min_rad, self.max_rad)
        checks.check_positive_number("max_sqrt_gradient", self.max_sqrt_gradient)
        checks.check_positive_number("w_init_variance_scale", self.w_init_variance_scale)
        checks.check_float_dtype("dtype", self.dtype, optional=True)
        checks.check_float_dtype("param_dtype", self.param_dtype)

    def initialize_carry(self, input_shape: Sequence[int], input_dtype=jnp.float32) -> Array:
        """Zero state ``(batch, D)`` for inputs ``(batch, ..., D)`` of dtype
        ``input_dtype``; no params, no RNG.  float32, or float64 when the
        computation is (as the gated layers' ``initialize_carry``)."""
        self._check_attributes()
        return jnp.zeros((input_shape[0], input_shape[-1]),
                         checks.state_dtype(self.dtype or input_dtype, self.param_dtype))

    @nn.compact
    def __call__(self, x: Array, carry: Optional[Array] = None, *,
                 seq_lengths: Optional[Array] = None, mask: Optional[Array] = None,
                 reset: Optional[Array] = None) -> Tuple[Array, Array]:
        """Runs the RG-LRU; returns ``(carry, y)``.

        Args:
          x: float ``(batch, T, D)``.
          carry: float32 ``(batch, D)`` or ``None`` (zeros).
          seq_lengths: int ``(batch,)`` valid lengths, or
          mask: bool ``(batch, T)`` valid steps (invalid steps keep the state;
            their outputs are zero).
          reset: bool ``(batch, T)``, True where a new document starts.

        Returns:
          ``(carry, y)``: the state after the last valid step (float32) and
          ``y = h`` ``(batch, T, D)`` in the compute dtype.
        """
        checks.check_input(x)
        batch, seq_len, width = x.shape
        self._check_attributes()
        checks.check_param_width(self, x, "a_param")
        if width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the input width {width}")
        scan_lib.resolve_impl(self.scan_impl, seq_len, name="scan_impl")
        dtype = self.dtype or x.dtype
        s_dtype = checks.state_dtype(dtype, self.param_dtype)
        h0 = checks.check_carry(carry, batch, width, s_dtype)
        valid = checks.valid_mask(batch, seq_len, seq_lengths, mask)
        starts = None  # The steps that start a document (the gates skip their scale there).
        if reset is not None:
            reset = checks.check_bool_bt("reset", reset, batch, seq_len)
            # A reset on a padded step starts the next valid one.
            starts = scan_lib.reset_boundaries(reset, False, valid)

        lam = self.param("a_param", rglru_lambda_init(self.min_rad, self.max_rad), (width,),
                         self.param_dtype)
        gate = lambda name: BlockDiagonalLinear(
            self.num_heads, self.w_init_variance_scale, dtype=dtype,
            param_dtype=self.param_dtype, name=name)
        x = x.astype(dtype)
        # Padded steps: zero inputs, so garbage there cannot reach a gradient.
        x = scan_lib.zero_invalid(x, valid)
        a, b = gates_lib.rglru_gates(x.astype(s_dtype), gate("input_gate")(x).astype(s_dtype),
                                     gate("a_gate")(x).astype(s_dtype), lam.astype(s_dtype),
                                     self.c, self.max_sqrt_gradient, starts)
        h_last, h = scan_lib.linear_scan(a, b, h0, impl=self.scan_impl, reset=reset, mask=valid)
        return h_last, h.astype(dtype)
