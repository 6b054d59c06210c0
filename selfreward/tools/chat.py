"""Talk to a run's models in the terminal, one question at a time, in the chat format every stage used.

python -m selfreward.tools.chat --run-dir runs/default --model M2            # type a question, M2 answers
python -m selfreward.tools.chat --run-dir runs/default --compare M0 M2       # both answer each question
python -m selfreward.tools.chat --run-dir runs/default --model M2 < questions.txt
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from selfreward.model.models import available_host_ram, device_of, prompt_budget
from selfreward.run.config import load_config
from selfreward.run.layout import RunLayout


def main(argv: list[str] | None = None) -> int:
    """python -m selfreward.tools.chat --run-dir R --model M2 [--compare M0 M2]: talk to a run's models.

    Each line you type is a new single-turn conversation (the loop trains and judges single turns),
    rendered with the template every stage used. With --compare, every model named answers in turn;
    they stay loaded together only if they fit (never two vLLM engines), else each loads in turn.
    Questions piped in (`< questions.txt`) are answered by one model at a time, each loaded once.
    An empty line or end of input quits.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the turns
    # Imported after that line, which tqdm reads when it is imported; and torch with them.
    from selfreward.model import backends
    from selfreward.model.generation import Sampling

    parser = argparse.ArgumentParser(prog="python -m selfreward.tools.chat", description=main.__doc__)
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
        held = {
            name: backends.load_backend(folder, config.model, config.generation) for name, folder in folders.items()
        }
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
    return backend.chat.fit(question, prompt_budget(backend.context_length, config.model, sampling.max_new_tokens))[0]


def _answer_in_turn(folders: dict, questions: list[str], config, sampling) -> dict[str, list[str]]:
    """Every model answers every question, one model in memory at a time (two 7B models do not share a
    24 GB card, and two vLLM engines would each reserve most of it)."""
    from selfreward.model import backends  # torch

    answers = {}
    for name, folder in folders.items():
        backend = backends.load_backend(folder, config.model, config.generation)
        prompts = [_fitted_prompt(backend, q, config, sampling) for q in questions]
        answers[name] = [gen.text.strip() for (gen,) in backend.generate(prompts, sampling, seed=config.seed)]
        backend.close()
        del backend
        gc.collect()
    return answers


def _fit_together(folders: dict, config) -> bool:
    """Whether the models can all stay loaded: one model always can; vLLM engines never share a GPU here;
    otherwise their weights, with a fifth to spare, must fit in the free memory of the device."""
    import torch  # heavy

    from selfreward.model.backends import choose_backend  # torch

    if len(folders) == 1:
        return True
    if choose_backend(config.generation.backend) == "vllm":
        return False
    size = sum(f.stat().st_size for folder in folders.values() for f in Path(folder).glob("*.safetensors"))
    if device_of(config.model).startswith("cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_host_ram()
    return free is None or size * 1.2 <= free


if __name__ == "__main__":
    raise SystemExit(main())
