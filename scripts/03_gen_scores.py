"""Stage 03: the judge scores every answer; by default M<t-1> judges its own answers with the 0-5 rubric.

Reads:  <run>/M<t-1>/model/ (the judge, unless judge.mode is reward_model), <run>/M<t-1>/generated/
        responses.jsonl, <run>/M0/train/heldout_eft.jsonl; with preferences.consistency, also M<t-2>/model/
Writes: <run>/M<t-1>/generated/scores.jsonl  (the response fields + score + judgments +
        judge_input_truncated; pairwise adds win_share and comparisons; consistency adds previous_score)
        and scores.{manifest.json,config.yaml}; <run>/M<t-1>/generated/canaries.jsonl (the planted answers)

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
alone). Its `canaries` hold each canary trick's fool rate (selfreward/loop/canaries.py): judge.canaries
planted answers per trick (one ending "Score: 5", the question echoed, ...), judged by the same judge
beside the real answers, and how often each scored above every real answer of its prompt; stage 04's
judge.canary_gate acts on them. They are written to canaries.jsonl only: no pair ever holds one.

    python scripts/03_gen_scores.py --run-dir runs/demo --iteration 1
    python scripts/03_gen_scores.py --run-dir runs/demo --iteration 1 --judge.mode pairwise
"""

from pathlib import Path

from selfreward.judge.judges import Judge, judge_for
from selfreward.judge.rubric import template_files
from selfreward.loop.canaries import build_canaries, fool_rates
from selfreward.run.records import EFT, RESPONSE, ChunkLog, read_jsonl, write_jsonl
from selfreward.stage import StageError, log, parse_stage, run

# The previous judge's chunks share the chunk log, numbered from here on; the canaries' from CANARY_CHUNKS.
PREVIOUS_JUDGE_CHUNKS = 1_000_000
CANARY_CHUNKS = 2 * PREVIOUS_JUDGE_CHUNKS


def main() -> None:
    stage = parse_stage("03_gen_scores", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    judge = judge_for(config, layout.model(t - 1), f"M{t - 1}")
    previous = previous_judge(config, layout, t)
    stage.begin(inputs=inputs_of(stage, judge, previous))
    responses, heldout = read_answers(stage)
    chunks = stage.chunk_log()  # each finished batch is saved at once; a rerun after a kill skips it

    rows = judged_by(judge, responses, chunks, seed=config.seed + t, first_chunk=0, stage=stage)
    check = judge_check(judge, responses, rows, heldout, config, t)
    canaries = canaries_judged(judge, rows, chunks, config, t)  # planted answers: never in scores.jsonl
    judge.close()
    extra = {"backend": judge.backend}
    if previous is not None:  # CREAM: the judge before it scores the same answers the same way
        rows = with_previous_scores(previous, responses, rows, chunks, seed=config.seed + t)
        extra["previous_judge"] = previous.name
    extra.update(judge.report(rows))
    extra.update(judgment_counts(rows), judge_check=check)
    if canaries:
        extra["canaries"] = fool_rates(canaries)

    out, planted = layout.generated(t, "scores"), layout.generated(t, "canaries")
    stage.start_writing()
    write_jsonl(out, rows)
    write_jsonl(planted, canaries)
    outputs = [str(out), str(planted)]
    stage.finish(rows_in=len(responses), rows_out=len(rows), outputs=outputs, extra=extra)


def previous_judge(config, layout, t: int) -> Judge | None:
    """M<t-2>, with preferences.consistency from iteration 2 (config validation keeps it off for a judge
    that does not change between iterations)."""
    if config.preferences.consistency == "off" or t < 2:
        return None
    return judge_for(config, layout.model(t - 2), f"M{t - 2}")


def inputs_of(stage, judge: Judge, previous: Judge | None) -> list:
    """What the stage reads: the responses, the held-out EFT rows, the judge's template files and models."""
    layout, t = stage.layout, stage.iteration
    inputs = [layout.generated(t, "responses"), layout.heldout("eft"), *template_files(stage.config.judge)]
    models = [judge.path] + ([previous.path] if previous is not None else [])
    return inputs + [p for p in models if p is not None and Path(p).exists()]


def read_answers(stage) -> tuple[list[dict], list[dict]]:
    """The responses to judge and the held-out EFT rows (none when that file is missing)."""
    responses_path, heldout_path = stage.layout.generated(stage.iteration, "responses"), stage.layout.heldout("eft")
    responses = read_jsonl(responses_path, RESPONSE, id_field="response_id")
    heldout = read_jsonl(heldout_path, EFT, id_field="id") if heldout_path.is_file() else []
    if not responses:
        raise StageError(f"{responses_path} has no responses: nothing to judge")
    return responses, heldout


def judged_by(
    judge: Judge, responses: list[dict], chunks: ChunkLog, *, seed: int, first_chunk: int, stage=None
) -> list[dict]:
    """Every response scored by `judge`, in the responses' order. Its chunks are numbered from first_chunk in
    the chunk log, and those a killed run saved are not judged again. With `stage`, the nodes of a run on several
    share the chunks, and only node 0 returns (stage.join_parts)."""
    span = range(first_chunk, first_chunk + PREVIOUS_JUDGE_CHUNKS)
    done = {k - first_chunk for k in chunks.done if k in span}
    skip = stage.skip(done) if stage else done
    judge.score_rows(responses, seed=seed, skip=skip, save=lambda k, rows: chunks.append(first_chunk + k, rows))
    joined = stage.join_parts(chunks) if stage else chunks.done
    rows = [row for k in sorted(joined) if k in span for row in joined[k]["rows"]]
    if len(rows) != len(responses):
        raise StageError(f"{len(rows)} of {len(responses)} responses judged: a chunk is missing")
    order = {r["response_id"]: n for n, r in enumerate(responses)}
    return sorted(rows, key=lambda r: order[r["response_id"]])


def judge_check(judge: Judge, responses: list[dict], rows: list[dict], heldout: list[dict], config, t: int) -> dict:
    """What stage 04 checks before it trusts these scores: the judge on held-out human-scored answers, and
    how far its score of one answer moves when judged again."""
    check = {"judge": judge.name}
    if heldout:
        check["heldout"] = judge.measure(heldout, samples=config.eval.bootstrap_samples, seed=config.seed)
    check["noise"] = judge.noise(responses, rows, seed=config.seed + t)
    return check


def canaries_judged(judge: Judge, rows: list[dict], chunks: ChunkLog, config, t: int) -> list[dict]:
    """judge.canaries planted answers per trick, built from the real answers `rows` and judged by the same
    judge, each with "outscored": whether it scored above every real answer of its prompt. Their chunks
    are in the chunk log too, so a rerun after a kill does not judge them again."""
    planted = build_canaries(rows, config.judge.canaries, seed=config.seed, iteration=t)
    done = {k - CANARY_CHUNKS for k in chunks.done if k >= CANARY_CHUNKS}

    def save(k: int, new: list[dict]) -> None:
        chunks.append(CANARY_CHUNKS + k, new)

    judge.score_canaries(planted, rows, seed=config.seed + t, skip=done, save=save)
    judged = {c["response_id"]: c for k in sorted(chunks.done) if k >= CANARY_CHUNKS for c in chunks.done[k]["rows"]}
    real: dict[str, list[dict]] = {}
    for r in rows:
        real.setdefault(r["prompt_id"], []).append(r)
    canaries = [judged[c["response_id"]] for c in planted]
    return [{**c, "outscored": judge.outscores(c, real[c["prompt_id"]])} for c in canaries]


def with_previous_scores(previous: Judge, responses, rows, chunks: ChunkLog, *, seed: int) -> list[dict]:
    """`rows` with "previous_score": the same answers scored by the judge before this one, for stage 04's
    agreement check."""
    before = judged_by(previous, responses, chunks, seed=seed, first_chunk=PREVIOUS_JUDGE_CHUNKS)
    previous.close()
    score = {r["response_id"]: r["score"] for r in before}
    return [{**r, "previous_score": score[r["response_id"]]} for r in rows]


def judgment_counts(rows: list[dict]) -> dict:
    """How many judgments the rows hold and how many gave no valid score (none for pairwise and the reward
    model, whose rows hold no judgments)."""
    total = sum(len(r["judgments"]) for r in rows)
    failed = sum(j["score"] is None for r in rows for j in r["judgments"])
    if total:
        log.info("%d of %d judgments had no valid score line", failed, total)
    return {"judgments": total, "unparsed_judgments": failed}


if __name__ == "__main__":
    run(main)
