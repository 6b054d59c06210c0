"""Build the run's IFT and EFT files from Open Assistant, the paper's way.

Reads:  --source FILE, a local export of the Open Assistant message table (.jsonl, .jsonl.gz or
        .parquet; one message per row, the fields of OpenAssistant/oasst2), or --source hub, which
        loads --hub-dataset (default OpenAssistant/oasst2, train and validation) with `datasets` on
        a machine with internet; --config, for the judge's model and settings
Writes: DIR/ift.jsonl (id, prompt, completion), DIR/eft.jsonl and DIR/eft_eval.jsonl (id, prompt,
        response, score, justification, human_rank, judge_mean), DIR/manifest.json (source, filters and
        what each removed, counts, judge), DIR/sft-baseline/ (the judge, unless --judge-model is given)

IFT: the first turn of English conversations (a tree's opening prompt and a direct assistant reply),
the reply humans ranked first (rank 0); deleted messages, failed reviews, synthetic messages, other
languages and later turns are removed and counted. EFT: every first-turn prompt with replies of
different human rank is judged by the SFT baseline (the config's model after SFT on the new IFT rows,
trained here like stage 00; or --judge-model), judge.num_samples sampled judgments per reply with the
run's rubric (judge.template); a prompt's rows are kept only when the judge's mean scores rank its
replies as humans did. Questions are split into train and eval by a hash of the seed (--eval-fraction).
A killed run resumes: the baseline from its checkpoints, the judging from its finished batches. With
oxen.enabled, DIR's files are committed to an Oxen repository in DIR.

    python scripts/prepare_data.py --source oasst2.jsonl.gz --config configs/mistral-7b-qlora.yaml --out data/oasst
    python scripts/prepare_data.py --dry-run --config configs/mistral-7b-qlora.yaml --out runs/dry-run-data

--dry-run checks all of it on any CPU in a few minutes (a tiny random stand-in for the model, a built-in
table without --source); its folder is marked DRY-RUN, and a real stage 00 refuses data from it.
    ./self-reward.sh --config configs/mistral-7b-qlora-oasst.yaml --iterations 3 --run-dir runs/paper
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
from collections import Counter
from functools import partial
from pathlib import Path

from selfreward import dryrun
from selfreward.judge.rubric import fit_judge_prompt, mean_score, rubric_of, sample_judgments
from selfreward.loop import oasst
from selfreward.model import backends
from selfreward.model.chat import ChatFormat
from selfreward.model.models import load_tokenizer, prompt_budget, resolve_model_path
from selfreward.run import versioning
from selfreward.run.records import RecordError, path_fingerprint, write_json, write_jsonl
from selfreward.stage import StageError, load_checked_config, log, process_defaults, run

DRY_RUN_PROMPTS = 8  # --dry-run's --max-prompts unless given: the path checked, not the data made


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="prepare_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", help="hub, or a local message table (.jsonl, .jsonl.gz, .parquet); with --dry-run, optional"
    )
    parser.add_argument("--hub-dataset", default="OpenAssistant/oasst2", help="with --source hub (or oasst1)")
    parser.add_argument("--config", default="configs/smollm2-135m.yaml", help="the judge's model and settings")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--max-prompts", type=int, help="use at most this many first-turn prompts (drawn by seed)")
    parser.add_argument("--seed", type=int, help="default: the config's seed")
    parser.add_argument("--judge-model", help="judge with this model instead of training the SFT baseline")
    parser.add_argument("--eval-fraction", type=float, default=0.25, help="share of EFT questions held out")
    parser.add_argument("--lang", default="en")
    parser.add_argument("--no-oxen", action="store_true", help="do not commit the outputs to Oxen")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole data path on this CPU before renting a GPU: the config's settings with a tiny "
        f"random stand-in for its model (and --judge-model's), one SFT step, at most {DRY_RUN_PROMPTS} prompts; "
        "without --source, a small built-in table in Open Assistant's format",
    )
    args = parser.parse_args(argv)
    if args.source is None and not args.dry_run:
        parser.error("--source is required (or --dry-run, which has a built-in table)")
    return args


def hub_messages(name: str) -> list[dict]:
    try:
        from datasets import concatenate_datasets, load_dataset

        parts = load_dataset(name)
        table = concatenate_datasets([parts[split] for split in parts])
    except Exception as exc:
        raise StageError(
            f"cannot load {name} from the Hugging Face Hub ({str(exc)[:200]}); on a machine with internet, save it "
            "once (datasets: load_dataset(...).to_json('oasst.jsonl')) and pass --source oasst.jsonl"
        ) from None
    rows = table.to_list()
    for n, row in enumerate(rows, start=1):
        oasst.check_message(row, f"{name}: row {n}")
    return rows


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sft_baseline(config, ift: list[dict], out: Path) -> Path:
    """The config's model after SFT on the IFT rows alone (the paper's judge for EFT); resumable."""
    from selfreward.model.training import build_sft_trainer, train_and_merge

    folder = out / "sft-baseline"
    stamp = fingerprint(ift, config.model, config.lora, config.sft, config.seed)
    done = (folder / "fingerprint").is_file() and (folder / "fingerprint").read_text() == stamp
    if done and (folder / "model" / "config.json").is_file():
        log.info("SFT baseline: %s is complete", folder / "model")
        return folder / "model"
    if not done:
        shutil.rmtree(folder, ignore_errors=True)  # checkpoints of other rows or settings
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fingerprint").write_text(stamp)
    base = resolve_model_path(config.model.name_or_path)
    chat = ChatFormat.from_tokenizer(load_tokenizer(base, config.model))
    rows = [{"prompt": chat.prompt(r["prompt"]), "completion": chat.completion(r["completion"])} for r in ift]
    # train_and_merge builds the trainer and alone holds it: its GPU memory is free before the judge's vLLM starts
    make_trainer = partial(build_sft_trainer, base, rows, config, folder / "checkpoints")
    train_and_merge(
        make_trainer,
        base,
        config,
        adapter_dir=folder / "adapter",
        model_dir=folder / "model",
        log_path=folder / "train_log.jsonl",
    )
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return folder / "model"


def dry_run(config, args) -> tuple:
    """--dry-run: the config's settings checked against its model's architecture and the real model's memory
    for this script's steps printed. Returns the config and --judge-model as the dry run runs them (stand-ins
    on the CPU, one SFT step) and the manifest's dry_run record."""
    dryrun.guard_data_folder(args.out)
    name = config.model.name_or_path
    judging = dataclasses.replace(config, judge=dataclasses.replace(config.judge, mode="sample"))  # as judged here
    rows = [r for r in dryrun.plan(judging).rows if r.stage in ("00_sft", "merge", "03_gen_scores")]
    print(
        f"[prepare_data] dry run: {name} replaced by a tiny random model of its architecture; the real "
        "model's estimated memory (GiB) for the SFT baseline (as stage 00) and the judging (as stage 03):",
        flush=True,
    )
    print("\n".join(f"[prepare_data]   {line}" for line in dryrun.memory_table(rows).splitlines()), flush=True)
    judge_model = str(dryrun.stand_in(args.judge_model)) if args.judge_model else None
    return dryrun.dry_config(config), judge_model, {"stands_in_for": name}


def stand_in_scores(candidates: list[dict], judged: list[list[list[dict]]]) -> list[list[list[dict]]]:
    """A random stand-in writes no "Score: N": score each reply 5 - its human rank instead, so the dry run
    still builds and writes EFT rows of the real shape (as stage 04's dry run ranks by sample index)."""
    return [
        [
            [{**j, "score": float(max(0, 5 - reply["rank"]))} for j in judgments]
            for reply, judgments in zip(conv["replies"], replies, strict=True)
        ]
        for conv, replies in zip(candidates, judged, strict=True)
    ]


def judge_candidates(config, judge_path, candidates: list[dict], out: Path, stamp: str) -> list[list[list[dict]]]:
    """Every reply of every candidate judged: candidates x replies x judgments; finished batches are logged
    so that a killed run judges only what is left."""
    from selfreward.run.records import ChunkLog

    cfg = dataclasses.replace(config.judge, mode="sample")  # EFT rows need the judge's written justifications
    rubric = rubric_of(cfg)
    flat = [(c, r) for c, conv in enumerate(candidates) for r in range(len(conv["replies"]))]
    backend = backends.load_backend(judge_path, config.model, config.generation)
    budget = prompt_budget(backend.context_length, config.model, cfg.max_new_tokens + 2)
    prompts = [
        fit_judge_prompt(backend.chat, candidates[c]["prompt"], candidates[c]["replies"][r]["text"], budget, rubric)[0]
        for c, r in flat
    ]
    chunks = ChunkLog(out / ".eft_judgments.partial.jsonl", stamp)

    def save(batch: int, idx: list[int], judged: list[list[dict]]) -> None:
        chunks.append(batch, [{"index": i, "judgments": j} for i, j in zip(idx, judged, strict=True)])

    sample_judgments(backend, prompts, cfg, seed=config.seed, skip=chunks.done, on_batch=save)
    backend.close()
    by_index = {row["index"]: row["judgments"] for row in chunks.rows()}
    result = [[None] * len(conv["replies"]) for conv in candidates]
    for i, (c, r) in enumerate(flat):
        result[c][r] = by_index[i]
    chunks.remove()
    return result


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="[prepare_data] %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # a harmless note on CPU
    process_defaults()
    config = load_checked_config(args.config)
    judge_model, dry = args.judge_model, None
    if args.dry_run:
        config, judge_model, dry = dry_run(config, args)
        args.max_prompts = DRY_RUN_PROMPTS if args.max_prompts is None else args.max_prompts
    seed = config.seed if args.seed is None else args.seed
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    messages, source = read_messages(args)
    conversations, ift, ift_figures = write_ift(messages, args, seed)
    candidates = oasst.eft_candidates(conversations)
    judge_path = judge_model or sft_baseline(config, ift, out)
    eft_figures = write_eft(config, judge_path, candidates, args, seed, dry)
    manifest = {
        "source": source,
        "lang": args.lang,
        "seed": seed,
        **ift_figures,
        **eft_figures,
        "eval_fraction": args.eval_fraction,
        "judge": {"model": str(judge_path), "template": config.judge.template, "num_samples": config.judge.num_samples},
        "config": args.config,
        **({"dry_run": dry} if dry else {}),
    }
    write_json(out / "manifest.json", manifest)
    if not dry:  # every file rewritten: a dry run's folder now holds real data
        (out / dryrun.DRY_DATA_MARKER).unlink(missing_ok=True)
    print(summary(manifest, out, dry), flush=True)
    if config.oxen.enabled and not args.no_oxen:
        commit_to_oxen(config, out, manifest)


def read_messages(args) -> tuple[list[dict], dict]:
    """The Open Assistant messages and where they came from (for the manifest)."""
    if args.source is None:  # --dry-run
        return oasst.sample_messages(), {"built_in": "oasst.sample_messages (--dry-run)"}
    if args.source == "hub":
        return hub_messages(args.hub_dataset), {"hub": args.hub_dataset}
    messages = oasst.read_messages(args.source)
    return messages, {"file": args.source, "fingerprint": path_fingerprint(args.source)}


def write_ift(messages: list[dict], args, seed: int) -> tuple[list[dict], list[dict], dict]:
    """DIR/ift.jsonl from the first turns' replies humans ranked first. Returns the first-turn conversations
    (at most --max-prompts, drawn by seed), the IFT rows and the manifest's figures for them."""
    conversations, removed = oasst.first_turns(messages, args.lang)
    if args.max_prompts is not None:
        conversations = sorted(conversations, key=lambda c: fingerprint(seed, c["prompt_id"]))[: args.max_prompts]
        conversations.sort(key=lambda c: c["prompt_id"])
    ift, ift_counts = oasst.ift_rows(conversations)
    if not ift:
        raise RecordError(f"{args.source}: no first-turn {args.lang} prompt with a rank-0 reply: no IFT rows")
    write_jsonl(args.out / "ift.jsonl", ift)
    log.info(
        "%d messages -> %d first-turn prompts -> %d IFT rows; removed: %s",
        len(messages),
        len(conversations),
        len(ift),
        dict(removed + ift_counts),
    )
    figures = {
        "messages": len(messages),
        "removed_messages": dict(removed),
        "first_turn_prompts": len(conversations),
        "ift_rows": len(ift),
        "ift_skipped": dict(ift_counts),
    }
    return conversations, ift, figures


def write_eft(config, judge_path, candidates: list[dict], args, seed: int, dry: dict | None) -> dict:
    """DIR/eft.jsonl and eft_eval.jsonl: the rows of the candidates whose replies the judge ranks as humans did,
    split by question. Returns the manifest's figures for them; a dry run's stand-in judge, which writes no
    score, scores by human rank instead (noted in `dry`)."""
    stamp = fingerprint(
        candidates, str(judge_path), path_fingerprint(judge_path), config.judge, config.model, config.generation, seed
    )
    judged = judge_candidates(config, judge_path, candidates, args.out, stamp) if candidates else []
    with_a_score = sum(j["score"] is not None for r in judged for js in r for j in js)
    if dry and judged and not with_a_score:
        judged, dry["stand_in_scores"] = stand_in_scores(candidates, judged), "5 - human rank"
        log.info("dry run: the stand-in wrote no score; each reply scored 5 - its human rank instead")
    rubric = rubric_of(config.judge)
    train, held, eft_counts = [], [], Counter()
    for conv, replies in zip(candidates, judged, strict=True):
        means = [mean_score([j["score"] for j in judgments]) for judgments in replies]
        if not oasst.ranking_agrees([r["rank"] for r in conv["replies"]], means):
            eft_counts["judge_disagrees_with_humans"] += 1
            continue
        rows = oasst.eft_rows(conv, replies, rubric)
        (held if oasst.is_eval_question(conv["prompt"], args.eval_fraction, seed) else train).extend(rows)
    write_jsonl(args.out / "eft.jsonl", train)
    write_jsonl(args.out / "eft_eval.jsonl", held)
    return {
        "eft_candidate_prompts": len(candidates),
        "eft_dropped_prompts": dict(eft_counts),
        # a small judge often writes no score line at all: then no ranking can agree
        "judgments_with_a_score": with_a_score,
        "judgments": sum(len(js) for r in judged for js in r),
        "eft_rows": len(train),
        "eft_eval_rows": len(held),
    }


def summary(manifest: dict, out: Path, dry: dict | None) -> str:
    """The line printed at the end: what was made, and where."""
    disagree = manifest["eft_dropped_prompts"].get("judge_disagrees_with_humans", 0)
    return (
        f"[prepare_data] {manifest['ift_rows']} IFT rows, {manifest['eft_rows']} EFT train rows and "
        f"{manifest['eft_eval_rows']} eval rows from {manifest['eft_candidate_prompts']} ranked prompts ({disagree} "
        f"dropped: the judge ranked them otherwise) in {out}"
        + (f" (a dry run's: marked {dryrun.DRY_DATA_MARKER}, no real stage 00 trains on them)" if dry else "")
    )


def commit_to_oxen(config, out: Path, manifest: dict) -> None:
    """DIR's files committed to the Oxen repository in DIR."""
    files = [out / n for n in ("ift.jsonl", "eft.jsonl", "eft_eval.jsonl", "manifest.json")]
    cfg = dataclasses.replace(config.oxen, repo=None)  # the repository lives in DIR
    message = f"prepare_data: {manifest['ift_rows']} IFT, {manifest['eft_rows']} + {manifest['eft_eval_rows']} EFT"
    made, _ = versioning.commit(cfg, out, files, message)
    if made:
        log.info("oxen commit %s", made[:12])


if __name__ == "__main__":
    run(main)
