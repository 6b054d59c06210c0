"""Export one model of a run as a folder any transformers user can load, with a model card.

python -m selfreward.tools.export --run-dir runs/default --model M2 --out exports/m2
python -m selfreward.tools.export --run-dir runs/default --model M2 --out exports/m2 --push-to-hub me/my-model

The folder holds the merged safetensors, the tokenizer with the chat template every stage used,
lineage.json (where the model came from, with the data files' hashes), config.yaml (the run's
config) and README.md: a model card with the lineage from the base model, the config, and the
figures stage 06 measured (judge quality with 95% intervals, head-to-head). --push-to-hub uploads
the folder as a model repository with huggingface_hub (create_repo, then upload_folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from selfreward.run.layout import RunLayout
from selfreward.tools.report import head_to_head_table, judge_quality_table


class ExportError(Exception):
    pass


HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the Hub's name for it


def lineage_chain(layout: RunLayout, t: int) -> list[dict]:
    """M<t>'s lineage, then its parent's, down to M0 (whose parent is the base model)."""
    chain = []
    for k in range(t, -1, -1):
        path = layout.lineage(k)
        if not path.is_file():
            raise ExportError(f"{path}: missing; did the stage that made M{k} finish?")
        chain.append(json.loads(path.read_text(encoding="utf-8")))
    return chain


def model_card(name: str, chain: list[dict], evaluation: dict | None) -> str:
    """README.md for the exported folder: front matter for the Hub, lineage, figures, config."""
    base = chain[-1]["base"]
    front = {"library_name": "transformers", "tags": ["self-rewarding", "dpo", "lora", "trl"]}
    hub_base = HUB_IDS.get(base, None if base.startswith("builtin:") or Path(base).exists() else base)
    if hub_base:
        front["base_model"] = hub_base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}: a self-rewarding model", ""]
    lines += [
        f"Trained from `{base}` by a self-rewarding loop (Yuan et al., 2024): supervised fine-tuning on "
        "instruction and judge data (M0), then rounds in which the model writes prompts, answers them, "
        "judges its own answers and learns from the best and worst with DPO.",
        "",
        "## Lineage",
        "",
        "| model | stage | trained on |",
        "|---|---|---|",
    ]
    for entry in chain:
        data = ", ".join(f"`{Path(d['path']).name}` ({d['fingerprint'][:12]})" for d in entry["data"])
        lines.append(f"| {entry['model']} | {entry['stage']} | {data} |")
    lines.append("")
    if evaluation:
        lines += ["## Evaluation (held-out rows, measured by stage 06)", ""]
        if evaluation.get("judge_quality"):
            lines += judge_quality_table(evaluation["judge_quality"])
            lines += ["", "Each figure with its 95% bootstrap interval over held-out questions.", ""]
        if evaluation.get("head_to_head"):
            lines += head_to_head_table([evaluation]) + [""]
    lines += ["## The run's config", "", "```yaml", yaml.safe_dump(chain[0]["config"], sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


def export(run_dir: Path, name: str, out: Path, *, force: bool = False) -> Path:
    layout = RunLayout(run_dir)
    t = layout.model_number(name)
    if t is None:
        raise ExportError(f"--model must name a model of the run, like M0 or M2, got '{name}'")
    model_dir = layout.model(t)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no merged model there (is '{name}' a model of {run_dir}?)")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --force")
    chain = lineage_chain(layout, t)
    eval_path = layout.eval_result(t)
    evaluation = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # a killed export leaves no half folder
    try:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        shutil.copy2(layout.lineage(t), tmp / "lineage.json")
        (tmp / "config.yaml").write_text(yaml.safe_dump(chain[0]["config"], sort_keys=False), encoding="utf-8")
        if evaluation:
            shutil.copy2(eval_path, tmp / "eval.json")
        (tmp / "README.md").write_text(model_card(name, chain, evaluation), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push_to_hub(folder: Path, repo_id: str, *, private: bool) -> str:
    from huggingface_hub import HfApi  # heavy

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="Export from selfreward"
    )
    return f"https://huggingface.co/{repo_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--model", required=True, help="M0, M1, M2, ...")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    args = parser.parse_args(argv)
    try:
        folder = export(args.run_dir, args.model, args.out, force=args.force)
        print(f"exported {args.model} of {args.run_dir} to {folder}")
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(folder, args.push_to_hub, private=args.private)}")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
