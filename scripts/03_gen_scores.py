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
answer's win share and `comparisons` holds every comparison it played (see selfreward/judge/tournament.py).
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

from pathlib import Path

from selfreward.judge.judges import judge_budget, load_judge, measure_judge, measure_noise, score_rows
from selfreward.judge.rubric import template_files
from selfreward.judge.tournament import position_bias
from selfreward.run.records import EFT, RESPONSE, read_jsonl, write_jsonl
from selfreward.stage import StageError, log, parse_stage, run

# The previous judge's chunks share the chunk log, numbered from here on.
PREVIOUS_JUDGE_CHUNKS = 1_000_000


def main() -> None:
    stage = parse_stage("03_gen_scores", __doc__)
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
        raise StageError(f"{responses_path} has no responses: nothing to judge")
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
    check["noise"] = measure_noise(judge, responses, rows, config, budget=budget, seed=config.seed + t)
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
        log.info("%d comparisons (%.2f per prompt), position bias %s", comparisons, comparisons / prompts,
                     extra["position_bias"])  # fmt: skip
    elif total:
        log.info("%d of %d judgments had no valid score line", failed, total)
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
    run(main)
