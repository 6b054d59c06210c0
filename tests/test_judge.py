import pytest

from selfreward.generation import HFBackend, Sampling, generate
from selfreward.judge import fit_judge_prompt, judge_prompt, mean_score, parse_judge_score, score_by_logits


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


def test_judge_target_puts_the_score_where_the_format_says():
    from selfreward.judge import judge_target

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
def test_judge_all_reads_each_mode_and_format(tiny_model, mode, fmt):
    from selfreward.config import JudgeConfig
    from selfreward.judge import judge_all

    model, chat, _ = tiny_model
    prompts = [chat.prompt(judge_prompt(q, a)) for q, a in (("What is 2+2?", "4"), ("Name a colour.", "Blue."))]
    cfg = JudgeConfig(mode=mode, format=fmt, num_samples=2, max_new_tokens=6, batch_size=4)
    saved = {}
    judged = judge_all(
        HFBackend(model, chat),
        prompts,
        cfg,
        seed=1,
        on_batch=lambda b, idx, js: saved.update(zip(idx, js, strict=True)),
    )
    assert [saved[i] for i in range(2)] == judged
    for judgments in judged:
        assert len(judgments) == (2 if mode == "sample" else 1)
        if mode == "logits":  # always a score, read from the distribution over the digits
            assert 0 <= judgments[0]["score"] <= 5 and len(judgments[0]["distribution"]) == 6
    if (mode, fmt) == ("logits", "score_last"):
        # the distribution is read after the judge's own greedy justification, on a new "Score:" line
        assert all(js[0]["text"].endswith("\nScore:") for js in judged)
