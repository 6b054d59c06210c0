"""The model as its own judge: the additive 0-5 rubric and reading the score out of a judgment."""

from __future__ import annotations

import re
import statistics
from collections.abc import Collection

from selfreward.chat import packaged_template

MAX_SCORE = 5

# A whole line such as "Score: 4", "**Score:** 4.5", "score = 3/5" or "Score: 4 points."
_SCORE_LINE = re.compile(
    r"^\W*score\W*[:=]\s*\**\s*(?P<value>-?\d+(?:\.\d+)?)\s*(?:/\s*(?P<scale>\d+))?\s*(?:points?)?\s*\**\s*\.?\s*$",
    re.IGNORECASE,
)


def judge_prompt(question: str, response: str) -> str:
    """The user turn the judge sees: the rubric with the question and the response filled in."""
    return packaged_template("judge_rubric.txt").format(question=question, response=response)


def fit_judge_prompt(chat, question: str, response: str, max_tokens: int) -> tuple[str, bool]:
    """The rendered judge prompt within `max_tokens`, cutting the response first, then the question."""
    rendered = chat.prompt(judge_prompt(question, response))
    overflow = len(chat.encode(rendered)) - max_tokens
    if overflow <= 0:
        return rendered, False
    for _ in range(8):  # each pass removes at least the measured overflow
        r_ids = chat.encode(response)
        cut = min(len(r_ids), overflow)
        response = chat.tokenizer.decode(r_ids[: len(r_ids) - cut])
        if cut < overflow:
            q_ids = chat.encode(question)
            question = chat.tokenizer.decode(q_ids[: max(0, len(q_ids) - (overflow - cut))])
        rendered = chat.prompt(judge_prompt(question, response))
        overflow = len(chat.encode(rendered)) - max_tokens
        if overflow <= 0:
            return rendered, True
    raise ValueError(f"the judge rubric alone is longer than {max_tokens} tokens")


def parse_judge_score(judgment: str) -> float | None:
    """The score on the last score line of the judge's own text, or None if it has none or it is invalid.

    Only the judge's generated text may be passed here: a "Score: 5" inside the judged response must
    never count. A score outside 0-5, or on another scale than /5, is invalid rather than clipped.
    """
    matches = [m for m in map(_SCORE_LINE.match, judgment.splitlines()) if m]
    if not matches:
        return None
    last = matches[-1]
    if last.group("scale") is not None and int(last.group("scale")) != MAX_SCORE:
        return None
    value = float(last.group("value"))
    if not 0 <= value <= MAX_SCORE:
        return None
    return value


JUDGE_FORMATS = ("score_first", "score_last")


def judge_target(justification: str, score: int, fmt: str) -> str:
    """What SFT teaches the judge to write for an EFT row whose justification ends in "Score: N".

    score_last is the paper's order (the justification, then the score line). score_first puts
    "Score: N" on the first line and the justification after it, so that the logit judge, which
    reads the digit right after an opening "Score:", reads it where SFT trained the model to put it.
    """
    if fmt == "score_last":
        return justification
    if fmt != "score_first":
        raise ValueError(f"judge.format must be one of {', '.join(JUDGE_FORMATS)}, got '{fmt}'")
    lines = justification.rstrip().splitlines()
    while lines and not _SCORE_LINE.match(lines[-1]):
        lines.pop()
    body = "\n".join(lines[:-1]).strip()
    return f"Score: {score}\n{body}" if body else f"Score: {score}"


def mean_score(scores: list[float | None]) -> float | None:
    """The mean of the valid judgments; None when none parsed."""
    valid = [s for s in scores if s is not None]
    return round(statistics.fmean(valid), 4) if valid else None


def score_token_ids(chat) -> tuple[str, list[int]]:
    """The answer prefix the logit judge is given, and the token of each score 0-5 that follows it.

    Tokenizers differ on whether the space before the digit stands alone ("Score: " + "4") or is
    merged with it ("Score:" + " 4"); whichever gives one token per digit is used.
    """
    for prefix, fmt in (("Score: ", "{}"), ("Score:", " {}")):
        base = chat.encode(prefix)
        ids = []
        for digit in range(MAX_SCORE + 1):
            full = chat.encode(prefix + fmt.format(digit))
            if full[: len(base)] != base or len(full) != len(base) + 1:
                break
            ids.append(full[-1])
        if len(ids) == MAX_SCORE + 1 and len(set(ids)) == len(ids):
            return prefix, ids
    raise ValueError("judge.mode 'logits' needs a tokenizer with one token per score digit 0-5")


def score_by_logits(
    backend, judge_prompts: list[str], batch_size: int, *, skip: Collection[int] = (), on_batch=None
) -> list[dict | None]:
    """Judge in one forward pass per batch: the expected score under the next-token distribution.

    The judge's answer is opened with "Score:" and the probabilities of the digits 0-5 that follow
    are renormalised; the score is their expectation, a continuous value with far fewer ties.
    `judge_prompts` are rendered chat prompts (see `fit_judge_prompt`); the rubric they all start
    with is computed once and reused (see `generation.HFBackend`). Returns one judgment per prompt:
    {"score", "text", "distribution", "mass"}; `skip` and `on_batch` work as in `Backend.generate`.
    """
    prefix, digit_ids = score_token_ids(backend.chat)

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


def judge_all(
    backend, judge_prompts: list[str], cfg, *, seed: int, skip: Collection[int] = (), on_batch=None
) -> list[list[dict] | None]:
    """Every judgment of every rendered judge prompt, as `cfg` (a JudgeConfig) says: stage 03 and stage
    06 both judge through here, so stage 06 measures the judge the loop uses.

    - mode sample: cfg.num_samples sampled judgments, each scored by its last "Score: N" line.
    - mode logits, format score_first: one forward pass; the score is the expected digit after "Score:".
    - mode logits, format score_last: a greedy justification of up to cfg.max_new_tokens tokens (cut
      at any score line the judge wrote itself), then the expected digit after "Score:" on the next
      line, where SFT taught the model to put it.
    Returns a list of judgments per prompt, each {"score", "text", ...}; `skip` and `on_batch` (called
    with (batch, indices, judgments per index)) work as in `Backend.generate`.
    """
    from selfreward.generation import Sampling

    if cfg.mode not in ("sample", "logits"):
        raise ValueError(f"judge.mode must be 'sample' or 'logits', got '{cfg.mode}'")
    if cfg.format not in JUDGE_FORMATS:
        raise ValueError(f"judge.format must be one of {', '.join(JUDGE_FORMATS)}, got '{cfg.format}'")
    results: list[list[dict] | None] = [None] * len(judge_prompts)

    def keep(batch: int, idx: list[int], judged: list[list[dict]]) -> None:
        for i, j in zip(idx, judged, strict=True):
            results[i] = j
        if on_batch:
            on_batch(batch, idx, judged)

    if cfg.mode == "sample":
        sampling = Sampling(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size)

        def parsed(batch, idx, gens):
            keep(batch, idx, [[{"score": parse_judge_score(g.text), "text": g.text} for g in row] for row in gens])

        backend.generate(judge_prompts, sampling, seed=seed, desc="judging", skip=skip, on_batch=parsed)
    elif cfg.format == "score_first":
        score_by_logits(
            backend,
            judge_prompts,
            cfg.batch_size,
            skip=skip,
            on_batch=lambda b, idx, js: keep(b, idx, [[j] for j in js]),
        )
    else:
        greedy = Sampling(1, 0.0, 1.0, cfg.max_new_tokens, cfg.batch_size)

        def then_read(batch, idx, gens):
            reasons = [_before_score_line(row[0].text) for row in gens]
            judged = score_by_logits(backend, [judge_prompts[i] + r + "\n" for i, r in zip(idx, reasons, strict=True)],
                                     cfg.batch_size)  # fmt: skip
            keep(batch, idx, [[{**j, "text": r + "\n" + j["text"]}] for j, r in zip(judged, reasons, strict=True)])

        backend.generate(judge_prompts, greedy, seed=seed, desc="justifying", skip=skip, on_batch=then_read)
    return results


def _before_score_line(text: str) -> str:
    """The judge's own text up to (not including) the first score line it wrote, trailing space removed."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if _SCORE_LINE.match(line) or line.strip().lower().startswith("score"):
            lines = lines[:n]
            break
    return "\n".join(lines).rstrip()
