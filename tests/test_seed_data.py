from collections import Counter
from pathlib import Path

from selfreward.judge import parse_judge_score
from selfreward.records import EFT, IFT, read_jsonl

SEED = Path(__file__).resolve().parents[1] / "data" / "seed"


def test_ift_rows():
    rows = read_jsonl(SEED / "ift.jsonl", IFT, id_field="id")
    assert len(rows) >= 60
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_eft_rows_cover_every_score_and_end_in_their_score_line():
    rows = read_jsonl(SEED / "eft.jsonl", EFT, id_field="id")
    assert len(rows) >= 40
    assert set(Counter(r["score"] for r in rows)) == {0, 1, 2, 3, 4, 5}
    for row in rows:
        assert row["justification"].endswith(f"\nScore: {row['score']}"), row["id"]
        assert parse_judge_score(row["justification"]) == row["score"], row["id"]


def test_fallback_chat_template(tiny_model):
    """A tokenizer without a chat template gets the packaged fallback, which ends turns with EOS."""
    from transformers import AutoTokenizer

    from selfreward.chat import ChatFormat, ensure_chat_template

    _, _, path = tiny_model
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    chat = ChatFormat.from_tokenizer(tokenizer)
    assert chat.end_of_turn == tokenizer.eos_token
    assert chat.prompt("Hi").endswith("<|assistant|>\n")
    assert chat.tokenizer.eos_token_id in chat.stop_token_ids()
