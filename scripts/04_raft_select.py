"""Stage 04 of RAFT: keep the best-judged answers, to fine-tune on.

Reads:  <run>/M<t-1>/generated/scores.jsonl (raft.samples_per_prompt answers per SFT prompt, judged by
        stage 03 with judge.mode, any of them)
Writes: <run>/M<t-1>/generated/selected.jsonl  (prompt_id, response_id, prompt, completion, score) and
        selected.{manifest.json,config.yaml}

LMFlow's discard filter first drops empty, cut-off (unless raft.keep_cut_off) and repetitive answers
(raft.min_distinct_2); then raft.ranking "local" keeps the top raft.keep share of each prompt's
answers (at least one), "global" the top share of all of them. The manifest gives what RAFT reports
every iteration: the mean score of all answers and of the kept ones, and the diversity (distinct-2)
of both, with the count discarded per reason.

    python scripts/04_raft_select.py --run-dir runs/raft --iteration 1
"""

import statistics

from selfreward.loop.raft import select
from selfreward.run.metrics import distinct_n
from selfreward.run.records import SCORE, read_jsonl, write_jsonl
from selfreward.stage import log, parse_stage, run


def main() -> None:
    stage = parse_stage("04_raft_select", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    scores_path = layout.generated(t, "scores")
    stage.begin(inputs=[scores_path])
    scored = read_jsonl(scores_path, SCORE, id_field="response_id")
    kept, discarded = select(scored, config.raft)
    if not kept and stage.dry_run:
        # A random model writes no "Score: N": rank the answers by their sample index instead, so the
        # dry run still fine-tunes on rows of the configured shape (as stage 04 of srlm does).
        scored = [{**r, "score": float(-r["sample_index"])} for r in scored]
        kept, discarded = select(scored, config.raft)
        log.info("dry run: the stand-in judged nothing; %d answers kept by sample index", len(kept))

    def mean(values):
        values = [v for v in values if v is not None]
        return round(statistics.fmean(values), 4) if values else None

    def diversity(texts):
        d = distinct_n(texts, 2)
        return None if d is None else round(d, 4)

    figures = {
        "mean_score_all": mean(r["score"] for r in scored),
        "mean_score_kept": mean(r["score"] for r in kept),
        "distinct_2_all": diversity([r["response"] for r in scored]),
        "distinct_2_kept": diversity([r["completion"] for r in kept]),
    }
    log.info("kept %d of %d answers; discarded: %s; %s", len(kept), len(scored), dict(discarded) or "none", figures)
    out = layout.generated(t, "selected")
    stage.start_writing()
    write_jsonl(out, kept)
    stage.finish(
        rows_in=len(scored),
        rows_out=len(kept),
        outputs=[str(out)],
        extra={"discarded": dict(discarded), "ranking": config.raft.ranking, "keep": config.raft.keep, **figures},
    )


if __name__ == "__main__":
    run(main)
