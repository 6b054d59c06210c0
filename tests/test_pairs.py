from selfreward.loop.pairs import build_pairs


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


def test_length_control_chooses_the_shortest_near_best_answer():
    rows = scored("a", 4.5, 4.4, 1.0, 4.0, texts=["a long and thorough answer", "short one", "wrong", "tiny"])
    pairs, _ = build_pairs(rows, length_tolerance=0.25)
    assert pairs[0]["chosen"] == "short one" and pairs[0]["rejected"] == "wrong"  # 4.4 is within 0.25 of 4.5
    assert pairs[0]["score_chosen"] == 4.4 and pairs[0]["chosen_by_length"] is True
    pairs, _ = build_pairs(rows, length_tolerance=0.0)
    assert pairs[0]["chosen"] == "a long and thorough answer" and pairs[0]["chosen_by_length"] is False
    assert "chosen_by_length" not in build_pairs(rows)[0][0]  # off: the records are as before
    # the rejected answer is never chosen, even when it is the shortest within the tolerance
    pairs, _ = build_pairs(scored("b", 3.0, 2.9, texts=["longer answer", "no"]), length_tolerance=0.5)
    assert pairs[0]["chosen"] == "longer answer" and pairs[0]["rejected"] == "no"


def test_stage_04_with_length_control(tiny_run, tmp_path, run_stage):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    run_stage("04_gen_preferences", "--run-dir", str(run), "--iteration", "1", "--no-oxen",
              "--preferences.length_control", "true", "--preferences.length_tolerance", "5")  # fmt: skip
    generated = run / "M0" / "generated"
    pairs = [json.loads(line) for line in (generated / "preferences.jsonl").read_text().splitlines()]
    manifest = json.loads((generated / "preferences.manifest.json").read_text())
    assert pairs and manifest["shorter_chosen"] == sum(p["chosen_by_length"] for p in pairs)
    scores = [json.loads(line) for line in (generated / "scores.jsonl").read_text().splitlines()]
    for pair in pairs:  # a tolerance of the whole scale: chosen is the shortest answer but the rejected one
        others = [s["response"] for s in scores if s["prompt_id"] == pair["prompt_id"] and s["score"] is not None
                  and s["response"] != pair["rejected"]]  # fmt: skip
        assert len(pair["chosen"]) == min(len(t) for t in others)
