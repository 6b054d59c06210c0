"""Preference pairs from scored responses: best against worst answer of each prompt."""

from __future__ import annotations

from collections import Counter, defaultdict


def build_pairs(scored: list[dict], min_margin: float = 0.0) -> tuple[list[dict], Counter]:
    """One pair per prompt, chosen = highest score, rejected = lowest; returns (pairs, why prompts were dropped).

    Responses with a null score never take part. A prompt is dropped when fewer than two responses
    were scored, when best and worst tie, when their texts are the same, or when the gap is below
    `min_margin`. Among equal scores the lower sample index wins, so the result is deterministic.
    """
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in scored:
        by_prompt[row["prompt_id"]].append(row)
    pairs, dropped = [], Counter()
    for prompt_id, rows in by_prompt.items():
        valid = sorted((r for r in rows if r["score"] is not None), key=lambda r: r["sample_index"])
        if len(valid) < 2:
            dropped["fewer_than_two_scored"] += 1
            continue
        chosen = max(valid, key=lambda r: r["score"])
        rejected = min(valid, key=lambda r: r["score"])
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
                }
            )
    return pairs, dropped
