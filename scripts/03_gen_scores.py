"""Stage 03: M<t-1> judges its own answers with the additive 0-5 rubric.

Reads:  <run>/M<t-1>/model/, <run>/M<t-1>/generated/responses.jsonl
Writes: <run>/M<t-1>/generated/scores.jsonl  (the response fields + score + judgments) and
        scores.{manifest.json,config.yaml}

judge.mode "sample" (the paper's way): each response is judged judge.num_samples times. Only the
judge's own generated text is parsed, and its last "Score: N" line counts; a judgment without a
valid score is kept with score null and left out of the mean. `score` is the mean of the valid
judgments, or null if none parsed. judge.mode "logits": one forward pass per response, the score is
the expected digit after "Score:", and the judgment also records that distribution.

    python scripts/03_gen_scores.py --run-dir runs/demo --iteration 1
"""

from selfreward import cli
from selfreward.chat import ChatFormat
from selfreward.generation import Sampling, generate
from selfreward.judge import judge_prompt, mean_score, parse_judge_score, score_by_logits
from selfreward.models import load_model, load_tokenizer
from selfreward.records import RESPONSE, read_jsonl, write_jsonl


def main() -> None:
    stage = cli.parse_stage("03_gen_scores", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    cfg = config.judge
    responses_path = layout.generated(t, "responses")
    responses = read_jsonl(responses_path, RESPONSE, id_field="response_id")
    model_dir = layout.model(t - 1)
    chat = ChatFormat.from_tokenizer(load_tokenizer(model_dir, config.model))
    model = load_model(model_dir, config.model)
    turns = [judge_prompt(r["prompt"], r["response"]) for r in responses]
    if cfg.mode == "logits":
        all_judgments = [[j] for j in score_by_logits(model, chat, turns, cfg.batch_size)]
    elif cfg.mode == "sample":
        sampling = Sampling(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)
        outputs = generate(
            model, chat, [chat.prompt(turn) for turn in turns], sampling, seed=config.seed + t, desc="judging"
        )
        all_judgments = [[{"score": parse_judge_score(g.text), "text": g.text} for g in gens] for gens in outputs]
    else:
        raise cli.StageError(f"judge.mode must be 'sample' or 'logits', got '{cfg.mode}'")
    rows, failed = [], 0
    for response, judgments in zip(responses, all_judgments, strict=True):
        failed += sum(j["score"] is None for j in judgments)
        rows.append({**response, "score": mean_score([j["score"] for j in judgments]), "judgments": judgments})
    total = sum(len(j) for j in all_judgments)
    cli.log.info("%d of %d judgments had no valid score line", failed, total)
    out = layout.generated(t, "scores")
    write_jsonl(out, rows)
    stage.finish(
        rows_in=len(responses),
        rows_out=len(rows),
        inputs=[str(responses_path), str(model_dir)],
        outputs=[str(out)],
        extra={"judgments": total, "unparsed_judgments": failed},
    )


if __name__ == "__main__":
    cli.run(main)
