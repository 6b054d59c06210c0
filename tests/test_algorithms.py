"""The seeds' other algorithms on the same stages, layout, resume and Oxen history: SPIN and RAFT."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, stage_env

from selfreward.run.config import OxenConfig
from selfreward.run.layout import RunLayout
from selfreward.run.stages import ITERATION_STAGES
from selfreward.run.versioning import committed_commit


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("algorithm", "crashes"),
    [
        # killed before 04's Oxen commit in iteration 1, then a crash on the way out of 05 in iteration 2
        ("spin", "04_spin_pairs:1:after_summary,05_dpo:2:at_exit"),
        ("raft", "05_raft_sft:1:after_summary,04_raft_select:2:at_exit"),
    ],
)
def test_an_algorithm_runs_two_iterations_resumes_after_a_kill_and_commits_every_stage(
    algorithm, crashes, cache, tmp_path
):
    run = tmp_path / algorithm
    layout = RunLayout(run)
    env = dict(stage_env(cache), SELFREWARD_CRASH_ONCE=str(tmp_path / "fired"), SELFREWARD_CRASH_AT=crashes)
    command = ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--iterations", "2",
               "--run-dir", str(run), "--algorithm", algorithm]  # fmt: skip
    killed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr[-3000:]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "its Oxen commit was missing and is made now (recovered)" in done.stdout
    assert "crashed (exit code 139)" in done.stderr and "had finished and committed its work" in done.stderr

    stages = [("00_sft", 0)] + [(s, t) for t in (1, 2) for s in ITERATION_STAGES[algorithm]]
    for stage, t in stages:
        assert json.loads(layout.manifest(stage, t).read_text())["complete"], (stage, t)
        assert committed_commit(OxenConfig(), layout, stage, t), (stage, t)
    assert "algorithm: " + algorithm in layout.config.read_text()
    human = {r["prompt"]: r["completion"] for r in read(layout.train_dir(0) / "ift.jsonl")}
    heldout = {r["prompt"] for r in read(layout.heldout("prompts"))}
    for t in (1, 2):
        prompts = read(layout.generated(t, "prompts"))
        assert prompts and all(p["prompt"] in human and p["prompt"] not in heldout for p in prompts)
        lineage = json.loads(layout.lineage(t).read_text())
        if algorithm == "spin":
            pairs = read(layout.generated(t, "preferences"))
            assert len(read(layout.generated(t, "responses"))) == len(prompts)  # one own answer each
            assert pairs and all(p["chosen"] == human[p["prompt"]] and p["score_chosen"] is None for p in pairs)
            assert lineage["stage"] == "05_dpo"
        else:
            scores = read(layout.generated(t, "scores"))
            kept = read(layout.generated(t, "selected"))
            assert len(scores) == 4 * len(prompts)  # raft.samples_per_prompt
            per_prompt = math.ceil(0.25 * 4)
            assert len(kept) == per_prompt * len(prompts)  # local ranking: the best of each prompt
            best = {}
            for s in scores:
                best[s["prompt_id"]] = max(best.get(s["prompt_id"], -1e9), s["score"])
            assert all(k["score"] == best[k["prompt_id"]] for k in kept)
            assert lineage["stage"] == "05_raft_sft" and read(layout.train_dir(t) / "selected.jsonl") == kept
        assert (layout.model(t) / "config.json").is_file() and layout.eval_result(t).is_file()
    table = subprocess.run(
        [sys.executable, "-m", "selfreward.tools.inspect_run", "--run-dir",
         str(run), "--stages"], cwd=REPO, env=env, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert ITERATION_STAGES[algorithm][0] in table and "(not run)" not in table


def test_raft_keeps_the_best_answers_after_the_discard_filter():
    from types import SimpleNamespace

    from selfreward.loop.raft import select

    def row(pid, k, score, text="a fine answer here", finish="eos"):
        return {"prompt_id": pid, "response_id": f"{pid}-r{k}", "prompt": pid, "response": text,
                "sample_index": k, "score": score, "finish_reason": finish}  # fmt: skip

    scored = [
        row("p", 0, 1.0), row("p", 1, 4.0, finish="length"), row("p", 2, 3.0), row("p", 3, 3.0),
        row("q", 0, 0.5, text=" "), row("q", 1, 5.0, text="yes yes yes yes yes yes"), row("q", 2, 2.0),
        row("q", 3, None),
    ]  # fmt: skip
    cfg = SimpleNamespace(keep=0.25, ranking="local", keep_cut_off=False, min_distinct_2=0.5)
    kept, discarded = select(scored, cfg)
    assert [k["response_id"] for k in kept] == ["p-r2", "q-r2"]  # the cut-off 4.0 and repetitive 5.0 never count
    assert discarded == {"cut_off": 1, "empty": 1, "repetitive": 1, "unscored": 1}
    globally, _ = select(scored, SimpleNamespace(**{**vars(cfg), "ranking": "global", "keep": 0.375}))
    assert [k["response_id"] for k in globally] == ["p-r2", "p-r3", "q-r2"]  # the top 3 of all 8 that pass


def test_the_comparison_report_puts_runs_side_by_side(tmp_path):
    from selfreward.run.records import write_json
    from selfreward.tools.report import main

    for name, algorithm, wins in (("a", "srlm", 3), ("b", "spin", 5)):
        layout = RunLayout(tmp_path / name)
        layout.model_root(1).mkdir(parents=True)
        layout.config.write_text(f"algorithm: {algorithm}\n")
        h2h = {"prompts": 8, "wins": wins, "ties": 1, "losses": 7 - wins, "win_rate": wins / 8, "position_bias": 0.1}
        drift = {"response_chars": 100 + wins, "distinct_2": 0.5}
        result = {"iteration": 1, "judge_model": str(layout.model(1)), "head_to_head": {"M1 vs M0": h2h},
                  "judge_quality": {}, "drift": drift}  # fmt: skip
        write_json(layout.eval_result(1), result)
    out = tmp_path / "compare.md"
    assert main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| a (srlm) | 1 | M1 vs M0 | M1 | 3 | 1 | 4 | 0.375 |" in text
    assert "| b (spin) | 1 | M1 vs M0 | M1 | 5 | 1 | 2 | 0.625 |" in text
    assert "| b (spin) | 1 | – | 105 |" in text  # drift: tokens unknown, then the characters
    with pytest.raises(SystemExit):
        main(["--runs", str(tmp_path / "missing"), str(tmp_path / "a")])
