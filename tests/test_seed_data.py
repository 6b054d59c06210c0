from collections import Counter, defaultdict
from pathlib import Path

from selfreward.judge.rubric import parse_judge_score
from selfreward.run.metrics import spearman
from selfreward.run.records import EFT, IFT, read_jsonl

SEED = Path(__file__).resolve().parents[1] / "data" / "seed"


def test_ift_rows():
    rows = read_jsonl(SEED / "ift.jsonl", IFT, id_field="id")
    assert len(rows) >= 200
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_eft_rows_are_enough_to_learn_from_and_to_measure_with():
    rows = read_jsonl(SEED / "eft.jsonl", EFT, id_field="id")
    for row in rows:
        assert row["justification"].endswith(f"\nScore: {row['score']}"), row["id"]
        assert parse_judge_score(row["justification"]) == row["score"], row["id"]
    questions: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        questions[row["prompt"]].append(row)
    assert len(questions) >= 100 and all(len(answers) == 4 for answers in questions.values())
    counts = Counter(r["score"] for r in rows)
    assert all(counts[s] >= 0.10 * len(rows) for s in range(6)), counts
    # Length must not give the grade away: across all rows it explains little, and in many questions
    # a longer answer is graded below a shorter one.
    assert spearman([len(r["response"]) for r in rows], [r["score"] for r in rows]) < 0.35
    longer_but_worse = sum(
        any(len(a["response"]) > len(b["response"]) and a["score"] < b["score"] for a in answers for b in answers)
        for answers in questions.values()
    )
    assert longer_but_worse >= 0.5 * len(questions)
    # the held-out questions of the default config give at least 150 scored pairs to measure with
    from selfreward.loop.evaluation import split_heldout
    from selfreward.run.config import Config
    from selfreward.run.metrics import pairwise_agreement

    config = Config()
    held = split_heldout([], rows, 0, config.data.heldout_eft_questions, config.seed)[3]
    assert len({r["prompt"] for r in held}) >= 25
    assert pairwise_agreement([r["prompt"] for r in held], [r["score"] for r in held], [0.0] * len(held))[1] >= 150


def test_fallback_chat_template(tiny_model):
    """A tokenizer without a chat template gets the packaged fallback, which ends turns with EOS."""
    from transformers import AutoTokenizer

    from selfreward.model.chat import ChatFormat, ensure_chat_template

    _, _, path = tiny_model
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    chat = ChatFormat.from_tokenizer(tokenizer)
    assert chat.end_of_turn == tokenizer.eos_token
    assert chat.prompt("Hi").endswith("<|assistant|>\n")
    assert chat.tokenizer.eos_token_id in chat.stop_token_ids()
