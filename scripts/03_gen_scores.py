"""Stage 03: M<t-1> judges its own answers with the additive 0-5 rubric.

Reads:  <run>/M<t-1>/model/, <run>/M<t-1>/generated/responses.jsonl
Writes: <run>/M<t-1>/generated/scores.jsonl  (the response fields + score + judgments +
        judge_input_truncated) and
        scores.{manifest.json,config.yaml}

judge.mode "sample" (the paper's way): each response is judged judge.num_samples times. Only the
judge's own generated text is parsed, and its last "Score: N" line counts; a judgment without a
valid score is kept with score null and left out of the mean. `score` is the mean of the valid
judgments, or null if none parsed. judge.mode "logits": one forward pass per response, the score is
the expected digit after "Score:", and the judgment also records that distribution.

    python scripts/03_gen_scores.py --run-dir runs/demo --iteration 1
"""

from selfreward import cli
from selfreward.generation import Sampling, load_backend
from selfreward.judge import fit_judge_prompt, mean_score, parse_judge_score, score_by_logits
from selfreward.models import prompt_budget
from selfreward.records import RESPONSE, read_jsonl, write_jsonl


def main() -> None:
    stage = cli.parse_stage("03_gen_scores", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    cfg = config.judge
    responses_path = layout.generated(t, "responses")
    model_dir = layout.model(t - 1)
    stage.begin(inputs=[responses_path, model_dir])
    if cfg.mode not in ("sample", "logits"):
        raise cli.StageError(f"judge.mode must be 'sample' or 'logits', got '{cfg.mode}'")
    responses = read_jsonl(responses_path, RESPONSE, id_field="response_id")
    if not responses:
        raise cli.StageError(f"{responses_path} has no responses: nothing to judge")
    backend = load_backend(model_dir, config.model, config.generation)
    budget = prompt_budget(backend.context_length, config.model, cfg.max_new_tokens if cfg.mode == "sample" else 1)
    fitted = [fit_judge_prompt(backend.chat, r["prompt"], r["response"], budget) for r in responses]
    prompts = [rendered for rendered, _ in fitted]
    chunks = stage.chunk_log()  # each finished batch is saved at once; a rerun after a kill skips it

    def save(batch: int, idx: list[int], judged: list) -> None:
        if cfg.mode == "sample":
            judged = [[{"score": parse_judge_score(g.text), "text": g.text} for g in gens] for gens in judged]
        else:
            judged = [[j] for j in judged]
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

    if cfg.mode == "logits":
        score_by_logits(backend, prompts, cfg.batch_size, skip=chunks.done, on_batch=save)
    else:
        sampling = Sampling(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)
        backend.generate(prompts, sampling, seed=config.seed + t, desc="judging", skip=chunks.done, on_batch=save)
    backend.close()
    order = {r["response_id"]: n for n, r in enumerate(responses)}
    rows = sorted(chunks.rows(), key=lambda r: order[r["response_id"]])
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
        extra={"backend": backend.name, "judgments": total, "unparsed_judgments": failed},
    )


if __name__ == "__main__":
    cli.run(main)
