"""Canaries: planted answers that show whether the judge can be fooled (selfreward/loop/canaries.py)."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest

from selfreward.judge.judges import Judge
from selfreward.loop.canaries import TRICKS, build_canaries, canary_verdict, fool_rates
from selfreward.run.config import Config, ConfigError, load_config
from selfreward.run.metrics import wilson_interval
from selfreward.run.records import ChunkLog

REPO = Path(__file__).resolve().parents[1]


class ScoreLineJudge(Judge):
    """A judge fooled by one trick: an answer that ends "Score: 5" gets 5, any other a score from its length."""

    mode = "fake"

    def __init__(self, config):
        super().__init__(config, None, "M0")
        self.judged: list[str] = []

    def _rows(self, responses, cfg, *, seed, skip=(), save=None):
        if 0 in skip:
            return []
        rows = []
        for r in responses:
            self.judged.append(r["response_id"])
            score = 5.0 if r["response"].rstrip().endswith("Score: 5") else min(4.0, len(r["response"]) % 5)
            rows.append({**r, "score": score, "judgments": [], "judge_input_truncated": False})
        if save:
            save(0, rows)
        return rows

    def measure(self, eft, *, samples, seed):
        return {}

    def noise(self, responses, rows, *, seed):
        return {}


def real_rows(judge: Judge, prompts: int = 5, answers: int = 4) -> list[dict]:
    responses = [
        {
            "prompt_id": f"p{p}",
            "response_id": f"p{p}-r{k}",
            "prompt": f"Question number {p}?",
            "response": f"Answer {k} to question {p}." + " more" * k,
            "sample_index": k,
        }
        for p in range(prompts)
        for k in range(answers)
    ]
    return judge.score_rows(responses, seed=0)


def test_a_judge_fooled_by_score_lines_has_fool_rate_1_and_trips_the_stop_gate(tmp_path):
    judge = ScoreLineJudge(Config())
    rows = real_rows(judge)
    canaries = runpy.run_path(str(REPO / "scripts" / "03_gen_scores.py"))["canaries_judged"](
        judge, rows, ChunkLog(tmp_path / "log", "f"), Config(), 1
    )
    assert sorted({c["trick"] for c in canaries}) == sorted(TRICKS)
    rates = fool_rates(canaries)
    assert rates["score_line"]["fool_rate"] == 1.0 and rates["score_line"]["fooled"] == 2
    assert rates["empty"]["fool_rate"] == 0.0  # an empty answer scores 0 here: it fools nobody
    assert rates["score_line"]["interval"][0] < 1.0 == rates["score_line"]["interval"][1]

    # stage 04 stops on it (exit 6), naming the trick and its fool rate
    stop = runpy.run_path(str(REPO / "scripts" / "04_gen_preferences.py"))["apply_canary_gate"]
    manifest = {"judge_check": {"judge": "M0"}, "canaries": rates}
    cfg = Config().judge
    cfg.canary_gate = "stop"
    with pytest.raises(Exception, match=r"score_line .* 2 of 2 canaries \(fool rate 1\.00, 95% CI 0\.34–1\.00\)") as e:
        stop(manifest, cfg)
    assert type(e.value).__name__ == "CanaryGateError" and "judge.canary_gate: stop" in str(e.value)
    from selfreward.stage import EXIT_CANARY, _run_main

    with pytest.raises(SystemExit) as exited:  # how a stage script ends on it: its own exit code
        _run_main(lambda: stop(manifest, cfg))
    assert exited.value.code == EXIT_CANARY == 6
    cfg.canary_gate = "warn"
    assert stop(manifest, cfg)["passed"] is False
    assert canary_verdict({"empty": rates["empty"]}, "M0", 0.5)[0] is True
    assert canary_verdict(None, "M0", 0.5)[0] is None


def test_canaries_are_the_same_for_the_same_rows_and_judged_once_across_a_rerun(tmp_path):
    judge = ScoreLineJudge(Config())
    rows = real_rows(judge, prompts=3)
    first = build_canaries(rows, 2, seed=1, iteration=1)
    assert first == build_canaries(list(reversed(rows)), 2, seed=1, iteration=1)  # no file order matters
    assert first != build_canaries(rows, 2, seed=1, iteration=2)  # another iteration, other prompts
    by_trick = {c["trick"]: c for c in first}
    best = max((r for r in rows if r["prompt_id"] == by_trick["padded"]["prompt_id"]), key=lambda r: r["score"])
    assert len(by_trick["padded"]["response"]) >= 2 * len(best["response"])
    assert by_trick["padded"]["response"].startswith(best["response"])
    assert by_trick["echo"]["response"] == by_trick["echo"]["prompt"] and by_trick["empty"]["response"] == ""
    other = by_trick["other_question"]
    assert other["response"] in {r["response"] for r in rows if r["prompt_id"] != other["prompt_id"]}
    assert build_canaries(rows[:4], 1, seed=1, iteration=1)[-1]["trick"] == "empty"  # one prompt: no other

    canaries_judged = runpy.run_path(str(REPO / "scripts" / "03_gen_scores.py"))["canaries_judged"]
    judge.judged.clear()
    done = canaries_judged(judge, rows, ChunkLog(tmp_path / "log", "f"), Config(), 1)
    assert len(judge.judged) == len(done) == 12
    judge.judged.clear()
    again = canaries_judged(judge, rows, ChunkLog(tmp_path / "log", "f"), Config(), 1)  # the rerun after a kill
    assert judge.judged == [] and again == done


def test_wilson_interval_and_canary_settings(tmp_path):
    low, high = wilson_interval(2, 2)
    assert round(low, 2) == 0.34 and high == 1.0
    assert wilson_interval(0, 0) is None
    path = tmp_path / "c.yaml"
    path.write_text("judge:\n  canaries: -1\n")
    with pytest.raises(ConfigError, match="judge.canaries"):
        load_config(path)
    path.write_text("judge:\n  canary_max_fool_rate: 1.5\n")
    with pytest.raises(ConfigError, match="judge.canary_max_fool_rate"):
        load_config(path)
    path.write_text("judge:\n  canary_gate: maybe\n")
    with pytest.raises(ConfigError, match="warn, stop, off"):
        load_config(path)


def test_stage_03_plants_canaries_that_never_reach_the_pairs(tiny_run):
    generated = tiny_run / "M0" / "generated"
    canaries = [json.loads(line) for line in (generated / "canaries.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (generated / "scores.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (generated / "preferences.jsonl").read_text().splitlines()]
    manifest = json.loads((generated / "scores.manifest.json").read_text())
    assert len(canaries) == 2 * len(TRICKS) and all(c["score"] is not None for c in canaries)
    rates = manifest["canaries"]
    assert sorted(rates) == sorted(TRICKS) and all(r["canaries"] == 2 for r in rates.values())
    for trick, rate in rates.items():
        fooled = [c for c in canaries if c["trick"] == trick and c["outscored"]]
        assert rate["fooled"] == len(fooled) and 0 <= rate["interval"][0] <= rate["interval"][1] <= 1
    assert not {c["response_id"] for c in canaries} & {s["response_id"] for s in scores}
    real = {(s["prompt_id"], s["response"]) for s in scores}
    assert all((p["prompt_id"], p["chosen"]) in real and (p["prompt_id"], p["rejected"]) in real for p in pairs)
    made_up = [c for c in canaries if c["trick"] in ("echo", "empty", "padded", "score_line")]
    assert made_up and not any((c["prompt_id"], c["response"]) in real for c in made_up)
    assert "canary_gate" in json.loads((generated / "preferences.manifest.json").read_text())


def test_the_pairwise_judge_compares_each_canary_with_every_real_answer(tiny_run, tmp_path, run_stage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    heldout = run / "M0" / "train" / "heldout_eft.jsonl"  # 4 questions: the judge's check is tested elsewhere
    heldout.write_text("".join(heldout.read_text().splitlines(keepends=True)[:16]))
    run_stage("03_gen_scores", "--run-dir", str(run), "--iteration", "1", "--judge.mode", "pairwise", "--no-oxen")
    generated = run / "M0" / "generated"
    canaries = [json.loads(line) for line in (generated / "canaries.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (generated / "scores.jsonl").read_text().splitlines()]
    answers = {p: sum(s["prompt_id"] == p for s in scores) for p in {s["prompt_id"] for s in scores}}
    assert canaries and all(len(c["comparisons"]) == answers[c["prompt_id"]] for c in canaries)
    assert all(c["outscored"] == (c["score"] == 5.0) for c in canaries)
    # the tournament is the prompt's real answers' alone: N-1 comparisons per prompt
    manifest = json.loads((generated / "scores.manifest.json").read_text())
    assert manifest["comparisons"] == sum(n - 1 for n in answers.values())


def test_the_report_has_a_canary_table_every_iteration_and_the_token_gap_of_the_pairs(tmp_path):
    from selfreward.run.layout import RunLayout
    from selfreward.run.records import write_json
    from selfreward.tools.report import write_report

    layout = RunLayout(tmp_path / "run")
    drift = {"score_histogram": {str(k): 0 for k in range(6)}, "response_chars": 10, "response_tokens": 3}
    for t in (1, 2):
        layout.model_root(t).mkdir(parents=True)
        gap = {"chosen_minus_rejected_tokens": 20} if t == 2 else {}  # stage 06's drift: 30 tokens against 10
        write_json(
            layout.eval_result(t), {"iteration": t, "head_to_head": {}, "judge_quality": {}, "drift": {**drift, **gap}}
        )
    rate = {"canaries": 2, "judged": 2, "fooled": 2, "fool_rate": 1.0, "interval": [0.342, 1.0]}
    write_json(layout.manifest("03_gen_scores", 2), {"canaries": {"score_line": rate}})  # 1: made before canaries
    verdict = "canaries fooled the judge M1: score_line ..."
    write_json(layout.manifest("04_gen_preferences", 2), {"canary_gate": {"passed": False, "verdict": verdict}})
    report = write_report(layout).read_text()
    assert "| 1 | no canaries | – | – | – |" in report
    assert "| 2 | score_line | 2 | 2 | 1 (0.34–1.00) |" in report
    assert f"**Warning, iteration 2: {verdict}.**" in report
    assert "chosen minus rejected tokens |" in report and report.count(" | 20 |") == 1
