"""``Dense``: the parameters and result of ``flax.linen.Dense``."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_minrnn.ops import linear as linear_lib

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

__all__ = ["Dense", "DenseParams"]


# ``x @ kernel`` whose kernel gradient is one fast product (ops/linear.py).
matmul = linear_lib.matmul


def _dense_params(module: nn.Module, in_features: int):
    """Declares ``kernel`` (and ``bias``) on ``module`` exactly as nn.Dense does."""
    kernel = module.param("kernel", module.kernel_init, (in_features, module.features),
                          module.param_dtype)
    bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
            if module.use_bias else None)
    return kernel, bias


def add_bias(y: Array, bias: Optional[Array]) -> Array:
    if bias is None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class Dense(nn.Module):
    """``y = x @ kernel + bias``: the parameters and result of ``nn.Dense``.

    Same parameter names, shapes and initialisers as :class:`flax.linen.Dense`
    (checkpoints are interchangeable); its derivatives are those of
    :func:`flax_minrnn.ops.linear.matmul`.  ``x``, ``kernel`` and ``bias`` are cast to ``dtype``.

    Attributes:
      features: output width.
      use_bias: add ``bias``.
      dtype: compute dtype (``None``: promote the input and params).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initialisers.
    """

    features: int
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel, bias = _dense_params(self, x.shape[-1])
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return add_bias(matmul(x, kernel), bias)


class DenseParams(nn.Module):
    """The parameters of a :class:`Dense` layer, without applying it.

    For layers that fuse the bias into a later step (the recurrent layers add
    ``in_proj``'s bias inside the scan loop, so the biased pre-activations are
    never stored).  ``__call__(in_features)`` returns ``(kernel, bias)``
    (``bias`` is ``None`` without ``use_bias``).
    """

    features: int
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, in_features: int):
        return _dense_params(self, in_features)

