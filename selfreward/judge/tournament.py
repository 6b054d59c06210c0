"""The pairwise judge (judge.mode pairwise): a prompt's answers ranked by comparing them two at a time.

Each comparison shows the judge two answers with judge.pairwise_template, once with each answer first,
and reads P("A") against P("B") from its next token. Averaging the two orders cancels a preference for
a position, which small judges have (RLHFlow's pairwise preference model does the same).
judge.ranking says which answers meet:

- knockout: winners meet winners until one is left: N-1 comparisons (an odd one out waits a round);
- round_robin: every two answers meet: N(N-1)/2 comparisons.

An answer's score is 5 x its win share (the comparisons it won over those it played; a dead heat
counts half), so stages 04-06 read it on the rubric's 0-5 scale: the knockout's winner alone scores 5.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from itertools import combinations

from selfreward.judge.rubric import MAX_SCORE, fill_template

RANKINGS = ("knockout", "round_robin")


def fit_pairwise_prompt(chat, question: str, answer_a: str, answer_b: str, max_tokens: int, template: str):
    """The rendered comparison within `max_tokens`, and whether anything was cut.

    The longer answer is cut first, down to the other's length, then both alike: cutting the end of
    the whole user turn would cut answer B alone (and the closing instruction). The question is cut last.
    """

    def render(q: str, a: str, b: str) -> str:
        return chat.prompt(fill_template(template, question=q, answer_a=a, answer_b=b))

    rendered = render(question, answer_a, answer_b)
    overflow = len(chat.encode(rendered)) - max_tokens
    if overflow <= 0:
        return rendered, False
    for _ in range(8):  # each pass removes at least the measured overflow
        a_ids, b_ids = chat.encode(answer_a), chat.encode(answer_b)
        keep = max(0, len(a_ids) + len(b_ids) - overflow)
        short = min(len(a_ids), len(b_ids), keep // 2)
        keep_a = short if len(a_ids) <= len(b_ids) else keep - short
        keep_a = min(keep_a, len(a_ids))
        keep_b = min(keep - keep_a, len(b_ids))
        answer_a, answer_b = chat.tokenizer.decode(a_ids[:keep_a]), chat.tokenizer.decode(b_ids[:keep_b])
        left = overflow - (len(a_ids) - keep_a) - (len(b_ids) - keep_b)
        if left > 0:
            q_ids = chat.encode(question)
            question = chat.tokenizer.decode(q_ids[: max(0, len(q_ids) - left)])
        rendered = render(question, answer_a, answer_b)
        overflow = len(chat.encode(rendered)) - max_tokens
        if overflow <= 0:
            return rendered, True
    raise ValueError(f"the pairwise template alone is longer than {max_tokens} tokens")


def preference(p_a_first: float, p_a_second: float) -> float:
    """The probability that answer a is the better one: the mean over both orders."""
    return (p_a_first + p_a_second) / 2


def picked_same_letter(comparison: dict) -> bool:
    """Whether the judge picked the same letter in both orders: its verdict followed the position.
    With a shown first, "A" is a; with a shown second, "A" is b."""
    return (comparison["p_a_first"] >= 0.5) == (comparison["p_a_second"] <= 0.5)


def ab_token_ids(chat, template: str) -> tuple[int, list[int]]:
    """(characters to cut from the end of every rendered pairwise prompt, the token ids of "A" and "B" that
    the judge's next token is read over).

    The ids are taken in context, as score_token_ids takes the digits: the tokens the model writes right
    after the rendered prompt. A SentencePiece tokenizer (Mistral's, Llama 2's) encodes "A" alone as "▁A",
    a word-initial token the model rarely writes after the prompt's closing newline, where it writes "A".
    Where the prompt ends in a space that the tokenizer joins to the letter ("Answer: " + "A" is "Answer:"
    + "▁A"), that space is cut from the prompt and the joined token read, as the model saw it in training.
    """
    prompt = chat.prompt(fill_template(template, question="", answer_a="", answer_b=""))
    for cut in (0, 1) if prompt.endswith(" ") else (0,):
        base = chat.encode(prompt[: len(prompt) - cut])
        written = [chat.encode(prompt + letter) for letter in ("A", "B")]
        ids = [tokens[-1] for tokens in written if tokens[:-1] == base]
        if len(ids) == 2 and ids[0] != ids[1]:
            return cut, ids
    raise ValueError("the pairwise judge needs 'A' and 'B' to be one token each after the pairwise prompt")


def compare(backend, matches: list[tuple[str, str, str]], *, template: str, budget: int, batch_size: int) -> list[dict]:
    """For each (question, answer a, answer b): {"p_a_first", "p_a_second", "cut"}, where p_a_first is
    P(a is better) with a shown as A, p_a_second with a shown as B (renormalised over the two letters).
    ValueError when the tokenizer has no one token for each letter after the prompt, or the template
    alone is longer than `budget`."""
    trim, letter_ids = ab_token_ids(backend.chat, template)
    prompts, cut = [], []
    for q, a, b in matches:
        for first, second in ((a, b), (b, a)):
            rendered, was_cut = fit_pairwise_prompt(backend.chat, q, first, second, budget, template)
            prompts.append(rendered[: len(rendered) - trim])
            cut.append(was_cut)
    probs = backend.next_token_probs(prompts, letter_ids, batch_size, desc="comparing")
    results = []
    for k in range(len(matches)):
        first, second = probs[2 * k], probs[2 * k + 1]
        results.append(
            {
                "p_a_first": round(first[0] / sum(first), 6),
                "p_a_second": round(second[1] / sum(second), 6),
                "cut": cut[2 * k] or cut[2 * k + 1],
            }
        )
    return results


def rank_by_comparisons(
    backend,
    groups: list[tuple[str, list[str]]],
    *,
    ranking: str,
    template: str,
    budget: int,
    batch_size: int,
) -> list[list[dict]]:
    """Every comparison of every group (a question and its answers): per group, a list of
    {"a", "b", "p_a_first", "p_a_second", "cut"} with a and b the positions of the answers in the group.

    All groups play each knockout round in one call, so the batches stay full.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"judge.ranking must be one of {', '.join(RANKINGS)}, got '{ranking}'")
    played: list[list[dict]] = [[] for _ in groups]

    def play(matches: list[tuple[int, int, int]]) -> list[dict]:
        triples = [(groups[g][0], groups[g][1][a], groups[g][1][b]) for g, a, b in matches]
        results = compare(backend, triples, template=template, budget=budget, batch_size=batch_size)
        for (g, a, b), result in zip(matches, results, strict=True):
            played[g].append({"a": a, "b": b, **result})
        return results

    if ranking == "round_robin":
        play([(g, a, b) for g, (_, answers) in enumerate(groups) for a, b in combinations(range(len(answers)), 2)])
        return played
    alive = [list(range(len(answers))) for _, answers in groups]
    while True:
        matches = [(g, left[k], left[k + 1]) for g, left in enumerate(alive) for k in range(0, len(left) - 1, 2)]
        if not matches:
            return played
        winners: dict[int, list[int]] = {g: [] for g in range(len(groups))}
        for (g, a, b), result in zip(matches, play(matches), strict=True):
            # a dead heat goes to the answer sampled first, so the result never depends on chance
            winners[g].append(a if preference(result["p_a_first"], result["p_a_second"]) >= 0.5 else b)
        alive = [winners[g] + (left[-1:] if len(left) % 2 else []) for g, left in enumerate(alive)]


def win_shares(n: int, comparisons: list[dict]) -> list[float | None]:
    """Each of `n` answers' share of the comparisons it played that it won (a dead heat counts half);
    None for an answer that played none."""
    won, games = [0.0] * n, [0] * n
    for c in comparisons:
        p = preference(c["p_a_first"], c["p_a_second"])
        share = 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
        won[c["a"]] += share
        won[c["b"]] += 1.0 - share
        games[c["a"]] += 1
        games[c["b"]] += 1
    return [won[i] / games[i] if games[i] else None for i in range(n)]


def pairwise_scores(
    backend,
    responses: list[dict],
    cfg,
    *,
    template: str,
    budget: int,
    prompts_per_chunk: int,
    skip: Collection[int] = (),
    on_chunk: Callable[[int, list[dict]], None] | None = None,
) -> list[dict]:
    """Stage 03's rows for judge.mode pairwise: each response row with "score" (5 x win share, null when
    its prompt has one answer), "win_share", "comparisons" (those it played, a and b as sample indices,
    each with p_a_first and p_a_second), empty "judgments" and "judge_input_truncated".

    Prompts are ranked `prompts_per_chunk` at a time; each chunk's rows go to on_chunk(k, rows) as soon
    as they are done, and a chunk in `skip` (saved by a killed run) is not ranked again.
    """
    by_prompt: dict[str, list[int]] = {}
    for i, row in enumerate(responses):
        by_prompt.setdefault(row["prompt_id"], []).append(i)
    members = [sorted(idx, key=lambda i: responses[i]["sample_index"]) for idx in by_prompt.values()]
    chunks = [members[k : k + prompts_per_chunk] for k in range(0, len(members), max(1, prompts_per_chunk))]
    rows: list[dict] = []
    for k, chunk in enumerate(chunks):
        if k in skip:
            continue
        groups = [(responses[idx[0]]["prompt"], [responses[i]["response"] for i in idx]) for idx in chunk]
        played = rank_by_comparisons(
            backend, groups, ranking=cfg.ranking, template=template, budget=budget, batch_size=cfg.batch_size
        )
        done = []
        for idx, comparisons in zip(chunk, played, strict=True):
            shares = win_shares(len(idx), comparisons)
            named = [
                {
                    "a": responses[idx[c["a"]]]["sample_index"],
                    "b": responses[idx[c["b"]]]["sample_index"],
                    "p_a_first": c["p_a_first"],
                    "p_a_second": c["p_a_second"],
                }
                for c in comparisons
            ]
            for pos, i in enumerate(idx):
                mine = [c for c, raw in zip(named, comparisons, strict=True) if pos in (raw["a"], raw["b"])]
                share = shares[pos]
                done.append(
                    {
                        **responses[i],
                        "score": None if share is None else round(MAX_SCORE * share, 4),
                        "win_share": None if share is None else round(share, 4),
                        "comparisons": mine,
                        "judgments": [],
                        "judge_input_truncated": any(raw["cut"] for raw in comparisons if pos in (raw["a"], raw["b"])),
                    }
                )
        rows += done
        if on_chunk:
            on_chunk(k, done)
    return rows


def position_bias(rows: list[dict]) -> float | None:
    """The share of comparisons in pairwise rows where the judge picked the same letter in both orders:
    its verdict followed the position, not the answer."""
    seen = {}
    for row in rows:
        for c in row.get("comparisons", []):
            seen[(row["prompt_id"], c["a"], c["b"])] = c
    if not seen:
        return None
    return round(sum(map(picked_same_letter, seen.values())) / len(seen), 4)
