import json
import random
import shutil

from selfreward.layout import RunLayout
from selfreward.prompt_gen import PromptFilter, extract_new_task, fewshot_request, is_cut_off, pick_shots

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
