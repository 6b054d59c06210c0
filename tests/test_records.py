import pytest

from selfreward.run.records import IFT, SCORE, RecordError, read_jsonl, write_jsonl


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "ift.jsonl", '{"id": "a", "prompt": "p", "completion": "c"}\n{"id": "b", "prompt": \n')
    with pytest.raises(RecordError, match=r"ift.jsonl:2: not valid JSON"):
        read_jsonl(path, IFT)


def test_missing_and_mistyped_fields(tmp_path):
    path = write(tmp_path / "ift.jsonl", '{"id": "a", "prompt": "p"}\n')
    with pytest.raises(RecordError, match=r"ift.jsonl:1: missing field 'completion'"):
        read_jsonl(path, IFT)
    path = write(tmp_path / "ift.jsonl", '{"id": "a", "prompt": 3, "completion": "c"}\n')
    with pytest.raises(RecordError, match=r"ift.jsonl:1: field 'prompt' should be a string"):
        read_jsonl(path, IFT)


def test_duplicate_ids(tmp_path):
    row = '{"id": "a", "prompt": "p", "completion": "c"}\n'
    path = write(tmp_path / "ift.jsonl", row + row)
    with pytest.raises(RecordError, match=r"ift.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        read_jsonl(path, IFT, id_field="id")


def test_null_score_is_allowed_where_the_schema_says_so(tmp_path):
    row = {
        "prompt_id": "p",
        "response_id": "p-r0",
        "prompt": "q",
        "response": "r",
        "sample_index": 0,
        "finish_reason": "eos",
        "num_tokens": 3,
        "prompt_truncated": False,
        "judge_input_truncated": False,
        "score": None,
        "judgments": [],
    }
    write_jsonl(tmp_path / "scores.jsonl", [row])
    assert read_jsonl(tmp_path / "scores.jsonl", SCORE) == [row]


def test_unicode_round_trips(tmp_path):
    rows = [{"id": "u", "prompt": "émoji 🙂, עברית, e\u0301, tab\t", "completion": "NUL \x00 ok"}]
    write_jsonl(tmp_path / "u.jsonl", rows)
    assert read_jsonl(tmp_path / "u.jsonl", IFT) == rows
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away
