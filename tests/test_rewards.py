"""The other ways to reward (issue 13): the pairwise judge and its tournaments, the external reward model,
and the consistency of two judges (CREAM), from the unit to the stages on the tiny run."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from selfreward.judge.rubric import fill_template
from selfreward.judge.tournament import fit_pairwise_prompt, position_bias, rank_by_comparisons, win_shares
from selfreward.model.chat import packaged_template
from selfreward.run.layout import RunLayout

TEMPLATE = packaged_template("pairwise_judge.txt")
CLOSING = "Reply with the letter of the better answer only: A or B."


@pytest.fixture(scope="module")
def chat(cache):
    from selfreward.model.chat import ChatFormat
    from selfreward.model.models import TINY, load_tokenizer, resolve_model_path
    from selfreward.run.config import ModelConfig

    return ChatFormat.from_tokenizer(load_tokenizer(resolve_model_path(TINY), ModelConfig(name_or_path=TINY)))


def judge_by_quality(chat, quality: dict[str, float], *, strength: float = 0.4, bias: float = 0.0):
    """A fake backend that prefers the answer of higher `quality` (by text) by `strength`, plus `bias`
    for the answer shown first; it records every prompt it is asked."""
    asked: list[str] = []

    def answer(prompt: str, tag: str) -> str:
        return prompt.split(f"<{tag}>\n", 1)[1].split(f"\n</{tag}>", 1)[0]

    def probs(prompts, token_ids, batch_size, desc=""):
        asked.extend(prompts)
        out = []
        for p in prompts:
            a, b = quality[answer(p, "answer_a")], quality[answer(p, "answer_b")]
            p_a = min(0.99, max(0.01, 0.5 + strength * ((a > b) - (a < b)) + bias))
            out.append([p_a, 1 - p_a])
        return out

    return SimpleNamespace(chat=chat, next_token_probs=probs, asked=asked)


def test_a_knockout_crowns_the_best_answer_in_n_minus_1_comparisons(chat):
    answers = ["fair", "best", "poor", "good", "worst"]
    quality = {"fair": 2, "best": 5, "poor": 1, "good": 3, "worst": 0}
    judge = judge_by_quality(chat, quality)
    (played,) = rank_by_comparisons(
        judge, [("q", answers)], ranking="knockout", template=TEMPLATE, budget=10_000, batch_size=8
    )
    assert len(played) == len(answers) - 1 and len(judge.asked) == 2 * len(played)  # both orders each
    shares = win_shares(len(answers), played)
    assert shares[answers.index("best")] == 1.0 and shares.count(1.0) == 1
    (rr,) = rank_by_comparisons(
        judge, [("q", answers)], ranking="round_robin", template=TEMPLATE, budget=10_000, batch_size=8
    )
    assert len(rr) == 10  # 5 * 4 / 2
    rr_shares = win_shares(len(answers), rr)
    assert [answers[i] for i in sorted(range(5), key=lambda i: -rr_shares[i])] == [
        "best",
        "good",
        "fair",
        "poor",
        "worst",
    ]


def test_both_orders_cancel_a_judge_that_prefers_the_first_position(chat):
    quality = {"x": 1, "y": 2}
    judge = judge_by_quality(chat, quality, strength=0.1, bias=0.3)  # picks whichever is shown first
    (played,) = rank_by_comparisons(judge, [("q", ["x", "y"])], ranking="knockout", template=TEMPLATE, budget=10_000,
                                    batch_size=4)  # fmt: skip
    assert win_shares(2, played) == [0.0, 1.0]  # y is better although x, shown first, was picked first
    rows = [
        {"prompt_id": "p", "comparisons": [{"a": 0, "b": 1, **{k: played[0][k] for k in ("p_a_first", "p_a_second")}}]}
    ]
    assert position_bias(rows) == 1.0  # the letter it picked never changed with the order
    blind = judge_by_quality(chat, {"x": 1, "y": 1}, bias=0.3)  # no preference but the position
    (tie,) = rank_by_comparisons(blind, [("q", ["x", "y"])], ranking="knockout", template=TEMPLATE, budget=10_000,
                                 batch_size=4)  # fmt: skip
    assert win_shares(2, tie) == [0.5, 0.5]  # a dead heat, not a win for the first position


def test_a_long_second_answer_does_not_push_out_the_closing_instruction(chat):
    # Before: the comparison was cut from the end of the user turn, so answer B and the line that asks
    # for "A or B" were cut away while answer A stayed whole.
    long_b = "the second answer goes on " * 80
    rendered, cut = fit_pairwise_prompt(chat, "Which?", "short first answer", long_b, 400, TEMPLATE)
    assert cut and CLOSING in rendered and "short first answer" in rendered and "the second answer" in rendered
    assert len(chat.encode(rendered)) <= 400
    both_long, _ = fit_pairwise_prompt(chat, "Which?", "first " * 200, "second " * 200, 500, TEMPLATE)
    a = both_long.split("<answer_a>")[1].split("</answer_a>")[0]
    b = both_long.split("<answer_b>")[1].split("</answer_b>")[0]
    assert abs(len(chat.encode(a)) - len(chat.encode(b))) <= 3  # cut alike


def test_the_pairwise_measurement_keeps_the_closing_instruction(chat):
    from selfreward.judge.judges import measure_pairwise_judge

    rows = [
        {"prompt": "q", "response": "short", "score": 5, "id": "1"},
        {"prompt": "q", "response": "long " * 400, "score": 1, "id": "2"},
    ]
    judge_prompts = []

    def record(prompts, token_ids, batch_size, desc=""):
        judge_prompts.extend(prompts)
        return [[0.6, 0.4] for _ in prompts]

    judge = SimpleNamespace(chat=chat, next_token_probs=record)
    measure_pairwise_judge(judge, rows, template=None, batch_size=4, budget=300, samples=0, seed=0)
    assert len(judge_prompts) == 2 and all(CLOSING in p for p in judge_prompts)


@pytest.mark.parametrize("ends_with", ["a newline (the fallback template)", "a space the letter takes in"])
def test_the_pairwise_judge_reads_the_letters_a_sentencepiece_model_writes_after_its_prompt(ends_with):
    """Mistral-7B's tokenizer encodes "A" alone as "▁A", a token the model rarely writes right after the
    pairwise prompt, which ends in a newline: there it writes "A". The judge must read P("A") over the
    tokens the model would write after the very prompt it is shown."""
    from selfreward import dryrun
    from selfreward.model.chat import ChatFormat, ensure_chat_template

    tokenizer = dryrun.stand_in_tokenizer(dryrun.KNOWN_MODELS["mistralai/mistral-7b-v0.1"])
    if ends_with.startswith("a space"):  # "Answer: " + "A" encodes as "Answer:" + "▁A"
        tokenizer.chat_template = (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n### Answer: "
            "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
        )
    ensure_chat_template(tokenizer)
    chat = ChatFormat.from_tokenizer(tokenizer)
    asked = []

    def record(prompts, token_ids, batch_size, desc=""):
        asked.extend((prompt, list(token_ids)) for prompt in prompts)
        return [[0.6, 0.4] for _ in prompts]

    judge = SimpleNamespace(chat=chat, next_token_probs=record)
    question, answers = "Which is warmer?", ["Lava.", "Ice."]
    rank_by_comparisons(judge, [(question, answers)], ranking="knockout", template=TEMPLATE, budget=10_000,
                        batch_size=4)  # fmt: skip
    shown = [chat.prompt(fill_template(TEMPLATE, question=question, answer_a=a, answer_b=b))
             for a, b in (answers, answers[::-1])]  # fmt: skip
    assert len(asked) == 2
    for (prompt, ids), rendered in zip(asked, shown, strict=True):
        # the tokens the judge reads, then the letter read, are the tokens of the prompt followed by the letter
        assert rendered.startswith(prompt)
        assert [chat.encode(prompt) + [i] for i in ids] == [chat.encode(rendered + letter) for letter in "AB"]
    if ends_with.startswith("a newline"):
        assert asked[0][1] != [chat.encode(letter)[0] for letter in "AB"]  # "A" alone is "▁A": not what it writes


def test_win_shares_count_a_dead_heat_half_and_an_answer_that_never_played_as_none():
    played = [
        {"a": 0, "b": 1, "p_a_first": 0.6, "p_a_second": 0.4},
        {"a": 0, "b": 2, "p_a_first": 0.9, "p_a_second": 0.7},
    ]
    assert win_shares(4, played) == [0.75, 0.5, 0.0, None]


def test_judges_agreement_is_kendall_tau_per_prompt():
    from selfreward.loop.pairs import judges_agreement

    def rows(pid, pairs):
        return [{"prompt_id": pid, "score": s, "previous_score": p} for s, p in pairs]

    scored = (
        rows("same", [(1, 0.1), (2, 0.2), (3, 0.3)])
        + rows("reversed", [(1, 3), (2, 2), (3, 1)])
        + rows("flat", [(1, 2), (2, 2), (3, 2)])  # the earlier judge saw no difference
        + rows("one", [(1, 1), (None, 2)])
    )
    assert judges_agreement(scored) == {"same": 1.0, "reversed": -1.0, "flat": 0.0, "one": 0.0}


def test_settings_that_cannot_work_are_refused_when_the_config_loads(tmp_path):
    from selfreward.run.config import ConfigError
    from selfreward.stage import load_checked_config

    with pytest.raises(ConfigError, match="judge.reward_model"):
        load_checked_config("configs/tiny.yaml", {"judge.mode": "reward_model", "judge.reward_model": None})
    with pytest.raises(ConfigError, match="preferences.consistency"):
        load_checked_config(
            "configs/tiny.yaml",
            {"judge.mode": "reward_model", "judge.reward_model": "rm", "preferences.consistency": "filter"},
        )
    with pytest.raises(ConfigError, match="judge.ranking"):
        load_checked_config("configs/tiny.yaml", {"judge.ranking": "swiss"})


def test_the_report_shows_consistency_and_judges_that_are_not_an_iterate(tmp_path):
    from selfreward.run.records import write_json
    from selfreward.tools.report import write_report

    layout = RunLayout(tmp_path / "run")
    for t in (1, 2):
        layout.model_root(t).mkdir(parents=True)
    quality = {"pairs": 4, "pairwise_accuracy": 0.75, "position_bias": 0.25, "intervals": {}}
    drift = {"score_histogram": {str(k): 0 for k in range(6)}, "response_chars": 10, "response_tokens": 3}
    write_json(layout.eval_result(2), {
        "iteration": 2, "head_to_head": {}, "judge_quality": {"M1": quality, "reward model": quality},
        "drift": drift, "consistency": {"mean_agreement": 0.4, "mean_agreement_of_pairs": 0.5, "dropped": 1},
    })  # fmt: skip
    report = write_report(layout).read_text()
    assert "| 2 | M1 vs M0 | 0.4 | 0.5 | 1 |" in report
    assert "| reward model | 4 | 0.75" in report and "position bias" in report


def copy_run(tiny_run, tmp_path):
    """The tiny run, with its held-out judge rows cut to 4 questions: what the stages measure on them is
    tested elsewhere, and all 30 would make each pairwise measurement 356 comparisons."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    heldout = RunLayout(run).heldout("eft")
    heldout.write_text("".join(heldout.read_text().splitlines(keepends=True)[:16]))
    return run


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stages_03_04_06_with_the_pairwise_judge_and_consistency(tiny_run, tmp_path, run_stage):
    """Iteration 2 by hand as a user reruns it: M1 ranks its answers by knockout, M0 scores them again for
    the consistency filter, the pairs follow the tournament, and stage 06 measures the same judge."""
    run = copy_run(tiny_run, tmp_path)
    where = ["--run-dir", str(run), "--iteration", "2", "--no-oxen", "--judge.mode", "pairwise"]
    flags04 = [*where[:5], "--preferences.consistency", "filter", "--preferences.min_agreement", "-1"]
    run_stage("03_gen_scores", *where, "--preferences.consistency", "filter")
    gen = run / "M1" / "generated"
    scores = read(gen / "scores.jsonl")
    manifest = json.loads((gen / "scores.manifest.json").read_text())
    per_prompt = {}
    for r in scores:
        per_prompt.setdefault(r["prompt_id"], []).append(r)
        assert r["score"] == pytest.approx(5 * r["win_share"]) and r["previous_score"] is not None
        assert all(set(c) == {"a", "b", "p_a_first", "p_a_second"} for c in r["comparisons"])
    for rows in per_prompt.values():
        assert len({(c["a"], c["b"]) for r in rows for c in r["comparisons"]}) == len(rows) - 1  # a knockout
        top = max(r["score"] for r in rows)
        for r in rows:  # the top score went to an answer that lost no comparison (dead heats aside)
            mine = [c["p_a_first"] + c["p_a_second"] if c["a"] == r["sample_index"] else
                    2 - c["p_a_first"] - c["p_a_second"] for c in r["comparisons"]]  # fmt: skip
            assert r["score"] < top or min(mine) >= 1.0
    assert manifest["comparisons_per_prompt"] == 3.0 and manifest["previous_judge"] == "M0"
    assert manifest["judge_check"]["heldout"]["comparisons"] > 0 and "position_bias" in manifest
    run_stage("04_gen_preferences", *flags04)
    pairs = read(gen / "preferences.jsonl")
    top = {r["prompt_id"]: max(s["score"] for s in scores if s["prompt_id"] == r["prompt_id"]) for r in scores}
    assert pairs and all(p["score_chosen"] == top[p["prompt_id"]] and -1 <= p["agreement"] <= 1 for p in pairs)
    made = json.loads((gen / "preferences.manifest.json").read_text())
    assert made["consistency"]["dropped"] == 0 and made["consistency"]["mean_agreement"] is not None
    run_stage("04_gen_preferences", *flags04[:-1], "1.01")  # no two judges agree that much
    assert not read(gen / "preferences.jsonl")
    made = json.loads((gen / "preferences.manifest.json").read_text())
    assert made["dropped"]["judges_disagree"] == len(pairs)
    run_stage("04_gen_preferences", *flags04)
    run_stage("06_eval", *where)
    result = json.loads((run / "M2" / "eval" / "eval.json").read_text())
    assert result["consistency"]["mean_agreement"] == made["consistency"]["mean_agreement"]
    assert result["judge_quality"]["M1"]["measured_by"] == "03_gen_scores iteration 2"  # the same judge
    assert "position_bias" in result["judge_quality"]["M2"]
    assert "Consistency of the judge" in (run / "report.md").read_text()


def test_stage_03_with_an_external_reward_model(tiny_run, tmp_path, run_stage):
    from selfreward.model.models import TINY_REWARD

    run = copy_run(tiny_run, tmp_path)
    flags = ["--run-dir", str(run), "--iteration", "1", "--no-oxen", "--judge.mode", "reward_model",
             "--judge.reward_model", TINY_REWARD]  # fmt: skip
    run_stage("03_gen_scores", *flags)
    gen = run / "M0" / "generated"
    scores = read(gen / "scores.jsonl")
    assert len({r["score"] for r in scores}) > 1 and all(isinstance(r["score"], float) for r in scores)
    check = json.loads((gen / "scores.manifest.json").read_text())["judge_check"]
    assert check["judge"] == "reward model" and check["heldout"]["pairwise_accuracy"] is not None
    assert check["heldout"]["exact_match"] is None  # rewards are on no 0-5 scale
    run_stage("04_gen_preferences", *flags[:5])
    assert read(gen / "preferences.jsonl")
    run_stage("06_eval", *flags)
    result = json.loads((run / "M1" / "eval" / "eval.json").read_text())
    assert set(result["judge_quality"]) == {"reward model"}
    assert result["judge_quality"]["reward model"]["measured_by"] == "03_gen_scores iteration 1"


def test_a_rerun_ranks_only_the_prompts_a_killed_run_had_not_saved(chat):
    from selfreward.judge.tournament import pairwise_scores

    quality = {f"{p}{k}": k for p in "xy" for k in range(3)}
    responses = [
        {
            "prompt_id": p,
            "response_id": f"{p}-r{k}",
            "prompt": f"question {p}",
            "response": f"{p}{k}",
            "sample_index": k,
        }
        for p in "xy"
        for k in range(3)
    ]
    saved = {}
    judge = judge_by_quality(chat, quality)
    cfg = SimpleNamespace(ranking="knockout", batch_size=4)
    rows = pairwise_scores(judge, responses, cfg, template=TEMPLATE, budget=10_000, prompts_per_chunk=1,
                           skip={0}, on_chunk=lambda k, done: saved.update({k: done}))  # fmt: skip
    assert set(saved) == {1} and {r["prompt_id"] for r in rows} == {"y"}  # chunk 0 (prompt x) was saved before
    assert all("answer_a>\nx" not in p for p in judge.asked)
    assert [r["score"] for r in rows] == [0.0, 2.5, 5.0]  # y2 beats the winner of y0 vs y1
