"""Stage 04 of SPIN: the human answer against the model's own, as a DPO pair per prompt.

Reads:  <run>/M<t-1>/generated/responses.jsonl (M<t-1>'s answer to each SFT prompt), <run>/M0/train/ift.jsonl
Writes: <run>/M<t-1>/generated/preferences.jsonl  (prompt_id, prompt, chosen = the SFT completion,
        rejected = M<t-1>'s answer, score_chosen and score_rejected null: no judge) and
        preferences.{manifest.json,config.yaml}

SPIN (Chen et al. 2024) needs no judge: the model learns to tell the human answers from its own. A
prompt whose answer is the human one, word for word, yields no pair (the manifest counts it): there
the model has caught up with its data, which is where SPIN stops.

    python scripts/04_spin_pairs.py --run-dir runs/spin --iteration 1
"""

from collections import Counter

from selfreward.loop.prompt_gen import normalize, prompt_id
from selfreward.run.records import IFT, RESPONSE, read_jsonl, write_jsonl
from selfreward.stage import StageError, log, parse_stage, run


def main() -> None:
    stage = parse_stage("04_spin_pairs", __doc__)
    layout, t = stage.layout, stage.iteration
    responses_path, ift_path = layout.generated(t, "responses"), layout.train_dir(0) / "ift.jsonl"
    stage.begin(inputs=[responses_path, ift_path])
    responses = read_jsonl(responses_path, RESPONSE, id_field="response_id")
    human = {}
    for row in read_jsonl(ift_path, IFT, id_field="id"):
        human.setdefault(prompt_id(row["prompt"]), row["completion"])
    pairs, dropped = [], Counter()
    for r in responses:
        if r["sample_index"] != 0:
            continue  # one answer per prompt is the rejected side
        chosen = human.get(r["prompt_id"])
        if chosen is None:
            raise StageError(f"{responses_path}: prompt {r['prompt_id']} is not an SFT prompt of {ift_path}")
        if normalize(chosen) == normalize(r["response"]):
            dropped["same_as_human"] += 1
            continue
        pairs.append(
            {
                "prompt_id": r["prompt_id"],
                "prompt": r["prompt"],
                "chosen": chosen,
                "rejected": r["response"],
                "score_chosen": None,
                "score_rejected": None,
            }
        )
    log.info("%d pairs; dropped: %s", len(pairs), dict(dropped) or "none")
    out = layout.generated(t, "preferences")
    stage.start_writing()
    write_jsonl(out, pairs)
    stage.finish(
        rows_in=len(responses),
        rows_out=len(pairs),
        outputs=[str(out)],
        extra={"prompts": len({r["prompt_id"] for r in responses}), "dropped": dict(dropped)},
    )


if __name__ == "__main__":
    run(main)
