"""Module init/apply under jit: compiles faster than eager op-by-op dispatch."""

import jax


def jit_apply(module, *args, **kwargs):
    return jax.jit(module.apply, static_argnames=("deterministic",))(*args, **kwargs)


def jit_init(module, *args, **kwargs):
    return jax.jit(module.init)(*args, **kwargs)
