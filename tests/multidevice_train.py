"""Sharded layers, LM and training step on 8 host devices.

Run by tests/test_parallel.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (not collected by the
normal suite).  The references are the same computations on one device.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flax_minrnn.training import config as config_lib
from flax_minrnn.nn import recurrent as layers
from flax_minrnn.models import lm as lm
from flax_minrnn.training import mesh as parallel
from flax_minrnn.training import train as train

from conftest import TOL

B, T = 8, 16


def setup_module():
    assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"


def _data(seed=0):
    rng = np.random.default_rng(seed)
    reset = np.zeros((B, T), bool)
    reset[:, 0] = True
    reset[1, 4] = reset[2, 3] = reset[3, 12] = reset[4, 8] = True  # at and near boundaries
    lengths = np.array([T, 13, 4, 0, T, 8, 1, 15], np.int32)
    return rng, jnp.asarray(reset), jnp.asarray(lengths)


@pytest.mark.parametrize("cls, reverse", [(layers.MinGRU, False), (layers.MinLSTM, True),
                                          (layers.GatedLinearRNN, True)])
def test_layer_switch_on_equals_off(cls, reverse):
    """Outputs, carry and parameter gradients: sequence_axis on == off."""
    rng, reset, lengths = _data()
    x = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
    carry = jnp.asarray(rng.normal(size=(B, 6)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
    off = cls(d_h=6, d_model=8, reverse=reverse)
    on = off.clone(sequence_axis="seq")
    mesh = parallel.make_mesh((2, 4), ("data", "seq"))

    def run(module, params):
        def loss(p):
            h, y = module.apply(p, x, carry, seq_lengths=lengths, reset=reset)
            return jnp.sum(g * y) + jnp.sum(h * h), (h, y)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    params = off.init(jax.random.key(0), x)
    with jax.set_mesh(mesh):
        params_on = jax.jit(on.init)(jax.random.key(0), x)
        (_, out_on), grads_on = run(on, params)
    (_, out_off), grads_off = run(off, params)
    # Same parameter tree (names, shapes, values) with the switch on.
    assert jax.tree.structure(params_on) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params_on, params)
    for got, want in zip(out_on + tuple(jax.tree.leaves(grads_on)),
                         out_off + tuple(jax.tree.leaves(grads_off))):
        np.testing.assert_allclose(got, want, **TOL["float32"])


def test_lm_switch_on_equals_off():
    rng, reset, lengths = _data(1)
    cfg = lm.LMConfig(vocab_size=11, d_model=8, n_layer=2, conv_width=3,
                      positional_encoding="sinusoidal", time_mixing="minlstm")
    tokens = jnp.asarray(rng.integers(0, 11, (B, T)), jnp.int32)
    off = lm.LM(cfg)
    on = lm.LM(dataclasses.replace(cfg, sequence_axis="seq"))
    variables = jax.jit(off.init)(jax.random.key(0), tokens)
    apply = lambda model, v: model.apply(v, tokens, seq_lengths=lengths, reset=reset)
    with jax.set_mesh(parallel.make_mesh((8,), ("seq",))):
        carry_on, logits_on = jax.jit(lambda v: apply(on, v))(variables)
    carry_off, logits_off = jax.jit(lambda v: apply(off, v))(variables)
    for got, want in zip(jax.tree.leaves((carry_on, logits_on)),
                         jax.tree.leaves((carry_off, logits_off))):
        np.testing.assert_allclose(got, want, **TOL["float32"])


# ----------------------------------------------------------------------------
# The training step.

MESHES = {
    "data_parallel": dict(shape=(8,), axis_names=("data",)),
    "fsdp": dict(shape=(8,), axis_names=("data",), fsdp=True),
    "fsdp_and_sequence": dict(shape=(2, 4), axis_names=("data", "seq"), fsdp=True,
                              sequence_axis="seq"),
}


def _config(**mesh):
    config = config_lib.shrink(config_lib.default_config())
    config = config_lib.apply_overrides(config, [
        f"data.batch_size={B}", f"data.seq_len={T}", "model.conv_width=2",
        "model.dropout=0.1", "model.time_mixing=glrnn", "train.num_steps=100"])
    values = config.to_dict()
    values["mesh"].update(mesh)
    return config_lib.validate(values)


@functools.lru_cache(maxsize=None)
def _single_device_step():
    """Inputs and result of one AdamW step on one device (the reference)."""
    config = _config()
    dataset = train.build_dataset(config)
    model = lm.LM(train.lm_config(config, dataset.vocab_size))
    params = train.initial_params(config, model, np.zeros((1, T), np.int32))
    tx = train.make_optimizer(config, params)
    inputs = (params, tx.init(params), dataset.train_batch(3), np.int32(5))
    step = train.make_train_step(model, tx, jax.random.key(42))
    return model, tx, inputs, jax.device_get(step(*inputs))


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device_step(name):
    """New params, AdamW moments (the first is linear in the gradient) and
    metrics of one sharded step equal the single-device step's; dropout on."""
    model, tx, (params, opt_state, batch, step), want = _single_device_step()
    plan = parallel.plan_from_config(_config(**MESHES[name]).mesh)
    state = plan.put_state({"p": params, "o": opt_state})
    got = train.make_train_step(model, tx, jax.random.key(42), plan)(
        state["p"], state["o"], plan.put_batch(batch), step)
    assert train._lr(train.learning_rate_schedule(_config()), 5) > 0
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(got[2][key], want[2][key], **TOL["float32"], err_msg=key)
    assert bool(got[2]["finite"])
    assert jax.tree.structure(got[:2]) == jax.tree.structure(want[:2])
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got[:2])[0],
                            jax.tree.leaves(want[:2])):
        np.testing.assert_allclose(x, y, **TOL["float32"], err_msg=jax.tree_util.keystr(path))
        # Where the state lives: the plan's rule, kept by the step.
        assert x.sharding.spec == plan.state_spec(x.shape), jax.tree_util.keystr(path)
    embedding = got[0]["embedder"]["embedding"]  # (65, 16): split along 16
    if plan.fsdp:
        n_data = plan.mesh.shape["data"]
        assert embedding.sharding.spec == P(None, "data")
        assert embedding.addressable_shards[0].data.shape == (65, 16 // n_data)
    else:
        assert embedding.sharding.is_fully_replicated


@pytest.mark.parametrize("mesh, overrides, numbers", [
    (dict(shape=(4, 4), axis_names=("data", "seq")), [], ["16 devices", "only 8"]),
    (dict(shape=(4,), axis_names=("data",)), ["data.batch_size=6"], ["batch_size=6", "4 devices"]),
    (dict(shape=(2, 4), axis_names=("data", "seq"), sequence_axis="seq"),
     ["data.seq_len=10"], ["length 10", "4 devices of mesh axis 'seq'"]),
])
def test_bad_mesh_configs_name_the_numbers(tmp_path, mesh, overrides, numbers):
    config = config_lib.apply_overrides(_config(**mesh), overrides)
    with pytest.raises(config_lib.ConfigError) as info:
        train.train_and_evaluate(config, str(tmp_path))
    for text in numbers:
        assert text in str(info.value), (text, str(info.value))
