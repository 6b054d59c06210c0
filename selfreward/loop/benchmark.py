"""The fixed yardstick of stage 06 (eval.benchmark): prompts with reference answers that M<t> is judged against.

- reading a benchmark file, and making one from AlpacaEval's or MT-Bench's rows (scripts/prepare_benchmark.py);
- the per-prompt records of a judged benchmark, with each answer's preference over the reference;
- the win rate and the length-controlled win rate (AlpacaEval 2.0's, reduced to one model), with bootstrap
  intervals;
- the answers in the formats AlpacaEval and FastChat's MT-Bench read.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from selfreward.loop.prompt_gen import prompt_id
from selfreward.run.metrics import VERDICT_PREFERENCE, bootstrap_intervals, both_orders_verdict
from selfreward.run.records import RecordError, read_jsonl

BENCHMARK = {"prompt": (str,), "reference": (str,)}
OPTIONAL = {"category": ((str,), "a string"), "id": ((str, int), "a string or an integer")}


def read_benchmark(path) -> list[dict]:
    """The rows of a benchmark file, each with an "id" (its own, else a hash of the prompt) and a "category"
    (None when absent). A bad row stops with `file:line: what is wrong`."""
    seen: dict[str, str] = {}

    def check(row: dict, where: str) -> None:
        for name, (types, named) in OPTIONAL.items():
            value = row.get(name)
            if name in row and (isinstance(value, bool) or not isinstance(value, types)):
                raise RecordError(f"{where}: field '{name}' should be {named}, got {json.dumps(value)[:60]}")
        if not row["prompt"].strip():
            raise RecordError(f"{where}: field 'prompt' is empty")
        key = str(row.get("id", prompt_id(row["prompt"])))
        if key in seen:
            what = f"id '{key}'" if "id" in row else "prompt"
            raise RecordError(f"{where}: duplicate {what} (first on line {seen[key]})")
        seen[key] = where.rsplit(":", 1)[1]

    rows = read_jsonl(path, BENCHMARK, check=check)
    if not rows:
        raise RecordError(f"{path}: no benchmark rows")
    return [{**r, "id": r.get("id", prompt_id(r["prompt"])), "category": r.get("category")} for r in rows]


def _field(row: dict, name: str, types: tuple, where: str):
    if name not in row:
        raise RecordError(f"{where}: missing field '{name}'")
    if not isinstance(row[name], types):
        raise RecordError(f"{where}: field '{name}' has the wrong type, got {json.dumps(row[name])[:60]}")
    return row[name]


def from_alpaca_eval(rows: list[dict], source: str) -> list[dict]:
    """Benchmark rows from AlpacaEval's rows (instruction, output: the baseline's answer, generator, dataset):
    the reference is the baseline's output, the category the sub-dataset the instruction came from."""
    out = []
    for n, row in enumerate(rows):
        where = f"{source}: row {n + 1}"
        out.append(
            {
                "id": n,  # AlpacaEval's order is fixed: its 805 instructions by position
                "prompt": _field(row, "instruction", (str,), where),
                "reference": _field(row, "output", (str,), where),
                "category": row.get("dataset"),
            }
        )
    return out


def from_mt_bench(rows: list[dict], source: str, reference_answers: dict | None = None) -> tuple[list[dict], int]:
    """Benchmark rows from MT-Bench's questions, first turns only: the HF copy's rows (prompt: the turns,
    prompt_id, category, reference: a list, often empty) or FastChat's question.jsonl (turns, question_id).
    The reference is the question's own first reference answer, else the first turn of its answer in
    `reference_answers` (question id -> a FastChat answer row, e.g. its gpt-4.jsonl). Returns the rows and
    the number of questions left out for want of a reference."""
    out, dropped = [], 0
    for n, row in enumerate(rows):
        where = f"{source}: row {n + 1}"
        turns = _field(row, "turns" if "turns" in row else "prompt", (list,), where)
        key = row.get("question_id", row.get("prompt_id"))
        if not turns or not isinstance(turns[0], str) or key is None:
            raise RecordError(f"{where}: expected a list of turns and a question_id or prompt_id")
        references = [r for r in row.get("reference") or [] if isinstance(r, str) and r.strip()]
        answer = (reference_answers or {}).get(key)
        if not references and answer:
            references = [answer["choices"][0]["turns"][0]]
        if not references:
            dropped += 1
            continue
        out.append({"id": key, "prompt": turns[0], "reference": references[0], "category": row.get("category")})
    return out, dropped


def judged_rows(rows: list[dict], answers: list[str], picks_as_a: list, picks_as_b: list) -> list[dict]:
    """Per benchmark prompt: the answer, the reference, the judge's pick ("A" or "B") with the answer shown as A
    and as B, the verdict (the answer wins only when picked in both orders; a pick that follows the position is
    a tie), its preference (1, 0.5, 0) and both lengths in characters (as AlpacaEval measures them). A pick of
    None (an outside judge's reply naming neither letter) makes the verdict "unreadable", preference null."""
    out = []
    for row, answer, as_a, as_b in zip(rows, answers, picks_as_a, picks_as_b, strict=True):
        verdict = "unreadable" if as_a is None or as_b is None else both_orders_verdict(as_a, as_b)
        out.append(
            {
                "id": row["id"],
                "category": row["category"],
                "prompt": row["prompt"],
                "answer": answer,
                "reference": row["reference"],
                "pick_answer_as_a": as_a,
                "pick_answer_as_b": as_b,
                "verdict": verdict,
                "preference": VERDICT_PREFERENCE.get(verdict),
                "answer_chars": len(answer),
                "reference_chars": len(row["reference"]),
            }
        )
    return out


def _sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


def fit_length_glm(preference, length_difference, l2: float = 1e-2, steps: int = 100) -> tuple[float, float]:
    """(intercept, slope) of the logistic regression preference ~ intercept + slope * tanh(d / std(d)), fitted
    by Newton's method (IRLS) on the log loss with soft labels (a tie is half a win), with a small L2 penalty
    (0.01 on the summed loss: AlpacaEval's unvalidated fit uses C=100) so that a benchmark won or lost whole
    still has a finite fit. AlpacaEval 2.0's length term; a constant
    difference (std 0) has no effect to separate from the intercept and is left out."""
    y = np.asarray(preference, dtype=float)
    d = np.asarray(length_difference, dtype=float)
    std = d.std(ddof=1) if len(d) > 1 else 0.0
    term = np.tanh(d / std) if std > 0 else np.zeros_like(d)
    x = np.column_stack([np.ones_like(d), term])
    w = np.zeros(2)
    for _ in range(steps):
        p = _sigmoid(x @ w)
        gradient = x.T @ (p - y) + l2 * w
        hessian = (x.T * (p * (1 - p))) @ x + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(preference, answer_chars, reference_chars) -> float | None:
    """The win rate the fitted GLM predicts when the answer is as long as the reference: the length term at
    zero leaves sigmoid(intercept) for every prompt, so that is their mean (AlpacaEval 2.0's LC win rate
    without its instruction-difficulty term, which needs many models' annotations of the same prompts)."""
    if len(preference) == 0:
        return None
    difference = np.asarray(answer_chars, dtype=float) - np.asarray(reference_chars, dtype=float)
    intercept, _ = fit_length_glm(preference, difference)
    return float(_sigmoid(intercept))


def win_rates(records: list[dict], *, samples: int, seed: int) -> dict:
    """Win rate (mean preference: ties count half) and length-controlled win rate of the answers over the
    references, each with its 95% bootstrap interval over prompts (`samples` resamples, seeded). Unreadable
    verdicts are counted and left out."""
    unreadable = sum(r["preference"] is None for r in records)
    records = [r for r in records if r["preference"] is not None]
    prefs = [r["preference"] for r in records]
    mine, theirs = [r["answer_chars"] for r in records], [r["reference_chars"] for r in records]

    def figures(indices, _draws) -> dict:
        p = [prefs[i] for i in indices]
        return {
            "win_rate": sum(p) / len(p) if p else None,
            "lc_win_rate": length_controlled_win_rate(p, [mine[i] for i in indices], [theirs[i] for i in indices]),
        }

    point = figures(range(len(records)), None)
    intervals = bootstrap_intervals([str(r["id"]) for r in records], figures, samples=samples, seed=seed)
    counts = {v: sum(r["verdict"] == v for r in records) for v in ("win", "tie", "loss")}

    def rounded(value):
        return None if value is None else round(value, 4)

    return {
        "prompts": len(records) + unreadable,
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "unreadable": unreadable,
        **{k: rounded(v) for k, v in point.items()},
        "intervals": {k: _rounded_interval(intervals.get(k)) for k in point},
        "answer_chars": rounded(sum(mine) / len(mine)) if mine else None,
        "reference_chars": rounded(sum(theirs) / len(theirs)) if theirs else None,
    }


def _rounded_interval(interval) -> list[float] | None:
    return None if interval is None else [round(interval[0], 4), round(interval[1], 4)]


# AlpacaEval's --model_outputs: a JSON list of {"instruction", "output", "generator"} ("dataset" kept from its
# rows), matched to its reference outputs by instruction (tatsu-lab/alpaca_eval README, "model_outputs").
def alpaca_eval_outputs(records: list[dict], generator: str) -> list[dict]:
    return [
        {"instruction": r["prompt"], "output": r["answer"], "generator": generator, "dataset": r["category"]}
        for r in records
    ]


# FastChat llm_judge's model answer rows, as its gen_model_answer.py writes them to
# data/mt_bench/model_answer/<model_id>.jsonl: question_id, answer_id, model_id, choices [{index, turns}],
# tstamp. answer_id is a hash here, not a random uuid, so a rerun writes the same ids.
def mt_bench_answers(records: list[dict], model_id: str, tstamp: float) -> list[dict]:
    return [
        {
            "question_id": r["id"],
            "answer_id": hashlib.sha256(f"{model_id}:{r['id']}".encode()).hexdigest()[:22],
            "model_id": model_id,
            "choices": [{"index": 0, "turns": [r["answer"]]}],
            "tstamp": tstamp,
        }
        for r in records
    ]
