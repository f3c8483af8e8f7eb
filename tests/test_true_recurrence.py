"""flax_minrnn.ops.true_recurrence against float64 references.

References: a NumPy loop of the equations (forward), JAX autodiff of a plain
Python loop of the same equations (reverse mode, random cotangents), central
differences (forward mode and second derivatives).  Modes that must agree:
one call == token by token (decoding) == chunks with carry, for any block
size of the loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.flatten_util import ravel_pytree

from flax_minrnn.ops import true_recurrence as tr

B, T, D_IN, D = 3, 13, 4, 5
EPS = 1e-6


@pytest.fixture(autouse=True)
def float64_and_small_blocks(monkeypatch):
    """float64 for the references; 4-step blocks so T = 13 has full blocks
    and a remainder."""
    monkeypatch.setattr(tr, "_UNROLL", 4)
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------
# Gate functions (unit-wise, as the op requires) and their NumPy twins.


def _sig(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _row(bias, p):
    return bias.reshape((1,) * (p.ndim - 1) + (-1,))


def gru_like(p, bias):
    """pre = [k, c]: a = 1 - sigmoid(k), b = sigmoid(k) * tanh(c)."""
    k, c = jnp.split(p + _row(bias, p), 2, axis=-1)
    z = _sig(k)
    return 1.0 - z, z * jnp.tanh(c)


def lstm_like(p, bias):
    """pre = [f, i, c]: normalised gates, a = f / (f + i), b = i / (f + i) * c."""
    kf, ki, c = jnp.split(p + _row(bias, p), 3, axis=-1)
    f, i = _sig(kf), _sig(ki)
    return f / (f + i), i / (f + i) * c


def _np_sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_gates(kind, p, bias):
    p = p + bias
    if kind == "gru":
        k, c = np.split(p, 2, axis=-1)
        z = _np_sig(k)
        return 1.0 - z, z * np.tanh(c)
    kf, ki, c = np.split(p, 3, axis=-1)
    f, i = _np_sig(kf), _np_sig(ki)
    return f / (f + i), i / (f + i) * c


GATES = {"gru": (gru_like, 2), "lstm": (lstm_like, 3)}


def np_reference(kind, x, kernel, u, bias, h0, *, valid=None, reset=None, reverse=False,
                 n_side=0):
    """``(h_last, h, side)`` in float64 NumPy: the module docstring's loop."""
    x, kernel, u = (np.asarray(v, np.float64) for v in (x, kernel, u))
    batch, seq_len, _ = x.shape
    d = u.shape[0]
    n = kernel.shape[1]
    h = np.zeros((batch, d)) if h0 is None else np.asarray(h0, np.float64).copy()
    valid = np.ones((batch, seq_len), bool) if valid is None else np.asarray(valid)
    reset = np.zeros((batch, seq_len), bool) if reset is None else np.asarray(reset)
    hs = np.zeros((batch, seq_len, d))
    side = np.zeros((batch, seq_len, n_side))
    order = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    pending = np.zeros(batch, bool)  # a boundary met on invalid steps
    for t in order:
        # Reversed, the document starting at t + 1 must not see step t.
        starts = (reset[:, t + 1] if t + 1 < seq_len else np.zeros(batch, bool)) \
            if reverse else reset[:, t]
        starts = starts | pending
        pending = starts & ~valid[:, t]
        h_in = np.where((starts & valid[:, t])[:, None], 0.0, h)
        p = x[:, t] @ kernel + h_in @ u
        a, b = np_gates(kind, p[:, :n - n_side], np.asarray(bias, np.float64))
        new = a * h_in + b
        h = np.where(valid[:, t][:, None], new, h)
        hs[:, t] = np.where(valid[:, t][:, None], h, 0.0)
        side[:, t] = np.where(valid[:, t][:, None], p[:, n - n_side:], x[:, t] @ kernel[:, n - n_side:])
    return h, hs, side


def jax_loop(kind, x, kernel, u, bias, h0, *, valid=None, reset=None, reverse=False,
             n_side=0):
    """The same loop in plain JAX (differentiated by autodiff)."""
    coeff, _ = GATES[kind]
    batch, seq_len, _ = x.shape
    d = u.shape[0]
    n = kernel.shape[1]
    h = jnp.zeros((batch, d)) if h0 is None else h0
    hs, sides = [None] * seq_len, [None] * seq_len
    order = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    pending = jnp.zeros(batch, bool)  # a boundary met on invalid steps
    for t in order:
        ok = jnp.ones(batch, bool) if valid is None else valid[:, t]
        if reset is None:
            starts = jnp.zeros(batch, bool)
        elif reverse:
            starts = reset[:, t + 1] if t + 1 < seq_len else jnp.zeros(batch, bool)
        else:
            starts = reset[:, t]
        starts = starts | pending
        pending = starts & ~ok
        h_in = jnp.where((starts & ok)[:, None], 0.0, h)
        p = x[:, t] @ kernel + h_in @ u
        a, b = coeff(p[:, :n - n_side], bias)
        h = jnp.where(ok[:, None], a * h_in + b, h)
        hs[t] = jnp.where(ok[:, None], h, 0.0)
        sides[t] = jnp.where(ok[:, None], p[:, n - n_side:], x[:, t] @ kernel[:, n - n_side:])
    return h, jnp.stack(hs, 1), jnp.stack(sides, 1)


def _inputs(kind, seed=0, seq_len=T, n_side=0, scale=0.5):
    rng = np.random.default_rng(seed)
    n = GATES[kind][1] * D + n_side
    x = jnp.asarray(rng.normal(size=(B, seq_len, D_IN)))
    kernel = jnp.asarray(rng.normal(size=(D_IN, n)) * 0.6)
    u = jnp.asarray(rng.normal(size=(D, n)) * scale)
    bias = jnp.asarray(rng.normal(size=(n - n_side,)) * 0.3)
    h0 = jnp.asarray(rng.normal(size=(B, D)))
    return x, kernel, u, bias, h0


def _masks(seed, seq_len=T):
    rng = np.random.default_rng(seed)
    valid = rng.random((B, seq_len)) > 0.25
    valid[0] = True
    reset = rng.random((B, seq_len)) > 0.7
    return jnp.asarray(valid), jnp.asarray(reset)


def _op(kind, x, kernel, u, bias, h0, **kw):
    coeff, _ = GATES[kind]
    return tr.true_recurrence(lambda p, par: coeff(p, par), x, h0, recurrent_kernel=u,
                              kernel=kernel, params=bias, **kw)


CASES = [  # (kind, reverse, masks, h0)
    ("gru", False, False, True),
    ("gru", True, True, True),
    ("lstm", False, True, False),
    ("lstm", True, False, True),
]


# ----------------------------------------------------------------------------
# Forward and reverse mode against the references.


@pytest.mark.parametrize("kind,reverse,masks,with_h0", CASES)
def test_forward_matches_numpy_reference(kind, reverse, masks, with_h0):
    x, kernel, u, bias, h0 = _inputs(kind)
    h0 = h0 if with_h0 else None
    valid, reset = _masks(1) if masks else (None, None)
    want_last, want_h, _ = np_reference(kind, x, kernel, u, bias, h0, valid=valid,
                                        reset=reset, reverse=reverse)
    got_last, got_h = jax.jit(lambda *a: _op(kind, *a, mask=valid, reset=reset,
                                             reverse=reverse))(x, kernel, u, bias, h0)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_last, want_last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,reverse,masks,with_h0", CASES)
def test_gradients_match_autodiff_of_a_plain_loop(kind, reverse, masks, with_h0):
    """Random cotangents on both outputs; every input's gradient."""
    x, kernel, u, bias, h0 = _inputs(kind, seed=2)
    valid, reset = _masks(3) if masks else (None, None)
    rng = np.random.default_rng(4)
    w_h = jnp.asarray(rng.normal(size=(B, T, D)))
    w_last = jnp.asarray(rng.normal(size=(B, D)))

    def loss(fn):
        def f(x, kernel, u, bias, h0):
            h_last, h = fn(x, kernel, u, bias, h0 if with_h0 else None)[:2]
            return jnp.sum(h * w_h) + jnp.sum(h_last * w_last)
        return f

    kw = dict(valid=valid, reset=reset, reverse=reverse)
    want = jax.jit(jax.grad(loss(lambda *a: jax_loop(kind, *a, **kw)),
                            argnums=(0, 1, 2, 3, 4)))(x, kernel, u, bias, h0)
    got = jax.jit(jax.grad(loss(lambda *a: _op(kind, *a, mask=valid, reset=reset,
                                               reverse=reverse)),
                           argnums=(0, 1, 2, 3, 4)))(x, kernel, u, bias, h0)
    for name, g, w in zip(("x", "kernel", "u", "bias", "h0"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)
    if not with_h0:  # No h0 is the zero state.
        def with_zeros(x, kernel, u, bias):
            h_last, h = _op(kind, x, kernel, u, bias, jnp.zeros_like(h0), mask=valid,
                            reset=reset, reverse=reverse)[:2]
            return jnp.sum(h * w_h) + jnp.sum(h_last * w_last)
        zeros = jax.jit(jax.grad(with_zeros, argnums=(0, 1, 2, 3)))(x, kernel, u, bias)
        for name, g, w in zip(("x", "kernel", "u", "bias"), got, zeros):
            np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-14 * np.abs(w).max(),
                                       err_msg=name)


@pytest.mark.parametrize("kind,reverse,masks,with_h0", CASES)
def test_tangents_match_autodiff_of_a_plain_loop(kind, reverse, masks, with_h0):
    """Forward mode (the tangent loop over the stored states): random
    tangents of every input, both outputs' tangents."""
    args = _inputs(kind, seed=5)
    valid, reset = _masks(6) if masks else (None, None)
    rng = np.random.default_rng(7)
    tangents = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
    kw = dict(valid=valid, reset=reset, reverse=reverse)

    def of(fn):
        return lambda x, kernel, u, bias, h0: fn(x, kernel, u, bias,
                                                 h0 if with_h0 else None)[:2]

    def jvp(fn):
        return jax.jit(lambda a, t: jax.jvp(of(fn), a, t)[1])(args, tangents)

    want = jvp(lambda *a: jax_loop(kind, *a, **kw))
    got = jvp(lambda *a: _op(kind, *a, mask=valid, reset=reset, reverse=reverse))
    for name, g, w in zip(("h_last", "h"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)


def test_side_columns_and_readout():
    """The readout's side columns see h_in through U too; gradients included."""
    kind, n_side = "gru", 3
    x, kernel, u, bias, h0 = _inputs(kind, seed=5, n_side=n_side)
    valid, reset = _masks(6)
    readout = lambda h, s, par: jnp.tanh(h[..., :n_side]) * s + par[0]
    coeff, _ = GATES[kind]

    def op(x, kernel, u, bias, h0):
        return tr.true_recurrence_with_readout(
            lambda p, par: coeff(p, par[1]), readout, x, h0, recurrent_kernel=u,
            kernel=kernel, side_features=n_side, params=(jnp.float64(0.25), bias),
            mask=valid, reset=reset)

    def ref(x, kernel, u, bias, h0):
        h_last, h, side = jax_loop(kind, x, kernel, u, bias, h0, valid=valid, reset=reset,
                                   n_side=n_side)
        side = jnp.where(valid[:, :, None], side, x @ kernel[:, -n_side:])
        return h_last, readout(h, side, (0.25,))

    np_last, np_h, np_side = np_reference(kind, x, kernel, u, bias, h0, valid=valid,
                                          reset=reset, n_side=n_side)
    got_last, got_y = jax.jit(op)(x, kernel, u, bias, h0)
    np.testing.assert_allclose(got_last, np_last, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_y, np.tanh(np_h[..., :n_side]) * np_side + 0.25,
                               rtol=1e-12, atol=1e-12)
    w = jnp.asarray(np.random.default_rng(7).normal(size=got_y.shape))
    loss = lambda fn: lambda *a: jnp.sum(fn(*a)[1] * w) + jnp.sum(fn(*a)[0] ** 2)
    got = jax.jit(jax.grad(loss(op), argnums=(0, 1, 2, 3, 4)))(x, kernel, u, bias, h0)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4)))(x, kernel, u, bias, h0)
    for g, wv in zip(got, want):
        np.testing.assert_allclose(g, wv, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------
# Modes that must agree.


@pytest.mark.parametrize("unroll", [1, 3, 8, 64])
def test_block_size_changes_nothing(monkeypatch, unroll):
    x, kernel, u, bias, h0 = _inputs("lstm", seed=8)
    valid, reset = _masks(9)
    f = lambda *a: _op("lstm", *a, mask=valid, reset=reset)
    base = jax.jit(f)(x, kernel, u, bias, h0)
    # A fresh jax.jit each time: traced again, so it sees the block size set.
    grad = lambda: jax.jit(jax.grad(lambda k: jnp.sum(f(x, k, u, bias, h0)[1] ** 2)))(kernel)
    g_base = grad()
    monkeypatch.setattr(tr, "_UNROLL", unroll)
    other = jax.jit(f)(x, kernel, u, bias, h0)
    g_other = grad()
    for a, b in zip(base, other):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g_other, g_base, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reverse", [False, True])
def test_token_by_token_and_chunks_equal_one_call(reverse):
    """Decoding (T = 1 calls with the carry) and chunks with the carry give
    the states of one call; so do their gradients (forward direction)."""
    x, kernel, u, bias, h0 = _inputs("gru", seed=10)
    # One jitted function for every call (compiled once per chunk length).
    op = jax.jit(lambda x, u, h: _op("gru", x, kernel, u, bias, h, reverse=reverse))
    full_last, full_h = op(x, u, h0)
    for bounds in ([(t, t + 1) for t in range(T)], [(0, 5), (5, 6), (6, 13)]):
        if reverse:
            bounds = [(T - e, T - s) for s, e in bounds]
        h, outs = h0, {}
        for s, e in bounds:
            h, out = op(x[:, s:e], u, h)
            outs[s] = out
        np.testing.assert_allclose(h, full_last, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(jnp.concatenate([outs[s] for s in sorted(outs)], 1),
                                   full_h, rtol=1e-13, atol=1e-13)
    if reverse:
        return

    w_last = jnp.asarray(np.random.default_rng(2).normal(size=full_last.shape))

    def chunked(u):
        h, outs = h0, []
        for s, e in [(0, 5), (5, 6), (6, 13)]:
            h, out = op(x[:, s:e], u, h)
            outs.append(out)
        return jnp.sum(jnp.concatenate(outs, 1) ** 2) + jnp.sum(h * w_last)

    whole = lambda u: jnp.sum(op(x, u, h0)[1] ** 2) + jnp.sum(op(x, u, h0)[0] * w_last)
    np.testing.assert_allclose(jax.jit(jax.grad(chunked))(u), jax.jit(jax.grad(whole))(u),
                               rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------
# The transform contract.


def _flat_case(kind="lstm", seed=11):
    x, kernel, u, bias, h0 = _inputs(kind, seed=seed)
    valid, reset = _masks(seed + 1)
    theta, unravel = ravel_pytree((kernel, u, bias, h0))
    w = jnp.asarray(np.random.default_rng(seed + 2).normal(size=(B, T, D)))

    def apply(theta, x):
        kernel, u, bias, h0 = unravel(theta)
        return _op(kind, x, kernel, u, bias, h0, mask=valid, reset=reset)

    def loss(theta, x):
        h_last, h = apply(theta, x)
        return jnp.sum(h * w) + jnp.sum(jnp.sin(h_last))

    return apply, loss, theta, x


def _fd(fun, theta, v):
    return jax.tree.map(lambda a, b: (a - b) / (2 * EPS), fun(theta + EPS * v),
                        fun(theta - EPS * v))


def _close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert np.max(np.abs(g - w)) <= tol * max(np.max(np.abs(w)), 1e-12), \
            (np.max(np.abs(g - w)), np.max(np.abs(w)))


def test_forward_mode_and_second_derivatives_against_differences():
    _, loss, theta, x = _flat_case()
    rng = np.random.default_rng(20)
    v, w = (jnp.asarray(rng.normal(size=theta.shape)) for _ in range(2))
    # Jitted once and reused: the differences evaluate f and grad twice each
    # (eager op-by-op dispatch would compile every primitive separately).
    f = jax.jit(lambda t: loss(t, x))
    grad = jax.jit(jax.grad(f))
    want = _fd(f, theta, v)
    _close(jnp.dot(grad(theta), v), want, 1e-7)
    _close(jax.jit(lambda t: jax.jvp(f, (t,), (v,))[1])(theta), want, 1e-7)
    _close(jax.jit(lambda t: jax.linearize(f, t)[1](v))(theta), want, 1e-7)
    fd_grad = _fd(grad, theta, v)
    hvp = jax.jit(lambda t: jax.jvp(grad, (t,), (v,))[1])(theta)
    _close(hvp, fd_grad, 1e-5)
    gg = jax.jit(jax.grad(lambda t: jnp.dot(grad(t), w)))(theta)
    _close(jnp.dot(gg, v), jnp.dot(fd_grad, w), 1e-5)


def test_vmap_checkpoint_and_export():
    apply, loss, theta, _ = _flat_case()
    rng = np.random.default_rng(21)
    xs = jnp.asarray(rng.normal(size=(3, B, T, D_IN)))
    grad = jax.grad(loss)
    # The references, jitted once and reused for every example.
    apply_ref, grad_ref = jax.jit(apply), jax.jit(grad)
    batched = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(theta, xs)
    per_example = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(theta, xs)
    for i in range(3):
        _close(jax.tree.map(lambda o: o[i], batched), apply_ref(theta, xs[i]), 1e-13)
        _close(per_example[i], grad_ref(theta, xs[i]), 1e-12)
    _close(jax.jit(jax.grad(jax.checkpoint(loss)))(theta, xs[0]), grad_ref(theta, xs[0]),
           1e-13)
    for fun, ref in ((apply, apply_ref), (grad, grad_ref)):
        restored = export.deserialize(export.export(jax.jit(fun))(theta, xs[0]).serialize())
        _close(restored.call(theta, xs[0]), ref(theta, xs[0]), 1e-13)


# ----------------------------------------------------------------------------
# Arguments.


def test_bad_arguments_name_what_was_expected():
    x, kernel, u, bias, h0 = _inputs("gru")
    coeff = lambda p, par: gru_like(p, par)
    call = lambda **kw: tr.true_recurrence(
        coeff, kw.pop("x", x), kw.pop("h0", h0), recurrent_kernel=kw.pop("u", u),
        kernel=kw.pop("kernel", kernel), params=bias, **kw)
    with pytest.raises(ValueError, match="recurrent_kernel must have shape"):
        call(u=u[:, :-1])
    with pytest.raises(ValueError, match="kernel must have shape"):
        call(kernel=kernel[:-1])
    with pytest.raises(ValueError, match="x must have shape"):
        call(x=x[0])
    with pytest.raises(ValueError, match="h0"):
        call(h0=h0[:, :-1])
    with pytest.raises(TypeError, match="recurrent_kernel"):
        call(u=u.astype(jnp.int32))
    with pytest.raises(ValueError, match="whole blocks of d_h"):
        tr.true_recurrence(lambda p, par: (p[..., :D], p[..., :D]), x, h0,
                           recurrent_kernel=jnp.zeros((D, 2 * D + 1)),
                           kernel=jnp.zeros((D_IN, 2 * D + 1)))
    with pytest.raises(ValueError, match="side_features must be in"):
        tr.true_recurrence_with_readout(coeff, lambda h, s, p: h, x, h0,
                                        recurrent_kernel=u, kernel=kernel,
                                        side_features=2 * D, params=bias)
    with pytest.raises(ValueError, match="coeff_fn must return"):
        tr.true_recurrence(lambda p, par: (p, p), x, h0, recurrent_kernel=u, kernel=kernel)
