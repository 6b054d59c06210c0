"""scripts/prepare_data.py: Open Assistant's message table into IFT and EFT rows, the paper's way."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from selfreward.loop import oasst
from selfreward.run.records import EFT, IFT, RecordError, read_jsonl

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "oasst_messages.jsonl"


def test_every_filter_on_the_fixture():
    messages = oasst.read_messages(FIXTURE)
    conversations, removed = oasst.first_turns(messages)
    assert dict(removed) == {
        "deleted": 2,  # a reply (a1d) and an opening prompt (p6)
        "failed_review": 1,  # a4a
        "synthetic": 1,  # a7b
        "not_en": 2,  # the German tree
        "missing_parent": 1,  # a5: its parent is not in the table
        "parent_removed": 1,  # a6a: its prompt was deleted
        "later_turn": 2,  # the second turn under a1a
    }
    assert [c["prompt_id"] for c in conversations] == ["p1", "p10", "p2", "p4", "p7", "p9"]
    ift, skipped = oasst.ift_rows(conversations)
    completions = {r["id"]: r["completion"] for r in ift}
    assert set(completions) == {"oasst-p1", "oasst-p10", "oasst-p2", "oasst-p7", "oasst-p9"}
    assert completions["oasst-p2"].endswith("7 is prime.")  # two rank-0 replies: the smaller message id
    assert completions["oasst-p1"].startswith("(quality 5) Lower the egg")  # the reply ranked first
    assert dict(skipped) == {"no_rank_0_reply": 1, "rank_0_tie": 1}  # p4's rank-0 reply failed review
    candidates = oasst.eft_candidates(conversations)
    assert [c["prompt_id"] for c in candidates] == ["p1", "p10", "p2", "p4", "p9"]  # p7: one ranked reply left
    assert [r["message_id"] for r in candidates[3]["replies"]] == ["a4c", "a4d"]  # the unranked a4b is not used


@pytest.mark.parametrize(
    ("ranks", "scores", "agrees"),
    [
        ([0, 1, 2], [5, 3, 1], True),
        ([0, 1, 2], [5, 1, 3], False),
        ([0, 0, 1], [4, 4.5, 2], True),  # equal human ranks may be judged either way
        ([0, 1], [3, 3], False),  # a tie is not the humans' order
        ([0, 1], [4, None], False),  # an unscored reply
    ],
)
def test_a_judge_agrees_only_when_it_orders_every_pair_as_humans_did(ranks, scores, agrees):
    assert oasst.ranking_agrees(ranks, scores) is agrees


def test_a_malformed_message_names_the_file_line_and_field(tmp_path):
    rows = FIXTURE.read_text().splitlines()
    broken = json.loads(rows[3])
    del broken["role"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows[:3] + [json.dumps(broken)] + rows[4:]) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:4: missing field 'role'"):
        oasst.read_messages(bad)
    broken["role"] = "moderator"
    bad.write_text("\n".join(rows[:3] + [json.dumps(broken)] + rows[4:]) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:4: field 'role' must be prompter or assistant"):
        oasst.read_messages(bad)


def test_gzip_and_parquet_exports_read_like_jsonl(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = oasst.read_messages(FIXTURE)
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(FIXTURE.read_bytes()))
    pq.write_table(pa.Table.from_pylist(plain), tmp_path / "m.parquet")
    for name in ("m.jsonl.gz", "m.parquet"):
        assert oasst.first_turns(oasst.read_messages(tmp_path / name)) == oasst.first_turns(plain)


class _QualityJudge:
    """A judge that reads the "(quality N)" the fixture writes into each reply: it agrees with the
    human ranking everywhere except tree t4, where the fixture's qualities contradict it."""

    context_length = 100_000

    def __init__(self, chat):
        self.chat = chat

    judged: list[int] = []  # indices of the prompts judged, across instances
    fail_after_batches: int | None = None

    def generate(self, prompts, sampling, *, seed, desc="", skip=(), on_batch=None):
        from selfreward.model.generation import Generation

        rows = [None] * len(prompts)
        for batch, start in enumerate(range(0, len(prompts), 4)):  # batches of 4 prompts, logged one by one
            if batch in skip:
                continue
            if self.fail_after_batches is not None and batch >= self.fail_after_batches:
                raise KeyboardInterrupt("killed")
            idx = list(range(start, min(start + 4, len(prompts))))
            for i in idx:
                quality = re.search(r"\(quality (\d)\)", prompts[i]).group(1)
                rows[i] = [Generation(f"The reply is judged.\nScore: {quality}", "eos", 8)] * sampling.num_samples
                type(self).judged.append(i)
            if on_batch:
                on_batch(batch, idx, [rows[i] for i in idx])
        return rows

    def close(self):
        pass


def test_prepare_data_writes_files_the_loop_accepts(tmp_path, monkeypatch, run_stage):
    from selfreward.model import backends
    from selfreward.model.chat import ChatFormat
    from selfreward.model.models import load_tokenizer

    loaded = []

    def fake_backend(model_dir, model_cfg, gen_cfg):
        loaded.append(Path(model_dir))
        return _QualityJudge(ChatFormat.from_tokenizer(load_tokenizer(model_dir, model_cfg)))

    monkeypatch.setattr(backends, "load_backend", fake_backend)
    monkeypatch.setattr(_QualityJudge, "judged", [])
    out = tmp_path / "oasst"
    config = str(REPO / "configs" / "tiny.yaml")
    argv = ["prepare_data.py", "--source", str(FIXTURE), "--config", config, "--out", str(out), "--no-oxen",
            "--eval-fraction", "0.5"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), run_name="__main__")

    assert loaded == [out / "sft-baseline" / "model"]  # the judge is the SFT baseline trained on the new IFT rows
    assert (out / "sft-baseline" / "model" / "config.json").is_file()
    ift = read_jsonl(out / "ift.jsonl", IFT, id_field="id")
    train = read_jsonl(out / "eft.jsonl", EFT, id_field="id")
    held = read_jsonl(out / "eft_eval.jsonl", EFT, id_field="id")
    assert len(ift) == 5
    eft = train + held
    assert {r["prompt"] for r in eft} == {
        "How do I boil an egg so the yolk stays soft?",
        "Name a prime number.",
        "What is the capital of France?",
        "How many legs does a spider have?",
    }  # fmt: skip  (the photosynthesis question is dropped: the judge ranked its replies the other way)
    assert len(eft) == 10 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # split by question
    assert all(r["justification"].endswith(f"Score: {r['score']}") for r in eft)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eft_dropped_prompts"] == {"judge_disagrees_with_humans": 1}
    assert manifest["judgments"] == manifest["judgments_with_a_score"] == 12 * 3
    assert manifest["removed_messages"]["later_turn"] == 2 and manifest["ift_rows"] == 5
    assert manifest["eft_rows"] + manifest["eft_eval_rows"] == 10

    # The loop takes the files through data.ift / data.eft as they are.
    run = tmp_path / "run"
    data = ["--data.ift", str(out / "ift.jsonl"), "--data.eft", str(out / "eft.jsonl"), "--no-oxen"]
    run_stage(
        "00_sft", "--run-dir", str(run), "--config", config, *data, "--data.heldout_eft", str(out / "eft_eval.jsonl")
    )
    assert json.loads((run / "M0" / "00_sft.manifest.json").read_text())["complete"]
    # the eval split is the held-out set stages 03 and 06 measure the judge on; the train split is all trained on
    assert read_jsonl(run / "M0" / "train" / "heldout_eft.jsonl") == held
    assert read_jsonl(run / "M0" / "train" / "eft.jsonl") == train
    overlap = run_stage("00_sft", "--run-dir", str(tmp_path / "run2"), "--config", config, *data,
                        "--data.heldout_eft", str(out / "eft.jsonl"), check=False)  # fmt: skip
    assert overlap.returncode == 2 and "the judge would be measured on questions it was trained on" in overlap.stderr

    # A rerun with the baseline in place trains nothing again and writes the same files.
    before = {n: (out / n).read_bytes() for n in ("ift.jsonl", "eft.jsonl", "eft_eval.jsonl")}
    weights = out / "sft-baseline" / "model" / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), run_name="__main__")
    assert {n: (out / n).read_bytes() for n in before} == before
    assert weights.stat().st_mtime_ns == trained_at

    # Killed after the first batch of judgments, a rerun judges only the rest.
    for name in before:
        (out / name).unlink()
    monkeypatch.setattr(_QualityJudge, "judged", [])
    monkeypatch.setattr(_QualityJudge, "fail_after_batches", 1)
    with pytest.raises(KeyboardInterrupt):
        runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), run_name="__main__")
    assert _QualityJudge.judged == [0, 1, 2, 3]
    monkeypatch.setattr(_QualityJudge, "fail_after_batches", None)
    runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), run_name="__main__")
    assert _QualityJudge.judged == list(range(12))  # 12 replies in all, each judged once over the two runs
    assert {n: (out / n).read_bytes() for n in before} == before


def test_prepare_data_dry_runs_the_whole_data_path_on_this_cpu(tmp_path, cache):
    """The OASST profile's data came only from a GPU run of this script, so nothing of it could be checked
    before renting one. --dry-run: the config's model stood in for on the CPU, a built-in Open Assistant
    table, the filters, the SFT baseline with the config's settings, the judging, the EFT rows, in --out."""
    import subprocess

    from conftest import stage_env

    out = tmp_path / "oasst"
    config = str(REPO / "configs" / "mistral-7b-qlora-oasst.yaml")
    dry = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--dry-run", "--config", config, "--no-oxen"]
    command = [*dry, "--out", str(out), "--eval-fraction", "0.5", "--max-prompts", "2"]
    proc = subprocess.run(command, cwd=tmp_path, env=stage_env(cache), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mistralai/Mistral-7B-v0.1 replaced by a tiny random model" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dry_run"]["stands_in_for"] == "mistralai/Mistral-7B-v0.1"
    assert set(manifest["removed_messages"]) >= {"deleted", "failed_review", "synthetic", "not_en", "later_turn"}
    assert manifest["eft_candidate_prompts"] > 0 and manifest["judgments"] > 0
    baseline = json.loads((out / "sft-baseline" / "model" / "config.json").read_text())
    assert baseline["model_type"] == "mistral" and "quantization_config" not in baseline
    ift = read_jsonl(out / "ift.jsonl", IFT, id_field="id")
    eft = read_jsonl(out / "eft.jsonl", EFT, id_field="id") + read_jsonl(out / "eft_eval.jsonl", EFT, id_field="id")
    assert len(ift) == manifest["ift_rows"] > 0
    assert len(eft) == manifest["eft_rows"] + manifest["eft_eval_rows"] > 0  # the EFT row path ran too
    assert all(r["justification"].endswith(f"Score: {r['score']}") for r in eft)

    # What a random stand-in judged is never taken for the real data: a real stage 00 refuses it.
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "00_sft.py"), "--run-dir", str(tmp_path / "run"), "--config",
         str(REPO / "configs" / "tiny.yaml"), "--data.ift", str(out / "ift.jsonl"), "--no-oxen"],
        cwd=tmp_path, env=stage_env(cache), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "prepare_data.py --dry-run" in run.stderr

    real = tmp_path / "real"  # nor does a dry run write over data a real run prepared
    real.mkdir()
    (real / "manifest.json").write_text("{}")
    refused = subprocess.run(
        [*dry, "--out", str(real)], cwd=tmp_path, env=stage_env(cache), capture_output=True, text=True
    )
    assert refused.returncode == 2 and "holds prepared data" in refused.stderr
