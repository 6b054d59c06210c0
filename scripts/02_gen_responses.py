"""Stage 02: M<t-1> answers every new prompt responses.num_samples times.

Reads:  <run>/M<t-1>/model/, <run>/M<t-1>/generated/prompts.jsonl
Writes: <run>/M<t-1>/generated/responses.jsonl  (prompt_id, response_id, prompt, response,
        sample_index, finish_reason, num_tokens) and responses.{manifest.json,config.yaml}

Sampling is batched (prompts x samples per generate call) at responses.temperature/top_p. Each
answer records why it ended: "eos" (the model closed its turn) or "length" (max_new_tokens).
Answers are kept exactly as generated: nothing is trimmed.

    python scripts/02_gen_responses.py --run-dir runs/demo --iteration 1
"""

from selfreward import cli
from selfreward.chat import ChatFormat
from selfreward.generation import Sampling, generate
from selfreward.models import load_model, load_tokenizer
from selfreward.records import PROMPT, read_jsonl, write_jsonl


def main() -> None:
    stage = cli.parse_stage("02_gen_responses", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    cfg = config.responses
    prompts_path = layout.generated(t, "prompts")
    prompts = read_jsonl(prompts_path, PROMPT, id_field="prompt_id")
    model_dir = layout.model(t - 1)
    chat = ChatFormat.from_tokenizer(load_tokenizer(model_dir, config.model))
    model = load_model(model_dir, config.model)
    sampling = Sampling(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)
    outputs = generate(
        model, chat, [chat.prompt(p["prompt"]) for p in prompts], sampling, seed=config.seed + t, desc="responses"
    )
    rows = []
    for prompt, gens in zip(prompts, outputs, strict=True):
        for k, gen in enumerate(gens):
            rows.append(
                {
                    "prompt_id": prompt["prompt_id"],
                    "response_id": f"{prompt['prompt_id']}-r{k}",
                    "prompt": prompt["prompt"],
                    "response": gen.text,
                    "sample_index": k,
                    "finish_reason": gen.finish_reason,
                    "num_tokens": gen.num_tokens,
                }
            )
    out = layout.generated(t, "responses")
    write_jsonl(out, rows)
    stage.finish(
        rows_in=len(prompts), rows_out=len(rows), inputs=[str(prompts_path), str(model_dir)], outputs=[str(out)]
    )


if __name__ == "__main__":
    cli.run(main)
