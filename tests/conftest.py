"""Test configuration: strict numerics so silent broadcasting is an error."""

import jax
import numpy as np
import pytest

# Implicit rank promotion ("silent broadcasting") and implicit dtype promotion
# raise inside the library's code paths under test.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# Tiny shapes: compile time dominates, so let XLA skip most optimisations.
jax.config.update("jax_disable_most_optimizations", True)

# Tolerances, one table keyed by dtype: (rtol, atol) for comparisons of a
# float32 / bfloat16 computation against a float64 reference.
TOL = {
    "float32": dict(rtol=1e-5, atol=1e-6),
    "bfloat16": dict(rtol=2e-2, atol=2e-2),
}


@pytest.fixture
def rng():
    return np.random.default_rng(0)
