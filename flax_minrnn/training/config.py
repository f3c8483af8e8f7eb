"""Experiment configuration: the schema, loading, validation and overrides.

Experiment configs are Python files (``configs/*.py``) following the
``get_config()`` convention of the flax examples and big_vision::

    from flax_minrnn.training.config import default_config

    def get_config(arg=None):
        '''Command: ... Expected result: ...'''
        config = default_config()
        config.model.d_model = 256
        return config

``load_config("configs/x.py:arg", ["model.d_model=512"])`` imports the file,
calls ``get_config("arg")`` (``get_config()`` without a ``:arg`` suffix),
validates the result against :func:`default_config` (unknown keys and wrong
types raise :class:`ConfigError` naming the dotted key), fills in missing keys
from the defaults, applies the command-line overrides and returns a locked
``ConfigDict``. ``data.task_kwargs`` is the only free-form section.
"""

import ast
import difflib
import importlib.util
import inspect
import json
import math
import os
import secrets
from typing import Any, Callable, Mapping, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Sections whose keys are free-form (not checked against the schema).
FREE_FORM = ("data.task_kwargs",)
# Allowed values of enumerated string fields.
CHOICES = {
    "data.name": ("char", "selective_copying", "parity", "mqar", "s5"),
    "model.architecture": ("lm", "griffin"),
    "model.time_mixing": ("mingru", "minlstm", "glrnn", "rglru"),
    "model.norm": ("rmsnorm", "layernorm"),
    "train.cpu_kernels": ("auto", "on", "off"),
    "init_from.recurrent_init": ("zeros", "random"),
}


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _above(low):
    return (lambda v: v > low), f"> {low}"


def _between(low, high, high_open=True):
    return ((lambda v: low <= v < high) if high_open else
            (lambda v: low <= v <= high),
            f"in [{low}, {high}{')' if high_open else ']'}")


# Allowed values of numeric fields: (predicate, description). model.* values
# are checked by LMConfig / GriffinConfig when the model is built.
RANGES = {
    "data.seq_len": _at_least(1),
    "data.batch_size": _at_least(1),
    "data.val_fraction": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "data.eval_batches": _at_least(1),
    "optim.learning_rate": _above(0),
    "optim.warmup_steps": _at_least(0),
    "optim.min_lr_ratio": _between(0, 1, high_open=False),
    "optim.weight_decay": _at_least(0),
    "optim.b1": _between(0, 1),
    "optim.b2": _between(0, 1),
    "optim.grad_clip": _above(0),
    "train.num_steps": _at_least(1),
    "train.eval_every": _at_least(1),
    "train.log_every": _at_least(1),
    "train.checkpoint_every": _at_least(1),
    "train.max_to_keep": _at_least(1),
    "train.sample_every": _at_least(0),
    "train.sample_length": _at_least(1),
    "train.sample_temperature": _at_least(0),
    "train.sample_top_k": _at_least(0),
    # Two-stage recipes (flax_minrnn.training.two_stage).
    "optim.recurrent_lr_multiplier": _above(0),
    "train.stop_at_eval_accuracy": _between(0, 1, high_open=False),
    "train.tbptt_length": _at_least(0),
    "train.recurrence_blend_steps": _at_least(0),
    "init_from.recurrent_init_scale": _at_least(0),
}
# List-valued keys and the type of their elements (overrides: "2,4"). Lists,
# not tuples, so that the config JSON holds the same values.
SEQUENCES = {"mesh.shape": int, "mesh.axis_names": str, "two_stage.stage2": str}
CONFIG_FILENAME = "config.json"


class ConfigError(ValueError):
    """An invalid config: unknown key, wrong type, bad override or value."""


def default_config() -> ConfigDict:
    """Returns the full config schema with its default values."""
    c = ConfigDict()
    c.seed = 0
    c.data = ConfigDict(dict(
        name="char",               # 'char'|'selective_copying'|'parity'|'mqar'|'s5'
        path="",                   # '' = embedded Tiny Shakespeare
        seq_len=128,
        batch_size=32,
        val_fraction=0.1,
        eval_batches=20,
        task_kwargs=ConfigDict(),  # free-form extra task arguments
    ))
    c.model = ConfigDict(dict(
        architecture="lm",         # 'lm' (LMConfig keys below) | 'griffin' (model.griffin)
        time_mixing="mingru",      # 'mingru'|'minlstm'|'glrnn'|'rglru'
        n_layer=2,
        d_model=128,
        d_h=0,                     # 0 = expansion_factor * d_model
        expansion_factor=1.0,
        d_channel_mixing=0,        # 0 = 4 * d_model
        glu=False,
        norm="rmsnorm",            # 'rmsnorm'|'layernorm'
        eps=1e-5,
        conv_width=0,              # 0 = no convolution
        dropout=0.0,
        embedding_dropout=0.0,
        tie_embeddings=False,
        positional_encoding="none",
        max_seq_length=2048,
        use_true_recurrence=False,
        use_tied_gates=True,       # glrnn only
        rglru_num_heads=1,         # rglru only
        scan_impl="auto",          # both architectures
        dtype="float32",           # both architectures
        param_dtype="float32",     # both architectures
        # architecture='griffin': GriffinConfig fields (flax_minrnn.models.griffin);
        # vocab_size comes from the data, dtypes and scan_impl from above.
        griffin=ConfigDict(dict(
            num_hidden_layers=3,
            hidden_size=128,
            intermediate_size=768,         # 2 x the MLP width (HF convention)
            num_attention_heads=4,
            num_key_value_heads=1,
            lru_width=0,                   # 0 = hidden_size
            attention_window_size=64,
            conv1d_width=4,
            logits_soft_cap=30.0,          # 0 = off
            rms_norm_eps=1e-6,
            block_types="recurrent,recurrent,attention",  # comma-separated, cycled
            partial_rotary_factor=0.5,
            rope_theta=10000.0,
            w_init_variance_scale=0.01,
            final_w_init_variance_scale=0.0,  # 0 = 2 / num_hidden_layers
            embeddings_scale_by_sqrt_dim=True,
        )),
    ))
    c.optim = ConfigDict(dict(
        learning_rate=1e-3,
        warmup_steps=100,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        no_decay_regex="(bias|scale|embedding)",
        # Two-stage: learning-rate multiplier of every recurrent_kernel.
        recurrent_lr_multiplier=1.0,
    ))
    c.train = ConfigDict(dict(
        num_steps=1000,
        eval_every=200,
        log_every=20,
        checkpoint_every=200,
        max_to_keep=3,
        sample_every=0,
        sample_length=200,
        sample_prompt="\n",
        sample_temperature=0.8,
        sample_top_k=0,
        progress_bar=True,
        # The compiled CPU kernels (scan_impl='native') for MinGRU/MinLSTM
        # time mixing when model.scan_impl is 'auto', an opt-in: 'off' =
        # never (the default: plain JAX, results independent of a compiler),
        # 'auto' = on a CPU where they build (training needs only first
        # derivatives), 'on' = wherever they apply.
        cpu_kernels="off",
        # Stop once an eval's accuracy reaches this value (0 = never).
        stop_at_eval_accuracy=0.0,
        # Two-stage recipes (flax_minrnn.training.two_stage): truncated
        # backpropagation through time every tbptt_length steps (0 = full);
        # recurrent kernels scaled by a factor ramped from 0 to 1 over the
        # first recurrence_blend_steps steps (0 = off).
        tbptt_length=0,
        recurrence_blend_steps=0,
    ))
    # Two-stage training: stage 2 initialises from the run in `workdir`.
    # recurrent_init: the new recurrent kernels start at 'zeros' (the same
    # function) or 'random' (N(0, (recurrent_init_scale / sqrt(d_h))^2), with
    # the in_proj bias compensating the mean state when compensate_bias);
    # flax_minrnn.training.two_stage says when to use which.
    c.init_from = ConfigDict(dict(workdir="", load_regex=".*",
                                  freeze_regex="", recurrent_init="zeros",
                                  recurrent_init_scale=0.1, compensate_bias=True))
    # One command for both stages (flax_minrnn.training.two_stage): with
    # stage2 (a list of "key=value" overrides) non-empty, the run trains this
    # config as stage 1 in workdir/stage1, then stage 2 (true recurrence,
    # initialised from stage 1, plus the overrides) in workdir/stage2. On the
    # command line the overrides are comma-separated, so none may hold a comma.
    c.two_stage = ConfigDict(dict(stage2=[]))
    # Devices (flax_minrnn.training.mesh; README "Multi-device"). shape [] = one
    # device, no mesh; e.g. shape [8] axis_names ["data"], or [2, 4] with
    # ["data", "seq"] and sequence_axis "seq". One size may be -1 (the rest).
    c.mesh = ConfigDict(dict(
        shape=[],
        axis_names=[],
        data_axis="data",          # mesh axis splitting the batch ('' = none)
        fsdp=False,                # also split params + optimizer state over it
        sequence_axis="",          # mesh axis splitting time ('' = none)
    ))
    return c


def _is_map(value: Any) -> bool:
    return isinstance(value, (Mapping, ConfigDict))


def _dotted_keys(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in schema.items():
        keys.append(prefix + key)
        if _is_map(value) and prefix + key not in FREE_FORM:
            keys += _dotted_keys(value, prefix + key + ".")
    return keys


def _unknown(dotted: str) -> ConfigError:
    """An 'unknown key' error, with the closest schema keys as suggestions."""
    known = _dotted_keys(default_config())
    leaf = dotted.rsplit(".", 1)[-1]
    close = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close += [k for k in difflib.get_close_matches(dotted, known, n=2,
                                                   cutoff=0.8)
              if k not in close]
    hint = (f" Did you mean {' or '.join(repr(k) for k in close)}?"
            if close else "")
    return ConfigError(f"Unknown config key {dotted!r}.{hint}")


def _check_sequence(dotted: str, value: Any) -> list:
    """A list of ``SEQUENCES[dotted]`` elements (a tuple is accepted)."""
    element = SEQUENCES[dotted]
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, element) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"Config key {dotted!r} expects a list of "
                          f"{element.__name__}, got {type(value).__name__} "
                          f"{value!r}.")
    return list(value)


def _check_value(dotted: str, value: Any, default: Any) -> Any:
    """Returns ``value`` if it has the type of ``default`` (int -> float ok)."""
    if dotted in SEQUENCES:
        return _check_sequence(dotted, value)
    expected = type(default)
    ok = isinstance(value, expected) and (expected is bool
                                          or not isinstance(value, bool))
    if expected is float and isinstance(value, int) \
            and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"Config key {dotted!r} expects {expected.__name__}, "
                          f"got {type(value).__name__} {value!r}.")
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ConfigError(f"Config key {dotted!r} must be one of "
                          f"{CHOICES[dotted]}, got {value!r}.")
    if dotted in RANGES:
        allowed, description = RANGES[dotted]
        if not allowed(value):
            raise ConfigError(f"Config key {dotted!r} must be {description}, "
                              f"got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"Config key {dotted!r} must be finite, got {value!r}.")
    return value


def _merge(target: ConfigDict, values: Mapping[str, Any], prefix: str = ""):
    """Validates ``values`` against ``target`` (the schema) and assigns them."""
    for key, value in values.items():
        dotted = prefix + str(key)
        if key not in target:
            raise _unknown(dotted)
        default = target[key]
        if isinstance(default, ConfigDict):
            if not _is_map(value):
                raise ConfigError(f"Config key {dotted!r} is a section; got "
                                  f"{type(value).__name__} {value!r}.")
            if dotted in FREE_FORM:
                target[key] = ConfigDict(value.to_dict() if isinstance(
                    value, ConfigDict) else dict(value))
            else:
                _merge(default, value, dotted + ".")
        else:
            target[key] = _check_value(dotted, value, default)


def validate(config: Mapping[str, Any] | ConfigDict) -> ConfigDict:
    """Validates ``config`` against the schema; returns a locked full copy.

    Args:
        config: A (partial) config, ``ConfigDict`` or nested dict.

    Returns:
        A locked ``ConfigDict`` with every schema key, defaults filled in.

    Raises:
        ConfigError: Unknown key, wrong type or disallowed value.
    """
    if isinstance(config, ConfigDict):
        config = config.to_dict()
    result = default_config()
    _merge(result, config)
    _check_read(result)
    result.lock()
    return result


# model.* keys that both architectures read; Griffin reads model.griffin.* too.
_SHARED_MODEL_KEYS = ("architecture", "scan_impl", "dtype", "param_dtype", "griffin")


def _unread(config: ConfigDict) -> dict[str, str]:
    """``{dotted key: what reads it}`` for the keys that ``config``'s task
    and architecture do not read."""
    unread = {}
    if config.data.name != "char":
        for key in ("path", "seq_len", "val_fraction"):
            unread[f"data.{key}"] = ("data.name='char' (a synthetic task takes its sizes "
                                     "from data.task_kwargs)")
    if config.model.architecture == "griffin":
        for key in config.model:
            if key not in _SHARED_MODEL_KEYS:
                unread[f"model.{key}"] = ("model.architecture='lm' (Griffin's own keys are "
                                          "model.griffin.*)")
    else:
        for key in config.model.griffin:
            unread[f"model.griffin.{key}"] = "model.architecture='griffin'"
    return unread


def _get(config: ConfigDict, dotted: str) -> Any:
    for key in dotted.split("."):
        config = config[key]
    return config


def _check_read(config: ConfigDict) -> None:
    """A key that this task or architecture does not read must keep its
    default: a value set there would be ignored."""
    defaults = default_config()
    for dotted, reader in _unread(config).items():
        value = _get(config, dotted)
        if value != _get(defaults, dotted):
            raise ConfigError(f"Config key {dotted!r} = {value!r} is read only with "
                              f"{reader}; leave it at its default "
                              f"{_get(defaults, dotted)!r}.")


def _unwrap(text: str, pairs: Sequence[str]) -> str:
    """``text`` without its first and last character when they are one of
    the ``pairs`` (``"()"``)."""
    if len(text) >= 2 and text[0] + text[-1] in pairs:
        return text[1:-1]
    return text


def _parse(dotted: str, text: str, default: Any) -> Any:
    if dotted in SEQUENCES:  # "2,4", "(2, 4)", "[2, 4]", "data,seq", "".
        # Only a bracket pair around the whole text, and quotes around a whole
        # item, are syntax: "a=(x|y)" and 'b="Hi"' keep theirs.
        text = _unwrap(text.strip(), ("()", "[]"))
        items = [_unwrap(t.strip(), ("''", '""')) for t in text.split(",")]
        return [SEQUENCES[dotted](t) for t in items if t]
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError("expected true/false/1/0")
    if isinstance(default, (int, float)):
        return type(default)(text.strip())
    return text


def _parse_free(text: str) -> Any:
    """A free-form value: true/false/yes/no (any case) as bools, as the
    schema's bools read; else a Python literal; else the raw string."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ConfigDict, overrides: Sequence[str]
                    ) -> ConfigDict:
    """Returns a validated, locked copy of ``config`` with ``overrides``.

    Args:
        config: A config (validated by this function).
        overrides: ``"section.key=value"`` strings. The value is parsed by the
            schema type of the key (bool: true/false/1/0; str: verbatim).
            ``data.task_kwargs.<name>=<value>`` values are true/false/yes/no
            (any case) as bools, else go through ``ast.literal_eval``,
            falling back to the raw string; they replace the old value
            whatever its type.

    Raises:
        ConfigError: Malformed override, unknown key or unparsable value.
    """
    result = validate(config)
    result.unlock()
    for item in overrides:
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted:
            raise ConfigError(f"Override {item!r} is not 'key=value'.")
        free = next((f for f in FREE_FORM if dotted.startswith(f + ".")), None)
        if free is not None:
            node = result
            for key in free.split("."):
                node = node[key]
            *parents, leaf = dotted[len(free) + 1:].split(".")
            for key in parents:
                if not isinstance(node.get(key), ConfigDict):
                    node[key] = ConfigDict()
                node = node[key]
            # Free-form values replace the old one whatever its type.
            if leaf in node:
                del node[leaf]
            node[leaf] = _parse_free(text)
            continue
        node, keys = result, dotted.split(".")
        for i, key in enumerate(keys):
            if not isinstance(node, ConfigDict) or key not in node:
                raise _unknown(dotted)
            if i < len(keys) - 1:
                node = node[key]
        default = node[keys[-1]]
        if isinstance(default, ConfigDict):
            raise ConfigError(f"Override {item!r}: {dotted!r} is a section.")
        try:
            value = _parse(dotted, text, default)
        except ValueError as e:
            raise ConfigError(
                f"Override {item!r}: {dotted!r} expects "
                f"{type(default).__name__}, cannot parse {text!r} ({e})."
            ) from e
        node[keys[-1]] = _check_value(dotted, value, default)
    _check_read(result)
    result.lock()
    return result


def load_config(path: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads a ``get_config()`` file, validates it and applies overrides.

    Args:
        path: Python file defining ``get_config``; an optional ``:arg`` suffix
            calls ``get_config(arg)`` instead.
        overrides: ``"key=value"`` strings; see :func:`apply_overrides`.

    Returns:
        The full, validated, locked config.

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: The file has no ``get_config`` or the config is invalid.
    """
    file, arg = path, None
    if not os.path.exists(path) and ":" in path:
        file, arg = path.rsplit(":", 1)
    if not os.path.exists(file):
        raise FileNotFoundError(f"Config file {file!r} not found.")
    if not os.path.isfile(file):
        raise ConfigError(f"Config file {file!r} is not a file (give a .py file "
                          "defining get_config()).")
    name = "_flax_minrnn_config_" + os.path.splitext(
        os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"Config file {file!r} is not a Python file (give a .py "
                          "file defining get_config()).")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # The user's file: report what failed, in one line.
        raise ConfigError(f"Config file {file!r} failed to load: "
                          f"{type(e).__name__}: {e}") from e
    get_config: Callable[..., Any] | None = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"Config file {file!r} defines no get_config().")
    args = () if arg is None else (arg,)
    try:
        inspect.signature(get_config).bind(*args)
    except TypeError as e:
        raise ConfigError(
            f"get_config() in {file!r} cannot be called with "
            f"{'no argument' if arg is None else repr(arg) + ' (the :ARG of --config)'}: "
            f"{e}") from e
    config = get_config(*args)
    if not _is_map(config):
        raise ConfigError(f"get_config() in {file!r} returned "
                          f"{type(config).__name__}, not a ConfigDict.")
    return apply_overrides(config, overrides)


# What `shrink` sets, in one place: dotted key -> value, or a function of
# the current value.
SHRINK: dict[str, Any] = {
    "model.n_layer": lambda n: min(n, 1),
    "model.d_model": 16,
    "model.d_h": 0,
    "model.d_channel_mixing": 0,
    "model.max_seq_length": 64,
    "model.griffin.num_hidden_layers": lambda n: min(n, 3),
    "model.griffin.hidden_size": 16,
    "model.griffin.lru_width": 0,
    "model.griffin.intermediate_size": 32,
    "model.griffin.num_attention_heads": 2,
    "model.griffin.num_key_value_heads": 1,
    "model.griffin.attention_window_size": 8,
    "data.seq_len": 16,
    "data.batch_size": 2,
    "data.eval_batches": 1,
    "optim.warmup_steps": 1,
    "train.num_steps": 2,
    "train.eval_every": 1,
    "train.log_every": 1,
    "train.checkpoint_every": 1,
    "train.sample_every": 0,
    "train.sample_length": 8,
    "train.progress_bar": False,
}


def shrink(config: ConfigDict) -> ConfigDict:
    """Returns a validated, locked copy with tiny sizes (smoke tests).

    ``data.task_kwargs`` is left alone; a two-stage config's stage 2 gets
    the shrunk ``train.num_steps`` too.
    """
    result = validate(config)
    unread = _unread(result)
    for dotted, value in SHRINK.items():
        if dotted in unread:  # It must keep its default.
            continue
        *parents, leaf = dotted.split(".")
        node = result
        for key in parents:
            node = node[key]
        node[leaf] = value(node[leaf]) if callable(value) else value
    if result.two_stage.stage2:  # Stage 2's overrides come last: shrink its length too.
        result.two_stage.stage2 = [*result.two_stage.stage2,
                                   f"train.num_steps={SHRINK['train.num_steps']}"]
    return result


def config_to_json(config: ConfigDict) -> str:
    """Serialises a (validated) config as indented, key-sorted JSON."""
    return json.dumps(validate(config).to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str) -> ConfigDict:
    """Parses and validates a config serialised by :func:`config_to_json`."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"Config JSON is malformed: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError("Config JSON is not an object.")
    return validate(values)


def save_config(workdir: str, config: ConfigDict) -> str:
    """Atomically writes ``workdir/config.json``; returns its path.

    The file gets the mode of any file the process creates (``0o666`` less
    the umask), like the run's other files.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILENAME)
    write_text_atomically(path, config_to_json(config) + "\n")
    return path


def write_text_atomically(path: str, text: str) -> None:
    """Replaces ``path`` by a file holding ``text``, or leaves it as it was.

    A fresh temporary file beside it is written, synced and renamed over
    ``path``; it gets the mode of any file the process creates (``0o666``
    less the umask).
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_saved_config(workdir: str) -> ConfigDict:
    """Reads and validates ``workdir/config.json``."""
    path = os.path.join(workdir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No saved config {path!r}.")
    with open(path) as f:
        try:
            return config_from_json(f.read())
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
