"""Stage 04: turn scored answers into preference pairs, best against worst per prompt.

Reads:  <run>/M<t-1>/generated/scores.jsonl
Writes: <run>/M<t-1>/generated/preferences.jsonl  (prompt_id, prompt, chosen, rejected,
        score_chosen, score_rejected) and preferences.{manifest.json,config.yaml}

A prompt yields no pair when fewer than two of its answers have a score, when best and worst tie,
when their texts are identical, or when the gap is below preferences.min_margin; the manifest
counts each reason.

    python scripts/04_gen_preferences.py --run-dir runs/demo --iteration 1
"""

from selfreward import cli
from selfreward.pairs import build_pairs
from selfreward.records import SCORE, read_jsonl, write_jsonl


def main() -> None:
    stage = cli.parse_stage("04_gen_preferences", __doc__)
    layout, t = stage.layout, stage.iteration
    scores_path = layout.generated(t, "scores")
    stage.begin(inputs=[scores_path])
    scored = read_jsonl(scores_path, SCORE, id_field="response_id")
    pairs, dropped = build_pairs(scored, stage.config.preferences.min_margin)
    prompts = len({r["prompt_id"] for r in scored})
    cli.log.info("%d pairs from %d prompts; dropped: %s", len(pairs), prompts, dict(dropped) or "none")
    out = layout.generated(t, "preferences")
    stage.start_writing()
    write_jsonl(out, pairs)
    stage.finish(
        rows_in=len(scored),
        rows_out=len(pairs),
        outputs=[str(out)],
        extra={"prompts": prompts, "dropped": dict(dropped)},
    )


if __name__ == "__main__":
    cli.run(main)
