"""One chat format for every stage: training rows and generation prompts are rendered here only.

`python -m selfreward.chat --run-dir R --model M2` (or `--compare M0 M2`) talks to a run's models.

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


def _chat_main(argv: list[str] | None = None) -> int:
    """python -m selfreward.chat --run-dir R --model M2 [--compare M0 M2]: talk to a run's models.

    Each line you type is a new single-turn conversation (the loop trains and judges single turns),
    rendered with the template every stage used. With --compare, every model named answers in turn;
    they stay loaded together only if they fit (never two vLLM engines), else each loads in turn.
    Questions piped in (`< questions.txt`) are answered by one model at a time, each loaded once.
    An empty line or end of input quits.
    """
    import argparse
    import os
    import sys

    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the turns
    from selfreward.generation import Sampling, load_backend
    from selfreward.run.config import load_config
    from selfreward.run.layout import RunLayout

    parser = argparse.ArgumentParser(prog="python -m selfreward.chat", description=_chat_main.__doc__)
    parser.add_argument("--run-dir", required=True, type=Path)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="M0, M1, M2, ...")
    group.add_argument("--compare", nargs="+", metavar="MODEL", help="several models answer each question")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    args = parser.parse_args(argv)
    layout = RunLayout(args.run_dir)
    if not layout.config.is_file():
        print(f"error: {layout.config}: not found; is {args.run_dir} a run folder?", file=sys.stderr)
        return 2
    config = load_config(layout.config)
    names = args.compare or [args.model]
    folders = {}
    for name in names:
        t = layout.model_number(name)
        if t is None or not (layout.model(t) / "config.json").is_file():
            print(
                f"error: no model '{name}' in {args.run_dir} (expected M0, M1, ... with a merged model)",
                file=sys.stderr,
            )
            return 2
        folders[name] = layout.model(t)
    sampling = Sampling(1, args.temperature, 1.0, args.max_new_tokens, 8)
    interactive = sys.stdin.isatty()
    if not interactive:  # piped questions: each model loads once, answers them all, and goes
        questions = []
        for line in sys.stdin:
            if not line.strip():
                break
            questions.append(line.strip())
        answers = _answer_in_turn(folders, questions, config, sampling)
        for i in range(len(questions)):
            for name in names:
                print(f"{name}> {answers[name][i]}", flush=True)
        return 0
    held = {}
    if _fit_together(folders, config):
        held = {name: load_backend(folder, config.model, config.generation) for name, folder in folders.items()}
    else:
        print(f"note: {', '.join(names)} do not fit in memory together: each loads in turn for every question")
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        if held:
            for name, backend in held.items():
                prompt = _fitted_prompt(backend, line.strip(), config, sampling)
                (generation,) = backend.generate([prompt], sampling, seed=config.seed)[0]
                print(f"{name}> {generation.text.strip()}", flush=True)
        else:
            answers = _answer_in_turn(folders, [line.strip()], config, sampling)
            for name in names:
                print(f"{name}> {answers[name][0]}", flush=True)
    for backend in held.values():
        backend.close()
    return 0


def _fitted_prompt(backend, question: str, config, sampling) -> str:
    """The question rendered and cut to what the context leaves after the answer, as stage 06 does it:
    vLLM fails a call whose prompt is longer than its context."""
    from selfreward.models import prompt_budget

    return backend.chat.fit(question, prompt_budget(backend.context_length, config.model, sampling.max_new_tokens))[0]


def _answer_in_turn(folders: dict, questions: list[str], config, sampling) -> dict[str, list[str]]:
    """Every model answers every question, one model in memory at a time (two 7B models do not share a
    24 GB card, and two vLLM engines would each reserve most of it)."""
    import gc

    from selfreward.generation import load_backend

    answers = {}
    for name, folder in folders.items():
        backend = load_backend(folder, config.model, config.generation)
        prompts = [_fitted_prompt(backend, q, config, sampling) for q in questions]
        answers[name] = [gen.text.strip() for (gen,) in backend.generate(prompts, sampling, seed=config.seed)]
        backend.close()
        del backend
        gc.collect()
    return answers


def _fit_together(folders: dict, config) -> bool:
    """Whether the models can all stay loaded: one model always can; vLLM engines never share a GPU here;
    otherwise their weights, with a fifth to spare, must fit in the free memory of the device."""
    import torch

    from selfreward.generation import choose_backend
    from selfreward.models import _available_host_ram, device_of

    if len(folders) == 1:
        return True
    if choose_backend(config.generation.backend) == "vllm":
        return False
    size = sum(f.stat().st_size for folder in folders.values() for f in Path(folder).glob("*.safetensors"))
    if device_of(config.model).startswith("cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        free = _available_host_ram()
    return free is None or size * 1.2 <= free


if __name__ == "__main__":
    raise SystemExit(_chat_main())
