"""Stage 03: M<t-1> judges its own answers with the additive 0-5 rubric.

Reads:  <run>/M<t-1>/model/, <run>/M<t-1>/generated/responses.jsonl, <run>/M0/train/heldout_eft.jsonl
Writes: <run>/M<t-1>/generated/scores.jsonl  (the response fields + score + judgments +
        judge_input_truncated) and
        scores.{manifest.json,config.yaml}

judge.mode "sample" (the paper's way): each response is judged judge.num_samples times. Only the
judge's own generated text is parsed, and its last "Score: N" line counts; a judgment without a
valid score is kept with score null and left out of the mean. `score` is the mean of the valid
judgments, or null if none parsed. judge.mode "logits": the score is the expected digit after
"Score:" at the position SFT trained (judge.format): right at the start of the answer
(score_first, one forward pass), or after a greedy justification (score_last); the judgment also
records that distribution.

The manifest's judge_check holds what stage 04 checks before it makes pairs: the same judge on the
held-out EFT rows (pairwise accuracy and the rest, with 95% bootstrap intervals) and its noise (the
largest change of a score when judge.noise_samples answers are judged again, alone).

    python scripts/03_gen_scores.py --run-dir runs/demo --iteration 1
"""

from selfreward import cli
from selfreward.evaluation import judge_noise, measure_judge
from selfreward.generation import load_backend
from selfreward.judge import fit_judge_prompt, judge_all, mean_score, rubric_of, template_files
from selfreward.models import prompt_budget
from selfreward.records import EFT, RESPONSE, read_jsonl, write_jsonl


def main() -> None:
    stage = cli.parse_stage("03_gen_scores", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    cfg = config.judge
    responses_path = layout.generated(t, "responses")
    model_dir = layout.model(t - 1)
    heldout_path = layout.heldout("eft")
    stage.begin(inputs=[responses_path, model_dir, heldout_path, *template_files(cfg)])
    responses = read_jsonl(responses_path, RESPONSE, id_field="response_id")
    heldout = read_jsonl(heldout_path, EFT, id_field="id") if heldout_path.is_file() else []
    if not responses:
        raise cli.StageError(f"{responses_path} has no responses: nothing to judge")
    backend = load_backend(model_dir, config.model, config.generation)
    reads_text = cfg.mode == "sample" or cfg.format == "score_last"  # the judge writes before its score
    budget = prompt_budget(backend.context_length, config.model, cfg.max_new_tokens + 2 if reads_text else 1)
    rubric = rubric_of(cfg)
    fitted = [fit_judge_prompt(backend.chat, r["prompt"], r["response"], budget, rubric) for r in responses]
    prompts = [rendered for rendered, _ in fitted]
    chunks = stage.chunk_log()  # each finished batch is saved at once; a rerun after a kill skips it

    def save(batch: int, idx: list[int], judged: list[list[dict]]) -> None:
        rows = [
            {
                **responses[i],
                "score": mean_score([j["score"] for j in judgments]),
                "judgments": judgments,
                "judge_input_truncated": fitted[i][1],
            }
            for i, judgments in zip(idx, judged, strict=True)
        ]
        chunks.append(batch, rows)

    judge_all(backend, prompts, cfg, seed=config.seed + t, skip=chunks.done, on_batch=save)
    order = {r["response_id"]: n for n, r in enumerate(responses)}
    rows = sorted(chunks.rows(), key=lambda r: order[r["response_id"]])
    # What stage 04 checks before it trusts these scores: the judge on held-out human-scored answers,
    # and how far its score of one answer moves when judged again.
    check = {"judge": f"M{t - 1}"}
    if heldout:
        check["heldout"] = measure_judge(
            backend, heldout, cfg, budget=budget, samples=config.eval.bootstrap_samples, seed=config.seed
        )
    check["noise"] = judge_noise(
        backend, prompts, [r["score"] for r in rows], cfg, count=cfg.noise_samples, seed=config.seed + t
    )
    backend.close()
    total = sum(len(r["judgments"]) for r in rows)
    failed = sum(j["score"] is None for r in rows for j in r["judgments"])
    cli.log.info("%d of %d judgments had no valid score line", failed, total)
    out = layout.generated(t, "scores")
    stage.start_writing()
    write_jsonl(out, rows)
    stage.finish(
        rows_in=len(responses),
        rows_out=len(rows),
        outputs=[str(out)],
        extra={"backend": backend.name, "judgments": total, "unparsed_judgments": failed, "judge_check": check},
    )


if __name__ == "__main__":
    cli.run(main)
