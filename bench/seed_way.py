"""The seed's way of generating, for the benchmarks to compare against: batch 1, one call per sample."""

import torch


def seed_way(model, chat, prompts: list[str], samples: int, new_tokens: int) -> int:
    """One `generate` call per sample at batch 1, each forced to `new_tokens`; returns tokens generated."""
    tokens = 0
    for prompt in prompts:
        ids = torch.tensor([chat.encode(prompt)])
        for _ in range(samples):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=0.7,
                top_p=0.9,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=chat.tokenizer.pad_token_id,
            )
            tokens += out.shape[1] - ids.shape[1]
    return tokens
