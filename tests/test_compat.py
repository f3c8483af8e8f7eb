"""flax_minrnn.compat.flax_gated_linear_rnn against the seed package itself:
its README snippets run on our module after changing the import line, and a
whole GatedLinearRNNLM converts from the package's params with its logits."""

import importlib.metadata
import re
import textwrap

import jax
import numpy as np
import pytest

fglr = pytest.importorskip("flax_gated_linear_rnn")
from flax_minrnn.compat import flax_gated_linear_rnn as compat  # noqa: E402

PACKAGE_IMPORT = "from flax_gated_linear_rnn import"
OUR_IMPORT = "from flax_minrnn.compat.flax_gated_linear_rnn import"


def _readme_snippets():
    """The Python blocks of the installed package's README (its PyPI description)."""
    text = importlib.metadata.metadata("flax-gated-linear-rnn").get_payload()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```\n(.*?)```", text, re.S)]
    return [b for b in blocks if PACKAGE_IMPORT in b]


def _run(code):
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(code, "readme_snippet", "exec"), {})  # pylint: disable=exec-used


def test_the_names_of_the_package_are_exported():
    for name in ("GatedLinearRNN", "GatedLinearRNNLM"):
        assert name in fglr.__dict__ and name in compat.__all__
        assert callable(getattr(compat, name))


def test_readme_snippets_run_after_changing_the_import_line():
    snippets = _readme_snippets()
    assert len(snippets) == 2  # the layer and the language model
    for code in snippets:
        assert code.count(PACKAGE_IMPORT) == 1
        ours = code.replace(PACKAGE_IMPORT, OUR_IMPORT)
        # The LM snippet's batch of 32 x 512 tokens with a 10000-word head is
        # shrunk to 2 rows here to keep the suite fast; the slow test below
        # runs it as written.
        _run(ours.replace("batch_size = 32", "batch_size = 2"))


@pytest.mark.slow
def test_readme_snippets_run_unchanged_but_the_import():
    for code in _readme_snippets():
        _run(code.replace(PACKAGE_IMPORT, OUR_IMPORT))


V = 17


@pytest.mark.parametrize("tied,true_rec,pe,words", [
    (True, False, "sinusoidal", True),
    (False, False, "none", True),
    (True, True, "none", True),
    (False, True, "sinusoidal", False),
])
def test_whole_lm_converts_with_the_package_logits(tied, true_rec, pe, words):
    kw = dict(n_layer=2, d_model=8, d_channel_mixing=12, eps=1e-5, channel_mixing_dropout=0.0,
              time_mixing_dropout=0.0, input_vocab_size=V, output_vocab_size=V,
              max_seq_length=16, embedding_dropout=0.0, use_word_embedding=words,
              positional_encoding_mode=pe, d_h=6, use_head=True, use_tied_gates=tied,
              use_true_recurrence=true_rec)
    theirs = fglr.GatedLinearRNNLM(**kw)
    x = (jax.random.randint(jax.random.key(0), (2, 7), 0, V) if words
         else jax.random.normal(jax.random.key(0), (2, 7, V)))
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        params = theirs.init(jax.random.key(1), x, training=False)
        # The true-recurrence weights start at zero: make them matter.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        params = jax.tree.unflatten(tree, [v + 0.2 * jax.random.normal(k, v.shape)
                                           for v, k in zip(leaves, keys)])
        h_ref, y_ref = jax.jit(lambda p, x: theirs.apply(p, x, training=False))(params, x)
    ours = compat.GatedLinearRNNLM(**kw)
    converted = compat.from_flax_gated_linear_rnn(params)
    assert jax.tree.structure(converted) == jax.tree.structure(
        ours.init(jax.random.key(0), x, training=False))
    h, y = jax.jit(lambda p, x: ours.apply(p, x, training=False))(converted, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-5, atol=1e-6)
    # The conversion copies: every package tensor appears unchanged.
    ours_leaves = {np.asarray(v).tobytes() for v in jax.tree.leaves(converted)}
    assert all(np.asarray(v).tobytes() in ours_leaves for v in jax.tree.leaves(params))


def test_lm_conversion_errors():
    with pytest.raises(ValueError, match="time_mixing_layers_0"):
        compat.from_flax_gated_linear_rnn({"input_function": {}, "time_mixing_layers_0": {}})
    with pytest.raises(ValueError, match="wpe"):
        compat.from_flax_gated_linear_rnn({"input_function": {}, "wpe": {"table": 1}})
    with pytest.raises(ValueError, match="params has 'hed'"):
        compat.from_flax_gated_linear_rnn({"input_function": {}, "hed": {}})


def test_positional_arguments_follow_the_package():
    """The package's positional order builds the same model here: the layer
    (whose native order starts (d_h, d_model)) and the language model."""
    import flax.linen as nn
    theirs, ours = fglr.GatedLinearRNN(3, 5, nn.relu, nn.tanh, nn.sigmoid, True, False), \
        compat.GatedLinearRNN(3, 5, nn.relu, nn.tanh, nn.sigmoid, True, False)
    for field in ("d_model", "d_h", "input_activation", "use_true_recurrence", "use_tied_gates"):
        assert getattr(ours, field) is getattr(theirs, field) or \
            getattr(ours, field) == getattr(theirs, field), field
    assert isinstance(ours, compat.layers_lib.GatedLinearRNN)
    with pytest.raises(TypeError, match="multiple values for argument 'd_h'"):
        compat.GatedLinearRNN(3, 5, d_h=4)
    args = (2, 8, 12, 1e-5, 0.0, 0.0, V, V, 16, 0.0, True, "sinusoidal", False, 6)
    ours_lm = compat.GatedLinearRNNLM(*args)
    theirs_lm = fglr.GatedLinearRNNLM(*args)
    for field in ("n_layer", "use_head", "d_h", "positional_encoding_mode"):
        assert getattr(ours_lm, field) == getattr(theirs_lm, field), field


@pytest.mark.parametrize("field,value,match", [
    ("n_layer", 0, "n_layer must be an integer >= 1"),
    ("n_layer", 2.0, "n_layer must be an integer >= 1"),
    ("d_channel_mixing", 0, "d_channel_mixing must be an integer >= 1"),
    ("output_vocab_size", 0, "output_vocab_size must be an integer >= 1"),
    ("eps", -1.0, "eps"),
    ("eps", 0.0, "eps"),
    ("time_mixing_dropout", 1.5, r"time_mixing_dropout must be a finite number in \[0, 1\]"),
    ("embedding_dropout", -0.5, "embedding_dropout"),
    ("use_head", 1, "use_head must be a bool"),
])
def test_lm_arguments_are_checked_by_name(field, value, match):
    kw = dict(n_layer=1, d_model=4, d_channel_mixing=8, eps=1e-5, channel_mixing_dropout=0.0,
              time_mixing_dropout=0.0, input_vocab_size=V, output_vocab_size=V,
              max_seq_length=8, embedding_dropout=0.0, use_word_embedding=True,
              positional_encoding_mode="none", use_head=True, d_h=4)
    x = jax.numpy.zeros((1, 3), jax.numpy.int32)
    with pytest.raises(ValueError, match=match):
        compat.GatedLinearRNNLM(**{**kw, field: value}).init(jax.random.key(0), x)
    model = compat.GatedLinearRNNLM(**kw)
    params = model.init(jax.random.key(0), x)
    for offset in (1.5, -1):
        with pytest.raises(ValueError, match="offset must"):
            model.apply(params, x, offset=offset)
