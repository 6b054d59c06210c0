"""What canaries cost stage 03 on the CPU demo (configs/smollm2-135m.yaml): stage 03 of iteration 1 run with
judge.canaries 0 and with the default, in turn, on the same answers; the stage's time from its manifest.

M0 is made with a short SFT (--sft-steps, default 2, instead of the demo's 25): what stage 03 costs depends
on the model's size, the answers' lengths and the judge settings, not on how well M0 judges.

    PYTHONPATH=. .venv/bin/python bench/canaries.py --run-dir /tmp/canary-bench --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage(name: str, run_dir: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "scripts" / f"{name}.py"), "--run-dir", str(run_dir), "--no-oxen", *args]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def stage_03_seconds(run_dir: Path, canaries: int) -> tuple[float, dict]:
    generated = run_dir / "M0" / "generated"
    for name in ("scores.manifest.json", "scores.partial.jsonl"):
        (generated / name).unlink(missing_ok=True)
    stage("03_gen_scores", run_dir, "--iteration", "1", "--judge.canaries", str(canaries))
    manifest = json.loads((generated / "scores.manifest.json").read_text())
    return manifest["seconds"], manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/canary-bench"))
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sft-steps", type=int, default=2)
    parser.add_argument("--canaries", type=int, default=2, help="judge.canaries to compare with 0")
    args = parser.parse_args()
    run_dir = args.run_dir
    if not (run_dir / "M0" / "generated" / "responses.manifest.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        config = ["--config", args.config, "--out", str(run_dir / "config.yaml")]
        overrides = ["--", "--sft.max_steps", str(args.sft_steps)]
        command = [sys.executable, "-m", "selfreward.stage", "config", *config, *overrides]
        subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
        stage("00_sft", run_dir)
        stage("01_gen_prompts", run_dir, "--iteration", "1")
        stage("02_gen_responses", run_dir, "--iteration", "1")
    times: dict[int, list[float]] = {0: [], args.canaries: []}
    for _ in range(args.rounds):
        for n in times:
            seconds, manifest = stage_03_seconds(run_dir, n)
            times[n].append(seconds)
            print(f"judge.canaries {n}: stage 03 {seconds:.1f} s", flush=True)
    without, with_ = statistics.median(times[0]), statistics.median(times[args.canaries])
    answers = manifest["rows_in"]
    heldout = (manifest["judge_check"].get("heldout") or {}).get("rows", 0)
    planted = sum(r["canaries"] for r in manifest.get("canaries", {}).values())
    print(
        f"{answers} answers, {heldout} held-out rows, {planted} canaries; median of {args.rounds}: "
        f"{without:.1f} s without, {with_:.1f} s with: +{100 * (with_ - without) / without:.1f}%"
    )


if __name__ == "__main__":
    main()
