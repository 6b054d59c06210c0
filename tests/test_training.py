"""Completion-only SFT loss and the 4-bit (QLoRA) path of stages 00 and 05, on the tiny model."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from selfreward.model.training import build_sft_trainer, optimizer_steps
from selfreward.run.config import Config, apply_overrides
from selfreward.run.layout import RunLayout


def test_sft_loss_covers_completion_tokens_only(tiny_model, tmp_path):
    _, chat, path = tiny_model
    config = apply_overrides(Config(), {"model.name_or_path": path, "model.device": "cpu"}, "test")
    prompt, answer = chat.prompt("Name a primary colour."), "Red."
    trainer = build_sft_trainer(path, [{"prompt": prompt, "completion": chat.completion(answer)}], config, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = len(chat.encode(prompt))
    assert ids[:n_prompt] == chat.encode(prompt)  # the prompt is tokenized exactly as generation does
    assert all(label == -100 for label in labels[:n_prompt])
    trained = [tok for tok, label in zip(ids, labels, strict=True) if label != -100]
    assert trained == chat.encode(chat.completion(answer))  # the answer and its end-of-turn marker
    assert chat.tokenizer.decode(trained) == answer + chat.end_of_turn


def test_a_one_step_run_trains_whatever_warmup_steps_says(tiny_model, tmp_path):
    """The CPU demo's RAFT kept 8 rows, one batch, one optimizer step; under sft.warmup_steps 2 that step's
    learning rate was 0 and M1 came out identical to M0. Warmup is now cut below the run's steps."""
    _, chat, path = tiny_model
    overrides = {"model.name_or_path": path, "model.device": "cpu", "sft.batch_size": 8, "sft.warmup_steps": 2}
    config = apply_overrides(Config(), overrides, "test")
    rows = [{"prompt": chat.prompt(f"Name colour {i}."), "completion": chat.completion("Red.")} for i in range(8)]
    trainer = build_sft_trainer(path, rows, config, tmp_path)
    assert optimizer_steps(config.sft, len(rows), 1) == 1 and trainer.args.warmup_steps == 0
    trainer.train()
    assert trainer.state.global_step == 1
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(bool(p.detach().abs().max() > 0) for p in lora_b)  # LoRA's B starts at zero


def test_qlora_sft_and_dpo_merge_into_full_precision(tiny_run, run_stage, tmp_path):
    """Stages 00 and 05 with model.load_in_4bit: train on NF4, merge into the float32 parent."""
    run = tmp_path / "run"
    layout = RunLayout(run)
    run_stage(
        "00_sft",
        "--run-dir",
        str(run),
        "--config",
        "configs/tiny.yaml",
        "--model.load_in_4bit",
        "true",
        "--sft.max_steps",
        "2",
    )
    config = json.loads((layout.model(0) / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(layout.model(0) / "model.safetensors")
    assert all(w.dtype.is_floating_point and w.element_size() == 4 for w in weights.values())
    assert not any("absmax" in k or "quant" in k for k in weights)

    # DPO on pairs from the full-precision run, again through the 4-bit path
    shutil.copytree(RunLayout(tiny_run).generated(1, "preferences").parent, layout.generated(1, "prompts").parent)
    run_stage(
        "05_dpo",
        "--run-dir",
        str(run),
        "--iteration",
        "1",
        "--config",
        "configs/tiny.yaml",
        "--model.load_in_4bit",
        "true",
    )
    child = load_file(layout.model(1) / "model.safetensors")
    assert all(w.element_size() == 4 for w in child.values())
    assert any(not weights[k].equal(child[k]) for k in weights if "q_proj" in k)
    lineage = json.loads(layout.lineage(1).read_text())
    assert lineage["config"]["model"]["load_in_4bit"] is True


def _contract(run) -> dict[str, object]:
    """What a run folder promises a user: its files, and the fields of every JSONL and JSON record."""
    contract = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or rel.startswith((".oxen", "driver.")) or "/tensorboard/" in rel:
            continue
        if path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            contract[rel] = sorted(json.loads(lines[0])) if lines else []
        elif path.suffix == ".json" and "/model/" not in rel and "/adapter/" not in rel:
            contract[rel] = sorted(json.loads(path.read_text()))
        else:
            contract[rel] = None
    return contract


def test_the_driver_trains_as_two_processes_and_resumes_after_a_kill(tiny_run, cache, tmp_path):
    """self-reward.sh --num-processes 2: stages 00 and 05 under torchrun (gloo here). Rank 0 is killed
    right after DPO's first checkpoint; the rerun resumes from it; the run keeps the 1-process contract."""
    import subprocess

    from conftest import REPO, stage_env

    run = tmp_path / "run"
    layout = RunLayout(run)
    command = ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--iterations", "2",
               "--run-dir", str(run), "--num-processes", "2",
               "--", "--dpo.batch_size", "1", "--dpo.grad_accum", "2", "--dpo.save_steps", "1"]  # fmt: skip
    env = dict(stage_env(cache), OMP_NUM_THREADS="1")
    crash = dict(SELFREWARD_CRASH_AT="05_dpo:1:after_checkpoint", SELFREWARD_CRASH_ONCE=str(tmp_path / "once"))
    killed = subprocess.run(command, cwd=REPO, env={**env, **crash}, capture_output=True, text=True)
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "self-reward.sh: 05_dpo --iteration 1 failed" in killed.stderr
    assert [p.name for p in layout.checkpoints(1).glob("checkpoint-*")] == ["checkpoint-1"], killed.stderr[-3000:]
    assert not (layout.model(1) / "config.json").exists()

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[00_sft] iteration 0: complete, skipped" in done.stdout  # once: rank 1 says nothing
    assert done.stdout.count("complete, skipped") == 5  # 00 and iteration 1's stages 01-04
    assert "resuming from" in done.stderr and "checkpoint-1" in done.stderr
    for t, manifest in [
        (0, layout.manifest("00_sft", 0)),
        (1, layout.manifest("05_dpo", 1)),
        (2, layout.manifest("05_dpo", 2)),
    ]:
        assert json.loads(manifest.read_text())["processes"] == 2, t
    for t in (1, 2):  # a global batch of 2 (1 x grad_accum 2), one row on each rank: half as many steps as pairs
        pairs = len((layout.train_dir(t) / "preferences.jsonl").read_text().splitlines())
        steps = [json.loads(line).get("step") for line in layout.train_log(t).read_text().splitlines()]
        assert max(s for s in steps if s is not None) == -(-pairs // 2)
    assert _contract(run) == _contract(tiny_run)
    assert json.loads(RunLayout(tiny_run).manifest("05_dpo", 1).read_text())["processes"] == 1


def test_a_torchrun_rank_closes_the_process_group_before_it_returns(tmp_path, monkeypatch):
    """A rank other than 0 left train_and_merge with its gloo group open and could abort at exit
    (SIGABRT, 'terminate called without an active exception') while rank 0 merged; CI saw it once."""
    import types

    import torch.distributed as dist

    from selfreward.model import training

    class Rank1Trainer:
        model = None
        args = types.SimpleNamespace(output_dir=str(tmp_path / "checkpoints"))

        def add_callback(self, callback):
            pass

        def train(self, resume_from_checkpoint=None):
            pass

        def save_model(self, path):
            pass

        def is_world_process_zero(self):
            return False

    monkeypatch.setattr(training, "merge_ram_needed", lambda parent, model: None)  # no weights to count here
    monkeypatch.setattr(training, "check_merge_memory", lambda parent, model, loaded: None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = training.train_and_merge(
            Rank1Trainer,
            "parent",
            Config(),
            adapter_dir=tmp_path / "a",
            model_dir=tmp_path / "m",
            log_path=tmp_path / "l",
        )
        assert out is None and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_trainer_metrics_go_to_tensorboard_inside_the_run(tiny_run):
    """sft/dpo.report_to: tensorboard (set in the tiny config): event files next to each model, versioned with it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layout = RunLayout(tiny_run)
    for t, stage in ((0, "00_sft"), (1, "05_dpo"), (2, "05_dpo")):
        events = EventAccumulator(str(layout.tensorboard(t))).Reload()
        assert "train/loss" in events.Tags()["scalars"], f"M{t}: {events.Tags()['scalars']}"
        assert f"M{t}/tensorboard" in json.loads(layout.manifest(stage, t).read_text())["versioned"]


def test_dpo_reference_initial_keeps_m0_as_the_reference(tiny_run, tmp_path, run_stage):
    """dpo.reference initial (RLHFlow's iterative DPO): from iteration 2 the reference is M0, not M1."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from selfreward.model.chat import ChatFormat
    from selfreward.model.models import load_tokenizer
    from selfreward.model.training import build_dpo_trainer
    from selfreward.run.config import load_config

    layout = RunLayout(tiny_run)
    config = load_config(layout.config, {"dpo.reference": "initial"})
    chat = ChatFormat.from_tokenizer(load_tokenizer(layout.model(1), config.model))
    rows = [{"prompt": chat.prompt("Name a colour."), "chosen": chat.completion("Blue."),
             "rejected": chat.completion("No.")}]  # fmt: skip
    trainer = build_dpo_trainer(str(layout.model(1)), rows, config, tmp_path / "dpo", reference=str(layout.model(0)))
    m0 = AutoModelForCausalLM.from_pretrained(layout.model(0))
    m1 = AutoModelForCausalLM.from_pretrained(layout.model(1))
    name = "model.layers.0.self_attn.q_proj.weight"
    ref = dict(trainer.ref_model.named_parameters())[name]
    assert torch.equal(ref, dict(m0.named_parameters())[name])
    assert not torch.equal(ref, dict(m1.named_parameters())[name])  # DPO moved M1 away from M0
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert build_dpo_trainer(str(layout.model(1)), rows, config, tmp_path / "dpo2").ref_model is None  # previous

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    run_stage("05_dpo", "--run-dir", str(run), "--iteration", "2", "--dpo.reference", "initial", "--no-oxen")
    lineage = json.loads(RunLayout(run).lineage(2).read_text())
    assert lineage["reference"] == str(RunLayout(run).model(0)) and lineage["parent"] == str(RunLayout(run).model(1))
    default = json.loads(RunLayout(tiny_run).lineage(2).read_text())
    assert default["reference"] == default["parent"]  # dpo.reference previous: the paper's M<t-1>


def _shipped(name: str) -> Config:
    from conftest import REPO

    from selfreward.run.config import load_config

    return load_config(REPO / "configs" / name, {"model.device": "cpu"})


@pytest.mark.parametrize("profile", ["mistral-7b-qlora.yaml", "qwen2.5-7b-qlora.yaml"])
def test_eight_processes_train_the_configs_global_batch(profile, tmp_path, monkeypatch):
    """--num-processes 8 took each config batch per process with grad_accum unchanged: eight times the
    global batch, an eighth of the optimizer steps (SFT on 534 rows: 34 steps became 5). The global
    batch batch_size x grad_accum is the config's however many processes share it."""
    from selfreward.model.training import _trainer_args

    config = _shipped(profile)
    for section in ("sft", "dpo"):
        train = getattr(config, section)
        assert optimizer_steps(train, 534, processes=8) == optimizer_steps(train, 534, processes=1), section
        monkeypatch.setenv("WORLD_SIZE", "8")
        args = _trainer_args(train, config, tmp_path, 534, section)
        per_device, accum = args["per_device_train_batch_size"], args["gradient_accumulation_steps"]
        assert per_device * accum * 8 == train.batch_size * train.grad_accum, section
        assert per_device <= train.batch_size  # never more memory per GPU than the config sized for one


def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path, monkeypatch):
    from selfreward.model.training import _trainer_args
    from selfreward.run.config import ConfigError

    config = apply_overrides(Config(), {"model.device": "cpu", "dpo.batch_size": 4, "dpo.grad_accum": 4}, "test")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"dpo\.batch_size 4 x dpo\.grad_accum 4 .* 3 processes.*--dpo\.grad_accum 3"):
        _trainer_args(config.dpo, config, tmp_path, 100, "dpo")


def test_the_driver_refuses_an_unshareable_global_batch_before_any_stage(cache, tmp_path):
    """configs/tiny.yaml's SFT batch is 8 (grad_accum 1): 3 processes cannot share it. The driver says so at
    once, naming the keys, instead of failing in 00_sft (or, for dpo.*, after an iteration's generation)."""
    from conftest import run_driver

    run = tmp_path / "run"
    proc = run_driver(run, cache, iterations=1, extra=["--num-processes", "3"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sft.batch_size 8 x sft.grad_accum 1" in proc.stderr and "3 processes" in proc.stderr
    assert not (run / "M0").exists()


def test_optimizer_steps_counts_a_last_partial_accumulation_as_the_trainer_does(tiny_model, tmp_path):
    """10 rows at batch 1 and grad_accum 4: the Trainer steps after rows 4, 8 and 10, three steps; the count
    once said two, so the warmup cut below it was off by a step."""
    _, chat, path = tiny_model
    overrides = {"model.name_or_path": path, "model.device": "cpu", "sft.batch_size": 1, "sft.grad_accum": 4}
    config = apply_overrides(Config(), overrides, "test")
    rows = [{"prompt": chat.prompt(f"Name colour {i}."), "completion": chat.completion("Red.")} for i in range(10)]
    trainer = build_sft_trainer(path, rows, config, tmp_path)
    trainer.train()
    assert trainer.state.global_step == optimizer_steps(config.sft, len(rows), 1) == 3


def test_a_rank_that_finds_the_checkpoint_stamp_matching_leaves_it_alone(tmp_path):
    """Under torchrun every rank calls Stage.checkpoints before training. Each rewrote the folder's stamp in
    place (truncate, then write) even when it matched, so a rank reading it meanwhile read "" and deleted the
    checkpoints the rerun was to resume from (the 2-process driver test failed so once, under load)."""
    import argparse
    import os

    from selfreward.stage import Stage

    stage = Stage("05_dpo", argparse.Namespace(), Config(), RunLayout(tmp_path), 1, 0.0, fingerprint="inputs")
    folder = stage.checkpoints(1)
    (folder / "checkpoint-1").mkdir()
    stamp = folder / "fingerprint"
    os.utime(stamp, ns=(0, 0))  # any rewrite would move it to now
    assert stage.checkpoints(1) == folder
    assert stamp.stat().st_mtime_ns == 0 and stamp.read_text() == "inputs"
    assert (folder / "checkpoint-1").is_dir()


def test_a_rank_other_than_0_never_empties_the_checkpoint_folder_rank_0_is_stamping(tmp_path, monkeypatch):
    """Rank 0 makes the folder, then writes its stamp through a temporary file. A rank 1 that came in
    between found the folder without a stamp and deleted it, temporary file and all, so rank 0's rename
    failed and DPO stopped before its first checkpoint (CI, the 2-process driver test, under load).
    Now only rank 0 empties and stamps the folder; the others wait for its stamp."""
    import argparse
    import threading

    from selfreward.stage import Stage

    stage = Stage("05_dpo", argparse.Namespace(), Config(), RunLayout(tmp_path), 1, 0.0, fingerprint="inputs")
    folder = RunLayout(tmp_path).checkpoints(1)
    folder.mkdir(parents=True)
    rank_0_writing = folder / f".fingerprint.{12345}.tmp"  # rank 0 is between its mkdir and its rename
    rank_0_writing.write_text("inputs")
    monkeypatch.setenv("RANK", "1")
    renamed = []

    def rank_0_renames():
        try:
            rank_0_writing.replace(folder / "fingerprint")
            renamed.append("done")
        except OSError as error:
            renamed.append(error)

    stamped = threading.Timer(0.5, rank_0_renames)
    stamped.start()
    try:
        assert stage.checkpoints(1) == folder
    finally:
        stamped.join()
    assert renamed == ["done"]
    assert (folder / "fingerprint").read_text() == "inputs"
