"""RAFT's selection (algorithm raft): which of the scored answers M<t> is fine-tuned on."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from selfreward.run.metrics import distinct_n


def discard_reason(row: dict, cfg) -> str | None:
    """Why an answer may never be kept (LMFlow's discard filter), or None: empty, cut off at
    max_new_tokens (unless cfg.keep_cut_off), repetitive (distinct word pairs below cfg.min_distinct_2
    of all its word pairs), or unscored."""
    if not row["response"].strip():
        return "empty"
    if row["finish_reason"] == "length" and not cfg.keep_cut_off:
        return "cut_off"
    words = row["response"].split()
    if len(words) >= 3 and (distinct_n([row["response"]], 2) or 0.0) < cfg.min_distinct_2:
        return "repetitive"
    if row["score"] is None:
        return "unscored"
    return None


def select(scored: list[dict], cfg) -> tuple[list[dict], Counter]:
    """The answers kept for fine-tuning, as SFT rows {prompt_id, response_id, prompt, completion, score},
    and how many were discarded and why.

    cfg.ranking "local" keeps each prompt's top ceil(cfg.keep x its answers) (at least one) of those
    that pass the discard filter; "global" keeps the top ceil(cfg.keep x all answers) over the whole
    iteration. Equal scores go to the lower sample index, so the result is deterministic.
    """
    discarded = Counter()
    usable = []
    for row in scored:
        reason = discard_reason(row, cfg)
        if reason:
            discarded[reason] += 1
        else:
            usable.append(row)

    def best_first(rows: list[dict]) -> list[dict]:
        return sorted(rows, key=lambda r: (-r["score"], r["prompt_id"], r["sample_index"]))

    if cfg.ranking == "global":
        kept = best_first(usable)[: math.ceil(cfg.keep * len(scored))]
    else:
        per_prompt: dict[str, list[dict]] = defaultdict(list)
        total: Counter = Counter(r["prompt_id"] for r in scored)
        for row in usable:
            per_prompt[row["prompt_id"]].append(row)
        kept = [
            r for pid, rows in per_prompt.items() for r in best_first(rows)[: max(1, math.ceil(cfg.keep * total[pid]))]
        ]
    order = {r["response_id"]: n for n, r in enumerate(scored)}
    kept.sort(key=lambda r: order[r["response_id"]])
    return [
        {
            "prompt_id": r["prompt_id"],
            "response_id": r["response_id"],
            "prompt": r["prompt"],
            "completion": r["response"],
            "score": r["score"],
        }
        for r in kept
    ], discarded
