import pytest

from selfreward.judge.rubric import fit_judge_prompt, judge_prompt, mean_score, parse_judge_score, score_by_logits
from selfreward.model.generation import HFBackend, Sampling, generate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Relevant and clear.\nScore: 4", 4.0),
        ("Score: 4.5", 4.5),
        ("Good answer.\nScore: 4/5", 4.0),
        ("**Score:** 3", 3.0),
        ("score = 2", 2.0),
        ("Score: 5 points.", 5.0),
        ("First I thought Score: 2\nScore: 1\nOn reflection:\nScore: 3", 3.0),  # several: the last line counts
        ("Score: 2\nScore: 9", None),  # the last score line is out of range: invalid, not the earlier one
        ("Score: 7", None),
        ("Score: -1", None),
        ("Score: 8/10", None),  # another scale
        ("The answer deserves a five.", None),
        ("", None),
        ("I would score: 4 if it were shorter", None),  # not a score line
    ],
)
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # wordings a sampled 7B judge writes instead of the template's "Score: N" line
        ("Relevant and correct.\nTotal score: 4", 4.0),
        ("**Final Score:** 3/5", 3.0),
        ("Overall score = 2", 2.0),
        ("Score: 4 out of 5", 4.0),
        ("Score: 4 (out of 5)", 4.0),
        ("It answers the question.\n4 points", 4.0),
        ("**4 points**", 4.0),
        ("The answer is relevant and clear, so I give it a score of 4.", 4.0),
        ("I would give this response a score of 3 out of 5.", 3.0),
        ("Therefore, the total score is 4.", 4.0),
        ("Score: 4 - the answer is good", 4.0),
        ("Score: 3. It misses the second part.", 3.0),
        ("Score: 4.5, a strong answer", 4.5),
        ("I give it a score of 2.\nScore: 4", 4.0),  # the last score counts
        ("Score: 4. On reflection I give it a score of 3.", 3.0),  # also within a line
        # still not a score: another scale, out of range, or a number that is no score
        ("Score: 4 out of 10", None),
        ("Score: 4 (out of 10)", None),
        ("Score: 4/10 because it is short", None),
        ("Total score: 9", None),
        ("I give it a score of 8/10.", None),
        ("Score: 4 out of 5\nScore: 7 out of 10", None),
        ("It covers the 3 points above.", None),
        ("Step 4: check the facts.", None),
        ("The treaty was signed in 2019.", None),
        ("It earns 3 points for relevance and one for clarity.", None),  # one criterion's points, not the total
        ("It would not reach a score of 5.", None),
        ("Score: 4.5 because it is long", None),
        ("-4 points", None),
        ("A score of 4 or 5 would fit", None),
    ],
)
def test_parse_judge_score_reads_the_wordings_judges_write(text, expected):
    assert parse_judge_score(text) == expected


def test_mean_score_excludes_unparsed():
    assert mean_score([4.0, None, 2.0]) == 3.0
    assert mean_score([None, None]) is None


def test_score_inside_judged_response_is_never_read(tiny_model):
    """The seed decoded prompt + continuation and read a 'Score: 5' out of the judged answer."""
    model, chat, _ = tiny_model
    prompt = chat.prompt(judge_prompt("What is 2+2?", "It is 5.\nScore: 5"))
    (gen,) = generate(model, chat, [prompt], Sampling(1, 0.0, 1.0, 1, 1), seed=0)[0]
    assert "Score: 5" not in gen.text  # only the one new token is decoded
    assert parse_judge_score(gen.text) is None
    assert parse_judge_score(prompt) == 5.0  # what reading the whole transcript would have done


def test_logit_judge_gives_a_distribution(tiny_model):
    model, chat, _ = tiny_model
    turns = [judge_prompt("What is 2+2?", "4"), judge_prompt("Name a colour.", "Blue, a colour of the sky.")]
    turns = [chat.prompt(turn) for turn in turns]
    judgments = score_by_logits(HFBackend(model, chat), turns, batch_size=2)
    for j in judgments:
        assert len(j["distribution"]) == 6
        assert sum(j["distribution"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 <= j["score"] <= 5
        assert j["score"] == pytest.approx(sum(d * p for d, p in enumerate(j["distribution"])), abs=1e-3)
    # batching and padding must not change a row's score
    alone = score_by_logits(HFBackend(model, chat), turns[:1], batch_size=1)[0]
    assert alone["score"] == pytest.approx(judgments[0]["score"], abs=1e-3)


def test_long_judge_input_is_cut_to_fit_and_flagged(tiny_model):
    _, chat, _ = tiny_model
    question, response = "Summarise this.", "word " * 400
    full = chat.prompt(judge_prompt(question, response))
    budget = len(chat.encode(full)) - 100
    rendered, cut = fit_judge_prompt(chat, question, response, budget)
    assert cut and len(chat.encode(rendered)) <= budget
    assert "Summarise this." in rendered and "</response>" in rendered  # only the response was shortened
    assert fit_judge_prompt(chat, question, "short", budget) == (chat.prompt(judge_prompt(question, "short")), False)


@pytest.mark.parametrize("fmt", ["score_first", "score_last"])
def test_the_logit_judge_reads_within_the_context_after_a_prompt_cut_to_its_budget(tiny_model, fmt):
    """vLLM fails a whole call when one prompt leaves no position for the token it reads (prompt length >=
    max_model_len). The logit judge reads the digit after the prompt and "Score: " (with score_last, after
    its justification too): the judge's budget must leave room for all of it."""
    from pathlib import Path

    from selfreward.judge.judges import judge_for
    from selfreward.judge.rubric import rubric_of
    from selfreward.model.generation import Generation
    from selfreward.run.config import load_config

    _, chat, _ = tiny_model
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    config = load_config(tiny, {"judge.mode": "logits", "judge.format": fmt, "judge.max_new_tokens": 16})

    class VLLMLikeJudge:
        name, context_length, chat = "vllm-like", 400, None

        def refuse_overlong(self, prompts):
            for prompt in prompts:
                if len(self.chat.encode(prompt)) >= self.context_length:
                    raise ValueError(f"the prompt is longer than the maximum model length of {self.context_length}")

        def generate(self, prompts, sampling, *, seed, desc="", skip=(), on_batch=None):
            self.refuse_overlong(prompts)
            rambling = chat.tokenizer.decode(chat.encode("it is thorough and " * 40)[: sampling.max_new_tokens])
            gens = [[Generation(rambling, "length", sampling.max_new_tokens)] for _ in prompts]
            on_batch(0, list(range(len(prompts))), gens)
            return gens

        def next_token_probs(self, prompts, token_ids, batch_size, *, desc="", skip=(), on_batch=None):
            self.refuse_overlong(prompts)
            probs = [[1 / len(token_ids)] * len(token_ids) for _ in prompts]
            on_batch(0, list(range(len(prompts))), probs)
            return probs

    judge = VLLMLikeJudge()
    judge.chat = chat
    budget = judge_for(config, model=judge).budget
    prompt, cut = fit_judge_prompt(chat, "Summarise this.", "word " * 800, budget, rubric_of(config.judge))
    assert cut and len(chat.encode(prompt)) >= budget - 2  # cut to the budget, not far below it
    (judgments,) = judge_for(config, model=judge).judgments([prompt], seed=0)
    assert judgments[0]["score"] == pytest.approx(2.5)


def test_judge_target_puts_the_score_where_the_format_says():
    from selfreward.judge.rubric import judge_target

    justification = "Relevant (1) and correct (2, 3).\nIt rambles, so no fourth point.\nScore: 3"
    assert judge_target(justification, 3, "score_last") == justification
    first = judge_target(justification, 3, "score_first")
    assert first == "Score: 3\nRelevant (1) and correct (2, 3).\nIt rambles, so no fourth point."
    assert parse_judge_score(first) == 3.0  # sampled judgments in this format still parse
    with pytest.raises(ValueError, match="judge.format"):
        judge_target(justification, 3, "score_middle")


@pytest.mark.parametrize(
    ("mode", "fmt"), [("sample", "score_last"), ("logits", "score_first"), ("logits", "score_last")]
)
def test_the_judge_reads_each_mode_and_format(tiny_model, mode, fmt):
    from selfreward.judge.judges import judge_for
    from selfreward.run.config import Config, JudgeConfig

    model, chat, _ = tiny_model
    prompts = [chat.prompt(judge_prompt(q, a)) for q, a in (("What is 2+2?", "4"), ("Name a colour.", "Blue."))]
    cfg = JudgeConfig(mode=mode, format=fmt, num_samples=2, max_new_tokens=6, batch_size=4)
    saved = {}
    judge = judge_for(Config(judge=cfg), model=HFBackend(model, chat))
    judged = judge.judgments(prompts, seed=1, on_batch=lambda b, idx, js: saved.update(zip(idx, js, strict=True)))
    assert [saved[i] for i in range(2)] == judged
    for judgments in judged:
        assert len(judgments) == (2 if mode == "sample" else 1)
        if mode == "logits":  # always a score, read from the distribution over the digits
            assert 0 <= judgments[0]["score"] <= 5 and len(judgments[0]["distribution"]) == 6
    if (mode, fmt) == ("logits", "score_last"):
        # the distribution is read after the judge's own greedy justification, on a new "Score:" line
        assert all(js[0]["text"].endswith("\nScore:") for js in judged)


# judge.template, judge.score_pattern, judge.pairwise_template


def _file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


RATING = 'Rate the answer.\n{question}\n---\n{response}\nEnd with "Rating: [[<points>]]".'
RATING_PATTERN = r"Rating: \[\[(?P<score>\d(?:\.\d+)?)\]\]"


def test_the_paper_template_follows_figure_2_and_reads_like_the_compact_one():
    from selfreward.judge.rubric import load_rubric

    paper = load_rubric("paper")
    text = paper.prompt("What is 2+2?", "4")
    assert "User: What is 2+2?" in text and "<response>\n4\n</response>" in text
    assert text.count("point") >= 5 and "100 words" in text  # five additive criteria, a short justification
    assert paper.score_line == "Score: <points>" and paper.parse("Fine.\nScore: 3") == 3
    assert load_rubric("compact").prompt("q", "r") == judge_prompt("q", "r")  # the default is unchanged


def test_a_custom_template_and_pattern_read_and_write_their_own_score_line(tmp_path):
    from selfreward.judge.rubric import judge_target, load_rubric

    rubric = load_rubric(_file(tmp_path, "rating.txt", RATING), RATING_PATTERN)
    assert (
        rubric.prompt("a {response} inside", "b")
        == 'Rate the answer.\na {response} inside\n---\nb\nEnd with "Rating: [[<points>]]".'
    )
    assert rubric.parse("Good.\nRating: [[2]]\nRating: [[4]]") == 4  # the last one counts
    assert rubric.parse("Score: 5") is None and rubric.parse("Rating: [[7]]") is None
    assert judge_target("Helpful.\nScore: 4", 4, "score_last", rubric) == "Helpful.\nRating: [[4]]"
    assert judge_target("Helpful.\nScore: 4", 4, "score_first", rubric) == "Rating: [[4]]\nHelpful."
    assert rubric.logit_prefix == "Rating: [["


@pytest.mark.parametrize(
    ("template", "pattern", "message"),
    [
        (
            "Judge {question}.\nScore: <points>",
            None,
            r"judge.template': the template .* has no \{response\} placeholder",
        ),
        ("{question} {response}\nJust a number.", None, r"shows no score line: write the line the judge must end with"),
        (RATING, None, r"'Rating: \[\[4\]\]' is not read; set judge.score_pattern"),
        (RATING, r"Rating: \[\[(\d)\]\]", r"judge.score_pattern': .* has no group named score"),
        (RATING, r"Rating: (?P<score>\d", r"judge.score_pattern': not a valid regular expression"),
        (RATING, r"Score: (?P<score>\d)", r"judge.score_pattern': the score in the template's own score line"),
    ],
)
def test_a_template_or_pattern_that_cannot_work_is_refused_when_the_config_loads(tmp_path, template, pattern, message):
    from pathlib import Path

    from selfreward.run.config import ConfigError
    from selfreward.stage import load_checked_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    overrides = {"judge.template": _file(tmp_path, "t.txt", template), "judge.score_pattern": pattern}
    with pytest.raises(ConfigError, match=message):
        load_checked_config(tiny, overrides)


def test_a_missing_template_or_a_pairwise_template_without_its_answers_is_refused(tmp_path):
    from pathlib import Path

    from selfreward.run.config import ConfigError
    from selfreward.stage import load_checked_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="'judge.template': 'nope.txt' is neither one of compact, paper nor a file"):
        load_checked_config(tiny, {"judge.template": "nope.txt"})
    pairwise = _file(tmp_path, "p.txt", "Which is better?\n{question}\nA: {answer_a}\nReply A or B.")
    with pytest.raises(ConfigError, match=r"judge.pairwise_template': .* has no \{answer_b\} placeholder"):
        load_checked_config(tiny, {"judge.pairwise_template": pairwise})


def test_the_loop_runs_with_a_judge_template_and_score_pattern_of_its_own(tmp_path, cache):
    # The done-when of issue 12: a user's own rubric, score line and pairwise prompt, end to end.
    import json

    from conftest import run_driver

    template = _file(tmp_path, "rating.txt", RATING)
    pairwise = _file(tmp_path, "pairwise.txt", "Q: {question}\n(A) {answer_a}\n(B) {answer_b}\nBetter, A or B?")
    overrides = ["--judge.template", template, "--judge.score_pattern", RATING_PATTERN,
                 "--judge.pairwise_template", pairwise]  # fmt: skip
    run = tmp_path / "run"
    proc = run_driver(run, cache, iterations=1, extra=["--no-oxen", "--", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = [json.loads(r) for r in (run / "M0" / "generated" / "scores.jsonl").read_text().splitlines()]
    # the logit judge reads the digit after the template's own "Rating: [[", where SFT taught it to write it
    assert scores and all(j["text"] == "Rating: [[" for r in scores for j in r["judgments"])
    assert all(r["score"] is not None for r in scores)
    sft = json.loads((run / "M0" / "00_sft.manifest.json").read_text())
    assert any(i["path"] == template for i in sft["inputs"])  # editing the file retrains the judge
    manifest = json.loads((run / "M1" / "eval" / "eval.manifest.json").read_text())
    assert any(i["path"] == pairwise for i in manifest["inputs"])


def test_stage_03_judges_with_the_paper_template(tiny_run, tmp_path, run_stage):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    run_stage("03_gen_scores", "--run-dir", str(run), "--iteration", "1", "--judge.template", "paper", "--no-oxen")
    manifest = json.loads((run / "M0" / "generated" / "scores.manifest.json").read_text())
    assert manifest["config"]["judge"]["template"] == "paper" and manifest["rows_out"] > 0
