"""Stage 06's measurements on hand-made data with known answers, and the stage itself on the tiny run."""

import json
import shutil

import pytest

from selfreward.judge.judges import judge_quality
from selfreward.loop.evaluation import drift, off_topic_rows, split_heldout
from selfreward.run.layout import RunLayout
from selfreward.run.metrics import head_to_head, head_to_head_by_scores


def test_heldout_split_is_disjoint_stable_and_keeps_questions_together():
    ift = [{"id": f"i{k}", "prompt": f"p{k}", "completion": "c"} for k in range(20)]
    eft = [{"id": f"e{q}{a}", "prompt": f"q{q}", "response": "r", "score": a, "justification": ""}
           for q in range(6) for a in range(4)]  # fmt: skip
    train_ift, train_eft, held_ift, held_eft = split_heldout(ift, eft, 5, 2, seed=1)
    assert len(held_ift) == 5 and len(train_ift) == 15
    assert not {r["id"] for r in held_ift} & {r["id"] for r in train_ift}
    assert len({r["prompt"] for r in held_eft}) == 2 and len(held_eft) == 8  # all 4 answers of each question
    assert not {r["prompt"] for r in held_eft} & {r["prompt"] for r in train_eft}
    again = split_heldout(ift[::-1], eft[::-1], 5, 2, seed=1)  # the files' order does not matter
    assert {r["id"] for r in again[2]} == {r["id"] for r in held_ift}
    assert split_heldout(ift, eft, 99, 99, seed=1)[0]  # something is always left to train on


def test_off_topic_rows_give_good_answers_to_other_questions():
    eft = [{"id": f"e{q}{a}", "prompt": f"q{q}", "response": f"answer {a} to q{q}", "score": a + 2,
            "justification": ""} for q in range(5) for a in range(4)]  # fmt: skip
    rows = off_topic_rows(eft, 12, seed=3)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    by_id = {r["id"]: r for r in eft}
    for row in rows:
        source = row["origin"].split("the answer of ")[1].split(" ")[0]
        assert row["response"] == by_id[source]["response"] and by_id[source]["score"] >= 4
        assert row["prompt"] != by_id[source]["prompt"]  # a good answer, but to another question
        assert row["score"] == 0 and row["justification"].endswith("Score: 0")
    assert len({(r["prompt"], r["response"]) for r in rows}) == 12  # no pair twice
    assert len({r["prompt"] for r in rows}) == 5  # spread over every question
    assert off_topic_rows(eft[::-1], 12, seed=3) == rows  # the files' order does not matter
    assert len(off_topic_rows(eft, 999, seed=3)) == 5 * 4 * 2  # every good answer to every other question
    assert off_topic_rows(eft, 0, seed=3) == []


def test_sft_adds_constructed_rows_from_training_questions_only(tiny_run):
    layout = RunLayout(tiny_run)
    rows = [json.loads(line) for line in (layout.train_dir(0) / "eft_constructed.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["origin"].startswith("constructed: off-topic") for r in rows)
    held = [json.loads(line) for line in layout.heldout("eft").read_text().splitlines()]
    held_text = {r["prompt"] for r in held} | {r["response"] for r in held}
    assert not held_text & ({r["prompt"] for r in rows} | {r["response"] for r in rows})
    manifest = json.loads(layout.manifest("00_sft", 0).read_text())
    assert manifest["constructed_eft_rows"] == 16


def test_judge_quality_known_values():
    rows = [{"prompt": "q1", "score": s} for s in (5, 3, 1)] + [{"prompt": "q2", "score": s} for s in (4, 2)]
    judge = [4.6, 3.2, 3.4, 2.0, 2.0]  # q1: 5>3 right, 5>1 right, 3>1 wrong; q2: tie -> half
    q = judge_quality(rows, judge)
    assert q["pairs"] == 4 and q["pairwise_accuracy"] == pytest.approx(2.5 / 4)
    assert q["exact_match"] == pytest.approx(3 / 5)  # 4.6->5, 3.2->3, 2.0->2 match; 3.4->3 and 2.0->2 vs 4 do not
    # ranks: human 5,3,1,4,2; judge 5,3,4,1.5,1.5. Deviations from 3: (2,0,-2,1,-1) and (2,0,1,-1.5,-1.5):
    # Spearman = 2 / sqrt(10 * 9.5)
    assert q["spearman"] == pytest.approx(2 / 95**0.5, abs=1e-4)
    # of the 10 pairs 5 are concordant, 4 discordant, 1 tied in the judge only: tau-b = 1 / sqrt(9 * 10)
    assert q["kendall_tau"] == pytest.approx(1 / 90**0.5, abs=1e-4)


def test_judge_quality_intervals_resample_questions():
    rows = [{"prompt": f"q{q}", "score": s} for q in range(12) for s in (0, 2, 3, 5)]
    perfect = judge_quality(rows, [r["score"] + 0.1 for r in rows], samples=200, seed=3)
    assert perfect["intervals"]["pairwise_accuracy"] == [1.0, 1.0]  # every resample agrees fully
    # a judge right on 8 questions and reversed on 4: the point estimate is 2/3, and the interval,
    # whose resamples mix the two kinds of question, spreads around it
    mixed = [r["score"] if int(r["prompt"][1:]) < 8 else 5 - r["score"] for r in rows]
    q = judge_quality(rows, mixed, samples=400, seed=3)
    low, high = q["intervals"]["pairwise_accuracy"]
    assert q["pairwise_accuracy"] == pytest.approx(8 / 12, abs=1e-4) and low < 8 / 12 < high and 0.3 < low and high < 1
    assert judge_quality(rows, mixed, samples=400, seed=3)["intervals"] == q["intervals"]  # seeded
    assert judge_quality(rows, mixed, samples=0)["intervals"]["spearman"] is None


def test_bootstrap_intervals_treat_a_question_drawn_twice_as_two():
    from selfreward.run.metrics import bootstrap_intervals

    seen = []

    def statistics(idx, group_of):
        seen.append((idx, group_of))
        return {"size": float(len(idx)), "never": None}

    found = bootstrap_intervals(["a", "a", "b"], statistics, samples=20)
    for idx, group_of in seen:
        assert len(idx) == len(group_of) and len(set(group_of)) == 2  # two draws, whatever they picked
    assert found["size"][0] >= 2 and found["size"][1] <= 4 and "never" not in found


def test_head_to_head_counts_order_dependent_picks_as_ties():
    result = head_to_head(["A", "A", "B", "B"], ["B", "A", "A", "B"])
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 1)
    assert result["win_rate"] == 0.25
    # the two ties picked A both times (A, A) and B both times (B, B): half the verdicts followed the position
    assert result["position_bias"] == 0.5
    assert (result["picked_first_both_times"], result["picked_second_both_times"]) == (1, 1)
    assert result["unreadable"] == 0


def test_an_unreadable_reply_is_counted_and_left_out_of_the_rates_never_guessed():
    from selfreward.tools.report import head_to_head_table

    result = head_to_head(["A", None, "B", "A"], ["B", "B", None, "A"])
    assert result["verdicts"] == ["win", "unreadable", "unreadable", "tie"]
    assert (result["prompts"], result["unreadable"], result["wins"], result["losses"]) == (4, 2, 1, 0)
    assert result["win_rate"] == 0.5 and result["position_bias"] == 0.5
    table = head_to_head_table([{"iteration": 1, "head_to_head": {"M1 vs M0": result}}])
    assert "unreadable" in table[0] and table[2] == "| 1 | M1 vs M0 | pairs | 1 | 1 | 0 | 2 | 0.5 | 0.75 | 0.5 |"


def test_graded_alone_the_higher_score_wins_beyond_the_margin_and_rates_have_intervals():
    result = head_to_head_by_scores([4.2, 3.0, 1.0, None, 2.5], [3.0, 3.05, 2.0, 1.0, 2.5], margin=0.1, samples=200)
    assert result["verdicts"] == ["win", "tie", "loss", "unreadable", "tie"]  # 3.0 vs 3.05 is within the margin
    assert (result["wins"], result["ties"], result["losses"], result["unreadable"]) == (1, 2, 1, 1)
    assert result["win_rate"] == 0.25 and result["preference"] == 0.5  # (1 + 2 * 0.5) / 4
    assert result["position_bias"] is None  # one answer at a time: no position to follow
    assert result["mean_scores"] == [2.675, 2.6375]  # of the four readable prompts
    low, high = result["intervals"]["preference"]
    assert 0 <= low < 0.5 < high <= 1
    every_win = head_to_head_by_scores([5.0] * 30, [1.0] * 30, samples=200)
    assert every_win["intervals"]["win_rate"] == [1.0, 1.0] and every_win["preference"] == 1.0


def test_the_score_picker_matches_each_score_to_its_answer_whatever_order_the_judge_returns(monkeypatch):
    from types import SimpleNamespace

    from selfreward.judge import head_to_head as picking
    from selfreward.run.config import Config

    class Graded:  # grades by length, and returns its rows in another order, as length-bucketed batches do
        mode = "logits"

        def score_rows(self, rows, *, seed):
            return [{**r, "score": float(len(r["response"]))} for r in reversed(rows)]

    monkeypatch.setattr(picking, "judge_for", lambda *a, **k: Graded())
    config = Config()
    config.eval.head_to_head, config.eval.bootstrap_samples = "scores", 0
    picker = picking.model_picker(config, SimpleNamespace(close=lambda: None), "judge", "the judge")
    rows = [("q1", "long answer", "short"), ("q2", "a", "a much longer one"), ("q3", "same", "same")]
    result = picker.compare(rows, template="unused")
    assert result["verdicts"] == ["win", "loss", "tie"]
    assert picker.report() == {"head_to_head_by": "scores", "head_to_head_reading": "logits"}
    config.eval.head_to_head = "pairwise"
    pairs = picking.model_picker(config, None, "judge", "the judge")
    assert type(pairs) is picking.ModelPicker and pairs.report() == {"head_to_head_by": "pairs"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("judge: {mode: pairwise}\neval: {head_to_head: scores}\n", "needs judge.mode logits or sample"),
        ("eval: {head_to_head: scores, judge_endpoint: 'http://127.0.0.1:8000/v1'}\n", "the outside judge"),
        ("eval: {head_to_head: grades}\n", "must be one of pairwise, scores"),
    ],
)
def test_scores_need_a_rubric_judge_loaded_here(tmp_path, text, message):
    from selfreward.run.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_eval_judged_by_scores_of_a_fixed_model(tiny_run, run_stage, tmp_path):
    """The head-to-head judged by M0 grading each answer alone: no position bias, the same prompts, and
    the report says how it was judged."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    layout = RunLayout(run)
    run_stage("06_eval", "--run-dir", str(run), "--iteration", "1", "--no-oxen",
              "--eval.head_to_head", "scores", "--eval.judge_model", str(layout.model(0)))  # fmt: skip
    result = json.loads(layout.eval_result(1).read_text())
    c = result["head_to_head"]["M1 vs M0"]
    held = len(layout.heldout("prompts").read_text().splitlines())
    assert c["wins"] + c["ties"] + c["losses"] + c["unreadable"] == c["prompts"] == held
    assert c["position_bias"] is None and len(c["mean_scores"]) == 2
    assert all(0 <= s <= 5 for s in c["mean_scores"])
    assert result["head_to_head_by"] == "scores" and result["head_to_head_reading"] == "logits"
    assert result["judge_model"] == str(layout.model(0))
    assert "| 1 | M1 vs M0 | scores |" in layout.report.read_text()


def test_drift_known_values():
    responses = [
        {"prompt_id": "p", "response": "a b c", "num_tokens": 4},
        {"prompt_id": "p", "response": "a b", "num_tokens": 2},
        {"prompt_id": "q", "response": "x", "num_tokens": 1},
        {"prompt_id": "q", "response": "x", "num_tokens": 1},
    ]
    scores = [
        {**responses[0], "score": 4.6, "judgments": [{"score": 4.6}]},
        {**responses[1], "score": 1.0, "judgments": [{"score": 1.0}, {"score": None}]},
        {**responses[2], "score": 3.0, "judgments": [{"score": 3.0}]},
        {**responses[3], "score": 3.0, "judgments": [{"score": 3.0}]},
    ]
    pairs = [{"prompt_id": "p", "chosen": "a b c", "rejected": "a b"}]
    d = drift(responses, scores, pairs, prompts=2)
    assert d["response_tokens"] == 2.0 and d["response_chars"] == (5 + 3 + 1 + 1) / 4
    assert d["distinct_1"] == pytest.approx(4 / 7, abs=1e-4)  # a b c a b x x
    assert d["score_histogram"] == {"0": 0, "1": 1, "2": 0, "3": 2, "4": 0, "5": 1}
    assert d["tie_rate"] == 0.5  # q's two answers tie
    assert d["parse_failure_rate"] == 0.2
    assert d["pair_yield"] == 0.5 and d["chosen_minus_rejected_chars"] == 2.0
    assert d["score_spread"] == pytest.approx((1.8 + 0.0) / 2)  # p: 4.6 and 1.0 are 1.8 from their mean


def test_eval_stage_writes_every_metric_and_the_report(tiny_run):
    layout = RunLayout(tiny_run)
    for t in (1, 2):
        result = json.loads(layout.eval_result(t).read_text())
        comparisons = result["head_to_head"]
        assert set(comparisons) == ({"M1 vs M0"} if t == 1 else {"M2 vs M1", "M2 vs M0"})
        held = len((layout.heldout("prompts")).read_text().splitlines())
        for c in comparisons.values():
            assert c["wins"] + c["ties"] + c["losses"] == c["prompts"] == held
        assert set(result["judge_quality"]) == {f"M{m}" for m in sorted({0, t - 1, t})}
        assert all(q["pairs"] > 0 for q in result["judge_quality"].values())
        assert {"distinct_2", "tie_rate", "pair_yield", "score_histogram"} <= set(result["drift"])
    report = layout.report.read_text()
    for png in ("scores", "response_length", "head_to_head", "judge_quality", "dpo_training"):
        assert f"report/{png}.png" in report and (layout.report_dir / f"{png}.png").stat().st_size > 5000
    assert "| M2 |" in report and "| 2 | M2 vs M1 |" in report


def test_eval_on_any_prompts_file(tiny_run, run_stage, tmp_path):
    run = tmp_path / "run"  # a copy: other tests read the shared run's own evaluation
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"prompt": "Name a fruit."}\n{"prompt": "Count to three."}\n')
    run_stage("06_eval", "--run-dir", str(run), "--iteration", "1", "--prompts", str(prompts), "--no-oxen")
    result = json.loads(RunLayout(run).eval_result(1).read_text())
    assert result["prompts_file"] == str(prompts) and result["head_to_head"]["M1 vs M0"]["prompts"] == 2


def test_the_pairwise_judge_is_scored_over_both_orders():
    from types import SimpleNamespace

    from selfreward.judge.judges import measure_pairwise_judge
    from selfreward.model.chat import ChatFormat
    from selfreward.model.models import TINY, load_tokenizer, resolve_model_path
    from selfreward.run.config import ModelConfig

    chat = ChatFormat.from_tokenizer(load_tokenizer(resolve_model_path(TINY), ModelConfig(name_or_path=TINY)))
    rows = [
        {"prompt": f"q{q}", "response": text, "score": score}
        for q in range(3)
        for text, score in (("a good answer", 5), ("a fair answer", 3), ("bad", 0), ("also bad", 0))
    ]

    def judge(prefers):
        def probs(prompts, token_ids, batch_size, desc=""):
            return [prefers(p) for p in prompts]

        return SimpleNamespace(chat=chat, next_token_probs=probs)

    def first_listed_better(prompt):  # the answer shown first is the better one by human score
        a, b = prompt.split("<answer_a>")[1], prompt.split("<answer_b>")[1]
        rank = {"a good answer": 2, "a fair answer": 1}
        better_a = max((v for k, v in rank.items() if k in a), default=0) > max(
            (v for k, v in rank.items() if k in b), default=0
        )
        return [0.9, 0.1] if better_a else [0.1, 0.9]

    knows = measure_pairwise_judge(judge(first_listed_better), rows, template=None, batch_size=4, budget=10_000,
                                   samples=50, seed=0)  # fmt: skip
    assert knows["pairs"] == 3 * 5 and knows["comparisons"] == 30  # 6 pairs per question minus the 0-0 tie
    assert knows["pairwise_accuracy"] == 1.0 and knows["position_bias"] == 0.0
    always_a = measure_pairwise_judge(judge(lambda p: [0.8, 0.2]), rows, template=None, batch_size=4, budget=10_000,
                                      samples=50, seed=0)  # fmt: skip
    assert always_a["pairwise_accuracy"] == 0.5 and always_a["position_bias"] == 1.0  # both orders cancel out
