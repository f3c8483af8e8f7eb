"""flax_minrnn.ops.scan and ops.gated against the float64 NumPy references in
tests/reference.py."""

import jax

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import flax_minrnn as fm
from flax_minrnn.ops import gated as gated_lib
from flax_minrnn.ops import scan as scan_lib
from flax_minrnn.ops.gated import gated_scan
from flax_minrnn.ops.scan import ScanImpl, linear_scan
from reference import (heinsen_scan, linear_recurrence, linear_recurrence_vjp, log_space_scan,
                       rel_err)

LINEAR_IMPLS = ["associative", "sequential", "chunked"]
# The Pallas kernel runs in Pallas's interpreter on CPU (slow: short sequences).
ALL_IMPLS = LINEAR_IMPLS + ["pallas"]


def make_inputs(rng, shape, *, positive=False, h0_sign="pos"):
    """Gates in (0.5, 1) (a realistic forget-gate range), inputs, h0."""
    a = rng.uniform(0.5, 1.0, shape)
    b = rng.uniform(0.0, 1.0, shape) if positive else rng.normal(size=shape)
    h0 = {"zero": np.zeros, "pos": lambda s: rng.uniform(0.1, 2.0, s),
          "neg": lambda s: -rng.uniform(0.1, 2.0, s)}[h0_sign]((shape[0],) + shape[2:])
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return f32(a), f32(b), f32(h0)


def _masked_loop(a, b, h0, reset, mask, reverse):
    """Plain ``lax.scan`` of ``h = where(edge, 0, h) * a_t + b_t`` with padding
    (no library code; run in float64 as the autodiff reference). ``reset``
    and ``mask`` are NumPy (batch, T); going backward, the reset edge of step
    ``t`` is ``reset[:, t + 1]``; an edge on a padded step waits for the next
    valid one."""
    edges = reset if not reverse else np.concatenate(
        [reset[:, 1:], np.zeros_like(reset[:, :1])], axis=1)

    def step(carry, xs):
        h, pending = carry
        a_t, b_t, e_t, m_t = xs
        e_t = e_t | pending
        h_new = jnp.where(e_t[:, None], 0.0, h) * a_t + b_t
        h = jnp.where(m_t[:, None], h_new, h)
        return (h, e_t & ~m_t), jnp.where(m_t[:, None], h, 0.0)

    pending = jnp.zeros(mask.shape[:1], bool)
    (h, _), outs = jax.lax.scan(step, (h0, pending),
                                (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1),
                                 jnp.asarray(edges.T), jnp.asarray(mask.T)),
                                reverse=reverse)
    return h, jnp.swapaxes(outs, 0, 1)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("impl, seq_len", [
    (impl, t) for impl in ALL_IMPLS for t in (1, 7, 64, 333)] + [
    ("sequential", 4096), ("chunked", 4096), ("associative", 4096)])
def test_matches_float64_reference(rng, impl, seq_len, reverse):
    for h0_sign in ("zero", "pos", "neg"):
        a, b, h0 = make_inputs(rng, (2, seq_len, 3), h0_sign=h0_sign)
        ref_last, ref = linear_recurrence(a, b, h0, reverse=reverse)
        h_last, h = linear_scan(a, b, h0, impl=impl, reverse=reverse)
        assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32
        assert rel_err(h, ref) <= 1e-5, (h0_sign, rel_err(h, ref))
        assert rel_err(h_last, ref_last) <= 1e-5


@pytest.mark.parametrize("impl", [
    pytest.param("associative", marks=pytest.mark.slow), "sequential",
    pytest.param("chunked", marks=pytest.mark.slow)])
def test_no_error_growth_at_65536(rng, impl):
    seq_len = 65_536
    a = jnp.asarray(rng.uniform(0.9, 1.0, (1, seq_len, 2)), jnp.float32)
    b = jnp.asarray(rng.uniform(0.0, 1.0, (1, seq_len, 2)), jnp.float32)
    _, ref = linear_recurrence(a, b)
    _, h = linear_scan(a, b, impl=impl)
    assert rel_err(h, ref) <= 1e-5


def test_log_space_forms_agree_in_their_domain_and_heinsen_loses_digits(rng):
    """Why the library has no log-space scan: the two log-space forms of the
    paper (tests/reference.py) agree with the linear scan only for positive
    states, and the appendix's cumsum form loses digits as T grows, while the
    linear scan does not."""
    errs = {}
    for seq_len in (256, 65_536):
        # The cumulative sum of log a reaches about -3400 at T = 65,536, where
        # float32 keeps only ~1e-4 absolute precision of it.
        a = jnp.asarray(rng.uniform(0.9, 1.0, (1, seq_len, 2)), jnp.float32)
        b = jnp.asarray(rng.uniform(0.0, 1.0, (1, seq_len, 2)), jnp.float32)
        _, ref = linear_recurrence(a, b)
        errs[seq_len] = {"heinsen": rel_err(heinsen_scan(a, b), ref),
                         "log": rel_err(log_space_scan(a, b), ref),
                         "linear": rel_err(linear_scan(a, b, impl="sequential")[1], ref)}
    assert errs[65_536]["log"] <= 1e-5 and errs[65_536]["linear"] <= 1e-5
    assert errs[65_536]["heinsen"] > 10 * errs[256]["heinsen"]
    assert errs[65_536]["heinsen"] > 10 * errs[65_536]["linear"]
    # Outside the domain (a negative input) the log-space forms are NaN.
    b_neg = jnp.asarray(rng.normal(size=(1, 8, 2)), jnp.float32)
    a8 = jnp.full((1, 8, 2), 0.5, jnp.float32)
    assert bool(jnp.any(jnp.isnan(log_space_scan(a8, b_neg))))
    assert bool(jnp.all(jnp.isfinite(linear_scan(a8, b_neg)[1])))


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_bfloat16_inputs_accumulate_in_float32(rng, impl):
    a, b, h0 = make_inputs(rng, (2, 512, 4), positive=True)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    h_last, h = linear_scan(a16, b16, h0, impl=impl)
    assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32
    # Against the reference on the same (bf16-rounded) inputs, only float32
    # accumulation error remains ...
    _, ref16 = linear_recurrence(np.asarray(a16, np.float64),
                                 np.asarray(b16, np.float64), h0)
    assert rel_err(h, ref16) <= 1e-5
    # ... and against the float32 inputs, the bf16 rounding of the inputs.
    _, ref = linear_recurrence(a, b, h0)
    np.testing.assert_allclose(h, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_gradients_match_reference(rng, impl, reverse):
    a, b, h0 = make_inputs(rng, (2, 50, 3), h0_sign="neg")
    g = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
    g_last = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)

    def loss(a, b, h0):
        h_last, h = linear_scan(a, b, h0, impl=impl, reverse=reverse)
        return jnp.sum(h * g) + jnp.sum(h_last * g_last)

    grads = jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)
    _, h_ref = linear_recurrence(a, b, h0, reverse=reverse)
    refs = linear_recurrence_vjp(a, h0, h_ref, np.asarray(g, np.float64),
                                 np.asarray(g_last, np.float64), reverse=reverse)
    for name, got, want in zip(("da", "db", "dh0"), grads, refs):
        assert rel_err(got, want) <= 2e-5, (name, rel_err(got, want))


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_gradients_through_reset_and_mask_match_autodiff_of_reference(rng, impl):
    """With resets and padding, compare against autodiff of a plain jnp loop."""
    batch, seq_len, feat = 3, 20, 2
    a, b, h0 = make_inputs(rng, (batch, seq_len, feat), h0_sign="neg")
    reset = jnp.asarray(rng.uniform(size=(batch, seq_len)) < 0.2)
    lengths = jnp.asarray([20, 13, 0], jnp.int32)
    g = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
    g_last = jnp.asarray(rng.normal(size=h0.shape), jnp.float32)

    def loop(a, b, h0):  # independent of the library: a Python loop in jnp
        h, outs = h0, []
        for t in range(seq_len):
            valid = (t < lengths)[:, None]
            a_t = jnp.where(reset[:, t, None], 0.0, a[:, t])
            h_new = a_t * h + b[:, t]
            h = jnp.where(valid, h_new, h)
            outs.append(jnp.where(valid, h, 0.0))
        return h, jnp.stack(outs, 1)

    def loss(fn):
        def f(a, b, h0):
            h_last, h = fn(a, b, h0)
            return jnp.sum(h * g) + jnp.sum(h_last * g_last)
        return f

    ours = jax.grad(loss(lambda *x: linear_scan(*x, impl=impl, reset=reset,
                                                  seq_lengths=lengths)), (0, 1, 2))(a, b, h0)
    want = jax.grad(loss(loop), (0, 1, 2))(a, b, h0)
    for got, ref in zip(ours, want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_seq_lengths(rng, impl, reverse):
    batch, seq_len = 4, 16
    a, b, h0 = make_inputs(rng, (batch, seq_len, 3), positive=False)
    lengths = np.array([16, 9, 1, 0])
    h_last, h = linear_scan(a, b, h0, impl=impl, seq_lengths=jnp.asarray(lengths),
                            reverse=reverse)
    for i, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(h_last[i], h0[i])
            np.testing.assert_array_equal(h[i], 0.0)
            continue
        ref_last, ref = linear_recurrence(a[i:i + 1, :n], b[i:i + 1, :n],
                                          h0[i:i + 1], reverse=reverse)
        np.testing.assert_allclose(h_last[i], ref_last[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h[i, :n], ref[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(h[i, n:], 0.0)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_mask_skips_steps(rng, impl):
    a, b, h0 = make_inputs(rng, (3, 25, 2), positive=False)
    mask = rng.uniform(size=(3, 25)) < 0.6
    ref_last, ref = linear_recurrence(a, b, h0, mask=mask)
    h_last, h = linear_scan(a, b, h0, impl=impl, mask=jnp.asarray(mask))
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_last, ref_last, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_reset_equals_separate_documents(rng, impl, reverse):
    seq_len = 30
    a, b, _ = make_inputs(rng, (2, seq_len, 3), positive=False)
    starts = [[0, 7, 8, 19], [0, 29]]  # documents start here (step 0 too)
    reset = np.zeros((2, seq_len), bool)
    for i, s in enumerate(starts):
        reset[i, s] = True
    _, h = linear_scan(a, b, impl=impl, reset=jnp.asarray(reset), reverse=reverse)
    for i, s in enumerate(starts):
        bounds = s + [seq_len]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            _, ref = linear_recurrence(a[i:i + 1, lo:hi], b[i:i + 1, lo:hi],
                                       reverse=reverse)
            np.testing.assert_allclose(h[i, lo:hi], ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_documents_never_mix_across_masked_steps(impl, reverse):
    """Packed documents with masked separators: a reset on the separator or
    on the first step after it (either direction's boundary) keeps the
    documents apart, as if each were run alone.  A reset in the trailing
    padding marks a document there: forwards it comes after the last valid
    step and changes nothing; in reverse the padding is scanned first, so it
    cuts the carry off the documents before it.  float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        a = jnp.asarray(rng.uniform(0.5, 1.0, (4, 9, 2)))
        b = jnp.asarray(rng.normal(size=(4, 9, 2)))
        h0 = jnp.asarray(rng.normal(size=(4, 2)))
        # Documents [0, 3) and [4, 7) (step 3 masked); steps 7, 8 padding.
        mask = np.ones((4, 9), bool)
        mask[:, 3] = mask[:, 7:] = False
        reset = np.zeros((4, 9), bool)
        reset[0, 3] = True             # on the separator
        reset[1, 4] = True             # on the second document's first step
        reset[2, [3, 4]] = True        # on both
        reset[3, [4, 8]] = True        # and one in the padding
        _, h = linear_scan(a, b, h0, impl=impl, reset=jnp.asarray(reset),
                           mask=jnp.asarray(mask), reverse=reverse)
        # Each document alone; the carry enters the first one in scan order.
        first, second = (slice(0, 3), slice(4, 7)) if not reverse else (slice(4, 7), slice(0, 3))
        carry = h0.at[3].set(0.0) if reverse else h0
        _, ref_first = linear_recurrence(a[:, first], b[:, first], carry, reverse=reverse)
        _, ref_second = linear_recurrence(a[:, second], b[:, second], reverse=reverse)
        np.testing.assert_allclose(h[:, first], ref_first, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(h[:, second], ref_second, rtol=1e-13, atol=1e-13)
        _, ref = linear_recurrence(a, b, h0, reset=reset, mask=mask, reverse=reverse)
        np.testing.assert_allclose(h, ref, rtol=1e-13, atol=1e-13)


def test_reset_drops_initial_state(rng):
    a, b, h0 = make_inputs(rng, (1, 5, 2))
    reset = jnp.zeros((1, 5), bool).at[0, 0].set(True)
    _, with_h0 = linear_scan(a, b, h0, reset=reset)
    _, without = linear_scan(a, b, None)
    np.testing.assert_array_equal(with_h0, without)


def test_jit_with_traced_lengths(rng):
    a, b, h0 = make_inputs(rng, (2, 10, 2))
    f = jax.jit(lambda a, b, h0, n: linear_scan(a, b, h0, seq_lengths=n))
    lengths = np.asarray([10, 4])
    h_last, h = f(a, b, h0, jnp.asarray(lengths))
    ref_last, ref = linear_recurrence(a, b, h0, mask=np.arange(10)[None] < lengths[:, None])
    np.testing.assert_allclose(h_last, ref_last, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-6)


def test_auto_resolves_per_backend_never_to_a_backend():
    assert scan_lib.default_impl(4096, "gpu") is ScanImpl.ASSOCIATIVE
    assert scan_lib.default_impl(4096, "tpu") is ScanImpl.ASSOCIATIVE
    assert scan_lib.default_impl(4096, "cpu") is ScanImpl.CHUNKED
    assert scan_lib.default_impl(8, "cpu") is ScanImpl.SEQUENTIAL
    with pytest.raises(ValueError, match=r"backend must be one of \['cpu', .*got 'bogus'"):
        scan_lib.default_impl(8, "bogus")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_batch_returns_empty_arrays(impl):
    """Batch 0 gives empty results with every implementation (the Pallas
    kernel used to divide by zero)."""
    a = jnp.zeros((0, 6, 3), jnp.float32)
    h_last, h = linear_scan(a, a, impl=impl)
    assert h_last.shape == (0, 3) and h.shape == (0, 6, 3)
    grads = jax.grad(lambda a: jnp.sum(linear_scan(a, a, impl=impl)[1]))(a)
    assert grads.shape == a.shape


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_narrow_integer_lengths_do_not_wrap(rng, dtype):
    """Steps are counted in at least int32: a uint8 counter would wrap at 256
    and mark steps 256.. valid again."""
    a = jnp.asarray(rng.uniform(0.5, 1.0, (2, 300, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 300, 2)), jnp.float32)
    lengths = np.asarray([100, 120], dtype)
    want = linear_recurrence(np.float64(a), np.float64(b), mask=np.arange(300) < lengths[:, None])
    for impl in ("sequential", "chunked", "associative"):
        h_last, h = linear_scan(a, b, seq_lengths=jnp.asarray(lengths), impl=impl)
        np.testing.assert_allclose(h_last, want[0], rtol=1e-5, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(h, want[1], rtol=1e-5, atol=1e-5, err_msg=impl)


def test_gated_scan_empty_batch_and_complex_coefficients():
    x = jnp.zeros((0, 5, 3, 2), jnp.float32)
    h_last, h = gated_scan(_jnp_gates, x, None)
    assert h_last.shape == (0, 3) and h.shape == (0, 5, 3)
    complex_gates = lambda x, p: (x.astype(jnp.complex64) * 0.5j, x)
    with pytest.raises(TypeError, match=r"coeff_fn must return real .* complex64"):
        gated_scan(complex_gates, jnp.ones((1, 3, 2)), None)


def test_traced_seq_lengths_are_clamped_or_checked_at_run_time(rng):
    """Under jit the lengths are unknown at trace time: without a check they
    are clamped (above T acts as T, negative as 0); inside
    fm.runtime_checks() and checkify they raise, naming seq_lengths."""
    # Dyadic gates, inputs and h0: every product and sum is exact in float32,
    # so the jitted, checked and eager programs must agree bit for bit.
    a = jnp.asarray(rng.choice([0.25, 0.5, 0.75], (2, 5, 2)), jnp.float32)
    b = jnp.asarray(rng.integers(-8, 9, (2, 5, 2)) / 8, jnp.float32)
    h0 = jnp.asarray(rng.integers(-4, 5, (2, 2)) / 4, jnp.float32)
    f = lambda n: linear_scan(a, b, h0, seq_lengths=n)
    clamped = jax.jit(f)(jnp.asarray([9, -3]))
    want = f(jnp.asarray([5, 0]))
    for got, ref in zip(clamped, want):
        np.testing.assert_array_equal(got, ref)
    with fm.runtime_checks():
        checked = jax.jit(checkify.checkify(f, errors=checkify.user_checks))
        err, _ = checked(jnp.asarray([9, -3]))
    with pytest.raises(checkify.JaxRuntimeError, match=r"seq_lengths must lie in \[0, 5\].*-3, 9"):
        err.throw()
    err, out = checked(jnp.asarray([5, 2]))
    err.throw()  # in range: no error
    np.testing.assert_array_equal(out[0], f(jnp.asarray([5, 2]))[0])
    with pytest.raises(ValueError, match="enabled must be a bool, got 'yes'"):
        with fm.runtime_checks("yes"):
            pass


class TestBadInput:
    def setup_method(self):
        self.a = jnp.full((2, 5, 3), 0.5, jnp.float32)
        self.b = jnp.ones((2, 5, 3), jnp.float32)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"a and b must have the same shape"):
            linear_scan(self.a, self.b[:, :, :1])

    def test_integer_input(self):
        with pytest.raises(TypeError, match=r"b must be a floating-point array"):
            linear_scan(self.a, jnp.ones((2, 5, 3), jnp.int32))

    def test_rank(self):
        with pytest.raises(ValueError, match=r"a must have shape \(batch, time"):
            linear_scan(self.a[0, 0], self.b[0, 0])

    def test_h0_shape(self):
        with pytest.raises(ValueError, match=r"h0 must have shape .*\(2, 3\)"):
            linear_scan(self.a, self.b, jnp.zeros((2, 4)))

    def test_h0_dtype(self):
        with pytest.raises(TypeError, match=r"h0 must be a floating-point"):
            linear_scan(self.a, self.b, jnp.zeros((2, 3), jnp.int32))

    def test_unknown_impl(self):
        with pytest.raises(ValueError, match=r"impl must be one of .*'fast'"):
            linear_scan(self.a, self.b, impl="fast")

    def test_seq_lengths_out_of_range(self):
        with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, 5\]"):
            linear_scan(self.a, self.b, seq_lengths=jnp.asarray([3, 6]))
        with pytest.raises(ValueError, match=r"seq_lengths must lie"):
            linear_scan(self.a, self.b, seq_lengths=jnp.asarray([-1, 2]))

    def test_seq_lengths_shape_and_dtype(self):
        with pytest.raises(ValueError, match=r"seq_lengths must have shape \(batch,\)"):
            linear_scan(self.a, self.b, seq_lengths=jnp.asarray([3]))
        with pytest.raises(TypeError, match=r"seq_lengths must be an integer"):
            linear_scan(self.a, self.b, seq_lengths=jnp.asarray([3.0, 2.0]))

    def test_mask_and_lengths_exclusive(self):
        with pytest.raises(ValueError, match=r"either mask or seq_lengths"):
            linear_scan(self.a, self.b, seq_lengths=jnp.asarray([3, 2]),
                        mask=jnp.ones((2, 5), bool))

    def test_reset_shape_and_dtype(self):
        with pytest.raises(ValueError, match=r"reset must have shape \(batch, time\)"):
            linear_scan(self.a, self.b, reset=jnp.zeros((2, 4), bool))
        with pytest.raises(TypeError, match=r"reset must be a boolean"):
            linear_scan(self.a, self.b, reset=jnp.zeros((2, 5), jnp.int32))


# ----------------------------------------------------------------------------
# gated_scan: coefficients computed from inputs, fused into the loop.


def _np_gates(x):
    """float64 reference of the test gate function below."""
    z = 1.0 / (1.0 + np.exp(-x[..., 0]))
    return 1.0 - z, z * np.tanh(x[..., 1])


def _jnp_gates(x, bias=None):
    """Test coefficient function; ``bias`` (shape (features, 2)) is optional."""
    if bias is not None:
        x = x + bias[None, None]
    z = jax.nn.sigmoid(x[..., 0])
    return 1.0 - z, z * jnp.tanh(x[..., 1])


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 steps in impl='chunked' (the default size spans hundreds of
    steps at test shapes), so short sequences cross several tiles and end in
    a partial one."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 4)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 4)


@pytest.fixture
def tiles_of_16(monkeypatch):
    """Tiles of 16 steps: two of the loop's 8-step blocks per tile, written
    into the whole-sequence buffers at an offset, and a partial last tile
    that ends in a partial block."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 16)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 16)


def _use_tiles(request, impl: str) -> str:
    """The fixture behind a "chunked-tiles*" test id; returns the impl."""
    if impl == "chunked-tiles":
        request.getfixturevalue("small_tiles")
    elif impl == "chunked-tiles16":
        request.getfixturevalue("tiles_of_16")
    return "chunked" if impl.startswith("chunked-tiles") else impl


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("impl, seq_len", [
    ("sequential", 1), ("sequential", 9), ("sequential", 20),   # around the 8-step blocks
    ("chunked", 9), ("chunked", 20), ("associative", 20),
    ("chunked-tiles", 9), ("chunked-tiles", 23), ("chunked-tiles16", 45)])
@pytest.mark.parametrize("with_kernel", [False, True], ids=["x", "kernel"])
def test_gated_scan_matches_reference_outputs_and_gradients(rng, request, impl, seq_len,
                                                            reverse, with_kernel):
    """Outputs, gradients (w.r.t. x and h0, random cotangents on h and the
    carry) and forward-mode tangents (random, of every input) against the
    float64 loop, with resets and padding; lengths around
    the sequential loop's block size (8) exercise the remainder block, and
    "chunked-tiles" runs several 4-step tiles and a partial one
    ("chunked-tiles16": 16-step tiles of two 8-step blocks).  With
    ``kernel`` the coefficient function sees ``x @ kernel`` (and the kernel
    gets a gradient too)."""
    impl = _use_tiles(request, impl)
    batch, feat = 3, 2
    x = jnp.asarray(rng.normal(size=(batch, seq_len, feat, 2)), jnp.float32)
    if with_kernel:
        d_in = 3
        kernel = jnp.asarray(rng.normal(size=(d_in, feat * 2)) / 2, jnp.float32)
        x_in = jnp.asarray(rng.normal(size=(batch, seq_len, d_in)), jnp.float32)
        x = jnp.einsum("bti,io->bto", x_in, kernel).reshape(batch, seq_len, feat, 2)
    else:
        kernel = x_in = None
    h0 = jnp.asarray(rng.normal(size=(batch, feat)), jnp.float32)
    reset = rng.uniform(size=(batch, seq_len)) < 0.2
    lengths = np.array([seq_len, max(seq_len - 3, 0), seq_len // 2])
    mask = np.arange(seq_len)[None] < lengths[:, None]
    g = jnp.asarray(rng.normal(size=(batch, seq_len, feat)), jnp.float32)
    g_last = jnp.asarray(rng.normal(size=(batch, feat)), jnp.float32)

    bias = jnp.asarray(rng.normal(size=(feat, 2)), jnp.float32)
    a_ref, b_ref = _np_gates(np.asarray(x, np.float64) + np.asarray(bias, np.float64))
    ref_last, ref = linear_recurrence(a_ref, b_ref, h0, reset=reset, mask=mask,
                                      reverse=reverse)
    if with_kernel:
        def run(x_in, h0, bias, kernel):
            fn = lambda pre, p: _jnp_gates(pre.reshape(pre.shape[:2] + (feat, 2)), p)
            return gated_scan(fn, x_in, h0, kernel=kernel, params=bias, impl=impl,
                              reset=jnp.asarray(reset), seq_lengths=jnp.asarray(lengths),
                              reverse=reverse)
        args = (x_in, h0, bias, kernel)
    else:
        def run(x, h0, bias):
            return gated_scan(_jnp_gates, x, h0, params=bias, impl=impl,
                              reset=jnp.asarray(reset), seq_lengths=jnp.asarray(lengths),
                              reverse=reverse)
        args = (x, h0, bias)
    h_last, h = jax.jit(run)(*args)
    assert rel_err(h, ref) <= 1e-5 and rel_err(h_last, ref_last) <= 1e-5

    def loss(*args):
        h_last, h = run(*args)
        return jnp.sum(h * g) + jnp.sum(h_last * g_last)

    ours = jax.jit(jax.grad(loss, tuple(range(len(args)))))(*args)
    # Forward mode (chunked: the tangent loop over the kept projection and states).
    tangents = tuple(jnp.asarray(rng.normal(size=v.shape), jnp.float32) for v in args)
    ours_t = jax.jit(lambda a, t: jax.jvp(run, a, t)[1])(args, tangents)
    # References: float64 autodiff of a plain lax.scan loop (no library code).
    with jax.enable_x64(True):
        def ref_run(*a):
            if with_kernel:
                x_in, h0, bias, kernel = a
                x = jnp.einsum("bti,io->bto", x_in, kernel).reshape(batch, seq_len, feat, 2)
            else:
                x, h0, bias = a
            return _masked_loop(*_jnp_gates(x, bias), h0, reset, mask, reverse)
        g64, gl64 = np.asarray(g, np.float64), np.asarray(g_last, np.float64)
        def ref_loss(*a):
            h_last, h = ref_run(*a)
            return jnp.sum(h * g64) + jnp.sum(h_last * gl64)
        to64 = lambda t: tuple(jnp.asarray(np.asarray(v, np.float64)) for v in t)
        want = jax.jit(jax.grad(ref_loss, tuple(range(len(args)))))(*to64(args))
        want_t = jax.jit(lambda a, t: jax.jvp(ref_run, a, t)[1])(to64(args), to64(tangents))
    for name, got, ref_g in zip(("dx", "dh0", "dbias", "dkernel"), ours, want):
        assert rel_err(got, ref_g) <= 2e-5, (name, rel_err(got, ref_g))
    for name, got, ref_t in zip(("dh_last", "dh"), ours_t, want_t):
        assert rel_err(got, ref_t) <= 2e-5, (name, rel_err(got, ref_t))


def test_gated_scan_equals_linear_scan_of_its_coefficients(rng):
    x = jnp.asarray(rng.normal(size=(2, 19, 3, 2)), jnp.float32)
    a, b = _jnp_gates(x)
    for impl in LINEAR_IMPLS:
        want = linear_scan(a, b, impl=impl)
        got = gated_scan(lambda x, p: _jnp_gates(x), x, impl=impl)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)


def test_gated_scan_pytree_input_and_bfloat16(rng):
    """x may be a pytree; bfloat16 inputs give float32 states and bf16 grads."""
    k = jnp.asarray(rng.normal(size=(2, 12, 4)), jnp.bfloat16)
    c = jnp.asarray(rng.normal(size=(2, 12, 4)), jnp.bfloat16)
    fn = lambda kc, p: (jax.nn.sigmoid(-kc[0].astype(jnp.float32)),
                        jax.nn.sigmoid(kc[1].astype(jnp.float32)))
    h_last, h = gated_scan(fn, (k, c), impl="sequential")
    assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32
    a_ref, b_ref = fn((k, c), None)
    _, ref = linear_recurrence(a_ref, b_ref)
    assert rel_err(h, ref) <= 1e-5
    g = rng.normal(size=(2, 12, 4))
    dk, dc = jax.grad(lambda kc: jnp.sum(gated_scan(fn, kc, impl="sequential")[1]
                                         * jnp.asarray(g, jnp.float32)))((k, c))
    assert dk.dtype == jnp.bfloat16 and dc.dtype == jnp.bfloat16
    # float64 gradients of sum(h * g) on the bf16-rounded inputs: the adjoint
    # lam_t = g_t + a_{t+1} lam_{t+1}, then the chain rule through the sigmoids.
    a, b = (1 / (1 + np.exp(np.asarray(k, np.float64))),
            1 / (1 + np.exp(-np.asarray(c, np.float64))))
    _, h64 = linear_recurrence(a, b)
    h_prev = np.concatenate([np.zeros_like(h64[:, :1]), h64[:, :-1]], axis=1)
    _, lam = linear_recurrence(np.concatenate([a[:, 1:], np.zeros_like(a[:, :1])], axis=1),
                               g, reverse=True)
    for got, want in ((dk, -lam * h_prev * a * (1 - a)), (dc, lam * b * (1 - b))):
        np.testing.assert_allclose(np.asarray(got, np.float32), want,
                                   rtol=2e-2, atol=2e-2 * np.abs(want).max())


# ----------------------------------------------------------------------------
# gated_scan_with_readout: a per-step readout of the states (and of the
# kernel's side columns), fused into the scan.


def _readout(h, side, p):
    """Test readout: ``((tanh(h) + 0.1) * sigmoid(side + p["b"])) @ p["w"]``,
    nonzero at a zero state; without side columns ``(h + 0.1) @ p["w"]``."""
    z = jnp.tanh(h) + 0.1 if side is not None else h + 0.1
    if side is not None:
        z = z * jax.nn.sigmoid(side + p["b"][None, None])
    return z @ p["w"]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("impl", ["sequential", "associative", "chunked", "chunked-tiles",
                                  "chunked-tiles16"])
@pytest.mark.parametrize("side", [0, 2], ids=["no-side", "side"])
def test_gated_scan_with_readout_matches_reference(rng, request, impl, reverse, side):
    """Outputs, gradients (x, h0, kernel, all params; random cotangents on
    the readout and the carry; resets and padding) and forward-mode tangents
    (random, of every input) against float64 autodiff of a plain loop
    followed by the readout of the (masked) states."""
    impl = _use_tiles(request, impl)
    # The chunked variants run 37 steps: several tiles (4-step or 16-step),
    # or at the default size one 32-step tile and a partial one.
    batch, seq_len, d_in, feat, d_out = 3, 11 if impl != "chunked" else 37, 3, 2, 3
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    x = f32(rng.normal(size=(batch, seq_len, d_in)))
    kernel = f32(rng.normal(size=(d_in, 2 * feat + side)) / 2)
    h0 = f32(rng.normal(size=(batch, feat)))
    params = {"bias": f32(rng.normal(size=(feat, 2))), "w": f32(rng.normal(size=(feat, d_out))),
              "b": f32(rng.normal(size=(side,)))}
    reset = rng.uniform(size=(batch, seq_len)) < 0.2
    lengths = np.array([seq_len, seq_len - 3, 4])
    mask = np.arange(seq_len)[None] < lengths[:, None]
    g = f32(rng.normal(size=(batch, seq_len, d_out)))
    g_last = f32(rng.normal(size=(batch, feat)))

    def coeff_fn(pre, p):
        return _jnp_gates(pre.reshape(pre.shape[:2] + (feat, 2)), p["bias"])

    def run(x, h0, kernel, params):
        return gated_lib.gated_scan_with_readout(
            coeff_fn, _readout, x, h0, kernel=kernel, side_features=side, params=params,
            impl=impl, reset=jnp.asarray(reset), seq_lengths=jnp.asarray(lengths),
            reverse=reverse)

    def loss(*args):
        h_last, y = run(*args)
        return jnp.sum(y * g) + jnp.sum(h_last * g_last)

    args = (x, h0, kernel, params)
    h_last, y = jax.jit(run)(*args)
    ours = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(*args)
    with jax.enable_x64(True):
        def ref_run(x, h0, kernel, params):
            pre = jnp.einsum("bti,io->bto", x, kernel)
            a, b = coeff_fn(pre[..., :2 * feat], params)
            h, outs = _masked_loop(a, b, h0, reset, mask, reverse)
            return h, _readout(outs, pre[..., 2 * feat:] if side else None, params)

        def ref_loss(*args):
            h_last, y = ref_run(*args)
            loss = jnp.sum(y * g.astype(np.float64)) + jnp.sum(h_last * g_last.astype(np.float64))
            return loss, (h_last, y)

        args64 = jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), args)
        # Outputs and gradient of the loop in one compiled function.
        (_, (want_last, want_y)), want = jax.jit(
            jax.value_and_grad(ref_loss, (0, 1, 2, 3), has_aux=True))(*args64)
    assert y.shape == (batch, seq_len, d_out) and y.dtype == jnp.float32
    assert rel_err(y, want_y) <= 1e-5 and rel_err(h_last, want_last) <= 1e-5
    for path, got in jax.tree_util.tree_leaves_with_path(ours):
        ref_g = jax.tree_util.tree_leaves_with_path(want)
        ref_g = dict((jax.tree_util.keystr(k), v) for k, v in ref_g)[jax.tree_util.keystr(path)]
        assert got.dtype == jnp.float32
        if got.size:
            assert rel_err(got, ref_g) <= 2e-5, (jax.tree_util.keystr(path),
                                                 rel_err(got, ref_g))

    tangents = jax.tree.map(lambda v: f32(rng.normal(size=v.shape)), args)
    ours_t = jax.jit(lambda a, t: jax.jvp(run, a, t)[1])(args, tangents)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), t)
        want_t = jax.jit(lambda a, t: jax.jvp(ref_run, a, t)[1])(to64(args), to64(tangents))
    for name, got, ref_t in zip(("dh_last", "dy"), ours_t, want_t):
        assert got.dtype == jnp.float32 and rel_err(got, ref_t) <= 2e-5, (name,
                                                                          rel_err(got, ref_t))


def test_gated_scan_with_readout_equals_gated_scan_then_readout(rng):
    """The documented identity, for every linear-space impl, without masks,
    with a kernel and side columns and without a kernel."""
    x = jnp.asarray(rng.normal(size=(2, 9, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
    fn = lambda pre, p: _jnp_gates(pre.reshape(pre.shape[:2] + (2, 2)))
    for impl in LINEAR_IMPLS:
        h_last, h = gated_scan(fn, x, kernel=kernel[:, :4], params=params, impl=impl)
        want = _readout(h, x @ kernel[:, 4:], params)
        got_last, got = gated_lib.gated_scan_with_readout(
            fn, _readout, x, kernel=kernel, side_features=2, params=params, impl=impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=impl)
        np.testing.assert_allclose(got_last, h_last, rtol=1e-6, atol=1e-7, err_msg=impl)
        # Without a kernel: x itself (a pytree here) goes to coeff_fn.
        xs = (x @ kernel[:, :2], x @ kernel[:, 2:4])
        fn2 = lambda q, p: _jnp_gates(jnp.stack(q, -1))
        h_last, h = gated_scan(fn2, xs, params=params, impl=impl)
        got_last, got = gated_lib.gated_scan_with_readout(fn2, _readout, xs, params=params,
                                                         impl=impl)
        np.testing.assert_allclose(got, _readout(h, None, params), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_last, h_last, rtol=1e-6, atol=1e-7)


class TestGatedScanWithReadoutErrors:
    fn = staticmethod(lambda pre, p: (pre, pre))
    x = jnp.ones((2, 5, 3))

    def test_side_features(self):
        run = lambda k, **kw: gated_lib.gated_scan_with_readout(
            self.fn, lambda h, s, p: h, self.x, kernel=jnp.ones((3, k)), **kw)
        with pytest.raises(ValueError, match=r"must be in \[0, n - 1\] with n = kernel.shape\[1\] = 4, got 4"):
            run(4, side_features=4)
        with pytest.raises(ValueError, match=r"side_features must be in"):
            run(4, side_features=-1)
        with pytest.raises(TypeError, match="side_features must be an int"):
            run(4, side_features=1.0)
        with pytest.raises(ValueError, match="side_features > 0 needs kernel"):
            gated_lib.gated_scan_with_readout(self.fn, lambda h, s, p: h, self.x,
                                             side_features=1)

    def test_readout_output(self):
        with pytest.raises(ValueError, match=r"readout_fn must return one floating array"):
            gated_lib.gated_scan_with_readout(self.fn, lambda h, s, p: h[:, 0], self.x)
        with pytest.raises(ValueError, match=r"readout_fn must return one floating array"):
            gated_lib.gated_scan_with_readout(self.fn, lambda h, s, p: (h, h), self.x)
        with pytest.raises(ValueError, match=r"readout_fn must return one floating array"):
            gated_lib.gated_scan_with_readout(self.fn, lambda h, s, p: h > 0, self.x)
        with pytest.raises(TypeError, match="readout_fn must be callable"):
            gated_lib.gated_scan_with_readout(self.fn, None, self.x)


class TestGatedScanErrors:
    def test_mismatched_leaves(self):
        with pytest.raises(ValueError, match="same batch and time"):
            gated_scan(lambda x, p: (x[0], x[0]), (jnp.ones((2, 5, 3)), jnp.ones((2, 4, 3))))

    def test_kernel_needs_one_array_of_matching_width(self):
        fn = lambda q, p: (q, q)
        with pytest.raises(ValueError, match="with kernel, x must be one array"):
            gated_scan(fn, (jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3))), kernel=jnp.ones((3, 4)))
        with pytest.raises(ValueError, match=r"kernel must have shape \(d_in, n\) with d_in = 3"):
            gated_scan(fn, jnp.ones((2, 5, 3)), kernel=jnp.ones((4, 4)))
        with pytest.raises(TypeError, match="kernel must be a floating-point array"):
            gated_scan(fn, jnp.ones((2, 5, 3)), kernel=jnp.ones((3, 4), jnp.int32))

    def test_coefficients_of_different_shapes(self):
        with pytest.raises(ValueError, match="coeff_fn must return"):
            gated_scan(lambda x, p: (x, x[..., :1]), jnp.ones((2, 5, 3)))

    def test_integer_input(self):
        with pytest.raises(TypeError, match="floating"):
            gated_scan(lambda x, p: (x, x), jnp.ones((2, 5, 3), jnp.int32))

    def test_h0_shape(self):
        with pytest.raises(ValueError, match="h0 must have shape"):
            gated_scan(lambda x, p: (x, x), jnp.ones((2, 5, 3)), jnp.ones((2, 4)))


def test_chunked_stores_projection_blocks_of_the_state_width():
    """The tile loop keeps one buffer per state-width block of projection
    columns (2 for minGRU's [k, h~], 3 for minLSTM's), and one buffer when
    the columns do not split into at most four such blocks."""
    h0 = jnp.zeros((2, 8))
    assert gated_lib._column_groups(16, h0) == 2
    assert gated_lib._column_groups(24, h0) == 3
    assert gated_lib._column_groups(20, h0) == 1  # not a multiple of 8
    assert gated_lib._column_groups(40, h0) == 1  # five blocks
    assert gated_lib._column_groups(16, jnp.zeros((2, 4, 4))) == 1  # a 2-D state
    x = jnp.zeros((2, 64, 5))
    _, _, pre, _, _ = gated_lib.tiles_forward(
        lambda p, c, q: tuple(jnp.split(p, 2, axis=-1)), None, x, jnp.ones((5, 16)),
        (None, None), None, h0, False, 16, 0, 64, store=True)
    assert isinstance(pre, tuple) and [p.shape for p in pre] == [(2, 64, 8)] * 2
