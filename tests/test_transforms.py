"""The transform contract: every JAX transformation on every module, on the
default settings, in float64 against independent references.

Transformations (columns): jit, grad, vjp, jvp, linearize, Hessian-vector
products, grad of grad, vmap, jax.checkpoint, eval_shape, shard_map and
jax.export (serialize, deserialize and call).  Modules (rows): linear_scan,
MinGRU, MinLSTM, GatedLinearRNN (tied and untied, associative and true
recurrence), RGLRU, LM and Griffin.

References: derivatives against central differences of the float64 function
along random directions; jit, vmap, checkpoint, shard_map and export against
the eager, looped, plain or unexported call.  The default implementation on
CPU is "sequential" below T = 64 and "chunked" (the tile loop with its
hand-written adjoint) from 64 on; the module cases run the chunked path with
4-step tiles over 9 steps (several tiles and a partial one), the sequential
path at T = 5, and the associative one.

The second half checks the table of the README ("Transformations by
implementation"): every "yes" works and every "no" raises an error that names
``scan_impl`` and what to use instead.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

import flax_minrnn as fm
from flax_minrnn.ops import gated as gated_lib
from reference import layer_forward

EPS = 1e-6
_DEFAULT_TILES = (gated_lib._TILE_MIN, gated_lib._TILE_MAX)  # pylint: disable=protected-access


@pytest.fixture(autouse=True)
def float64_and_small_tiles(monkeypatch):
    """float64 for the references; 4-step tiles so that T = 9 crosses several."""
    monkeypatch.setattr(gated_lib, "_TILE_MIN", 4)
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 4)
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------
# The modules: each case is (apply(theta, x) -> outputs, theta, inputs(n)).


F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _layer_case(layer, d_in=3, seq_len=9, batch=2):
    def inputs(n, seed=0):
        rng = np.random.default_rng(seed)
        return [jnp.asarray(rng.normal(size=(batch, seq_len, d_in))) for _ in range(n)]

    x = inputs(1)[0]
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    theta, unravel = ravel_pytree(params)

    def apply(theta, x):
        return layer.apply(unravel(theta), x)

    return apply, theta, inputs


def _scan_case(impl="auto", seq_len=9):
    def inputs(n, seed=0):
        rng = np.random.default_rng(seed)
        return [jnp.asarray(rng.normal(size=(2, seq_len, 3))) for _ in range(n)]

    rng = np.random.default_rng(1)
    theta = jnp.asarray(np.concatenate([rng.uniform(-1, 1, seq_len * 3), rng.normal(size=3)]))

    def apply(theta, b):
        # a in (0, 1) and h0 from the parameters (shared over the batch), b
        # the input.
        a = jax.nn.sigmoid(theta[:seq_len * 3].reshape(1, seq_len, 3))
        h0 = theta[seq_len * 3:].reshape(1, 3)
        batch = b.shape[0]
        return fm.linear_scan(jnp.broadcast_to(a, b.shape), b,
                              jnp.broadcast_to(h0, (batch, 3)), impl=impl)

    return apply, theta, inputs


def _token_case(model, vocab, seq_len=9, batch=2):
    def inputs(n, seed=0):
        rng = np.random.default_rng(seed)
        return [jnp.asarray(rng.integers(0, vocab, (batch, seq_len)), jnp.int32)
                for _ in range(n)]

    tokens = inputs(1)[0]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    theta, unravel = ravel_pytree(params)

    def apply(theta, tokens):
        # The carry itself (a NamedTuple of NamedTuples): export serializes it.
        return model.apply(unravel(theta), tokens)

    return apply, theta, inputs


def _case(name, tiled="chunked"):
    """The case ``name``; ``tiled`` replaces the implementation of the cases
    that run the tile loop (``CHUNKED``)."""
    chunked = dict(scan_impl=tiled, **F64)
    if name == "linear_scan":
        return _scan_case(tiled)
    if name == "linear_scan_seq":
        return _scan_case("auto", seq_len=5)  # auto: sequential below T = 64
    if name == "MinGRU":
        # d_h = d_in (3): the adjoint writes dx over a kept projection block,
        # which MinLSTM's and GatedLinearRNN's cases (d_h = 4) do not.
        return _layer_case(fm.MinGRU(d_h=3, **chunked))
    if name == "MinLSTM":
        return _layer_case(fm.MinLSTM(d_h=4, d_model=3, **chunked))
    if name == "GatedLinearRNN_tied":
        return _layer_case(fm.GatedLinearRNN(d_h=4, d_model=3, **chunked))
    if name == "GatedLinearRNN_untied_assoc":
        return _layer_case(fm.GatedLinearRNN(d_h=4, d_model=3, use_tied_gates=False,
                                             scan_impl="associative", **F64))
    if name == "GatedLinearRNN_true":
        layer = fm.GatedLinearRNN(d_h=4, d_model=3, use_true_recurrence=True, **F64)
        apply, theta, inputs = _layer_case(layer)
        # A non-zero recurrent kernel, so that the gates do see h_{t-1}.
        theta = theta + 0.2 * jnp.asarray(np.random.default_rng(3).normal(size=theta.shape))
        return apply, theta, inputs
    if name == "RGLRU":
        return _layer_case(fm.RGLRU(num_heads=2, **chunked), d_in=4)
    if name == "LM":
        cfg = fm.LMConfig(vocab_size=7, n_layer=1, d_model=4, conv_width=2, **chunked)
        return _token_case(fm.LM(cfg), 7)
    if name == "Griffin":
        cfg = fm.GriffinConfig(vocab_size=7, num_hidden_layers=2, hidden_size=8,
                               intermediate_size=8, num_attention_heads=2,
                               num_key_value_heads=1, attention_window_size=3, conv1d_width=2,
                               block_types=("recurrent", "attention"), **chunked)
        return _token_case(fm.Griffin(cfg), 7)
    raise KeyError(name)


# The cases that run the tile loop and its hand-written adjoint.
CHUNKED = ["linear_scan", "MinGRU", "MinLSTM", "GatedLinearRNN_tied", "RGLRU", "LM", "Griffin"]
MODULES = ["linear_scan", "linear_scan_seq", "MinGRU", "MinLSTM",
           "GatedLinearRNN_tied", "GatedLinearRNN_untied_assoc", "GatedLinearRNN_true",
           "RGLRU", "LM", "Griffin"]


def _loss_fn(apply, theta, x, seed=5):
    """``loss(theta, x)``: a scalar of every float output with fixed random
    weights (random cotangents)."""
    floats = lambda tree: [o for o in jax.tree.leaves(tree)
                           if jnp.issubdtype(o.dtype, jnp.floating)]
    rng = np.random.default_rng(seed)
    weights = [jnp.asarray(rng.normal(size=s.shape))
               for s in floats(jax.eval_shape(apply, theta, x))]

    def loss(theta, x):
        return sum(jnp.sum(o * w) for o, w in zip(floats(apply(theta, x)), weights))
    return loss


def _direction(theta, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=theta.shape))


def _fd(fun, theta, v):
    """Central difference of ``fun`` (array- or pytree-valued) along ``v``."""
    up, down = fun(theta + EPS * v), fun(theta - EPS * v)
    return jax.tree.map(lambda u, d: (u - d) / (2 * EPS), up, down)


def _close(got, want, tol=1e-7):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(np.max(np.abs(w)), 1e-12)
        assert np.max(np.abs(g - w)) <= tol * scale, (np.max(np.abs(g - w)), scale)


@pytest.mark.parametrize("name", MODULES)
def test_every_transformation(name):
    """All twelve transformations on one module, each against its reference.
    Transformations with the same arguments share one jitted function (one
    compilation); each result is still checked on its own."""
    apply, theta, inputs = _case(name)
    x = inputs(1)[0]
    loss = _loss_fn(apply, theta, x)
    f = jax.jit(loss)
    grad = jax.jit(jax.grad(loss))
    v, w = _direction(theta, 1), _direction(theta, 2)

    # jit and eval_shape, against the eager call.
    eager = apply(theta, x)
    jitted = jax.jit(apply)
    _close(jitted(theta, x), eager, 1e-12)
    for s, o in zip(jax.tree.leaves(jax.eval_shape(apply, theta, x)), jax.tree.leaves(eager)):
        assert s.shape == o.shape and s.dtype == o.dtype

    # First derivatives, against central differences along v.
    want = _fd(lambda t: f(t, x), theta, v)
    g = grad(theta, x)
    _close(jnp.dot(g, v), want)
    vjp, jvp, lin = jax.jit(lambda t, d: (
        jax.vjp(lambda q: loss(q, x), t)[1](1.0)[0],
        jax.jvp(lambda q: loss(q, x), (t,), (d,))[1],
        jax.linearize(lambda q: loss(q, x), t)[1](d)))(theta, v)
    _close(jnp.dot(vjp, v), want)
    _close(jvp, want)
    _close(lin, want)

    # Second derivatives: forward over reverse (Hessian-vector product) and
    # reverse over reverse (grad of grad), against differences of grad.
    hvp, gg = jax.jit(lambda t, d: (
        jax.jvp(lambda q: grad(q, x), (t,), (d,))[1],
        jax.grad(lambda q: jnp.dot(grad(q, x), w))(t)))(theta, v)
    fd_grad = _fd(lambda t: grad(t, x), theta, v)
    _close(hvp, fd_grad)
    _close(jnp.dot(gg, v), jnp.dot(fd_grad, w))

    # The tile loop's output and hand-written adjoint, element by element,
    # against the plain loop differentiated by JAX (a difference along one
    # direction can hide a small error in a few elements).
    if name in CHUNKED:
        plain, _, _ = _case(name, tiled="sequential")
        _close(plain(theta, x), eager, 1e-12)
        _close(jax.jit(jax.grad(_loss_fn(plain, theta, x)))(theta, x), g, 1e-12)

    # vmap over inputs (forward and per-example gradients) against a loop of
    # the jitted calls (the jitted call equals the eager one, above).
    xs = inputs(3, seed=7)
    batched, per_example = jax.jit(lambda t, xs: (
        jax.vmap(apply, in_axes=(None, 0))(t, xs),
        jax.vmap(grad, in_axes=(None, 0))(t, xs)))(theta, jnp.stack(xs))
    for i, xi in enumerate(xs):
        _close(jax.tree.map(lambda o: o[i], batched), jitted(theta, xi), 1e-12)
        _close(per_example[i], grad(theta, xi), 1e-12)

    # jax.checkpoint: the same gradient.
    _close(jax.jit(jax.grad(jax.checkpoint(loss)))(theta, x), g, 1e-12)

    # shard_map over the batch (every device that divides it), forward and
    # gradient, against the unsharded call.
    devices = jax.devices()
    n = 2 if len(devices) >= 2 and x.shape[0] % 2 == 0 else 1
    mesh = jax.make_mesh((n,), ("data",), devices=devices[:n])
    specs = jax.tree.map(lambda _: P("data"), jax.eval_shape(apply, theta, x))
    sharded = jax.shard_map(apply, mesh=mesh, in_specs=(P(), P("data")), out_specs=specs)
    theta_r = jax.device_put(theta, NamedSharding(mesh, P()))
    x_s = jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded_loss = _loss_fn(sharded, theta, x_s)
    out_s, g_s = jax.jit(lambda t, xx: (sharded(t, xx), jax.grad(sharded_loss)(t, xx)))(
        theta_r, x_s)
    _close(out_s, eager, 1e-12)
    _close(g_s, g, 1e-10)

    # jax.export: serialize, deserialize and call, forward and gradient.
    for fun, want_out in ((apply, eager), (jax.grad(loss), g)):
        restored = export.deserialize(export.export(jax.jit(fun))(theta, x).serialize())
        got = restored.call(theta, x)
        assert jax.tree.structure(got) == jax.tree.structure(want_out)  # carries' types too
        _close(got, want_out, 1e-12)


def _no_indexing_ops(exported) -> bool:
    """Whether an export holds no gather or scatter (NumPy-style indexing of
    a symbolic dimension lowers to them; the library indexes with lax
    slices)."""
    return not re.search(r"stablehlo\.(gather|dynamic_gather|scatter)\b",
                         exported.mlir_module())


@pytest.mark.parametrize("name", ["MinGRU", "GatedLinearRNN_untied_assoc", "LM", "Griffin"])
def test_export_with_a_symbolic_batch(name):
    """Exported once with a symbolic batch size, the forward pass and the
    gradient run at other batch sizes and equal the unexported calls; with a
    symbolic time axis, a named ``associative`` (which needs a concrete
    length) is refused with an error that says so."""
    apply, theta, inputs = _case(name)
    x = inputs(1)[0]
    dims = ", ".join(str(d) for d in x.shape[2:])
    spec = lambda head: jax.ShapeDtypeStruct(
        export.symbolic_shape(", ".join(filter(None, [head, dims]))), x.dtype)

    def loss(theta, x):
        return sum(jnp.sum(o ** 2) for o in jax.tree.leaves(apply(theta, x))
                   if jnp.issubdtype(o.dtype, jnp.floating))

    for fun in (apply, jax.grad(loss)):
        exported = export.export(jax.jit(fun))(theta, spec(f"b, {x.shape[1]}"))
        assert name in ("LM", "Griffin") or _no_indexing_ops(exported)
        restored = export.deserialize(exported.serialize())
        for xb in (x[:1], jnp.concatenate([x, x[::-1]], axis=0)):
            _close(restored.call(theta, xb), fun(theta, xb), 1e-12)
    # The associative scan needs a concrete length.
    apply, theta, _ = _case(name, tiled="associative")
    with pytest.raises(ValueError, match=r"scan_impl='associative' needs a concrete "
                                         r"sequence length.*symbolic size t.*'auto'"):
        export.export(jax.jit(apply))(theta, spec(f"{x.shape[0]}, t"))


def _symbolic_time_case(name):
    """``(apply, theta, make_input(batch, T))`` with the default scan_impl."""
    rng = np.random.default_rng(5)
    layers = {
        "MinGRU": (fm.MinGRU(d_h=3, **F64), 3),
        "MinLSTM_reverse": (fm.MinLSTM(d_h=4, d_model=3, reverse=True, **F64), 3),
        "GatedLinearRNN_true": (fm.GatedLinearRNN(d_h=4, d_model=3, use_true_recurrence=True,
                                                  **F64), 3),
        "MinGRU_true_reverse": (fm.MinGRU(d_h=3, use_true_recurrence=True, reverse=True,
                                          **F64), 3),
        "RGLRU": (fm.RGLRU(num_heads=2, **F64), 4)}
    if name == "linear_scan":  # Resets, lengths and reverse, all traced.
        def apply(theta, x):
            a = jax.nn.sigmoid(x * theta[0] + theta[1])
            lengths = x.shape[1] - jnp.arange(x.shape[0], dtype=jnp.int32) % 2
            # (lax indexing: x[..., 0] of a symbolic shape would be a gather.)
            reset = jax.lax.index_in_dim(x, 0, 2, keepdims=False) > 1.0
            return fm.linear_scan(a, x, None, reset=reset, seq_lengths=lengths, reverse=True)
        return apply, jnp.asarray([0.7, 0.3]), lambda b, t: jnp.asarray(rng.normal(size=(b, t, 3)))
    if name in layers:
        layer, d_in = layers[name]
        make = lambda b, t: jnp.asarray(rng.normal(size=(b, t, d_in)))
        model = layer
    else:
        make = lambda b, t: jnp.asarray(rng.integers(0, 7, (b, t)), jnp.int32)
        model = (fm.LM(fm.LMConfig(vocab_size=7, n_layer=1, d_model=4, conv_width=2,
                                   positional_encoding="learned", max_seq_length=16, **F64))
                 if name == "LM" else
                 fm.Griffin(fm.GriffinConfig(
                     vocab_size=7, num_hidden_layers=2, hidden_size=8, intermediate_size=8,
                     num_attention_heads=2, num_key_value_heads=1, attention_window_size=3,
                     conv1d_width=2, block_types=("recurrent", "attention"), **F64)))
    theta, unravel = ravel_pytree(jax.jit(model.init)(jax.random.PRNGKey(0), make(1, 4)))
    # Non-zero recurrent kernels and norm deltas: every parameter matters.
    theta = theta + 0.2 * jnp.asarray(rng.normal(size=theta.shape))
    return (lambda theta, x: model.apply(unravel(theta), x)), theta, make


@pytest.mark.parametrize("name", ["linear_scan", "MinGRU", "MinLSTM_reverse",
                                  "GatedLinearRNN_true", "MinGRU_true_reverse", "RGLRU", "LM",
                                  "Griffin"])
def test_export_with_a_symbolic_time_axis(name):
    """Exported once with a symbolic batch and time axis (scan_impl 'auto'),
    the forward pass, the gradient and a forward-mode derivative run at
    other batches and lengths (T = 1, and lengths that are and are not
    multiples of the loop's blocks) and equal the unexported calls.

    The layers' exports hold no gather or scatter: NumPy-style indexing of a
    symbolic dimension lowers to a gather, whose transpose, a scatter, XLA
    spent 25 s constant-folding at T = 4096 when the cotangent was a
    constant.  (LM and Griffin gather by index: token embeddings, the last
    valid position, the attention's ring buffer.)"""
    apply, theta, make = _symbolic_time_case(name)
    x = make(1, 4)
    spec = jax.ShapeDtypeStruct(export.symbolic_shape(
        ", ".join(["b, t", *(str(d) for d in x.shape[2:])])), x.dtype)

    def loss(theta, x):
        return sum(jnp.sum(o ** 2) for o in jax.tree.leaves(apply(theta, x))
                   if jnp.issubdtype(o.dtype, jnp.floating))

    def directional(theta, x):
        if not jnp.issubdtype(x.dtype, jnp.floating):  # token ids
            return jax.jvp(lambda t: loss(t, x), (theta,), (jnp.cos(theta),))
        return jax.jvp(loss, (theta, x), (jnp.cos(theta), jnp.sin(x)))

    for fun in (apply, jax.grad(loss), directional):
        exported = export.export(jax.jit(fun))(theta, spec)
        if name not in ("LM", "Griffin"):
            assert _no_indexing_ops(exported)
        restored = export.deserialize(exported.serialize())
        for batch, seq_len in ((1, 1), (2, 5), (1, 8), (3, 13)):
            xt = make(batch, seq_len)
            got, want = restored.call(theta, xt), fun(theta, xt)
            assert jax.tree.structure(got) == jax.tree.structure(want)
            _close([g for g in jax.tree.leaves(got) if g.size],
                   [w for w in jax.tree.leaves(want) if w.size], 1e-12)


@pytest.mark.parametrize("name", ["MinGRU", "GatedLinearRNN_reverse"])
def test_symbolic_time_axis_runs_whole_tiles_then_short_blocks(monkeypatch, name):
    """With a symbolic time axis, ``auto`` runs the tile loop: whole tiles,
    then blocks of 8 steps that may run over identity steps appended past
    the end.  Exported once (tiles of 32 steps here), the forward pass, the
    gradient and a forward-mode derivative equal the unexported calls, with
    resets and padded rows, at lengths below, at and past one tile and
    several tiles, in both directions, with and without a readout."""
    symbolic_t = export.symbolic_shape("t")[0]
    assert fm.ops.scan.default_impl(symbolic_t, backend="cpu") is fm.ops.scan.ScanImpl.CHUNKED
    monkeypatch.setattr(gated_lib, "_TILE_MAX", 32)
    layer = (fm.MinGRU(d_h=3, **F64) if name == "MinGRU" else
             fm.GatedLinearRNN(d_h=4, d_model=3, reverse=True, **F64))
    rng = np.random.default_rng(11)
    theta, unravel = ravel_pytree(layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 3))))
    theta = theta + 0.2 * jnp.asarray(rng.normal(size=theta.shape))

    def apply(theta, x):
        lengths = x.shape[1] - (jnp.arange(x.shape[0], dtype=jnp.int32) % 3)
        return layer.apply(unravel(theta), x, reset=x[..., 0] > 1.2,
                           seq_lengths=jnp.maximum(lengths, 0))

    def loss(theta, x):
        carry, y = apply(theta, x)
        return jnp.sum(y ** 2) + jnp.sum(jnp.sin(carry))

    def directional(theta, x):
        return jax.jvp(loss, (theta, x), (jnp.cos(theta), jnp.sin(x)))

    spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, t, 3"), jnp.float64)
    for fun in (apply, jax.grad(loss, argnums=(0, 1)), directional):
        restored = export.deserialize(export.export(jax.jit(fun))(theta, spec).serialize())
        for batch, seq_len in ((3, 1), (3, 9), (2, 32), (3, 33), (3, 101)):
            xt = jnp.asarray(rng.normal(size=(batch, seq_len, 3)))
            got, want = restored.call(theta, xt), fun(theta, xt)
            assert jax.tree.structure(got) == jax.tree.structure(want)
            _close(got, want, 1e-12)

    # Against the float64 NumPy loop, and streamed: the exported call on the
    # sequence equals the reference, and so does the same export run on two
    # chunks with the carry passed between them (the later chunk first in
    # reverse), at lengths past several tiles.
    kind, kw = ("mingru", {}) if name == "MinGRU" else ("glrnn", {"tied": True})
    reverse = name != "MinGRU"
    params = jax.tree.map(np.asarray, unravel(theta))["params"]
    b, t = export.symbolic_shape("b, t")
    streamed = export.deserialize(export.export(jax.jit(
        lambda theta, x, h0: layer.apply(unravel(theta), x, h0)))(
            theta, jax.ShapeDtypeStruct((b, t, 3), jnp.float64),
            jax.ShapeDtypeStruct((b, layer.d_h), jnp.float64)).serialize())
    for batch, seq_len, split in ((3, 101, 40), (2, 70, 33)):
        x = rng.normal(size=(batch, seq_len, 3))
        x_ref = x[:, ::-1] if reverse else x
        ref_h, ref_y = layer_forward(kind, params, x_ref, **kw)
        ref_y = ref_y[:, ::-1] if reverse else ref_y
        h0 = np.zeros((batch, layer.d_h))
        carry, y = streamed.call(theta, jnp.asarray(x), jnp.asarray(h0))
        _close((carry, y), (ref_h, ref_y), 1e-12)
        first, second = (x[:, split:], x[:, :split]) if reverse else (x[:, :split], x[:, split:])
        mid, y_first = streamed.call(theta, jnp.asarray(first), jnp.asarray(h0))
        carry, y_second = streamed.call(theta, jnp.asarray(second), mid)
        y = (jnp.concatenate([y_second, y_first], 1) if reverse
             else jnp.concatenate([y_first, y_second], 1))
        _close((carry, y), (ref_h, ref_y), 1e-12)


# ----------------------------------------------------------------------------
# The README's table: which implementation supports which transformation.


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_table():
    """{impl: {transformation: 'yes'|'no'}} from the README's table."""
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- transform-table -->")
    lines = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            break
        lines.append(line)
    header = [c.strip().strip("`") for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    return table


TRANSFORMS = {
    "grad": lambda f, p, t: jax.grad(f)(p),
    "jvp": lambda f, p, t: jax.jvp(f, (p,), (t,)),
    "vmap": lambda f, p, t: jax.vmap(jax.grad(f))(jnp.stack([p, p])),
    "hvp": lambda f, p, t: jax.jvp(jax.grad(f), (p,), (t,)),
    "grad of grad": lambda f, p, t: jax.grad(lambda q: jnp.sum(jax.grad(f)(q) ** 2))(p),
    "checkpoint": lambda f, p, t: jax.grad(jax.checkpoint(f))(p),
    "export": lambda f, p, t: export.deserialize(
        export.export(jax.jit(f))(p).serialize()).call(p),
}


def test_readme_table_lists_every_implementation_and_transformation():
    table = readme_table()
    assert set(table) == set(fm.ScanImpl.__members__[k].value for k in fm.ScanImpl.__members__)
    for row in table.values():
        assert set(row) == set(TRANSFORMS) | {"jit"}
        assert set(row.values()) <= {"yes", "no"}


_SEQUENTIAL_RESULTS = {}  # transformation -> its result with scan_impl="sequential"


@pytest.mark.parametrize("impl", [i.value for i in fm.ScanImpl])
def test_readme_table_is_true(impl, monkeypatch):
    """Each "yes" cell runs and agrees with the sequential implementation;
    each "no" cell raises an error naming scan_impl and the alternative."""
    from flax_minrnn.backends import native  # pylint: disable=import-outside-toplevel
    if impl == "native" and not native.available():
        pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    # The default tiles (T = 70: two full tiles and a partial one); the
    # 4-step tiles of the matrix above would only lengthen the compilation.
    monkeypatch.setattr(gated_lib, "_TILE_MIN", _DEFAULT_TILES[0])
    monkeypatch.setattr(gated_lib, "_TILE_MAX", _DEFAULT_TILES[1])
    row = readme_table()[impl]
    layer = fm.MinGRU(d_h=4, dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 70, 3)), jnp.float32)
    params, unravel = ravel_pytree(layer.init(jax.random.PRNGKey(0), x))

    def loss_of(scan_impl):
        return lambda p: jnp.sum(layer.clone(scan_impl=scan_impl).apply(unravel(p), x)[1] ** 2)

    t = jnp.asarray(np.random.default_rng(1).normal(size=params.shape), jnp.float32)
    for name, transform in TRANSFORMS.items():
        if row[name] == "yes":
            got = jax.jit(lambda p, d: transform(loss_of(impl), p, d))(params, t)
            if name not in _SEQUENTIAL_RESULTS:  # The same inputs for every impl.
                _SEQUENTIAL_RESULTS[name] = jax.jit(
                    lambda p, d: transform(loss_of("sequential"), p, d))(params, t)
            want = _SEQUENTIAL_RESULTS[name]
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(),
                                           err_msg=name)
        else:
            with pytest.raises(Exception, match=r"scan_impl='%s'.*use scan_impl='\w+'" % impl):
                jax.block_until_ready(
                    jax.jit(lambda p, d: transform(loss_of(impl), p, d))(params, t))
    assert row["jit"] == "yes"
    jax.jit(loss_of(impl))(params)


def test_linear_op_traces_each_map_once_and_stays_exact():
    """A ``linear_op``'s map is a whole tile loop in the layers, so binding it
    (once for the primal, once for the tangent) traces it once, and
    reverse mode traces the transpose once; the results stay those of the
    maps, checked against ``y = w * x`` in closed form."""
    from flax_minrnn.ops.linear import linear_op

    traced = {"fun": 0, "transpose": 0}

    def fun(w, x):
        traced["fun"] += 1
        return {"y": w * x}

    def transpose(w, ct):
        traced["transpose"] += 1
        return w * ct["y"]

    w = jnp.asarray([0.5, -2.0, 3.0])
    x = jnp.asarray([1.0, 4.0, -1.5])
    ct = jnp.asarray([0.25, 1.0, -2.0])

    def f(x):
        return linear_op(fun, transpose, w, x)["y"]

    jax.make_jaxpr(lambda x, t: jax.jvp(f, (x,), (t,)))(x, ct)
    assert traced == {"fun": 1, "transpose": 0}
    traced.update(fun=0)
    jax.make_jaxpr(jax.grad(lambda x: jnp.vdot(f(x), ct)))(x)
    assert traced == {"fun": 1, "transpose": 1}
    y, dy = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, ct)
    np.testing.assert_array_equal(y, w * x)
    np.testing.assert_array_equal(dy, w * ct)
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: jnp.vdot(f(x), ct)))(x), w * ct)
