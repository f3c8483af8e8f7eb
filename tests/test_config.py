"""Tests for flax_minrnn.training.config: schema, validation, overrides, JSON."""

import json
import os
import re
import textwrap

import pytest

from flax_minrnn.training.config import (SHRINK, ConfigError, apply_overrides,
                                config_from_json, config_to_json,
                                default_config, load_config,
                                load_saved_config, save_config, shrink,
                                validate)


def write_config(tmp_path, body: str, name: str = "exp.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


GOOD = """
    from flax_minrnn.training.config import default_config

    def get_config(arg=None):
        '''Command: python -m flax_minrnn.train --config=exp.py. Loss < 2.'''
        config = default_config()
        config.model.d_model = 64
        config.optim.learning_rate = 3e-4
        if arg == "big":
            config.model.n_layer = 6
        return config
"""


def test_default_config_schema():
    config = default_config()
    assert config.data.name == "char" and config.data.path == ""
    assert config.model.time_mixing == "mingru" and config.model.d_h == 0
    assert config.model.use_tied_gates is True
    assert config.optim.no_decay_regex == "(bias|scale|embedding)"
    assert config.train.sample_prompt == "\n"
    assert config.init_from.load_regex == ".*"
    assert dict(config.data.task_kwargs) == {}
    assert isinstance(config.model.expansion_factor, float)
    assert isinstance(config.optim.warmup_steps, int)
    assert validate(default_config()).to_dict() == config.to_dict()


def test_load_config_file_with_arg_and_partial_config(tmp_path):
    path = write_config(tmp_path, GOOD)
    config = load_config(path)
    assert config.model.d_model == 64 and config.model.n_layer == 2
    assert config.optim.learning_rate == 3e-4
    assert load_config(path + ":big").model.n_layer == 6
    with pytest.raises(AttributeError):  # Locked: no new keys.
        config.model.new_key = 1
    # A config stating only what differs gets the defaults filled in.
    partial = write_config(tmp_path, """
        def get_config():
            return {"model": {"d_model": 32, "expansion_factor": 2}}
    """, "partial.py")
    config = load_config(partial)
    assert config.model.d_model == 32 and config.data.seq_len == 128
    assert config.model.expansion_factor == 2.0
    assert isinstance(config.model.expansion_factor, float)


@pytest.mark.parametrize("key, hint", [
    ("config.model.d_modle = 3", "'model.d_model'"),
    ("config.train.learning_rate = 1.0", "'optim.learning_rate'"),
    ("config.modell = {}", "'model'"),
])
def test_unknown_key_names_dotted_key(tmp_path, key, hint):
    path = write_config(tmp_path, f"""
        from flax_minrnn.training.config import default_config

        def get_config():
            config = default_config()
            {key}
            return config
    """)
    dotted = key.split("=")[0].strip()[len("config."):]
    with pytest.raises(ConfigError, match=f"Unknown config key '{dotted}'") \
            as info:
        load_config(path)
    assert hint in str(info.value)


@pytest.mark.parametrize("values, key, expected", [
    ({"model": {"n_layer": "2"}}, "model.n_layer", "int"),
    ({"model": {"d_model": 128.0}}, "model.d_model", "int"),
    ({"model": {"d_model": True}}, "model.d_model", "int"),  # bool != int
    ({"model": {"glu": 1}}, "model.glu", "bool"),
    ({"data": {"path": 3}}, "data.path", "str"),
    ({"seed": None}, "seed", "int"),
    ({"model": 3}, "model", "section"),
])
def test_wrong_type_names_key_and_type(tmp_path, values, key, expected):
    path = write_config(tmp_path, f"""
        def get_config():
            return {values!r}
    """)
    with pytest.raises(ConfigError, match=f"'{key}'") as info:
        load_config(path)
    assert expected in str(info.value)


def test_invalid_choice_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="'data.name'.*'mqar'"):
        validate({"data": {"name": "mqrq"}})
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(str(tmp_path / "nope.py"))
    path = write_config(tmp_path, "x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(path)


def test_overrides_parse_by_schema_type(tmp_path):
    config = load_config(write_config(tmp_path, GOOD), [
        "model.d_model=256",
        "optim.learning_rate=1e-2",
        "optim.grad_clip=2",        # int text for a float key
        "model.glu=true",
        "train.progress_bar=0",
        "train.sample_prompt=ROMEO: hi=there",
        "model.time_mixing=glrnn",
        "data.task_kwargs.num_pairs=8",
        "data.task_kwargs.vocab=[1, 2]",
        "data.task_kwargs.mode=fast",
        "init_from.workdir=/runs/stage1",
    ])
    assert config.model.d_model == 256 and type(config.model.d_model) is int
    assert config.optim.learning_rate == 1e-2
    assert config.optim.grad_clip == 2.0 and type(config.optim.grad_clip) is float
    assert config.model.glu is True and config.train.progress_bar is False
    assert config.train.sample_prompt == "ROMEO: hi=there"
    assert config.model.time_mixing == "glrnn"
    assert config.data.task_kwargs.to_dict() == {
        "num_pairs": 8, "vocab": [1, 2], "mode": "fast"}
    assert config.init_from.workdir == "/runs/stage1"
    with pytest.raises(AttributeError):  # Still locked.
        config.train.new_key = 1
    # Free-form values: bools read as the schema's do, and a new value
    # replaces an old one of another type.
    again = apply_overrides(config, ["data.task_kwargs.running=False",
                                     "data.task_kwargs.fast=yes",
                                     "data.task_kwargs.num_pairs=8.5",
                                     "data.task_kwargs.mode=none"])
    assert again.data.task_kwargs.to_dict() == {
        "num_pairs": 8.5, "vocab": [1, 2], "mode": "none", "running": False, "fast": True}
    assert apply_overrides(again, ["data.task_kwargs.running=1"]).data.task_kwargs.running == 1


@pytest.mark.parametrize("overrides, key", [
    (["data.name=parity", "data.seq_len=4096"], "data.seq_len"),
    (["data.name=mqar", "data.path=corpus.txt"], "data.path"),
    (["data.name=s5", "data.val_fraction=0.2"], "data.val_fraction"),
    (["model.architecture=griffin", "model.dropout=0.5"], "model.dropout"),
    (["model.architecture=griffin", "model.n_layer=7"], "model.n_layer"),
    (["model.griffin.hidden_size=64"], "model.griffin.hidden_size"),
])
def test_keys_the_task_or_architecture_does_not_read_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=f"{re.escape(repr(key))} = .* is read only with"):
        apply_overrides(default_config(), overrides)
    # The same value is fine where it is read, and the shared keys stay free.
    reader = {"data": "data.name=char", "model.griffin": "model.architecture=griffin",
              "model": "model.architecture=lm"}[key.rpartition(".")[0]]
    apply_overrides(default_config(), [*overrides, reader])
    apply_overrides(default_config(), ["model.architecture=griffin", "model.dtype=bfloat16",
                                       "model.scan_impl=sequential"])


def test_shrink_leaves_unread_keys_alone():
    for name in ("parity", "mqar"):
        config = shrink(apply_overrides(default_config(), [f"data.name={name}"]))
        assert config.data.seq_len == default_config().data.seq_len
    griffin = shrink(apply_overrides(default_config(), ["model.architecture=griffin"]))
    assert griffin.model.d_model == default_config().model.d_model
    assert griffin.model.griffin.hidden_size == SHRINK["model.griffin.hidden_size"]


@pytest.mark.parametrize("override, expected", [
    ("mesh.shape=(2, 4)", [2, 4]),
    ("mesh.shape=[2,4]", [2, 4]),
    ("mesh.shape=", []),
    ("mesh.axis_names='data', \"seq\"", ["data", "seq"]),
    ("two_stage.stage2=init_from.freeze_regex=(embedder|head),train.sample_prompt=\"Hi\"",
     ["init_from.freeze_regex=(embedder|head)", 'train.sample_prompt="Hi"']),
    ("two_stage.stage2=[init_from.freeze_regex=blocks_[01]]",
     ["init_from.freeze_regex=blocks_[01]"]),
])
def test_sequence_overrides_keep_brackets_and_quotes_inside_items(override, expected):
    key = override.partition("=")[0]
    node = apply_overrides(default_config(), [override])
    for part in key.split("."):
        node = node[part]
    assert list(node) == expected


@pytest.mark.parametrize("override, match", [
    ("model.d_modle=3", "'model.d_modle'.*'model.d_model'"),
    ("nonsense.key=3", "'nonsense.key'"),
    ("model.d_model=3.5", "'model.d_model'.*int"),
    ("model.d_model=", "'model.d_model'"),
    ("model.glu=maybe", "'model.glu'.*bool"),
    ("optim.learning_rate=fast", "'optim.learning_rate'.*float"),
    ("model=3", "'model' is a section"),
    ("model.d_model", "key=value"),
    ("model.norm=batchnorm", "'model.norm'"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(default_config(), [override])


def test_json_round_trip_and_saved_config(tmp_path):
    config = apply_overrides(default_config(), [
        "model.d_model=48", "optim.learning_rate=0.000123456789",
        "data.task_kwargs.n=3", "train.sample_prompt=\n\t\"x\""])
    text = config_to_json(config)
    assert json.loads(text)["model"]["d_model"] == 48
    assert config_from_json(text).to_dict() == config.to_dict()
    with pytest.raises(ConfigError, match="'model.bogus'"):
        config_from_json(json.dumps({"model": {"bogus": 1}}))

    workdir = tmp_path / "run"
    path = save_config(str(workdir), config)
    assert path == os.path.join(str(workdir), "config.json")
    with open(path) as f:
        assert json.load(f) == config.to_dict()  # Valid JSON, same values.
    assert sorted(os.listdir(workdir)) == ["config.json"]  # No tmp left.
    reloaded = load_saved_config(str(workdir))
    assert reloaded.to_dict() == config.to_dict()
    assert type(reloaded.optim.learning_rate) is float
    save_config(str(workdir), shrink(config))  # Overwrites in place.
    assert load_saved_config(str(workdir)).model.d_model == 16
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_saved_config(str(tmp_path / "missing"))


def test_shrink():
    big = apply_overrides(default_config(), ["model.n_layer=8",
                                             "model.d_h=512"])
    small = shrink(big)
    assert small.model.n_layer == 1 and small.model.d_model == 16
    assert small.model.d_h == 0 and small.data.seq_len == 16
    assert small.data.batch_size == 2 and small.train.num_steps == 2
    assert small.train.eval_every == 1 and small.data.eval_batches == 1
    assert small.train.checkpoint_every == 1
    assert small.train.sample_every == 0
    assert small.train.progress_bar is False
    assert big.model.n_layer == 8  # The input is not modified.
    for dotted in SHRINK:  # Every shrink key is in the schema.
        *sections, key = dotted.split(".")
        node = default_config()
        for section in sections:
            node = node[section]
        assert key in node


@pytest.mark.parametrize("override, message", [
    ("train.num_steps=-5", "'train.num_steps' must be >= 1, got -5"),
    ("train.num_steps=0", "'train.num_steps' must be >= 1, got 0"),
    ("train.eval_every=0", "'train.eval_every' must be >= 1"),
    ("train.log_every=-1", "'train.log_every' must be >= 1"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be >= 1"),
    ("train.max_to_keep=0", "'train.max_to_keep' must be >= 1"),
    ("train.sample_length=0", "'train.sample_length' must be >= 1"),
    ("train.sample_every=-1", "'train.sample_every' must be >= 0"),
    ("train.sample_temperature=-0.5", "'train.sample_temperature' must be >= 0"),
    ("train.sample_top_k=-1", "'train.sample_top_k' must be >= 0"),
    ("data.batch_size=0", "'data.batch_size' must be >= 1"),
    ("data.seq_len=-16", "'data.seq_len' must be >= 1"),
    ("data.eval_batches=0", "'data.eval_batches' must be >= 1"),
    ("data.val_fraction=1", r"'data.val_fraction' must be in \(0, 1\)"),
    ("data.val_fraction=0", r"'data.val_fraction' must be in \(0, 1\)"),
    ("optim.learning_rate=-0.001", "'optim.learning_rate' must be > 0"),
    ("optim.learning_rate=nan", "'optim.learning_rate' must be > 0"),
    ("optim.learning_rate=inf", "'optim.learning_rate' must be finite, got inf"),
    ("optim.grad_clip=inf", "'optim.grad_clip' must be finite, got inf"),
    ("optim.warmup_steps=-1", "'optim.warmup_steps' must be >= 0"),
    ("optim.min_lr_ratio=1.5", r"'optim.min_lr_ratio' must be in \[0, 1\]"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be >= 0"),
    ("optim.b1=1", r"'optim.b1' must be in \[0, 1\)"),
    ("optim.b2=-0.5", r"'optim.b2' must be in \[0, 1\)"),
    ("optim.grad_clip=0", "'optim.grad_clip' must be > 0"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(default_config(), [override])
    key, value = override.split("=")
    section, leaf = key.split(".")
    with pytest.raises(ConfigError, match=message):  # From a config file too.
        validate({section: {leaf: type(default_config()[section][leaf])(
            float(value))}})


def test_boundary_values_are_accepted():
    config = apply_overrides(default_config(), [
        "train.num_steps=1", "train.sample_every=0", "train.sample_top_k=0",
        "train.sample_temperature=0", "optim.warmup_steps=0",
        "optim.min_lr_ratio=1", "optim.min_lr_ratio=0", "optim.b1=0",
        "optim.weight_decay=0", "data.val_fraction=0.5"])
    assert config.train.num_steps == 1 and config.optim.min_lr_ratio == 0.0


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_config_gets_the_mode_of_other_files(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_config(str(tmp_path / "run"), default_config())
        with open(tmp_path / "run" / "other.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = os.stat(path).st_mode & 0o777
    assert mode == 0o666 & ~umask
    assert mode == os.stat(tmp_path / "run" / "other.txt").st_mode & 0o777
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "other.txt"]
