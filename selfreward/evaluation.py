"""What stage 06 measures: the held-out split, head-to-head verdicts, judge quality, and drift."""

from __future__ import annotations

import statistics
from collections import Counter

from selfreward.model.chat import packaged_template
from selfreward.run.metrics import (
    bootstrap_intervals,
    both_orders_verdict,
    distinct_n,
    draw_key,
    kendall_tau_b,
    pairwise_agreement,
    spearman,
)


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


def ab_token_ids(chat, template: str) -> tuple[int, list[int]]:
    """(characters to cut from the end of every rendered pairwise prompt, the token ids of "A" and "B" that
    the judge's next token is read over).

    The ids are taken in context, as score_token_ids takes the digits: the tokens the model writes right
    after the rendered prompt. A SentencePiece tokenizer (Mistral's, Llama 2's) encodes "A" alone as "▁A",
    a word-initial token the model rarely writes after the prompt's closing newline, where it writes "A".
    Where the prompt ends in a space that the tokenizer joins to the letter ("Answer: " + "A" is "Answer:"
    + "▁A"), that space is cut from the prompt and the joined token read, as the model saw it in training.
    """
    from selfreward.judge import fill_template

    prompt = chat.prompt(fill_template(template, question="", answer_a="", answer_b=""))
    for cut in (0, 1) if prompt.endswith(" ") else (0,):
        base = chat.encode(prompt[: len(prompt) - cut])
        written = [chat.encode(prompt + letter) for letter in ("A", "B")]
        ids = [tokens[-1] for tokens in written if tokens[:-1] == base]
        if len(ids) == 2 and ids[0] != ids[1]:
            return cut, ids
    raise ValueError("the pairwise judge needs 'A' and 'B' to be one token each after the pairwise prompt")


def head_to_head(picks_x_as_a: list[str], picks_x_as_b: list[str]) -> dict:
    """Wins, ties and losses of X against Y from the judge's picks in both orders, per prompt."""
    verdicts = [both_orders_verdict(a, b) for a, b in zip(picks_x_as_a, picks_x_as_b, strict=True)]
    counts = Counter(verdicts)
    n = len(verdicts)
    # A tie is the same letter in both orders: the verdict followed the position, not the answer.
    first = sum(a == b == "A" for a, b in zip(picks_x_as_a, picks_x_as_b, strict=True))
    return {
        "prompts": n,
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "win_rate": round(counts["win"] / n, 4) if n else None,
        "position_bias": round(counts["tie"] / n, 4) if n else None,
        "picked_first_both_times": first,
        "picked_second_both_times": counts["tie"] - first,
        "verdicts": verdicts,
    }


def judge_quality(rows: list[dict], scores: list[float | None], *, samples: int = 1000, seed: int = 0) -> dict:
    """The judge against human scores on held-out EFT rows (the paper's Table 4), each figure with a
    95% bootstrap interval that resamples questions (`samples` draws; 0 for none).

    Pairwise accuracy is over pairs of answers to the same question with different human scores (a
    judge tie counts half); exact match rounds the judge's score to the nearest point.
    """
    keep = [i for i, s in enumerate(scores) if s is not None]
    questions = [rows[i]["prompt"] for i in keep]
    human = [float(rows[i]["score"]) for i in keep]
    judged = [float(scores[i]) for i in keep]

    def figures(idx: list[int], group_of: list[str]) -> dict[str, float | None]:
        h, j = [human[i] for i in idx], [judged[i] for i in idx]
        return {
            "pairwise_accuracy": pairwise_agreement(group_of, h, j)[0],
            "exact_match": sum(round(b) == a for a, b in zip(h, j, strict=True)) / len(idx) if idx else None,
            "spearman": spearman(h, j),
            "kendall_tau": kendall_tau_b(h, j),
        }

    point = figures(list(range(len(keep))), questions)
    pairs = pairwise_agreement(questions, human, judged)[1]
    result = {"rows": len(rows), "scored": len(keep), "pairs": pairs}
    result.update({k: None if v is None else round(v, 4) for k, v in point.items()})
    found = bootstrap_intervals(questions, figures, samples=samples, seed=seed) if samples else {}
    result["intervals"] = {k: [round(found[k][0], 4), round(found[k][1], 4)] if found.get(k) else None for k in point}
    return result


def measure_pairwise_judge(
    backend, rows: list[dict], *, template: str | None, batch_size: int, budget: int, samples: int, seed: int
) -> dict:
    """The judge comparing two answers instead of grading one: for every two held-out answers to the same
    question with different human scores, P("A") with each answer first, averaged over both orders
    (which cancels a preference for a position). Pairwise accuracy counts a pair right when the judge's
    averaged preference points to the answer humans scored higher (exactly 0.5 counts half); position
    bias is the share of pairs where the letter picked did not change with the order."""
    from selfreward.tournament import compare, picked_same_letter, preference

    template = template if template is not None else packaged_template("pairwise_judge.txt")
    pairs = [
        (i, j)
        for i in range(len(rows))
        for j in range(i + 1, len(rows))
        if rows[i]["prompt"] == rows[j]["prompt"] and rows[i]["score"] != rows[j]["score"]
    ]
    matches = [(rows[i]["prompt"], rows[i]["response"], rows[j]["response"]) for i, j in pairs]
    results = compare(backend, matches, template=template, budget=budget, batch_size=batch_size)
    right, same_letter = [], []
    for (i, j), r in zip(pairs, results, strict=True):
        p_i = preference(r["p_a_first"], r["p_a_second"])  # i is answer a
        humans_pick_i = rows[i]["score"] > rows[j]["score"]
        right.append(0.5 if p_i == 0.5 else float((p_i > 0.5) == humans_pick_i))
        same_letter.append(float(picked_same_letter(r)))
    questions = [rows[i]["prompt"] for i, _ in pairs]

    def figures(idx: list[int], group_of: list[str]) -> dict[str, float | None]:
        return {
            "pairwise_accuracy": sum(right[i] for i in idx) / len(idx) if idx else None,
            "position_bias": sum(same_letter[i] for i in idx) / len(idx) if idx else None,
        }

    point = figures(list(range(len(pairs))), questions)
    result = {"rows": len(rows), "pairs": len(pairs), "comparisons": 2 * len(pairs)}
    result.update({k: None if v is None else round(v, 4) for k, v in point.items()})
    found = bootstrap_intervals(questions, figures, samples=samples, seed=seed) if samples else {}
    result["intervals"] = {k: [round(found[k][0], 4), round(found[k][1], 4)] if found.get(k) else None for k in point}
    return result


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
        # preferences.length_control: pairs whose chosen answer is a shorter one than the top-scored
        "shorter_chosen": None if pairs is None else sum(bool(p.get("chosen_by_length")) for p in pairs),
    }


def measure_judge(backend, eft: list[dict], cfg, *, budget: int, samples: int, seed: int) -> dict:
    """The judge `backend` holds, judged as stages 03 and 06 judge (cfg: a JudgeConfig), against the
    human scores of the held-out EFT rows: judge_quality's figures with their intervals (for mode
    pairwise, measure_pairwise_judge's: pairwise accuracy and position bias)."""
    from selfreward.judge import fit_judge_prompt, judge_all, mean_score, pairwise_template, rubric_of

    if cfg.mode == "pairwise":
        return measure_pairwise_judge(
            backend, eft, template=pairwise_template(cfg), batch_size=cfg.batch_size, budget=budget,
            samples=samples, seed=seed,
        )  # fmt: skip
    if cfg.mode == "reward_model":  # `backend` is the reward_model.RewardModel
        rewards = backend.score([backend.render(r["prompt"], r["response"], budget)[0] for r in eft], cfg.batch_size)
        # its rewards are on no 0-5 scale: only the figures that compare ranks mean anything
        return {**judge_quality(eft, rewards, samples=samples, seed=seed), "exact_match": None}
    rubric = rubric_of(cfg)
    rendered = [fit_judge_prompt(backend.chat, r["prompt"], r["response"], budget, rubric)[0] for r in eft]
    judged = judge_all(backend, rendered, cfg, seed=seed)
    return judge_quality(eft, [mean_score([j["score"] for j in js]) for js in judged], samples=samples, seed=seed)


def judge_noise(backend, prompts: list[str], scores: list[float | None], cfg, *, count: int, seed: int) -> dict:
    """How much the judge's score of the same answer moves when it is judged again, alone (batch of
    one, another sampling seed): the largest change over `count` answers drawn by hash. Differences of
    scores smaller than this say nothing about the answers."""
    from dataclasses import replace

    from selfreward.judge import judge_all, mean_score

    drawn = sorted(range(len(prompts)), key=lambda i: draw_key(prompts[i], seed))[:count]
    drawn = [i for i in drawn if scores[i] is not None]
    alone = replace(cfg, batch_size=cfg.num_samples if cfg.mode == "sample" else 1)
    again = judge_all(backend, [prompts[i] for i in drawn], alone, seed=seed + 7919)
    changes = [
        abs(s - scores[i])
        for i, js in zip(drawn, again, strict=True)
        if (s := mean_score([j["score"] for j in js])) is not None
    ]
    return {"answers": len(changes), "max_change": round(max(changes), 4) if changes else None}
