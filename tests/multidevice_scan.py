"""Sequence-parallel scan on 8 host devices (run by tests/test_parallel.py).

Not collected by the normal suite (the name does not start with ``test_``):
``test_parallel.py`` runs it in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

Every check compares :func:`flax_minrnn.ops.parallel.sequence_parallel_scan` on
2, 4 and 8 shards with the unsharded :func:`flax_minrnn.ops.scan.linear_scan`
(outputs and gradients under random cotangents on ``h`` and ``h_last``) and
the outputs with the float64 loop of ``reference.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flax_minrnn.training import mesh as parallel
from flax_minrnn.ops import parallel as ops_parallel
from flax_minrnn.backends.pallas import pallas_available
from flax_minrnn.ops.scan import linear_scan
from reference import linear_recurrence

from conftest import TOL

B, T = 4, 16


def setup_module():
    assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"


def _resets(n_shards: int) -> np.ndarray:
    """Document starts on both sides of every shard boundary, per row."""
    length = T // n_shards
    reset = np.zeros((B, T), bool)
    reset[0, 0] = True
    for k in range(1, n_shards):
        reset[k % B, k * length] = True            # at a boundary
        reset[(k + 1) % B, k * length - 1] = True  # one step before it
    reset[3, 5] = True
    return reset


def _inputs(rng, feat=(3,), positive=False):
    a = rng.uniform(0.2, 1.0, (B, T) + feat)
    b = rng.uniform(0.0, 1.0, (B, T) + feat) if positive else rng.normal(size=(B, T) + feat)
    h0 = rng.uniform(0.1, 1.0, (B,) + feat) if positive else rng.normal(size=(B,) + feat)
    cast = lambda x: jnp.asarray(x, jnp.float32)
    return cast(a), cast(b), cast(h0)


def _value_and_grads(scan, a, b, h0, g, g_last, **kw):
    """(h_last, h) and the gradients of sum(g h) + sum(g_last h_last)."""

    def loss(a, b, h0):
        h_last, h = scan(a, b, h0, **kw)
        return jnp.sum(g * h) + jnp.sum(g_last * h_last), (h_last, h)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        a, b, h0)
    return out, grads


def _check(mesh, n_shards, rng, *, feat=(3,), impl="auto", h0=True, reverse=False,
           reset=True, lengths=True, mask=False, positive=False, put=None):
    a, b, h0_ = _inputs(rng, feat, positive)
    kw = dict(impl=impl, reverse=reverse)
    ref_kw = dict(reverse=reverse)
    if reset:
        kw["reset"] = ref_kw["reset"] = _resets(n_shards)
    if lengths:
        kw["seq_lengths"] = jnp.asarray([T, 9, 0, T // n_shards + 1], jnp.int32)
        ref_kw["mask"] = np.arange(T)[None, :] < np.asarray(kw["seq_lengths"])[:, None]
    if mask:
        kw["mask"] = ref_kw["mask"] = rng.uniform(size=(B, T)) < 0.7
    h0_ = h0_ if h0 else jnp.zeros_like(h0_)
    g = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
    g_last = jnp.asarray(rng.normal(size=h0_.shape), jnp.float32)
    if put is not None:
        a, b, g = (jax.device_put(x, put) for x in (a, b, g))

    with jax.set_mesh(mesh):
        (h_last, h), grads = _value_and_grads(
            lambda *x, **k: ops_parallel.sequence_parallel_scan(*x, axis_name="seq", **k),
            a, b, h0_, g, g_last, **kw)
    (ref_last, ref_h), ref_grads = _value_and_grads(linear_scan, a, b, h0_, g, g_last, **kw)

    if put is None:
        assert h.sharding.spec == P(None, "seq")
    np.testing.assert_allclose(h, ref_h, **TOL["float32"])
    np.testing.assert_allclose(h_last, ref_last, **TOL["float32"])
    exact_last, exact_h = linear_recurrence(a, b, h0_, **ref_kw)
    np.testing.assert_allclose(h, exact_h, **TOL["float32"])
    np.testing.assert_allclose(h_last, exact_last, **TOL["float32"])
    for name, got, want in zip(("da", "db", "dh0"), grads, ref_grads):
        np.testing.assert_allclose(got, want, **TOL["float32"], err_msg=name)
    return h


def _mesh(n):
    return parallel.make_mesh((n,), ("seq",))


@pytest.mark.parametrize("n_shards", [2, 4, 8])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_resets_lengths_h0(n_shards, reverse):
    _check(_mesh(n_shards), n_shards, np.random.default_rng(n_shards), reverse=reverse)


@pytest.mark.parametrize("impl", ["associative", "sequential", "chunked", "pallas"])
def test_every_impl_on_4_shards(impl):
    if impl == "pallas" and not pallas_available():
        # Off a GPU the kernel is interpreted, which JAX cannot do inside shard_map.
        with pytest.raises(NotImplementedError, match="scan_impl='pallas'.*'chunked'"):
            _check(_mesh(4), 4, np.random.default_rng(7), impl=impl)
        return
    _check(_mesh(4), 4, np.random.default_rng(7), impl=impl, reverse=impl == "chunked")


def test_mask_no_reset_zero_h0_feature_matrix():
    _check(_mesh(8), 8, np.random.default_rng(3), feat=(2, 3), reset=False,
           lengths=False, mask=True, h0=False, reverse=True)


def test_products_underflow_to_zero():
    """Tiny gates: shard products are exactly 0 in float32; still exact."""
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.uniform(1e-30, 1e-20, (B, T, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(B, T, 2)), jnp.float32)
    h0 = jnp.ones((B, 2), jnp.float32)
    with jax.set_mesh(_mesh(8)):
        h_last, h = ops_parallel.sequence_parallel_scan(a, b, h0, axis_name="seq")
    ref_last, ref_h = linear_scan(a, b, h0)
    np.testing.assert_allclose(h, ref_h, **TOL["float32"])
    np.testing.assert_allclose(h_last, ref_last, **TOL["float32"])


def test_batch_split_over_a_data_axis():
    """A (data=2, seq=4) mesh: the batch stays split over 'data' (automatic)."""
    mesh = parallel.make_mesh((2, 4), ("data", "seq"))
    h = _check(mesh, 4, np.random.default_rng(11), put=NamedSharding(mesh, P("data", "seq")))
    assert h.sharding.spec == P("data", "seq")


def test_explicit_mesh_argument_and_bad_inputs():
    mesh = _mesh(4)
    a, b, h0 = _inputs(np.random.default_rng(0))
    h_last, h = ops_parallel.sequence_parallel_scan(a, b, h0, axis_name="seq", mesh=mesh)
    np.testing.assert_allclose(h, linear_scan(a, b, h0)[1], **TOL["float32"])
    with pytest.raises(ValueError, match=r"length 10\).*4 devices of mesh axis 'seq'"):
        ops_parallel.sequence_parallel_scan(a[:, :10], b[:, :10], h0, axis_name="seq", mesh=mesh)
    with pytest.raises(ValueError, match=r"'time' is not an axis.*\('seq',\)"):
        ops_parallel.sequence_parallel_scan(a, b, h0, axis_name="time", mesh=mesh)
    # linear_scan's own validation and messages.
    with pytest.raises(ValueError, match="h0 must have shape"):
        ops_parallel.sequence_parallel_scan(a, b, h0[:, :2], axis_name="seq", mesh=mesh)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops_parallel.sequence_parallel_scan(a, b, h0, axis_name="seq", mesh=mesh,
                                            impl="heinsen", reset=_resets(4))
