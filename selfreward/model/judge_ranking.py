"""The judge's ranking objective (judge.objective ranking or sft+ranking): a Bradley-Terry loss on the score
the logit judge reads.

SFT on the EFT rows' text teaches how often each score is written, not how the score depends on the answer:
on the CPU demo's held-out split it took Gemma-3-270M's judge from 0.56 pairwise accuracy (no training at all)
to chance (bench/judge_quality.py). The ranking objective trains what the loop reads instead. For two answers to
the same question with different human scores, the judge prompt of each, opened with "Score: ", gives a
distribution over the digits 0-5 and so an expected score E; the loss is -log sigmoid(E_better - E_worse), as
reward models are trained on preference pairs. Only the digits' six logits at one position are computed for it.

The IFT rows (and with sft+ranking the EFT rows as text too) keep TRL's SFT loss; each micro-batch adds
judge.ranking_weight x the mean ranking loss of judge.ranking_pairs pairs, drawn in a fixed order from the step
number (a resumed run draws what the killed one would have) and, under torchrun, the rank.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from selfreward.run.records import RecordError


def better_worse_pairs(rows: list[dict], seed: int) -> list[tuple[int, int]]:
    """(better, worse) indices of every two rows that answer the same question with different human scores,
    shuffled by the seed."""
    by_question: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_question.setdefault(row["prompt"], []).append(i)
    pairs = [
        (a, b) for group in by_question.values() for a in group for b in group if rows[a]["score"] > rows[b]["score"]
    ]
    random.Random(seed).shuffle(pairs)
    return pairs


def expected_scores(model, sequences: list[list[int]], digit_ids: list[int], pad_id: int) -> torch.Tensor:
    """The expected score after each sequence (a judge prompt ending in the score prefix): the digits 0-5
    weighted by their next-token probabilities, renormalised over the six, as the logit judge reads them."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    device = next(p for p in model.parameters()).device
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=1,  # one position of 262k logits per row, not one per token
        use_cache=False,
    )
    probs = F.softmax(out.logits[:, -1, digit_ids].float(), dim=-1)
    return probs @ torch.arange(len(digit_ids), dtype=probs.dtype, device=probs.device)


def ranking_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: the better answer's expected score should exceed the worse one's."""
    return -F.logsigmoid(better - worse).mean()


class RankingSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the judge's ranking loss added to every training micro-batch."""

    def __init__(self, *args, judge_sequences, judge_pairs, digit_ids, weight: float, pairs_per_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not judge_pairs:
            raise RecordError("judge.objective ranking: no two EFT rows answer one question with different scores")
        self.judge_sequences, self.judge_pairs = judge_sequences, judge_pairs
        self.digit_ids, self.weight, self.pairs_per_batch = digit_ids, weight, pairs_per_batch
        self._micro_steps: int | None = None

    def _next_pairs(self) -> list[tuple[int, int]]:
        if self._micro_steps is None:  # a resumed run goes on where the killed one stopped
            self._micro_steps = self.state.global_step * self.args.gradient_accumulation_steps
        k, n = self.pairs_per_batch, len(self.judge_pairs)
        start = (self._micro_steps * self.args.world_size + self.args.process_index) * k
        self._micro_steps += 1
        return [self.judge_pairs[(start + j) % n] for j in range(k)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        pairs = self._next_pairs()
        sequences = [self.judge_sequences[i] for pair in pairs for i in pair]
        scores = expected_scores(model, sequences, self.digit_ids, self.processing_class.pad_token_id)
        ranked = ranking_loss(scores[0::2], scores[1::2])
        # As TRL treats its MoE aux loss: with num_items_in_batch the trainer leaves gradient accumulation to the
        # loss, so a per-micro-batch mean is averaged over the accumulation steps here.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.weight * ranked / steps
        self._metrics["train"]["judge_ranking_loss"].append(ranked.item())
        self._metrics["train"]["judge_ranked_right"].append((scores[0::2] > scores[1::2]).float().mean().item())
        return (loss, outputs) if return_outputs else loss
