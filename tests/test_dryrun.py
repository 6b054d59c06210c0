"""The dry run: stand-ins of the real architectures, settings refused before anything runs, memory arithmetic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from selfreward import dryrun
from selfreward.model.models import linear_module_names
from selfreward.run.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
MISTRAL = REPO / "configs" / "mistral-7b-qlora.yaml"
QWEN = REPO / "configs" / "qwen2.5-7b-qlora.yaml"
OASST = REPO / "configs" / "mistral-7b-qlora-oasst.yaml"

# Published parameter counts of the models whose shapes are embedded (model cards / safetensors index).
PUBLISHED = {
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
}


@pytest.fixture(autouse=True)
def _no_hub_cache(monkeypatch):
    """The embedded shapes are under test, not a copy of the model that this machine's hub cache may hold."""
    real = dryrun._local_source
    monkeypatch.setattr(dryrun, "_local_source", lambda name: None if name in PUBLISHED else real(name))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_embedded_architectures_have_the_published_parameter_counts(name):
    real, source = dryrun.real_architecture(name)
    assert "embedded" in source
    model = dryrun.meta_model(real)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize(
    ("name", "adds_bos", "has_template"),
    [
        ("mistralai/Mistral-7B-v0.1", True, False),
        ("meta-llama/Llama-3.1-8B-Instruct", True, True),
        ("Qwen/Qwen2.5-7B-Instruct", False, True),
    ],
)
def test_the_stand_in_has_the_real_architecture_and_a_tokenizer_that_behaves_like_the_real_one(
    name, adds_bos, has_template
):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from selfreward.model.chat import ChatFormat
    from selfreward.model.models import load_tokenizer
    from selfreward.run.config import ModelConfig

    folder = dryrun.stand_in(name)
    real, _ = dryrun.real_architecture(name)
    small = AutoConfig.from_pretrained(folder)
    assert small.model_type == real.model_type and small.num_hidden_layers == 2
    assert small.tie_word_embeddings == real.tie_word_embeddings
    ratio = real.num_attention_heads // real.num_key_value_heads
    assert small.num_attention_heads // small.num_key_value_heads == ratio  # the same grouped-query layout
    assert small.rope_parameters == real.rope_parameters
    model = AutoModelForCausalLM.from_pretrained(folder)
    # the same module names, so a LoRA target the stand-in accepts is one the real model has
    assert linear_module_names(model) == linear_module_names(dryrun.meta_model(real))
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert bool(biases) == (real.model_type == "qwen2")  # Qwen2's q, k, v projections carry biases

    raw = AutoTokenizer.from_pretrained(folder)
    known = dryrun.KNOWN_MODELS[name.lower()]
    assert (raw("hi")["input_ids"][0] == raw.bos_token_id) == adds_bos
    assert raw.eos_token == known.eos and raw.bos_token == known.bos and raw.pad_token == known.pad
    assert bool(raw.chat_template) == has_template
    tokenizer = load_tokenizer(folder, ModelConfig(name_or_path=str(folder)))
    ids = ChatFormat.from_tokenizer(tokenizer).encode(ChatFormat.from_tokenizer(tokenizer).prompt("Name a prime."))
    if raw.bos_token_id is not None:
        assert ids.count(raw.bos_token_id) == (1 if adds_bos else 0)


def test_the_stand_in_tokenizers_split_text_where_the_real_ones_do():
    """Each stand-in has its real tokenizer's normalizer and pre-tokenizer (as in the models' tokenizer.json),
    so text that the real one encodes differently alone and in context does so here too."""
    from transformers import AutoTokenizer

    def load(name):
        return AutoTokenizer.from_pretrained(dryrun.stand_in(name))

    def pieces(tokenizer, text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Mistral-7B-v0.1 (SentencePiece BPE): "▁" before the text and for every space, no pre-tokenizer,
    # unknown characters as bytes; so "A" alone is "▁A", but after a newline it is "A".
    mistral = load("mistralai/Mistral-7B-v0.1")
    assert mistral.backend_tokenizer.normalizer.normalize_str("a b") == "▁a▁b"
    assert mistral.backend_tokenizer.pre_tokenizer is None
    assert pieces(mistral, "A") == ["▁A"]
    assert pieces(mistral, "Reply.\nA")[-2:] == ["<0x0A>", "A"]
    assert pieces(mistral, "Score: 4")[-2:] == ["▁", "4"]
    assert (
        mistral.decode(mistral("Héllo\nworld  twice", add_special_tokens=False)["input_ids"]) == "Héllo\nworld  twice"
    )
    # Llama 3.1: byte-level BPE after a regex split that keeps digits in runs of up to three.
    llama = load("meta-llama/Llama-3.1-8B-Instruct").backend_tokenizer
    assert [p for p, _ in llama.pre_tokenizer.pre_tokenize_str("1234 abc")] == ["123", "4", "Ġabc"]
    assert [p for p, _ in llama.pre_tokenizer.pre_tokenize_str("Score: 4")] == ["Score", ":", "Ġ", "4"]
    # Qwen2.5: its own split, digits one by one, after an NFC normalizer.
    qwen = load("Qwen/Qwen2.5-7B-Instruct").backend_tokenizer
    assert [p for p, _ in qwen.pre_tokenizer.pre_tokenize_str("1234 abc")] == ["1", "2", "3", "4", "Ġabc"]
    assert qwen.normalizer.normalize_str("e\u0301") == "\u00e9"


def test_lora_parameters_and_4bit_weights_are_counted_as_peft_and_bitsandbytes_hold_them():
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from selfreward.model.models import load_model
    from selfreward.model.training import _peft_config

    config = load_config(MISTRAL)
    folder = dryrun.stand_in(config.model.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    counts = dryrun.parameter_counts(model, config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, _peft_config(config, model))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert counts["lora"] == trainable

    four_bit = load_model(folder, dataclasses.replace(config.model, device="cpu"), quantize=True)
    held = 0
    for param in four_bit.parameters():
        held += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            held += state.absmax.numel() * state.absmax.element_size()  # one float32 scale per 64 weights
    assert dryrun.weight_bytes(counts, config.model.dtype, four_bit=True) == held
    assert any(p.dtype == torch.uint8 for p in four_bit.parameters())  # it really is 4-bit

    # The copy QLoRA trains: peft casts every weight that is not 4-bit to float32 (measured on an H200 as
    # SFT's peak exceeding the estimate by that much, before the estimate counted it).
    from peft import prepare_model_for_kbit_training

    prepared = prepare_model_for_kbit_training(four_bit, use_gradient_checkpointing=False)
    held_training = sum(p.numel() * p.element_size() for p in prepared.parameters()) + sum(
        p.quant_state.absmax.numel() * p.quant_state.absmax.element_size()
        for p in prepared.parameters()
        if getattr(p, "quant_state", None) is not None
    )
    assert held_training > held
    assert dryrun.weight_bytes(counts, config.model.dtype, four_bit=True, training=True) == held_training


def test_the_key_value_cache_estimate_is_what_generation_holds_per_token():
    import torch
    from transformers import AutoModelForCausalLM

    folder = dryrun.stand_in("Qwen/Qwen2.5-7B-Instruct")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tokens = 7
    out = model(torch.arange(tokens).unsqueeze(0), use_cache=True)
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert dryrun.kv_bytes_per_token(model.config, "bfloat16") * tokens == held


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        (
            MISTRAL,
            {"lora.target_modules": ["q_proj", "c_attn"]},
            r"lora.target_modules.*'c_attn' not in MistralForCausalLM",
        ),
        (MISTRAL, {"lora.target_modules": ["q_proj", "embed_tokens"]}, r"'embed_tokens' \(not a linear layer\)"),
        (MISTRAL, {"lora.last_layers": 40}, r"lora.last_layers' is 40, but the model has 32 layers"),
        (QWEN, {"generation.tensor_parallel_size": 8}, r"tensor_parallel_size' is 8.*28 attention heads"),
        (QWEN, {"dpo.max_length": 40000}, r"dpo.max_length' is 40000, beyond the model's context of 32768"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_key_named(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        dryrun.plan(load_config(config, overrides))


def test_a_pre_quantized_checkpoint_is_refused_as_a_merge_target(tmp_path):
    import json
    import shutil

    folder = tmp_path / "mistral-bnb-4bit"
    shutil.copytree(dryrun.stand_in("mistralai/Mistral-7B-v0.1"), folder)
    config_json = json.loads((folder / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config_json))
    config = load_config(MISTRAL, {"model.name_or_path": str(folder)})
    with pytest.raises(ConfigError, match=r"pre-quantized \(bitsandbytes\) checkpoint.*full-precision"):
        dryrun.plan(config)


def test_an_unknown_hub_model_says_how_to_make_it_known():
    config = load_config(MISTRAL, {"model.name_or_path": "someone/never-heard-of-it"})
    with pytest.raises(ConfigError, match="architecture is unknown here.*huggingface-cli download"):
        dryrun.plan(config)


def test_a_real_run_rejects_a_lora_target_its_model_lacks(tmp_path):
    from selfreward.model.models import TINY, resolve_model_path
    from selfreward.model.training import build_sft_trainer

    config = load_config(REPO / "configs" / "tiny.yaml", {"lora.target_modules": ["q_proj", "query_key_value"]})
    with pytest.raises(
        ConfigError, match="'query_key_value' not in LlamaForCausalLM; its linear layers are: down_proj"
    ):
        build_sft_trainer(resolve_model_path(TINY), [{"prompt": "a", "completion": "b"}], config, tmp_path)


def test_a_stage_dry_runs_alone_and_dry_and_real_runs_never_share_a_folder(tmp_path, tiny_run, run_stage):
    import json
    import shutil

    run = tmp_path / "dry"
    done = run_stage("00_sft", "--run-dir", str(run), "--config", str(QWEN), "--dry-run", "--no-oxen", check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Qwen/Qwen2.5-7B-Instruct replaced by a tiny random model" in done.stdout
    assert "00_sft" in done.stdout and "merge" in done.stdout and "4-bit, checkpointing" in done.stdout
    manifest = json.loads((run / "M0" / "00_sft.manifest.json").read_text())
    assert manifest["dry_run"]["stands_in_for"] == "Qwen/Qwen2.5-7B-Instruct"
    assert manifest["config"]["model"]["load_in_4bit"] is True  # the config's settings, not the tiny ones
    assert manifest["config"]["lora"]["target_modules"] == load_config(QWEN).lora.target_modules
    assert (run / "M0" / "model" / "config.json").is_file()
    assert "warmup_steps" not in done.stdout + done.stderr  # the dry run's one step warns of no warmup

    real = run_stage(
        "00_sft", "--run-dir", str(run), "--config", str(QWEN), "--no-oxen", check=False
    )  # the real model into a dry folder
    assert real.returncode == 2 and "holds a dry run" in real.stderr

    copy = tmp_path / "real"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns(".oxen"))
    dry = run_stage("01_gen_prompts", "--run-dir", str(copy), "--iteration", "1", "--dry-run", "--no-oxen", check=False)
    assert dry.returncode == 2 and "holds a real run" in dry.stderr


@pytest.mark.parametrize(
    ("device", "gpu", "expected"),
    [
        ("cuda", True, "cuda"),
        ("auto", True, "cuda"),
        ("cuda", False, "cpu"),
        ("auto", False, "cpu"),
        ("cpu", True, "cpu"),
    ],  # fmt: skip
)
def test_the_dry_run_takes_the_gpu_when_the_config_asks_for_one_and_there_is_one(monkeypatch, device, gpu, expected):
    # bench/gpu_check.sh dry-runs the GPU profiles on a GPU box: there the stand-in must take the CUDA paths
    # (4-bit kernels, vLLM on CUDA), not the CPU ones the dry run takes everywhere else.
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(gpu))
    config = load_config(MISTRAL, {"model.device": device})
    monkeypatch.setattr(dryrun, "stand_in", lambda name: Path("/nonexistent/stand-in"))
    assert dryrun.dry_config(config).model.device == expected


def test_the_oasst_profile_dry_runs_stage_00_before_its_data_exists(tmp_path, cache):
    """configs/mistral-7b-qlora-oasst.yaml reads data/oasst/*.jsonl, which prepare_data.py writes on the GPU
    box; its dry run stopped at 00_sft with 'data/oasst/ift.jsonl: file not found' (exit 2). The seed data
    stands in for missing files, and the stage says so in one line."""
    import json
    import subprocess
    import sys

    from conftest import stage_env

    from selfreward.run.records import read_jsonl

    elsewhere = tmp_path / "cwd"  # the profile's data paths are relative: here there is no data/oasst
    elsewhere.mkdir()
    run = tmp_path / "dry"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "00_sft.py"), "--run-dir", str(run), "--config", str(OASST),
         "--dry-run", "--no-oxen"],
        cwd=elsewhere, env=stage_env(cache), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = [line for line in proc.stdout.splitlines() if "data/oasst/ift.jsonl" in line]
    assert len(note) == 1 and "data/oasst/eft.jsonl" in note[0] and "data/oasst/eft_eval.jsonl" in note[0]
    assert "seed" in note[0]
    manifest = json.loads((run / "M0" / "00_sft.manifest.json").read_text())
    assert manifest["complete"]
    assert manifest["dry_run"]["data_stands_in"]["data/oasst/ift.jsonl"] == str(REPO / "data" / "seed" / "ift.jsonl")
    assert manifest["heldout_eft_rows"] > 0  # held-out questions drawn from the stand-in EFT rows
    seed_ids = {r["id"] for r in read_jsonl(REPO / "data" / "seed" / "ift.jsonl")}
    assert {r["id"] for r in read_jsonl(run / "M0" / "train" / "ift.jsonl")} <= seed_ids


# Peak memory measured on an H200 (bench/RESULTS.md, "First contact with a GPU"): torch's max_memory_allocated
# in GiB for one step of configs/mistral-7b-qlora.yaml on a random model of Mistral-7B's shape with 2 or 32 layers
# (bench/gpu_memory.py). Before the estimate counted the float32 copy QLoRA trains, the prefill and the grouped
# heads' expanded keys and values, it was 0.85x the 2-layer SFT peak and 0.59x the 2-layer generation peak.
H200_PEAKS_GIB = {
    (2, "00_sft"): 3.199,
    (2, "05_dpo"): 4.856,
    (2, "02_gen_responses"): 3.230,
    (32, "00_sft"): 9.187,
    (32, "02_gen_responses"): 24.675,
}


@pytest.mark.parametrize(("layers", "stage"), sorted(H200_PEAKS_GIB))
def test_the_memory_estimate_is_within_reach_of_what_a_gpu_measured(layers, stage):
    from transformers import AutoConfig

    config = load_config(MISTRAL)
    fields = dict(dryrun.KNOWN_MODELS["mistralai/mistral-7b-v0.1"].architecture, num_hidden_layers=layers)
    real = AutoConfig.for_model(fields.pop("model_type"), **fields)
    counts = dryrun.parameter_counts(dryrun.meta_model(real), config)
    row = {r.stage: r for r in dryrun.memory_rows(config, real, counts)}[stage]
    estimate = (row.gpu - dryrun.GPU_OVERHEAD) / dryrun.GIB  # the CUDA context is not in torch's counters
    assert 0.95 <= estimate / H200_PEAKS_GIB[layers, stage] <= 1.10  # never well under; not far over


@pytest.mark.parametrize("algorithm", ["srlm", "spin", "raft"])
def test_every_stage_that_loads_the_model_prints_its_memory_row_in_a_dry_run(algorithm, tmp_path, capsys):
    """The memory rows come from the table of stages: RAFT's training stage, 05_raft_sft, printed none
    when the dry run listed its rows by hand (00, 01, 02, 03, 05_dpo, 06)."""
    from selfreward.run.config import apply_overrides
    from selfreward.run.layout import RunLayout
    from selfreward.run.stages import run_stages, spec
    from selfreward.stage import _dry_run

    config = apply_overrides(load_config(MISTRAL), {"algorithm": algorithm}, "test")
    for name in run_stages(algorithm):
        _, info = _dry_run(name, config, RunLayout(tmp_path / "run"))
        printed = capsys.readouterr().out
        loads_the_model = bool(spec(name).trains or spec(name).generates)
        assert (name in info["estimate"]) == loads_the_model, name
        assert (f"[{name}]   {name} " in printed) == loads_the_model, printed
        assert ("merge" in info["estimate"]) == bool(spec(name).trains), name
    assert ("05_raft_sft" in run_stages(algorithm)) == (algorithm == "raft")
