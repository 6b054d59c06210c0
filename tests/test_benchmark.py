"""The fixed yardstick (eval.benchmark): reading and preparing benchmark files, the win rate and the
length-controlled win rate against known answers, and the answer files AlpacaEval and MT-Bench read."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from selfreward.loop.benchmark import (
    alpaca_eval_outputs,
    fit_length_glm,
    from_alpaca_eval,
    from_mt_bench,
    judged_rows,
    length_controlled_win_rate,
    mt_bench_answers,
    read_benchmark,
    win_rates,
)
from selfreward.run.records import RecordError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def synthetic(n: int, slope: float, intercept: float, seed: int = 0, longer_by: float = 800):
    """Answers mostly longer than their references; the win probability depends on the length difference
    only through `slope` (AlpacaEval's term, tanh of the standardised difference) and on `intercept`."""
    rng = random.Random(seed)
    differences = [rng.gauss(longer_by, 400) for _ in range(n)]
    mean = sum(differences) / n
    std = (sum((d - mean) ** 2 for d in differences) / (n - 1)) ** 0.5
    probability = [sigmoid(intercept + slope * math.tanh(d / std)) for d in differences]
    return differences, probability, rng


def test_length_glm_recovers_known_coefficients_from_exact_probabilities():
    differences, probability, _ = synthetic(400, slope=2.5, intercept=0.0)
    intercept, slope = fit_length_glm(probability, differences)
    assert intercept == pytest.approx(0.0, abs=0.01) and slope == pytest.approx(2.5, abs=0.02)
    raw = sum(probability) / len(probability)
    lc = length_controlled_win_rate(probability, [1000 + d for d in differences], [1000] * len(differences))
    assert raw > 0.75 and lc == pytest.approx(0.5, abs=0.01)  # the whole advantage was length
    _, shifted = synthetic(400, slope=2.5, intercept=0.8)[:2]
    lc = length_controlled_win_rate(shifted, [1000 + d for d in differences], [1000] * len(differences))
    assert lc == pytest.approx(sigmoid(0.8), abs=0.01)  # the advantage beyond length survives


def test_length_controlled_win_rate_on_sampled_verdicts():
    differences, probability, rng = synthetic(4000, slope=3.0, intercept=0.0, seed=1, longer_by=300)
    wins = [1.0 if rng.random() < p else 0.0 for p in probability]
    lc = length_controlled_win_rate(wins, [500 + d for d in differences], [500] * len(wins))
    assert sum(wins) / len(wins) > 0.7 and lc == pytest.approx(0.5, abs=0.04)
    # no length effect at all: the length-controlled rate is the raw one
    unrelated = [1.0 if rng.random() < 0.7 else 0.5 if rng.random() < 0.3 else 0.0 for _ in wins]
    raw = sum(unrelated) / len(unrelated)
    lc = length_controlled_win_rate(unrelated, [500 + d for d in differences], [500] * len(wins))
    assert lc == pytest.approx(raw, abs=0.02)


def test_length_glm_stays_finite_when_every_prompt_is_won_or_lengths_agree():
    assert 0.95 < length_controlled_win_rate([1.0] * 10, list(range(10)), [0] * 10) < 1.0
    assert length_controlled_win_rate([1.0, 0.0, 0.5, 1.0], [5] * 4, [5] * 4) == pytest.approx(0.625, abs=3e-3)
    assert length_controlled_win_rate([], [], []) is None


def rows_of(prefs_and_lengths):
    verdict = {1.0: "win", 0.5: "tie", 0.0: "loss"}
    return [
        {"id": k, "verdict": verdict[p], "preference": p, "answer_chars": a, "reference_chars": r}
        for k, (p, a, r) in enumerate(prefs_and_lengths)
    ]


def test_win_rates_with_intervals_count_ties_half_and_are_seeded():
    # every length wins, ties and loses alike: no length effect to take out
    records = rows_of([(p, a, 100) for a in (80, 100, 120, 150) for p in (1.0, 1.0, 0.5, 0.0)] * 3)
    found = win_rates(records, samples=300, seed=5)
    assert (found["prompts"], found["wins"], found["ties"], found["losses"]) == (48, 24, 12, 12)
    assert found["win_rate"] == 0.625
    low, high = found["intervals"]["win_rate"]
    assert low < 0.625 < high and 0.4 < low and high < 0.8
    assert found["lc_win_rate"] == pytest.approx(0.625, abs=0.01)
    low, high = found["intervals"]["lc_win_rate"]
    assert low < found["lc_win_rate"] < high
    assert win_rates(records, samples=300, seed=5) == found
    assert win_rates(records, samples=0, seed=5)["intervals"] == {"win_rate": None, "lc_win_rate": None}


def test_judged_rows_take_the_verdict_of_both_orders():
    rows = [{"id": i, "prompt": f"q{i}", "reference": "ref", "category": None} for i in range(3)]
    judged = judged_rows(rows, ["long answer", "a", "bb"], ["A", "A", "B"], ["B", "A", "A"])
    assert [r["verdict"] for r in judged] == ["win", "tie", "loss"]
    assert [r["preference"] for r in judged] == [1.0, 0.5, 0.0]
    assert (judged[0]["answer_chars"], judged[0]["reference_chars"]) == (11, 3)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_benchmark_gives_ids_and_names_file_line_and_field(tmp_path):
    good = write(
        tmp_path / "b.jsonl", ['{"prompt": "p1", "reference": "r1", "id": 7}', '{"prompt": "p2", "reference": "r"}']
    )
    rows = read_benchmark(good)
    assert rows[0]["id"] == 7 and rows[1]["id"].startswith("p-") and rows[1]["category"] is None
    cases = {
        '{"prompt": "p"}': ":1: missing field 'reference'",
        '{"prompt": "p", "reference": 3}': ":1: field 'reference' should be a string",
        '{"prompt": "p", "reference": "r", "category": 1}': ":1: field 'category' should be a string",
        '{"prompt": " ", "reference": "r"}': ":1: field 'prompt' is empty",
        '{"prompt": "p", "reference": "r", "id": true}': ":1: field 'id' should be a string or an integer",
    }
    for line, message in cases.items():
        with pytest.raises(RecordError, match=f"^{tmp_path}/bad.jsonl{message}"):
            read_benchmark(write(tmp_path / "bad.jsonl", [line]))
    twice = write(tmp_path / "twice.jsonl", ['{"prompt": "p", "reference": "r"}'] * 2)
    with pytest.raises(RecordError, match=r"twice.jsonl:2: duplicate prompt \(first on line 1\)"):
        read_benchmark(twice)


def test_converters_map_the_hub_rows():
    alpaca = from_alpaca_eval(json.loads((FIXTURES / "alpaca_eval_rows.json").read_text()), "alpaca")
    assert [r["id"] for r in alpaca] == [0, 1, 2] and alpaca[2]["category"] == "vicuna"
    assert alpaca[0]["prompt"].startswith("What are the names") and alpaca[0]["reference"].startswith("Hugh")
    with pytest.raises(RecordError, match="alpaca: row 1: missing field 'output'"):
        from_alpaca_eval([{"instruction": "x"}], "alpaca")
    rows = [json.loads(line) for line in (FIXTURES / "mt_bench_rows.jsonl").read_text().splitlines()]
    mt, dropped = from_mt_bench(rows, "mt")
    assert (len(mt), dropped) == (1, 2) and mt[0] == {
        "id": 8105,
        "prompt": "Solve for x: 3x + 5 = 20.",
        "reference": "3x = 15, so x = 5.",
        "category": "math",
    }
    answers = {4411: json.loads((FIXTURES / "mt_bench_reference_answers.jsonl").read_text())}
    mt, dropped = from_mt_bench(rows, "mt", answers)
    assert dropped == 1 and mt[1]["reference"].startswith("def fib(n):")


def test_answer_files_follow_alpaca_eval_and_fastchat():
    records = [{"id": 81, "prompt": "q", "answer": "a", "category": "writing"}]
    assert alpaca_eval_outputs(records, "run-M1") == [
        {"instruction": "q", "output": "a", "generator": "run-M1", "dataset": "writing"}
    ]
    (row,) = mt_bench_answers(records, "run-M1", tstamp=1.5)
    assert row["question_id"] == 81 and row["model_id"] == "run-M1" and row["tstamp"] == 1.5
    assert row["choices"] == [{"index": 0, "turns": ["a"]}]
    assert mt_bench_answers(records, "run-M1", tstamp=2.0)[0]["answer_id"] == row["answer_id"]  # stable


def prepare(*args: str) -> subprocess.CompletedProcess:
    script = REPO / "scripts" / "prepare_benchmark.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO)


def test_prepare_benchmark_from_files(tmp_path):
    out = tmp_path / "alpaca.jsonl"
    done = prepare("--set", "alpaca_eval", "--source", str(FIXTURES / "alpaca_eval_rows.json"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in read_benchmark(out)] == [0, 1, 2] and "3 prompts" in done.stdout
    out = tmp_path / "mt.jsonl"
    done = prepare(
        "--set",
        "mt_bench",
        "--source",
        str(FIXTURES / "mt_bench_rows.jsonl"),
        "--out",
        str(out),
        "--reference-answers",
        str(FIXTURES / "mt_bench_reference_answers.jsonl"),
    )
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in read_benchmark(out)] == [8105, 4411] and "1 left out" in done.stdout
    bad = write(tmp_path / "bad.jsonl", ['{"instruction": "x"}'])
    done = prepare("--set", "alpaca_eval", "--source", str(bad), "--out", str(tmp_path / "x.jsonl"))
    assert (
        done.returncode == 2 and "row 1: missing field 'output'" in done.stderr and not (tmp_path / "x.jsonl").exists()
    )


def test_eval_stage_judges_the_benchmark_and_a_rerun_after_a_kill_gives_the_same_figures(
    tiny_run, run_stage, tmp_path, monkeypatch
):
    import shutil

    from selfreward.run.layout import RunLayout

    run = tmp_path / "run"  # a copy: other tests read the shared run's own evaluation
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    rows = from_alpaca_eval(json.loads((FIXTURES / "alpaca_eval_rows.json").read_text()), "alpaca")
    bench = write(tmp_path / "bench.jsonl", [json.dumps(r) for r in rows])
    args = ("--run-dir", str(run), "--iteration", "1", "--no-oxen", "--eval.benchmark", str(bench))
    monkeypatch.setenv("SELFREWARD_CRASH_AT", "06_eval:1:after_summary")
    assert run_stage("06_eval", *args, check=False).returncode == -9  # killed once its outputs were written
    layout = RunLayout(run)
    first = json.loads(layout.eval_result(1).read_text())["benchmark"]
    first_rows = layout.benchmark(1).read_text()
    monkeypatch.delenv("SELFREWARD_CRASH_AT")
    run_stage("06_eval", *args)

    figures = json.loads(layout.eval_result(1).read_text())["benchmark"]
    assert figures == first and layout.benchmark(1).read_text() == first_rows  # greedy answers, same verdicts
    assert figures["file"] == str(bench) and figures["prompts"] == 3
    assert figures["wins"] + figures["ties"] + figures["losses"] == 3 and 0 <= figures["win_rate"] <= 1
    assert set(figures["intervals"]) == {"win_rate", "lc_win_rate"}
    judged = [json.loads(line) for line in first_rows.splitlines()]
    assert [r["id"] for r in judged] == [0, 1, 2] and {r["pick_answer_as_a"] for r in judged} <= {"A", "B"}
    assert all(r["answer_chars"] == len(r["answer"]) for r in judged)
    outputs = json.loads(layout.alpaca_eval_outputs(1).read_text())
    assert [o["instruction"] for o in outputs] == [r["prompt"] for r in rows]
    assert outputs[0]["generator"] == "run-M1" and outputs[0]["output"] == judged[0]["answer"]
    answers = [json.loads(line) for line in layout.mt_bench_answers(1).read_text().splitlines()]
    assert layout.mt_bench_answers(1).name == "run-M1.jsonl" and answers[2]["choices"][0]["turns"] == [
        judged[2]["answer"]
    ]
    report = layout.report.read_text()
    assert "## Against a fixed benchmark" in report and "| 1 | 3 |" in report
    assert (layout.report_dir / "benchmark.png").stat().st_size > 5000
