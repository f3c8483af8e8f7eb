"""migrate_params / to_true_recurrence / from_flax_gated_linear_rnn."""

import flax.linen as nn
import flax_gated_linear_rnn as fglr
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_minrnn.nn.recurrent import GatedLinearRNN, MinGRU, MinLSTM
from flax_minrnn.compat.flax_gated_linear_rnn import from_flax_gated_linear_rnn
from flax_minrnn.training.migrate import (migrate_params,
                                 to_associative, to_true_recurrence)
from flax_minrnn.nn.wrappers import Stack
from jit_helpers import jit_apply as _apply, jit_init as _init

B, T, D = 2, 7, 4

LAYERS = {
    "mingru": lambda **kw: MinGRU(d_h=5, **kw),
    "minlstm": lambda **kw: MinLSTM(d_h=5, d_model=3, **kw),
    "glrnn_tied": lambda **kw: GatedLinearRNN(d_h=5, d_model=3, **kw),
    "glrnn_untied": lambda **kw: GatedLinearRNN(d_h=5, use_tied_gates=False, **kw),
}


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _h0(layer, x):
    h = layer.initialize_carry(x.shape)
    return jax.random.uniform(jax.random.PRNGKey(9), h.shape, jnp.float32, -1.0, 1.0)


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("name", list(LAYERS))
def test_two_stage_switch_train_and_back(name):
    x = _x()
    layer = LAYERS[name]()
    params = _init(layer, jax.random.PRNGKey(1), x)["params"]
    true_layer = layer.clone(use_true_recurrence=True)
    true_params = to_true_recurrence(params, layer, x)
    rk = true_params["recurrent_kernel"]
    assert rk.shape == (5, layer.num_blocks() * 5) and not np.any(np.asarray(rk))

    # Same function right after switching, with and without an initial state.
    h0 = _h0(layer, x)
    for carry in (None, h0):
        c_a, y_a = _apply(layer, {"params": params}, x, carry)
        c_t, y_t = _apply(true_layer, {"params": true_params}, x, carry)
        np.testing.assert_allclose(y_t, y_a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(c_t, c_a, rtol=0, atol=1e-6)

    # One Adam step in true-recurrence mode moves the recurrent kernel.
    target = jax.random.normal(jax.random.PRNGKey(5), y_a.shape, jnp.float32)

    def loss_fn(p):
        _, y = _apply(true_layer, {"params": p}, x, h0)
        return jnp.mean((y - target) ** 2)

    @jax.jit
    def adam_step(p):
        opt = optax.adam(1e-2)
        loss0, grads = jax.value_and_grad(loss_fn)(p)
        # optax's bias correction mixes int and float (third-party code, not
        # under test): standard promotion for the optimiser only.
        with jax.numpy_dtype_promotion("standard"):
            updates, _ = opt.update(grads, opt.init(p), p)
            new = optax.apply_updates(p, updates)
        return loss0, loss_fn(new), new

    loss0, loss1, trained = adam_step(true_params)
    assert np.any(np.asarray(trained["recurrent_kernel"]) != 0)
    assert float(loss1) < float(loss0)

    # Back to associative: refused while the recurrent kernel is non-zero ...
    with pytest.raises(ValueError, match="recurrent_kernel.*allow_drop_nonzero"):
        to_associative(trained, layer, x)
    with pytest.raises(ValueError, match="recurrent_kernel"):
        migrate_params(trained, layer, x)
    dropped = to_associative(trained, layer, x, allow_drop_nonzero=True)
    assert "recurrent_kernel" not in dropped
    # ... and lossless while it is zero: assoc -> true -> assoc is the identity.
    _assert_tree_equal(to_associative(true_params, layer, x), params)


def test_wrapped_params_keep_their_form():
    x = _x()
    layer = LAYERS["mingru"]()
    variables = _init(layer, jax.random.PRNGKey(1), x)
    out = to_true_recurrence(variables, layer, x)
    assert set(out) == {"params"} and "recurrent_kernel" in out["params"]
    inner = to_true_recurrence(variables["params"], layer, x)
    _assert_tree_equal(out["params"], inner)
    with pytest.raises(ValueError, match="batch_stats"):
        migrate_params(dict(variables, batch_stats={}), layer, x)


class _Model(nn.Module):
    """A whole model: embedding-free encoder -> stack -> head (any nesting)."""

    true_rec: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="embed")(x)
        _, h = Stack([MinGRU(d_h=6, use_true_recurrence=self.true_rec),
                      GatedLinearRNN(d_h=5, d_model=6, use_tied_gates=False,
                                     use_true_recurrence=self.true_rec)],
                     residual=True, norm="rmsnorm", name="stack")(x)
        return nn.Dense(2, name="head")(h)


def test_whole_model_and_stack_migration():
    x = _x()
    model = _Model()
    params = _init(model, jax.random.PRNGKey(2), x)["params"]
    true_model = _Model(true_rec=True)
    migrated = migrate_params(params, true_model, x)
    flat = jax.tree_util.tree_flatten_with_path(migrated)[0]
    rk_paths = [p for p, _ in flat if any(getattr(k, "key", None) == "recurrent_kernel" for k in p)]
    assert len(rk_paths) == 2
    np.testing.assert_allclose(_apply(true_model, {"params": migrated}, x),
                               _apply(model, {"params": params}, x), rtol=0, atol=1e-6)
    _assert_tree_equal(migrate_params(migrated, model, x), params)
    # to_true_recurrence needs the field: a model without it is told what to do.
    with pytest.raises(TypeError, match="migrate_params"):
        to_true_recurrence(params, model, x)


def test_stack_migration_structure():
    x = _x()
    stack = Stack([MinGRU(d_h=4), MinLSTM(d_h=3, d_model=4)])
    true_stack = Stack([MinGRU(d_h=4, use_true_recurrence=True),
                        MinLSTM(d_h=3, d_model=4, use_true_recurrence=True)])
    params = jax.eval_shape(stack.init, jax.random.PRNGKey(0), x)["params"]
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)
    migrated = migrate_params(params, true_stack, x)
    assert migrated["rnn_0"]["recurrent_kernel"].shape == (4, 8)
    assert migrated["rnn_1"]["recurrent_kernel"].shape == (3, 9)
    assert not np.any(np.asarray(migrated["rnn_1"]["recurrent_kernel"]))
    _assert_tree_equal(migrate_params(migrated, stack, x), params)


def test_migrate_errors_name_the_path():
    x = _x()
    layer = LAYERS["glrnn_tied"]()
    params = _init(layer, jax.random.PRNGKey(1), x)["params"]
    bad_shape = dict(params, out_proj=dict(params["out_proj"], bias=jnp.zeros((4,), jnp.float32)))
    with pytest.raises(ValueError, match="out_proj/bias.*shape"):
        migrate_params(bad_shape, layer, x)
    bad_dtype = dict(params, out_proj=dict(params["out_proj"],
                                           bias=params["out_proj"]["bias"].astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="out_proj/bias.*bfloat16"):
        migrate_params(bad_dtype, layer, x)
    missing = {"in_proj": params["in_proj"]}
    with pytest.raises(ValueError, match="out_proj/kernel: missing"):
        migrate_params(missing, layer, x)
    extra = dict(params, extra={"w": jnp.zeros((2,), jnp.float32)})
    with pytest.raises(ValueError, match="extra/w: in params but not in the target"):
        migrate_params(extra, layer, x)
    with pytest.raises(TypeError, match="params must be a dict"):
        migrate_params([1], layer, x)
    with pytest.raises(TypeError, match="target must be"):
        migrate_params(params, "layer", x)


# ----------------------------------------------------------------------------
# The flax-gated-linear-rnn package.

D_MODEL, D_H = 4, 6


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("true_rec", [False, True], ids=["assoc", "true"])
def test_from_flax_gated_linear_rnn(tied, true_rec):
    x = _x(shape=(B, T, D_MODEL))
    theirs = fglr.GatedLinearRNN(d_model=D_MODEL, d_h=D_H, use_tied_gates=tied,
                                 use_true_recurrence=true_rec)
    variables = _init(theirs, jax.random.PRNGKey(3), x)
    if true_rec:
        k = variables["params"]["model"]["recurrent_proj"]["kernel"]
        assert not np.any(np.asarray(k))  # the package initialises it to zero
        k = 0.3 * jax.random.normal(jax.random.PRNGKey(4), k.shape, jnp.float32)
        variables = {"params": dict(variables["params"], model={"recurrent_proj": {"kernel": k}})}
    ours = GatedLinearRNN(d_h=D_H, d_model=D_MODEL, use_tied_gates=tied,
                          use_true_recurrence=true_rec)
    # Wrapped in, wrapped out; inner in, inner out; the same leaves.
    ours_vars = from_flax_gated_linear_rnn(variables)
    assert set(ours_vars) == {"params"}
    _assert_tree_equal(ours_vars["params"], from_flax_gated_linear_rnn(variables["params"]))
    # The structure is exactly that of our layer.
    _assert_tree_equal(jax.tree_util.tree_map(jnp.shape, ours_vars),
                       jax.tree_util.tree_map(jnp.shape, _init(ours, jax.random.PRNGKey(0), x)))
    h0 = jax.random.uniform(jax.random.PRNGKey(8), (B, D_H), jnp.float32, -1.0, 1.0)
    for carry in (None, h0):
        h_ref, y_ref = _apply(theirs, variables, x, carry=carry)
        h, y = _apply(ours, ours_vars, x, carry)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)


def test_from_flax_gated_linear_rnn_errors():
    x = _x(shape=(B, T, D_MODEL))
    p = _init(fglr.GatedLinearRNN(d_model=D_MODEL, d_h=D_H), jax.random.PRNGKey(3), x)["params"]
    with pytest.raises(ValueError, match="'proj', 'out_proj'"):
        from_flax_gated_linear_rnn({"proj": p["proj"]})
    with pytest.raises(ValueError, match="proj/kernel has"):
        from_flax_gated_linear_rnn(dict(p, proj={"kernel": jnp.zeros((4, 10), jnp.float32),
                                                 "bias": jnp.zeros((10,), jnp.float32)}))
    with pytest.raises(ValueError, match="recurrent_proj/kernel must have shape"):
        from_flax_gated_linear_rnn(
            dict(p, model={"recurrent_proj": {"kernel": jnp.zeros((2, 18), jnp.float32)}}))


# ----------------------------------------------------------------------------
# Keyword checks: migration options are not init arguments, and vice versa.


@pytest.mark.parametrize("options,names", [
    (dict(recurrent_init="random", rng=jax.random.PRNGKey(0)), r"\['recurrent_init', 'rng'\]"),
    (dict(recurrent_init_scale=0.5), r"\['recurrent_init_scale'\]"),
    (dict(state_means={}), r"\['state_means'\]"),
    (dict(allow_drop_nonzero=True), r"\['allow_drop_nonzero'\]"),
])
def test_to_true_recurrence_refuses_migration_options(options, names):
    # It promises the same function: a random recurrent_kernel must not slip in.
    x = _x()
    layer = LAYERS["mingru"]()
    params = _init(layer, jax.random.PRNGKey(1), x)["params"]
    with pytest.raises(ValueError, match=r"to_true_recurrence does not take the migration "
                                         r"option\(s\) " + names + ".*migrate_params"):
        to_true_recurrence(params, layer, x, **options)
    # The documented way to a random start still works.
    if "recurrent_init" in options:
        rand = migrate_params(params, layer.clone(use_true_recurrence=True), x, **options)
        assert np.any(np.asarray(rand["recurrent_kernel"]))


@pytest.mark.parametrize("options,names", [
    (dict(rng=jax.random.PRNGKey(0)), r"\['rng'\]"),
    (dict(recurrent_init="random", recurrent_init_scale=0.5),
     r"\['recurrent_init', 'recurrent_init_scale'\]"),
    (dict(state_means={}), r"\['state_means'\]"),
])
def test_to_associative_refuses_migration_options(options, names):
    x = _x()
    layer = LAYERS["mingru"]()
    params = to_true_recurrence(_init(layer, jax.random.PRNGKey(1), x)["params"], layer, x)
    with pytest.raises(ValueError, match=r"to_associative does not take the migration "
                                         r"option\(s\) " + names):
        to_associative(params, layer, x, **options)
    # allow_drop_nonzero is its own (keyword) option.
    assert "recurrent_kernel" not in to_associative(params, layer, x, allow_drop_nonzero=True)


def test_unknown_init_keyword_is_named_with_the_accepted_ones():
    x = _x()
    layer = LAYERS["mingru"]()
    params = _init(layer, jax.random.PRNGKey(1), x)["params"]
    true_layer = layer.clone(use_true_recurrence=True)
    # A misspelled migration option: named up front, not deep inside Flax.
    with pytest.raises(TypeError, match=r"^unknown keyword argument 'recurent_init' \(did you "
                                        r"mean 'recurrent_init'\?\): neither a keyword of "
                                        r"MinGRU.__call__ \[.*'seq_lengths'.*\] nor a "
                                        r"migration option \[.*'recurrent_init'.*\]"):
        migrate_params(params, true_layer, x, recurent_init="random")
    # A misspelled init keyword, also through to_true_recurrence / to_associative.
    with pytest.raises(TypeError, match=r"unknown keyword argument 'seq_length' \(did you "
                                        r"mean 'seq_lengths'\?\)"):
        to_true_recurrence(params, layer, x, seq_length=jnp.full((B,), T))
    with pytest.raises(TypeError, match=r"unknown keyword argument 'masks'.*'mask'"):
        to_associative(params, layer, x, masks=jnp.ones((B, T), bool))
    # Real keywords of __call__ pass through.
    lengths = jnp.asarray([T, 3], jnp.int32)
    out = to_true_recurrence(params, layer, x, seq_lengths=lengths)
    assert out["recurrent_kernel"].shape == (5, 10)
    _assert_tree_equal(migrate_params(out, layer, x, carry=None, seq_lengths=lengths), params)


class _KwargsModel(nn.Module):
    """A module whose __call__ takes **kwargs: any keyword name is its own."""

    @nn.compact
    def __call__(self, x, **kwargs):
        return nn.Dense(3)(x) * (1 + len(kwargs))


def test_kwargs_signature_accepts_any_keyword():
    x = _x()
    model = _KwargsModel()
    params = _init(model, jax.random.PRNGKey(1), x)["params"]
    _assert_tree_equal(migrate_params(params, model, x, anything=jnp.zeros(())), params)
