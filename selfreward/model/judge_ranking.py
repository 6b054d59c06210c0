"""The judge's training objectives beside SFT (judge.objective): a Bradley-Terry loss on the score the logit
judge reads (ranking, sft+ranking), or DPO on its judgments (judgment_dpo).

SFT on the EFT rows' text teaches how often each score is written, not how the score depends on the answer:
on the CPU demo's held-out split it took Gemma-3-270M's judge from 0.56 pairwise accuracy (no training at all)
to chance (bench/judge_quality.py). The ranking objective trains what the loop reads instead. For two answers to
the same question with different human scores, the judge prompt of each, opened with "Score: ", gives a
distribution over the digits 0-5 and so an expected score E; the loss is -log sigmoid(E_better - E_worse), as
reward models are trained on preference pairs. Only the digits' six logits at one position are computed for it.

judgment_dpo is DPO on judgments, as Meta-Rewarding trains its judge (Wu et al., 2024), with the verdict known
instead of meta-judged: for one answer, the judgment giving its human score is chosen over the judgment the
model before training (the reference: the adapter switched off) finds likeliest among those at least two
points wrong. Each is the one digit after "Score: ", so the loss is -log sigmoid(beta x ((log p(chosen) - log
p_ref(chosen)) - (log p(rejected) - log p_ref(rejected)))), over the six digits' probabilities as the judge
reads them. Unlike SFT on the digit, it only moves the chosen digit against the model's own likeliest mistake,
measured from where the model started.

The IFT rows (and with sft+ranking the EFT rows as text too) keep TRL's SFT loss; each micro-batch adds
judge.ranking_weight x the mean judge loss of judge.ranking_pairs items (pairs of answers, or answers for
judgment_dpo), drawn in a fixed order from the step number (a resumed run draws what the killed one would have)
and, under torchrun, the rank.
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


def judged_rows(rows: list[dict], seed: int) -> list[tuple[int]]:
    """(row,) for every EFT row, shuffled by the seed: what judgment_dpo draws from."""
    items = [(i,) for i in range(len(rows))]
    random.Random(seed).shuffle(items)
    return items


def digit_log_probs(model, sequences: list[list[int]], digit_ids: list[int], pad_id: int) -> torch.Tensor:
    """The log-probability of each digit 0-5 after each sequence (a judge prompt ending in the score prefix),
    renormalised over the six, as the logit judge reads them: one row of six per sequence."""
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
    return F.log_softmax(out.logits[:, -1, digit_ids].float(), dim=-1)


def expected_scores(model, sequences: list[list[int]], digit_ids: list[int], pad_id: int) -> torch.Tensor:
    """The expected score after each sequence: the digits 0-5 weighted by their probabilities."""
    probs = digit_log_probs(model, sequences, digit_ids, pad_id).exp()
    return probs @ torch.arange(len(digit_ids), dtype=probs.dtype, device=probs.device)


def ranking_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: the better answer's expected score should exceed the worse one's."""
    return -F.logsigmoid(better - worse).mean()


def clearly_wrong(reference: torch.Tensor, human: torch.Tensor, distance: int = 2) -> torch.Tensor:
    """For each answer, the digit the reference finds likeliest among those at least `distance` from its human
    score: the rejected judgment."""
    digits = torch.arange(reference.shape[-1], device=reference.device)
    far = (digits.unsqueeze(0) - human.unsqueeze(1)).abs() >= distance
    return reference.masked_fill(~far, float("-inf")).argmax(dim=-1)


def judgment_dpo_loss(policy: torch.Tensor, reference: torch.Tensor, human: torch.Tensor, beta: float):
    """DPO between two one-digit judgments of each answer: its human score (chosen) over the reference's likeliest
    clearly wrong score (rejected). policy and reference are digit_log_probs rows. Returns the mean loss, and
    how often the policy now finds the chosen judgment likelier than the rejected one."""
    rejected = clearly_wrong(reference, human)
    chosen_margin = policy.gather(1, human[:, None]) - reference.gather(1, human[:, None])
    rejected_margin = policy.gather(1, rejected[:, None]) - reference.gather(1, rejected[:, None])
    loss = -F.logsigmoid(beta * (chosen_margin - rejected_margin)).mean()
    right = (policy.gather(1, human[:, None]) > policy.gather(1, rejected[:, None])).float().mean()
    return loss, right


class RankingSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the judge's ranking loss added to every training micro-batch."""

    nothing_to_draw = "judge.objective ranking: no two EFT rows answer one question with different scores"

    def __init__(self, *args, judge_sequences, judge_pairs, digit_ids, weight: float, pairs_per_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not judge_pairs:
            raise RecordError(self.nothing_to_draw)
        self.judge_sequences, self.judge_pairs = judge_sequences, judge_pairs
        self.digit_ids, self.weight, self.pairs_per_batch = digit_ids, weight, pairs_per_batch
        self._micro_steps: int | None = None

    def _next_pairs(self) -> list[tuple[int, ...]]:
        if self._micro_steps is None:  # a resumed run goes on where the killed one stopped
            self._micro_steps = self.state.global_step * self.args.gradient_accumulation_steps
        k, n = self.pairs_per_batch, len(self.judge_pairs)
        start = (self._micro_steps * self.args.world_size + self.args.process_index) * k
        self._micro_steps += 1
        return [self.judge_pairs[(start + j) % n] for j in range(k)]

    def judge_loss(self, model, items) -> tuple[torch.Tensor, dict]:
        """The judge's loss on these drawn items, and the figures the training log keeps."""
        sequences = [self.judge_sequences[i] for pair in items for i in pair]
        scores = expected_scores(model, sequences, self.digit_ids, self.processing_class.pad_token_id)
        ranked = ranking_loss(scores[0::2], scores[1::2])
        right = (scores[0::2] > scores[1::2]).float().mean()
        return ranked, {"judge_ranking_loss": ranked.item(), "judge_ranked_right": right.item()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        items = self._next_pairs()
        judged, metrics = self.judge_loss(model, items)
        # As TRL treats its MoE aux loss: with num_items_in_batch the trainer leaves gradient accumulation to the
        # loss, so a per-micro-batch mean is averaged over the accumulation steps here.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.weight * judged / steps
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
        return (loss, outputs) if return_outputs else loss


class JudgmentDPOSFTTrainer(RankingSFTTrainer):
    """The same, with DPO on one-digit judgments (judgment_dpo) as the judge's loss: the items drawn are single
    answers (judged_rows), judge_scores their human scores."""

    nothing_to_draw = "judge.objective judgment_dpo: there are no EFT rows"

    def __init__(self, *args, judge_scores: list[int], beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.judge_scores, self.beta = judge_scores, beta

    def judge_loss(self, model, items) -> tuple[torch.Tensor, dict]:
        rows = [i for (i,) in items]
        sequences = [self.judge_sequences[i] for i in rows]
        pad = self.processing_class.pad_token_id
        policy = digit_log_probs(model, sequences, self.digit_ids, pad)
        peft_model = getattr(model, "module", model)  # under torchrun, DDP wraps the PeftModel
        with torch.no_grad(), peft_model.disable_adapter():
            reference = digit_log_probs(peft_model, sequences, self.digit_ids, pad)
        human = torch.tensor([self.judge_scores[i] for i in rows], device=policy.device)
        loss, right = judgment_dpo_loss(policy, reference, human, self.beta)
        return loss, {"judge_dpo_loss": loss.item(), "judge_chosen_over_rejected": right.item()}
