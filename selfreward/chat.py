"""One chat format for every stage: training rows and generation prompts are rendered here only.

Rendered text is always tokenized with `add_special_tokens=False`: the template itself decides
whether a BOS token is present, so training and generation see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_MARK = "\x00ANSWER\x00"


def packaged_template(name: str) -> str:
    return resources.files("selfreward").joinpath("templates", name).read_text(encoding="utf-8")


def ensure_chat_template(tokenizer, fallback_path: str | None = None) -> None:
    """Give a tokenizer without a chat template the configured fallback (saved with every model)."""
    if tokenizer.chat_template:
        return
    if fallback_path:
        path = Path(fallback_path)
        if not path.is_file():
            raise FileNotFoundError(f"model.fallback_chat_template: file not found: {path}")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    else:
        tokenizer.chat_template = packaged_template("fallback_chat_template.jinja")


@dataclass(frozen=True)
class ChatFormat:
    """Renders a user turn into the prompt text the model continues, and knows how a turn ends."""

    tokenizer: object
    end_of_turn: str  # text the template puts after an assistant message, e.g. "<|im_end|>"

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFormat:
        if not tokenizer.chat_template:
            raise ValueError("tokenizer has no chat template; call ensure_chat_template first")
        user = [{"role": "user", "content": "x"}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _MARK}], tokenize=False)
        end = full.split(_MARK, 1)[1].rstrip()
        return cls(tokenizer=tokenizer, end_of_turn=end or (tokenizer.eos_token or ""))

    def prompt(self, user_text: str) -> str:
        messages = [{"role": "user", "content": user_text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def fit(self, user_text: str, max_tokens: int) -> tuple[str, bool]:
        """The rendered prompt, with the user's text cut so the whole fits in `max_tokens`; and whether it was cut."""
        rendered = self.prompt(user_text)
        overflow = len(self.encode(rendered)) - max_tokens
        if overflow <= 0:
            return rendered, False
        ids = self.encode(user_text)
        while overflow > 0 and ids:
            ids = ids[: max(0, len(ids) - overflow)]
            rendered = self.prompt(self.tokenizer.decode(ids))
            overflow = len(self.encode(rendered)) - max_tokens  # re-tokenizing can merge differently
        if overflow > 0:
            raise ValueError(f"the chat template alone is longer than {max_tokens} tokens")
        return rendered, True

    def completion(self, answer: str) -> str:
        """The training target for an answer: the answer and the end-of-turn marker."""
        return answer + self.end_of_turn

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stop_token_ids(self) -> list[int]:
        """Tokens that end an answer: EOS, and the end-of-turn marker where it is one token."""
        ids = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        end_ids = self.encode(self.end_of_turn) if self.end_of_turn else []
        if len(end_ids) == 1 and end_ids[0] not in ids:
            ids.append(end_ids[0])
        return ids
