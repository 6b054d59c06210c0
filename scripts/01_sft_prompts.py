"""Stage 01 of SPIN and RAFT: this iteration's prompts, drawn from the SFT prompts (no model involved).

Reads:  <run>/M0/train/ift.jsonl (the IFT rows stage 00 trained on; never the held-out ones)
Writes: <run>/M<t-1>/generated/prompts.jsonl  (prompt_id, prompt, source "ift", iteration) and
        prompts.{manifest.json,config.yaml}

spin.num_prompts or raft.num_prompts (by `algorithm`) rows are drawn by a hash of the seed, the
iteration and the row id, so each iteration sees its own draw and a rerun the same one; null takes
every row. Prompts that repeat (after normalising case and spaces) are kept once.

    python scripts/01_sft_prompts.py --run-dir runs/spin --iteration 1
"""

from selfreward.loop.prompt_gen import normalize, prompt_id
from selfreward.run.metrics import draw_key
from selfreward.run.records import IFT, read_jsonl, write_jsonl
from selfreward.stage import StageError, parse_stage, run


def main() -> None:
    stage = parse_stage("01_sft_prompts", __doc__)
    config, layout, t = stage.config, stage.layout, stage.iteration
    if config.algorithm not in ("spin", "raft"):
        raise StageError(f"01_sft_prompts is a stage of the spin and raft algorithms; the run's is {config.algorithm}")
    ift_path = layout.train_dir(0) / "ift.jsonl"
    stage.begin(inputs=[ift_path])
    rows = read_jsonl(ift_path, IFT, id_field="id")
    if not rows:
        raise StageError(f"{ift_path}: no SFT prompts to draw from")
    wanted = (config.spin if config.algorithm == "spin" else config.raft).num_prompts
    drawn = sorted(rows, key=lambda r: draw_key(f"{t}:{r['id']}", config.seed))  # each iteration its own draw
    prompts, seen = [], set()
    for row in drawn:
        key = normalize(row["prompt"])
        if key not in seen:
            seen.add(key)
            prompts.append(
                {"prompt_id": prompt_id(row["prompt"]), "prompt": row["prompt"], "source": "ift", "iteration": t}
            )
        if wanted is not None and len(prompts) == wanted:
            break
    out = layout.generated(t, "prompts")
    stage.start_writing()
    write_jsonl(out, prompts)
    stage.finish(rows_in=len(rows), rows_out=len(prompts), outputs=[str(out)], extra={"wanted": wanted})


if __name__ == "__main__":
    run(main)
