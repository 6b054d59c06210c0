"""Preference pairs from scored responses: best against worst answer of each prompt."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from selfreward.run.metrics import kendall_tau_b


def build_pairs(
    scored: list[dict], min_margin: float = 0.0, length_tolerance: float | None = None
) -> tuple[list[dict], Counter]:
    """One pair per prompt, chosen = highest score, rejected = lowest; returns (pairs, why prompts were dropped).

    Responses with a null or non-finite score (a NaN reward, in scores files written before they were
    refused at the source) never take part. A prompt is dropped when fewer than two responses
    were scored, when best and worst tie, when their texts are the same, or when the gap is below
    `min_margin`. Among equal scores the lower sample index wins, so the result is deterministic.
    With `length_tolerance` (preferences.length_control), chosen is the shortest answer scored within
    that much of the best, and the pair records `chosen_by_length` when that is not the best one.
    """
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in scored:
        by_prompt[row["prompt_id"]].append(row)
    pairs, dropped = [], Counter()
    for prompt_id, rows in by_prompt.items():
        valid = sorted(
            (r for r in rows if r["score"] is not None and math.isfinite(r["score"])), key=lambda r: r["sample_index"]
        )
        if len(valid) < 2:
            dropped["fewer_than_two_scored"] += 1
            continue
        best = max(valid, key=lambda r: r["score"])
        chosen = best
        rejected = min(valid, key=lambda r: r["score"])
        if length_tolerance is not None:
            near = [r for r in valid if r["score"] >= best["score"] - length_tolerance and r is not rejected]
            chosen = min(near or [best], key=lambda r: len(r["response"]))
        if chosen["score"] == rejected["score"]:
            dropped["tie"] += 1
        elif chosen["response"].strip() == rejected["response"].strip():
            dropped["identical_text"] += 1
        elif chosen["score"] - rejected["score"] < min_margin:
            dropped["below_margin"] += 1
        else:
            pairs.append(
                {
                    "prompt_id": prompt_id,
                    "prompt": chosen["prompt"],
                    "chosen": chosen["response"],
                    "rejected": rejected["response"],
                    "score_chosen": chosen["score"],
                    "score_rejected": rejected["score"],
                    **({"chosen_by_length": chosen is not best} if length_tolerance is not None else {}),
                }
            )
    return pairs, dropped


def judges_agreement(scored: list[dict]) -> dict[str, float]:
    """Per prompt, how alike the judge (score) and the judge before it (previous_score) rank the prompt's
    answers: Kendall's tau-b over the answers both scored (CREAM). A judge that scores them all the same,
    or fewer than two answers scored by both, gives 0: no evidence either way."""
    by_prompt: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in scored:
        if row["score"] is not None and row.get("previous_score") is not None:
            by_prompt[row["prompt_id"]].append((row["score"], row["previous_score"]))
        else:
            by_prompt.setdefault(row["prompt_id"], [])
    agreement = {}
    for prompt_id, both in by_prompt.items():
        tau = kendall_tau_b([a for a, _ in both], [b for _, b in both]) if len(both) >= 2 else None
        agreement[prompt_id] = round(tau, 4) if tau is not None else 0.0
    return agreement
