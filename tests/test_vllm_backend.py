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

from selfreward.config import GenerationConfig, ModelConfig
from selfreward.generation import load_backend
from selfreward.models import TINY, resolve_model_path


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
            model_config=SimpleNamespace(max_model_len=kwargs["max_model_len"] or 2048),
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
