"""The modes grid: every way of running a model computes the same function.

float64 throughout, tolerance 1e-12 relative to the scale of the compared
values (the observed differences are ~1e-15); 4-step tiles so that T = 11
and 13 cross several tiles and a partial one.

Rows (modules): MinGRU (with out_proj), MinLSTM (without), GatedLinearRNN
(tied and untied gates), each associative and in true-recurrence mode (with
a non-zero recurrent kernel), RGLRU, LM (time mixing mingru, minlstm, glrnn,
rglru; conv_width 2) and Griffin (a recurrent and an attention block, window
3 < T).  Every parameter is perturbed away from its initialisation (biases
are zero there, which would hide a bias added in the wrong place).

Columns (ways of running), for every scan_impl (auto, associative,
sequential, chunked; the true recurrence, which ignores it, runs the grid
with "auto" and is checked to give the same with the others; the models run
it with "auto", which on CPU below T = 64 is "sequential", checked so):
jit and eager; token by token (T = 1 calls in a ``lax.scan`` threading the
carry); uneven chunks (5, 1, rest) threading the carry; ``seq_lengths``
(ragged, one row of length 0, chunks of length 0) with ``reset`` (at step 0,
at a chunk's first step, at step n and beyond, in a row of length 0) from a
given initial carry, whole, token by token and in chunks; for the layers
also ``reverse=True``, whole, token by token and in chunks, streamed as
``linear_scan``'s docstring defines it (later part first, its carry passed
on, a zero carry where a document boundary lies at the cut).

Properties: all ways agree; the layers equal a float64 NumPy loop
(``reference.layer_forward`` and its step equations ``layer_step_coeffs``,
extended below to resets, padding and reverse with the boundary rule of
``reference.linear_recurrence``; the RG-LRU and Griffin the references of
``test_griffin``); layer outputs at padded steps are exactly zero; the carry
after ``seq_lengths`` is the state at each row's last valid step (the
initial carry, bit for bit, for a row of length 0); causality (a change at
step t changes no output before t, or after t in reverse) and documents
never mix (a change before a reset, and of the initial carry, changes no
output from the reset on), both bit-exact on one executable.

Compilation dominates the run time: each (module, impl) compiles a handful
of jitted functions once (``functools.lru_cache``): the streamed ways are one
function, run with (n = T, no reset) for the plain way and with the ragged
lengths and resets; the tests read the results.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_minrnn as fm
from flax_minrnn.ops import gated as gated_lib
from reference import _dense, layer_forward, layer_step_coeffs, scan_steps
from test_griffin import griffin_ref, rglru_ref

# Every scan_impl is covered: on CPU "auto" is "sequential" below T = 64,
# resolved before tracing (one program).  The grid runs "auto", and
# test_sequential_is_auto checks "sequential".
GRID_IMPLS = ("auto", "associative", "chunked")
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
RTOL = 1e-12
B = 3
SPLITS = (5, 6)  # chunks [0, 5), [5, 6), [6, T)


@pytest.fixture(scope="module", autouse=True)
def float64_and_small_tiles():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gated_lib, "_TILE_MIN", 4)
        mp.setattr(gated_lib, "_TILE_MAX", 4)
        with jax.enable_x64(True):
            yield


def _close(got, want, what=""):
    """Equal to 1e-12 relative to the scale of ``want`` (leaf by leaf)."""
    gl, wl = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(gl) == len(wl), what
    for g, w in zip(gl, wl):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, (what, g.shape, w.shape)
        if not np.issubdtype(w.dtype, np.floating):
            np.testing.assert_array_equal(g, w, err_msg=what)
            continue
        assert g.dtype == np.float64, (what, g.dtype)
        scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(g - w), initial=0.0))
        assert err <= RTOL * scale, f"{what}: max abs err {err:.3e}, scale {scale:.3e}"


def _perturb(tree, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)
                                              + scale * rng.normal(size=v.shape)), tree)


def _chunk_bounds(seq_len):
    edges = (0,) + SPLITS + (seq_len,)
    return list(zip(edges, edges[1:]))


def _chunk_lengths(lengths, lo, hi):
    return jnp.clip(lengths - lo, 0, hi - lo).astype(jnp.int32)


def _row_tree(tree, i):
    return jax.tree.map(lambda v: np.asarray(v)[i], tree)


# ----------------------------------------------------------------------------
# Layers.

T_L, D_IN = 13, 4
L_LENGTHS = np.array([T_L, 6, 0])
L_RESET = np.zeros((B, T_L), bool)
L_RESET[0, [3, 6, 9]] = True   # 6: the first step of the last chunk
L_RESET[1, [0, 4, 6, 8]] = True  # 0: the initial carry is dropped; 6 = n, 8: padded
L_RESET[2, 2] = True           # a row of length 0

LAYERS = {
    "mingru": (lambda **kw: fm.MinGRU(d_h=5, d_model=3, **kw), "mingru", {}),
    "minlstm": (lambda **kw: fm.MinLSTM(d_h=D_IN, **kw), "minlstm", {}),
    "glrnn_tied": (lambda **kw: fm.GatedLinearRNN(d_h=5, d_model=3, **kw), "glrnn",
                   {"tied": True}),
    "glrnn_untied": (lambda **kw: fm.GatedLinearRNN(d_h=4, use_tied_gates=False, **kw),
                     "glrnn", {"tied": False}),
    "rglru": (lambda **kw: fm.RGLRU(num_heads=2, **kw), "rglru", {}),
}
LAYER_CASES = [(n, tr) for n in LAYERS for tr in ((False, True) if n != "rglru" else (False,))]
LAYER_IDS = [f"{n}-{'true' if tr else 'assoc'}" for n, tr in LAYER_CASES]
# The true recurrence ignores scan_impl: the grid runs "auto" there, and
# test_true_recurrence_ignores_scan_impl the others.
LAYER_GRID = [pytest.param(n, tr, impl, id=f"{i}-{impl}")
              for (n, tr), i in zip(LAYER_CASES, LAYER_IDS)
              for impl in (("auto",) if tr else GRID_IMPLS)]
GATED_GRID = [p for p in LAYER_GRID if p.values[0] != "rglru"]


def layer_ref(kind, p, x, h0, *, true_rec=False, valid=None, reset=None, reverse=False,
              **kw):
    """``reference.layer_forward`` one row and one step at a time, with
    padding (invalid steps keep the state, output 0), resets (the state
    restarts from zero at a document's first valid step in scan order, as in
    ``reference.linear_recurrence``) and reverse.  Returns (h_last, states, y)."""
    x = np.asarray(x, np.float64)
    batch, seq_len, _ = x.shape
    pre_all = _dense(x, p["in_proj"])
    n_proj = {"mingru": 2, "minlstm": 3}.get(kind, 3 if kw.get("tied", True) else 4)
    d_h = pre_all.shape[-1] // n_proj
    h = np.array(h0, np.float64)
    states = np.zeros((batch, seq_len, d_h))
    ys = [[None] * seq_len for _ in range(batch)]
    for t, i, restart in scan_steps(batch, seq_len, reset=reset, mask=valid, reverse=reverse):
        if restart:
            h[i] = 0.0
        pre = pre_all[i, t]
        if true_rec:
            pre = pre + h[i] @ np.asarray(p["recurrent_kernel"], np.float64)
        a, b, o = layer_step_coeffs(kind, pre, d_h, **kw)
        h[i] = a * h[i] + b
        states[i, t] = h[i]
        ys[i][t] = np.tanh(h[i]) * o if kind == "glrnn" else h[i].copy()
    y = np.stack([np.stack([v if v is not None else np.zeros(d_h) for v in row]) for row in ys])
    if "out_proj" in p:
        y = _dense(y, p["out_proj"])
    if valid is not None:
        y = np.where(np.asarray(valid)[:, :, None], y, 0.0)
    return h, states, y


def _layer_reference(name, true_rec, params, x, h0, valid=None, reset=None, reverse=False):
    kind, kw = LAYERS[name][1:]
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["params"])
    if kind == "rglru":
        assert not reverse
        h, y = rglru_ref(p, np.asarray(x), np.asarray(h0), reset=reset, valid=valid)
        return h, y, y  # y is the state
    return layer_ref(kind, p, x, h0, true_rec=true_rec, valid=valid, reset=reset,
                     reverse=reverse, **kw)


@functools.lru_cache(maxsize=None)
def _layer_setup(name, true_rec):
    """Parameters (perturbed, float64), inputs and the initial carry."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T_L, D_IN)))
    layer = LAYERS[name][0](use_true_recurrence=True, **F64) if true_rec else \
        LAYERS[name][0](**F64)
    params = _perturb(layer.init(jax.random.PRNGKey(0), x), seed=1)
    h0 = jnp.asarray(rng.uniform(-1.0, 1.0, layer.initialize_carry(x.shape, x.dtype).shape))
    return params, x, h0


def _layer(name, true_rec, impl, reverse=False):
    kw = dict(use_true_recurrence=True) if true_rec else {}
    if reverse:
        kw["reverse"] = True
    return LAYERS[name][0](scan_impl=impl, **kw, **F64)


def _streamed(apply, reverse=False):
    """One jitted function ``(p, x, c0, n, r) -> {"tokens", "chunks"}``: the
    sequence fed token by token (T = 1 calls in a ``lax.scan``, with the
    carry after each step) and in the chunks ``SPLITS``, threading the
    carry, with per-call ``seq_lengths`` and ``reset`` cut from ``n`` and
    ``r`` (``n = T``, ``r = 0``: no padding, no reset).  Reversed, later
    steps go first and, where a document starts at the first step of the
    part already fed, the carry passed on is zero (``linear_scan``'s
    docstring)."""

    @jax.jit
    def run(p, x, c0, n, r):
        seq_len = x.shape[1]
        steps = jnp.arange(seq_len, dtype=jnp.int32)
        # Reversed: a document boundary between a valid step t and t + 1
        # (a reset at t + 1 = n included: the references' and the library's
        # rule).
        starts_next = jnp.concatenate([r[:, 1:] & (steps[None, :-1] < n[:, None]),
                                       jnp.zeros_like(r[:, :1])], 1)

        def step(c, inputs):
            xt, t, rt, st = inputs
            if reverse:
                c = jnp.where(st[:, None], jnp.zeros((), c.dtype), c)
            c, y = apply(p, xt[:, None], c, seq_lengths=(t < n).astype(jnp.int32),
                         reset=rt[:, None])
            return c, (c, y[:, 0])

        c, (cs, ys) = jax.lax.scan(step, c0, (jnp.swapaxes(x, 0, 1), steps, r.T,
                                              starts_next.T), reverse=reverse)
        res = {"tokens": (c, jnp.swapaxes(ys, 0, 1)), "tokens_carries": cs}
        c, ys = c0, {}
        bounds = _chunk_bounds(seq_len)
        for lo, hi in (bounds[::-1] if reverse else bounds):
            if reverse and hi < seq_len:
                c = jnp.where(starts_next[:, hi - 1][:, None], jnp.zeros((), c.dtype), c)
            c, ys[lo] = apply(p, x[:, lo:hi], c, seq_lengths=_chunk_lengths(n, lo, hi),
                              reset=r[:, lo:hi])
        res["chunks"] = (c, jnp.concatenate([ys[lo] for lo, _ in bounds], 1))
        return res

    return run


def _plain(seq_len):
    return jnp.full((B,), seq_len, jnp.int32), jnp.zeros((B, seq_len), bool)


@functools.lru_cache(maxsize=None)
def _layer_runs(name, true_rec, impl):
    """Every way of running one layer, as NumPy arrays (computed once)."""
    params, x, h0 = _layer_setup(name, true_rec)
    lengths = jnp.asarray(L_LENGTHS, jnp.int32)
    reset = jnp.asarray(L_RESET)
    out = {}
    for pre, reverse in (("", False), ("rev_", True)):
        if reverse and name == "rglru":
            continue
        layer = _layer(name, true_rec, impl, reverse=reverse)
        full = jax.jit(layer.apply)
        masked = jax.jit(lambda p, x, h, n, r, layer=layer: layer.apply(
            p, x, h, seq_lengths=n, reset=r))
        stream = _streamed(layer.apply, reverse)
        out[pre + "jit"] = full(params, x, h0)
        out[pre + "masked_jit"] = masked(params, x, h0, lengths, reset)
        for key, val in stream(params, x, h0, *_plain(T_L)).items():
            out[pre + key] = val
        for key, val in stream(params, x, h0, lengths, reset).items():
            out[pre + "masked_" + key] = val
        # Causality: one executable, inputs changed at step t.
        for t in (0, 4, 9, 12):
            out[f"{pre}changed_{t}"] = full(params, x.at[:, t].add(1.0), h0)
        # Documents never mix: change everything before row 0's reset at 6 and
        # row 1's at 4, and the initial carry (reversed: from the reset on).
        if reverse:
            x_docs = x.at[0, 6:].add(1.0).at[1, 4:].add(1.0)
        else:
            x_docs = x.at[0, :6].add(1.0).at[1, :4].add(1.0)
        out[pre + "docs_changed"] = masked(params, x_docs, h0 + 1.0, lengths, reset)
        if not reverse:
            out["eager"] = layer.apply(params, x, h0)
        out[pre + "masked_eager"] = layer.apply(params, x, h0, seq_lengths=lengths, reset=reset)
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("name,true_rec,impl", LAYER_GRID)
def test_layer_whole_token_by_token_and_chunks_equal_the_reference(name, true_rec, impl):
    params, x, h0 = _layer_setup(name, true_rec)
    runs = _layer_runs(name, true_rec, impl)
    if name == "rglru":
        want_h, _, want_y = _layer_reference(name, true_rec, params, x, h0)
    else:
        kind, kw = LAYERS[name][1:]
        # The unextended reference itself, for the plain call.
        want_h, want_y = layer_forward(kind, jax.tree.map(np.asarray, params["params"]),
                                       np.asarray(x), np.asarray(h0),
                                       true_recurrence=true_rec, **kw)
    for way in ("jit", "eager", "tokens", "chunks"):
        _close(runs[way], (want_h, want_y), way)


@pytest.mark.parametrize("name,true_rec,impl", LAYER_GRID)
def test_layer_lengths_and_resets_equal_the_reference(name, true_rec, impl):
    params, x, h0 = _layer_setup(name, true_rec)
    runs = _layer_runs(name, true_rec, impl)
    valid = np.arange(T_L)[None, :] < L_LENGTHS[:, None]
    want_h, states, want_y = _layer_reference(name, true_rec, params, x, h0, valid=valid,
                                              reset=L_RESET)
    _check_masked(runs, "masked", (want_h, want_y), states, valid, h0,
                  last=lambda n: n - 1)  # The row's last valid step.


def _check_masked(runs, prefix, want, states, valid, h0, last):
    """The ``prefix`` ways equal ``want``, are exactly zero at padded steps,
    and carry the state at step ``last(n)`` of each row (``h0`` itself for a
    row of length 0)."""
    for way in (f"{prefix}_{w}" for w in ("jit", "eager", "tokens", "chunks")):
        carry, y = runs[way]
        _close((carry, y), want, way)
        assert not np.any(y[~valid]), way
        for i, n in enumerate(L_LENGTHS):
            if n == 0:
                np.testing.assert_array_equal(carry[i], np.asarray(h0)[i], err_msg=way)
            else:
                _close(carry[i], states[i, last(n)], f"{way} row {i}")


@pytest.mark.parametrize("name,true_rec,impl", GATED_GRID)
def test_layer_reverse_equals_the_reference(name, true_rec, impl):
    params, x, h0 = _layer_setup(name, true_rec)
    runs = _layer_runs(name, true_rec, impl)
    want_h, _, want_y = _layer_reference(name, true_rec, params, x, h0, reverse=True)
    for way in ("rev_jit", "rev_tokens", "rev_chunks"):
        _close(runs[way], (want_h, want_y), way)
    valid = np.arange(T_L)[None, :] < L_LENGTHS[:, None]
    want_h, states, want_y = _layer_reference(name, true_rec, params, x, h0, valid=valid,
                                              reset=L_RESET, reverse=True)
    _check_masked(runs, "rev_masked", (want_h, want_y), states, valid, h0,
                  last=lambda n: 0)  # Reversed, the last valid step in scan order.


@pytest.mark.parametrize("impl", ("associative", "sequential", "chunked"))
@pytest.mark.parametrize("name", [n for n in LAYERS if n != "rglru"])
def test_true_recurrence_ignores_scan_impl(name, impl):
    params, x, h0 = _layer_setup(name, True)
    runs = _layer_runs(name, True, "auto")
    layer = _layer(name, True, impl)
    got = jax.jit(lambda p, x, h, n, r: layer.apply(p, x, h, seq_lengths=n, reset=r))(
        params, x, h0, jnp.asarray(L_LENGTHS, jnp.int32), jnp.asarray(L_RESET))
    _close(got, runs["masked_jit"], impl)


@pytest.mark.parametrize("name,true_rec,impl", LAYER_GRID)
def test_layer_causality_and_documents(name, true_rec, impl):
    runs = _layer_runs(name, true_rec, impl)
    y = runs["jit"][1]
    for t in (0, 4, 9, 12):
        got = runs[f"changed_{t}"][1]
        np.testing.assert_array_equal(got[:, :t], y[:, :t], err_msg=f"forward, t={t}")
        assert np.all(np.any(got[:, t] != y[:, t], axis=-1))  # the change does reach t
    y = runs["masked_jit"][1]
    got = runs["docs_changed"][1]
    np.testing.assert_array_equal(got[0, 6:], y[0, 6:])
    np.testing.assert_array_equal(got[1, 4:], y[1, 4:])
    if name == "rglru":
        return
    y = runs["rev_jit"][1]
    for t in (0, 4, 9, 12):
        got = runs[f"rev_changed_{t}"][1]
        np.testing.assert_array_equal(got[:, t + 1:], y[:, t + 1:], err_msg=f"reverse, t={t}")
        assert np.all(np.any(got[:, t] != y[:, t], axis=-1))
    y = runs["rev_masked_jit"][1]
    got = runs["rev_docs_changed"][1]
    np.testing.assert_array_equal(got[0, :6], y[0, :6])
    np.testing.assert_array_equal(got[1, :4], y[1, :4])


# ----------------------------------------------------------------------------
# LM and Griffin.

T_M, V = 11, 11
M_LENGTHS = np.array([T_M, 6, 0])
M_RESET = np.zeros((B, T_M), bool)
M_RESET[0, [3, 6]] = True
M_RESET[1, [0, 4, 6, 8]] = True  # 6 = n, 8: padded
M_RESET[2, 2] = True

MODELS = {
    **{f"lm_{tm}": (lambda tm: lambda impl: fm.LM(fm.LMConfig(
        vocab_size=V, time_mixing=tm, n_layer=1, d_model=4, d_h=4, d_channel_mixing=8,
        conv_width=2, positional_encoding="sinusoidal",
        rglru_num_heads=2 if tm == "rglru" else 1, scan_impl=impl,
        **F64)))(tm) for tm in ("mingru", "minlstm", "glrnn", "rglru")},
    "griffin": lambda impl: fm.Griffin(fm.GriffinConfig(
        vocab_size=V, num_hidden_layers=2, hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_key_value_heads=1, attention_window_size=3,
        conv1d_width=2, logits_soft_cap=5.0, block_types=("recurrent", "attention"),
        scan_impl=impl, **F64)),
}
MODEL_GRID = [pytest.param(m, impl, id=f"{m}-{impl}") for m in MODELS for impl in GRID_IMPLS]


@functools.lru_cache(maxsize=None)
def _model_setup(name):
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, V, (B, T_M)), jnp.int32)
    prefix = jnp.asarray(rng.integers(0, V, (B, T_M)), jnp.int32)
    model = MODELS[name]("sequential")
    params = _perturb(model.init(jax.random.PRNGKey(0), tokens), seed=3)
    return params, tokens, prefix


@functools.lru_cache(maxsize=None)
def _model_runs(name, impl):
    params, tokens, prefix = _model_setup(name)
    model = MODELS[name](impl)
    lengths = jnp.asarray(M_LENGTHS, jnp.int32)
    reset = jnp.asarray(M_RESET)
    zero = model.initialize_carry(B)
    full = jax.jit(model.apply)
    masked = jax.jit(lambda p, t, c, n, r: model.apply(p, t, c, seq_lengths=n, reset=r))
    stream = _streamed(model.apply)
    # A given initial carry: the state after a prefix, from the same executable.
    carry0, _ = full(params, prefix, zero)
    out = {"carry0": carry0, "jit": full(params, tokens, carry0),
           "eager": model.apply(params, tokens, carry0),
           "masked_jit": masked(params, tokens, carry0, lengths, reset),
           "masked_eager": model.apply(params, tokens, carry0, seq_lengths=lengths,
                                       reset=reset),
           # Padding without resets (the same executable).
           "lengths_only": masked(params, tokens, carry0, lengths, jnp.zeros_like(reset)),
           # From a fresh carry, with the resets, every step valid.
           "fresh_reset": masked(params, tokens, zero, *_plain(T_M)[:1], reset)}
    out.update(stream(params, tokens, carry0, *_plain(T_M)))
    out.update({"masked_" + k: v for k, v in stream(params, tokens, carry0, lengths,
                                                      reset).items()})
    for t in (0, 4, 9, 10):
        out[f"changed_{t}"] = full(params, tokens.at[:, t].set((tokens[:, t] + 1) % V), carry0)
    docs = tokens.at[0, :6].set((tokens[0, :6] + 1) % V).at[1, :4].set((tokens[1, :4] + 2) % V)
    bumped = jax.tree.map(lambda v: v + 1.0 if jnp.issubdtype(v.dtype, jnp.floating) else v,
                          carry0)
    out["docs_changed"] = masked(params, docs, bumped, lengths, reset)
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("name,impl", MODEL_GRID)
def test_model_whole_token_by_token_and_chunks_agree(name, impl):
    runs = _model_runs(name, impl)
    want = _model_runs(name, "auto")["jit"]
    for way in ("jit", "eager", "tokens", "chunks"):
        _close(runs[way], want, way)


@pytest.mark.parametrize("name,impl", MODEL_GRID)
def test_model_lengths_and_resets(name, impl):
    runs = _model_runs(name, impl)
    want_carry, want = _model_runs(name, "auto")["masked_jit"]
    valid = np.arange(T_M)[None, :] < M_LENGTHS[:, None]
    # Logits at padded steps are meaningless (the docstring): valid ones only.
    for way in ("masked_jit", "masked_eager", "masked_tokens", "masked_chunks"):
        carry, logits = runs[way]
        _close(logits[valid], want[valid], way)
        _close(carry, want_carry, way)
    # Padding alone: the valid logits are those of the unpadded call, and the
    # carry is the one after each row's last valid step (token by token).
    carry, logits = runs["lengths_only"]
    _close(logits[valid], runs["jit"][1][valid], "lengths_only")
    for i, n in enumerate(M_LENGTHS):
        row = _row_tree(carry, i)
        if n == 0:
            _close(row, _row_tree(runs["carry0"], i), f"row {i}")
        else:
            steps = _row_tree(runs["tokens_carries"], (slice(None), i))
            _close(row, jax.tree.map(lambda v: v[n - 1], steps), f"row {i}")


@pytest.mark.parametrize("name,impl", MODEL_GRID)
def test_model_causality_and_documents(name, impl):
    runs = _model_runs(name, impl)
    y = runs["jit"][1]
    for t in (0, 4, 9, 10):
        got = runs[f"changed_{t}"][1]
        np.testing.assert_array_equal(got[:, :t], y[:, :t], err_msg=f"t={t}")
        assert np.all(np.any(got[:, t] != y[:, t], axis=-1))
    y = runs["masked_jit"][1]
    got = runs["docs_changed"][1]
    np.testing.assert_array_equal(got[0, 6:], y[0, 6:])
    np.testing.assert_array_equal(got[1, 4:6], y[1, 4:6])


@pytest.mark.parametrize("name", [n for n in LAYERS] + list(MODELS))
def test_sequential_is_auto(name):
    """scan_impl="sequential": the padded, reset call (jit) and the plain one
    (eager; layers: reversed) equal "auto"'s (on CPU at T < 64 the same
    program, whose other ways the grid checks)."""
    if jax.default_backend() == "cpu":
        assert fm.default_impl(min(T_L, T_M)) == fm.ScanImpl.SEQUENTIAL
    if name in LAYERS:
        params, x, carry0 = _layer_setup(name, False)
        runs = _layer_runs(name, False, "auto")
        layer, seq_len = _layer(name, False, "sequential"), T_L
        if name != "rglru":
            rev = _layer(name, False, "sequential", reverse=True)
            _close(rev.apply(params, x, carry0), runs["rev_jit"], "rev_eager")
        else:
            _close(layer.apply(params, x, carry0), runs["jit"], "eager")
    else:
        params, x, _ = _model_setup(name)
        runs = _model_runs(name, "auto")
        layer, seq_len = MODELS[name]("sequential"), T_M
        carry0 = jax.tree.map(jnp.asarray, runs["carry0"])
        _close(layer.apply(params, x, carry0), runs["jit"], "eager")
    lengths, reset = (L_LENGTHS, L_RESET) if seq_len == T_L else (M_LENGTHS, M_RESET)
    got = jax.jit(lambda p, x, c, n, r: layer.apply(p, x, c, seq_lengths=n, reset=r))(
        params, x, carry0, jnp.asarray(lengths, jnp.int32), jnp.asarray(reset))
    _close(got, runs["masked_jit"], "masked_jit")


@pytest.mark.parametrize("impl", GRID_IMPLS)
def test_griffin_equals_the_float64_reference(impl):
    params, tokens, _ = _model_setup("griffin")
    runs = _model_runs("griffin", impl)
    cfg = MODELS["griffin"](impl).config
    _close(runs["fresh_reset"][1], griffin_ref(params["params"], tokens, cfg, M_RESET),
           "griffin_ref")
