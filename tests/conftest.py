"""Test configuration: strict numerics so silent broadcasting is an error."""

import os

# Compile settings for the tests only. The tests' shapes are tiny, so XLA's
# compile time dominates their run time; these settings shorten it. They
# compute the same functions, but rounding can differ in the last bit from
# one compiled program to another, so a test that claims bit-equality
# compares outputs of one executable (or exact inputs). They go into the
# environment, so the subprocesses the tests start (CLI, multi-device,
# kill-and-resume) inherit them. The benchmarks and the library itself keep
# XLA's defaults.
#   * XLA:CPU's newer fusion emitters compile more slowly than the classic
#     ones at these sizes;
#   * JAX_DISABLE_MOST_OPTIMIZATIONS turns off XLA's heavier passes.
_TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if _TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_TEST_XLA_FLAGS}".strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the environment above)
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
