"""New prompts from few-shot prompting: building the request, extracting the task, filtering copies."""

from __future__ import annotations

import difflib
import random
import re

from selfreward.chat import packaged_template

_NEXT_LABEL = re.compile(r"(?:^|\n)\s*\**task\s*\d+\s*\**\s*:", re.IGNORECASE)


def fewshot_request(shots: list[str]) -> tuple[str, str]:
    """(user turn listing the shots, text that opens the assistant's answer: "Task N+1:")."""
    examples = "\n\n".join(f"Task {i}: {shot}" for i, shot in enumerate(shots, start=1))
    label = f"Task {len(shots) + 1}:"
    user = packaged_template("prompt_generation.txt").format(examples=examples, next_number=len(shots) + 1)
    return user, label


def extract_new_task(generated: str) -> str:
    """The task the model wrote after the opening label, up to any further "Task N:" it went on with."""
    text = _NEXT_LABEL.split(generated, maxsplit=1)[0]
    return text.strip().strip('"').strip()


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class PromptFilter:
    """Accepts a candidate prompt only if it is new: not empty, not overlong, no copy of what it has seen.

    `known` holds the seed prompts (the shots come from them) and grows with every accepted prompt, so
    a candidate is compared with the shots, every IFT prompt and every earlier new prompt.
    """

    def __init__(self, known: list[str], min_chars: int, max_chars: int, near_threshold: float):
        self.min_chars, self.max_chars, self.near_threshold = min_chars, max_chars, near_threshold
        self.seed = {normalize(p) for p in known}
        self.accepted: set[str] = set()

    def reject_reason(self, prompt: str) -> str | None:
        norm = normalize(prompt)
        if len(prompt) < self.min_chars or not norm:
            return "empty_or_short"
        if len(prompt) > self.max_chars:
            return "too_long"
        if norm in self.seed:
            return "copy_of_seed"
        if norm in self.accepted:
            return "duplicate"
        for other in (*self.seed, *self.accepted):
            matcher = difflib.SequenceMatcher(None, norm, other, autojunk=False)
            if matcher.real_quick_ratio() >= self.near_threshold and matcher.ratio() >= self.near_threshold:
                return "near_copy_of_seed" if other in self.seed else "near_duplicate"
        return None

    def add(self, prompt: str) -> str | None:
        """Accept `prompt` (returns None) or say why not."""
        reason = self.reject_reason(prompt)
        if reason is None:
            self.accepted.add(normalize(prompt))
        return reason


def pick_shots(pool: list[str], k: int, rng: random.Random) -> list[str]:
    return rng.sample(pool, min(k, len(pool)))
