"""Stage 01: M<t-1> writes new prompts from few-shot examples of the IFT prompts.

Reads:  <run>/M<t-1>/model/, <run>/M0/train/ift.jsonl (the shots)
Writes: <run>/M<t-1>/generated/prompts.jsonl  (prompt_id, prompt, source, iteration)
        and prompts.{manifest.json,config.yaml}

Each request shows prompts.num_shots random IFT prompts (seeded) and asks for one more; where that is
longer than the context leaves (generation.max_model_len or the model's, less prompts.max_new_tokens;
at most model.max_prompt_tokens), its longest shots are left out, and a request that one shot alone
overfills is not sent (rejected as shot_longer_than_context). Only the newly generated tokens are read.
Prompts cut off by prompts.max_new_tokens, empty, overlong and duplicate prompts, near copies of each
other, and copies of any IFT prompt (the shots included) are dropped. The stage stops at
prompts.num_prompts or after prompts.max_attempts candidates, and reports both.

    python scripts/01_gen_prompts.py --run-dir runs/demo --iteration 1
"""

import random
from collections import Counter

from selfreward.loop.prompt_gen import (
    PromptFilter,
    extract_new_task,
    fit_fewshot_request,
    is_cut_off,
    pick_shots,
    prompt_id,
)
from selfreward.model.models import prompt_budget
from selfreward.run.records import IFT, read_jsonl, write_jsonl
from selfreward.stage import StageError, log, parse_stage, run


def main() -> None:
    stage = parse_stage("01_gen_prompts", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    cfg = config.prompts
    ift_path = layout.train_dir(0) / "ift.jsonl"
    model_dir = layout.model(t - 1)
    stage.begin(inputs=[ift_path, model_dir])
    # Imported once the stage runs: a complete stage (--skip-if-complete) exits without loading PyTorch.
    from selfreward.model.backends import load_backend
    from selfreward.model.generation import Sampling

    pool = read_shots(ift_path)
    backend = load_backend(model_dir, config.model, config.generation)
    budget = request_budget(backend, cfg.max_new_tokens, config.model)
    # Held-out prompts are never shown as shots, and a copy of one is rejected like a copy of a shot.
    keep = PromptFilter(pool + heldout_prompts(layout), cfg.min_chars, cfg.max_chars, cfg.near_duplicate_threshold)
    sampling = Sampling(1, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)
    rows, rejected, attempts, shots_dropped = new_prompts(backend, pool, keep, stage, sampling, budget, config, t)
    backend.close()
    log_outcome(cfg, len(rows), rejected, attempts, shots_dropped, budget)

    out = layout.generated(t, "prompts")
    stage.start_writing()
    write_jsonl(out, rows)
    stage.finish(
        rows_in=len(pool),
        rows_out=len(rows),
        outputs=[str(out)],
        extra={
            "target": cfg.num_prompts,
            "attempts": attempts,
            "max_attempts": cfg.max_attempts,
            "rejected": dict(rejected),
            # shots dropped from requests that were too long for the context (the longest first)
            "context": {"prompt_budget": budget, "shots_dropped": shots_dropped},
            "backend": backend.name,
        },
    )


def read_shots(ift_path) -> list[str]:
    """The IFT prompts the shots are drawn from."""
    pool = [row["prompt"] for row in read_jsonl(ift_path, IFT, id_field="id")]
    if not pool:
        raise StageError(f"{ift_path}: no IFT prompts to use as shots")
    return pool


def request_budget(backend, max_new_tokens: int, model_config) -> int:
    """The prompt tokens a request may take; an error when the request without shots is already longer."""
    budget = prompt_budget(backend.context_length, model_config, max_new_tokens)
    if fit_fewshot_request(backend.chat, [""], budget)[0] is None:
        raise StageError(
            f"the prompt-generation request alone is longer than the {budget} prompt tokens the context leaves "
            f"after prompts.max_new_tokens ({max_new_tokens}); lower it or raise generation.max_model_len"
        )
    return budget


def heldout_prompts(layout) -> list[str]:
    """Stage 06's held-out prompts (none when that file is missing)."""
    heldout_path = layout.heldout("prompts")
    return [r["prompt"] for r in read_jsonl(heldout_path, IFT)] if heldout_path.is_file() else []


def new_prompts(backend, pool: list[str], keep: PromptFilter, stage, sampling, budget: int, config, t: int):
    """(the new prompt rows, rejections by reason, attempts, shots dropped), batch by batch until
    prompts.num_prompts are kept or prompts.max_attempts are spent. Each batch's answers are saved as they come
    (a rerun after a kill replays them instead of generating them again) and filtered in batch order. On several
    nodes the batches go round a wave at a time (node r makes batch w x N + r); every node filters the whole wave
    in order, so each stops where one node would have."""
    cfg = config.prompts
    rng = random.Random(f"{config.seed}-prompts-{t}")
    chunks = stage.chunk_log()
    found = Found()
    batch = planned = 0
    while found.wants_more(cfg) and planned < cfg.max_attempts:
        wave = []
        for _ in range(stage.node.nnodes):
            if planned >= cfg.max_attempts:
                break
            count = min(cfg.batch_size, cfg.max_attempts - planned)
            wave.append((batch, [pick_shots(pool, cfg.num_shots, rng) for _ in range(count)], planned))
            batch, planned = batch + 1, planned + count  # shots are drawn even when resuming
        for b, shots, attempt in wave:
            if b not in stage.skip({k for k, chunk in chunks.done.items() if "raw" in chunk["state"]}):
                chunks.append(b, [], answered(backend, shots, sampling, budget, config, t, attempt))
        saved = stage.wave(chunks, [b for b, _, _ in wave])
        for b, shots, _ in wave:
            if found.wants_more(cfg):
                found.add(
                    filtered(saved[b]["state"], keep, cfg, t, wanted=cfg.num_prompts - len(found.rows)), len(shots)
                )
    stage.join_parts(chunks)  # another node ends here once node 0 has written the prompts
    return found.rows, found.rejected, found.attempts, found.shots_dropped


class Found:
    """The prompts kept so far, the rejections by reason, the attempts and the shots dropped."""

    def __init__(self):
        self.rows, self.rejected, self.attempts, self.shots_dropped = [], Counter(), 0, 0

    def wants_more(self, cfg) -> bool:
        return len(self.rows) < cfg.num_prompts and self.attempts < cfg.max_attempts

    def add(self, batch: tuple[list[dict], Counter, int], attempts: int) -> None:
        rows, rejected, dropped = batch
        self.rows += rows
        self.rejected += rejected
        self.shots_dropped += dropped
        self.attempts += attempts


def answered(backend, shots, sampling, budget: int, config, t: int, attempt: int) -> dict:
    """One batch: a request per set of shots, fitted to the context (its longest shots dropped, or not sent when
    one shot alone is too long), and what the model wrote after each request's "Task N+1:"."""
    fitted = [fit_fewshot_request(backend.chat, example, budget) for example in shots]
    requests = [request for request, _ in fitted if request is not None]
    outputs = backend.generate(requests, sampling, seed=config.seed + t, desc=f"prompts (try {attempt})")
    return {
        "raw": [[gen.text, gen.finish_reason] for (gen,) in outputs],
        "shots_dropped": sum(dropped for request, dropped in fitted if request is not None),
        "unsent": len(fitted) - len(requests),
    }


def filtered(state: dict, keep: PromptFilter, cfg, t: int, *, wanted: int) -> tuple[list[dict], Counter, int]:
    """A saved batch's new prompts that the filter keeps, at most `wanted`; (rows, rejections by reason, shots
    dropped). The filter learns each kept prompt, so later batches reject copies of it."""
    new_rows, new_rejected = [], Counter()
    if state["unsent"]:
        new_rejected["shot_longer_than_context"] = state["unsent"]
    for text, finish_reason in state["raw"]:
        candidate = extract_new_task(text)
        cut_off = not cfg.keep_cut_off and is_cut_off(text, finish_reason)
        reason = "cut_off" if cut_off else keep.add(candidate)
        if reason:
            new_rejected[reason] += 1
            continue
        new_rows.append({"prompt_id": prompt_id(candidate), "prompt": candidate, "source": f"M{t - 1}", "iteration": t})
        if len(new_rows) == wanted:
            break
    return new_rows, new_rejected, state["shots_dropped"]


def log_outcome(cfg, kept: int, rejected: Counter, attempts: int, shots_dropped: int, budget: int) -> None:
    """How many prompts were kept and why the others were not."""
    log.info(
        "%d new prompts of %d wanted after %d attempts (limit %d); rejected: %s",
        kept,
        cfg.num_prompts,
        attempts,
        cfg.max_attempts,
        dict(rejected) or "none",
    )
    if shots_dropped:
        log.info("%d shots were dropped from requests longer than %d prompt tokens", shots_dropped, budget)


if __name__ == "__main__":
    run(main)
