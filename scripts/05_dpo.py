"""Stage 05: DPO on M<t-1>'s own preference pairs, giving M<t>.

Reads:  <run>/M<t-1>/model/, <run>/M<t-1>/generated/preferences.jsonl
Writes: <run>/M<t>/train/preferences.jsonl (a copy), M<t>/adapter/ (LoRA), M<t>/model/ (merged),
        M<t>/lineage.json, M<t>/train_log.jsonl, M<t>/tensorboard/ (with dpo.report_to: tensorboard),
        M<t>/05_dpo.{manifest.json,config.yaml}

TRL's DPOTrainer with LoRA; the reference model is M<t-1> itself (the adapter switched off), or M0
with dpo.reference initial (recorded in the lineage); beta = dpo.beta. Prompts and answers are
rendered with the same chat template generation used. With zero pairs the stage exits with code 3
and says why, instead of failing inside the trainer.

    python scripts/05_dpo.py --run-dir runs/demo --iteration 1
"""

import sys
from functools import partial

from selfreward.model.chat import ChatFormat
from selfreward.model.models import load_tokenizer
from selfreward.run.records import PREFERENCE, read_jsonl, read_manifest, write_jsonl
from selfreward.stage import EXIT_NO_PAIRS, parse_stage, run


def main() -> None:
    stage = parse_stage("05_dpo", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    pairs_path = layout.generated(t, "preferences")
    # dpo.reference initial: M0 stays the reference at every iteration (at iteration 1 it is the parent)
    reference = layout.model(0) if config.dpo.reference == "initial" and t > 1 else None
    stage.begin(inputs=[pairs_path, layout.model(t - 1), *([reference] if reference else [])])
    # Imported once the stage runs: a complete stage (--skip-if-complete) exits without loading PyTorch and TRL.
    from selfreward.model.training import build_dpo_trainer, train_child

    pairs = read_jsonl(pairs_path, PREFERENCE, id_field="prompt_id")
    if not pairs:
        made = read_manifest(layout.manifest("04_gen_preferences", t)) or {}
        judged = read_manifest(layout.manifest("03_gen_scores", t)) or {}
        print(
            f"error: {pairs_path} has no preference pairs, so there is nothing to train M{t} on. "
            f"Stage 04 dropped all {made.get('prompts', '?')} prompts: {made.get('dropped', 'reasons unknown')} "
            f"(tie: best and worst answers scored the same; fewer_than_two_scored: the judge gave no valid score; "
            f"stage 03 could not parse {judged.get('unparsed_judgments', '?')} of {judged.get('judgments', '?')} "
            "judgments). Generate more prompts or answers, lower preferences.min_margin, or use judge.mode logits.",
            file=sys.stderr,
        )
        sys.exit(EXIT_NO_PAIRS)
    parent = str(layout.model(t - 1))
    chat = ChatFormat.from_tokenizer(load_tokenizer(parent, config.model))
    train_copy = layout.train_dir(t) / "preferences.jsonl"
    stage.start_writing()
    write_jsonl(train_copy, pairs)
    rows = [
        {
            "prompt": chat.prompt(p["prompt"]),
            "chosen": chat.completion(p["chosen"]),
            "rejected": chat.completion(p["rejected"]),
        }
        for p in pairs
    ]
    make_trainer = partial(
        build_dpo_trainer,
        parent,
        rows,
        config,
        stage.checkpoints(t),
        logs=layout.tensorboard(t),
        reference=reference and str(reference),
    )
    train_child(stage, make_trainer, parent, [train_copy], rows_in=len(pairs), reference=str(reference or parent))


if __name__ == "__main__":
    run(main)
