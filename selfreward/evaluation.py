"""What stage 06 measures: the held-out split, head-to-head verdicts, judge quality, and drift."""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter

from selfreward.chat import packaged_template
from selfreward.metrics import both_orders_verdict, distinct_n, kendall_tau_b, pairwise_agreement, spearman


def _draw(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_heldout(ift: list[dict], eft: list[dict], n_prompts: int, n_questions: int, seed: int):
    """(ift to train on, eft to train on, held-out IFT rows, held-out EFT rows).

    Rows are drawn by a hash of the seed and their id (EFT: of their question, so a question's
    answers stay together), so the split does not depend on the files' order. At least one row of
    each kind is always kept for training.
    """
    n_prompts = min(n_prompts, max(0, len(ift) - 1))
    held_ids = {r["id"] for r in sorted(ift, key=lambda r: _draw(r["id"], seed))[:n_prompts]}
    questions = sorted({r["prompt"] for r in eft}, key=lambda q: _draw(q, seed))
    held_questions = set(questions[: min(n_questions, max(0, len(questions) - 1))])
    return (
        [r for r in ift if r["id"] not in held_ids],
        [r for r in eft if r["prompt"] not in held_questions],
        [r for r in ift if r["id"] in held_ids],
        [r for r in eft if r["prompt"] in held_questions],
    )


def pairwise_prompt(question: str, answer_a: str, answer_b: str) -> str:
    """The user turn asking the judge which of two answers is better (it answers "A" or "B")."""
    return packaged_template("pairwise_judge.txt").format(question=question, answer_a=answer_a, answer_b=answer_b)


def head_to_head(picks_x_as_a: list[str], picks_x_as_b: list[str]) -> dict:
    """Wins, ties and losses of X against Y from the judge's picks in both orders, per prompt."""
    verdicts = [both_orders_verdict(a, b) for a, b in zip(picks_x_as_a, picks_x_as_b, strict=True)]
    counts = Counter(verdicts)
    n = len(verdicts)
    return {
        "prompts": n,
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "win_rate": round(counts["win"] / n, 4) if n else None,
        "verdicts": verdicts,
    }


def judge_quality(rows: list[dict], scores: list[float | None]) -> dict:
    """The judge against human scores on held-out EFT rows (the paper's Table 4).

    Pairwise accuracy is over pairs of answers to the same question with different human scores (a
    judge tie counts half); exact match rounds the judge's score to the nearest point.
    """
    keep = [i for i, s in enumerate(scores) if s is not None]
    human = [float(rows[i]["score"]) for i in keep]
    judged = [float(scores[i]) for i in keep]
    accuracy, pairs = pairwise_agreement([rows[i]["prompt"] for i in keep], human, judged)
    rho, tau = spearman(human, judged), kendall_tau_b(human, judged)
    return {
        "rows": len(rows),
        "scored": len(keep),
        "pairs": pairs,
        "pairwise_accuracy": None if accuracy is None else round(accuracy, 4),
        "exact_match": round(sum(round(j) == h for j, h in zip(judged, human, strict=True)) / len(keep), 4)
        if keep
        else None,
        "spearman": None if rho is None else round(rho, 4),
        "kendall_tau": None if tau is None else round(tau, 4),
    }


def drift(responses: list[dict], scores: list[dict], pairs: list[dict], prompts: int) -> dict:
    """The signs of a loop going wrong in one iteration's files: length, diversity, score pile-up, ties."""
    texts = [r["response"] for r in responses]
    valid = [s["score"] for s in scores if s["score"] is not None]
    judgments = [j for s in scores for j in s["judgments"]]
    histogram = Counter(str(int(min(5, max(0, round(v))))) for v in valid)
    by_prompt: dict[str, list[float]] = {}
    for s in scores:
        if s["score"] is not None:
            by_prompt.setdefault(s["prompt_id"], []).append(s["score"])
    tied = sum(1 for v in by_prompt.values() if len(v) >= 2 and max(v) == min(v))

    def mean(values):
        return round(statistics.fmean(values), 2) if values else None

    return {
        "responses": len(texts),
        "response_tokens": mean([r["num_tokens"] for r in responses]),
        "response_chars": mean([len(t) for t in texts]),
        "distinct_1": None if (d := distinct_n(texts, 1)) is None else round(d, 4),
        "distinct_2": None if (d := distinct_n(texts, 2)) is None else round(d, 4),
        "score_histogram": {str(k): histogram.get(str(k), 0) for k in range(6)},
        "mean_score": mean(valid),
        "tie_rate": round(tied / len(by_prompt), 4) if by_prompt else None,
        "parse_failure_rate": round(sum(j["score"] is None for j in judgments) / len(judgments), 4)
        if judgments
        else None,
        "pair_yield": round(len(pairs) / prompts, 4) if prompts else None,
        "chosen_minus_rejected_chars": mean([len(p["chosen"]) - len(p["rejected"]) for p in pairs]),
    }
