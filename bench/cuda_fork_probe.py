"""Does asking about CUDA in a parent process break CUDA in a forked child? (issue 21, item 1)

    python bench/cuda_fork_probe.py        # on a GPU box; bench/gpu_check.sh runs it

vLLM forks its engine process unless torch marks CUDA initialised in the parent. Each case runs in a
fresh process: the parent asks torch (or the project) one question about the GPU, forks, and the child
allocates on CUDA. Seen on an H200 with torch 2.11 (bench/RESULTS.md): after torch.cuda.is_available()
the child fails ("Cannot re-initialize CUDA in forked subprocess"); after torch.cuda.device_count(), or
nothing, it works. Exits 1 if the project's own detection (gpu_present, choose_backend, dry_device)
leaves the child without CUDA.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASE = r"""
import os, sys, torch
how = sys.argv[1]
if how == "is_available":
    torch.cuda.is_available()
elif how == "device_count":
    torch.cuda.device_count()
elif how == "nvml_is_available":
    torch.cuda.is_available()  # with PYTORCH_NVML_BASED_CUDA_CHECK=1 in the environment
elif how == "selfreward":
    from selfreward.run.config import load_config
    from selfreward.dryrun import dry_device
    from selfreward.model.backends import choose_backend
    from selfreward.model.models import gpu_present
    print(how, "gpu_present:", gpu_present(), "choose_backend(auto):", choose_backend("auto"),
          "dry_device:", dry_device(load_config("configs/mistral-7b-qlora.yaml")), flush=True)
print(how, "parent is_initialized:", torch.cuda.is_initialized(), flush=True)
pid = os.fork()
if pid == 0:
    try:
        torch.zeros(1, device="cuda")
        print(how, "child: CUDA works after fork", flush=True)
        os._exit(0)
    except Exception as exc:
        print(how, "child:", type(exc).__name__, str(exc).splitlines()[0][:200], flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
sys.exit(status >> 8)
"""


def main() -> int:
    codes = {}
    for how in ("nothing", "is_available", "device_count", "nvml_is_available", "selfreward"):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if how == "nvml_is_available":
            env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        proc = subprocess.run([sys.executable, "-c", CASE, how], cwd=REPO, env=env, capture_output=True, text=True)
        print(proc.stdout.strip() or f"{how}: no output; {proc.stderr.strip()[-300:]}", flush=True)
        codes[how] = proc.returncode
    return 1 if codes["selfreward"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
