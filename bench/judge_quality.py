"""How good is M0 as a judge, and what made it so: SFT variants measured on one held-out set.

    python bench/judge_quality.py                    # every variant below, SmolLM2-135M-Instruct, CPU
    python bench/judge_quality.py --variants base new-first-25

Every variant is measured on the same held-out EFT questions (the default config's split of
data/seed/eft.jsonl: 30 questions, 120 answers), read as the loop reads them (stage 03's Judge),
with 95% bootstrap intervals over questions. Variants (name: what stage 00 trains on, the EFT target
format, SFT steps, how the score is read):
  base            no SFT at all; the digit after an opening "Score:"
  old-last        the 72 IFT + 64 EFT rows this project had before (minus held-out questions), the
                  paper's format (justification, then "Score: N"), 1 epoch; the digit after an opening
                  "Score:", a position SFT never trained (the project's reading until now)
  old-first       the same rows, "Score: N" first: the digit SFT trained
  new-first-25    all 214 IFT + 328 EFT training rows, score first, 25 steps (the CPU demo's budget)
  new-first-70    the same, 70 steps (about one epoch)
  new-last-greedy the same rows in the paper's format, 25 steps; a greedy justification, then the digit
                  after "Score:" on the next line
  eft-first-120   the 328 EFT training rows alone, score first, 120 steps (about 3 epochs): does more
                  judge training help at all?
  eft-offtopic-first-120  the same plus 164 rows made by construction (data.off_topic_eft_rows: a good
                  answer to another training question, graded 0), 120 steps (about 2 epochs)
  eft-scoreonly-120  the 328 EFT training rows with the target cut to "Score: N" (no justification), so
                  every judge row's loss is the verdict itself, 120 steps: is the digit drowned out by
                  the justification's tokens?
  eft-all-first-120  eft-first-120 with LoRA on every layer and on the MLP too (lora.last_layers 0,
                  q/k/v/o/gate/up/down): does the adapter's reach limit what the judge learns?
  base-pairwise, new-first-25-pairwise  the base model and new-first-25's judge asked which of two
                  answers is better (stage 06's A/B prompt), each pair in both orders, the two
                  probabilities averaged: is comparing easier than grading for a small model?
  rank-25, sft-rank-25, rank-offtopic-25, rank-all-25, rank-lr-25, rank-60  new-first-25's rows and budget
                  with the judge trained by judge.objective ranking (or sft+ranking), and the knobs beside it
  judgment-dpo-25 the same with judge.objective judgment_dpo: DPO on one-digit judgments
One JSON line per variant on stdout and in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selfreward.judge.judges import judge_for  # noqa: E402
from selfreward.loop.evaluation import split_heldout  # noqa: E402
from selfreward.run.config import load_config  # noqa: E402
from selfreward.run.records import EFT, IFT, read_jsonl, write_jsonl  # noqa: E402

OLD_IFT, OLD_EFT = 72, 64  # the seed files' first rows are the ones the project had before issue 10
VARIANTS = {
    # name: (training rows, EFT target format, SFT max_steps (-1: one epoch), reading format[, overrides])
    "base": (None, None, 0, "score_first"),
    "old-last": ("old", "score_last", -1, "score_first"),
    "old-first": ("old", "score_first", -1, "score_first"),
    "new-first-25": ("new", "score_first", 25, "score_first"),
    "new-first-70": ("new", "score_first", 70, "score_first"),
    "new-last-greedy": ("new", "score_last", 25, "score_last"),
    "eft-first-120": ("eft", "score_first", 120, "score_first"),
    "eft-offtopic-first-120": ("eft", "score_first", 120, "score_first", ["--data.off_topic_eft_rows", "164"]),
    "eft-scoreonly-120": ("eftscore", "score_first", 120, "score_first"),
    # the same judges asked to compare two answers (A or B, both orders) instead of grading one
    "base-pairwise": (None, None, 0, "pairwise"),
    "new-first-25-pairwise": ("new", "score_first", 25, "pairwise"),
    "eft-all-first-120": ("eft", "score_first", 120, "score_first",
                          ["--lora.last_layers", "0", "--lora.target_modules",
                           '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]']),
    # the judge's training objective (judge.objective), on new-first-25's rows and budget
    "rank-25": ("new", "score_first", 25, "score_first", ["--judge.objective", "ranking"]),
    "sft-rank-25": ("new", "score_first", 25, "score_first", ["--judge.objective", "sft+ranking"]),
    "rank-offtopic-25": ("new", "score_first", 25, "score_first",
                         ["--judge.objective", "ranking", "--data.off_topic_eft_rows", "164"]),
    "rank-all-25": ("new", "score_first", 25, "score_first",
                    ["--judge.objective", "ranking", "--lora.last_layers", "0", "--lora.target_modules",
                     '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]']),
    "rank-lr-25": ("new", "score_first", 25, "score_first",
                   ["--judge.objective", "ranking", "--sft.learning_rate", "1e-4"]),
    "rank-60": ("new", "score_first", 60, "score_first", ["--judge.objective", "ranking"]),
    # DPO on one-digit judgments (Meta-Rewarding, the verdict known): the human score over the base's likeliest
    # score two or more points off
    "judgment-dpo-25": ("new", "score_first", 25, "score_first", ["--judge.objective", "judgment_dpo"]),
}  # fmt: skip


def prepare(work: Path, config) -> dict[str, Path]:
    """The held-out rows, and the training files of the old and the new data without them."""
    ift = read_jsonl(REPO / config.data.ift, IFT, id_field="id")
    eft = read_jsonl(REPO / config.data.eft, EFT, id_field="id")
    _, train_eft, _, held = split_heldout(ift, eft, 0, config.data.heldout_eft_questions, config.seed)
    files = {
        name: work / f"{name}.jsonl" for name in ("heldout", "new_ift", "new_eft", "old_ift", "old_eft", "eft_ift")
    }
    old_ids = {f"eft-{k:04d}" for k in range(1, OLD_EFT + 1)}
    write_jsonl(files["heldout"], held)
    write_jsonl(files["new_ift"], ift)
    write_jsonl(files["new_eft"], train_eft)
    write_jsonl(files["old_ift"], ift[:OLD_IFT])
    write_jsonl(files["old_eft"], [r for r in train_eft if r["id"] in old_ids])
    write_jsonl(files["eft_ift"], [])
    files["eft_eft"] = files["new_eft"]
    files["eftscore_ift"] = files["eft_ift"]
    files["eftscore_eft"] = work / "eftscore_eft.jsonl"
    write_jsonl(files["eftscore_eft"], [{**r, "justification": f"Score: {r['score']}"} for r in train_eft])
    return files


def run_variant(name: str, args, files: dict[str, Path], work: Path) -> dict:
    data, target, steps, reading, *extra = VARIANTS[name]
    pairwise = reading == "pairwise"
    config = load_config(args.config, {"judge.mode": "logits", "judge.format": target or "score_first"} if pairwise
                         else {"judge.mode": "logits", "judge.format": reading})  # fmt: skip
    started = time.time()
    result = {"bench": "judge_quality", "variant": name, "data": data, "target": target, "steps": steps,
              "reading": reading}  # fmt: skip
    model = config.model.name_or_path
    if data:
        run = work / name
        overrides = ["--data.ift", str(files[f"{data}_ift"]), "--data.eft", str(files[f"{data}_eft"]),
                     "--data.heldout_prompts", "0", "--data.heldout_eft_questions", "0", "--judge.format", target,
                     "--sft.max_steps", str(steps), "--judge.measure_base", "false",
                     *(extra[0] if extra else [])]  # fmt: skip
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "00_sft.py"), "--run-dir", str(run), "--config", args.config,
             "--no-oxen", *overrides],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"SFT of {name} failed:\n{proc.stderr[-3000:]}")
        manifest = json.loads((run / "M0" / "00_sft.manifest.json").read_text())
        result.update(sft_rows=manifest["rows_in"], sft_seconds=manifest["seconds"])
        result.update(overrides=extra[0] if extra else [])
        model = str(run / "M0" / "model")
    from selfreward.model.backends import load_backend
    from selfreward.model.models import prompt_budget

    backend = load_backend(model, config.model, config.generation)
    held = read_jsonl(files["heldout"], EFT, id_field="id")
    judged_at = time.time()
    if pairwise:
        from selfreward.judge.judges import measure_pairwise_judge

        quality = measure_pairwise_judge(backend, held, template=None, batch_size=config.judge.batch_size,
                                         budget=prompt_budget(backend.context_length, config.model, 1),
                                         samples=1000, seed=config.seed)  # fmt: skip
    else:
        quality = judge_for(config, model=backend).measure(held, samples=1000, seed=config.seed)
    backend.close()
    result.update(judge_seconds=round(time.time() - judged_at, 1), seconds=round(time.time() - started, 1), **quality)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", default="runs/bench-judge-quality")
    parser.add_argument("--out", help="append each variant's JSON line here too")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, load_config(args.config))
    for name in args.variants:
        line = json.dumps(run_variant(name, args, files, work))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
