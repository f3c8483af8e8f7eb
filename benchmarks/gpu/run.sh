#!/bin/bash
# One device call: environment, Pallas correctness, the GPU benchmark.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu/run.sh OUTDIR
set -x
OUT=${1:-/tmp/gpu_out}; mkdir -p $OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 -m benchmarks.gpu.check_pallas 2>&1 | tee $OUT/check_pallas.txt
python3 -m benchmarks.bench_gpu --out $OUT 2>&1 | tail -60
