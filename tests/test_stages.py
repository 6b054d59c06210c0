"""The one table of stages (selfreward/run/stages.py) and the command the driver reads it with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from selfreward.run.stages import STAGES, iteration_stages, training_stages

REPO = Path(__file__).resolve().parents[1]


def test_every_numbered_script_is_a_stage_of_the_table_and_every_stage_has_its_script():
    scripts = {p.stem for p in (REPO / "scripts").glob("[0-9][0-9]_*.py")}
    assert scripts == {s.name for s in STAGES}


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("srlm", "01_gen_prompts 02_gen_responses 03_gen_scores 04_gen_preferences 05_dpo 06_eval"),
        ("spin", "01_sft_prompts 02_gen_responses 04_spin_pairs 05_dpo 06_eval"),
        ("raft", "01_sft_prompts 02_gen_responses 03_gen_scores 04_raft_select 05_raft_sft 06_eval"),
    ],
)
def test_the_driver_gets_each_algorithms_iteration_from_the_table(algorithm, expected, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"algorithm: {algorithm}\n")
    for args in (["--algorithm", algorithm], ["--config", str(config)]):
        printed = subprocess.run(
            [sys.executable, "-m", "selfreward.run.stages", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        assert printed.split() == expected.split() == list(iteration_stages(algorithm))


def test_the_stages_that_train_are_those_torchrun_takes_and_a_bad_config_is_refused(tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "selfreward.run.stages", "--training"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.split() == list(training_stages()) == ["00_sft", "05_dpo", "05_raft_sft"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: ppo\n")
    refused = subprocess.run(
        [sys.executable, "-m", "selfreward.run.stages", "--config", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "algorithm" in refused.stderr and "Traceback" not in refused.stderr


def test_a_key_added_later_changes_a_stages_fingerprint_only_once_it_is_set(monkeypatch):
    """A run made before a key existed must stay finished: the key enters the fingerprint only when set."""
    import dataclasses

    from selfreward.run import stages
    from selfreward.run.config import Config, apply_overrides

    before = stages.fingerprinted_config("06_eval", Config())
    later = (*stages.spec("06_eval").when_set, "eval.max_new_tokens")
    monkeypatch.setitem(stages.SPECS, "06_eval", dataclasses.replace(stages.spec("06_eval"), when_set=later))
    at_default = stages.fingerprinted_config("06_eval", Config())
    assert "max_new_tokens" not in at_default["eval"] and "batch_size" in at_default["eval"]
    assert "gate" not in at_default["judge"]  # never fingerprinted
    changed = stages.fingerprinted_config("06_eval", apply_overrides(Config(), {"eval.max_new_tokens": 7}, "test"))
    assert changed["eval"]["max_new_tokens"] == 7 and changed != at_default
    assert {**at_default["eval"], "max_new_tokens": 128} == before["eval"]


def test_eval_benchmark_at_its_default_leaves_stage_06_finished():
    """eval.benchmark came after runs were made: unset, stage 06's fingerprint does not see it."""
    from selfreward.run import stages
    from selfreward.run.config import Config, apply_overrides

    assert "benchmark" not in stages.fingerprinted_config("06_eval", Config())["eval"]
    set_ = stages.fingerprinted_config("06_eval", apply_overrides(Config(), {"eval.benchmark": "b.jsonl"}, "test"))
    assert set_["eval"]["benchmark"] == "b.jsonl"
