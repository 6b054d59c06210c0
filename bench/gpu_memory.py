"""Peak GPU memory of an SFT step, a DPO step and a generation batch, next to the dry run's estimate.

    python bench/gpu_memory.py                                   # on CUDA: Mistral-7B's width, 2 layers
    python bench/gpu_memory.py --config configs/qwen2.5-7b-qlora.yaml
    python bench/gpu_memory.py --device cpu --width tiny --set sft.max_length=128   # the same code on a CPU

The model stands in for the config's (one of the architectures embedded in selfreward/dryrun.py): its
real hidden size, heads, MLP and vocabulary, but 2 layers (--layers) and random weights, built in this
process and saved in model.dtype, as a downloaded checkpoint would be. Nothing is downloaded. Every
other setting is the config's: QLoRA (NF4, its compute dtype), LoRA targets and rank, batch sizes,
lengths, gradient checkpointing. Each step runs through the project's own code:

- sft: training.build_sft_trainer, one optimizer step (sft.grad_accum micro-batches of sft.batch_size
  rows), every row cut to exactly sft.max_length tokens, as the estimate assumes;
- dpo: training.build_dpo_trainer, one optimizer step, chosen and rejected both sft.max_length long;
- generate: generation.HFBackend (model.dtype, not 4-bit, as stages 01-03 load M<t>), one call of
  responses.batch_size sequences (prompts x responses.num_samples), prompts as long as the estimate
  takes them, every answer forced to responses.max_new_tokens.

Measured: torch.cuda.max_memory_allocated and max_memory_reserved over the step, the weights included
(the model is loaded before the counters are reset). Estimate: selfreward.dryrun.memory_rows for the
same architecture and settings, without its fixed allowance for the CUDA context (GPU_OVERHEAD), which
the counters do not see; the context is reported on its own. The CUDA allocator is set up as the stages
set it up (stage.process_defaults: expandable segments). On a CPU the steps run the same way and
nothing is measured (the estimates are printed; --device cpu is how the tests exercise this file).

Prints a table and ends with one JSON line (also written to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from selfreward import dryrun  # noqa: E402
from selfreward.model.chat import ChatFormat  # noqa: E402
from selfreward.model.generation import HFBackend, Sampling  # noqa: E402
from selfreward.model.models import load_model, load_tokenizer, torch_dtype  # noqa: E402
from selfreward.run.config import load_config, override_value  # noqa: E402
from selfreward.stage import process_defaults  # noqa: E402

STEPS = ("sft", "dpo", "generate")
ESTIMATE_ROW = {"sft": "00_sft", "dpo": "05_dpo", "generate": "02_gen_responses"}
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls count the stars above "
OTHER_WORDS = "rain falls on green hills and small boats drift slowly past old stone bridges at dusk "


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "mistral-7b-qlora.yaml"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--width", default="real", choices=("real", "tiny"),
                        help="real: the model's own widths; tiny: 32-wide heads, for a quick run on a CPU")  # fmt: skip
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"a comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    return parser.parse_args(argv)


def architecture(name: str, width: str, layers: int) -> dict:
    """The config.json fields of the stand-in: the embedded real shape at `layers` layers."""
    known = dryrun.KNOWN_MODELS.get(name.lower())
    if known is None:
        raise SystemExit(f"gpu_memory: no embedded architecture for {name}; known: {', '.join(dryrun.KNOWN_MODELS)}")
    fields = dict(known.architecture)
    if width == "tiny":
        fields = dryrun._small_shape(fields)
    fields["num_hidden_layers"] = layers
    return fields


def build_stand_in(name: str, fields: dict, dtype: str, device: str, folder: Path) -> Path:
    """A random model of these fields with the dry run's stand-in tokenizer for `name`, saved in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = dryrun._stand_in_tokenizer(name, None)
    fields = {**fields, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation of 7B-wide matrices is slow on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def text_of(chat: ChatFormat, tokens: int, words: str = WORDS) -> str:
    """Plain text of about `tokens` tokens."""
    ids = chat.encode(words * (tokens // 8 + 8))[:tokens]
    return chat.tokenizer.decode(ids)


def prompt_of(chat: ChatFormat, tokens: int) -> str:
    """A rendered chat prompt of about `tokens` tokens (chat header included)."""
    header = len(chat.encode(chat.prompt("")))
    return chat.prompt(text_of(chat, max(1, tokens - header)))


class Peak:
    """Peak memory over a block on CUDA (allocated and reserved, GiB); None on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.allocated = self.reserved = self.left = None
        self.extra: dict = {}  # the step's own figures: training loss, generated tokens

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        if self.cuda and exc[0] is None:
            torch.cuda.synchronize()
            self.allocated = torch.cuda.max_memory_allocated() / dryrun.GIB
            self.reserved = torch.cuda.max_memory_reserved() / dryrun.GIB
        return False


def release(peak: Peak) -> None:
    """Let the step's model go, and record what stays allocated: the next stage's model (or vLLM's engine,
    which takes a share of the whole card) needs it back."""
    gc.collect()
    if peak.cuda:
        torch.cuda.empty_cache()
        peak.left = torch.cuda.memory_allocated() / dryrun.GIB


def measure_sft(config, path: str, chat: ChatFormat, device: str, scratch: Path) -> Peak:
    from selfreward.model.training import build_sft_trainer

    train = config.sft
    rows = [
        {"prompt": prompt_of(chat, train.max_length - 100), "completion": chat.completion(text_of(chat, 200))}
        for _ in range(train.batch_size * train.grad_accum)
    ]

    def cut_to_max_length(trainer) -> None:
        lengths = {len(r["input_ids"]) for r in trainer.train_dataset}
        assert lengths == {train.max_length}, f"rows not cut to sft.max_length {train.max_length}: {sorted(lengths)}"

    return train_one_step(lambda: build_sft_trainer(path, rows, config, scratch / "sft"), device, cut_to_max_length)


def train_one_step(build, device: str, check=None) -> Peak:
    """One optimizer step of the trainer build() makes, measured; then the trainer is let go as the stages
    let it go (built here, so no caller holds it while `release` looks at what is left)."""
    trainer = build()
    if check:
        check(trainer)
    with Peak(device) as peak:
        trainer.train()
    peak.extra["loss"] = trainer.state.log_history[0].get("loss") if trainer.state.log_history else None
    del trainer
    release(peak)
    return peak


def measure_dpo(config, path: str, chat: ChatFormat, device: str, scratch: Path) -> Peak:
    from selfreward.model.training import build_dpo_trainer

    train = config.dpo
    prompt = prompt_of(chat, train.max_length - 100)
    chosen, rejected = chat.completion(text_of(chat, 200)), chat.completion(text_of(chat, 200, OTHER_WORDS))
    rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * (train.batch_size * train.grad_accum)
    return train_one_step(lambda: build_dpo_trainer(path, rows, config, scratch / "dpo"), device)


def measure_generate(config, path: str, chat: ChatFormat, device: str, prompt_tokens: int) -> Peak:
    cfg = config.responses
    model = load_model(path, config.model)
    backend = HFBackend(
        model, chat, prefix_cache=config.generation.prefix_cache, max_model_len=config.generation.max_model_len
    )  # as backends.load_backend makes it
    prompts = [prompt_of(chat, prompt_tokens - k) for k in range(max(1, cfg.batch_size // cfg.num_samples))]
    sampling = Sampling(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size,
                        min_new_tokens=cfg.max_new_tokens)  # fmt: skip
    with Peak(device) as peak:
        gens = backend.generate(prompts, sampling, seed=0, desc="generate")
    peak.extra["tokens"] = sum(g.num_tokens for row in gens for g in row)
    backend.close()
    del model, backend
    release(peak)
    return peak


def main(argv=None) -> int:
    args = parse_args(argv)
    process_defaults()  # the CUDA allocator's settings the stages run with
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_memory: no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu", flush=True)
        return 0
    # One optimizer step each, no checkpoints or logging services: only the step's memory is of interest.
    overrides = {"model.device": args.device}
    for section in ("sft", "dpo"):
        overrides.update({f"{section}.max_steps": 1, f"{section}.warmup_steps": 0, f"{section}.save_steps": 10_000,
                          f"{section}.report_to": "none", f"{section}.logging_steps": 1})  # fmt: skip
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = override_value(key, value)
    config = load_config(args.config, overrides)
    name = config.model.name_or_path
    fields = architecture(name, args.width, args.layers)
    steps = [s for s in args.steps.split(",") if s]
    context = None
    if args.device == "cuda":
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        context = (total - free) / dryrun.GIB  # this process's CUDA context (and anything else on the card)

    # The estimate, for exactly this architecture and these settings.
    from transformers import AutoConfig

    arch = dict(fields)
    real_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    counts = dryrun.parameter_counts(dryrun.meta_model(real_config), config)
    rows = {r.stage: r for r in dryrun.memory_rows(config, real_config, counts)}
    context_len = config.generation.max_model_len or dryrun.context_length(real_config)
    longest = max(config.sft.max_length, config.dpo.max_length)  # the prompt length the estimate takes
    prompt_tokens = min(longest, context_len - config.responses.max_new_tokens)

    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-memory-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        path = str(build_stand_in(name, fields, config.model.dtype, args.device, scratch / "model"))
        built = time.perf_counter() - started
        chat = ChatFormat.from_tokenizer(load_tokenizer(path, config.model))
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, name_or_path=path))
        for step in steps:
            if step == "sft":
                peak = measure_sft(config, path, chat, args.device, scratch)
            elif step == "dpo":
                peak = measure_dpo(config, path, chat, args.device, scratch)
            elif step == "generate":
                peak = measure_generate(config, path, chat, args.device, prompt_tokens)
            else:
                raise SystemExit(f"gpu_memory: unknown step '{step}' (known: {', '.join(STEPS)})")
            row = rows[ESTIMATE_ROW[step]]
            estimate = (row.gpu - dryrun.GPU_OVERHEAD) / dryrun.GIB
            results.append(
                {
                    "step": step,
                    "what": row.what,
                    "estimate_gib": round(estimate, 3),
                    "allocated_gib": None if peak.allocated is None else round(peak.allocated, 3),
                    "reserved_gib": None if peak.reserved is None else round(peak.reserved, 3),
                    "ratio": None if peak.allocated is None else round(peak.allocated / estimate, 3),
                    "left_after_gib": None if peak.left is None else round(peak.left, 3),
                    "seconds": round(peak.seconds, 2),
                    **peak.extra,
                }
            )

    def gib(value):
        return "-" if value is None else f"{value:.2f}"

    print(f"\ngpu_memory: {name} stand-in, {args.layers} layers at {args.width} width "
          f"({counts['total'] / 1e9:.2f} B parameters, {counts['lora'] / 1e6:.1f} M in LoRA), on {args.device}; "
          f"built in {built:.0f} s", flush=True)  # fmt: skip
    if context is not None:
        print(f"CUDA context and other users of the card before the first allocation: {context:.2f} GiB "
              f"(the estimate allows {dryrun.GPU_OVERHEAD / dryrun.GIB:.2f})")  # fmt: skip
    print(f"{'step':<9} {'estimate':>8} {'allocated':>9} {'reserved':>8} {'ratio':>6} {'left':>5} {'s':>6}  what "
          "(GiB; ratio = allocated / estimate; left = still allocated once the step's objects are gone)")  # fmt: skip
    for r in results:
        print(f"{r['step']:<9} {gib(r['estimate_gib']):>8} {gib(r['allocated_gib']):>9} {gib(r['reserved_gib']):>8} "
              f"{'-' if r['ratio'] is None else r['ratio']:>6} {gib(r['left_after_gib']):>5} {r['seconds']:>6.1f}  "
              f"{r['what']}")  # fmt: skip
    summary = {
        "bench": "gpu_memory",
        "model": name,
        "config": str(args.config),
        "width": args.width,
        "layers": args.layers,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__,
        "context_gib": None if context is None else round(context, 3),
        "machine": platform.machine(),
        "steps": results,
    }
    line = json.dumps(summary)
    print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
