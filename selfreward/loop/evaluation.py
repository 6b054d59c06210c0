"""What stage 06 measures besides the judge (judge/judges.py measures that) and the head-to-head tallies
(run/metrics.py counts those): drift; and the held-out rows it measures on, which stage 00 sets aside."""

from __future__ import annotations

import statistics
from collections import Counter

from selfreward.run.metrics import distinct_n, draw_key


def split_heldout(ift: list[dict], eft: list[dict], n_prompts: int, n_questions: int, seed: int):
    """(ift to train on, eft to train on, held-out IFT rows, held-out EFT rows).

    Rows are drawn by a hash of the seed and their id (EFT: of their question, so a question's
    answers stay together), so the split does not depend on the files' order. At least one row of
    each kind is always kept for training.
    """
    n_prompts = min(n_prompts, max(0, len(ift) - 1))
    held_ids = {r["id"] for r in sorted(ift, key=lambda r: draw_key(r["id"], seed))[:n_prompts]}
    questions = sorted({r["prompt"] for r in eft}, key=lambda q: draw_key(q, seed))
    held_questions = set(questions[: min(n_questions, max(0, len(questions) - 1))])
    return (
        [r for r in ift if r["id"] not in held_ids],
        [r for r in eft if r["prompt"] not in held_questions],
        [r for r in ift if r["id"] in held_ids],
        [r for r in eft if r["prompt"] in held_questions],
    )


OFF_TOPIC_JUSTIFICATION = (
    "The response does not address the question that was asked: it answers a different question, so none "
    "of it is relevant and it earns no points.\nScore: 0"
)


def off_topic_rows(eft: list[dict], n: int, seed: int) -> list[dict]:
    """`n` judge rows whose right score is known by construction: a good answer (score 4 or 5) to one
    question, given as the answer to another, graded 0 (the rubric's first point is relevance).

    Built from `eft` alone (pass the training rows, never the held-out ones). Each row records its
    origin. Deterministic in the seed; no (question, answer) pair repeats.
    """
    questions = sorted({r["prompt"] for r in eft}, key=lambda q: draw_key(q, seed))
    good = sorted((r for r in eft if r["score"] >= 4), key=lambda r: draw_key(r["id"], seed))
    # Round r gives answer j the question (j + r) mod Q: the rows spread evenly over questions and
    # answers, and every (question, answer) pair comes once before the rounds run out.
    pairs = (
        (questions[(j + r) % len(questions)], answer) for r in range(len(questions)) for j, answer in enumerate(good)
    )
    picked = [(q, a) for q, a in pairs if q != a["prompt"]][: max(0, n)]
    first_id = {}  # a question is named by its lowest row id, whatever the file's order
    for r in sorted(eft, key=lambda r: r["id"]):
        first_id.setdefault(r["prompt"], r["id"])
    return [
        {
            "id": f"off-topic-{k:04d}",
            "prompt": question,
            "response": answer["response"],
            "score": 0,
            "justification": OFF_TOPIC_JUSTIFICATION,
            "origin": f"constructed: off-topic, the answer of {answer['id']} "
            f"given to the question of {first_id[question]}",
        }
        for k, (question, answer) in enumerate(picked, start=1)
    ]


def drift(responses: list[dict], scores: list[dict], pairs: list[dict] | None, prompts: int) -> dict:
    """The signs of a loop going wrong in one iteration's files: length, diversity, score pile-up, ties.
    `pairs` None: the algorithm makes none (RAFT), and the pair figures are None."""
    texts = [r["response"] for r in responses]
    valid = [s["score"] for s in scores if s["score"] is not None]
    judgments = [j for s in scores for j in s["judgments"]]
    histogram = Counter(str(int(min(5, max(0, round(v))))) for v in valid)
    by_prompt: dict[str, list[float]] = {}
    for s in scores:
        if s["score"] is not None:
            by_prompt.setdefault(s["prompt_id"], []).append(s["score"])
    tied = sum(1 for v in by_prompt.values() if len(v) >= 2 and max(v) == min(v))
    spreads = [statistics.pstdev(v) for v in by_prompt.values() if len(v) >= 2]
    tokens = {(r["prompt_id"], r["response"]): r["num_tokens"] for r in responses}  # a pair's answers' lengths

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
        # how far apart a prompt's answers are scored (population SD), averaged over prompts
        "score_spread": None if not spreads else round(statistics.fmean(spreads), 4),
        "tie_rate": round(tied / len(by_prompt), 4) if by_prompt else None,
        "parse_failure_rate": round(sum(j["score"] is None for j in judgments) / len(judgments), 4)
        if judgments
        else None,
        "pair_yield": round(len(pairs) / prompts, 4) if prompts and pairs is not None else None,
        "chosen_minus_rejected_chars": mean([len(p["chosen"]) - len(p["rejected"]) for p in pairs or []]),
        "chosen_minus_rejected_tokens": mean(
            [
                tokens[p["prompt_id"], p["chosen"]] - tokens[p["prompt_id"], p["rejected"]]
                for p in pairs or []
                if (p["prompt_id"], p["chosen"]) in tokens and (p["prompt_id"], p["rejected"]) in tokens
            ]
        ),
        # preferences.length_control: pairs whose chosen answer is a shorter one than the top-scored
        "shorter_chosen": None if pairs is None else sum(bool(p.get("chosen_by_length")) for p in pairs),
    }
