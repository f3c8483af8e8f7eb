"""Train (or resume) a run, then dump its checkpoints as restored here.

Usage (by tests/test_parallel.py, with ``XLA_FLAGS`` forcing N host
devices)::

    python tests/multidevice_checkpoint.py CONFIG_JSON WORKDIR DUMP_NPZ

Runs ``train.train_and_evaluate`` on the config (its ``mesh`` section fits
this process's devices), then restores every checkpoint step of ``WORKDIR``
onto this process's mesh (the plan's shardings as the restore target),
checks that every leaf landed in its target sharding, and writes the values
to ``DUMP_NPZ`` as ``"{step}/{param path}"`` arrays.
"""

import os
import sys

import jax
import numpy as np

# The numerics flags of tests/conftest.py (the runs are compared).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_disable_most_optimizations", True)

from flax_minrnn.training import checkpoint as ckpt_lib  # noqa: E402
from flax_minrnn.training import config as config_lib  # noqa: E402
from flax_minrnn.training import mesh as parallel  # noqa: E402
from flax_minrnn.training import train as train  # noqa: E402


def restored_params(config, workdir: str) -> dict:
    """``{"step/path": array}`` of every step, restored onto the config's mesh."""
    plan = parallel.plan_from_config(config.mesh)
    out = {}
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               read_only=True) as ckpt:
        for step in ckpt.all_steps():
            like, _ = ckpt.restore_params(step)  # structure (one device)
            target = like if plan is None else plan.put_state(like)
            params, _ = ckpt.restore_params(step, target=target)
            leaves = jax.tree_util.tree_flatten_with_path(params)[0]
            for (path, got), want in zip(leaves, jax.tree.leaves(target)):
                assert got.sharding == want.sharding, (step, path, got.sharding)
                out[f"{step}/{jax.tree_util.keystr(path)}"] = np.asarray(got)
    return out


def main(argv) -> int:
    config_json, workdir, dump = argv
    with open(config_json) as f:
        config = config_lib.config_from_json(f.read())
    train.train_and_evaluate(config, workdir)
    np.savez(dump, **restored_params(config, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
