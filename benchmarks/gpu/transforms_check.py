"""The README's transformation table for scan_impl='pallas' and 'auto' on a GPU.

Run on a GPU machine from the repository root::

    python3 -m benchmarks.gpu.transforms_check

Each transformation of a MinGRU's loss (B=2, T=70, d=4) with the compiled
Triton kernel (``pallas``) and the default (``auto``) is compared with
``sequential`` under ``jax.default_matmul_precision('highest')``; prints one
line per cell and exits non-zero on any mismatch or error.  The cells the
README's table marks unsupported (:data:`UNSUPPORTED`: ``pallas`` under
``jax.export``) are expected to raise: an error there is reported as
``unsupported (expected)``, and success there as a mismatch with the table.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export
from jax.flatten_util import ravel_pytree

import flax_minrnn as fm

TRANSFORMS = {
    "grad": lambda f, p, t: jax.grad(f)(p),
    "jvp": lambda f, p, t: jax.jvp(f, (p,), (t,))[1],
    "vmap": lambda f, p, t: jax.vmap(jax.grad(f))(jnp.stack([p, p])),
    "hvp": lambda f, p, t: jax.jvp(jax.grad(f), (p,), (t,))[1],
    "grad of grad": lambda f, p, t: jax.grad(lambda q: jnp.sum(jax.grad(f)(q) ** 2))(p),
    "checkpoint": lambda f, p, t: jax.grad(jax.checkpoint(f))(p),
    "export": lambda f, p, t: export.deserialize(
        export.export(jax.jit(f))(p).serialize()).call(p),
}


# Cells of the README's transformation table that say "no" (for the impls
# checked here): they must raise, not run.
UNSUPPORTED = {("pallas", "export")}


def main() -> int:
    print("backend", jax.default_backend(), jax.devices()[0].device_kind)
    layer = fm.MinGRU(d_h=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 70, 3)), jnp.float32)
    params, unravel = ravel_pytree(layer.init(jax.random.PRNGKey(0), x))
    t = jnp.asarray(np.random.default_rng(1).normal(size=params.shape), jnp.float32)

    def loss(impl):
        return lambda p: jnp.sum(layer.clone(scan_impl=impl).apply(unravel(p), x)[1] ** 2)

    bad = 0
    with jax.default_matmul_precision("highest"):
        for impl in ("pallas", "auto"):
            for name, transform in TRANSFORMS.items():
                expected_error = (impl, name) in UNSUPPORTED
                try:
                    got = transform(loss(impl), params, t)
                except Exception as e:  # pylint: disable=broad-except
                    word = "unsupported (expected)" if expected_error else "ERROR"
                    print(f"{impl:8s} {name:13s} {word} {type(e).__name__}: {str(e)[:200]}")
                    bad += not expected_error
                    continue
                if expected_error:
                    print(f"{impl:8s} {name:13s} MISMATCH with the README's table: it ran, "
                          "the table says no")
                    bad += 1
                    continue
                try:
                    want = transform(loss("sequential"), params, t)
                    err = max(float(jnp.max(jnp.abs(g - w)) / (jnp.max(jnp.abs(w)) + 1e-30))
                              for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
                    ok = err <= 1e-4
                    print(f"{impl:8s} {name:13s} {'ok' if ok else 'MISMATCH'} rel err {err:.1e}")
                    bad += not ok
                except Exception as e:  # pylint: disable=broad-except
                    print(f"{impl:8s} {name:13s} ERROR (sequential reference) "
                          f"{type(e).__name__}: {str(e)[:200]}")
                    bad += 1
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
