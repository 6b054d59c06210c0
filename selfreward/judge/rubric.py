"""The model as its own judge: the additive 0-5 rubric and reading the score out of a judgment."""

from __future__ import annotations

import re
import statistics
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from selfreward.model.chat import cut_to_fit, packaged_template
from selfreward.run.config import ConfigError

MAX_SCORE = 5

# How the judges write a score. The number is possessive and the scale atomic, so "4.5" is never read
# as "4", nor "4/10" or "4 (out of 10)" as a 4 followed by other text.
_VALUE = r"(?P<value>-?\d++(?:\.\d+)?+)"
_SCALE = r"(?:\s*\(?\s*(?:/|out\s+of)\s*(?P<scale>\d+)\s*\)?)?+"
_END = r"\s*\**\s*(?:$|[^\w\s/])"  # the end of the line or punctuation: "Score: 4 if ..." is no verdict
# A line that opens with the score: "Score: 4", "**Total score:** 4.5", "score = 3/5", "Score: 4 out of 5",
# "Score: 4 points.", "Score: 4 - the answer is good".
_SCORE_LINE = re.compile(
    rf"^\W*(?:(?:total|final|overall)\s+)?score\W*[:=]\s*\**\s*{_VALUE}{_SCALE}(?:\s*points?)?{_END}", re.IGNORECASE
)
# Points alone on a line: "4 points", "**4 points**".
_POINTS_LINE = re.compile(rf"^\W*?{_VALUE}{_SCALE}\s*points?\W*$", re.IGNORECASE)
# Within a sentence, only where the judge gives the score: "so I give it a score of 4.", "the total score is
# 4." A number beside "points" in a sentence ("it earns 3 points for relevance") is one criterion's, not the total.
_SCORE_IN_TEXT = re.compile(
    r"\b(?:(?:give[sn]?|giving|award(?:s|ed)?|assign(?:s|ed)?|deserves?|earns?|gets?|receives?|merits?)\b"
    r"[^.!?\n]*?\bscore\s+of|\b(?:the|my)\s+(?:(?:total|final|overall)\s+)?score\s+is)"
    rf"\s+{_VALUE}{_SCALE}{_END}",
    re.IGNORECASE,
)


# judge.template and judge.pairwise_template: the packaged templates by name, or a text file.
RUBRICS = {"compact": "judge_rubric.txt", "paper": "judge_rubric_paper.txt"}
PAIRWISE = {"default": "pairwise_judge.txt"}
POINTS = "<points>"  # where the number goes in a template's example score line, e.g. "Score: <points>"


def fill_template(template: str, **values: str) -> str:
    """Each {name} replaced once, in one pass: other braces stay, and a question that contains
    "{response}" is not filled in again."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def _template_text(key: str, value: str, packaged: dict[str, str]) -> str:
    if value in packaged:
        return packaged_template(packaged[value])
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key '{key}': '{value}' is neither one of {', '.join(packaged)} nor a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config key '{key}': cannot read {path}: {exc}") from None


def _need_placeholders(key: str, value: str, text: str, names: tuple[str, ...]) -> None:
    missing = [f"{{{n}}}" for n in names if f"{{{n}}}" not in text]
    if missing:
        raise ConfigError(f"config key '{key}': the template {value} has no {' or '.join(missing)} placeholder")


@dataclass(frozen=True)
class Rubric:
    """The judge's prompt (judge.template) and how a score is read from what it writes (judge.score_pattern)."""

    text: str  # holds {question} and {response}
    score_line: str  # the template's example score line, e.g. "Score: <points>"
    pattern: re.Pattern | None = None  # None: the built-in reader of lines like "Score: 4"

    def prompt(self, question: str, response: str) -> str:
        """The user turn the judge sees: the rubric with the question and the response filled in."""
        return fill_template(self.text, question=question, response=response)

    def parse(self, judgment: str) -> float | None:
        """The score the judge gave in its own text (the last one it wrote), or None; see parse_judge_score."""
        if self.pattern is None:
            return parse_judge_score(judgment)
        found = list(self.pattern.finditer(judgment))
        if not found:
            return None
        try:
            value = float(found[-1].group("score"))
        except (TypeError, ValueError):
            return None
        return value if 0 <= value <= MAX_SCORE else None

    @property
    def logit_prefix(self) -> str:
        """What comes before the number on the score line: the logit judge reads the next token."""
        return self.score_line.split(POINTS, 1)[0]

    def score_text(self, score: int | float) -> str:
        return self.score_line.replace(POINTS, f"{score:g}")

    def is_score_line(self, line: str) -> bool:
        head = self.logit_prefix.strip().lower()
        return self.parse(line) is not None or bool(head) and line.strip().lower().startswith(head)


def _example_score_line(key: str, value: str, text: str) -> str:
    for line in text.splitlines():
        if POINTS in line:
            quoted = re.search(r'"([^"]*<points>[^"]*)"', line)
            return quoted.group(1) if quoted else line.strip()
    raise ConfigError(
        f"config key '{key}': the template {value} shows no score line: write the line the judge must end "
        f'with, with {POINTS} where the number goes (e.g. "Score: {POINTS}")'
    )


@lru_cache(maxsize=8)
def load_rubric(template: str = "compact", score_pattern: str | None = None) -> Rubric:
    """The rubric of judge.template, checked: placeholders present, and the score pattern (or the built-in
    reader) reads the template's own example score line. A ConfigError names the key otherwise."""
    text = _template_text("judge.template", template, RUBRICS)
    _need_placeholders("judge.template", template, text, ("question", "response"))
    line = _example_score_line("judge.template", template, text)
    pattern = None
    if score_pattern is not None:
        try:
            pattern = re.compile(score_pattern, re.MULTILINE)
        except re.error as exc:
            raise ConfigError(f"config key 'judge.score_pattern': not a valid regular expression: {exc}") from None
        if "score" not in pattern.groupindex:
            raise ConfigError(
                f"config key 'judge.score_pattern': {score_pattern!r} has no group named score, e.g. (?P<score>\\d+)"
            )
    rubric = Rubric(text, line, pattern)
    example = rubric.score_text(4)
    if rubric.parse(example) != 4:
        key = "judge.score_pattern" if pattern is not None else "judge.template"
        hint = "" if pattern is not None else "; set judge.score_pattern to a regex that reads it"
        raise ConfigError(
            f"config key '{key}': the score in the template's own score line '{example}' is not read{hint}"
        )
    return rubric


def rubric_of(cfg) -> Rubric:
    """The rubric of a JudgeConfig."""
    return load_rubric(cfg.template, cfg.score_pattern)


def pairwise_template(cfg) -> str:
    """Stage 06's pairwise prompt (judge.pairwise_template), with {question}, {answer_a} and {answer_b}."""
    text = _template_text("judge.pairwise_template", cfg.pairwise_template, PAIRWISE)
    _need_placeholders("judge.pairwise_template", cfg.pairwise_template, text, ("question", "answer_a", "answer_b"))
    return text


def template_files(cfg) -> list[str]:
    """The judge's template files named in the config (not the packaged ones): a stage that uses them
    fingerprints their contents, so editing one reruns it."""
    return [v for v, packaged in ((cfg.template, RUBRICS), (cfg.pairwise_template, PAIRWISE)) if v not in packaged]


def check_judge_settings(cfg) -> None:
    """Raise ConfigError for a judge template or score pattern that cannot work (run where a config is loaded
    for a stage or a dry run: stage.load_checked_config, dryrun.main)."""
    rubric_of(cfg)
    pairwise_template(cfg)
    if cfg.objective not in JUDGE_OBJECTIVES:
        raise ConfigError(
            f"config key 'judge.objective' must be one of {', '.join(JUDGE_OBJECTIVES)}, got '{cfg.objective}'"
        )
    if cfg.objective != "sft" and (cfg.mode != "logits" or cfg.format != "score_first"):
        raise ConfigError(
            f"config key 'judge.objective': {cfg.objective} trains the digit the logit judge reads after an opening "
            f"'Score:'; it needs judge.mode logits and judge.format score_first (got {cfg.mode}, {cfg.format})"
        )
    if cfg.ranking_pairs < 1 or cfg.ranking_weight <= 0 or cfg.judgment_beta <= 0:
        raise ConfigError(
            "config keys 'judge.ranking_pairs', 'judge.ranking_weight' and 'judge.judgment_beta' must be positive"
        )
    if cfg.mode == "reward_model" and not cfg.reward_model:
        raise ConfigError(
            "config key 'judge.reward_model': judge.mode reward_model needs one (a folder or hub id of a "
            "sequence classifier with one output)"
        )


def judge_prompt(question: str, response: str, rubric: Rubric | None = None) -> str:
    """The user turn the judge sees: the rubric (default: the compact one) with the question and response."""
    return (rubric or load_rubric()).prompt(question, response)


def fit_judge_prompt(chat, question: str, response: str, max_tokens: int, rubric: Rubric | None = None):
    """The rendered judge prompt within `max_tokens`, cutting the response first, then the question."""
    rubric = rubric or load_rubric()
    return cut_to_fit(
        lambda q, r: chat.prompt(rubric.prompt(q, r)),
        chat.encode,
        chat.tokenizer.decode,
        question,
        response,
        max_tokens,
        what="the judge rubric",
    )


def parse_judge_score(judgment: str) -> float | None:
    """The last score in the judge's own text, or None if it has none or it is invalid.

    A score is a line that opens with it ("Score: 4", "Total score: 4 out of 5", "Score: 4 - good"),
    points alone on a line ("4 points"), or a sentence that gives it ("so I give it a score of 4.",
    "the total score is 4."). Only the judge's generated text may be passed here: a "Score: 5" inside
    the judged response must never count. A score outside 0-5, or on another scale than /5, is invalid
    rather than clipped.
    """
    found = []  # (line, position in it, match)
    for n, line in enumerate(judgment.splitlines()):
        for m in (_SCORE_LINE.match(line), _POINTS_LINE.match(line), *_SCORE_IN_TEXT.finditer(line)):
            if m:
                found.append((n, m.start("value"), m))
    if not found:
        return None
    last = max(found, key=lambda f: f[:2])[2]
    if last.group("scale") is not None and int(last.group("scale")) != MAX_SCORE:
        return None
    value = float(last.group("value"))
    if not 0 <= value <= MAX_SCORE:
        return None
    return value


JUDGE_OBJECTIVES = ("sft", "ranking", "sft+ranking", "judgment_dpo")
JUDGE_FORMATS = ("score_first", "score_last")


def judge_target(justification: str, score: int, fmt: str, rubric: Rubric | None = None) -> str:
    """What SFT teaches the judge to write for an EFT row whose justification ends in "Score: N".

    score_last is the paper's order (the justification, then the score line). score_first puts the
    score line first and the justification after it, so that the logit judge, which reads the digit
    right after an opening "Score:", reads it where SFT trained the model to put it. The score line is
    written the way the rubric's template shows it ("Score: N" for the packaged ones).
    """
    rubric = rubric or load_rubric()
    if fmt not in JUDGE_FORMATS:
        raise ValueError(f"judge.format must be one of {', '.join(JUDGE_FORMATS)}, got '{fmt}'")
    default_line = rubric.score_line == f"Score: {POINTS}"
    if fmt == "score_last" and default_line:
        return justification  # already ends in its "Score: N" line, as written
    lines = justification.rstrip().splitlines()
    while lines and not _SCORE_LINE.match(lines[-1]):
        lines.pop()
    body = "\n".join(lines[:-1]).strip()
    line = rubric.score_text(score)
    if fmt == "score_last":
        return f"{body}\n{line}" if body else line
    return f"{line}\n{body}" if body else line


def mean_score(scores: list[float | None]) -> float | None:
    """The mean of the valid judgments; None when none parsed."""
    valid = [s for s in scores if s is not None]
    return round(statistics.fmean(valid), 4) if valid else None


def score_token_ids(chat, rubric: Rubric | None = None) -> tuple[str, list[int]]:
    """The answer prefix the logit judge is given, and the token of each score 0-5 that follows it.

    Tokenizers differ on whether the space before the digit stands alone ("Score: " + "4") or is
    merged with it ("Score:" + " 4"); whichever gives one token per digit is used.
    """
    head = (rubric or load_rubric()).logit_prefix
    tries = [(head, "{}")] + ([(head.rstrip(), " {}")] if head.endswith(" ") else [])
    for prefix, fmt in tries:
        base = chat.encode(prefix)
        ids = []
        for digit in range(MAX_SCORE + 1):
            full = chat.encode(prefix + fmt.format(digit))
            if full[: len(base)] != base or len(full) != len(base) + 1:
                break
            ids.append(full[-1])
        if len(ids) == MAX_SCORE + 1 and len(set(ids)) == len(ids):
            return prefix, ids
    raise ValueError(f"judge.mode 'logits' needs one token per score digit 0-5 after {head!r}")


def score_by_logits(
    backend,
    judge_prompts: list[str],
    batch_size: int,
    *,
    skip: Collection[int] = (),
    on_batch=None,
    rubric: Rubric | None = None,
) -> list[dict | None]:
    """Judge in one forward pass per batch: the expected score under the next-token distribution.

    The judge's answer is opened with "Score:" and the probabilities of the digits 0-5 that follow
    are renormalised; the score is their expectation, a continuous value with far fewer ties.
    `judge_prompts` are rendered chat prompts (see `fit_judge_prompt`); the rubric they all start
    with is computed once and reused (see `generation.HFBackend`). Returns one judgment per prompt:
    {"score", "text", "distribution", "mass"}; `skip` and `on_batch` work as in `Backend.generate`.
    """
    prefix, digit_ids = score_token_ids(backend.chat, rubric)

    def judgment(probs: list[float]) -> dict:
        mass = sum(probs)
        dist = [p / mass for p in probs]
        return {
            "score": round(sum(d * p for d, p in enumerate(dist)), 4),
            "text": prefix.strip(),
            "distribution": [round(p, 4) for p in dist],
            "mass": round(mass, 4),
        }

    judged: list[dict | None] = [None] * len(judge_prompts)

    def save(batch: int, idx: list[int], probs: list) -> None:
        for i, p in zip(idx, probs, strict=True):
            judged[i] = judgment(p)
        if on_batch:
            on_batch(batch, idx, [judged[i] for i in idx])

    backend.next_token_probs(
        [prompt + prefix for prompt in judge_prompts], digit_ids, batch_size, desc="judging", skip=skip, on_batch=save
    )
    return judged


def _collected(n: int, on_batch):
    """A list of `n` judgment lists to fill, and the callback that fills it by index and passes each batch on."""
    results: list[list[dict] | None] = [None] * n

    def keep(batch: int, idx: list[int], judged: list[list[dict]]) -> None:
        for i, j in zip(idx, judged, strict=True):
            results[i] = j
        if on_batch:
            on_batch(batch, idx, judged)

    return results, keep


def sample_judgments(
    backend, judge_prompts: list[str], cfg, *, seed: int, skip: Collection[int] = (), on_batch=None
) -> list[list[dict] | None]:
    """cfg.num_samples sampled judgments of every rendered judge prompt (the paper's way), each scored by its
    last "Score: N" line. Returns a list of judgments per prompt, each {"score", "text"}; `skip` and
    `on_batch` (called with (batch, indices, judgments per index)) work as in `Backend.generate`."""
    from selfreward.model.generation import Sampling  # torch

    rubric = rubric_of(cfg)
    results, keep = _collected(len(judge_prompts), on_batch)
    sampling = Sampling(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)

    def parsed(batch, idx, gens):
        keep(batch, idx, [[{"score": rubric.parse(g.text), "text": g.text} for g in row] for row in gens])

    backend.generate(judge_prompts, sampling, seed=seed, desc="judging", skip=skip, on_batch=parsed)
    return results


def logit_judgments(
    backend, judge_prompts: list[str], cfg, *, seed: int, skip: Collection[int] = (), on_batch=None
) -> list[list[dict] | None]:
    """One judgment of every rendered judge prompt, read from the next-token distribution where cfg.format
    says SFT taught the model to put the score:
    - score_first: one forward pass; the score is the expected digit after "Score:".
    - score_last: a greedy justification of up to cfg.max_new_tokens tokens (cut at any score line the judge
      wrote itself), then the expected digit after "Score:" on the next line.
    Returns a list of one judgment per prompt, {"score", "text", "distribution", "mass"}; `skip` and
    `on_batch` work as in `sample_judgments`."""
    from selfreward.model.generation import Sampling  # torch

    if cfg.format not in JUDGE_FORMATS:
        raise ValueError(f"judge.format must be one of {', '.join(JUDGE_FORMATS)}, got '{cfg.format}'")
    rubric = rubric_of(cfg)
    results, keep = _collected(len(judge_prompts), on_batch)
    if cfg.format == "score_first":

        def one_each(batch, idx, judged):
            keep(batch, idx, [[j] for j in judged])

        score_by_logits(backend, judge_prompts, cfg.batch_size, skip=skip, on_batch=one_each, rubric=rubric)
        return results
    greedy = Sampling(1, 0.0, 1.0, cfg.max_new_tokens, cfg.batch_size)

    def then_read(batch, idx, gens):
        reasons = [text_before_score_line(row[0].text, rubric) for row in gens]
        judged = score_by_logits(
            backend,
            [judge_prompts[i] + r + "\n" for i, r in zip(idx, reasons, strict=True)],
            cfg.batch_size,
            rubric=rubric,
        )
        keep(batch, idx, [[{**j, "text": r + "\n" + j["text"]}] for j, r in zip(judged, reasons, strict=True)])

    backend.generate(judge_prompts, greedy, seed=seed, desc="justifying", skip=skip, on_batch=then_read)
    return results


def text_before_score_line(text: str, rubric: Rubric) -> str:
    """The judge's own text up to (not including) the first score line it wrote, trailing space removed."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if rubric.is_score_line(line) or line.strip().lower().startswith("score"):
            lines = lines[:n]
            break
    return "\n".join(lines).rstrip()
