"""Module init/apply under jit: compiles faster than eager op-by-op dispatch."""

import jax
import jax.numpy as jnp
import numpy as np


def jit_apply(module, *args, **kwargs):
    return jax.jit(module.apply, static_argnames=("deterministic",))(*args, **kwargs)


def jit_init(module, *args, **kwargs):
    return jax.jit(module.init)(*args, **kwargs)


def jit_tangents(module, params, x, seed=6):
    """Forward-mode tangents of ``module.apply`` at ``(params, x)`` along
    fixed random tangents (each in its input's dtype)."""
    rng = np.random.default_rng(seed)
    tangents = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype),
                            (params, x))
    return jax.jit(lambda a, t: jax.jvp(module.apply, a, t)[1])((params, x), tangents)
