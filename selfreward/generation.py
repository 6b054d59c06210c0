"""Batched sampling with Hugging Face `generate`: many prompts and samples per call, never one call per sample.

Prompts are sorted by length so a batch wastes little padding; the N samples of a prompt come from
one call with `num_return_sequences=N`, so they share its prefill. Only the new tokens are decoded.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from selfreward.chat import ChatFormat


@dataclass(frozen=True)
class Sampling:
    num_samples: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    batch_size: int = 16  # sequences per call: prompts x samples
    min_new_tokens: int = 0  # > 0 forces answers to this length (benchmarks compare equal work)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "eos": the model ended its turn; "length": max_new_tokens ran out
    num_tokens: int  # generated tokens, the stop token included


def batch_seed(seed: int, keys: list[str]) -> int:
    """A seed that depends on the run seed and the batch's contents, not on its position in the run."""
    digest = hashlib.sha256(f"{seed}\x00".encode() + "\x00".join(keys).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def split_generated(token_ids: list[int], stop_ids: set[int]) -> tuple[list[int], str, int]:
    """Cut a generated row at its first stop token: (answer tokens, finish reason, tokens generated)."""
    for i, tok in enumerate(token_ids):
        if tok in stop_ids:
            return token_ids[:i], "eos", i + 1
    return token_ids, "length", len(token_ids)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row ending at the last column, where generation continues."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention[i, width - len(r) :] = 1
    return input_ids, attention


def plan_batches(lengths: list[int], per_call: int) -> list[list[int]]:
    """Indices grouped into batches of similar length; the same inputs always give the same plan."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + per_call] for start in range(0, len(order), per_call)]


# on_batch(batch index, input indices, their results): called after every batch, e.g. to save it.
BatchCallback = Callable[[int, list[int], list], None]


@torch.inference_mode()
def generate(
    model,
    chat: ChatFormat,
    prompts: list[str],
    sampling: Sampling,
    *,
    seed: int,
    desc: str = "generating",
    skip: Collection[int] = (),
    on_batch: BatchCallback | None = None,
) -> list[list[Generation] | None]:
    """Sample `sampling.num_samples` continuations for every rendered prompt, in the input order.

    Batches listed in `skip` (already done by a killed run) are not generated; their results are None.
    """
    tokenizer = chat.tokenizer
    encoded = [chat.encode(p) for p in prompts]
    batches = plan_batches([len(e) for e in encoded], max(1, sampling.batch_size // sampling.num_samples))
    stop_ids = set(chat.stop_token_ids())
    pad_id = tokenizer.pad_token_id
    results: list[list[Generation] | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    model.eval()
    started, new_tokens = time.time(), 0
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", dynamic_ncols=True)
    for b, idx in enumerate(batches):
        bar.update(len(idx))
        if b in skip:
            continue
        input_ids, attention = left_pad([encoded[i] for i in idx], pad_id)
        width = input_ids.shape[1]
        torch.manual_seed(batch_seed(seed, [prompts[i] for i in idx]))
        sample = sampling.temperature > 0
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=0 if sample else None,
            num_return_sequences=sampling.num_samples,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None,
            eos_token_id=sorted(stop_ids),
            pad_token_id=pad_id,
        )
        new = out[:, width:].tolist()
        for row, i in enumerate(idx):
            gens = []
            for k in range(sampling.num_samples):
                ids, reason, count = split_generated(new[row * sampling.num_samples + k], stop_ids)
                gens.append(Generation(tokenizer.decode(ids, skip_special_tokens=True), reason, count))
                new_tokens += count
            results[i] = gens
        if on_batch:
            on_batch(b, idx, [results[i] for i in idx])
        bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - started, 1e-6):.0f}")
    bar.close()
    return results
