"""LoRA training (SFT for M0, DPO for M1, M2, ...) and turning the adapter into the next model.

Both stages share one path: load the parent (4-bit when the config asks), attach LoRA, train with
TRL, save the adapter, then merge it into the full-precision parent so the next iteration loads a
plain model. With `peft_config` and no `ref_model`, TRL's DPO reference is the parent with the adapter
switched off: exactly M<t>.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from selfreward.model.chat import ChatFormat
from selfreward.model.models import (
    check_merge_memory,
    device_of,
    load_model,
    load_tokenizer,
    lora_target_problem,
    merge_adapter,
    merge_ram_needed,
)
from selfreward.run import failpoints
from selfreward.run.config import Config, ConfigError, TrainConfig, per_process_batch
from selfreward.run.records import path_fingerprint, write_json
from selfreward.run.runlock import is_rank_zero

if TYPE_CHECKING:
    from transformers import Trainer

log = logging.getLogger("selfreward")


def optimizer_steps(train: TrainConfig, rows: int, processes: int) -> int:
    """The optimizer steps the trainer takes over `rows`, counted as transformers' Trainer does: each
    process gets ceil(rows / processes) rows, and a last partial accumulation is a step too."""
    if train.max_steps > 0:  # steps of the global batch: the same rows seen however many processes
        return train.max_steps
    per_device, accum = per_process_batch(train, processes)
    batches = math.ceil(rows / (per_device * processes))
    return max(1, math.ceil(math.ceil(batches / accum) * train.epochs))


def warmup_for(train: TrainConfig, steps: int, section: str) -> int:
    """warmup_steps, cut below the run's steps. The schedule's first step has learning rate 0, so with
    warmup_steps >= steps the rate never reaches its value, and in a one-step run (RAFT's few kept rows,
    an iteration with few pairs) nothing trains at all: the child would be its parent, silently."""
    if train.warmup_steps < steps:
        return train.warmup_steps
    log.warning(
        "%s.warmup_steps %d is not below this run's %d optimizer steps; warming up over %d instead, "
        "or the learning rate would not reach %g",
        section,
        train.warmup_steps,
        steps,
        steps - 1,
        train.learning_rate,
    )
    return steps - 1


def _trainer_args(train: TrainConfig, config: Config, output_dir: Path, rows: int, section: str) -> dict:
    mixed = config.model.bnb_4bit_compute_dtype if config.model.load_in_4bit else config.model.dtype
    processes = training_processes()
    per_device, accum = per_process_batch(train, processes)
    if processes > 1 and is_rank_zero():
        log.info(
            "%s: the global batch of %d is %d processes x %d rows x %d accumulation steps",
            section,
            train.batch_size * train.grad_accum,
            processes,
            per_device,
            accum,
        )
    steps = optimizer_steps(train, rows, processes)
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accum,
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "warmup_steps": warmup_for(train, steps, section),
        "lr_scheduler_type": train.lr_scheduler,
        "logging_steps": train.logging_steps,
        "save_steps": train.save_steps,
        "save_total_limit": 2,
        "max_length": train.max_length,
        "gradient_checkpointing": train.gradient_checkpointing,
        # Reentrant under FSDP and ZeRO-3, as peft's FSDP-QLoRA guide and TRL's ZeRO-3 path run it.
        "gradient_checkpointing_kwargs": (
            {"use_reentrant": sharded_engine(config)} if train.gradient_checkpointing else None
        ),
        "bf16": mixed == "bfloat16",
        "fp16": mixed == "float16",
        "use_cpu": device_of(config.model) == "cpu",
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": [] if train.report_to == "none" else [train.report_to],
        "disable_tqdm": False,
    }


def _peft_config(config: Config, model):
    from peft import LoraConfig  # heavy

    problem = lora_target_problem(model, list(config.lora.target_modules))
    if problem:  # peft's own error comes from deep inside the trainer's set-up
        raise ConfigError(problem)

    layers = None
    if config.lora.last_layers:
        total = model.config.num_hidden_layers
        layers = list(range(max(0, total - config.lora.last_layers), total))
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


# What `accelerate launch` sets for each sharded engine (configs/accelerate/*.yaml).
ENGINE_LAUNCH_ENV = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


def sharded_engine(config: Config) -> bool:
    """train.engine fsdp or deepspeed: the model is sharded over the processes, not copied to each."""
    return config.train.engine != "ddp"


def check_engine_launch(config: Config) -> None:
    """train.engine fsdp or deepspeed trains only under accelerate launch with its config file: started any
    other way, the trainer would silently hold the whole model in every process."""
    engine = config.train.engine
    if engine in ENGINE_LAUNCH_ENV and os.environ.get(ENGINE_LAUNCH_ENV[engine], "").lower() != "true":
        raise ConfigError(
            f"config key 'train.engine' is {engine}, but this process was not started by accelerate launch with "
            f"configs/accelerate/{'fsdp' if engine == 'fsdp' else 'zero3'}.yaml; run it through self-reward.sh, or "
            f"print the command with: python -m selfreward.launch --config CONFIG --processes N"
        )


def _load_for_training(parent: str, config: Config, train: TrainConfig):
    sharded = sharded_engine(config)
    model = load_model(parent, config.model, quantize=config.model.load_in_4bit, sharded=sharded)
    # prepare_model_for_kbit_training casts every weight that is not 4-bit to float32; FSDP and ZeRO-3 need
    # them all in the compute dtype, so under them the trainer's own gradient checkpointing is all there is.
    if config.model.load_in_4bit and not sharded:
        from peft import prepare_model_for_kbit_training  # heavy

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    return model


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint: one killed while being saved has no trainer_state.json yet."""
    complete = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    numbered = [p for p in complete if p.name.split("-")[-1].isdigit()]
    return str(max(numbered, key=lambda p: int(p.name.split("-")[-1]))) if numbered else None


def _for_trainer(tokenizer, rows: list[dict]) -> list[dict]:
    """Rows whose rendered prompts TRL will tokenize to the ids generation uses (see ChatFormat)."""
    chat = ChatFormat.from_tokenizer(tokenizer)
    return [{**row, "prompt": chat.for_trainer(row["prompt"])} for row in rows]


def _adapter_in_float32(trainer, config: Config):
    """Undo TRL's cast of a 4-bit model's LoRA weights to bf16 (before the optimizer exists).

    In bf16 an entry of about 0.02 moves only in steps of about 1e-4, so an Adam step of lr 5e-6 (the
    Mistral config's DPO rate) left every lora_A unchanged. In float32 every step counts; the forward
    pass still runs in the compute dtype under autocast, as QLoRA intends. Not under FSDP or ZeRO-3, which
    shard one dtype (the 4-bit weights are stored in the compute dtype): there the adapter trains in it.
    """
    if sharded_engine(config):
        return trainer
    if getattr(trainer.model, "is_loaded_in_4bit", False) or getattr(trainer.model, "is_quantized", False):
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return trainer


def _tensorboard_into(logs: Path | None, train: TrainConfig) -> None:
    # transformers' TensorBoard callback reads its folder from this variable when the trainer is built;
    # its default is inside the checkpoints, which are deleted once the model is merged.
    if train.report_to == "tensorboard" and logs is not None:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs)


def build_sft_trainer(
    parent: str,
    rows: list[dict],
    config: Config,
    checkpoints: Path,
    logs: Path | None = None,
    ranking: dict | None = None,
):
    """An SFTTrainer on prompt/completion rows whose loss covers the completion tokens only; with `ranking`
    (judge_ranking.RankingSFTTrainer's judge_sequences, judge_pairs and digit_ids) it also trains the judge's
    ranking loss (judge.objective)."""
    from datasets import Dataset  # heavy
    from trl import SFTConfig, SFTTrainer  # heavy

    _tensorboard_into(logs, config.sft)

    tokenizer = load_tokenizer(parent, config.model)
    args = SFTConfig(
        **_trainer_args(config.sft, config, checkpoints, len(rows), "sft"),
        completion_only_loss=True,
        train_sampling_strategy="group_by_length",  # short IFT rows batched together: less padding
    )
    model = _load_for_training(parent, config, config.sft)
    kwargs: dict = {}
    if ranking:
        from selfreward.model.judge_ranking import JudgmentDPOSFTTrainer, RankingSFTTrainer  # trl

        kwargs = {**ranking, "weight": config.judge.ranking_weight, "pairs_per_batch": config.judge.ranking_pairs}
        trainer_class = RankingSFTTrainer
        if "judge_scores" in ranking:  # judge.objective judgment_dpo
            trainer_class, kwargs["beta"] = JudgmentDPOSFTTrainer, config.judge.judgment_beta
    else:
        trainer_class = SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_for_trainer(tokenizer, rows)),
        processing_class=tokenizer,
        peft_config=_peft_config(config, model),
        **kwargs,
    )
    return _adapter_in_float32(trainer, config)


def build_dpo_trainer(
    parent: str,
    rows: list[dict],
    config: Config,
    checkpoints: Path,
    logs: Path | None = None,
    reference: str | None = None,
):
    """A DPOTrainer with LoRA on `parent`. The reference is `parent` with the adapter switched off, or the
    model in `reference` (dpo.reference initial: M0), loaded frozen and quantized like the policy."""
    from datasets import Dataset  # heavy
    from trl import DPOConfig, DPOTrainer  # heavy

    _tensorboard_into(logs, config.dpo)

    tokenizer = load_tokenizer(parent, config.model)
    args = DPOConfig(**_trainer_args(config.dpo, config, checkpoints, len(rows), "dpo"), beta=config.dpo.beta)
    model = _load_for_training(parent, config, config.dpo)
    ref_model = None
    if reference is not None:
        sharded = sharded_engine(config)
        ref_model = load_model(reference, config.model, quantize=config.model.load_in_4bit, sharded=sharded).eval()
        ref_model.requires_grad_(False)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(_for_trainer(tokenizer, rows)),
        processing_class=tokenizer,
        peft_config=_peft_config(config, model),
    )
    return _adapter_in_float32(trainer, config)


def train_and_merge(
    make_trainer: Callable[[], Trainer],
    parent: str,
    config: Config,
    *,
    adapter_dir: Path,
    model_dir: Path,
    log_path: Path,
) -> list[dict] | None:
    """Build the trainer, train (resuming from the newest checkpoint if one is there), save the adapter,
    merge, return the log.

    The trainer is built here and nothing else holds it, so once it is dropped its model, optimizer and
    accelerator go with it and their GPU memory can be handed back before the merge, and before the
    caller starts the next model (prepare_data starts vLLM, which wants most of the card free).
    Under torchrun every rank trains; only rank 0 saves and merges, the others get None and stop. The host
    RAM the merge needs is checked by rank 0 before the model loads, when the parent's weight files tell.
    """
    check_engine_launch(config)
    checked = is_rank_zero() and merge_ram_needed(parent, config.model) is not None
    if checked:
        check_merge_memory(parent, config.model)
    trainer = make_trainer()
    if is_rank_zero() and not checked:  # .bin weights, or a cache elsewhere: counted from the loaded model
        check_merge_memory(parent, config.model, loaded=trainer.model)
    resume = last_checkpoint(Path(trainer.args.output_dir))
    if resume:
        log.info("resuming from %s", resume)
    trainer.add_callback(_CheckpointFailpoint())
    trainer.train(resume_from_checkpoint=resume)
    if getattr(trainer, "is_fsdp_enabled", False):  # the adapter whole, not FSDP's shards (peft's FSDP guide)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))
    main_rank = trainer.is_world_process_zero()
    _leave_process_group()
    if not main_rank:
        return None
    history = trainer.state.log_history
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    tokenizer = trainer.processing_class
    del trainer  # its only reference: the model, the optimizer and the accelerator's state go with it
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    merge_adapter(parent, adapter_dir, model_dir, config.model, tokenizer)
    return history


def training_processes() -> int:
    """How many processes train together: torchrun's WORLD_SIZE (self-reward.sh --num-processes), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _leave_process_group() -> None:
    """Under torchrun, all ranks meet once training is saved and close the process group together.

    A rank that returned with the group open could abort at interpreter exit ("terminate called
    without an active exception", SIGABRT) while rank 0 was still merging, and torchrun then killed
    rank 0 too: the stage failed after its work was done (2 of 51 DDP runs here, and once on CI).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _CheckpointFailpoint(TrainerCallback):
    """Lets the reliability tests kill training right after a checkpoint is saved (see failpoints)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            failpoints.reach("after_checkpoint")


def write_lineage(
    path: Path,
    *,
    model: str,
    stage: str,
    base: str,
    parent: str,
    data: list[Path],
    config: Config,
    reference: str | None = None,
) -> None:
    """Where a model came from: enough to retrace it without reading logs."""
    write_json(
        path,
        {
            "model": model,
            "stage": stage,
            "base": base,
            "parent": parent,
            **({"reference": reference} if reference else {}),  # DPO: the model its loss kept it close to
            "data": [{"path": str(p), "fingerprint": path_fingerprint(p)} for p in data],
            "config": config.to_dict(),
        },
    )


def train_child(
    stage,
    make_trainer: Callable[[], Trainer],
    parent: str,
    data: list[Path],
    *,
    rows_in: int,
    reference: str | None = None,
) -> None:
    """Stage 05's common end (05_dpo, 05_raft_sft): train M<t> from `parent` with the trainer
    `make_trainer` builds (see train_and_merge), merge it, write its lineage,
    drop the checkpoints and finish the stage (manifest, summary, Oxen). On a torchrun rank other than 0
    it only trains: rank 0 saves and reports."""
    layout, t, config = stage.layout, stage.iteration, stage.config
    history = train_and_merge(
        make_trainer,
        parent,
        config,
        adapter_dir=layout.adapter(t),
        model_dir=layout.model(t),
        log_path=layout.train_log(t),
    )
    if history is None:
        return
    write_lineage(
        layout.lineage(t),
        model=f"M{t}",
        stage=stage.name,
        base=config.model.name_or_path,
        parent=parent,
        data=data,
        config=config,
        reference=reference,
    )
    shutil.rmtree(layout.checkpoints(t), ignore_errors=True)
    stage.finish(
        rows_in=rows_in,
        rows_out=0,
        outputs=[str(layout.model(t)), str(layout.adapter(t))],
        extra={"model": f"M{t}", "processes": training_processes()},
        also_version=[layout.lineage(t), layout.train_log(t), layout.train_dir(t)]
        + [p for p in [layout.tensorboard(t)] if p.is_dir()],
    )
