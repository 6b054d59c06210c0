#!/usr/bin/env bash
# The self-rewarding loop: SFT once (M0), then for each iteration t = 1..N
#   01 prompts -> 02 responses -> 03 scores -> 04 preferences -> 05 DPO  (M<t-1> -> M<t>)
#   -> 06 eval (M<t> vs M<t-1> and M0, judge quality, drift; rewrites <run>/report.md)
# or, with --algorithm, SPIN (01 SFT prompts -> 02 -> 04 human vs own pairs -> 05 DPO -> 06) or RAFT
# (01 SFT prompts -> 02 -> 03 -> 04 keep the best -> 05 SFT on them -> 06) on the same run layout.
# Rerunning the same command resumes a run: complete stages are skipped (their Oxen commit made up if
# a kill came between the stage's end and its commit), a killed one continues where it stopped.
# The whole script is one block, which bash reads in full before it runs any of it: a driver that runs for
# hours then never executes lines of a newer version of this file (a git pull or checkout meanwhile).
{
set -euo pipefail

usage() {
  cat <<'TXT'
usage: self-reward.sh [--config FILE] [--iterations N] [--run-dir DIR] [--algorithm srlm|spin|raft]
                      [--num-processes N] [--gpu-memory GB] [--nnodes N --node-rank R --master-addr HOST
                      --master-port P] [--no-oxen] [--dry-run] [-- STAGE OVERRIDES...]

  --config FILE     run config (default: configs/smollm2-135m.yaml)
  --iterations N    self-rewarding iterations after SFT (default: 2): leaves M0 .. M<N>
  --run-dir DIR     where the run lives (default: runs/default)
  --algorithm A     srlm (self-rewarding, the default), spin (DPO on the SFT answers against the
                    model's own) or raft (fine-tune on the best-judged of several answers); the same as
                    -- --algorithm A, recorded in the run's config.yaml
  --num-processes N train stages 00 and 05 as N processes, one per GPU, sharing the config's global batch
                    (batch_size x grad_accum, which N must divide): train.engine ddp runs them under
                    torchrun (gloo on a CPU), fsdp and deepspeed under accelerate launch with
                    configs/accelerate/; rank 0 alone writes, merges and commits (default: 1)
  --gpu-memory GB   refuse the config before anything runs unless the dry run's memory table fits
                    --num-processes GPUs of GB each (a 70B profile on one 24 GB card, say)
  --nnodes N, --node-rank R, --master-addr HOST, --master-port P
                    several machines, the same command on each (R = 0 .. N-1; HOST:P reaches node 0;
                    defaults 1, 0, 127.0.0.1, 29500; under SLURM with several nodes they come from
                    SLURM_NNODES, SLURM_NODEID, the job's first host and MASTER_PORT). The run folder must be
                    on storage every node sees. Stages 00 and 05 train as one group of N x --num-processes;
                    stages 01-03 share their batches among the nodes, node 0 joins the parts (the same
                    rows in the same order as on one node) and alone writes, merges and commits; the other
                    stages run on node 0 while the others wait
  --no-oxen         do not commit each stage's outputs to the run's Oxen repository
  --dry-run         check the config before renting a GPU: one iteration on this machine's CPU with every
                    setting of the config but a tiny random model of the same architecture, printing
                    the real model's estimated memory per stage (default run folder: runs/dry-run-NAME)
  -- ARGS           config overrides for this run, e.g. -- --judge.num_samples 2; they are written
                    into the run's config.yaml, so stages rerun by hand later see them too

Every stage commits its outputs to an Oxen repository in the run folder (oxen.* in the config);
with oxen.remote or OXEN_REMOTE set, the commits are pushed in the background while the stages go on,
and the end waits up to oxen.final_push_wait_seconds for them, then says what is not pushed yet.
One process writes a run folder at a time: a second driver (or a stage run by hand) on the same
folder is refused with a line that names the one at work.

Environment: PYTHON (default: python) is the interpreter that runs the stages.
Exit codes: 0 done; 2 bad arguments, config or data, a full disk or unwritable folder, commits still
unpushed at the end with oxen.strict; 3 an iteration produced no preference pairs (RAFT: kept no answer);
4 the judge is not better than chance (judge.gate: stop); 5 the run folder is in use by another process;
6 canaries fooled the judge (judge.canary_gate: stop).
TXT
}

config=configs/smollm2-135m.yaml
iterations=2
run_dir=
num_processes=1
nnodes=
node_rank=0
master_addr=127.0.0.1
master_port=29500
gpu_memory=
dry_run=
overrides=()
algorithm_flag=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --iterations) iterations=${2:?--iterations needs a number}; shift 2 ;;
    --run-dir) run_dir=${2:?--run-dir needs a folder}; shift 2 ;;
    --algorithm) algorithm_flag=(--algorithm "${2:?--algorithm needs srlm, spin or raft}"); shift 2 ;;
    --num-processes) num_processes=${2:?--num-processes needs a number}; shift 2 ;;
    --gpu-memory) gpu_memory=${2:?--gpu-memory needs a number of GB}; shift 2 ;;
    --nnodes) nnodes=${2:?--nnodes needs a number}; shift 2 ;;
    --node-rank) node_rank=${2:?--node-rank needs a number}; shift 2 ;;
    --master-addr) master_addr=${2:?--master-addr needs a host}; shift 2 ;;
    --master-port) master_port=${2:?--master-port needs a port}; shift 2 ;;
    --no-oxen) overrides+=(--no-oxen); shift ;;
    --dry-run) dry_run=--dry-run; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides+=("$@"); break ;;
    *) echo "self-reward.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$iterations" in ''|*[!0-9]*) echo "self-reward.sh: --iterations must be a whole number, got '$iterations'" >&2; exit 2 ;; esac
case "$num_processes" in ''|*[!0-9]*|0) echo "self-reward.sh: --num-processes must be a whole number from 1, got '$num_processes'" >&2; exit 2 ;; esac
case "$gpu_memory" in *[!0-9]*) echo "self-reward.sh: --gpu-memory must be a whole number of GB, got '$gpu_memory'" >&2; exit 2 ;; esac
if [ -z "$nnodes" ] && [ "${SLURM_NNODES:-1}" -gt 1 ] 2>/dev/null; then  # a SLURM job on several nodes
  nnodes=$SLURM_NNODES
  node_rank=${SLURM_NODEID:-0}
  master_addr=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1 || true)
  master_addr=${master_addr:-127.0.0.1}
  master_port=${MASTER_PORT:-$master_port}
fi
nnodes=${nnodes:-1}
for pair in "--nnodes:$nnodes" "--node-rank:$node_rank" "--master-port:$master_port"; do
  case "${pair#*:}" in ''|*[!0-9]*) echo "self-reward.sh: ${pair%%:*} must be a whole number, got '${pair#*:}'" >&2; exit 2 ;; esac
done
if [ "$nnodes" -lt 1 ] || [ "$node_rank" -ge "$nnodes" ]; then
  echo "self-reward.sh: --node-rank $node_rank is not one of the $nnodes nodes (0 .. $((nnodes - 1)))" >&2; exit 2
fi
[ -f "$config" ] || { echo "self-reward.sh: config file not found: $config" >&2; exit 2; }
if [ -n "$dry_run" ] && [ "$nnodes" -gt 1 ]; then
  echo "self-reward.sh: --dry-run runs on one machine; leave out --nnodes" >&2; exit 2
fi
if [ -n "$dry_run" ]; then
  iterations=1
  run_dir=${run_dir:-runs/dry-run-$(basename "$config" .yaml)}
fi
run_dir=${run_dir:-runs/default}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}

# One driver per run folder. Descriptor 9 stays open for the driver's life and is inherited by the
# stages it starts (selfreward/run/runlock.py): the lock ends when the last of them exits, however it exits.
# On several nodes node 0's driver holds it; the others write only their parts (selfreward/run/nodes.py).
export SELFREWARD_NNODES=$nnodes SELFREWARD_NODE_RANK=$node_rank
mkdir -p "$run_dir/.selfreward" 2>/dev/null || { echo "self-reward.sh: error: cannot write the run folder $run_dir" >&2; exit 2; }
if [ "$node_rank" = 0 ]; then
  { exec 9<>"$run_dir/.selfreward/lock"; } 2>/dev/null \
    || { echo "self-reward.sh: error: cannot write the run folder $run_dir" >&2; exit 2; }
  SELFREWARD_RUN_LOCK=$("$python" -m selfreward.run.runlock --run-dir "$run_dir" --fd 9 --pid $$)
  export SELFREWARD_RUN_LOCK
fi

"$python" -m selfreward.stage config --config "$config" --out "$run_dir/config.yaml" -- \
  ${overrides[@]+"${overrides[@]}"} ${algorithm_flag[@]+"${algorithm_flag[@]}"}
stages=$("$python" -m selfreward.run.stages --config "$run_dir/config.yaml")  # one iteration's, in order
training_stages=$("$python" -m selfreward.run.stages --training)
if [ $((num_processes * nnodes)) -gt 1 ]; then
  # The processes share the config's global batch (batch_size x grad_accum): refused now if they cannot,
  # not in stage 05 after an iteration's generation.
  "$python" -m selfreward.stage config --config "$run_dir/config.yaml" --processes $((num_processes * nnodes))
fi
if [ -n "$dry_run" ] || [ -n "$gpu_memory" ]; then
  # Every setting that cannot work, and the memory table (and with --gpu-memory the node), before anything runs.
  "$python" -m selfreward.dryrun --config "$run_dir/config.yaml" \
    ${gpu_memory:+--gpus "$num_processes" --gpu-memory "$gpu_memory"}
fi
if [ -z "$dry_run" ] && [ "$node_rank" = 0 ]; then
  # The merge after every training stage loads the parent on this host (rank 0's): refused now if it cannot.
  "$python" -m selfreward.dryrun --config "$run_dir/config.yaml" --host-ram
fi
# How the training stages start (selfreward/launch.py): nothing (one plain process), torchrun, or accelerate launch.
launch_words=$("$python" -m selfreward.launch --config "$run_dir/config.yaml" --processes "$num_processes" $dry_run \
  --nnodes "$nnodes" --node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
launcher=()
[ -z "$launch_words" ] || mapfile -t launcher <<<"$launch_words"

# Start a stage and return its exit code. Under a launcher (torchrun, accelerate launch) the training stages
# exit 1 whatever went wrong in a rank; rank 0 writes its own exit code (skipped, no pairs, bad input...) to a
# file (SELFREWARD_EXIT_FILE, selfreward/stage.py) and that code counts.
start_stage() {
  local stage=$1; shift
  if [ "${#launcher[@]}" -gt 0 ] && [[ " $training_stages " == *" $stage "* ]]; then
    local exit_file="$run_dir/.selfreward/exit-code" rc=0
    [ "$node_rank" = 0 ] || exit_file+=".node$node_rank"  # rank 0 writes node 0's; the others' stay empty
    rm -f "$exit_file"
    SELFREWARD_EXIT_FILE="$exit_file" "${launcher[@]}" "$here/scripts/$stage.py" --run-dir "$run_dir" $dry_run "$@" || rc=$?
    if [ -s "$exit_file" ]; then rc=$(cat "$exit_file"); rm -f "$exit_file"; fi
    return "$rc"
  fi
  "$python" "$here/scripts/$stage.py" --run-dir "$run_dir" $dry_run "$@"
}

# Run a stage unless its manifest is complete and was made from the same inputs and config (a stage
# that reruns changes its output, so every later stage sees new inputs and reruns too). A crash by a
# signal (say SIGSEGV on the way out) is checked by running the stage once more: a stage that had
# finished and committed its work is skipped by that run, one that had not resumes.
run_stage() {
  local stage=$1; shift
  local rc=0
  start_stage "$stage" "$@" --skip-if-complete || rc=$?
  case "$rc" in
    130|137|143) ;;  # interrupted, killed or terminated: somebody means it to stop
    129|1[3-9][0-9]|2[0-9][0-9])
      echo "self-reward.sh: warning: $stage $* crashed (exit code $rc); running it again to check its work" >&2
      rc=0
      start_stage "$stage" "$@" --skip-if-complete || rc=$?
      if [ "$rc" = 10 ]; then
        echo "self-reward.sh: warning: $stage $* had finished and committed its work before it crashed; going on" >&2
      fi ;;
  esac
  case "$rc" in
    0) ;;  # the stage has committed its outputs to Oxen itself (unless --no-oxen)
    10) ;;  # already complete (and committed): skipped
    3) what="no preference pairs"; [ "$stage" = 05_raft_sft ] && what="no kept answers"
       echo "self-reward.sh: stopped at $stage $*: $what to train on (see the message above)" >&2
       exit 3 ;;
    4) echo "self-reward.sh: stopped at $stage $*: the judge is not better than chance (judge.gate: stop)" >&2
       exit 4 ;;
    6) echo "self-reward.sh: stopped at $stage $*: canaries fooled the judge (judge.canary_gate: stop)" >&2
       exit 6 ;;
    *) echo "self-reward.sh: $stage $* failed with exit code $rc" >&2; exit "$rc" ;;
  esac
}

run_stage 00_sft
for ((t = 1; t <= iterations; t++)); do
  for stage in $stages; do
    run_stage "$stage" --iteration "$t"
  done
done
if [ "$node_rank" != 0 ]; then
  echo "self-reward.sh: node $node_rank of $nnodes done: node 0 wrote M0..M$iterations in $run_dir"
  exit 0
fi
"$python" -m selfreward.tools.inspect_run --run-dir "$run_dir" --stages
if [ -n "$dry_run" ]; then
  echo "self-reward.sh: dry run done: every stage ran with the settings of $config on a stand-in model, in $run_dir"
else
  echo "self-reward.sh: done: M0..M$iterations in $run_dir"
fi
# The stages left pushing to a remote in the background: wait a bounded time, then one line says whether
# every commit is pushed, or what is not and the command that pushes it later.
"$python" -m selfreward.run.versioning --wait --run-dir "$run_dir"
exit
}
