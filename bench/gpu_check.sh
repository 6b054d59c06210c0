#!/usr/bin/env bash
# The GPU check: the CUDA paths of the loop on a real GPU, in a few minutes, with no internet.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--out DIR] [--python PY] [--device cpu]
#
# Needs PyTorch (a CUDA build), transformers, peft and accelerate; installs the rest (trl, datasets,
# bitsandbytes and their small dependencies, vllm if you have its wheel) from the wheels in DIR into
# OUT/site, without the network, and says which are still missing. Then:
#   0. fork: bench/cuda_fork_probe.py, whether a child forked after the project's GPU detection (as
#      vLLM forks its engine) can still use CUDA;
#   1. memory: bench/gpu_memory.py, a stand-in of Mistral-7B's real width (2 layers, built in the
#      process: no weights travel) measures the peak GPU memory of an SFT step, a DPO step and a
#      generation batch at configs/mistral-7b-qlora.yaml's settings, next to the dry run's estimate;
#   2. dry runs: ./self-reward.sh --dry-run of configs/mistral-7b-qlora.yaml, configs/qwen2.5-7b-qlora.yaml
#      and configs/mistral-7b-qlora-oasst.yaml (its data stood in) on this GPU (model.device cuda, 4-bit
#      through bitsandbytes' CUDA kernels), with the HF backend, and again with vLLM when it is installed;
#      configs/llama-3.1-70b-qlora.yaml, whose stand-in trains under accelerate launch with FSDP-QLoRA
#      (train.engine fsdp, one process: the part no CPU runs); and scripts/prepare_data.py --dry-run; all in
#      parallel.
# Prints one line per part (ok / FAILED with the log's tail) and exits 1 if any part failed. Logs and
# results are in OUT (default /tmp/gpu-check). On a machine without a GPU it says so and exits 0;
# --device cpu runs the same parts there (the memory step at a tiny width, nothing measured), to try
# the script itself before the GPU time is spent.
#
# Wheels for a machine without internet, fetched where pip works (Python 3.12 shown; match the box's):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any -d wheels \
#     trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 'dill<0.4.2' 'multiprocess<0.70.20'
# One block, read in full before it runs: editing this file while it runs does not change the run.
{
set -uo pipefail

usage() { sed -n '2,/^# One block/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels=
device=cuda
out=/tmp/gpu-check
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --python) python=${2:?--python needs an interpreter}; shift 2 ;;
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
cd "$here" || exit 2

memory_args=()
if [ "$device" = cpu ]; then
  gpu="the CPU (--device cpu)"
  memory_args=(--device cpu --width tiny --set sft.max_length=128 --set dpo.max_length=128
               --set responses.max_new_tokens=16 --set responses.batch_size=8)
else
  gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
fi
if [ -z "$gpu" ]; then
  echo "gpu_check: no CUDA GPU on this machine ($python: torch.cuda.is_available() is False or torch is missing); nothing to check"
  exit 0
fi
started=$(date +%s)
mkdir -p "$out"
echo "gpu_check: $gpu; logs in $out"

site="$out/site"
if [ -n "$wheels" ]; then
  shopt -s nullglob
  files=("$wheels"/*.whl)
  shopt -u nullglob
  if [ ${#files[@]} -eq 0 ]; then
    echo "gpu_check: no .whl files in $wheels"
  elif "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${files[@]}" >"$out/pip.log" 2>&1 || { echo "gpu_check: installing the wheels failed:"; tail -5 "$out/pip.log"; }
  else  # no pip in this interpreter: a wheel is a zip of the files to put on the path
    "$python" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$site" "${files[@]}" || echo "gpu_check: unpacking the wheels failed"
  fi
fi
export PYTHONPATH="$here:$site${PYTHONPATH:+:$PYTHONPATH}"
# Nothing is downloaded: a hub lookup would only hang or fail on a machine without internet.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SELF_REWARD_CACHE="$out/cache" PYTHON="$python" PYTHONUNBUFFERED=1

# What is installed; the parts that need a missing package are skipped and say so.
missing=$("$python" - <<'PY'
import importlib, sys
need = {"torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
        "trl": "trl", "datasets": "datasets", "bitsandbytes": "bitsandbytes", "yaml": "pyyaml",
        "tqdm": "tqdm", "safetensors": "safetensors", "vllm": "vllm"}
found, missing = [], []
for module, dist in need.items():
    try:
        found.append(f"{dist} {getattr(importlib.import_module(module), '__version__', '?')}")
    except Exception as exc:  # not installed, or installed and broken: both are missing here
        missing.append(dist)
        if not isinstance(exc, ModuleNotFoundError):
            print(f"gpu_check: {dist} does not import: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
print("gpu_check: found " + ", ".join(found), file=sys.stderr)
print(" ".join(missing))
PY
)
required_missing=$(echo "$missing" | tr ' ' '\n' | grep -v -x -e vllm -e '' | tr '\n' ' ')
if [ -n "$required_missing" ]; then
  echo "gpu_check: missing: ${required_missing}(put their wheels in a folder and pass --wheels DIR); the parts that need them fail"
fi
case " $missing " in *" vllm "*) vllm= ; echo "gpu_check: vllm is not installed: the dry runs use the HF backend only" ;; *) vllm=yes ;; esac

failed=0
report() {  # name, exit code, log
  if [ "$2" = 0 ]; then
    echo "gpu_check: $1: ok"
  else
    failed=1
    echo "gpu_check: $1: FAILED (exit code $2; log $3), its last lines:"
    tail -15 "$3" | sed 's/^/    /'
  fi
}

# 0. The engine-start question of vLLM: does the project's GPU detection leave a forked child CUDA?
if [ "$device" = cuda ]; then
  timeout 120 "$python" bench/cuda_fork_probe.py >"$out/fork_probe.log" 2>&1
  rc=$?
  sed 's/^/    /' "$out/fork_probe.log" | grep -E 'child:|gpu_present'
  report "a forked child (as vLLM forks its engine) can use CUDA after the project's GPU detection" "$rc" \
    "$out/fork_probe.log"
fi

# 1. Memory first and alone, so the card's counters see only this process.
timeout 150 "$python" bench/gpu_memory.py ${memory_args[@]+"${memory_args[@]}"} --out "$out/memory.json" \
  >"$out/memory.log" 2>&1
rc=$?
sed -n '/^gpu_memory: /,/^{/p' "$out/memory.log" | grep -v '^{'
report "memory of SFT, DPO and generation steps at Mistral-7B's width" "$rc" "$out/memory.log"

# 2. The dry runs, side by side: the two GPU profiles, the OASST profile before its data exists, and the
#    data builder (prepare_data.py --dry-run: SFT baseline, judging, EFT rows).
runs=("mistral-7b-qlora hf" "qwen2.5-7b-qlora hf" "mistral-7b-qlora-oasst hf" "llama-3.1-70b-qlora hf")
[ -n "$vllm" ] && runs+=("mistral-7b-qlora vllm" "qwen2.5-7b-qlora vllm")
pids=()
for run in "${runs[@]}"; do
  set -- $run
  name="dry-$1-$2"
  rm -rf "$out/$name"
  ( timeout 300 ./self-reward.sh --config "configs/$1.yaml" --dry-run --no-oxen --run-dir "$out/$name" \
      -- --generation.backend "$2" >"$out/$name.log" 2>&1; echo $? >"$out/$name.rc" ) &
  pids+=($!)
done
rm -rf "$out/dry-prepare-data"
( timeout 300 "$python" scripts/prepare_data.py --dry-run --no-oxen --config configs/mistral-7b-qlora.yaml \
    --out "$out/dry-prepare-data" >"$out/dry-prepare-data.log" 2>&1; echo $? >"$out/dry-prepare-data.rc" ) &
pids+=($!)
wait "${pids[@]}"
for run in "${runs[@]}"; do
  set -- $run
  name="dry-$1-$2"
  grep -E '^\[[0-9]{2}_[a-z_]+\] (iteration [0-9]+:|dry run: .* on (cuda|cpu))' "$out/$name.log" | sed "s/^/    /"
  report "dry run of configs/$1.yaml on $device, generation.backend $2" "$(cat "$out/$name.rc")" "$out/$name.log"
done
grep -E '^\[prepare_data\] [0-9]+ IFT rows' "$out/dry-prepare-data.log" | sed "s/^/    /"
report "prepare_data.py --dry-run on $device" "$(cat "$out/dry-prepare-data.rc")" "$out/dry-prepare-data.log"

echo "gpu_check: done in $(( $(date +%s) - started )) s; $( [ $failed = 0 ] && echo 'every part passed' || echo 'some parts FAILED' )"
exit $failed
}
