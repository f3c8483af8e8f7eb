"""Two-stage training recipes (flax_minrnn.training.two_stage, issue 19)."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import unfreeze

from flax_minrnn.models.heads import weighted_cross_entropy
from flax_minrnn.models.lm import LM, LMConfig
from flax_minrnn.nn.recurrent import MinGRU
from flax_minrnn.training import config as config_lib
from flax_minrnn.training import train
from flax_minrnn.training import two_stage as ts
from flax_minrnn.training.config import ConfigError
from flax_minrnn.training.migrate import migrate_params

from test_train import assert_params_equal, final_params, read_metrics

VOCAB = 7


def _models(time_mixing="mingru", **kw):
    cfg = LMConfig(vocab_size=VOCAB, time_mixing=time_mixing, n_layer=2, d_model=8,
                   conv_width=3, **kw)
    return LM(cfg), LM(dataclasses.replace(cfg, use_true_recurrence=True))


def _tokens(shape=(3, 11), seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(model.apply)  # One compiled forward per model, reused.


def _logits(model, params, tokens):
    return _jitted_apply(model)({"params": params}, tokens)[1]


@pytest.mark.parametrize("time_mixing", ["mingru", "glrnn"])
def test_zero_and_blended_starts_are_the_stage1_function(time_mixing):
    m1, m2 = _models(time_mixing)
    tok = _tokens()
    p1 = unfreeze(jax.jit(m1.init)(jax.random.key(0), tok)["params"])
    zero = migrate_params(p1, m2, tok)
    # Recipe 1: U = 0 is the stage-1 function (sequential vs parallel scan:
    # float rounding only, as in test_migrate).
    np.testing.assert_allclose(_logits(m2, zero, tok), _logits(m1, p1, tok),
                               rtol=0, atol=1e-6)
    # Recipe 4: alpha = 0 is exactly the U = 0 function, whatever U is.
    rand = migrate_params(p1, m2, tok, recurrent_init="random",
                          recurrent_init_scale=1.0, rng=jax.random.key(5))
    assert all(np.any(np.asarray(v["temporal_mixing"]["recurrent_kernel"]))
               for k, v in rand.items() if k.startswith("blocks_"))
    blend0 = ts.blend_params(rand, ts.blend_alpha(0, 10))
    np.testing.assert_array_equal(_logits(m2, blend0, tok), _logits(m2, zero, tok))
    assert not np.array_equal(_logits(m2, rand, tok), _logits(m2, zero, tok))
    # alpha ramps linearly to 1 and stays there; 1 leaves U as it is.
    np.testing.assert_array_equal(
        [float(ts.blend_alpha(s, 4)) for s in (0, 1, 2, 4, 9)], [0, .25, .5, 1, 1])
    half = ts.blend_params(rand, ts.blend_alpha(2, 4))
    k = ("blocks_0", "temporal_mixing", "recurrent_kernel")
    np.testing.assert_array_equal(half[k[0]][k[1]][k[2]], 0.5 * rand[k[0]][k[1]][k[2]])
    np.testing.assert_array_equal(
        _logits(m2, ts.blend_params(rand, ts.blend_alpha(7, 4)), tok),
        _logits(m2, rand, tok))


def _mingru_states_numpy(params, x):
    """h_t of a MinGRU layer (identity candidate), float64 loop."""
    w = np.asarray(params["in_proj"]["kernel"], np.float64)
    b = np.asarray(params["in_proj"]["bias"], np.float64)
    pre = np.asarray(x, np.float64) @ w + b
    d = w.shape[1] // 2
    z, cand = 1 / (1 + np.exp(-pre[..., :d])), pre[..., d:]
    h, out = np.zeros((x.shape[0], d)), []
    for t in range(x.shape[1]):
        h = (1 - z[:, t]) * h + z[:, t] * cand[:, t]
        out.append(h)
    return np.stack(out, 1)


def test_random_init_bias_compensation_and_measured_gap():
    # The mean state against a float64 loop (one bare layer).
    layer = MinGRU(d_h=6)
    x = jax.random.normal(jax.random.key(2), (4, 9, 5)) + 1.0
    lp = unfreeze(jax.jit(layer.init)(jax.random.key(3), x)["params"])
    lp["in_proj"]["bias"] = jax.random.normal(jax.random.key(4), (12,))
    means = ts.mean_states(layer, lp, x)
    h = _mingru_states_numpy(lp, x)
    prev = np.concatenate([np.zeros_like(h[:, :1]), h[:, :-1]], 1)
    np.testing.assert_allclose(means[()], prev.mean((0, 1)), rtol=1e-5, atol=1e-6)
    layer2 = layer.clone(use_true_recurrence=True)
    comp = migrate_params(lp, layer2, x, recurrent_init="random", recurrent_init_scale=0.5,
                          rng=jax.random.key(0), state_means=means)
    u = np.asarray(comp["recurrent_kernel"], np.float64)
    assert u.shape == (6, 12)
    np.testing.assert_allclose(u.std(), 0.5 / np.sqrt(6), rtol=0.3)
    np.testing.assert_allclose(comp["in_proj"]["bias"],
                               np.asarray(lp["in_proj"]["bias"]) - prev.mean((0, 1)) @ u,
                               rtol=1e-5, atol=1e-6)
    # First order: with the compensation the mean pre-activation shift
    # (h_{t-1} - E h) U of the stage-1 states vanishes; without it, it does not.
    shift = prev @ u + (np.asarray(comp["in_proj"]["bias"]) - np.asarray(lp["in_proj"]["bias"]))
    assert np.abs(shift.mean((0, 1))).max() < 1e-5
    assert np.abs((prev @ u).mean((0, 1))).max() > 1e-2

    # Whole model: measure max |logit difference| at init on a batch.
    m1, m2 = _models()
    tok = _tokens((8, 16))
    p1 = unfreeze(jax.jit(m1.init)(jax.random.key(0), tok)["params"])
    means = ts.mean_states(m1, p1, tok)
    assert set(means) == {("blocks_0", "temporal_mixing"), ("blocks_1", "temporal_mixing")}

    def gap(scale, compensate):
        p2 = migrate_params(p1, m2, tok, recurrent_init="random", recurrent_init_scale=scale,
                            rng=jax.random.key(7), state_means=means if compensate else None)
        return ts.init_logit_gap(m1, p1, m2, p2, tok)

    gaps = {s: gap(s, True) for s in (0.0, 0.05, 0.2, 0.8)}
    print("max |logit difference| at init, compensated:", gaps,
          "uncompensated at 0.2:", gap(0.2, False))
    assert gaps[0.0] < 1e-5           # U = 0: the stage-1 function.
    assert 0 < gaps[0.05] < gaps[0.2] < gaps[0.8]
    # Roughly linear in the scale (first order): a 4x smaller U, a >2x smaller gap.
    assert gaps[0.05] < gaps[0.2] / 2 and gaps[0.2] < gaps[0.8] / 2


def _sgd_config(m, wd=0.1):
    return config_lib.apply_overrides(config_lib.default_config(), [
        "optim.warmup_steps=0", "optim.learning_rate=0.01", f"optim.weight_decay={wd}",
        "optim.grad_clip=1e9", f"optim.recurrent_lr_multiplier={m}"])


def test_recurrent_lr_multiplier_scales_only_the_recurrent_update():
    params = {"layer": {"recurrent_kernel": jnp.ones((3, 6)), "kernel": jnp.ones((4, 6)),
                        "bias": jnp.zeros((6,))}}
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)

    def delta(m):
        tx = train.make_optimizer(_sgd_config(m), params)
        with jax.numpy_dtype_promotion("standard"):  # As the trainer (optax's counts).
            updates, _ = tx.update(grads, tx.init(params), params)
        return jax.tree.map(np.asarray, updates)

    one, three = delta(1.0), delta(3.0)
    u1, u3 = one["layer"]["recurrent_kernel"], three["layer"]["recurrent_kernel"]
    assert np.abs(u1).min() > 0
    np.testing.assert_allclose(u3 / u1, 3.0, rtol=1e-6)  # Adam's effective lr x3.
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(three["layer"][name], one["layer"][name])
    # m = 1 adds nothing: the optimizer state has the plain structure.
    plain = train.make_optimizer(_sgd_config(1.0), params).init(params)
    assert "multi_transform" not in repr(type(plain))
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="'optim.recurrent_lr_multiplier'.*> 0"):
            _sgd_config(bad)
    with pytest.raises(ConfigError, match="optim.recurrent_lr_multiplier.*no recurrent_kernel"):
        train.make_optimizer(_sgd_config(2.0), {"kernel": jnp.ones((2, 2))})


def _loss(logits, tok):
    targets = jnp.roll(tok, -1, axis=1)
    return weighted_cross_entropy(logits, targets, jnp.ones(tok.shape, jnp.float32))[0]


def _reference_truncated_logits(model, params, tok, L):
    """Python loop over chunks, stop_gradient on the whole carry between them."""
    carry, out = None, []
    for start in range(0, tok.shape[1], L):
        carry, logits = model.apply({"params": params}, tok[:, start:start + L], carry)
        carry = jax.lax.stop_gradient(carry)
        out.append(logits)
    return jnp.concatenate(out, 1)


def test_tbptt_gradient_is_full_or_truncated():
    _, m2 = _models(positional_encoding="learned", max_seq_length=32)
    tok = _tokens((3, 10))
    m1 = LM(dataclasses.replace(m2.config, use_true_recurrence=False))
    p = migrate_params(unfreeze(jax.jit(m1.init)(jax.random.key(0), tok)["params"]), m2, tok,
                       recurrent_init="random", recurrent_init_scale=1.0, rng=jax.random.key(1))

    loss_of = lambda L: lambda q: _loss(ts.truncated_apply(m2, q, tok, L), tok)
    untruncated = lambda q: _loss(m2.apply({"params": q}, tok)[1], tok)
    full_value, full = jax.jit(jax.value_and_grad(untruncated))(p)
    # L = 0 or L >= T: full BPTT. The very same program as the untruncated
    # loss, hence the same value and gradient.
    program = str(jax.make_jaxpr(untruncated)(p))
    for L in (0, 10):
        assert str(jax.make_jaxpr(loss_of(L))(p)) == program
    for L in (3,):  # Three chunks of 3 and a tail of 1.
        value, g = jax.jit(jax.value_and_grad(loss_of(L)))(p)
        assert value == full_value  # Forward values are exactly untruncated.
        ref = jax.jit(jax.grad(
            lambda q: _loss(_reference_truncated_logits(m2, q, tok, L), tok)))(p)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     g, ref)
        u, uf = (g["blocks_0"]["temporal_mixing"]["recurrent_kernel"],
                 full["blocks_0"]["temporal_mixing"]["recurrent_kernel"])
        assert np.abs(np.asarray(u) - np.asarray(uf)).max() > 1e-4


# ----------------------------------------------------------------------------
# The trainer: both stages in one run, resumed after kills.
# ----------------------------------------------------------------------------

STAGE1 = ["data.name=parity", "data.task_kwargs.max_len=5", "data.batch_size=4",
          "data.eval_batches=1", "model.n_layer=1", "model.d_model=8", "model.conv_width=2",
          "optim.warmup_steps=1", "train.num_steps=3", "train.eval_every=2",
          "train.log_every=1", "train.checkpoint_every=1", "train.progress_bar=false"]
# Every recipe at once, stage 2 as long as stage 1.
STAGE2 = ("two_stage.stage2=optim.learning_rate=3e-3,optim.recurrent_lr_multiplier=4,"
          "init_from.recurrent_init=random,init_from.recurrent_init_scale=0.5,"
          "init_from.compensate_bias=false,"
          "train.recurrence_blend_steps=2,train.tbptt_length=2")


def _two_stage_config(*extra):
    return config_lib.apply_overrides(config_lib.default_config(),
                                      [*STAGE1, STAGE2, *extra])


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("two_stage"))
    metrics = train.train_and_evaluate(_two_stage_config(), workdir)
    return workdir, metrics


def test_two_stage_run_uses_every_recipe(two_stage_run):
    workdir, metrics = two_stage_run
    assert metrics["stage"] == 2 and metrics["step"] == 3 and metrics["finished"]
    assert metrics["stage1"]["step"] == 3
    s1, s2 = (os.path.join(workdir, d) for d in (ts.STAGE1_DIR, ts.STAGE2_DIR))
    c2 = config_lib.load_saved_config(s2)
    assert c2.model.use_true_recurrence and c2.init_from.workdir == os.path.abspath(s1)
    assert (c2.optim.recurrent_lr_multiplier, c2.train.tbptt_length,
            c2.train.recurrence_blend_steps, c2.init_from.recurrent_init) == (4, 2, 2, "random")
    assert not config_lib.load_saved_config(s1).model.use_true_recurrence
    # Stage 2's first eval is at alpha = 0: exactly the U = 0 function, which is
    # the stage-1 function up to scan rounding.
    first = [r for r in read_metrics(s2) if r["split"] == "eval"][0]
    last1 = [r for r in read_metrics(s1) if r["split"] == "eval"][-1]
    assert first["step"] == 0
    np.testing.assert_allclose(first["loss"], last1["loss"], rtol=1e-5)
    p2 = final_params(s2)
    assert any("recurrent_kernel" in k and np.any(v) for k, v in p2.items())


def test_two_stage_killed_in_each_stage_resumes_bit_exactly(two_stage_run, tmp_path,
                                                            capsys):
    workdir = str(tmp_path)
    config = _two_stage_config()
    m = train.train_and_evaluate(config, workdir, stop_at_step=2)   # In stage 1.
    assert (m["stage"], m["step"]) == (1, 2)
    assert not os.path.exists(os.path.join(workdir, ts.STAGE2_DIR))
    m = train.train_and_evaluate(config, workdir, stop_at_step=4)   # Stage 2, step 1.
    assert (m["stage"], m["step"]) == (2, 1)
    assert "max |logit difference|" in capsys.readouterr().out
    # load_run gives the function at the saved step: U * alpha(1) = U / 2.
    s2 = os.path.join(workdir, ts.STAGE2_DIR)
    _, loaded, _, _ = train.load_run(s2)
    loaded = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    raw = final_params(s2)
    for k, v in raw.items():
        want = v * np.float32(0.5) if "recurrent_kernel" in k else v
        np.testing.assert_array_equal(loaded[k], want, err_msg=k)
    m = train.train_and_evaluate(config, workdir)
    assert (m["stage"], m["step"]) == (2, 3)
    for d in (ts.STAGE1_DIR, ts.STAGE2_DIR):
        assert_params_equal(final_params(os.path.join(workdir, d)),
                            final_params(os.path.join(two_stage_run[0], d)))
    # A changed two-stage config does not resume.
    with pytest.raises(ConfigError, match="different config"):
        train.train_and_evaluate(_two_stage_config("optim.learning_rate=0.5"), workdir)


def test_stop_at_eval_accuracy_ends_stage_one(tmp_path):
    # Step 2 is this run's first eval at accuracy 0.5 (steps 0, 1: 0).
    config = _two_stage_config("train.stop_at_eval_accuracy=0.4", "optim.learning_rate=0.05",
                               "train.eval_every=1", "train.num_steps=6",
                               "two_stage.stage2=train.num_steps=1,"
                               "init_from.recurrent_init=random,"
                               "train.stop_at_eval_accuracy=0")
    m = train.train_and_evaluate(config, str(tmp_path))
    assert m["stage1"]["step"] == 2 and m["stage1"]["eval_accuracy"] >= 0.4
    assert m["stage"] == 2 and m["step"] == 1
    # Rerunning trains neither stage further.
    again = train.train_and_evaluate(config, str(tmp_path))
    assert again["stage1"]["step"] == 2 and again["step"] == 1
    assert max(r["step"] for r in read_metrics(tmp_path / ts.STAGE1_DIR)) == 2


def test_recipe_fields_that_would_do_nothing_are_errors(tmp_path):
    base = config_lib.apply_overrides(config_lib.default_config(), STAGE1)
    for overrides, match in [
            (["train.recurrence_blend_steps=3"], "recurrence_blend_steps"),
            (["optim.recurrent_lr_multiplier=2"], "recurrent_lr_multiplier"),
            (["init_from.recurrent_init=random"], "recurrent_init"),
            (["two_stage.stage2=init_from.recurrent_init=random,"
              "train.recurrence_blend_steps=2"], "compensate_bias"),
            (["train.tbptt_length=2", "model.dropout=0.1"], "tbptt_length"),
            (["two_stage.stage2=train.num_steps=2", "model.use_true_recurrence=true"],
             "associative")]:
        with pytest.raises(ConfigError, match=match):
            train.train_and_evaluate(config_lib.apply_overrides(base, overrides),
                                     str(tmp_path / match))


def test_stage2_mistakes_show_before_stage1_trains_and_can_be_fixed(tmp_path):
    workdir = str(tmp_path / "run")
    # A mistake in the shared config or in stage 2's overrides stops the run
    # before stage 1 trains, and leaves nothing that a fixed rerun would trip on.
    for extra, match in ((["model.n_layer=0"], "^model.n_layer must be"),
                         (["two_stage.stage2=init_from.recurrent_init=random,"
                           "train.recurrence_blend_steps=2"],
                          "^two_stage.stage2: init_from.compensate_bias"),
                         (["two_stage.stage2=model.d_model=16"],
                          "^two_stage.stage2: the parameters of init_from.workdir's run"),
                         # Stage 2's true recurrence cannot split time over devices.
                         (["mesh.shape=1,1", "mesh.axis_names=data,seq",
                           "mesh.sequence_axis=seq"],
                          "^two_stage.stage2: mesh.sequence_axis='seq' does not fit")):
        with pytest.raises(ConfigError, match=match):
            train.train_and_evaluate(_two_stage_config(*extra), workdir)
        assert not os.path.exists(workdir)
    # Until stage 2 has a checkpoint, its overrides may change.
    first = _two_stage_config("two_stage.stage2=train.num_steps=2")
    assert train.train_and_evaluate(first, workdir, stop_at_step=3)["stage"] == 1
    fixed = _two_stage_config("two_stage.stage2=train.num_steps=2,init_from.recurrent_init=random,"
                              "init_from.compensate_bias=false,train.recurrence_blend_steps=2")
    m = train.train_and_evaluate(fixed, workdir)
    assert m["stage"] == 2 and m["step"] == 2 and m["stage1"]["step"] == 3
    with pytest.raises(ConfigError, match="different config.*two_stage.stage2"):
        train.train_and_evaluate(first, workdir)
