"""The judge's ranking objective (judge.objective): what it reads, how it moves the judge, and stage 00 with it."""

from __future__ import annotations

import json

import pytest
import torch

from selfreward.judge.rubric import (
    check_judge_settings,
    fit_judge_prompt,
    rubric_of,
    score_by_logits,
    score_token_ids,
)
from selfreward.model.generation import HFBackend
from selfreward.model.judge_ranking import (
    better_worse_pairs,
    clearly_wrong,
    digit_log_probs,
    expected_scores,
    judgment_dpo_loss,
    ranking_loss,
)
from selfreward.run.config import Config, ConfigError, load_config
from selfreward.tools.report import base_check

ROWS = [
    {"prompt": "q1", "response": "a", "score": 4},
    {"prompt": "q1", "response": "b", "score": 1},
    {"prompt": "q1", "response": "c", "score": 4},
    {"prompt": "q2", "response": "d", "score": 0},
    {"prompt": "q2", "response": "e", "score": 3},
    {"prompt": "q3", "response": "f", "score": 2},
]


def test_pairs_are_two_answers_to_one_question_with_different_scores_better_first():
    pairs = better_worse_pairs(ROWS, seed=0)
    assert sorted(pairs) == [(0, 1), (2, 1), (4, 3)]  # equal scores (0, 2) and lone q3 give none
    assert better_worse_pairs(ROWS, seed=0) == pairs  # a fixed order: a resumed run draws the same pairs


def test_the_trained_score_is_the_score_the_logit_judge_reads(tiny_model):
    """The loss must train exactly the figure stage 03 reads: the same prompt, prefix, digits and renormalisation."""
    model, chat, _ = tiny_model
    rubric = rubric_of(Config().judge)
    prefix, digits = score_token_ids(chat, rubric)
    prompts = [fit_judge_prompt(chat, r["prompt"], r["response"], 512, rubric)[0] for r in ROWS[:4]]
    read = score_by_logits(HFBackend(model, chat), prompts, batch_size=4, rubric=rubric)
    with torch.no_grad():
        trained = expected_scores(
            model, [chat.encode(p + prefix) for p in prompts], digits, chat.tokenizer.pad_token_id
        )
    assert trained.tolist() == pytest.approx([j["score"] for j in read], abs=1e-3)
    assert len({round(s, 3) for s in trained.tolist()}) > 1  # different answers, different scores: a real check


def test_a_gradient_step_on_the_ranking_loss_moves_the_better_answer_up(tiny_model):
    model, chat, _ = tiny_model
    prefix, digits = score_token_ids(chat, rubric_of(Config().judge))
    better, worse = (chat.encode(chat.prompt(f"Rate this answer: {a}") + prefix) for a in ("good", "bad"))
    pad = chat.tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.dtype.is_floating_point]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            before = expected_scores(model, [better, worse], digits, pad)
        loss = ranking_loss(*expected_scores(model, [better, worse], digits, pad).unsqueeze(1))
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 1.0 * p.grad
            after = expected_scores(model, [better, worse], digits, pad)
        assert (after[0] - after[1]) > (before[0] - before[1])
        assert ranking_loss(after[:1], after[1:]) < ranking_loss(before[:1], before[1:])
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None


@pytest.mark.parametrize(
    "overrides",
    [
        {"judge.objective": "ranking", "judge.mode": "sample"},
        {"judge.objective": "ranking", "judge.mode": "logits", "judge.format": "score_last"},
        {"judge.objective": "ranking", "judge.mode": "logits", "judge.format": "score_first", "judge.ranking_pairs": 0},
        {"judge.objective": "contrastive"},
        {"judge.objective": "judgment_dpo", "judge.mode": "sample"},
        {"judge.objective": "judgment_dpo", "judge.mode": "logits", "judge.judgment_beta": 0},
    ],
)
def test_a_ranking_objective_the_judge_cannot_use_is_refused_when_the_config_loads(overrides, tmp_path):
    with pytest.raises(ConfigError, match="judge.(objective|ranking_pairs|judgment_beta)"):
        check_judge_settings(load_config("configs/tiny.yaml", overrides).judge)


def test_stage_00_trains_the_ranking_loss_and_measures_the_base_judge(run_stage, tmp_path):
    run = tmp_path / "run"
    run_stage("00_sft", "--run-dir", str(run), "--config", "configs/tiny.yaml", "--no-oxen",
              "--judge.objective", "ranking", "--sft.max_steps", "2")  # fmt: skip
    manifest = json.loads((run / "M0" / "00_sft.manifest.json").read_text())
    log = [json.loads(line) for line in (run / "M0" / "train_log.jsonl").read_text().splitlines()]
    ranked = [row["judge_ranking_loss"] for row in log if "judge_ranking_loss" in row]
    assert len(ranked) == 2 and all(0 < x < 10 for x in ranked)
    # ranking: the EFT rows are not SFT targets, so only the IFT rows are trained as text
    ift_rows = sum(1 for _ in (run / "M0" / "train" / "ift.jsonl").open())
    assert manifest["rows_in"] == ift_rows
    assert manifest["ranking_pairs"] > 0
    base = manifest["base_judge_quality"]
    assert base["rows"] == manifest["heldout_eft_rows"] and 0 <= base["pairwise_accuracy"] <= 1


def test_the_rejected_judgment_is_the_references_likeliest_score_two_or_more_points_off():
    reference = torch.log_softmax(torch.tensor([[0.0, 1.0, 5.0, 4.0, 0.5, 2.0], [3.0, 2.0, 1.0, 0.0, 0.0, 0.0]]), -1)
    # human 2: 2 itself and 1, 3 (likelier than the rest) are too close; of 0, 4, 5 the reference likes 5 best
    # human 0: the reference likes 0 and 1 best, but the likeliest two points off is 2
    assert clearly_wrong(reference, torch.tensor([2, 0])).tolist() == [5, 2]


def test_judgment_dpo_is_log_2_where_the_model_is_its_reference_and_a_step_moves_the_human_score_up(tiny_model):
    model, chat, _ = tiny_model
    prefix, digits = score_token_ids(chat, rubric_of(Config().judge))
    sequences = [chat.encode(chat.prompt(f"Rate this answer: {a}") + prefix) for a in ("good", "bad")]
    human = torch.tensor([5, 0])
    pad = chat.tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.dtype.is_floating_point]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            reference = digit_log_probs(model, sequences, digits, pad)
        loss, _ = judgment_dpo_loss(digit_log_probs(model, sequences, digits, pad), reference, human, beta=1.0)
        assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
        loss.backward()
        rejected = clearly_wrong(reference, human)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 1.0 * p.grad
            after = digit_log_probs(model, sequences, digits, pad)
        gap = lambda lp: lp.gather(1, human[:, None]) - lp.gather(1, rejected[:, None])  # noqa: E731
        assert (gap(after) > gap(reference)).all()
        assert judgment_dpo_loss(after, reference, human, beta=1.0)[0] < loss
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None


def test_stage_00_trains_judgment_dpo_against_the_model_without_its_adapter(run_stage, tmp_path):
    """The reference is the model stage 00 started from: the first step's loss is log 2 (the LoRA starts at zero,
    so policy and reference agree), and the second's is not (the policy moved; the reference, with the adapter
    switched off, did not; a reference read with the adapter on would give log 2 again)."""
    run = tmp_path / "run"
    run_stage("00_sft", "--run-dir", str(run), "--config", "configs/tiny.yaml", "--no-oxen",
              "--judge.objective", "judgment_dpo", "--sft.max_steps", "2", "--judge.measure_base", "false")  # fmt: skip
    manifest = json.loads((run / "M0" / "00_sft.manifest.json").read_text())
    log = [json.loads(line) for line in (run / "M0" / "train_log.jsonl").read_text().splitlines()]
    losses = [row["judge_dpo_loss"] for row in log if "judge_dpo_loss" in row]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.6931, abs=1e-4)
    assert abs(losses[1] - 0.6931) > 1e-3
    judge_rows = sum(1 for name in ("eft", "eft_constructed") for _ in (run / "M0" / "train" / f"{name}.jsonl").open())
    assert manifest["ranking_pairs"] == judge_rows  # every judge row is drawn, one answer at a time
    assert manifest["rows_in"] == sum(1 for _ in (run / "M0" / "train" / "ift.jsonl").open())


def _quality(accuracy: float) -> dict:
    return {
        "pairs": 180,
        "pairwise_accuracy": accuracy,
        "intervals": {"pairwise_accuracy": [accuracy - 0.1, accuracy + 0.1]},
    }


def test_the_report_warns_when_m0_judges_worse_than_its_base_model():
    assert "Warning" in base_check({"base": _quality(0.6), "M0": _quality(0.55)})[0]
    assert base_check({"base": _quality(0.6), "M0": _quality(0.6)})[0].startswith("M0 judges no worse")
    assert base_check({"M0": _quality(0.6)}) == []  # a run whose stage 00 did not measure its base


def test_a_run_reports_its_base_model_beside_m0(tiny_run):
    report = (tiny_run / "report.md").read_text()
    manifest = json.loads((tiny_run / "M0" / "00_sft.manifest.json").read_text())
    base = manifest["base_judge_quality"]["pairwise_accuracy"]
    assert "| base | " in report
    assert f"against the base model's {base:.3g}" in report


def test_a_resumed_run_draws_the_pairs_the_killed_one_would_have():
    """The pairs of a micro-batch follow from the step, the accumulation and the rank, not from how many were
    drawn before in this process: a run resumed at step 3 draws what the whole run draws from step 3 on."""
    from types import SimpleNamespace

    from selfreward.model.judge_ranking import RankingSFTTrainer

    def trainer(step: int, rank: int = 0) -> RankingSFTTrainer:
        t = RankingSFTTrainer.__new__(RankingSFTTrainer)  # the drawing alone: no model or data needed
        t.judge_pairs, t.pairs_per_batch, t._micro_steps = [(i, i + 100) for i in range(10)], 3, None
        t.state = SimpleNamespace(global_step=step)
        t.args = SimpleNamespace(gradient_accumulation_steps=2, world_size=2, process_index=rank)
        return t

    whole = trainer(0)
    drawn = [whole._next_pairs() for _ in range(10)]
    resumed = trainer(3)
    assert [resumed._next_pairs() for _ in range(4)] == drawn[6:]  # 2 micro-batches per step
    assert trainer(0, rank=1)._next_pairs() != drawn[0]  # the other rank draws other pairs
