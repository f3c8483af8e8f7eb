"""flax_minrnn.training.runtime.tune_cpu_malloc: what it changes, and that results do not."""

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import flax_minrnn as fm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_glibc() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).gnu_get_libc_version  # pylint: disable=expression-not-assigned
        return True
    except (OSError, AttributeError, TypeError):
        return False


glibc_only = pytest.mark.skipif(not _is_glibc(), reason="mallopt settings are glibc's")

# Runs in a fresh process: optionally tunes, then reports (a) whether a 64 MiB
# NumPy buffer came from mmap (glibc's mallinfo2 hblkhd grows) and (b) the
# gradients of a MinGRU layer at T=64 as bytes, so two processes can be
# compared bit for bit.
_CHILD = textwrap.dedent("""
    import ctypes, ctypes.util, json, sys
    import jax
    import flax_minrnn as fm
    tuned = fm.tune_cpu_malloc() if sys.argv[1] == "tune" else None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    import numpy as np
    before = libc.mallinfo2().hblkhd
    buf = np.ones(16 * 2**20, np.float32)  # 64 MiB
    mmapped = libc.mallinfo2().hblkhd - before
    del buf

    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(1), (2, 64, 16))
    layer = fm.MinGRU(d_h=16)
    params = layer.init(jax.random.key(0), x)
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)[1]))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    leaves = [np.asarray(l).tobytes().hex() for l in jax.tree.leaves(grads)]
    print(json.dumps({"tuned": tuned, "mmapped": int(mmapped), "grads": leaves}))
""")


def _child(mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_process_serves_large_blocks_from_heap_and_computes_the_same():
    plain, tuned = _child("plain"), _child("tune")
    assert tuned["tuned"] is True
    # Without the setting glibc maps a 64 MiB block; with it, the heap serves it.
    assert plain["mmapped"] >= 64 * 2**20
    assert tuned["mmapped"] == 0
    # Only where memory comes from changes: the gradients are bit-identical.
    assert tuned["grads"] == plain["grads"]


def test_after_jax_started_it_warns_and_changes_nothing():
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    np.asarray(jnp.ones(2) + 1)  # the backends are running in this process
    with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
        assert fm.tune_cpu_malloc() is False


def test_apply_malloc_setting():
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax_minrnn.training import runtime as runtime  # pylint: disable=g-import-not-at-top
    assert runtime.apply_malloc_setting("default") == "default"
    np.asarray(jnp.ones(2) + 1)  # JAX runs in this process: tuning cannot take
    with pytest.warns(RuntimeWarning):
        assert runtime.apply_malloc_setting("tuned") == "default"
    with pytest.raises(ValueError, match=r"one of \('tuned', 'default'\), got 'fast'"):
        runtime.apply_malloc_setting("fast")
