"""Which judge runs and what it is asked: load it (judge.mode), fit its prompts, score stage 03's rows,
and measure it on held-out human-scored rows (quality) and on answers judged twice (noise).

Stages 03 and 06 judge through here, so stage 06 measures the judge the loop uses.
"""

from __future__ import annotations

from dataclasses import replace

from selfreward.judge.rubric import (
    fit_judge_prompt,
    judge_all,
    mean_score,
    pairwise_template,
    rubric_of,
    score_token_ids,
)
from selfreward.judge.tournament import compare, pairwise_scores, picked_same_letter, preference
from selfreward.model.chat import packaged_template
from selfreward.model.models import prompt_budget
from selfreward.run.metrics import bootstrap_intervals, draw_key, kendall_tau_b, pairwise_agreement, spearman


def load_judge(path, config):
    """The model that judges: judge.reward_model for judge.mode reward_model (a reward_model.RewardModel),
    else the LM in `path` (a generation backend)."""
    if config.judge.mode == "reward_model":
        from selfreward.judge.reward_model import load_reward_model  # torch

        return load_reward_model(config.judge.reward_model, config.model)
    from selfreward.model.backends import load_backend  # torch

    return load_backend(path, config.model, config.generation)


def judge_budget(judge, config) -> int:
    """Prompt tokens the judge may read. What it writes before its score (mode sample) has to fit in its
    context too. The logit judge reads the digit after the prompt and "Score: " (format score_last: after
    its justification and "\nScore: "), and that digit needs a position of its own: vLLM fails a whole
    call when one prompt is as long as its context."""
    cfg = config.judge
    if cfg.mode == "logits":
        prefix, _ = score_token_ids(judge.chat, rubric_of(cfg))
        last = cfg.format == "score_last"
        reserve = (cfg.max_new_tokens if last else 0) + len(judge.chat.encode(("\n" if last else "") + prefix)) + 1
    else:
        reserve = cfg.max_new_tokens + 2 if cfg.mode == "sample" else 1
    return prompt_budget(judge.context_length, config.model, reserve)


def score_rows(judge, responses: list[dict], config, *, budget: int, seed: int, skip=(), save=None) -> list[dict]:
    """Every response row scored by `judge` as judge.mode says. Each chunk of rows goes to save(k, rows) as
    soon as it is done; the chunks in `skip` are not judged again (their rows are not returned)."""
    cfg = config.judge
    if cfg.mode == "pairwise":
        return pairwise_scores(
            judge, responses, cfg, template=pairwise_template(cfg), budget=budget,
            prompts_per_chunk=max(1, cfg.batch_size // 2), skip=skip, on_chunk=save,
        )  # fmt: skip
    rows: list[dict] = []

    def keep(k: int, new: list[dict]) -> None:
        rows.extend(new)
        if save:
            save(k, new)

    if cfg.mode == "reward_model":
        fitted = [judge.render(r["prompt"], r["response"], budget) for r in responses]

        def rewarded(k: int, idx: list[int], rewards: list[float | None]) -> None:
            scores = [None if reward is None else round(reward, 4) for reward in rewards]  # None: it was not finite
            keep(k, [{**responses[i], "score": score, "judgments": [], "judge_input_truncated": fitted[i][1]}
                     for i, score in zip(idx, scores, strict=True)])  # fmt: skip

        judge.score([text for text, _ in fitted], cfg.batch_size, skip=skip, on_batch=rewarded)
        return rows
    rubric = rubric_of(cfg)
    fitted = [fit_judge_prompt(judge.chat, r["prompt"], r["response"], budget, rubric) for r in responses]

    def judged(k: int, idx: list[int], judgments: list[list[dict]]) -> None:
        keep(k, [{**responses[i], "score": mean_score([j["score"] for j in js]), "judgments": js,
                  "judge_input_truncated": fitted[i][1]} for i, js in zip(idx, judgments, strict=True)])  # fmt: skip

    judge_all(judge, [text for text, _ in fitted], cfg, seed=seed, skip=skip, on_batch=judged)
    return rows


def measure_noise(judge, responses: list[dict], rows: list[dict], config, *, budget: int, seed: int) -> dict:
    """The largest change of a score when judge.noise_samples answers (pairwise: prompts) drawn by hash
    are judged again, alone: differences of scores smaller than this say nothing about the answers."""
    cfg = config.judge
    if cfg.mode in ("sample", "logits"):
        rubric = rubric_of(cfg)
        prompts = [fit_judge_prompt(judge.chat, r["prompt"], r["response"], budget, rubric)[0] for r in rows]
        return judge_noise(judge, prompts, [r["score"] for r in rows], cfg, count=cfg.noise_samples, seed=seed)

    score = {r["response_id"]: r["score"] for r in rows}
    if cfg.mode == "pairwise":
        prompts = set(sorted({r["prompt_id"] for r in responses}, key=lambda p: draw_key(p, seed))[: cfg.noise_samples])
        again_of = [r for r in responses if r["prompt_id"] in prompts]
    else:
        again_of = sorted(responses, key=lambda r: draw_key(r["response_id"], seed))[: cfg.noise_samples]
    alone = replace(config, judge=replace(cfg, batch_size=2 if cfg.mode == "pairwise" else 1))
    again = score_rows(judge, again_of, alone, budget=budget, seed=seed + 7919)
    changes = [
        abs(r["score"] - score[r["response_id"]])
        for r in again
        if r["score"] is not None and score[r["response_id"]] is not None
    ]
    return {"answers": len(changes), "max_change": round(max(changes), 4) if changes else None}


def measure_judge(backend, eft: list[dict], cfg, *, budget: int, samples: int, seed: int) -> dict:
    """The judge `backend` holds, judged as stages 03 and 06 judge (cfg: a JudgeConfig), against the
    human scores of the held-out EFT rows: judge_quality's figures with their intervals (for mode
    pairwise, measure_pairwise_judge's: pairwise accuracy and position bias)."""
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


def judge_noise(backend, prompts: list[str], scores: list[float | None], cfg, *, count: int, seed: int) -> dict:
    """How much the judge's score of the same answer moves when it is judged again, alone (batch of
    one, another sampling seed): the largest change over `count` answers drawn by hash. Differences of
    scores smaller than this say nothing about the answers."""
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
