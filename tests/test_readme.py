"""The README's "RecurrentGemma weights" example, run exactly as written on a
small random-initialised checkpoint saved where it looks."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

import flax_minrnn as fm

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_code(heading):
    text = README.read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_recurrentgemma_weights_example_runs(tmp_path, monkeypatch, capsys):
    code = _section_code("### RecurrentGemma weights")
    path = re.search(r'load_hf_recurrentgemma\("([^"]+)"\)', code).group(1)
    # A small checkpoint with the published layout (RG, RG, attention; MQA;
    # token ids up to the example's 6037; EOS 1).
    config = fm.GriffinConfig(vocab_size=6100, num_hidden_layers=3, hidden_size=16,
                              intermediate_size=48, num_attention_heads=2,
                              attention_window_size=4, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2)
    variables = fm.Griffin(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    monkeypatch.chdir(tmp_path)
    fm.save_hf_recurrentgemma(path, config, variables)
    scope = {}
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(code, "README", "exec"), scope)  # pylint: disable=exec-used
    out, loss = scope["out"], scope["loss"]
    assert out.tokens.shape == (1, 16) and np.isfinite(float(loss))
    assert scope["config"] == config
    # Fine-tuning moved the weights, and the sample is greedy from them.
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         scope["variables"], variables)
    assert any(jax.tree.leaves(moved))
    again = fm.generate(fm.Griffin(config), scope["variables"], scope["batch"][:, :4], 16,
                        do_sample=False, eos_id=1)
    assert again.tokens.tolist() == out.tokens.tolist()
    assert str(out.tokens.tolist()[0][0]) in capsys.readouterr().out
