"""On a GPU: the Pallas scan against the sequential reference (outputs, grads).

Run: ``python -m benchmarks.gpu.check_pallas`` (prints max relative errors;
exits non-zero above 1e-5).  The CPU test suite checks the same kernel in
Pallas's interpreter (tests/test_kernels.py); this checks the compiled one.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flax_minrnn.ops.scan import linear_scan


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))


def main() -> int:
    rng = np.random.default_rng(0)
    worst = 0.0
    for shape in [(8, 4096, 256), (3, 1000, 96), (1, 17, 8), (64, 2048, 1024)]:
        for reverse in (False, True):
            a = jnp.asarray(rng.uniform(0.5, 1.0, shape), jnp.float32)
            b = jnp.asarray(rng.normal(size=shape), jnp.float32)
            h0 = jnp.asarray(rng.normal(size=(shape[0], shape[2])), jnp.float32)
            g = jnp.asarray(rng.normal(size=shape), jnp.float32)

            def loss(a, b, h0, impl):
                hl, h = linear_scan(a, b, h0, impl=impl, reverse=reverse)
                return jnp.sum(h * g) + jnp.sum(hl)

            with jax.default_matmul_precision("highest"):
                ref = linear_scan(a, b, h0, impl="sequential", reverse=reverse)[1]
                out = jax.jit(lambda a, b, h0: linear_scan(a, b, h0, impl="pallas",
                                                           reverse=reverse)[1])(a, b, h0)
                gr = jax.grad(loss, argnums=(0, 1, 2))(a, b, h0, "sequential")
                gp = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(
                    a, b, h0, "pallas")
            errs = [rel(out, ref)] + [rel(p, r) for p, r in zip(gp, gr)]
            worst = max(worst, *errs)
            print(f"{shape} reverse={reverse}: rel err h {errs[0]:.2e}, "
                  f"da {errs[1]:.2e}, db {errs[2]:.2e}, dh0 {errs[3]:.2e}", flush=True)
    print("worst", worst)
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
