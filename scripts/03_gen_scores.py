"""Stage 03: the judge scores every answer; by default M<t-1> judges its own answers with the 0-5 rubric.

Reads:  <run>/M<t-1>/model/ (the judge, unless judge.mode is reward_model), <run>/M<t-1>/generated/
        responses.jsonl, <run>/M0/train/heldout_eft.jsonl; with preferences.consistency, also M<t-2>/model/
Writes: <run>/M<t-1>/generated/scores.jsonl  (the response fields + score + judgments +
        judge_input_truncated; pairwise adds win_share and comparisons; consistency adds previous_score)
        and scores.{manifest.json,config.yaml}

judge.mode "sample" (the paper's way): each response is judged judge.num_samples times. Only the
judge's own generated text is parsed, and its last "Score: N" line counts; a judgment without a
valid score is kept with score null and left out of the mean. `score` is the mean of the valid
judgments, or null if none parsed. judge.mode "logits": the score is the expected digit after
"Score:" at the position SFT trained (judge.format): right at the start of the answer
(score_first, one forward pass), or after a greedy justification (score_last); the judgment also
records that distribution. judge.mode "pairwise": a prompt's answers meet two at a time
(judge.ranking: knockout or round_robin), each comparison asked in both orders; `score` is 5 x the
answer's win share and `comparisons` holds every comparison it played (see selfreward/tournament.py).
judge.mode "reward_model": judge.reward_model, a sequence classifier, scores each answer in its own
chat template; `score` is its reward.

With preferences.consistency (from iteration 2), the judge before it, M<t-2>, scores the same answers
the same way into `previous_score`, for stage 04's agreement check (CREAM).

The manifest's judge_check holds what stage 04 checks before it makes pairs: the same judge on the
held-out EFT rows (pairwise accuracy and the rest, with 95% bootstrap intervals) and its noise (the
largest change of a score when judge.noise_samples answers, or prompts for pairwise, are judged again,
alone).

    python scripts/03_gen_scores.py --run-dir runs/demo --iteration 1
    python scripts/03_gen_scores.py --run-dir runs/demo --iteration 1 --judge.mode pairwise
"""

from dataclasses import replace
from pathlib import Path

from selfreward import cli
from selfreward.evaluation import judge_noise, measure_judge
from selfreward.judge import (
    fit_judge_prompt,
    judge_all,
    judge_budget,
    load_judge,
    mean_score,
    pairwise_template,
    rubric_of,
    template_files,
)
from selfreward.run.metrics import draw_key
from selfreward.run.records import EFT, RESPONSE, read_jsonl, write_jsonl
from selfreward.tournament import pairwise_scores, position_bias

# The previous judge's chunks share the chunk log, numbered from here on.
PREVIOUS_JUDGE_CHUNKS = 1_000_000


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


def noise(judge, responses: list[dict], rows: list[dict], config, *, budget: int, seed: int) -> dict:
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


def main() -> None:
    stage = cli.parse_stage("03_gen_scores", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    cfg = config.judge
    responses_path = layout.generated(t, "responses")
    heldout_path = layout.heldout("eft")
    judge_path = cfg.reward_model if cfg.mode == "reward_model" else layout.model(t - 1)
    previous = layout.model(t - 2) if config.preferences.consistency != "off" and t >= 2 else None
    inputs = [responses_path, heldout_path, *template_files(cfg)]
    inputs += [p for p in (judge_path, previous) if p is not None and Path(p).exists()]
    stage.begin(inputs=inputs)
    responses = read_jsonl(responses_path, RESPONSE, id_field="response_id")
    heldout = read_jsonl(heldout_path, EFT, id_field="id") if heldout_path.is_file() else []
    if not responses:
        raise cli.StageError(f"{responses_path} has no responses: nothing to judge")
    chunks = stage.chunk_log()  # each finished batch is saved at once; a rerun after a kill skips it
    order = {r["response_id"]: n for n, r in enumerate(responses)}

    def judged_by(judge, seed: int, first_chunk: int) -> list[dict]:
        span = range(first_chunk, first_chunk + PREVIOUS_JUDGE_CHUNKS)
        done = {k - first_chunk for k in chunks.done if k in span}
        score_rows(judge, responses, config, budget=judge_budget(judge, config), seed=seed, skip=done,
                   save=lambda k, rows: chunks.append(first_chunk + k, rows))  # fmt: skip
        rows = [row for k in sorted(chunks.done) if k in span for row in chunks.done[k]["rows"]]
        return sorted(rows, key=lambda r: order[r["response_id"]])

    judge = load_judge(judge_path, config)
    rows = judged_by(judge, config.seed + t, 0)
    # What stage 04 checks before it trusts these scores: the judge on held-out human-scored answers,
    # and how far its score of one answer moves when judged again.
    budget = judge_budget(judge, config)
    check = {"judge": "reward model" if cfg.mode == "reward_model" else f"M{t - 1}"}
    if heldout:
        check["heldout"] = measure_judge(
            judge, heldout, cfg, budget=budget, samples=config.eval.bootstrap_samples, seed=config.seed
        )
    check["noise"] = noise(judge, responses, rows, config, budget=budget, seed=config.seed + t)
    judge.close()
    extra = {"backend": judge.name}
    if cfg.mode == "reward_model":  # NaN or inf (see RewardModel.score), given as no score
        extra["non_finite_rewards"] = judge.non_finite
    if previous is not None:  # CREAM: the judge before it scores the same answers the same way
        before = load_judge(previous, config)
        previous_scores = {
            r["response_id"]: r["score"] for r in judged_by(before, config.seed + t, PREVIOUS_JUDGE_CHUNKS)
        }
        before.close()
        rows = [{**r, "previous_score": previous_scores[r["response_id"]]} for r in rows]
        extra["previous_judge"] = f"M{t - 2}"
    total = sum(len(r["judgments"]) for r in rows)
    failed = sum(j["score"] is None for r in rows for j in r["judgments"])
    if cfg.mode == "pairwise":
        comparisons = sum(len(r["comparisons"]) for r in rows) / 2  # each one is in both answers' rows
        prompts = len({r["prompt_id"] for r in rows})
        extra["comparisons"] = int(comparisons)
        extra["comparisons_per_prompt"] = round(comparisons / prompts, 4)
        extra["position_bias"] = position_bias(rows)
        cli.log.info("%d comparisons (%.2f per prompt), position bias %s", comparisons, comparisons / prompts,
                     extra["position_bias"])  # fmt: skip
    elif total:
        cli.log.info("%d of %d judgments had no valid score line", failed, total)
    out = layout.generated(t, "scores")
    stage.start_writing()
    write_jsonl(out, rows)
    stage.finish(
        rows_in=len(responses),
        rows_out=len(rows),
        outputs=[str(out)],
        extra={**extra, "judgments": total, "unparsed_judgments": failed, "judge_check": check},
    )


if __name__ == "__main__":
    cli.run(main)
