"""Benchmark: stage 02's batched generation against the seed's way (one `generate` call per sample).

Both run in this process on the embedded SmolLM2-135M-Instruct, on the same prompts, with every
answer forced to the same number of new tokens, so the two do identical work.

    python bench/generation.py                       # 16 prompts x 4 samples x 64 tokens, bfloat16
    python bench/generation.py --dtype float32 --prompts 16 --samples 4 --new-tokens 64
    python bench/generation.py --backend vllm        # stage 02 on vLLM (make install-vllm first)

Prints both throughputs and ends with one JSON line.
"""

import argparse
import json
import platform
import time

import torch
from seed_way import seed_way  # bench/ is the script folder, so on the path

from selfreward.model.backends import load_backend
from selfreward.model.generation import HFBackend, Sampling
from selfreward.model.models import SMOLLM2, load_for_generation, resolve_model_path
from selfreward.run.config import GenerationConfig, ModelConfig
from selfreward.run.records import IFT, read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per call in the batched run")
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="stage 02's backend")
    args = parser.parse_args()

    cfg = ModelConfig(name_or_path=SMOLLM2, dtype=args.dtype, device="cpu")
    model, chat = load_for_generation(resolve_model_path(SMOLLM2), cfg)
    rows = read_jsonl("data/seed/ift.jsonl", IFT)[: args.prompts]
    prompts = [chat.prompt(r["prompt"]) for r in rows]
    torch.manual_seed(0)

    start = time.perf_counter()
    seed_tokens = seed_way(model, chat, prompts, args.samples, args.new_tokens)
    seed_seconds = time.perf_counter() - start

    sampling = Sampling(args.samples, 0.7, 0.9, args.new_tokens, args.batch_size, min_new_tokens=args.new_tokens)
    if args.backend == "hf":
        backend = HFBackend(model, chat)
    else:
        started = time.perf_counter()
        backend = load_backend(resolve_model_path(SMOLLM2), cfg, GenerationConfig(backend="vllm"))
        print(f"vllm engine started in {time.perf_counter() - started:.1f} s (not counted below)")
    start = time.perf_counter()
    results = backend.generate(prompts, sampling, seed=0, desc="batched")
    ours_seconds = time.perf_counter() - start
    backend.close()
    # tokens actually generated (an answer that hit EOS at the forced length counts its stop token)
    ours_tokens = sum(g.num_tokens for gens in results for g in gens)

    seed_tps, ours_tps = seed_tokens / seed_seconds, ours_tokens / ours_seconds
    print(
        f"seed's way (batch 1, one call per sample): {seed_tokens} tokens in {seed_seconds:.1f} s = "
        f"{seed_tps:.1f} tok/s"
    )
    print(f"stage 02 ({args.backend}, {args.batch_size} sequences per call): {ours_tokens} tokens in "
          f"{ours_seconds:.1f} s = {ours_tps:.1f} tok/s")  # fmt: skip
    print(f"speed-up: {ours_tps / seed_tps:.1f}x")
    print(json.dumps({
        "bench": "generation", "backend": args.backend, "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
        "prompts": args.prompts,
        "samples": args.samples, "new_tokens": args.new_tokens, "seed_tok_s": round(seed_tps, 1),
        "batched_tok_s": round(ours_tps, 1), "speedup": round(ours_tps / seed_tps, 2),
        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
