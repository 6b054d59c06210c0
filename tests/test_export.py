"""python -m selfreward.tools.export on the tiny run: a loadable folder, a model card, the Hub call."""

import json
from pathlib import Path

import pytest

from selfreward.tools import export


def test_export_writes_a_loadable_model_with_its_card(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m2"
    assert export.main(["--run-dir", str(tiny_run), "--model", "M2", "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.chat_template  # the template every stage used travels with the model
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=2, min_new_tokens=2).shape[1] == ids.shape[1] + 2
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| M2 | 05_dpo |" in card and "| M1 | 05_dpo |" in card and "| M0 | 00_sft |" in card
    quality = json.loads((out / "eval.json").read_text())["judge_quality"]["M2"]
    low, high = quality["intervals"]["pairwise_accuracy"]
    # the same judge-quality table as report.md: pairs, then each figure with its interval
    assert f"| M2 | {quality['pairs']} | {quality['pairwise_accuracy']:.3g} ({low:.2f}–{high:.2f}) |" in card
    assert "| M2 vs M1 |" in card and "seed: 7" in card  # head-to-head and the tiny config
    assert json.loads((out / "lineage.json").read_text())["model"] == "M2"


def test_export_pushes_the_folder_to_the_hub(tiny_run, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "m1"
    args = ["--run-dir", str(tiny_run), "--model", "M1", "--out", str(out), "--push-to-hub", "me/m1", "--private"]
    assert export.main(args) == 0
    assert [c[:2] for c in calls] == [("create_repo", "me/m1"), ("upload_folder", "me/m1")]
    assert calls[0][2]["private"] is True and calls[1][2]["folder_path"] == str(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "M9"], "no merged model there"),
        (["--model", "latest"], "--model must name a model of the run"),
    ],
)
def test_export_refuses_clearly(tiny_run, tmp_path, capsys, args, message):
    assert export.main(["--run-dir", str(tiny_run), "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err


def test_export_does_not_overwrite_without_force(tiny_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert export.main(["--run-dir", str(tiny_run), "--model", "M0", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert export.main(["--run-dir", str(tiny_run), "--model", "M0", "--out", str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()


def test_chat_with_two_models_of_a_run(tiny_run, cache):
    import subprocess
    import sys

    from conftest import REPO, stage_env

    proc = subprocess.run(
        [sys.executable, "-m", "selfreward.tools.chat", "--run-dir", str(tiny_run), "--compare", "M0", "M2",
         "--max-new-tokens", "4"],
        input="Name a fruit.\nCount to three.\n\n", cwd=REPO, env=stage_env(cache), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = [line[:2] for line in proc.stdout.splitlines() if line.startswith(("M0> ", "M2> "))]
    assert labels == ["M0", "M2", "M0", "M2"]  # both models answer each question, in order


@pytest.mark.parametrize("mode", ["piped questions", "a terminal, models too large to share memory"])
def test_chat_compare_holds_one_model_at_a_time(tiny_run, monkeypatch, capsys, mode, live_models_at_load):
    # Two 7B models do not share a 24 GB card: --compare must let one go before the next loads.
    import io
    import sys

    from selfreward.tools import chat

    alive_at_load = live_models_at_load
    questions = io.StringIO("Name a fruit.\nCount to three.\n\n")
    if mode.startswith("a terminal"):
        monkeypatch.setattr(questions, "isatty", lambda: True)
        monkeypatch.setattr(chat, "_fit_together", lambda folders, config: False)
    monkeypatch.setattr(sys, "stdin", questions)
    code = chat.main(["--run-dir", str(tiny_run), "--compare", "M0", "M2", "--max-new-tokens", "3"])
    assert code == 0
    labels = [
        line[:2] for line in capsys.readouterr().out.replace("you> ", "").splitlines() if line[:3] in ("M0>", "M2>")
    ]
    assert labels == ["M0", "M2", "M0", "M2"]
    assert alive_at_load and set(alive_at_load) == {0}  # none alive when the next one loads
    assert len(alive_at_load) == (2 if mode.startswith("piped") else 4)  # piped: each model loads once


def test_chat_fits_a_long_question_to_the_context(tiny_model, monkeypatch):
    # vLLM fails a call whose prompt passes max_model_len: a long pasted question must be cut, as stage 06 cuts.
    from selfreward.model import backends
    from selfreward.model.generation import Generation, Sampling
    from selfreward.run.config import load_config
    from selfreward.tools import chat as chat_tool

    _, chat, path = tiny_model
    asked = []

    class ShortContextBackend:
        context_length = 64

        def __init__(self):
            self.chat = chat

        def generate(self, prompts, sampling, *, seed, **kwargs):
            asked.extend(prompts)
            return [[Generation("ok", "eos", 1)] for _ in prompts]

        def close(self):
            pass

    monkeypatch.setattr(backends, "load_backend", lambda *args: ShortContextBackend())
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    sampling = Sampling(1, 0.0, 1.0, 8, 8)
    answers = chat_tool._answer_in_turn({"M0": path}, ["Summarise: " + "word " * 200], config, sampling)
    assert answers == {"M0": ["ok"]}
    assert len(chat.encode(asked[0])) <= 64 - 8 and "Summarise" in asked[0]


def test_chat_cuts_a_question_too_long_for_the_context(cache):
    # A pasted document longer than generation.max_model_len: vLLM refuses the whole call, so the chat
    # cuts the question as the stages do, leaving room for the answer.
    from conftest import REPO

    from selfreward.model.generation import Sampling
    from selfreward.model.models import TINY, resolve_model_path
    from selfreward.run.config import load_config
    from selfreward.tools import chat

    config = load_config(REPO / "configs" / "tiny.yaml", {"generation.max_model_len": 128})
    answers = chat._answer_in_turn(
        {"M0": resolve_model_path(TINY)}, ["Hi.", "word " * 500], config, Sampling(1, 0.0, 1.0, 8, 8)
    )
    assert len(answers["M0"]) == 2
