"""Bad input gets one clear line naming file, line and field, a non-zero exit, and no half-written output.

Each test here is a row of the table in docs/bad-input.md.
"""

import json
import shutil

import pytest

from selfreward.run.layout import RunLayout
from selfreward.run.records import RESPONSE, read_jsonl, write_jsonl


@pytest.fixture
def run(tiny_run, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy)
    return copy


def stage02(run_stage, run, *extra):
    return run_stage("02_gen_responses", "--run-dir", str(run), "--iteration", "1", "--no-oxen", *extra, check=False)


def assert_clean_failure(proc, *phrases):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-2000:]


def test_malformed_line_stops_before_writing(run, run_stage):
    layout = RunLayout(run)
    prompts = layout.generated(1, "prompts")
    before = layout.generated(1, "responses").read_bytes()
    lines = prompts.read_text().splitlines()
    lines[1] = lines[1][:-5]  # a line cut short
    prompts.write_text("\n".join(lines) + "\n")
    assert_clean_failure(stage02(run_stage, run), f"{prompts}:2: not valid JSON")
    assert layout.generated(1, "responses").read_bytes() == before


def test_empty_input_file(run, run_stage):
    layout = RunLayout(run)
    layout.generated(1, "prompts").write_text("")
    assert_clean_failure(stage02(run_stage, run), "has no prompts")


def test_missing_or_mistyped_field(run, run_stage):
    layout = RunLayout(run)
    path = layout.generated(1, "responses")
    rows = read_jsonl(path)
    del rows[2]["response"]
    write_jsonl(path, rows)
    proc = run_stage("03_gen_scores", "--run-dir", str(run), "--iteration", "1", "--no-oxen", check=False)
    assert_clean_failure(proc, f"{path}:3: missing field 'response'")
    rows[2]["response"] = 42
    write_jsonl(path, rows)
    proc = run_stage("03_gen_scores", "--run-dir", str(run), "--iteration", "1", "--no-oxen", check=False)
    assert_clean_failure(proc, f"{path}:3: field 'response' should be a string, got 42")


def test_duplicate_ids(run, run_stage):
    path = RunLayout(run).generated(1, "prompts")
    rows = read_jsonl(path)
    write_jsonl(path, rows + rows[:1])
    assert_clean_failure(stage02(run_stage, run), f"duplicate prompt_id '{rows[0]['prompt_id']}'")


def test_unicode_of_every_kind_goes_through(run, run_stage):
    texts = ["Explain 🙂 and 👩🏽‍🚀 emoji.", "מה השעה? ما الوقت؟", "Cafe\u0301 and n\u0303o", "tab\tbell\x07 esc\x1b",
             "NUL \x00 inside", "\u202eRTL override\u202c and zero\u200bwidth"]  # fmt: skip
    path = RunLayout(run).generated(1, "prompts")
    write_jsonl(
        path, [{"prompt_id": f"u{i}", "prompt": t, "source": "test", "iteration": 1} for i, t in enumerate(texts)]
    )
    stage02(run_stage, run, "--responses.max_new_tokens", "4")
    rows = read_jsonl(RunLayout(run).generated(1, "responses"), RESPONSE, id_field="response_id")
    assert [r["prompt"] for r in rows[::4]] == texts  # every prompt back exactly, NUL and all
    assert all(isinstance(r["response"], str) for r in rows)


def test_prompt_longer_than_the_context_is_cut_and_flagged(run, run_stage):
    path = RunLayout(run).generated(1, "prompts")
    long_prompt = "Please summarise the following text. " + "lorem ipsum dolor sit amet " * 60
    write_jsonl(path, [{"prompt_id": "long", "prompt": long_prompt, "source": "test", "iteration": 1},
                       {"prompt_id": "short", "prompt": "Hi!", "source": "test", "iteration": 1}])  # fmt: skip
    proc = stage02(run_stage, run, "--model.max_prompt_tokens", "60", "--responses.max_new_tokens", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 prompts were longer than 60 tokens and were cut" in proc.stderr
    rows = read_jsonl(RunLayout(run).generated(1, "responses"))
    assert {r["prompt_id"]: r["prompt_truncated"] for r in rows} == {"long": True, "short": False}
    assert rows[0]["prompt"] == long_prompt  # the record keeps the full prompt; only the model saw less


def test_zero_pairs_stops_the_driver_and_says_why(run, cache):
    from conftest import run_driver

    proc = run_driver(run, cache, extra=["--", "--no-oxen", "--preferences.min_margin", "100"])
    assert proc.returncode == 3
    assert "stopped at 05_dpo --iteration 1: no preference pairs" in proc.stderr
    assert "below_margin" in proc.stderr
    manifest = json.loads(RunLayout(run).manifest("04_gen_preferences", 1).read_text())
    assert manifest["rows_out"] == 0 and manifest["dropped"]["below_margin"] == manifest["prompts"]


def test_missing_model_paths(run, run_stage, tmp_path):
    proc = run_stage("00_sft", "--run-dir", str(tmp_path / "new"), "--config", "configs/tiny.yaml",
                     "--model.name_or_path", "/nonexistent/base-model", check=False)  # fmt: skip
    assert_clean_failure(proc, "model not found: /nonexistent/base-model")
    shutil.rmtree(RunLayout(run).model(0))
    assert_clean_failure(stage02(run_stage, run), "model not found", "M0/model")
