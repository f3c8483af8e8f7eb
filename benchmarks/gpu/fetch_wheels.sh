#!/bin/bash
# Downloads into .whl/ the pure-Python packages that flax_minrnn needs and the
# GPU machine lacks (it has jax, flax, optax, orbax-checkpoint, chex, numpy,
# matplotlib and torch, and no network). Run once, from the repository root,
# on a machine with network; benchmarks/gpu/run.sh installs them there.
set -euo pipefail
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
  ml-collections tensorboardX tqdm
ls -l .whl
