"""Test configuration: strict numerics so silent broadcasting is an error."""

import atexit
import os
import shutil
import tempfile

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
#   * JAX_DISABLE_MOST_OPTIMIZATIONS turns off XLA's heavier passes;
#   * a compilation cache shared by the xdist workers and the subprocesses,
#     fresh for each session (removed at exit) and keeping every program
#     however fast it compiled: many tests compile the same programs (the
#     same tiny train step in several runs, the same CLI command in several
#     processes), and a cached program is the same executable, so it
#     computes bit-identically.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="flax_minrnn_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
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
