"""Stage 05 of RAFT: M<t-1> fine-tuned on its own best-judged answers, giving M<t>.

Reads:  <run>/M<t-1>/model/, <run>/M<t-1>/generated/selected.jsonl
Writes: <run>/M<t>/train/selected.jsonl (a copy), M<t>/adapter/ (LoRA), M<t>/model/ (merged),
        M<t>/lineage.json, M<t>/train_log.jsonl, M<t>/tensorboard/ (with sft.report_to: tensorboard),
        M<t>/05_raft_sft.{manifest.json,config.yaml}

TRL's SFTTrainer with LoRA: raft.epochs over the kept answers, sft's other settings (not its
max_steps), the loss on the answer tokens only, the prompts rendered with the chat template
generation used (as stage 00 trains). With no answer kept the stage exits with code 3 and says why.

    python scripts/05_raft_sft.py --run-dir runs/raft --iteration 1
"""

import sys
from dataclasses import replace
from functools import partial

from selfreward.model.chat import ChatFormat
from selfreward.model.models import load_tokenizer
from selfreward.run.records import SELECTED, read_jsonl, read_manifest, write_jsonl
from selfreward.stage import EXIT_NO_PAIRS, parse_stage, run


def main() -> None:
    stage = parse_stage("05_raft_sft", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    selected_path = layout.generated(t, "selected")
    stage.begin(inputs=[selected_path, layout.model(t - 1)])
    # Imported once the stage runs: a complete stage (--skip-if-complete) exits without loading PyTorch and TRL.
    from selfreward.model.training import build_sft_trainer, train_child

    selected = read_jsonl(selected_path, SELECTED, id_field="response_id")
    if not selected:
        made = read_manifest(layout.manifest("04_raft_select", t)) or {}
        print(
            f"error: {selected_path} has no answers, so there is nothing to train M{t} on. Stage 04 discarded "
            f"{made.get('discarded', 'an unknown number')} of {made.get('rows_in', '?')} answers (cut_off: they "
            "reached max_new_tokens, raft.keep_cut_off true keeps them; unscored: the judge gave no valid score, "
            "see stage 03's manifest; repetitive: below raft.min_distinct_2). Raise responses.max_new_tokens, "
            "use judge.mode logits, or relax the filter.",
            file=sys.stderr,
        )
        sys.exit(EXIT_NO_PAIRS)
    parent = str(layout.model(t - 1))
    chat = ChatFormat.from_tokenizer(load_tokenizer(parent, config.model))
    train_copy = layout.train_dir(t) / "selected.jsonl"
    stage.start_writing()
    write_jsonl(train_copy, selected)
    rows = [{"prompt": chat.prompt(r["prompt"]), "completion": chat.completion(r["completion"])} for r in selected]
    per_iteration = replace(config, sft=replace(config.sft, epochs=config.raft.epochs, max_steps=-1))
    make_trainer = partial(
        build_sft_trainer, parent, rows, per_iteration, stage.checkpoints(t), logs=layout.tensorboard(t)
    )
    train_child(stage, make_trainer, parent, [train_copy], rows_in=len(selected))


if __name__ == "__main__":
    run(main)
