"""The Pallas scan kernel against the float64 reference, in interpret mode.

On a CPU Pallas runs the kernel in its interpreter, which checks the kernel's
indexing and chunk logic exactly; ``benchmarks/gpu/bench.py`` checks
the compiled kernel on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_minrnn import MinGRU
from flax_minrnn.backends import pallas as kernel
from flax_minrnn.ops.scan import linear_scan
from reference import linear_recurrence, linear_recurrence_vjp, rel_err


def _inputs(rng, shape):
    a = jnp.asarray(rng.uniform(0.5, 1.0, shape), jnp.float32)
    b = jnp.asarray(rng.normal(size=shape), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(shape[0],) + shape[2:]), jnp.float32)
    return a, b, h0


@pytest.mark.parametrize("num_chunks", [1, 2, 8])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_kernel_matches_reference(rng, num_chunks, reverse):
    a, b, h0 = _inputs(rng, (2, 48, 24))  # d = 24: lane blocks of 8
    h_last, h = kernel.linear_scan_pallas(a, b, h0, reverse=reverse, interpret=True,
                                          num_chunks=num_chunks)
    ref_last, ref = linear_recurrence(a, b, h0, reverse=reverse)
    assert rel_err(h, ref) <= 1e-5 and rel_err(h_last, ref_last) <= 1e-5


def test_chunk_count_rule():
    # Few lanes: chunk the time axis (powers of two, >= 16 steps per chunk).
    assert kernel._num_chunks(4096, 8 * 2) == 64
    # Many lanes already fill the GPU: one pass.
    assert kernel._num_chunks(4096, 64 * 8 * 2) == 1
    # Odd lengths cannot be split evenly.
    assert kernel._num_chunks(1001, 1) == 1


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_impl_pallas_outputs_and_gradients(rng, reverse):
    """impl='pallas' through linear_scan's shared adjoint (features (3, 2))."""
    a, b, h0 = _inputs(rng, (2, 32, 3, 2))
    g = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
    g_last = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)

    def loss(a, b, h0):
        h_last, h = linear_scan(a, b, h0, impl="pallas", reverse=reverse)
        return jnp.sum(h * g) + jnp.sum(h_last * g_last)

    _, ref = linear_recurrence(a, b, h0, reverse=reverse)
    assert rel_err(linear_scan(a, b, h0, impl="pallas", reverse=reverse)[1], ref) <= 1e-5
    grads = jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)
    want = linear_recurrence_vjp(a, h0, ref, np.asarray(g, np.float64),
                                 np.asarray(g_last, np.float64), reverse=reverse)
    for name, got, w in zip(("da", "db", "dh0"), grads, want):
        assert rel_err(got, w) <= 2e-5, name


def test_layer_with_pallas_equals_sequential(rng):
    x = jnp.asarray(rng.normal(size=(2, 20, 6)), jnp.float32)
    layer = MinGRU(d_h=8, d_model=6, scan_impl="pallas")
    params = layer.init(jax.random.key(0), x)
    reset = jnp.asarray(rng.uniform(size=(2, 20)) < 0.2)
    lengths = jnp.asarray([20, 11])
    got = layer.apply(params, x, reset=reset, seq_lengths=lengths)
    want = layer.clone(scan_impl="sequential").apply(params, x, reset=reset,
                                                     seq_lengths=lengths)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_not_available_on_cpu():
    assert not kernel.pallas_available("cpu")


def test_bad_shapes():
    with pytest.raises(ValueError, match="batch, time, d"):
        kernel.linear_scan_pallas(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.ones((2,)),
                                  interpret=True)
    with pytest.raises(ValueError, match="must divide"):
        kernel.linear_scan_pallas(jnp.ones((1, 6, 2)), jnp.ones((1, 6, 2)),
                                  jnp.ones((1, 2)), interpret=True, num_chunks=4)


@pytest.mark.parametrize("num_chunks", [0, -2, 2.0, True])
def test_num_chunks_must_be_a_positive_int(num_chunks):
    with pytest.raises(ValueError, match=f"num_chunks must be an integer >= 1, got {num_chunks}"):
        kernel.linear_scan_pallas(jnp.ones((1, 6, 2)), jnp.ones((1, 6, 2)),
                                  jnp.ones((1, 2)), interpret=True, num_chunks=num_chunks)


@pytest.mark.parametrize("name", ["a", "b", "h0"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int32])
def test_inputs_must_share_a_float32_or_float64_dtype(name, dtype):
    """The kernels scan float32 (or float64) only; linear_scan(impl="pallas")
    casts, the kernel itself names the argument."""
    args = dict(a=jnp.ones((1, 6, 2)), b=jnp.ones((1, 6, 2)), h0=jnp.ones((1, 2)))
    args[name] = args[name].astype(dtype)
    with pytest.raises(TypeError, match=f"one dtype, float32 or float64; {name} is "):
        kernel.linear_scan_pallas(**args, interpret=True)
