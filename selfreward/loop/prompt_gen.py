"""New prompts from few-shot prompting: building the request, extracting the task, filtering copies."""

from __future__ import annotations

import difflib
import hashlib
import random
import re
from collections import Counter, defaultdict

from selfreward.model.chat import packaged_template

_NEXT_LABEL = re.compile(r"(?:^|\n)\s*\**task\s*\d+\s*\**\s*:", re.IGNORECASE)


def fewshot_request(shots: list[str]) -> tuple[str, str]:
    """(user turn listing the shots, text that opens the assistant's answer: "Task N+1:")."""
    examples = "\n\n".join(f"Task {i}: {shot}" for i, shot in enumerate(shots, start=1))
    label = f"Task {len(shots) + 1}:"
    user = packaged_template("prompt_generation.txt").format(examples=examples, next_number=len(shots) + 1)
    return user, label


def fit_fewshot_request(chat, shots: list[str], max_tokens: int) -> tuple[str | None, int]:
    """(the rendered request, opened with its "Task N+1:" label, within `max_tokens`; how many shots were
    dropped for it to fit). The longest shots go first, the rest keep their order; None when not even one
    shot fits: a request over the context would make vLLM fail the whole call.
    """
    lengths = [len(chat.encode(shot)) for shot in shots]
    kept = list(range(len(shots)))
    while True:
        user, label = fewshot_request([shots[i] for i in kept])
        request = chat.prompt(user) + label
        overflow = len(chat.encode(request)) - max_tokens
        if overflow <= 0:
            return request, len(shots) - len(kept)
        if len(kept) == 1:
            return None, len(shots)
        freed = 0  # counts the shots' own tokens only: their labels free more, checked on the next pass
        while freed < overflow and len(kept) > 1:
            longest = max(kept, key=lambda i: (lengths[i], i))
            kept.remove(longest)
            freed += lengths[longest]


def extract_new_task(generated: str) -> str:
    """The task the model wrote after the opening label, up to any further "Task N:" it went on with."""
    text = _NEXT_LABEL.split(generated, maxsplit=1)[0]
    return text.strip().strip('"').strip()


def is_cut_off(generated: str, finish_reason: str) -> bool:
    """The model ran out of tokens in the middle of its task: it neither ended its turn nor went on to
    a next "Task N:" (which would mean the task before it was complete)."""
    return finish_reason == "length" and not _NEXT_LABEL.search(generated)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def prompt_id(prompt: str) -> str:
    """A prompt's stable id: a hash of its normalised text, so the same prompt has the same id in every file."""
    return "p-" + hashlib.sha256(normalize(prompt).encode()).hexdigest()[:12]


class PromptFilter:
    """Accepts a candidate prompt only if it is new: not empty, not overlong, no copy of what it has seen.

    `known` holds the seed prompts (the shots come from them) and grows with every accepted prompt, so
    a candidate is compared with the shots, every IFT prompt and every earlier new prompt. A near copy
    has a character-level similarity of at least `near_threshold`; only texts that share at least
    half of the candidate's words are compared, so thousands of prompts stay cheap.
    """

    def __init__(self, known: list[str], min_chars: int, max_chars: int, near_threshold: float):
        self.min_chars, self.max_chars, self.near_threshold = min_chars, max_chars, near_threshold
        self.texts: list[str] = []
        self.is_seed: list[bool] = []
        self.by_word: dict[str, list[int]] = defaultdict(list)
        self.position: dict[str, int] = {}  # normalised text -> its index in self.texts
        for prompt in known:
            self._remember(normalize(prompt), seed=True)

    def _remember(self, norm: str, seed: bool) -> None:
        if norm in self.position:
            return
        self.position[norm] = len(self.texts)
        for word in set(norm.split()):
            self.by_word[word].append(len(self.texts))
        self.texts.append(norm)
        self.is_seed.append(seed)

    def reject_reason(self, prompt: str) -> str | None:
        norm = normalize(prompt)
        if len(prompt) < self.min_chars or not norm:
            return "empty_or_short"
        if len(prompt) > self.max_chars:
            return "too_long"
        if norm in self.position:
            return "copy_of_seed" if self.is_seed[self.position[norm]] else "duplicate"
        words = set(norm.split())
        shared = Counter(i for word in words for i in self.by_word.get(word, ()))
        for i, count in shared.items():
            if count * 2 < len(words):
                continue
            matcher = difflib.SequenceMatcher(None, norm, self.texts[i], autojunk=False)
            if matcher.quick_ratio() >= self.near_threshold and matcher.ratio() >= self.near_threshold:
                return "near_copy_of_seed" if self.is_seed[i] else "near_duplicate"
        return None

    def add(self, prompt: str) -> str | None:
        """Accept `prompt` (returns None) or say why not."""
        reason = self.reject_reason(prompt)
        if reason is None:
            self._remember(normalize(prompt), seed=False)
        return reason


def pick_shots(pool: list[str], k: int, rng: random.Random) -> list[str]:
    return rng.sample(pool, min(k, len(pool)))
