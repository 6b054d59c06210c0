"""Write a benchmark file for eval.benchmark: prompts with reference answers, from a public set users know.

Reads:  --source hub (on a machine with internet, through `datasets`) or --source FILE, the hub's rows saved
        as JSON (a list) or JSONL
Writes: --out, JSONL rows {id, prompt, reference, category}

--set alpaca_eval: AlpacaEval 2.0's 805 instructions, the reference being its baseline's answer (GPT-4
  Turbo, gpt4_1106_preview): rows {instruction, output, generator, dataset}. On the hub this is the file
  alpaca_eval_gpt4_baseline.json of the dataset tatsu-lab/alpaca_eval (config alpaca_eval_gpt4_baseline,
  split eval, in the repository's loading script alpaca_eval.py). datasets >= 4 runs no loading scripts
  (huggingface/datasets PR 7592, "Remove scripts altogether"), so the hub path reads that JSON file itself.
--set mt_bench: MT-Bench's 80 questions, first turns only. On the hub: HuggingFaceH4/mt_bench_prompts,
  split train, rows {prompt: the turns, prompt_id, category, reference: a list, empty but for math,
  reasoning and coding}; as a FILE, FastChat's question.jsonl ({question_id, turns, reference}) works too,
  and keeps FastChat's question ids, which its llm_judge needs to match answers. A question with no
  reference takes the first turn of its answer in --reference-answers (a FastChat model answer file,
  e.g. its gpt-4.jsonl); one with neither is left out and counted.
Checked: the field names above against the datasets' cards and files and AlpacaEval's loading script
(via the search tool, 2026); the hub path itself cannot run here (no internet) and is not tested.

    python scripts/prepare_benchmark.py --set alpaca_eval --source hub --out data/benchmarks/alpaca_eval.jsonl
    python scripts/prepare_benchmark.py --set mt_bench --source question.jsonl --reference-answers gpt-4.jsonl \\
        --out data/benchmarks/mt_bench.jsonl
"""

import argparse
import json
from pathlib import Path

from selfreward.loop.benchmark import from_alpaca_eval, from_mt_bench
from selfreward.run.records import RecordError, read_jsonl, write_jsonl
from selfreward.stage import StageError, run

HUB = {
    "alpaca_eval": ("json", "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json", "train"),
    "mt_bench": ("HuggingFaceH4/mt_bench_prompts", None, "train"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="prepare_benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", required=True, choices=sorted(HUB), help="which public set")
    parser.add_argument("--source", required=True, help="hub, or a local JSON/JSONL file of the hub's rows")
    parser.add_argument("--out", required=True, type=Path, help="the benchmark file to write")
    parser.add_argument("--reference-answers", help="mt_bench: a FastChat answer file for questions with no reference")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    rows = hub_rows(args.set) if args.source == "hub" else file_rows(Path(args.source))
    source = f"{args.set} from {args.source}"
    dropped = 0
    if args.set == "alpaca_eval":
        benchmark = from_alpaca_eval(rows, source)
    else:
        answers = {r["question_id"]: r for r in read_jsonl(args.reference_answers)} if args.reference_answers else {}
        benchmark, dropped = from_mt_bench(rows, source, answers)
    if not benchmark:
        raise StageError(f"{source}: no row has a reference answer")
    write_jsonl(args.out, benchmark)
    print(
        f"{args.out}: {len(benchmark)} prompts" + (f", {dropped} left out for want of a reference" if dropped else "")
    )


def file_rows(path: Path) -> list[dict]:
    """The rows of a JSON list or a JSONL file."""
    if path.suffix != ".json":
        return read_jsonl(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RecordError(f"{path}: expected a JSON list of objects")
    return rows


def hub_rows(name: str) -> list[dict]:
    """The set's rows from the Hugging Face Hub (needs internet)."""
    path, files, split = HUB[name]
    try:
        from datasets import load_dataset

        table = load_dataset(path, data_files=files, split=split) if files else load_dataset(path, split=split)
    except Exception as exc:
        raise StageError(
            f"cannot load {name} from the Hugging Face Hub ({str(exc)[:200]}); on a machine with internet, save its "
            "rows once (datasets: load_dataset(...).to_json('rows.jsonl')) and pass --source rows.jsonl"
        ) from None
    return table.to_list()


if __name__ == "__main__":
    run(main)
