"""Code paths a GPU box takes with a 7B model, run here on the tiny model with the same flags."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from selfreward.chat import ChatFormat
from selfreward.config import load_config
from selfreward.models import TINY, load_tokenizer, resolve_model_path
from selfreward.training import build_dpo_trainer, build_sft_trainer

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
    from selfreward.chat import packaged_template
    from selfreward.dryrun import stand_in

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


def test_eval_holds_one_model_at_a_time(tiny_run, tmp_path, monkeypatch, live_models_at_load):
    # Stage 06 loads M0, M1 and M2 in turn: on a 24 GB card two 7B models do not fit at once, so each
    # must be gone before the next one loads.
    import runpy
    import sys

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    monkeypatch.setattr(sys, "argv", ["06_eval.py", "--run-dir", str(run), "--iteration", "2", "--no-oxen"])
    runpy.run_path(str(REPO / "scripts" / "06_eval.py"), run_name="__main__")
    assert live_models_at_load == [0, 0, 0]  # M0, M1, M2 (M2 then judges): none alive when the next loads


def test_each_torchrun_rank_loads_4bit_onto_its_own_gpu(monkeypatch):
    # torchrun sets LOCAL_RANK; device_map {"": "cuda"} would put every rank's copy on cuda:0.
    import transformers

    from selfreward.config import ModelConfig
    from selfreward.models import device_of, load_model

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

    from selfreward import models
    from selfreward.training import train_and_merge

    config = load_config(REPO / "configs" / "tiny.yaml")
    path = resolve_model_path(TINY)
    needed = models.merge_ram_needed(path, config.model)
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    assert needed is not None and params * 4 <= needed <= params * 4 * 1.2  # float32: 4 bytes a parameter

    calls = []
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path)), train=lambda **kw: calls.append("train"))
    monkeypatch.setattr(models, "_available_host_ram", lambda: needed // 2)
    with pytest.raises(models.HostMemoryError, match=r"about 0\.0 GiB of RAM, but 0\.0 GiB is available"):
        train_and_merge(
            trainer, path, config, adapter_dir=tmp_path / "a", model_dir=tmp_path / "m", log_path=tmp_path / "l"
        )
    assert calls == []  # refused before the first step
    monkeypatch.setattr(models, "_available_host_ram", lambda: needed)
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
