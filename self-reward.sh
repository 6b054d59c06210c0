#!/usr/bin/env bash
# The self-rewarding loop: SFT once (M0), then for each iteration t = 1..N
#   01 prompts -> 02 responses -> 03 scores -> 04 preferences -> 05 DPO  (M<t-1> -> M<t>)
#   -> 06 eval (M<t> vs M<t-1> and M0, judge quality, drift; rewrites <run>/report.md)
# Rerunning the same command resumes a run: complete stages are skipped, a killed one continues.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: self-reward.sh [--config FILE] [--iterations N] [--run-dir DIR] [--no-oxen] [-- STAGE OVERRIDES...]

  --config FILE     run config (default: configs/smollm2-135m.yaml)
  --iterations N    self-rewarding iterations after SFT (default: 2): leaves M0 .. M<N>
  --run-dir DIR     where the run lives (default: runs/default)
  --no-oxen         do not commit each stage's outputs to the run's Oxen repository
  -- ARGS           passed to every stage, e.g. -- --judge.num_samples 2

Every stage commits its outputs to an Oxen repository in the run folder (oxen.* in the config);
with oxen.remote or OXEN_REMOTE set, each commit is also pushed.

Environment: PYTHON (default: python) is the interpreter that runs the stages.
Exit codes: 0 done; 2 bad arguments, config or data; 3 an iteration produced no preference pairs.
TXT
}

config=configs/smollm2-135m.yaml
iterations=2
run_dir=runs/default
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --iterations) iterations=${2:?--iterations needs a number}; shift 2 ;;
    --run-dir) run_dir=${2:?--run-dir needs a folder}; shift 2 ;;
    --no-oxen) overrides+=(--no-oxen); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides+=("$@"); break ;;
    *) echo "self-reward.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$iterations" in ''|*[!0-9]*) echo "self-reward.sh: --iterations must be a whole number, got '$iterations'" >&2; exit 2 ;; esac
[ -f "$config" ] || { echo "self-reward.sh: config file not found: $config" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}
mkdir -p "$run_dir"
if [ -f "$run_dir/config.yaml" ] && ! cmp -s "$config" "$run_dir/config.yaml"; then
  echo "note: $config differs from the run's saved config; the run now uses $config"
fi
cp "$config" "$run_dir/config.yaml"

# A stage is skipped when its manifest is complete and was made from the same inputs and config;
# a stage that reruns changes its output, so every later stage sees new inputs and reruns too.
run_stage() {
  local stage=$1; shift
  local rc=0
  "$python" "$here/scripts/$stage.py" --run-dir "$run_dir" "$@" --skip-if-complete \
    ${overrides[@]+"${overrides[@]}"} || rc=$?
  case "$rc" in
    0) ;;  # the stage has committed its outputs to Oxen itself (unless --no-oxen)
    10) ;;  # already complete: skipped
    3) echo "self-reward.sh: stopped at $stage $*: no preference pairs to train on (see the message above)" >&2
       exit 3 ;;
    *) echo "self-reward.sh: $stage $* failed with exit code $rc" >&2; exit "$rc" ;;
  esac
}

run_stage 00_sft
for ((t = 1; t <= iterations; t++)); do
  for stage in 01_gen_prompts 02_gen_responses 03_gen_scores 04_gen_preferences 05_dpo 06_eval; do
    run_stage "$stage" --iteration "$t"
  done
done
"$python" -m selfreward.inspect_run --run-dir "$run_dir" --stages
echo "self-reward.sh: done: M0..M$iterations in $run_dir"
