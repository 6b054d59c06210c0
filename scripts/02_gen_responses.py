"""Stage 02: M<t-1> answers every new prompt responses.num_samples times (spin: once; raft: raft.samples_per_prompt).

Reads:  <run>/M<t-1>/model/, <run>/M<t-1>/generated/prompts.jsonl
Writes: <run>/M<t-1>/generated/responses.jsonl  (prompt_id, response_id, prompt, response,
        sample_index, finish_reason, num_tokens, prompt_truncated) and responses.{manifest.json,config.yaml}

Sampling is batched (prompts x samples per call) at responses.temperature/top_p, with the backend
of generation.backend (hf or vllm; the manifest records which). Each
answer records why it ended: "eos" (the model closed its turn) or "length" (max_new_tokens).
Answers are kept exactly as generated: nothing is trimmed.

    python scripts/02_gen_responses.py --run-dir runs/demo --iteration 1
"""

from selfreward.model.models import prompt_budget
from selfreward.run.records import PROMPT, read_jsonl, write_jsonl
from selfreward.run.stages import responses_per_prompt
from selfreward.stage import StageError, log, parse_stage, run


def response_rows(prompt: dict, gens, truncated: bool) -> list[dict]:
    return [
        {
            "prompt_id": prompt["prompt_id"],
            "response_id": f"{prompt['prompt_id']}-r{k}",
            "prompt": prompt["prompt"],
            "response": gen.text,
            "sample_index": k,
            "finish_reason": gen.finish_reason,
            "num_tokens": gen.num_tokens,
            "prompt_truncated": truncated,
        }
        for k, gen in enumerate(gens)
    ]


def in_prompt_order(chunks: dict[int, dict], prompts: list[dict], samples: int) -> list[dict]:
    """The rows of every batch, by prompt then sample; an error when a batch is missing (a node's part cut short)."""
    order = {p["prompt_id"]: n for n, p in enumerate(prompts)}
    rows = sorted(
        (r for k in sorted(chunks) for r in chunks[k]["rows"]), key=lambda r: (order[r["prompt_id"]], r["sample_index"])
    )
    if len(rows) != len(prompts) * samples:
        raise StageError(f"{len(rows)} answers for {len(prompts)} prompts x {samples} samples: a batch is missing")
    return rows


def main() -> None:
    stage = parse_stage("02_gen_responses", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    cfg = config.responses
    prompts_path = layout.generated(t, "prompts")
    model_dir = layout.model(t - 1)
    stage.begin(inputs=[prompts_path, model_dir])
    # Imported once the stage runs: a complete stage (--skip-if-complete) exits without loading PyTorch.
    from selfreward.model.backends import load_backend
    from selfreward.model.generation import Sampling

    prompts = read_jsonl(prompts_path, PROMPT, id_field="prompt_id")
    if not prompts:
        raise StageError(f"{prompts_path} has no prompts: nothing to answer (see stage 01's manifest)")
    backend = load_backend(model_dir, config.model, config.generation)
    budget = prompt_budget(backend.context_length, config.model, cfg.max_new_tokens)
    fitted = [backend.chat.fit(p["prompt"], budget) for p in prompts]
    if any(cut for _, cut in fitted):
        log.warning("%d prompts were longer than %d tokens and were cut", sum(c for _, c in fitted), budget)
    sampling = Sampling(responses_per_prompt(config), cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)
    chunks = stage.chunk_log()  # each finished batch is saved at once; a rerun after a kill skips it
    backend.generate(
        [rendered for rendered, _ in fitted],
        sampling,
        seed=config.seed + t,
        desc="responses",
        skip=stage.skip(chunks.done),  # on several nodes, also the other nodes' batches
        on_batch=lambda b, idx, gens: chunks.append(
            b, [r for i, g in zip(idx, gens, strict=True) for r in response_rows(prompts[i], g, fitted[i][1])]
        ),
    )
    backend.close()
    rows = in_prompt_order(stage.join_parts(chunks), prompts, sampling.num_samples)
    out = layout.generated(t, "responses")
    stage.start_writing()
    write_jsonl(out, rows)
    stage.finish(rows_in=len(prompts), rows_out=len(rows), outputs=[str(out)], extra={"backend": backend.name})


if __name__ == "__main__":
    run(main)
