"""The generation backends: what every backend must do, and the hf backend's prefix cache and OOM halving."""

from __future__ import annotations

import pytest
import torch

from selfreward.judge.rubric import judge_prompt, score_by_logits
from selfreward.model.generation import Generation, HFBackend, Sampling, plan_batches, shared_prefix_length

QUESTIONS = ["What is 2+2?", "Name a colour.", "Write a haiku about rain.", "Why is the sky blue?", "Say hi."]


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # every row keeps one token of its own
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([]) == 0


def test_prefix_cache_changes_nothing_but_speed(tiny_model):
    """The rubric's reused key/value cache must give the same probabilities and the same greedy text."""
    model, chat, _ = tiny_model
    prompts = [chat.prompt(judge_prompt(q, f"An answer to: {q}")) + "Score: " for q in QUESTIONS]
    digits = [chat.encode(str(d))[0] for d in range(6)]
    cached, plain = HFBackend(model, chat, prefix_cache=True), HFBackend(model, chat, prefix_cache=False)
    assert cached._prefix([chat.encode(p) for p in prompts])[0] > 100  # the rubric is really shared
    a = cached.next_token_probs(prompts, digits, batch_size=2)
    b = plain.next_token_probs(prompts, digits, batch_size=2)
    assert torch.tensor(a) == pytest.approx(torch.tensor(b), abs=1e-5)
    greedy = Sampling(2, 0.0, 1.0, 12, 4)
    assert cached.generate(prompts, greedy, seed=0) == plain.generate(prompts, greedy, seed=0)


def test_out_of_memory_halves_the_batch(tiny_model, monkeypatch, caplog):
    model, chat, _ = tiny_model
    prompts = [chat.prompt(q) for q in QUESTIONS]
    greedy = Sampling(2, 0.0, 1.0, 6, 10)  # 5 prompts x 2 samples in one planned call
    expected = HFBackend(model, chat).generate(prompts, greedy, seed=0)
    forward = type(model).forward

    def small_batches_only(self, *args, **kwargs):
        rows = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        if rows > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", small_batches_only)
    backend = HFBackend(model, chat)
    saved = []
    got = backend.generate(prompts, greedy, seed=0, on_batch=lambda b, idx, gens: saved.append((b, idx)))
    assert got == expected  # greedy: the same answers, just in smaller calls
    assert backend.row_limit == 2  # 5 prompts -> 2 (4 rows with both samples)
    assert saved == [(0, plan_batches([len(chat.encode(p)) for p in prompts], 5)[0])]  # still one saved batch
    assert "out of memory" in caplog.text


def test_out_of_memory_with_one_prompt_is_raised(tiny_model, monkeypatch):
    model, chat, _ = tiny_model

    def always(self, *args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(type(model), "forward", always)
    with pytest.raises(torch.OutOfMemoryError):
        HFBackend(model, chat).generate([chat.prompt("Hi")], Sampling(1, 0.0, 1.0, 4, 1), seed=0)


def test_logit_judge_uses_the_backend(tiny_model):
    model, chat, _ = tiny_model
    turns = [chat.prompt(judge_prompt(q, "Fine.")) for q in QUESTIONS]
    saved = {}
    got = score_by_logits(HFBackend(model, chat), turns, 2, skip={1}, on_batch=lambda b, idx, js: saved.update({b: js}))
    assert set(saved) == {0, 2} and sum(j is None for j in got) == 2  # batch 1 was done by an earlier run
    assert all(len(j) == 4 for js in saved.values() for j in js)  # score, text, distribution, mass


def test_the_hf_backend_fits_prompts_to_generation_max_model_len(cache):
    """Stages fit prompts to backend.context_length: vLLM's is generation.max_model_len (2048 in the
    Mistral profile), the hf backend's was the model's 32k positions, so one config cut prompts (and
    sized memory, as the dry run estimates it) differently on each backend."""
    from selfreward.model.backends import load_backend
    from selfreward.model.models import TINY
    from selfreward.run.config import GenerationConfig, ModelConfig

    cfg = ModelConfig(name_or_path=TINY, device="cpu")
    assert load_backend(TINY, cfg, GenerationConfig(backend="hf", max_model_len=256)).context_length == 256
    assert load_backend(TINY, cfg, GenerationConfig(backend="hf")).context_length == 2048  # the model's


@pytest.mark.parametrize("judge_format", ["score_first", "score_last"])
def test_logit_judge_prompts_fit_the_context_with_their_score_prefix(tiny_model, judge_format):
    """The logit judge puts "Score:" after the fitted prompt (score_last: after its justification too): a
    prompt fitted to the budget must leave room for it, or vLLM refuses the whole call ("longer than
    the maximum model length")."""
    from pathlib import Path

    from selfreward.judge.judges import judge_for
    from selfreward.judge.rubric import fit_judge_prompt, rubric_of
    from selfreward.run.config import load_config

    model, chat, _ = tiny_model
    backend = HFBackend(model, chat, max_model_len=600)
    config = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", {"judge.format": judge_format})
    judge = judge_for(config, model=backend)
    budget = judge.budget
    prompt, cut = fit_judge_prompt(chat, "Why?", "A long answer. " * 500, budget, rubric_of(config.judge))
    assert cut
    sent = []
    scoring = backend.next_token_probs

    def recorded(prompts, *args, **kwargs):
        sent.extend(prompts)
        return scoring(prompts, *args, **kwargs)

    def full_length_justification(prompts, sampling, *, on_batch, **kwargs):  # the most a judge writes
        words = chat.tokenizer.decode(chat.encode(" response") * sampling.max_new_tokens)
        assert len(chat.encode(words)) == sampling.max_new_tokens
        gens = [[Generation(words, "length", sampling.max_new_tokens)] for _ in prompts]
        on_batch(0, list(range(len(prompts))), gens)
        return gens

    backend.next_token_probs, backend.generate = recorded, full_length_justification
    judge.judgments([prompt], seed=0)
    assert sent and max(len(chat.encode(p)) for p in sent) < backend.context_length


def test_a_prompt_that_fills_the_context_is_refused_before_any_work(tiny_model):
    """vLLM refuses such a prompt for its whole call; the hf backend ran it past the model's context."""
    model, chat, _ = tiny_model
    backend = HFBackend(model, chat, max_model_len=64)
    prompts = [chat.prompt("Hi."), chat.prompt("word " * 100), chat.prompt("Bye.")]

    def no_batch(*batch):
        pytest.fail(f"batch {batch[0]} ran")

    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens, and the context holds 64"):
        backend.generate(prompts, Sampling(1, 0.0, 1.0, 4, 1), seed=0, on_batch=no_batch)
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens, and the context holds 64"):
        backend.next_token_probs(prompts, [5], 1, on_batch=no_batch)


def test_an_out_of_memory_call_is_let_go_before_the_cache_is_emptied(monkeypatch):
    # The halving emptied the CUDA cache inside its except block, where the traceback still holds the failed
    # call's frames and their tensors: it freed none of them, so the halved retry met the same full card.
    import weakref

    import torch

    from selfreward.model.generation import HalvesOnOutOfMemory

    made, alive_at_empty = [], []

    def run(part):
        if len(part) > 1:
            activations = torch.zeros(1024)
            made.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return part

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive_at_empty.append(any(r() is not None for r in made)))
    assert HalvesOnOutOfMemory()._halving([0, 1, 2, 3], run) == [0, 1, 2, 3]
    assert alive_at_empty == [False, False]  # 4 -> 2 -> 1 rows a call, each failed call already freed
