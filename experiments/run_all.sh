#!/usr/bin/env bash
# The exact sequence of commands behind experiments/*/README.md (issue #8).
#
# Usage (from anywhere; runs in the repository root):
#
#   experiments/run_all.sh                      # the CPU experiments, in order
#   experiments/run_all.sh shakespeare          # one experiment
#   RUNS=/work/runs PY=.venv/bin/python experiments/run_all.sh parity_two_stage
#   experiments/run_all.sh --help               # usage and the experiment names
#
# Experiments (CPU): selective_copying_small, shakespeare, parity_two_stage,
# two_stage, two_stage_shakespeare, two_stage_s5, shakespeare_2000,
# selective_copying_ablation, selective_copying_ablation_10k, shakespeare_medium.
# GPU-sized (not in the default list): selective_copying_ablation_gpu,
# shakespeare_large.
#
# Each training writes its workdir under $RUNS (default: runs/); a finished
# run leaves $WORKDIR/timing.json (end-to-end seconds of the train command)
# and is skipped when the script is run again (so is one that failed under
# RECORD_FAILURES, which leaves $WORKDIR/failed.json). After each experiment,
# experiments/report.py rewrites experiments/<name>/results.json, its PNG and
# the table in its README from the workdirs' metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

train() {  # train CONFIG WORKDIR [key=value ...]
  local config=$1 workdir=$2
  shift 2
  if [[ -f "$workdir/timing.json" ]]; then
    echo "== $workdir: done already (timing.json), skipped"
    return
  fi
  if [[ -f "$workdir/failed.json" ]]; then
    echo "== $workdir: failed before (failed.json), skipped"
    return
  fi
  echo "== train $config -> $workdir $*"
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  "$PY" -m flax_minrnn train --config "$config" --workdir "$workdir" "$@" \
    train.progress_bar=false || rc=$?
  if [[ $rc -ne 0 ]]; then
    # RECORD_FAILURES (set by an experiment): a run that fails (e.g. diverges)
    # is a result; record it and go on.
    [[ -n "${RECORD_FAILURES:-}" ]] || return $rc
    printf '{"exit_code": %d}\n' "$rc" > "$workdir/failed.json"
    echo "== $workdir: failed with exit code $rc (recorded in failed.json)"
    return
  fi
  t1=$(date +%s.%N)
  printf '{"end_to_end_s": %.1f, "host": "%s", "cpus": %s}\n' \
    "$(awk "BEGIN { print $t1 - $t0 }")" "$(hostname)" "$(nproc)" > "$workdir/timing.json"
}

evaluate() {  # evaluate WORKDIR NAME [key=value ...]: WORKDIR/evals/NAME.json
  local workdir=$1 name=$2
  shift 2
  mkdir -p "$workdir/evals"
  "$PY" -m flax_minrnn eval --workdir "$workdir" "$@" | tail -n 1 \
    > "$workdir/evals/$name.json"
  echo "== eval $workdir [$name]: $(cat "$workdir/evals/$name.json")"
}

SC_COLUMNS=params,steps,tokens,eval_acc,best_eval_acc,threshold_step,threshold_wall,eval_loss,train_wall,end_to_end,tokens_per_sec

report() {  # report OUT_DIR [report.py args ...]
  local out=$1
  shift
  "$PY" experiments/report.py --out "$out" --readme "$out/README.md" "$@"
}

selective_copying_small() {
  local runs=() tm
  for tm in mingru minlstm glrnn; do
    train "configs/selective_copying_small.py:$tm" "$RUNS/selective_copying_small/$tm"
    runs+=("$tm=$RUNS/selective_copying_small/$tm")
  done
  report experiments/selective_copying --prefix small --threshold 0.99 --logy --columns "$SC_COLUMNS" \
    --title "Selective copying, T=72 (noise 64, 4 tokens, vocabulary 6)" "${runs[@]}"
}

ablation() {  # ablation ARG_SUFFIX PREFIX [key=value ...]: layers 1..3 x mingru/minlstm
  local suffix=$1 prefix=$2 runs=() tm layers wd
  shift 2
  for tm in mingru minlstm; do
    for layers in 1 2 3; do
      wd="$RUNS/selective_copying_$prefix/${tm}_${layers}"
      train "configs/selective_copying_ablation.py:$tm,$layers$suffix" "$wd" "$@"
      runs+=("$tm, $layers layer(s)=$wd")
    done
  done
  report experiments/selective_copying --prefix "$prefix" --threshold 0.99 --columns "$SC_COLUMNS" \
    --title "Selective copying layer ablation ($prefix)" "${runs[@]}"
}

selective_copying_ablation() { ablation "" ablation_cpu; }
# 2,500 steps leave 2 and 3 layers still improving: the same, 4x the steps.
selective_copying_ablation_10k() { ablation "" ablation_cpu10k train.num_steps=10000; }
selective_copying_ablation_gpu() { ablation ",gpu" ablation_gpu; }

shakespeare_runs() {  # [TMS="mingru ..."] shakespeare_runs ARG_SUFFIX PREFIX [key=value ...]
  local suffix=$1 prefix=$2 runs=() tm
  shift 2
  for tm in ${TMS:-mingru minlstm glrnn}; do
    train "configs/shakespeare_equal_params.py:$tm$suffix" "$RUNS/shakespeare_$prefix/$tm" "$@"
    # The whole validation split (the training-time eval may cover only its start).
    evaluate "$RUNS/shakespeare_$prefix/$tm" val_full data.eval_batches=100000
    runs+=("$tm=$RUNS/shakespeare_$prefix/$tm")
  done
  report experiments/shakespeare --prefix "$prefix" --eval-metric loss --loss-max 2.5 \
    --columns params,steps,tokens,eval_loss,evals,eval_acc,train_wall,end_to_end,tokens_per_sec \
    --title "Tiny Shakespeare char LM ($prefix)" "${runs[@]}"
}

shakespeare() { shakespeare_runs "" cpu; }
# The same models and recipe, twice the steps (the cosine schedule spans them).
shakespeare_2000() { shakespeare_runs "" cpu2000 train.num_steps=2000; }
# A 2.66M-parameter step toward 1.47 on the CPU (MinGRU only: half an hour each).
shakespeare_medium() { TMS=${TMS:-mingru} shakespeare_runs ",medium" medium; }
shakespeare_large() { shakespeare_runs ",large" large; }

parity_two_stage() {
  local runs=() tm stage wd
  for tm in mingru minlstm glrnn; do
    train "configs/parity_two_stage.py:$tm" "$RUNS/parity_two_stage/${tm}_stage1"
    train "configs/parity_two_stage.py:$tm,stage2" "$RUNS/parity_two_stage/${tm}_stage2" \
      "init_from.workdir=$RUNS/parity_two_stage/${tm}_stage1"
    # Controls: stage 2's fine-tuning but staying associative (what the extra
    # steps alone buy), and true recurrence from scratch (stage-1 recipe).
    train "configs/parity_two_stage.py:$tm,stage2" "$RUNS/parity_two_stage/${tm}_stage2assoc" \
      "init_from.workdir=$RUNS/parity_two_stage/${tm}_stage1" model.use_true_recurrence=false
    train "configs/parity_two_stage.py:$tm,scratch" "$RUNS/parity_two_stage/${tm}_scratch"
    # Stage 2 with the stage-1 recipe's budget (lr 3e-3, 2,000 steps).
    train "configs/parity_two_stage.py:$tm,stage2" "$RUNS/parity_two_stage/${tm}_stage2long" \
      "init_from.workdir=$RUNS/parity_two_stage/${tm}_stage1" optim.learning_rate=3e-3 \
      optim.warmup_steps=100 train.num_steps=2000
    for stage in stage1 stage2 stage2assoc stage2long scratch; do
      wd="$RUNS/parity_two_stage/${tm}_$stage"
      # Train lengths 1..40 and test lengths 40..256; every running-parity
      # target ("all") or only the parity of the whole string ("final").
      evaluate "$wd" acc_1-40_all data.task_kwargs.eval_min_len=1 data.task_kwargs.eval_max_len=40
      evaluate "$wd" acc_1-40_final data.task_kwargs.eval_min_len=1 data.task_kwargs.eval_max_len=40 \
        data.task_kwargs.running=False
      evaluate "$wd" acc_40-256_all
      evaluate "$wd" acc_40-256_final data.task_kwargs.running=False
      runs+=("$tm $stage=$wd")
    done
  done
  report experiments/two_stage_parity --facet --columns params,steps,evals,train_wall,end_to_end,tokens_per_sec \
    --title "Parity: associative (stage 1), fine-tuned with true recurrence (stage 2), true recurrence from scratch" "${runs[@]}"
}

# Issue 19: two-stage training against the true recurrence from scratch, on
# parity (configs/two_stage_parity.py). The recipe screen runs on MinGRU with
# seed 0; then scratch, today's recipe (zeros) and the screen's best run on
# seeds 0-2 for all three layers. TWO_STAGE_BEST overrides the pick.
two_stage() {
  local dir="$RUNS/two_stage" recipe tm seed best RECORD_FAILURES=1
  for recipe in scratch zeros lr random blend tbptt; do
    train "configs/two_stage_parity.py:mingru,$recipe" "$dir/mingru_${recipe}_seed0" seed=0
  done
  # The lr recipe's example multiplier (10) instead of the config's 3.
  train "configs/two_stage_parity.py:mingru,lr" "$dir/mingru_lr10_seed0" seed=0 \
    "two_stage.stage2=train.num_steps=1000,optim.recurrent_lr_multiplier=10"
  best=${TWO_STAGE_BEST:-$("$PY" experiments/two_stage/report.py best "$dir")}
  echo "== two_stage: the screen's best recipe is $best"
  for tm in mingru minlstm glrnn; do
    for seed in 0 1 2; do
      for recipe in scratch zeros "$best"; do
        train "configs/two_stage_parity.py:$tm,$recipe" "$dir/${tm}_${recipe}_seed$seed" "seed=$seed"
      done
    done
  done
  "$PY" experiments/two_stage/report.py report "$dir" --out experiments/two_stage
}

# Issue 19 on text: after stage 1 (configs/shakespeare.py at T = 256, 500
# updates), does a short stage 2 (configs/shakespeare_stage2.py, 100 updates)
# lower the validation loss below stage 1 continued for the same time? The
# continuation's number of updates comes from the two stages' measured
# throughput (equal seconds inside training steps). Seeds 0-2.
two_stage_shakespeare() {
  local dir n seed
  for seed in 0 1 2; do
    dir="$RUNS/two_stage_shakespeare/seed$seed"
    local s1=(data.seq_len=256 train.eval_every=50 train.log_every=25
              train.checkpoint_every=500 "seed=$seed")
    train configs/shakespeare.py "$dir/stage1" "${s1[@]}" train.num_steps=500
    train configs/shakespeare_stage2.py "$dir/stage2" "init_from.workdir=$dir/stage1" \
      data.seq_len=256 train.num_steps=100 train.eval_every=25 train.log_every=25 "seed=$seed"
    n=$("$PY" experiments/two_stage/report.py equal-steps "$dir")
    if [[ ! -d "$dir/continued" ]]; then
      cp -r "$dir/stage1" "$dir/continued"
      rm -f "$dir/continued/timing.json"
    fi
    train configs/shakespeare.py "$dir/continued" "${s1[@]}" "train.num_steps=$((500 + n))"
  done
  "$PY" experiments/two_stage/report.py shakespeare "$RUNS/two_stage_shakespeare" \
    --out experiments/two_stage
}

# Issue 19 on the S5 word problem (configs/two_stage_s5.py), MinGRU, seed 0:
# the true recurrence from scratch and both stages with zero U.
two_stage_s5() {
  local dir="$RUNS/two_stage_s5" recipe RECORD_FAILURES=1
  for recipe in scratch zeros; do
    train "configs/two_stage_s5.py:mingru,$recipe" "$dir/mingru_${recipe}_seed0" seed=0
  done
  "$PY" experiments/two_stage/report.py report "$dir" --out experiments/two_stage --name s5 \
    --title "S5 word problem, trained on 1..16 permutations, evaluated on 64..128"
}

CPU_EXPERIMENTS=(selective_copying_small shakespeare parity_two_stage two_stage
  two_stage_shakespeare two_stage_s5 shakespeare_2000 selective_copying_ablation
  selective_copying_ablation_10k shakespeare_medium)
GPU_EXPERIMENTS=(selective_copying_ablation_gpu shakespeare_large)

usage() {
  cat <<EOF
Usage: experiments/run_all.sh [-h | --help] [EXPERIMENT ...]

Runs each EXPERIMENT in the order given: its trainings (workdirs under
\$RUNS, default runs/; a finished run is skipped), then experiments/report.py,
which rewrites experiments/<name>/results.json, its plot and its README table.
With no EXPERIMENT, runs all the CPU experiments below, in this order: hours
of training on a 2-core CPU. \$PY (default: python) is the interpreter.

CPU experiments:
$(printf '  %s\n' "${CPU_EXPERIMENTS[@]}")
GPU-sized (run only when named):
$(printf '  %s\n' "${GPU_EXPERIMENTS[@]}")
EOF
}

for arg in "$@"; do
  if [[ $arg == -h || $arg == --help ]]; then
    usage
    exit 0
  fi
done
for arg in "$@"; do
  known=
  for name in "${CPU_EXPERIMENTS[@]}" "${GPU_EXPERIMENTS[@]}"; do
    [[ $arg == "$name" ]] && known=1
  done
  if [[ -z $known ]]; then
    echo "run_all.sh: unknown experiment '$arg' (experiments/run_all.sh --help lists them)" >&2
    exit 2
  fi
done
if [[ $# -eq 0 ]]; then
  set -- "${CPU_EXPERIMENTS[@]}"
fi
for experiment in "$@"; do
  "$experiment"
done
