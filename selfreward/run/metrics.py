"""Agreement between two scorings of the same items (rank correlations, pairwise order agreement, bootstrap
intervals), head-to-head tallies (wins, ties, losses, win rate and preference), distinct-n, and the seeded draw
every sample of rows is made by."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import statistics
from collections import Counter, defaultdict


def ranks(values: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def pearson(x: list[float], y: list[float]) -> float | None:
    """None when either side is constant (the correlation is undefined)."""
    if len(x) != len(y):
        raise ValueError("pearson: the two lists differ in length")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho with tie-corrected ranks (Pearson on the ranks)."""
    return pearson(ranks(x), ranks(y))


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b, which corrects for ties on either side; None when either side is constant."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else None


def pairwise_agreement(groups: list[str], reference: list[float], other: list[float]) -> tuple[float | None, int]:
    """Among pairs of items in the same group (answers to one question) that `reference` orders strictly,
    the fraction that `other` orders the same way (a tie in `other` counts as half). Returns (fraction, pairs)."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    agree, total = 0.0, 0
    for idx in members.values():
        for i, j in itertools.combinations(idx, 2):
            ref = reference[i] - reference[j]
            if ref == 0:
                continue
            total += 1
            got = other[i] - other[j]
            agree += 0.5 if got == 0 else float((got > 0) == (ref > 0))
    return (agree / total if total else None), total


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct-n: unique word n-grams over all n-grams in `texts` (lower-cased, split on whitespace)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


# A head-to-head verdict as a preference for X (AlpacaEval's convention: a tie counts half).
VERDICT_PREFERENCE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def both_orders_verdict(first_order: str, second_order: str) -> str:
    """Head-to-head verdict for answer X against answer Y, judged twice with the positions swapped.

    `first_order` is the judge's pick ("A" or "B") when X is shown as A, `second_order` when X is
    shown as B. X wins only if it is picked in both orders; a pick that follows the position is a tie.
    """
    x_first = first_order == "A"
    x_second = second_order == "B"
    if x_first and x_second:
        return "win"
    if not x_first and not x_second:
        return "loss"
    return "tie"


def bootstrap_intervals(
    groups: list[str], statistics, *, samples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals for the figures `statistics(indices, group_of)` returns (a dict
    of name -> number or None), resampling whole groups.

    Items of one group (the answers to one question) are not independent, so the resampling unit is
    the group: each draw picks as many groups as there are, with replacement, and a group drawn twice
    counts as two groups. `statistics` gets the drawn item indices and, for each, the draw it belongs
    to. A figure undefined on a draw (None) is left out of that draw; it gets no interval (None) when
    fewer than half of the draws define it.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    names = sorted(members)
    values: dict[str, list[float]] = defaultdict(list)
    rng = random.Random(seed)
    for _ in range(samples if names else 0):
        indices, draw_of = [], []
        for k, name in enumerate(rng.choices(names, k=len(names))):
            indices += members[name]
            draw_of += [str(k)] * len(members[name])
        for key, value in statistics(indices, draw_of).items():
            if value is not None:
                values[key].append(value)
    tail = (1 - level) / 2
    out: dict[str, tuple[float, float] | None] = {}
    for key, drawn in values.items():
        if len(drawn) < samples / 2:
            out[key] = None
            continue
        drawn.sort()
        out[key] = (
            drawn[min(len(drawn) - 1, int(tail * len(drawn)))],
            drawn[max(0, math.ceil((1 - tail) * len(drawn)) - 1)],
        )
    return out


def head_to_head(
    picks_x_as_a: list[str | None], picks_x_as_b: list[str | None], *, samples: int = 0, seed: int = 0
) -> dict:
    """Wins, ties and losses of X against Y from the judge's picks in both orders, per prompt. A pick of
    None is a reply an outside judge wrote that names neither letter: its prompt is counted as unreadable
    and left out of the rates, never guessed."""
    verdicts = [
        "unreadable" if a is None or b is None else both_orders_verdict(a, b)
        for a, b in zip(picks_x_as_a, picks_x_as_b, strict=True)
    ]
    result = tally(verdicts, samples=samples, seed=seed)
    # A tie is the same letter in both orders: the verdict followed the position, not the answer.
    first = sum(a == b == "A" for a, b in zip(picks_x_as_a, picks_x_as_b, strict=True))
    n = result["prompts"] - result["unreadable"]
    return {
        **result,
        "position_bias": round(result["ties"] / n, 4) if n else None,
        "picked_first_both_times": first,
        "picked_second_both_times": result["ties"] - first,
    }


def head_to_head_by_scores(
    scores_x: list[float | None], scores_y: list[float | None], *, margin: float = 0.0, samples: int = 0, seed: int = 0
) -> dict:
    """Wins, ties and losses of X against Y when a judge grades each answer alone: X wins a prompt when its
    score is above Y's by more than `margin`, a tie within it. Shown one answer at a time, the judge has no
    position to follow (position_bias None). A score of None (no readable score) makes the prompt unreadable."""
    verdicts = [
        "unreadable" if x is None or y is None else "win" if x - y > margin else "loss" if y - x > margin else "tie"
        for x, y in zip(scores_x, scores_y, strict=True)
    ]
    readable = [(x, y) for x, y in zip(scores_x, scores_y, strict=True) if x is not None and y is not None]
    return {
        **tally(verdicts, samples=samples, seed=seed),
        "position_bias": None,
        "margin": margin,
        "mean_scores": [round(statistics.fmean(v), 4) for v in zip(*readable, strict=True)] if readable else None,
    }


def tally(verdicts: list[str], *, samples: int = 0, seed: int = 0) -> dict:
    """The counts of the verdicts, the win rate (wins over readable prompts) and the preference (ties count
    half, as AlpacaEval counts them), each with its 95% bootstrap interval over prompts (`samples` draws)."""
    counts = Counter(verdicts)
    readable = [v for v in verdicts if v != "unreadable"]

    def figures(indices, _draws) -> dict:
        drawn = [readable[i] for i in indices]
        if not drawn:
            return {"win_rate": None, "preference": None}
        return {
            "win_rate": sum(v == "win" for v in drawn) / len(drawn),
            "preference": sum(VERDICT_PREFERENCE[v] for v in drawn) / len(drawn),
        }

    point = figures(range(len(readable)), None)
    intervals = bootstrap_intervals([str(i) for i in range(len(readable))], figures, samples=samples, seed=seed)
    return {
        "prompts": len(verdicts),
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "unreadable": counts["unreadable"],
        **{k: None if v is None else round(v, 4) for k, v in point.items()},
        "intervals": {k: [round(b, 4) for b in intervals[k]] if intervals.get(k) else None for k in point},
        "verdicts": verdicts,
    }


def draw_key(key: str, seed: int) -> str:
    """A sort key that orders items by a hash of the seed and their key: a draw that no file order changes."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion (successes of trials); None for no trials. Unlike a
    bootstrap, it stays honest for a handful of trials: 2 of 2 gives 0.34-1, not 1-1."""
    if trials <= 0:
        return None
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)
