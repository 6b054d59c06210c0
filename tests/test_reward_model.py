"""The external reward-model judge (judge.mode reward_model) on the builtin tiny random reward model."""

from __future__ import annotations

import math

import pytest

from selfreward.judge.reward_model import load_reward_model
from selfreward.model.models import TINY, TINY_REWARD, resolve_model_path
from selfreward.run.config import ConfigError, ModelConfig

QUESTIONS = ["Hi", "What is the capital of France?", "Name three colours.", "Why is the sky blue? " * 5, "2+2?"]
ANSWERS = ["Hello!", "Paris.", "Red, green and blue.", "Rayleigh scattering of sunlight. " * 8, "4"]
CPU = ModelConfig(name_or_path=TINY, device="cpu")


@pytest.fixture(scope="module")
def reward(cache):
    rm = load_reward_model(TINY_REWARD, CPU)
    yield rm
    rm.close()


@pytest.fixture(scope="module")
def texts(reward):
    return [reward.render(q, a, reward.context_length)[0] for q, a in zip(QUESTIONS, ANSWERS, strict=True)]


def test_one_finite_reward_per_text_the_same_batched_or_alone(reward, texts):
    assert reward.name == "reward_model" and reward.context_length == 2048
    batched = reward.score(texts, batch_size=5)
    assert len(batched) == len(texts) and all(isinstance(s, float) and math.isfinite(s) for s in batched)
    alone = [reward.score([t], batch_size=1)[0] for t in texts]
    # The texts differ in length, so the batch is padded: padding must not change any row's reward.
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(batched)) > 1  # it reads the texts, not only the padding


def test_render_uses_the_reward_models_own_template_and_cuts_to_fit(reward):
    text, cut = reward.render("What is the capital of France?", "Paris.", 100)
    assert not cut
    user, assistant = "<|im_start|>user\n", "<|im_start|>assistant\n"  # the tiny template's role markers
    assert text == f"{user}What is the capital of France?<|im_end|>\n{assistant}Paris.<|im_end|>\n"
    long_answer = "Paris is the capital of France. " * 40
    short, cut = reward.render("What is the capital of France?", long_answer, 60)
    assert cut and len(reward.encode(short)) <= 60
    assert f"{user}What is the capital of France?<|im_end|>" in short  # the response is cut first, not the question
    assert f"{assistant}Paris is" in short and short.endswith("<|im_end|>\n")
    both, cut = reward.render("Tell me about Paris. " * 40, long_answer, 60)
    assert cut and len(reward.encode(both)) <= 60 and both.startswith(f"{user}Tell me")
    with pytest.raises(ValueError, match="template alone"):
        reward.render("Hi", "Hello", 3)


def test_skipped_batches_are_none_and_the_others_are_saved(reward, texts):
    full = reward.score(texts, batch_size=2)
    saved = []
    got = reward.score(texts, batch_size=2, skip={1}, on_batch=lambda b, idx, res: saved.append((b, idx, res)))
    assert [b for b, _, _ in saved] == [0, 2]
    skipped = [i for i in range(len(texts)) if i not in {i for _, idx, _ in saved for i in idx}]
    assert len(skipped) == 2 and all(got[i] is None for i in skipped)
    for _, idx, res in saved:
        assert res == [got[i] for i in idx] == pytest.approx([full[i] for i in idx], abs=1e-5)


def test_a_classifier_with_two_outputs_is_refused(tmp_path, cache):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = resolve_model_path(TINY_REWARD)
    config = LlamaConfig.from_pretrained(folder, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"judge\.reward_model.*has 2 outputs; a reward model has one"):
        load_reward_model(str(tmp_path), CPU)


def test_a_causal_lm_is_refused(cache):
    with pytest.raises(ConfigError, match=r"judge\.reward_model.*LlamaForCausalLM.*outputs"):
        load_reward_model(TINY, CPU)


def test_a_model_that_is_not_a_sequence_classifier_is_refused(tmp_path):
    from transformers import ViTConfig

    ViTConfig(num_labels=1).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"judge\.reward_model.*not a sequence classifier"):
        load_reward_model(str(tmp_path), CPU)


def test_a_missing_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"judge\.reward_model.*not found"):
        load_reward_model(str(tmp_path / "no-such-model"), CPU)
    with pytest.raises(ConfigError, match=r"judge\.reward_model.*unknown builtin"):
        load_reward_model("builtin:no-such-reward", CPU)


def test_out_of_memory_halves_the_batch(reward, texts, monkeypatch):
    import torch

    expected = reward.score(texts, batch_size=5)
    forward = type(reward.model).forward

    def small_batches_only(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(reward.model), "forward", small_batches_only)
    monkeypatch.setattr(reward, "row_limit", None)
    assert reward.score(texts, batch_size=5) == pytest.approx(expected, abs=1e-4)
    assert reward.row_limit == 2


@pytest.mark.parametrize(("saved", "runs_in"), [("bfloat16", "bfloat16"), ("float16", "float32")])
def test_a_reward_model_runs_in_its_own_dtype_not_the_policys(tmp_path, cache, saved, runs_in):
    # Under the Mistral profile (model.dtype float16) a bfloat16 reward model was cast to float16, where
    # its activations can overflow. float16 is computed slowly, and not by every op, on the CPU.
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = resolve_model_path(TINY_REWARD)
    AutoModelForSequenceClassification.from_pretrained(folder, dtype=getattr(torch, saved)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    rm = load_reward_model(str(tmp_path), ModelConfig(name_or_path=TINY, dtype="float16", device="cpu"))
    assert rm.model.dtype == getattr(torch, runs_in)


def test_a_non_finite_reward_is_no_score_and_makes_no_pair(reward, monkeypatch, caplog):
    # An overflowing reward model gives inf or NaN: inf was the best answer of its prompt and went into a
    # pair as "chosen"; NaN, listed first, made the prompt's pair with itself, dropping the prompt.
    import re
    from pathlib import Path

    from selfreward.judge.judges import judge_for
    from selfreward.loop.pairs import build_pairs
    from selfreward.run.config import load_config

    repo = Path(__file__).resolve().parents[1]
    forward = type(reward.model).forward

    def rewards_from_the_text(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        for row, ids in enumerate(kwargs["input_ids"]):
            out.logits[row, 0] = float(re.search(r"reward (\S+?)<", reward.tokenizer.decode(ids)).group(1))
        return out

    monkeypatch.setattr(type(reward.model), "forward", rewards_from_the_text)
    answers = {"p1": ["1.0", "inf", "0.5"], "p2": ["nan", "2.0", "-1.0"]}
    responses = [
        {"prompt_id": p, "response_id": f"{p}-{k}", "sample_index": k, "prompt": f"Question {p}?",
         "response": f"reward {value}"}
        for p, values in answers.items() for k, value in enumerate(values)
    ]  # fmt: skip
    config = load_config(repo / "configs" / "tiny.yaml", {"judge.mode": "reward_model"})
    with caplog.at_level("WARNING", logger="selfreward"):
        rows = judge_for(config, model=reward).score_rows(responses, seed=0)
    assert {r["response"]: r["score"] for r in rows} == {
        "reward 1.0": 1.0, "reward inf": None, "reward 0.5": 0.5, "reward nan": None, "reward 2.0": 2.0,
        "reward -1.0": -1.0,
    }  # fmt: skip
    assert reward.non_finite == 2 and "non-finite reward" in caplog.text
    finite_pairs = [("reward 1.0", "reward 0.5"), ("reward 2.0", "reward -1.0")]
    assert [(p["chosen"], p["rejected"]) for p in build_pairs(rows)[0]] == finite_pairs
    # a scores file written before: its NaN and inf are no score either
    old = [{**r, "score": float(r["response"].split()[1])} for r in rows]
    assert [(p["chosen"], p["rejected"]) for p in build_pairs(old)[0]] == finite_pairs
