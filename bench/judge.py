"""Benchmark: the logit judge against sampled judging (K=3), both batched, and against the seed's way.

All three judge the same (question, response) pairs from data/seed/eft.jsonl (64 by default: 16
questions x 4 answers with human scores) with the same rubric, in this process:
- logits: one forward pass per judgment; the rubric shared by every prompt is computed once and its
  key/value cache reused (generation.HFBackend).
- sample: the paper's way, K sampled judgments of exactly --new-tokens tokens each (forced, so every
  run does the same work), batched.
- the seed's way: one `generate` call per judgment at batch 1, timed on the first --seed-pairs pairs
  and reported per judgment (all 64 x 3 would take most of an hour).

    python bench/judge.py                                   # SmolLM2-135M-Instruct, bfloat16
    python bench/judge.py --model runs/default/M0/model     # a judge that had EFT training

Prints the figures and ends with one JSON line.
"""

import argparse
import json
import platform
import time

import torch
from seed_way import seed_way  # bench/ is the script folder, so on the path

from selfreward.judge.rubric import fit_judge_prompt, mean_score, parse_judge_score, score_by_logits
from selfreward.model.generation import HFBackend, Sampling, shared_prefix_length
from selfreward.model.models import SMOLLM2, load_for_generation, resolve_model_path
from selfreward.run.config import ModelConfig
from selfreward.run.metrics import pairwise_agreement, spearman
from selfreward.run.records import EFT, read_jsonl


def correlations(rows, a, b):
    """Spearman and within-question pairwise agreement of scorings a and b over rows both scored."""
    keep = [i for i in range(len(rows)) if a[i] is not None and b[i] is not None]
    x, y = [a[i] for i in keep], [b[i] for i in keep]
    agree, pairs = pairwise_agreement([rows[i]["prompt"] for i in keep], x, y)
    rho = spearman(x, y)
    return {
        "n": len(keep),
        "spearman": None if rho is None else round(rho, 3),
        "pairwise_agreement": None if agree is None else round(agree, 3),
        "pairs": pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="a model folder or builtin name (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--pairs", type=int, default=64, help="(question, response) pairs judged")
    parser.add_argument("--samples", type=int, default=3, help="K, sampled judgments per pair")
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens per sampled judgment (forced)")
    parser.add_argument("--batch-size", type=int, default=16, help="judgments per call (both modes)")
    parser.add_argument("--seed-pairs", type=int, default=4, help="pairs the seed's way is timed on")
    args = parser.parse_args()

    cfg = ModelConfig(name_or_path=args.model, dtype=args.dtype, device="cpu")
    model, chat = load_for_generation(resolve_model_path(args.model), cfg)
    backend = HFBackend(model, chat)
    rows = read_jsonl("data/seed/eft.jsonl", EFT)[: args.pairs]
    prompts = [fit_judge_prompt(chat, r["prompt"], r["response"], 2048)[0] for r in rows]
    prompt_tokens = sum(len(chat.encode(p)) for p in prompts) / len(prompts)
    shared = shared_prefix_length([chat.encode(p) for p in prompts])  # what HFBackend computes once
    print(f"{len(rows)} judge prompts, {prompt_tokens:.0f} tokens on average, {shared} of them shared (the rubric)")

    start = time.perf_counter()
    judged = score_by_logits(backend, prompts, args.batch_size)
    logit_seconds = time.perf_counter() - start
    logit_scores = [j["score"] for j in judged]

    sampling = Sampling(args.samples, 0.7, 0.9, args.new_tokens, args.batch_size, min_new_tokens=args.new_tokens)
    start = time.perf_counter()
    gens = backend.generate(prompts, sampling, seed=0, desc="sampled judging")
    sample_seconds = time.perf_counter() - start
    sample_scores = [mean_score([parse_judge_score(g.text) for g in gs]) for gs in gens]
    parsed = sum(parse_judge_score(g.text) is not None for gs in gens for g in gs)

    torch.manual_seed(0)
    start = time.perf_counter()
    seed_way(model, chat, prompts[: args.seed_pairs], args.samples, args.new_tokens)
    seed_per_judgment = (time.perf_counter() - start) / (args.seed_pairs * args.samples)
    seed_seconds = seed_per_judgment * len(rows) * args.samples  # scaled to all pairs

    human = [float(r["score"]) for r in rows]
    result = {
        "bench": "judge",
        "model": args.model,
        "dtype": args.dtype,
        "pairs": len(rows),
        "samples": args.samples,
        "new_tokens": args.new_tokens,
        "prompt_tokens": round(prompt_tokens),
        "shared_prefix_tokens": shared,
        "logits_s": round(logit_seconds, 2),
        "sample_s": round(sample_seconds, 2),
        "seed_way_s_per_judgment": round(seed_per_judgment, 2),
        "seed_way_s_scaled": round(seed_seconds, 1),
        "speedup_vs_sample": round(sample_seconds / logit_seconds, 1),
        "speedup_vs_seed_way": round(seed_seconds / logit_seconds, 1),
        "sampled_judgments_parsed": f"{parsed}/{len(rows) * args.samples}",
        "logits_vs_sample": correlations(rows, sample_scores, logit_scores),
        "logits_vs_human": correlations(rows, human, logit_scores),
        "sample_vs_human": correlations(rows, human, sample_scores),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(f"logits: {logit_seconds:.1f} s for {len(rows)} judgments (one forward pass each)")
    print(f"sample: {sample_seconds:.1f} s for {len(rows)} x {args.samples} judgments of {args.new_tokens} tokens")
    print(f"seed's way: {seed_per_judgment:.2f} s per judgment, {seed_seconds:.0f} s scaled to all of them")
    print(f"logits is {result['speedup_vs_sample']}x sample and {result['speedup_vs_seed_way']}x the seed's way")
    print(f"sampled judgments with a valid score line: {result['sampled_judgments_parsed']}")
    for key in ("logits_vs_sample", "logits_vs_human", "sample_vs_human"):
        print(f"{key}: {result[key]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
