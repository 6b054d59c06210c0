"""Dry runs: a config's whole loop on any machine with a tiny stand-in for the model, and the real model's memory.

    ./self-reward.sh --config configs/mistral-7b-qlora.yaml --dry-run
    python scripts/00_sft.py --run-dir runs/dry --config configs/mistral-7b-qlora.yaml --dry-run
    python -m selfreward.dryrun --config configs/mistral-7b-qlora.yaml     # the checks and the table only

Every setting of the config is used as written (LoRA targets and rank, 4-bit, dtypes, chat template,
judge mode and format, batch sizes, lengths) except the weights: the model is a random 2-layer one of
the same architecture (model_type, attention layout, biases, rope, tied embeddings) with a tokenizer
that behaves like the real one (the same normalizer and pre-tokenizer, so text splits at the same
places; the same BOS, EOS and pad tokens, BOS added or not, the same chat template or none), on the
CPU (on a GPU box, on its GPU: see `dry_device`). Counts shrink so it takes minutes: one optimizer step
per training stage, two new prompts, two held-out prompts and EFT questions. Data files that do not
exist yet (the OASST profile's, which scripts/prepare_data.py writes on the GPU box) are stood in for
by the seed data.

The architecture comes from the model's own config.json when it is on this machine (a local folder,
a builtin model, or the Hugging Face cache), else from the shapes of the known models below, which are
embedded because nothing may be downloaded. Before any stage runs, the settings that cannot work are
refused with the key named (a LoRA target the architecture lacks, a pre-quantized checkpoint as the
merge target, a length beyond the context, a tensor-parallel size that does not divide the heads), and
the real model's memory is estimated per stage. The estimates are arithmetic on the architecture, not
measurements: see `memory_rows` for what each column counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from selfreward.judge.judges import judge_for
from selfreward.judge.rubric import check_judge_settings
from selfreward.model.chat import packaged_template
from selfreward.model.models import (
    TINY_REWARD,
    available_host_ram,
    build_atomically,
    cache_dir,
    gpu_present,
    lora_target_problem,
    resolve_model_path,
)
from selfreward.run.config import Config, ConfigError, load_config, per_process_batch
from selfreward.run.stages import responses_per_prompt, run_stages, spec

GIB = 1024**3
# CUDA context, cuBLAS workspaces and the allocator's slack: added to every GPU figure.
GPU_OVERHEAD = int(0.75 * GIB)


@dataclass(frozen=True)
class KnownModel:
    """A model's architecture (its config.json fields) and how its tokenizer behaves."""

    architecture: dict
    pipeline: str  # how its tokenizer splits text: "sentencepiece", "llama3" or "qwen2" (see _TOKENIZER_PIPELINES)
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False  # the tokenizer puts BOS before any text it encodes (Mistral, Llama)
    chat_template: str | None = None  # a packaged template file; None: the model has no template


_MISTRAL_7B = KnownModel(
    architecture={
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    pipeline="sentencepiece",
    specials=("<unk>", "<s>", "</s>"),
    bos="<s>",
    eos="</s>",
    unk="<unk>",
    add_bos=True,
)
_LLAMA31_8B_INSTRUCT = KnownModel(
    architecture={
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    pipeline="llama3",
    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    add_bos=True,
    chat_template="llama3_chat_template.jinja",
)
# Llama 3.1 70B: the 8B's tokenizer and template at the paper's size (80 layers, 64 query and 8 key/value heads).
_LLAMA31_70B_INSTRUCT = dataclasses.replace(
    _LLAMA31_8B_INSTRUCT,
    architecture={
        **_LLAMA31_8B_INSTRUCT.architecture,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
)
_QWEN25_7B_INSTRUCT = KnownModel(
    architecture={
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    pipeline="qwen2",
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    chat_template="qwen2_chat_template.jinja",
)

# Hub ids (compared without case) whose shapes are known here. Parameter counts, which the tests
# check: 7,241,732,096 (Mistral), 8,030,261,248 (Llama 3.1 8B), 70,553,706,496 (Llama 3.1 70B),
# 7,615,616,512 (Qwen2.5).
KNOWN_MODELS = {
    "mistralai/mistral-7b-v0.1": _MISTRAL_7B,
    "meta-llama/llama-3.1-8b-instruct": _LLAMA31_8B_INSTRUCT,
    "meta-llama/meta-llama-3.1-8b-instruct": _LLAMA31_8B_INSTRUCT,
    "meta-llama/llama-3.1-70b-instruct": _LLAMA31_70B_INSTRUCT,
    "meta-llama/meta-llama-3.1-70b-instruct": _LLAMA31_70B_INSTRUCT,
    "qwen/qwen2.5-7b-instruct": _QWEN25_7B_INSTRUCT,
}


def _local_source(name_or_path: str) -> str | None:
    """A folder on this machine with the model's config.json and tokenizer: a path, a builtin model,
    or a hub id already in the Hugging Face cache. None when only the hub has it."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download  # heavy

        folder = snapshot_download(path, local_files_only=True, allow_patterns=["*.json", "*.model", "*.jinja"])
    except Exception:  # not cached (or no hub library): the embedded shapes are the other source
        return None
    return folder if (Path(folder) / "config.json").is_file() else None


def real_architecture(name_or_path: str):
    """(the real model's transformers config, where it came from)."""
    from transformers import AutoConfig  # heavy

    source = _local_source(name_or_path)
    if source:
        return AutoConfig.from_pretrained(source), source
    known = KNOWN_MODELS.get(name_or_path.lower())
    if known is None:
        raise ConfigError(
            f"model.name_or_path '{name_or_path}': its architecture is unknown here (not a local folder, not "
            f"in the Hugging Face cache, not one of {', '.join(sorted(KNOWN_MODELS))}); download it once "
            "(huggingface-cli download ID --include '*.json' '*.model') so the dry run can read its config.json"
        )
    fields = dict(known.architecture)
    return AutoConfig.for_model(fields.pop("model_type"), **fields), "shapes embedded in selfreward/dryrun.py"


def meta_model(real_config):
    """The real model's modules with no memory behind them: for counting parameters and module names."""
    import torch  # heavy
    from transformers import AutoModelForCausalLM  # heavy

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(real_config)


# ---------------------------------------------------------------------------------------------------
# The stand-in


def _small_shape(real: dict) -> dict:
    """The real config's fields at 2 layers with heads of size 32, keeping the query/key-value ratio."""
    heads, kv = (
        real.get("num_attention_heads", 4),
        real.get("num_key_value_heads") or real.get("num_attention_heads", 4),
    )
    per_kv = max(1, heads // max(1, kv))
    small_kv = 1 if per_kv > 1 else 2
    small_heads = small_kv * per_kv
    small = dict(real)
    small.update(
        hidden_size=32 * small_heads,
        num_attention_heads=small_heads,
        num_key_value_heads=small_kv,
        intermediate_size=64 * small_heads,
        num_hidden_layers=2,
    )
    if "head_dim" in small:
        small["head_dim"] = 32
    for key in ("layer_types", "mlp_only_layers"):
        if isinstance(small.get(key), list):
            small[key] = small[key][:2]
    if "max_window_layers" in small:
        small["max_window_layers"] = min(small["max_window_layers"], 2)
    return small


# How the real tokenizers split text, from their tokenizer.json: Llama 3 and Qwen2 split it with a regular
# expression (digits in runs of up to three, or one by one), then map bytes to characters (byte-level BPE).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKENIZER_PIPELINES = ("sentencepiece", "llama3", "qwen2")
# Bump when the stand-ins are made differently: their cache folders are named by it, so old ones are not reused.
STAND_IN_VERSION = 2


def _template_lines() -> list[str]:
    names = ("judge_rubric.txt", "prompt_generation.txt", "pairwise_judge.txt")
    return [line for name in names for line in packaged_template(name).splitlines() if line]


def _sentencepiece_bpe(specials: list[str], unk: str):
    """Mistral-7B-v0.1's and Llama 2's pipeline: the normalizer puts "▁" before the text (after every special
    token too) and for every space, there is no pre-tokenizer, and characters outside the vocabulary fall
    back to byte tokens <0x00>-<0xFF>. So "A" alone is "▁A", but "A" after a newline is "A"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # heavy

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer
    # SentencePiece learns pieces within words (and digits one by one); the tokenizer itself splits nothing.
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="never"), pre_tokenizers.Digits(individual_digits=True)]
    )
    learner.train_from_iterator(_template_lines(), trainers.BpeTrainer(vocab_size=400, limit_alphabet=1000))
    learnt = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for piece, _ in sorted(learnt["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) for merge in learnt["merges"]]
    for letter in string.ascii_letters:  # as in the real vocabulary: every letter, alone and opening a word
        vocab.setdefault(letter, len(vocab))
        if f"▁{letter}" not in vocab:
            vocab[f"▁{letter}"] = len(vocab)
            merges.append(("▁", letter))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def _byte_level_bpe(split: str, nfc: bool):
    """Llama 3's and Qwen2's pipeline: a regex split, then byte-level BPE; Qwen2 also normalizes to NFC."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # heavy

    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_template_lines(), trainer=trainer)
    return tokenizer


def stand_in_tokenizer(known: KnownModel):
    """A small tokenizer that splits text the way the real one does (its normalizer, pre-tokenizer, BPE
    model and decoder, its special tokens, BOS added or not), with a vocabulary learnt from the packaged
    templates: the same text gives fewer, shorter pieces than the real one, split at the same places."""
    from tokenizers import AddedToken, processors  # heavy
    from transformers import PreTrainedTokenizerFast  # heavy

    specials = list(known.specials)
    if known.pipeline == "sentencepiece":
        tokenizer = _sentencepiece_bpe(specials, known.unk)
    elif known.pipeline in ("llama3", "qwen2"):
        split = _LLAMA3_SPLIT if known.pipeline == "llama3" else _QWEN2_SPLIT
        tokenizer = _byte_level_bpe(split, nfc=known.pipeline == "qwen2")
    else:
        raise ValueError(f"unknown tokenizer pipeline '{known.pipeline}' (known: {', '.join(_TOKENIZER_PIPELINES)})")
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if known.add_bos:
        bos_id = tokenizer.token_to_id(known.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{known.bos} $A", pair=f"{known.bos} $A {known.bos} $B", special_tokens=[(known.bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=known.bos, eos_token=known.eos, pad_token=known.pad, unk_token=known.unk
    )


def _stand_in_tokenizer(name_or_path: str, source: str | None):
    from transformers import AutoTokenizer  # heavy

    if source:  # the real tokenizer: its vocabulary is kept, only the model is small
        return AutoTokenizer.from_pretrained(source)
    known = KNOWN_MODELS[name_or_path.lower()]
    tokenizer = stand_in_tokenizer(known)
    if known.chat_template:
        tokenizer.chat_template = packaged_template(known.chat_template)
    return tokenizer


def stand_in(name_or_path: str) -> Path:
    """The folder of the tiny random model that stands in for `name_or_path` (built once, then cached)."""
    import torch  # heavy
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy

    real, where = real_architecture(name_or_path)
    source = where if Path(where).is_dir() else None  # the model's own folder: its tokenizer is used
    fields = real.to_dict()
    digest = hashlib.sha256(
        json.dumps([name_or_path, fields, where, STAND_IN_VERSION], sort_keys=True, default=str).encode()
    )
    slug = "".join(c if c.isalnum() else "-" for c in name_or_path.split("/")[-1].lower())[:40]
    target = cache_dir() / "dry-run" / f"{slug}-{digest.hexdigest()[:10]}"

    def build(out: Path) -> None:
        tokenizer = _stand_in_tokenizer(name_or_path, source)
        small = _small_shape({k: v for k, v in fields.items() if k not in ("quantization_config", "auto_map")})
        small.update(
            vocab_size=max(len(tokenizer), small.get("vocab_size", 0) if source else 0),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model_type = small.pop("model_type")
        for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
            small.pop(key, None)
        config = AutoConfig.for_model(model_type, **small)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "stand_in.json").write_text(
            json.dumps({"stands_in_for": name_or_path, "architecture_from": where}, indent=1) + "\n"
        )

    return build_atomically(target, build)


def is_stand_in(path: str | Path) -> bool:
    return (Path(path) / "stand_in.json").is_file()


# ---------------------------------------------------------------------------------------------------
# Settings that cannot work


def context_length(real_config) -> int:
    return int(getattr(real_config, "max_position_embeddings", 0) or 0) or 1_000_000


def setting_problems(config: Config, real_config, model) -> list[str]:
    """Every setting of `config` that cannot work with this architecture, one line each."""
    problems = []
    problem = lora_target_problem(model, list(config.lora.target_modules))
    if problem:
        problems.append(problem)
    layers = real_config.num_hidden_layers
    if config.lora.last_layers and config.lora.last_layers > layers:
        problems.append(
            f"config key 'lora.last_layers' is {config.lora.last_layers}, but the model has {layers} layers"
        )
    quant = getattr(real_config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        problems.append(
            f"model.name_or_path '{config.model.name_or_path}' is a pre-quantized ({method}) checkpoint: every "
            "iteration merges its LoRA adapter into the parent, which needs full-precision weights; use the "
            "full-precision checkpoint with model.load_in_4bit: true"
        )
    context = context_length(real_config)
    for key, value in (
        ("sft.max_length", config.sft.max_length),
        ("dpo.max_length", config.dpo.max_length),
        ("generation.max_model_len", config.generation.max_model_len),
    ):
        if value and value > context:
            problems.append(f"config key '{key}' is {value}, beyond the model's context of {context} tokens")
    window = config.generation.max_model_len or context
    for key, value in (
        ("prompts.max_new_tokens", config.prompts.max_new_tokens),
        ("responses.max_new_tokens", config.responses.max_new_tokens),
        ("judge.max_new_tokens", config.judge.max_new_tokens),
        ("eval.max_new_tokens", config.eval.max_new_tokens),
    ):
        if value >= window:
            problems.append(f"config key '{key}' is {value}: no room for a prompt in a context of {window} tokens")
    tp = config.generation.tensor_parallel_size
    heads = real_config.num_attention_heads
    kv = getattr(real_config, "num_key_value_heads", None) or heads
    if tp > 1 and (heads % tp or (kv % tp if kv >= tp else tp % kv)):
        problems.append(
            f"config key 'generation.tensor_parallel_size' is {tp}: vLLM splits the {heads} attention heads "
            f"({kv} key/value heads) evenly over the GPUs, which {tp} does not divide"
        )
    return problems


# ---------------------------------------------------------------------------------------------------
# Memory


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryRow:
    stage: str
    what: str
    weights: int = 0
    trainable: int = 0  # LoRA weights, gradients and Adam's two moments, all float32
    activations: int = 0  # training: kept for backward; generation: the logits of one step
    cache: int = 0  # key/value cache of one generate call, or vLLM's reservation
    host: int = 0  # host RAM of the merge
    load: int = 0  # FSDP and ZeRO-3: the whole 4-bit copy each process quantizes before it is sharded
    kind: str = "train"  # "train", "hf" or "vllm" (a generating stage on that backend), "host" (the merge)

    @property
    def gpu(self) -> int:
        used = max(self.weights + self.trainable + self.activations + self.cache, self.load)
        return used + GPU_OVERHEAD if used else 0


def parameter_counts(model, config: Config) -> dict[str, int]:
    """total, in the blocks' linear layers (what bitsandbytes quantizes), and LoRA's (r x (in + out) per target)."""
    import torch  # heavy

    total = sum(p.numel() for p in model.parameters())
    linear = lora = 0
    layers = model.config.num_hidden_layers
    first_lora_layer = layers - config.lora.last_layers if config.lora.last_layers else 0
    targets = set(config.lora.target_modules)
    all_linear = targets == {"all-linear"}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        linear += module.weight.numel()
        short = name.split(".")[-1]
        index = next((int(part) for part in name.split(".") if part.isdigit()), 0)
        if (all_linear or short in targets) and index >= first_lora_layer:
            lora += config.lora.r * (module.in_features + module.out_features)
    return {"total": total, "linear": linear, "lora": lora, "layers": layers}


def weight_bytes(counts: dict[str, int], dtype: str, four_bit: bool, training: bool = False) -> int:
    """The model's weights on the GPU. NF4 stores half a byte per weight of the blocks' linear layers plus
    one float32 scale per block of 64; everything else stays in model.dtype, except in the copy QLoRA trains:
    peft's prepare_model_for_kbit_training casts every weight that is not 4-bit (embeddings, the output
    layer, norms) to float32, which for a 7B doubles about 0.5 GB of them (measured: bench/gpu_memory.py)."""
    if not four_bit:
        return counts["total"] * _BYTES[dtype]
    rest = _BYTES["float32"] if training else _BYTES[dtype]
    return int(counts["linear"] * (0.5 + 4 / 64)) + (counts["total"] - counts["linear"]) * rest


def kv_bytes_per_token(real_config, dtype: str) -> int:
    """Keys and values of one token in every layer."""
    heads = real_config.num_attention_heads
    head_dim = getattr(real_config, "head_dim", None) or real_config.hidden_size // heads
    kv = getattr(real_config, "num_key_value_heads", None) or heads
    return 2 * real_config.num_hidden_layers * kv * head_dim * _BYTES[dtype]


def _training_row(stage: str, config: Config, real_config, counts: dict, dpo: bool, processes: int = 1) -> MemoryRow:
    """One process of `processes` (train.engine fsdp or deepspeed shards the model over them; ddp copies it)."""
    train = config.dpo if dpo else config.sft
    four_bit = config.model.load_in_4bit
    compute = config.model.bnb_4bit_compute_dtype if four_bit else config.model.dtype
    width = _BYTES[compute]
    sharded = config.train.engine != "ddp"
    per_device = per_process_batch(train, processes)[0] if sharded else train.batch_size
    sequences = per_device * (2 if dpo else 1)  # DPO runs chosen and rejected together
    tokens = sequences * train.max_length
    h, inner = real_config.hidden_size, real_config.intermediate_size
    heads = real_config.num_attention_heads
    kv_dim = (getattr(real_config, "num_key_value_heads", None) or heads) * (
        getattr(real_config, "head_dim", None) or h // heads
    )
    # What one block keeps for backward per token: its input and norm, q, k, v, the attention output
    # and its projection, the second norm, and the MLP's gate, up, activation and product.
    per_block = (6 * h + 2 * kv_dim + 4 * inner) * width
    layers = real_config.num_hidden_layers
    if train.gradient_checkpointing:  # only each block's input is kept; one block is recomputed at a time
        kept = layers * tokens * h * width + tokens * per_block
    else:
        kept = layers * tokens * per_block
    # The logits in the compute dtype, their float32 copy for the loss, and its gradient.
    logits = tokens * real_config.vocab_size * (width + 8)
    what = f"{'DPO' if dpo else 'SFT'} {per_device} x {train.max_length} tokens"
    what += f"{' x 2 (chosen, rejected)' if dpo else ''}, {'4-bit' if four_bit else config.model.dtype}"
    what += ", checkpointing" if train.gradient_checkpointing else ""
    copies = 2 if dpo and config.dpo.reference == "initial" else 1  # M0 held beside the policy from iteration 2
    what += ", reference M0 held too" if copies == 2 else ""
    if sharded:
        return _sharded_row(stage, config, counts, what, copies, processes, activations=kept + logits)
    # The trained copy as prepared for QLoRA; M0 as the reference is loaded 4-bit and frozen, not prepared.
    weights = weight_bytes(counts, config.model.dtype, four_bit, training=True)
    weights += (copies - 1) * weight_bytes(counts, config.model.dtype, four_bit)
    return MemoryRow(
        stage,
        what,
        weights=weights,
        trainable=16 * counts["lora"],
        activations=kept + logits,
    )


def _sharded_row(
    stage: str, config: Config, counts: dict, what: str, copies: int, processes: int, activations: int
) -> MemoryRow:
    """FSDP full-shard or ZeRO-3 over `processes`: each holds its share of the weights and of the LoRA state,
    plus the block being gathered and the next one (prefetched). With QLoRA every weight that is not 4-bit is
    in the compute dtype (the 4-bit ones are stored in it), and each process first quantizes the whole model
    onto its GPU, which is the peak when it exceeds the sharded step."""
    four_bit = config.model.load_in_4bit
    dtype = config.model.bnb_4bit_compute_dtype if four_bit else config.model.dtype
    whole = copies * weight_bytes(counts, dtype, four_bit)
    block = counts["linear"] // max(1, counts["layers"]) * (0.5 + 4 / 64 if four_bit else _BYTES[dtype])
    engine = config.train.engine
    return MemoryRow(
        stage,
        f"{what}; {engine} over {processes} process{'es' if processes > 1 else ''}"
        + (f", loading holds the whole 4-bit copy ({whole / GIB:.1f})" if four_bit else ""),
        weights=whole // processes + int(2 * block),
        trainable=16 * counts["lora"] // processes,
        activations=activations,
        load=whole if four_bit else 0,
    )


def _generation_row(
    stage: str, config: Config, real_config, counts: dict, batch: int, new: int, what: str, samples: int = 1
):
    """One call of the hf backend: `batch` sequences, `samples` of each prompt. Its peak is the larger of
    two moments. Prefill: every prompt of the call goes through the model at once (its samples share that
    cache), and at each layer's MLP the gate, up and product tensors (3 x intermediate) and about four
    hidden-size tensors (the layer's input and residual, the attention's output) are alive for every prompt
    token. Decoding: every sequence's cache at full length, one step's logits, and one layer's keys and
    values copied out to every query head (transformers' SDPA path does that whenever there is an
    attention mask, as left padding makes, and the model has fewer key/value heads than query heads).
    Measured on an H200 (bench/RESULTS.md): a 2-layer stand-in at full width peaks in prefill, a 7B's 32
    layers of cache make decoding the peak."""
    dtype = config.model.dtype
    context = config.generation.max_model_len or context_length(real_config)
    # Prompts longer than the training length are rare: the training rows are cut there too.
    prompt = min(max(config.sft.max_length, config.dpo.max_length), context - new)
    per_token = kv_bytes_per_token(real_config, dtype)
    prompt_tokens = max(1, batch // max(1, samples)) * prompt
    prefill_cache = prompt_tokens * per_token
    prefill = prompt_tokens * (3 * real_config.intermediate_size + 4 * real_config.hidden_size) * _BYTES[dtype]
    cache = batch * (prompt + new) * per_token
    heads = real_config.num_attention_heads
    head_dim = getattr(real_config, "head_dim", None) or real_config.hidden_size // heads
    grouped = (getattr(real_config, "num_key_value_heads", None) or heads) < heads
    expanded = batch * (prompt + new) * 2 * heads * head_dim * _BYTES[dtype] if grouped else 0
    logits = batch * real_config.vocab_size * 4  # one step's logits, float32 for sampling
    peak_in_prefill = prefill_cache + prefill > cache + logits + expanded
    return MemoryRow(
        stage,
        f"{what}: {batch} sequences x ({prompt} prompt + {new} new) tokens, {dtype}"
        + (", peak in prefill" if peak_in_prefill else ""),
        weights=weight_bytes(counts, dtype, False),
        activations=prefill if peak_in_prefill else logits + expanded,
        cache=prefill_cache if peak_in_prefill else cache,
        kind="hf",
    )


def _generation_of(what: str, config: Config) -> tuple:
    """A generating stage's batch, new tokens per sequence, label and sequences per prompt, by what it writes."""
    if what == "prompts":
        return config.prompts.batch_size, config.prompts.max_new_tokens, "prompts"
    if what == "responses":
        return (config.responses.batch_size, config.responses.max_new_tokens, "responses", responses_per_prompt(config))
    if what == "judge":
        judge = judge_for(config)  # nothing is loaded: it says what it writes per answer
        return config.judge.batch_size, judge.tokens_written, judge.label, judge.judgments_per_answer
    return config.eval.batch_size, config.eval.max_new_tokens, "answers"


def memory_rows(config: Config, real_config, counts: dict, gpus: int | None = None) -> list[MemoryRow]:
    """Estimated peak memory of the real model per stage, per GPU of a node of `gpus` (None: the config as
    written: one training process, vLLM over generation.tensor_parallel_size GPUs). On a node of N GPUs
    training runs as N processes (fsdp and deepspeed shard the model over them; ddp copies it, and the
    config's batch per process is the upper bound) and vLLM spans the N GPUs: there the hf backend's rows,
    one GPU holding the whole model, are left out unless generation.backend is hf.

    weights: model.dtype, or NF4 for QLoRA training; trainable: 16 bytes per LoRA parameter (float32
    weight, gradient, two Adam moments); activations: training keeps per token what `_training_row`
    lists, plus the logits; cache: the key/value cache of a full batch at the prompt length the
    training rows are cut to, plus the new tokens. GPU totals add GPU_OVERHEAD. Merge: the parent in
    model.dtype on the host, plus a tenth (the same figure the merge checks before training).
    """
    processes = gpus or 1
    on_vllm = config.generation.backend in ("vllm", "auto")
    rows = []
    for name in run_stages(config.algorithm):
        stage = spec(name)
        if stage.trains:
            rows.append(_training_row(name, config, real_config, counts, stage.trains == "dpo", processes))
        elif stage.generates and not (gpus and on_vllm):
            rows.append(_generation_row(name, config, real_config, counts, *_generation_of(stage.generates, config)))
    trainers = [name for name in run_stages(config.algorithm) if spec(name).trains]
    merge = MemoryRow(
        "merge",
        f"adapter into the {config.model.dtype} parent, on the host (end of {' and '.join(trainers)})",
        host=int(counts["total"] * _BYTES[config.model.dtype] * 1.1),
        kind="host",
    )
    rows.insert(1, merge)  # after 00_sft's row, where the merge first happens
    if on_vllm:
        rows.append(_vllm_row(config, real_config, counts, gpus or config.generation.tensor_parallel_size))
    return rows


def vllm_weight_bytes(counts: dict[str, int], dtype: str, quantization: str | None) -> int:
    """The weights one vLLM engine holds: model.dtype, or its linear layers in fp8 (one byte) or 4-bit
    (bitsandbytes' NF4, as `weight_bytes` counts it); embeddings, norms and the output layer stay in dtype."""
    if quantization == "fp8":
        return counts["linear"] + (counts["total"] - counts["linear"]) * _BYTES[dtype]
    return weight_bytes(counts, dtype, quantization == "bitsandbytes")


def _vllm_row(config: Config, real_config, counts: dict, tensor_parallel: int) -> MemoryRow:
    gen = config.generation
    share = gen.gpu_memory_utilization or 0.9
    length = gen.max_model_len or context_length(real_config)
    weights = vllm_weight_bytes(counts, config.model.dtype, gen.quantization)
    how = f"{gen.quantization} weights" if gen.quantization else config.model.dtype
    spans = f", tensor parallel over {tensor_parallel} GPUs" if tensor_parallel > 1 else ""
    return MemoryRow(
        "01-03, 06",
        f"with vLLM ({gen.backend}, {how}{spans}): reserves {share:.0%} of each GPU; must hold the weights and one "
        f"{length}-token sequence",
        weights=weights // tensor_parallel,
        cache=length * kv_bytes_per_token(real_config, config.model.dtype) // tensor_parallel,
        kind="vllm",
    )


# Nodes the dry run tries, smallest first (GPU memory in all, then fewer GPUs): (GPUs, GB per GPU).
NODE_SHAPES = tuple(sorted(((n, gb) for n in (1, 2, 4, 8) for gb in (24, 48, 80)), key=lambda s: (s[0] * s[1], s[0])))
GB = 10**9  # a GPU sold as 80 GB has a little under 80 x 10^9 bytes free for work: counted so, it errs safe


def node_problems(config: Config, real_config, counts: dict, gpus: int, gb: int) -> list[str]:
    """Why the config does not run on a node of `gpus` GPUs of `gb` GB each (empty when it does): a stage whose
    per-GPU peak is above the GPU's memory (vLLM: above generation.gpu_memory_utilization of it), or a global
    batch the processes cannot share. Generation counts as vLLM unless generation.backend is hf."""
    try:
        rows = memory_rows(config, real_config, counts, gpus)
    except ConfigError as exc:
        return [str(exc)]
    problems = []
    for row in rows:
        if row.kind == "host":
            continue
        share = (config.generation.gpu_memory_utilization or 0.9) if row.kind == "vllm" else 1.0
        limit = share * gb * GB
        if row.gpu > limit:
            of = f"{share:.0%} of " if share < 1 else ""
            needs = f"{row.stage} needs {row.gpu / GIB:.1f} GiB per GPU"
            problems.append(f"{needs}, more than {of}a {gb} GB GPU ({limit / GIB:.1f} GiB)")
    return problems


def smallest_node(config: Config, real_config, counts: dict) -> tuple[int, int] | None:
    """The first of NODE_SHAPES the config runs on, or None."""
    return next((shape for shape in NODE_SHAPES if not node_problems(config, real_config, counts, *shape)), None)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}" if n else "-"


def memory_table(rows: list[MemoryRow]) -> str:
    header = f"{'stage':<16} {'GPU GiB':>7} {'weights':>7} {'LoRA+opt':>8} {'activ.':>6} {'KV':>6} {'host':>5}  what"
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.stage:<16} {_gib(r.gpu):>7} {_gib(r.weights):>7} {_gib(r.trainable):>8} {_gib(r.activations):>6} "
            f"{_gib(r.cache):>6} {_gib(r.host):>5}  {r.what}"
        )
    return "\n".join(lines)


@dataclass
class Plan:
    """What a dry run of a config knows before running anything."""

    config: Config
    real_config: object
    source: str
    counts: dict
    rows: list[MemoryRow]

    def describe(self) -> str:
        name, node = self.config.model.name_or_path, self.node_gpus
        per_gpu = f" (GPU columns per GPU of a node of {node}{self._node_note(node)})" if node else ""
        return (
            f"dry run of {name} ({self.counts['total'] / 1e9:.2f} B parameters, {self.counts['lora'] / 1e6:.1f} M in "
            f"LoRA; architecture from {self.source})\nestimated memory of the real model{per_gpu}, GiB "
            f"(estimates, not measurements; GPU adds {GPU_OVERHEAD / GIB:.2f} for the CUDA context):\n"
            + memory_table(self.rows)
            + "\n"
            + self.describe_nodes()
        )

    @property
    def node_gpus(self) -> int | None:
        """The GPUs of the node the config is written for: generation.tensor_parallel_size, when above 1."""
        tp = self.config.generation.tensor_parallel_size
        return tp if tp > 1 else None

    def _node_note(self, gpus: int) -> str:
        sharded = self.config.train.engine != "ddp"
        return f": {self.config.train.engine} over {gpus} processes, vLLM over {gpus} GPUs" if sharded else ""

    def describe_nodes(self) -> str:
        """The node shapes the config does not fit (one line each, with why) and those it fits, then the
        per-GPU table of the smallest that fits, unless the table above is already that node's."""
        lines = ["nodes (GPUs x GB each; one training process per GPU, vLLM over all of them):"]
        fits = []
        for gpus, gb in NODE_SHAPES:
            problems = node_problems(self.config, self.real_config, self.counts, gpus, gb)
            if problems:
                lines.append(f"  {gpus} x {gb} GB: no: {problems[0]}")
            else:
                fits.append(f"{gpus} x {gb} GB")
        lines.append(f"  fits: {', '.join(fits)}" if fits else "  it fits none of these nodes")
        smallest = smallest_node(self.config, self.real_config, self.counts)
        if smallest is None:
            return "\n".join(lines)
        gpus, gb = smallest
        if gpus == (self.node_gpus or 1):
            return "\n".join([*lines, f"the smallest node it fits: {gpus} x {gb} GB (the table above)"])
        how = f"--num-processes {gpus}" + (f" -- --generation.tensor_parallel_size {gpus}" if gpus > 1 else "")
        lines.append(f"the smallest node it fits: {gpus} x {gb} GB ({how}); per GPU there, GiB:")
        return "\n".join([*lines, memory_table(memory_rows(self.config, self.real_config, self.counts, gpus))])


def plan(config: Config) -> Plan:
    """Check the config's settings against the real architecture and estimate its memory; ConfigError
    lists every setting that cannot work."""
    real_config, source = real_architecture(config.model.name_or_path)
    model = meta_model(real_config)
    problems = setting_problems(config, real_config, model)
    if problems:
        raise ConfigError("this config cannot run:\n  " + "\n  ".join(problems))
    counts = parameter_counts(model, config)
    tp = config.generation.tensor_parallel_size
    return Plan(config, real_config, source, counts, memory_rows(config, real_config, counts, tp if tp > 1 else None))


def dry_device(config: Config) -> str:
    """Where the stand-in runs: on the GPU when the config asks for one (cuda or auto) and this machine has
    one, so that a dry run on the GPU box takes the CUDA paths (4-bit kernels, vLLM on CUDA); else the CPU."""
    if config.model.device == "cpu":
        return "cpu"
    return "cuda" if gpu_present() else "cpu"


def dry_engine(config: Config) -> str:
    """The training engine of the dry run: the config's on a GPU, ddp on the CPU, since accelerate's FSDP
    plugin (1.15) refuses a machine without an accelerator and ZeRO-3 needs one too."""
    return config.train.engine if dry_device(config) == "cuda" else "ddp"


def dry_tensor_parallel(config: Config) -> int:
    """generation.tensor_parallel_size, cut to this machine's GPUs (1 on the CPU), where the stand-in runs."""
    if dry_device(config) == "cpu":
        return 1
    import torch  # heavy

    return max(1, min(config.generation.tensor_parallel_size, torch.cuda.device_count()))


# New tokens per sequence in a dry run: a random stand-in never ends its text, so every sequence would run to the
# config's max_new_tokens (1024 in the 70B profile: minutes of CPU for nothing); their fit in the context is
# checked from the config's own values before anything runs (setting_problems).
DRY_NEW_TOKENS = 128


def dry_config(config: Config) -> Config:
    """`config` as the dry run runs it: the stand-in on the GPU if there is one (see `dry_device`), else
    on the CPU, counts cut to one step or batch, new tokens to DRY_NEW_TOKENS."""
    dry = dataclasses.replace
    new = DRY_NEW_TOKENS
    stand = config.model.name_or_path
    if not is_stand_in(stand):
        stand = str(stand_in(stand))
    prompts = config.prompts
    return dry(
        config,
        model=dry(config.model, name_or_path=stand, device=dry_device(config)),
        data=dry(
            config.data,
            heldout_prompts=min(config.data.heldout_prompts, 2),
            heldout_eft_questions=min(config.data.heldout_eft_questions, 2),
            off_topic_eft_rows=min(config.data.off_topic_eft_rows, 4),
        ),
        # One step, at the configured learning rate: the config's warmup is for its real step count.
        sft=dry(config.sft, max_steps=1, warmup_steps=0, report_to=_offline(config.sft.report_to)),
        dpo=dry(config.dpo, max_steps=1, warmup_steps=0, report_to=_offline(config.dpo.report_to)),
        train=dry(config.train, engine=dry_engine(config)),
        # generation.backend auto picks vllm on a GPU box with vllm installed, else hf; its engine spans the GPUs
        # this machine has
        generation=dry(config.generation, tensor_parallel_size=dry_tensor_parallel(config)),
        prompts=dry(
            prompts,
            num_prompts=min(prompts.num_prompts, 2),
            max_attempts=prompts.batch_size,
            keep_cut_off=True,  # random text never ends a turn
            max_new_tokens=min(prompts.max_new_tokens, new),
        ),
        responses=dry(config.responses, max_new_tokens=min(config.responses.max_new_tokens, new)),
        # the stand-in judges at chance: judge.gate stop would end every dry run at stage 04
        judge=dry(
            config.judge,
            noise_samples=min(config.judge.noise_samples, 2),
            max_new_tokens=min(config.judge.max_new_tokens, new),
            gate="warn" if config.judge.gate == "stop" else config.judge.gate,
            canary_gate="warn" if config.judge.canary_gate == "stop" else config.judge.canary_gate,
            # judge.mode reward_model: a tiny random reward model stands in, as the policy's stand-in does
            reward_model=TINY_REWARD if config.judge.reward_model else None,
        ),
        # --algorithm spin / raft: two SFT prompts an iteration, like the two new prompts above
        spin=dry(config.spin, num_prompts=min(config.spin.num_prompts or 2, 2)),
        raft=dry(config.raft, num_prompts=min(config.raft.num_prompts or 2, 2), keep_cut_off=True),
        # judge_model and judge_endpoint null: the newest stand-in judges the head-to-head, not a real model
        # from the hub, nor an outside server a dry run must not call (or pay for)
        eval=dry(
            config.eval,
            bootstrap_samples=min(config.eval.bootstrap_samples, 50),
            max_new_tokens=min(config.eval.max_new_tokens, new),
            judge_model=None,
            judge_endpoint=None,
            judge_endpoint_model=None,
        ),
    )


# The seed data in the repository: what a dry run trains on when the config's data files are not there yet.
SEED_DATA = Path(__file__).resolve().parent.parent / "data" / "seed"


def stand_in_data(config: Config) -> tuple[Config, dict[str, str]]:
    """`config` with its missing data files replaced by the seed data, and {missing: what stands in}.

    A profile whose data scripts/prepare_data.py writes on the GPU box (the OASST one) can then be dry-run
    before that data exists, as its model is before the weights are downloaded. A missing data.heldout_eft
    is dropped: the held-out EFT questions are drawn from the EFT rows, as without one."""
    data, swaps, stands_in = config.data, {}, {}
    for key, seed in (("ift", SEED_DATA / "ift.jsonl"), ("eft", SEED_DATA / "eft.jsonl")):
        if not Path(getattr(data, key)).is_file():
            swaps[key] = stands_in[getattr(data, key)] = str(seed)
    if data.heldout_eft and not Path(data.heldout_eft).is_file():
        swaps["heldout_eft"] = None
        stands_in[data.heldout_eft] = f"{data.heldout_eft_questions} questions drawn from the EFT rows"
    return dataclasses.replace(config, data=dataclasses.replace(data, **swaps)), stands_in


# prepare_data.py --dry-run marks its --out with this file: the rows in it were judged by a random stand-in.
DRY_DATA_MARKER = "DRY-RUN"


def guard_data_folder(folder: Path) -> None:
    """prepare_data.py --dry-run: never over real prepared data, and what it writes is marked as a dry run's
    (a real prepare_data.py run in the folder removes the mark once it has rewritten every file)."""
    marker = folder / DRY_DATA_MARKER
    if not marker.is_file() and (folder / "manifest.json").is_file():
        raise ConfigError(f"{folder} holds prepared data; give the dry run its own --out")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by scripts/prepare_data.py --dry-run: not data to train on\n", encoding="utf-8")


def refuse_dry_data(paths: list[str]) -> None:
    """A real stage 00 does not train on rows that prepare_data.py --dry-run's stand-in judged."""
    for path in paths:
        if (Path(path).parent / DRY_DATA_MARKER).is_file():
            raise ConfigError(
                f"{path} was written by scripts/prepare_data.py --dry-run (a random stand-in judged it); "
                "run prepare_data.py without --dry-run to make the real data"
            )


def _offline(report_to: str) -> str:
    return "none" if report_to == "wandb" else report_to  # a dry run does not log to a wandb project


MARKER = "dry-run"


def guard_run_folder(root: Path, dry: bool) -> None:
    """A dry run and a real run never share a run folder: stand-in weights must not become an M<t>."""
    marker = root / ".selfreward" / MARKER
    has_work = any(root.glob("M*/*.manifest.json"))
    if dry and not marker.is_file() and has_work:
        raise ConfigError(f"{root} holds a real run; give the dry run its own --run-dir")
    if not dry and marker.is_file():
        raise ConfigError(
            f"{root} holds a dry run (a random stand-in model, not the real one): use another --run-dir, "
            f"or delete {root} first"
        )
    if dry:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("stages here ran with --dry-run\n", encoding="utf-8")


def check_host_ram(config: Config) -> None:
    """ConfigError before a real run starts when this host has less free RAM than the merge at the end of stages
    00 and 05 needs (the plan's merge row: the parent in model.dtype, plus a tenth). Builtin models are small, and
    an architecture unknown here is left to stage 00, which measures the parent's weight files."""
    name = config.model.name_or_path
    if name.startswith("builtin:"):
        return
    try:
        real_config, _ = real_architecture(name)
    except ConfigError:
        return
    need = int(parameter_counts(meta_model(real_config), config)["total"] * _BYTES[config.model.dtype] * 1.1)
    free = available_host_ram()
    if free is not None and need > free:
        raise ConfigError(
            f"merging each adapter loads {name} in {config.model.dtype} on the host of rank 0: about "
            f"{need / GIB:.1f} GiB of RAM, but this host has {free / GIB:.1f} GiB available; run on a host with "
            "more RAM, or free some"
        )


def check_node(planned: Plan, gpus: int, gb: int) -> None:
    """ConfigError naming every reason the config does not run on `gpus` GPUs of `gb` GB, and the smallest
    node it does run on."""
    config = planned.config
    problems = node_problems(config, planned.real_config, planned.counts, gpus, gb)
    if problems:
        smallest = smallest_node(config, planned.real_config, planned.counts)
        where = f"{smallest[0]} x {smallest[1]} GB" if smallest else "none of the nodes above"
        why = "; ".join(problems)
        raise ConfigError(f"it does not fit a node of {gpus} x {gb} GB: {why}; the smallest node it fits: {where}")
    tp = config.generation.tensor_parallel_size
    if tp > gpus:
        raise ConfigError(
            f"config key 'generation.tensor_parallel_size' is {tp}, more GPUs than the node's {gpus}: "
            f"set it with -- --generation.tensor_parallel_size {gpus}"
        )
    print(f"it fits a node of {gpus} x {gb} GB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfreward.dryrun",
        description="Check a config's settings against its model's architecture and estimate its memory.",
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, default=1, help="with --gpu-memory: the node's GPUs (default: 1)")
    parser.add_argument(
        "--gpu-memory", type=int, metavar="GB", help="refuse the config unless it fits --gpus GPUs of this many GB"
    )
    parser.add_argument(
        "--host-ram", action="store_true", help="only refuse the config when this host lacks the merge's RAM"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = load_config(args.config)
        if args.host_ram:
            check_host_ram(config)
            return 0
        check_judge_settings(config.judge)
        planned = plan(config)
        print(planned.describe(), flush=True)
        if args.gpu_memory:
            check_node(planned, args.gpus, args.gpu_memory)
    except ConfigError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
