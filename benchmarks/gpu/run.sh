#!/bin/bash
# Issue #21: every GPU measurement in one run (about 7.5 minutes on one H200).
#
# From the repository root, with the results folder in $OUT:
#     OUT=/path/to/results bash benchmarks/gpu/run.sh [extra bench.py flags]
# The folder gets results.json, time_vs_T.png, summary.md and run.log (flat,
# at most 5 files). The GPU machine lacks some pure-Python packages and has no
# network: benchmarks/gpu/fetch_wheels.sh downloads them into .whl/ first
# (on a machine with network; .whl/ is git-ignored, so carry it along).
# The package is imported from the repository root, not installed.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \
  || { echo "run.sh: installing .whl/*.whl failed (see fetch_wheels.sh); going on" >&2; export PYTHONPATH=$PWD; }
set -u -o pipefail
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# bench.py stops itself by its --budget-s (450 s from its start, every
# section capped); the timeout, 15 s later, is the last resort.
BUDGET_S=${BUDGET_S:-450}
TIMEOUT_S=${TIMEOUT_S:-$((BUDGET_S + 15))}
LOG=/tmp/gpu_bench_full.log
timeout -k 5 "$TIMEOUT_S" python3 -m benchmarks.gpu.bench --out "$OUT" \
  --budget-s "$BUDGET_S" "$@" > "$LOG" 2>&1
rc=$?
# run.log: the whole log if small, else its head and tail (files come back < 16 MiB).
if [ "$(stat -c %s "$LOG")" -le 8000000 ]; then
  cp "$LOG" "$OUT/run.log"
else
  { head -c 3000000 "$LOG"; printf '\n[... cut ...]\n'; tail -c 3000000 "$LOG"; } > "$OUT/run.log"
fi
if [ $rc -eq 0 ]; then
  sed -n '/^# GPU run summary/,$p' "$LOG"
else
  # Stopped early (timeout, crash): the end of the log, then the summary of
  # what results.json holds so far.
  grep -v '^\s*$' "$LOG" | tail -n 60
  if [ -f "$OUT/results.json" ]; then
    echo "run.sh: bench.py exited with $rc; summary of the partial results:"
    python3 -m benchmarks.gpu.bench --summary "$OUT/results.json" | tee "$OUT/summary.md"
  fi
fi
echo "run.sh: exit $rc after $SECONDS s; files: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
