import json
import random
import shutil
from pathlib import Path

import pytest

from selfreward.loop.prompt_gen import (
    PromptFilter,
    extract_new_task,
    fewshot_request,
    fit_fewshot_request,
    is_cut_off,
    pick_shots,
)
from selfreward.run.layout import RunLayout

SEED = [
    "Explain how photosynthesis works in simple terms.",
    "Write a haiku about autumn rain.",
    "What is the difference between a list and a tuple in Python?",
]


def make_filter(**kw):
    return PromptFilter(
        SEED, min_chars=kw.get("min_chars", 10), max_chars=kw.get("max_chars", 200), near_threshold=kw.get("near", 0.85)
    )


def test_request_lists_shots_and_opens_next_task():
    user, label = fewshot_request(SEED)
    for i, shot in enumerate(SEED, start=1):
        assert f"Task {i}: {shot}" in user
    assert label == "Task 4:"


def test_extract_stops_at_the_next_task():
    text = " Describe three uses of copper wire.\n\nTask 5: Write a poem about the sea.\nTask 6: ..."
    assert extract_new_task(text) == "Describe three uses of copper wire."
    assert extract_new_task(' "Plan a picnic menu for six people."') == "Plan a picnic menu for six people."


def test_shots_are_never_returned_as_new_prompts():
    keep = make_filter()
    rng = random.Random(0)
    shots = pick_shots(SEED, 2, rng)
    # a model that simply repeats one of its shots, exactly or nearly
    assert keep.add(extract_new_task(f" {shots[0]}\nTask 4: x")) == "copy_of_seed"
    assert keep.add(shots[1].upper() + "!!") == "copy_of_seed"
    assert keep.add("Explain how photosynthesis works in simple words.") == "near_copy_of_seed"


def test_duplicates_empty_and_overlong():
    keep = make_filter()
    assert keep.add("Suggest a name for a bakery in Lisbon.") is None
    assert keep.add("suggest a name for a bakery in lisbon") == "duplicate"
    assert keep.add("Suggest a name for a bakery in Lisbon, please.") == "near_duplicate"
    assert keep.add("") == "empty_or_short"
    assert keep.add("  ?! ") == "empty_or_short"
    assert keep.add("x" * 201) == "too_long"
    assert keep.add("Compare the climates of Norway and Chile.") is None


def test_a_task_cut_off_by_the_token_limit_is_recognised():
    assert is_cut_off(" Describe the water cycle and explain why the", "length")
    assert not is_cut_off(" Describe the water cycle.", "eos")  # the model ended its turn
    assert not is_cut_off(" Describe the water cycle.\nTask 10: Write a lim", "length")  # went on to the next


def test_stage_01_drops_prompts_cut_off_by_the_token_limit(tiny_run, run_stage, tmp_path):
    # The tiny random model never ends a turn, so every candidate it writes is cut off: the tiny config
    # keeps them (prompts.keep_cut_off) so that the loop has prompts; the default drops them.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    kept = json.loads(RunLayout(run).manifest("01_gen_prompts", 1).read_text())
    assert kept["rows_out"] > 0 and "cut_off" not in kept["rejected"]
    run_stage("01_gen_prompts", "--run-dir", str(run), "--iteration", "1", "--prompts.keep_cut_off", "false",
              "--no-oxen")  # fmt: skip
    dropped = json.loads(RunLayout(run).manifest("01_gen_prompts", 1).read_text())
    assert dropped["rejected"]["cut_off"] >= dropped["attempts"] // 2  # (an empty answer that ended is not cut off)
    assert dropped["rows_out"] < kept["rows_out"]
    assert dropped["rows_out"] + sum(dropped["rejected"].values()) == dropped["attempts"]


def _long_prompt(chat, tokens: int) -> str:
    words = "photosynthesis volcano treaty harbour algebra violin glacier recipe satellite migration".split()
    rng = random.Random(0)
    text = ""
    while len(chat.encode(text)) < tokens:
        text += " ".join(rng.choice(words) for _ in range(50)) + " "
    return text.strip()


def test_a_fewshot_request_drops_its_longest_shots_until_it_fits(tiny_model):
    _, chat, _ = tiny_model
    long = _long_prompt(chat, 600)
    shots = [SEED[0], long, SEED[1], SEED[2]]
    budget = 400
    request, dropped = fit_fewshot_request(chat, shots, budget)
    user, label = fewshot_request([SEED[0], SEED[1], SEED[2]])  # the others, in their order, renumbered
    assert (request, dropped) == (chat.prompt(user) + label, 1)
    assert len(chat.encode(request)) <= budget
    assert fit_fewshot_request(chat, SEED, budget) == (chat.prompt(fewshot_request(SEED)[0]) + "Task 4:", 0)
    assert fit_fewshot_request(chat, [long], budget) == (None, 1)  # one shot too long alone: nothing to send


def test_stage_01_sends_no_request_longer_than_the_context(tmp_path, monkeypatch, capsys):
    """An IFT prompt of ~3,000 tokens among the shots, and a context of 512 tokens: vLLM raises for a whole
    call when one prompt passes max_model_len, so every request must fit (the shots are seeded, so an
    unfitted request would fail every rerun at the same batch)."""
    import runpy
    import sys

    from selfreward.model import backends
    from selfreward.model.chat import ChatFormat
    from selfreward.model.generation import Generation
    from selfreward.model.models import TINY, load_tokenizer, prompt_budget, resolve_model_path
    from selfreward.run.config import load_config
    from selfreward.run.records import write_jsonl

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    shutil.copytree(resolve_model_path(TINY), run / "M0" / "model")
    config = load_config(repo / "configs" / "tiny.yaml")
    chat = ChatFormat.from_tokenizer(load_tokenizer(run / "M0" / "model", config.model))
    topics = ["the Roman roads", "tidal energy", "sourdough bread", "chess openings", "coral reefs", "jazz piano",
              "bird migration", "the printing press", "solar sails", "beekeeping", "glass blowing", "origami",
              "the Silk Road", "rock climbing", "cheese making", "radio astronomy", "tea ceremonies", "kite design",
              "desert plants", "clock repair"]  # fmt: skip
    long = _long_prompt(chat, 3000)
    pool = [f"Explain the basics of {topic} to a beginner." for topic in topics] + [long]
    write_jsonl(run / "M0" / "train" / "ift.jsonl", [{"id": f"ift-{i}", "prompt": p, "completion": "ok"}
                                                     for i, p in enumerate(pool)])  # fmt: skip

    class RecordingBackend:
        name, context_length = "recording", 512
        requests: list[str] = []

        def __init__(self, chat):
            self.chat = chat

        def generate(self, prompts, sampling, *, seed, desc="", skip=(), on_batch=None):
            self.requests.extend(prompts)
            return [[Generation(" Describe how a lighthouse keeper spent a winter.", "eos", 9)] for _ in prompts]

        def close(self):
            pass

    monkeypatch.setattr(backends, "load_backend", lambda path, model_cfg, gen_cfg: RecordingBackend(chat))
    config_file = str(repo / "configs" / "tiny.yaml")
    argv = ["01_gen_prompts.py", "--run-dir", str(run), "--iteration", "1", "--config", config_file, "--no-oxen"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(repo / "scripts" / "01_gen_prompts.py"), run_name="__main__")

    budget = prompt_budget(512, config.model, config.prompts.max_new_tokens)
    assert len(RecordingBackend.requests) == config.prompts.max_attempts  # one answer accepted, then duplicates
    assert max(len(chat.encode(r)) for r in RecordingBackend.requests) <= budget
    assert not any(long in r for r in RecordingBackend.requests)
    manifest = json.loads(RunLayout(run).manifest("01_gen_prompts", 1).read_text())
    assert manifest["context"]["prompt_budget"] == budget
    assert manifest["context"]["shots_dropped"] >= 1  # the long prompt at least, wherever it was drawn
    assert manifest["rows_out"] + sum(manifest["rejected"].values()) == manifest["attempts"]

    # A context too small for the request with a single empty shot: one clear line, nothing generated.
    small = tmp_path / "small"
    shutil.copytree(run / "M0", small / "M0")
    RecordingBackend.context_length, RecordingBackend.requests = 60, []
    monkeypatch.setattr(sys, "argv", [*argv[:2], str(small), *argv[3:]])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(repo / "scripts" / "01_gen_prompts.py"), run_name="__main__")
    assert stopped.value.code == 2 and RecordingBackend.requests == []
    assert "the prompt-generation request alone is longer than the 36 prompt tokens" in capsys.readouterr().err
