"""Stage 00: supervised fine-tuning of the base model on IFT + EFT data, giving M0.

Reads:  the base model (config model.name_or_path), data.ift and data.eft
Writes: <run>/M0/train/{ift,eft,eft_constructed}.jsonl (the rows used), M0/train/heldout_{prompts,eft}.jsonl (set
        aside for stage 06), M0/adapter/ (LoRA), M0/model/ (merged), M0/lineage.json,
        M0/train_log.jsonl, M0/tensorboard/ (with sft.report_to: tensorboard), M0/00_sft.{manifest.json,config.yaml}

data.heldout_prompts IFT rows and data.heldout_eft_questions EFT questions (with all their answers)
are drawn by a hash of the seed and their ids and set aside (or data.heldout_eft, a file of its own, is
the held-out EFT set, as prepare_data.py's eft_eval.jsonl): no stage trains on them or shows them
as shots, so stage 06 can compare models and measure the judge on them. data.off_topic_eft_rows adds
judge rows made from the training EFT rows alone (a good answer given to another question, graded 0),
each with its origin, in eft_constructed.jsonl.

EFT rows are rendered through the same judge template stage 03 uses, and their target is written in
judge.format (score_first: "Score: N" then the justification; score_last: the paper's order); the
loss covers the answer (completion) tokens only. With model.load_in_4bit the LoRA trains on an NF4 copy (QLoRA) and is
merged into the full-precision base.

    python scripts/00_sft.py --run-dir runs/demo --config configs/smollm2-135m.yaml
"""

import shutil
from functools import partial

from selfreward import dryrun
from selfreward.judge.rubric import (
    fit_judge_prompt,
    judge_target,
    parse_judge_score,
    rubric_of,
    score_token_ids,
    template_files,
)
from selfreward.loop.evaluation import off_topic_rows, split_heldout
from selfreward.model.chat import ChatFormat
from selfreward.model.models import load_tokenizer, resolve_model_path
from selfreward.run.records import EFT, IFT, RecordError, read_jsonl, write_jsonl
from selfreward.stage import StageError, parse_stage, run


def check_eft_scores(rows: list[dict], path: str) -> None:
    """Each justification must end in the score line the judge parser reads, agreeing with `score`."""
    for row in rows:
        parsed = parse_judge_score(row["justification"])
        if parsed != row["score"] or not 0 <= row["score"] <= 5:
            raise RecordError(
                f"{path}: row '{row['id']}': field 'justification' must end with 'Score: {row['score']}' "
                f"(parsed {parsed})"
            )


def main() -> None:
    stage = parse_stage("00_sft", __doc__, iteration=False)
    config, layout = stage.config, stage.layout
    heldout_file = config.data.heldout_eft
    data_files = [config.data.ift, config.data.eft, *([heldout_file] if heldout_file else [])]
    stage.begin(inputs=[*data_files, *template_files(config.judge)])
    if not stage.dry_run:
        dryrun.refuse_dry_data(data_files)
    # Imported once the stage runs: a complete stage (--skip-if-complete) exits without loading PyTorch and TRL.
    from selfreward.model.training import build_sft_trainer, train_and_merge

    ift, eft, heldout_prompts, heldout_eft = training_and_heldout_rows(config)
    constructed = off_topic_rows(eft, config.data.off_topic_eft_rows, config.seed)
    stage.start_writing()
    data = write_rows(layout, ift, eft, constructed, heldout_prompts, heldout_eft)

    base = resolve_model_path(config.model.name_or_path)
    judge_rows = eft + constructed
    rows = sft_rows(config, base, ift, judge_rows if "sft" in config.judge.objective.split("+") else [])
    ranking = ranking_data(config, base, judge_rows) if config.judge.objective != "sft" else None
    if not rows:
        raise StageError(
            f"judge.objective {config.judge.objective} trains the IFT rows with SFT: {config.data.ift} has none"
        )
    # Built inside train_and_merge, which alone holds the trainer: its memory goes once the model is trained.
    make_trainer = partial(
        build_sft_trainer, base, rows, config, stage.checkpoints(0), logs=layout.tensorboard(0), ranking=ranking
    )
    history = train_and_merge(
        make_trainer,
        base,
        config,
        adapter_dir=layout.adapter(0),
        model_dir=layout.model(0),
        log_path=layout.train_log(0),
    )
    if history is None:  # a torchrun rank other than 0: rank 0 saves and reports
        return
    counts = {
        "heldout_prompts": len(heldout_prompts),
        "heldout_eft_rows": len(heldout_eft),
        "constructed_eft_rows": len(constructed),
        **({"ranking_pairs": len(ranking["judge_pairs"])} if ranking else {}),
        **base_judge_quality(config, base, heldout_eft),
    }
    record_m0(stage, base, data, rows_in=len(rows), counts=counts)


def training_and_heldout_rows(config) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(IFT rows to train on, EFT rows to train on, held-out IFT rows, held-out EFT rows): the held-out rows are
    drawn from the data, or with data.heldout_eft are that file, which must share no question with training."""
    ift = read_jsonl(config.data.ift, IFT, id_field="id")
    eft = read_jsonl(config.data.eft, EFT, id_field="id")
    check_eft_scores(eft, config.data.eft)
    if not ift and not eft:
        raise StageError(f"no training rows in {config.data.ift} or {config.data.eft}")
    heldout_file = config.data.heldout_eft
    questions = 0 if heldout_file else config.data.heldout_eft_questions
    ift, eft, heldout_prompts, heldout_eft = split_heldout(
        ift, eft, config.data.heldout_prompts, questions, config.seed
    )
    if heldout_file:
        heldout_eft = read_jsonl(heldout_file, EFT, id_field="id")
        check_eft_scores(heldout_eft, heldout_file)
        shared = {r["prompt"] for r in heldout_eft} & {r["prompt"] for r in eft}
        if shared:
            raise RecordError(
                f"{heldout_file}: {len(shared)} question(s) also in {config.data.eft}, e.g. "
                f"{sorted(shared)[0][:80]!r}: the judge would be measured on questions it was trained on"
            )
    return ift, eft, heldout_prompts, heldout_eft


def write_rows(layout, ift, eft, constructed, heldout_prompts, heldout_eft) -> list:
    """The rows trained on (returned: M0's lineage names them) and the rows set aside for stage 06."""
    train_dir = layout.train_dir(0)
    write_jsonl(train_dir / "ift.jsonl", ift)
    write_jsonl(train_dir / "eft.jsonl", eft)
    write_jsonl(train_dir / "eft_constructed.jsonl", constructed)
    write_jsonl(layout.heldout("prompts"), heldout_prompts)
    write_jsonl(layout.heldout("eft"), heldout_eft)
    return [train_dir / "ift.jsonl", train_dir / "eft.jsonl", train_dir / "eft_constructed.jsonl"]


def sft_rows(config, base: str, ift: list[dict], eft: list[dict]) -> list[dict]:
    """Prompt and completion in the base model's chat format: the IFT answers, then the EFT judgments."""
    chat = ChatFormat.from_tokenizer(load_tokenizer(base, config.model))
    rows = [{"prompt": chat.prompt(r["prompt"]), "completion": chat.completion(r["completion"])} for r in ift]
    rubric = rubric_of(config.judge)  # the judge learns the prompt stage 03 asks it, and to answer as it shows
    rows += [
        {
            "prompt": chat.prompt(rubric.prompt(r["prompt"], r["response"])),
            "completion": chat.completion(judge_target(r["justification"], r["score"], config.judge.format, rubric)),
        }
        for r in eft
    ]
    return rows


def ranking_data(config, base: str, eft: list[dict]) -> dict:
    """What the judge's ranking or judgment DPO loss trains on (judge.objective): every EFT row's judge prompt as
    stage 03 renders it, opened with the score prefix the logit judge reads, as token ids; the (better, worse)
    pairs among them, or with judgment_dpo the rows themselves and their human scores; and the tokens of the
    digits 0-5."""
    from selfreward.model.judge_ranking import better_worse_pairs, judged_rows  # trl

    chat = ChatFormat.from_tokenizer(load_tokenizer(base, config.model))
    rubric = rubric_of(config.judge)
    prefix, digit_ids = score_token_ids(chat, rubric)
    budget = config.sft.max_length - len(chat.encode(prefix))
    sequences = [
        chat.encode(fit_judge_prompt(chat, r["prompt"], r["response"], budget, rubric)[0] + prefix) for r in eft
    ]
    if config.judge.objective == "judgment_dpo":
        scores = [r["score"] for r in eft]
        return {"judge_sequences": sequences, "judge_pairs": judged_rows(eft, config.seed), "digit_ids": digit_ids,
                "judge_scores": scores}  # fmt: skip
    return {"judge_sequences": sequences, "judge_pairs": better_worse_pairs(eft, config.seed), "digit_ids": digit_ids}


def base_judge_quality(config, base: str, heldout_eft: list[dict]) -> dict:
    """The base model measured as a judge on the held-out EFT rows, as stage 03 measures M0 (judge.measure_base):
    the report checks that SFT did not make the judge worse than the model it started from."""
    from selfreward.judge.judges import judge_for  # torch

    judge = judge_for(config, base, "the base model")  # loads the model when first asked
    if not (config.judge.measure_base and heldout_eft) or judge.fixed:  # a reward model judges the loop itself
        return {}
    quality = judge.measure(heldout_eft, samples=config.eval.bootstrap_samples, seed=config.seed)
    judge.close()
    return {"base_judge_quality": quality}


def record_m0(stage, base: str, data: list, *, rows_in: int, counts: dict) -> None:
    """M0's lineage and the stage's manifest, once the merged model is saved and its checkpoints are no longer
    needed."""
    from selfreward.model.training import training_processes, write_lineage  # main has loaded it already

    config, layout = stage.config, stage.layout
    write_lineage(
        layout.lineage(0),
        model="M0",
        stage="00_sft",
        base=config.model.name_or_path,
        parent=base,
        data=data,
        config=config,
    )
    shutil.rmtree(layout.checkpoints(0), ignore_errors=True)
    stage.finish(
        rows_in=rows_in,
        rows_out=0,
        outputs=[str(layout.model(0)), str(layout.adapter(0))],
        extra={"model": "M0", "processes": training_processes(), **counts},
        also_version=[layout.lineage(0), layout.train_log(0), layout.train_dir(0)]
        + [p for p in [layout.tensorboard(0)] if p.is_dir()],
    )


if __name__ == "__main__":
    run(main)
