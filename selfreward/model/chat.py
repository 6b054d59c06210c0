"""One chat format for every stage: training rows and generation prompts are rendered here only.

Rendered text is always tokenized with `add_special_tokens=False`, so the rendered text holds every
token the model sees. A tokenizer that adds BOS on its own (Mistral's, Llama's) gets it exactly once:
the rendered prompt starts with it (from the template, or added here when the template lacks it), and
the trainers, which tokenize text with the tokenizer's own special tokens on, get the text without it
(`ChatFormat.for_trainer`). Training rows and generation prompts then start with the same ids.
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


def tokenizer_added_prefix(tokenizer) -> str:
    """The text of the special tokens the tokenizer puts before any text when asked to (often BOS)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tokenizer.decode(full[:start], skip_special_tokens=False) if start else ""
    return ""


@dataclass(frozen=True)
class ChatFormat:
    """Renders a user turn into the prompt text the model continues, and knows how a turn ends."""

    tokenizer: object
    end_of_turn: str  # text the template puts after an assistant message, e.g. "<|im_end|>"
    added_prefix: str = ""  # text of the tokens the tokenizer itself puts before any text, e.g. "<s>"

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFormat:
        if not tokenizer.chat_template:
            raise ValueError("tokenizer has no chat template; call ensure_chat_template first")
        user = [{"role": "user", "content": "x"}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _MARK}], tokenize=False)
        end = full.split(_MARK, 1)[1].rstrip()
        end = end or (tokenizer.eos_token or "")
        return cls(tokenizer=tokenizer, end_of_turn=end, added_prefix=tokenizer_added_prefix(tokenizer))

    def prompt(self, user_text: str) -> str:
        messages = [{"role": "user", "content": user_text}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.added_prefix and not rendered.startswith(self.added_prefix):
            rendered = self.added_prefix + rendered  # the model was pretrained with it: keep it, once
        return rendered

    def for_trainer(self, prompt: str) -> str:
        """A rendered prompt as TRL's trainers want it: they tokenize with special tokens on, so the
        tokens the tokenizer adds itself (BOS) are left for it to add, rather than doubled."""
        if self.added_prefix and prompt.startswith(self.added_prefix):
            return prompt[len(self.added_prefix) :]
        return prompt

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


def cut_to_fit(render, encode, decode, question: str, response: str, max_tokens: int, *, what: str):
    """(render(question, response) within `max_tokens` tokens, whether anything was cut): the end of the
    response is cut first, then the end of the question; ValueError names `what` if the rest alone is
    too long."""
    rendered = render(question, response)
    overflow = len(encode(rendered)) - max_tokens
    if overflow <= 0:
        return rendered, False
    for _ in range(8):  # each pass removes at least the measured overflow; re-tokenizing can merge differently
        r_ids = encode(response)
        cut = min(len(r_ids), overflow)
        response = decode(r_ids[: len(r_ids) - cut])
        if cut < overflow:
            q_ids = encode(question)
            question = decode(q_ids[: max(0, len(q_ids) - (overflow - cut))])
        rendered = render(question, response)
        overflow = len(encode(rendered)) - max_tokens
        if overflow <= 0:
            return rendered, True
    raise ValueError(f"{what} alone is longer than {max_tokens} tokens")
