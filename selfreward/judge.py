"""The model as its own judge: the additive 0-5 rubric and reading the score out of a judgment."""

from __future__ import annotations

import re
import statistics

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


def score_by_logits(model, chat, judge_turns: list[str], batch_size: int) -> list[dict]:
    """Judge in one forward pass per batch: the expected score under the next-token distribution.

    The judge's answer is opened with "Score:" and the probabilities of the digits 0-5 that follow
    are renormalised; the score is their expectation, a continuous value with far fewer ties.
    Returns one judgment per prompt: {"score", "text", "distribution", "mass"}.
    """
    import torch

    prefix, digit_ids = score_token_ids(chat)
    texts = [chat.prompt(turn) + prefix for turn in judge_turns]
    encoded = [chat.encode(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    pad_id = chat.tokenizer.pad_token_id
    results: list[dict | None] = [None] * len(texts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[row, width - len(encoded[i]) :] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, -1, :]
            probs = torch.softmax(logits.float(), dim=-1)[:, digit_ids]
            for row, i in enumerate(idx):
                mass = float(probs[row].sum())
                dist = (probs[row] / mass).tolist()
                expected = sum(d * p for d, p in enumerate(dist))
                results[i] = {
                    "score": round(expected, 4),
                    "text": prefix.strip(),
                    "distribution": [round(p, 4) for p in dist],
                    "mass": round(mass, 4),
                }
    return results  # type: ignore[return-value]
