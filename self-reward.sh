#!/usr/bin/env bash
# The self-rewarding loop: SFT once (M0), then for each iteration t = 1..N
#   01 prompts -> 02 responses -> 03 scores -> 04 preferences -> 05 DPO  (M<t-1> -> M<t>)
# A stage whose output is complete is skipped, so rerunning the same command resumes a run;
# once a stage has run, every later stage runs again on its fresh output.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: self-reward.sh [--config FILE] [--iterations N] [--run-dir DIR] [-- STAGE OVERRIDES...]

  --config FILE     run config (default: configs/smollm2-135m.yaml)
  --iterations N    self-rewarding iterations after SFT (default: 2): leaves M0 .. M<N>
  --run-dir DIR     where the run lives (default: runs/default)
  -- ARGS           passed to every stage, e.g. -- --judge.num_samples 2

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
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
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

# Hand a finished stage's outputs to Oxen (add, commit, push): the next issue fills this in.
sync_to_oxen() {
  :
}

skip_complete=1  # cleared as soon as one stage really runs: its successors must use its new output
run_stage() {
  local stage=$1; shift
  local flags=()
  [ "$skip_complete" = 1 ] && flags+=(--skip-if-complete)
  local rc=0
  "$python" "$here/scripts/$stage.py" --run-dir "$run_dir" "$@" ${flags[@]+"${flags[@]}"} \
    ${overrides[@]+"${overrides[@]}"} || rc=$?
  case "$rc" in
    0) skip_complete=0; sync_to_oxen "$stage" "$@" ;;
    10) ;;  # already complete: skipped
    3) echo "self-reward.sh: stopped at $stage $*: no preference pairs to train on (see the message above)" >&2
       exit 3 ;;
    *) echo "self-reward.sh: $stage $* failed with exit code $rc" >&2; exit "$rc" ;;
  esac
}

run_stage 00_sft
for ((t = 1; t <= iterations; t++)); do
  for stage in 01_gen_prompts 02_gen_responses 03_gen_scores 04_gen_preferences 05_dpo; do
    run_stage "$stage" --iteration "$t"
  done
done
echo "self-reward.sh: done: M0..M$iterations in $run_dir"
