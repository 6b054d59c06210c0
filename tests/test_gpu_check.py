"""bench/gpu_check.sh and bench/gpu_memory.py: the GPU check, run here as far as a CPU can run it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stage_env

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(cache):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run bash bench/gpu_check.sh itself")
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--python", sys.executable],
        cwd=REPO, env=stage_env(cache), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        f"gpu_check: no CUDA GPU on this machine ({sys.executable}: torch.cuda.is_available() is False or torch "
        "is missing); nothing to check"
    ]


def test_the_memory_check_runs_each_step_through_the_projects_code_on_the_cpu(cache, tmp_path):
    # The CUDA part of the GPU check with device cpu: the same stand-in (Mistral-7B's architecture, 2 layers,
    # at a tiny width here), the same QLoRA settings, the same trainers and backend; nothing is measured.
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_memory.py"), "--device", "cpu", "--width", "tiny",
         "--set", "sft.max_length=96", "--set", "dpo.max_length=96", "--set", "responses.max_new_tokens=8",
         "--set", "responses.batch_size=8", "--out", str(out)],
        cwd=REPO, env=stage_env(cache), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["model"] == "mistralai/Mistral-7B-v0.1"
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["sft", "dpo", "generate"]
    for step in steps.values():
        assert step["estimate_gib"] > 0 and step["allocated_gib"] is None and step["ratio"] is None
    assert "4-bit" in steps["sft"]["what"] and "checkpointing" in steps["sft"]["what"]  # the config's QLoRA settings
    assert math.isfinite(steps["sft"]["loss"]) and math.isfinite(steps["dpo"]["loss"])
    assert steps["generate"]["tokens"] == 8 * 8  # 2 prompts x 4 samples, each forced to 8 new tokens
    assert "step      estimate allocated" in proc.stdout
