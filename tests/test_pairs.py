from selfreward.pairs import build_pairs


def scored(prompt_id, *scores, texts=None):
    texts = texts or [f"answer {i}" for i in range(len(scores))]
    return [
        {"prompt_id": prompt_id, "prompt": f"question {prompt_id}", "response": text, "sample_index": i, "score": score}
        for i, (score, text) in enumerate(zip(scores, texts, strict=True))
    ]


def test_best_against_worst():
    pairs, dropped = build_pairs(scored("a", 3.0, 4.5, 1.0, 2.0))
    assert pairs == [
        {
            "prompt_id": "a",
            "prompt": "question a",
            "chosen": "answer 1",
            "rejected": "answer 2",
            "score_chosen": 4.5,
            "score_rejected": 1.0,
        }
    ]
    assert not dropped


def test_ties_are_dropped():
    pairs, dropped = build_pairs(scored("a", 3.0, 3.0, 3.0, 3.0))
    assert pairs == [] and dropped["tie"] == 1


def test_nulls_never_take_part():
    pairs, _ = build_pairs(scored("a", None, 2.0, None, 4.0))
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("answer 3", "answer 1")
    pairs, dropped = build_pairs(scored("b", None, 2.0, None, None))
    assert pairs == [] and dropped["fewer_than_two_scored"] == 1
    # a null is never turned into a low score that becomes the rejected answer
    pairs, dropped = build_pairs(scored("c", None, 3.0, 3.0, None))
    assert pairs == [] and dropped["tie"] == 1


def test_margin():
    pairs, dropped = build_pairs(scored("a", 3.0, 3.5), min_margin=1.0)
    assert pairs == [] and dropped["below_margin"] == 1
    pairs, _ = build_pairs(scored("a", 3.0, 4.0), min_margin=1.0)
    assert len(pairs) == 1


def test_identical_texts_are_dropped():
    pairs, dropped = build_pairs(scored("a", 1.0, 5.0, texts=["Same answer.", "Same answer. "]))
    assert pairs == [] and dropped["identical_text"] == 1


def test_one_pair_per_prompt():
    rows = scored("a", 1.0, 2.0) + scored("b", 5.0, 0.0) + scored("c", 2.0, 2.0)
    pairs, dropped = build_pairs(rows)
    assert [p["prompt_id"] for p in pairs] == ["a", "b"]
    assert dropped["tie"] == 1
