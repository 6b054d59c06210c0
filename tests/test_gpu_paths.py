"""Code paths a GPU box takes with a 7B model, run here on the tiny model with the same flags."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from selfreward.model.chat import ChatFormat
from selfreward.model.models import TINY, load_tokenizer, resolve_model_path
from selfreward.model.training import build_dpo_trainer, build_sft_trainer
from selfreward.run.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _tiny_with_bos_tokenizer(folder: Path, *, chat_template: str | None) -> Path:
    """The tiny model with a tokenizer that adds BOS to any text, as Mistral's and Llama's do."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    shutil.copytree(resolve_model_path(TINY), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = chat_template
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "template", ["fallback (starts with bos_token)", "no BOS in the template", "Mistral-7B's dry-run stand-in"]
)
def test_training_rows_and_generation_prompts_start_with_one_bos(tmp_path, template):
    from selfreward.dryrun import stand_in
    from selfreward.model.chat import packaged_template

    if template.startswith("Mistral"):  # SentencePiece: "▁" is put before the text after BOS, in both paths
        model = stand_in("mistralai/Mistral-7B-v0.1")
    else:
        chat_template = None if template.startswith("fallback") else packaged_template("tiny_chat_template.jinja")
        model = _tiny_with_bos_tokenizer(tmp_path / "model", chat_template=chat_template)
    config = load_config(REPO / "configs" / "tiny.yaml")
    tokenizer = load_tokenizer(model, config.model)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds BOS itself
    chat = ChatFormat.from_tokenizer(tokenizer)
    prompt = chat.prompt("Name a prime number.")
    generation_ids = chat.encode(prompt)  # what stages 01-03 and 06 feed the model
    assert generation_ids[:2].count(tokenizer.bos_token_id) == 1

    sft = build_sft_trainer(
        str(model), [{"prompt": prompt, "completion": chat.completion("7")}], config, tmp_path / "sft"
    )
    sft_ids = sft.train_dataset[0]["input_ids"]
    assert sft_ids[: len(generation_ids)] == generation_ids
    dpo_row = {"prompt": prompt, "chosen": chat.completion("7"), "rejected": chat.completion("8")}
    dpo = build_dpo_trainer(str(model), [dpo_row], config, tmp_path / "dpo")
    assert dpo.train_dataset[0]["prompt_ids"] == generation_ids


@pytest.mark.parametrize("judge_mode", ["logits", "reward_model"])
def test_eval_holds_one_model_at_a_time(tiny_run, tmp_path, monkeypatch, live_models_at_load, judge_mode):
    # Stage 06 loads M0, M1 and M2 in turn: on a 24 GB card two 7B models do not fit at once, so each
    # must be gone before the next one loads. With judge.mode reward_model the tiny run's stage 03
    # measured another judge, so stage 06 measures the reward model itself: it too must load alone.
    import runpy
    import sys

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    argv = ["06_eval.py", "--run-dir", str(run), "--iteration", "2", "--no-oxen", "--judge.mode", judge_mode]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "scripts" / "06_eval.py"), run_name="__main__")
    loads = 4 if judge_mode == "reward_model" else 3  # M0, M1, M2 (M2 then judges) and the reward model
    assert live_models_at_load == [0] * loads  # none alive when the next loads


def test_each_torchrun_rank_loads_4bit_onto_its_own_gpu(monkeypatch):
    # torchrun sets LOCAL_RANK; device_map {"": "cuda"} would put every rank's copy on cuda:0.
    import transformers

    from selfreward.model.models import device_of, load_model
    from selfreward.run.config import ModelConfig

    seen = {}

    def capture(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = ModelConfig(name_or_path=TINY, device="cuda", load_in_4bit=True)
    assert device_of(cfg) == "cuda:1"
    with pytest.raises(RuntimeError, match="stop before loading"):
        load_model(TINY, cfg, quantize=True)
    assert seen["device_map"] == {"": "cuda:1"}
    monkeypatch.delenv("LOCAL_RANK")
    assert device_of(cfg) == "cuda"  # one process: the default GPU
    assert device_of(ModelConfig(name_or_path=TINY, device="cpu")) == "cpu"


def test_a_merge_that_cannot_fit_in_host_ram_fails_before_training(monkeypatch, tmp_path):
    # A 7B fp16 merge needs about 14.5 GB of host RAM: a 16 GiB host would die by the OOM killer
    # after hours of training. The check reads only the safetensors headers.
    from types import SimpleNamespace

    from selfreward.model import models
    from selfreward.model.training import train_and_merge

    config = load_config(REPO / "configs" / "tiny.yaml")
    path = resolve_model_path(TINY)
    needed = models.merge_ram_needed(path, config.model)
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    assert needed is not None and params * 4 <= needed <= params * 4 * 1.2  # float32: 4 bytes a parameter

    calls = []
    trainer = SimpleNamespace(
        model=None, args=SimpleNamespace(output_dir=str(tmp_path)), train=lambda **kw: calls.append("train")
    )
    monkeypatch.setattr(models, "available_host_ram", lambda: needed // 2)
    with pytest.raises(models.HostMemoryError, match=r"about 0\.0 GiB of RAM, but 0\.0 GiB is available"):
        train_and_merge(
            lambda: trainer, path, config, adapter_dir=tmp_path / "a", model_dir=tmp_path / "m", log_path=tmp_path / "l"
        )
    assert calls == []  # refused before the first step
    monkeypatch.setattr(models, "available_host_ram", lambda: needed)
    models.check_merge_memory(path, config.model)  # enough: no error


def test_qlora_dpo_steps_at_the_mistral_learning_rate_move_both_lora_matrices(tmp_path):
    # TRL casts a quantized model's LoRA weights to bf16; at dpo.learning_rate 5e-6 an Adam step
    # (about 5e-6 per entry) is below bf16's resolution for lora_A's entries, so A never moved. The
    # first step moves only B (B starts at zero, so A has no gradient yet); the second moves A.
    import torch

    config = load_config(
        REPO / "configs" / "tiny.yaml",
        {"model.load_in_4bit": True, "model.bnb_4bit_compute_dtype": "bfloat16", "dpo.learning_rate": 5.0e-6,
         "dpo.max_steps": 2, "dpo.batch_size": 2, "dpo.warmup_steps": 0, "dpo.save_steps": 100},
    )  # fmt: skip
    path = resolve_model_path(TINY)
    chat = ChatFormat.from_tokenizer(load_tokenizer(path, config.model))
    rows = [
        {
            "prompt": chat.prompt(f"Name a colour, {k}."),
            "chosen": chat.completion("Blue."),
            "rejected": chat.completion("No."),
        }
        for k in range(2)
    ]
    trainer = build_dpo_trainer(path, rows, config, tmp_path / "dpo")
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 for p in lora.values())  # the trainable copy keeps full precision
    before = {n: p.detach().clone() for n, p in lora.items()}
    trainer.train()
    for kind in ("lora_A", "lora_B"):
        changed = sum(int((before[n] != p.detach()).sum()) for n, p in lora.items() if kind in n)
        total = sum(p.numel() for n, p in lora.items() if kind in n)
        assert changed / total > 0.9, f"{kind}: {changed} of {total} entries changed"


class _WatchedTraining:
    """Wraps a build_*_trainer: weak references to each trainer it builds, to its models and optimizer,
    and, from the end of training on, torch.cuda.is_available true and every empty_cache call recorded
    with which of them were still alive (on a GPU, memory they hold is not handed back)."""

    def __init__(self, build, monkeypatch):
        import weakref

        import torch

        self.refs: dict = {}
        self.alive_at_empty_cache: list[list[str]] = []

        def watched(*args, **kwargs):
            trainer = build(*args, **kwargs)
            self.refs.update(trainer=weakref.ref(trainer), model=weakref.ref(trainer.model))
            if getattr(trainer, "ref_model", None) is not None:
                self.refs["reference model"] = weakref.ref(trainer.ref_model)
            train = trainer.train

            def train_then_watch(**kwargs):
                out = train(**kwargs)
                self.refs["optimizer"] = weakref.ref(trainer.optimizer)
                monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
                monkeypatch.setattr(torch.cuda, "empty_cache", self._record)
                return out

            trainer.train = train_then_watch
            return trainer

        self.build = watched

    def _record(self):
        self.alive_at_empty_cache.append(sorted(name for name, ref in self.refs.items() if ref() is not None))


def test_prepare_data_frees_the_sft_baseline_before_the_judge_loads(tmp_path, monkeypatch):
    # prepare_data.py starts vLLM (which wants 0.9 of the card free) right after training the SFT
    # baseline: the trainer, its model and its optimizer must be gone when the CUDA cache is emptied.
    import runpy

    from selfreward.model import training

    watch = _WatchedTraining(training.build_sft_trainer, monkeypatch)
    monkeypatch.setattr(training, "build_sft_trainer", watch.build)
    sft_baseline = runpy.run_path(str(REPO / "scripts" / "prepare_data.py"))["sft_baseline"]
    config = load_config(REPO / "configs" / "tiny.yaml", {"sft.max_steps": 1, "sft.report_to": "none"})
    ift = [{"id": f"r{k}", "prompt": f"Name a colour, {k}.", "completion": "Blue."} for k in range(4)]
    model = sft_baseline(config, ift, tmp_path / "oasst")
    assert (model / "config.json").is_file()
    assert watch.alive_at_empty_cache and all(alive == [] for alive in watch.alive_at_empty_cache), (
        watch.alive_at_empty_cache
    )


def test_dpo_with_the_initial_reference_frees_both_models_before_the_merge(tmp_path, monkeypatch):
    # Stage 05 with dpo.reference initial holds a second model, the reference, in its trainer.
    from functools import partial

    from selfreward.model import training

    config = load_config(REPO / "configs" / "tiny.yaml", {"dpo.max_steps": 1, "dpo.report_to": "none"})
    path = resolve_model_path(TINY)
    chat = ChatFormat.from_tokenizer(load_tokenizer(path, config.model))
    rows = [
        {"prompt": chat.prompt(f"Colour {k}?"), "chosen": chat.completion("Blue."), "rejected": chat.completion("No.")}
        for k in range(4)
    ]
    watch = _WatchedTraining(training.build_dpo_trainer, monkeypatch)
    training.train_and_merge(
        partial(watch.build, path, rows, config, tmp_path / "checkpoints", reference=path), path, config,
        adapter_dir=tmp_path / "adapter", model_dir=tmp_path / "model", log_path=tmp_path / "train_log.jsonl",
    )  # fmt: skip
    assert "reference model" in watch.refs and (tmp_path / "model" / "config.json").is_file()
    assert watch.alive_at_empty_cache and all(alive == [] for alive in watch.alive_at_empty_cache), (
        watch.alive_at_empty_cache
    )


def _fake_hub_snapshot(hub_cache: Path, repo_id: str, model) -> Path:
    """`model` in the Hugging Face cache's layout, as a download of a 7B model leaves it: sharded, with an
    index, and (as Mistral's repositories have) the same weights again in consolidated.safetensors."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0123abcd" * 5)
    model.save_pretrained(snapshot, max_shard_size="100KB")
    model.save_pretrained(repo / "whole")
    (repo / "whole" / "model.safetensors").rename(snapshot / "consolidated.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_the_merge_ram_check_finds_a_hub_model_in_the_hugging_face_cache(tmp_path, monkeypatch, caplog):
    # Every GPU profile names a hub id (mistralai/Mistral-7B-v0.1): the check looked for a folder of that
    # name, found none and let the run train for hours before the merge was OOM-killed.
    import huggingface_hub.constants
    import transformers

    from selfreward.model import models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config = load_config(REPO / "configs" / "tiny.yaml")
    tiny = resolve_model_path(TINY)
    needed = models.merge_ram_needed(tiny, config.model)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    snapshot = _fake_hub_snapshot(tmp_path / "hub", "someorg/some-7b", loaded)
    assert len(list(snapshot.glob("model-*.safetensors"))) > 1
    assert models.merge_ram_needed("someorg/some-7b", config.model) == needed
    monkeypatch.setattr(models, "available_host_ram", lambda: needed // 2)
    with pytest.raises(models.HostMemoryError, match="merging the adapter loads someorg/some-7b"):
        models.check_merge_memory("someorg/some-7b", config.model)

    # Not in the cache (another cache_dir, or .bin weights): the loaded parent is counted, 4-bit or not.
    four_bit = models.load_model(tiny, config.model, quantize=True)
    assert models._parameter_count(four_bit) == models._parameter_count(loaded)
    assert models.merge_ram_needed("otherorg/not-cached", config.model, loaded=four_bit) == needed
    with pytest.raises(models.HostMemoryError):
        models.check_merge_memory("otherorg/not-cached", config.model, loaded=four_bit)
    # Nothing to count from: not checked, and it says so.
    with caplog.at_level("WARNING", logger="selfreward"):
        models.check_merge_memory("otherorg/not-cached", config.model)
    assert "cannot tell how much host RAM merging the adapter into otherorg/not-cached needs" in caplog.text


def test_the_stage_table_keeps_its_columns_apart_when_a_gpu_peak_is_recorded(tmp_path):
    # On the H200 the table read "peak RAM 1.8 GiB, GPU 0.1 GiBhf": the memory column was sized for RAM alone.
    from selfreward.run.layout import RunLayout
    from selfreward.run.records import write_json
    from selfreward.tools.inspect_run import stage_table

    layout = RunLayout(tmp_path)
    peak = {"ram": 1843, "gpu": 23_450}
    write_json(layout.manifest("00_sft", 0), {"complete": True, "seconds": 9.4, "peak_memory_mb": peak,
                                               "rows_in": 652, "rows_out": 0})  # fmt: skip
    write_json(layout.manifest("01_gen_prompts", 1), {"complete": True, "seconds": 9.2, "peak_memory_mb": peak,
                                                      "backend": "hf", "rows_in": 212, "rows_out": 2})  # fmt: skip
    row = next(line for line in stage_table(tmp_path).splitlines() if line.startswith("01_gen_prompts"))
    assert "peak RAM 1.8 GiB, GPU 22.9 GiB  hf" in row


@pytest.mark.parametrize(
    ("set_before", "expected"),
    [
        ({}, "expandable_segments:True"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, "max_split_size_mb:512"),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, None),
    ],
)
def test_stages_ask_for_expandable_cuda_segments_unless_the_user_set_the_allocator(monkeypatch, set_before, expected):
    # Measured on an H200: one stage-02 call at Mistral-7B's shape left 96 GiB reserved for 25 GiB in use
    # with the default allocator (bench/RESULTS.md); a 24 GB card has no such room.
    import os

    from selfreward.stage import process_defaults

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in set_before.items():
        monkeypatch.setenv(name, value)
    process_defaults()
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected
