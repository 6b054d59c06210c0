"""Benchmark: the judge modes side by side on the held-out EFT rows: quality, cost and position bias.

Every mode judges exactly the same rows, in this process, with the same batch size (the config's
judge.batch_size): the held-out EFT split the config's run would use (split_heldout with its
data.heldout_prompts, data.heldout_eft_questions and seed; 30 questions x 4 human-scored answers with
the CPU demo's config). Each question with its answers is one "prompt" as stage 03 sees it.

- logits: judge.mode logits with the config's judge.format (score_first in the CPU demo), judged as
  stage 03's score_rows judges (fit_judge_prompt, then logit_judgments);
- knockout and round_robin: judge.mode pairwise through tournament.pairwise_scores, as stage 03 calls
  it (judge.batch_size // 2 prompts per chunk); score = 5 x win share;
- reward_model: a STAND-IN for timing only. There is no trained reward model offline, so the --model's
  weights get a random one-output head (AutoModelForSequenceClassification, num_labels 1), saved to a
  temporary folder and loaded with reward_model.load_reward_model. Its quality figures are those of a
  random head and mean nothing.

For each mode: wall-clock seconds (time.perf_counter, rendering included, model loading and one small
warm-up call excluded; the modes take turns for --repeats rounds and each counts its fastest, since
other work on a shared machine slows whichever mode it meets), per answer and as a multiple of the
logit judge; judge_quality's figures against the human scores (pairwise accuracy, Spearman, Kendall
tau, with 95% bootstrap intervals over questions); and "pair accuracy", the figure DPO sees: for
each question the pair build_pairs makes from the mode's scores (min_margin 0), counted right when
humans scored its chosen answer above its rejected one (a human tie counts half), with a 95%
bootstrap interval over questions. The pairwise modes also give their position bias (the share of
comparisons whose letter did not change with the order) and comparisons per question.
judges.measure_pairwise_judge (every pair of answers with different human scores, both orders)
runs once at the end for reference.

    python bench/judge_modes.py                                  # SmolLM2-135M-Instruct, the CPU demo's config
    python bench/judge_modes.py --model /tmp/run/M0/model        # a trained M0 (stage 00's model folder)
    python bench/judge_modes.py --config configs/tiny.yaml       # a smoke test in seconds

Prints the figures and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from selfreward.judge.judges import judge_for, judge_quality, measure_pairwise_judge  # noqa: E402
from selfreward.judge.rubric import (  # noqa: E402
    fit_judge_prompt,
    logit_judgments,
    mean_score,
    pairwise_template,
    rubric_of,
)
from selfreward.judge.tournament import pairwise_scores, picked_same_letter, position_bias  # noqa: E402
from selfreward.loop.evaluation import split_heldout  # noqa: E402
from selfreward.loop.pairs import build_pairs  # noqa: E402
from selfreward.model.backends import load_backend  # noqa: E402
from selfreward.run.config import load_config  # noqa: E402
from selfreward.run.metrics import bootstrap_intervals  # noqa: E402
from selfreward.run.records import EFT, IFT, read_jsonl  # noqa: E402

MODES = ("logits", "knockout", "round_robin", "reward_model")


def heldout_rows(config) -> list[dict]:
    """The held-out EFT rows of the config's run, as response rows: prompt_id = the question's index,
    sample_index = the answer's position among its question's answers (file order)."""
    ift = read_jsonl(REPO / config.data.ift, IFT, id_field="id")
    eft = read_jsonl(REPO / config.data.eft, EFT, id_field="id")
    if config.data.heldout_eft:
        held = read_jsonl(REPO / config.data.heldout_eft, EFT, id_field="id")
    else:
        held = split_heldout(ift, eft, config.data.heldout_prompts, config.data.heldout_eft_questions, config.seed)[3]
    questions: dict[str, int] = {}
    rows = []
    for r in held:
        q = questions.setdefault(r["prompt"], len(questions))
        index = sum(1 for x in rows if x["prompt_id"] == f"q{q:03d}")
        rows.append({**r, "prompt_id": f"q{q:03d}", "response_id": r["id"], "sample_index": index})
    return rows


def interval(found: dict, key: str):
    return [round(found[key][0], 4), round(found[key][1], 4)] if found.get(key) else None


def pair_accuracy(rows: list[dict], scores: list[float | None], *, samples: int, seed: int) -> dict:
    """The pair build_pairs makes for each question from `scores` (min_margin 0), and whether humans
    scored its chosen answer above its rejected one (1, a human tie 0.5, else 0); the share over
    questions with a pair, with a 95% bootstrap interval that resamples all questions."""
    scored = [{**r, "score": s} for r, s in zip(rows, scores, strict=True)]
    pairs, dropped = build_pairs(scored, min_margin=0.0)
    human = {}
    for r in rows:
        key = (r["prompt_id"], r["response"])
        if key in human and human[key] != r["score"]:
            raise ValueError(f"question {r['prompt_id']} has the same answer twice with different human scores")
        human[key] = r["score"]
    right: dict[str, float] = {}
    margins = []
    for p in pairs:
        chosen, rejected = human[(p["prompt_id"], p["chosen"])], human[(p["prompt_id"], p["rejected"])]
        right[p["prompt_id"]] = 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
        margins.append(chosen - rejected)
    questions = sorted({r["prompt_id"] for r in rows})
    values = [right.get(q) for q in questions]

    def figures(idx: list[int], _group_of: list[str]) -> dict:
        got = [values[i] for i in idx if values[i] is not None]
        return {"pair_accuracy": sum(got) / len(got) if got else None, "pair_yield": len(got) / len(idx)}

    point = figures(list(range(len(questions))), questions)
    found = bootstrap_intervals(questions, figures, samples=samples, seed=seed) if samples else {}
    return {
        "dpo_pairs": len(pairs),
        "questions": len(questions),
        "dropped": dict(dropped),
        "pair_accuracy": None if point["pair_accuracy"] is None else round(point["pair_accuracy"], 4),
        "pair_accuracy_ci": interval(found, "pair_accuracy"),
        "human_margin": round(sum(margins) / len(margins), 3) if margins else None,
    }


def position_bias_interval(rows: list[dict], *, samples: int, seed: int):
    """tournament.position_bias with a 95% bootstrap interval over questions."""
    seen = {}
    for row in rows:
        for c in row.get("comparisons", []):
            seen[(row["prompt_id"], c["a"], c["b"])] = c
    keys = sorted(seen)
    same = [float(picked_same_letter(seen[k])) for k in keys]

    def figures(idx: list[int], _group_of: list[str]) -> dict:
        return {"position_bias": sum(same[i] for i in idx) / len(idx) if idx else None}

    found = bootstrap_intervals([k[0] for k in keys], figures, samples=samples, seed=seed) if samples else {}
    return interval(found, "position_bias")


def judge_logits(backend, rows, config, budget, seed):
    """Stage 03's score_rows for modes sample and logits."""
    rubric = rubric_of(config.judge)
    fitted = [fit_judge_prompt(backend.chat, r["prompt"], r["response"], budget, rubric) for r in rows]
    judged = logit_judgments(backend, [text for text, _ in fitted], config.judge, seed=seed)
    return [{**r, "score": mean_score([j["score"] for j in js]), "judgments": js}
            for r, js in zip(rows, judged, strict=True)]  # fmt: skip


def judge_pairwise(backend, rows, config, budget, ranking):
    """Stage 03's score_rows for mode pairwise."""
    cfg = replace(config.judge, mode="pairwise", ranking=ranking)
    scored = pairwise_scores(backend, rows, cfg, template=pairwise_template(cfg), budget=budget,
                             prompts_per_chunk=max(1, cfg.batch_size // 2))  # fmt: skip
    by_id = {r["response_id"]: r for r in scored}
    return [by_id[r["response_id"]] for r in rows]


def judge_reward(rm, rows, config, budget):
    """Stage 03's score_rows for mode reward_model."""
    fitted = [rm.render(r["prompt"], r["response"], budget) for r in rows]
    rewards = rm.score([text for text, _ in fitted], config.judge.batch_size)
    return [{**r, "score": round(x, 4)} for r, x in zip(rows, rewards, strict=True)]


def stand_in_reward_model(model_path: str, config, folder: str, seed: int):
    """The model's weights with a random one-output head, saved to `folder` and loaded as stage 03 would."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from selfreward.judge.reward_model import load_reward_model
    from selfreward.model.models import resolve_model_path

    path = resolve_model_path(model_path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    del model
    return load_reward_model(folder, config.model)


def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--model", help="a model folder (a trained M0) or builtin name (default: the config's model)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timing; each mode's fastest counts")
    parser.add_argument("--no-reference", action="store_true", help="skip measure_pairwise_judge")
    parser.add_argument("--samples", type=int, help="bootstrap resamples (default: eval.bootstrap_samples)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = load_config(REPO / args.config, {"judge.mode": "logits"})
    model = args.model or config.model.name_or_path
    samples = config.eval.bootstrap_samples if args.samples is None else args.samples
    seed = config.seed
    rows = heldout_rows(config)
    questions = len({r["prompt_id"] for r in rows})
    human = [float(r["score"]) for r in rows]
    print(f"{len(rows)} held-out answers to {questions} questions; model {model}; batch {config.judge.batch_size}")

    loaded_at = time.perf_counter()
    backend = load_backend(model, config.model, config.generation)
    print(f"judge loaded in {time.perf_counter() - loaded_at:.1f} s")
    logit_budget = judge_for(config, model=backend).budget
    pair_budget = judge_for(load_config(REPO / args.config, {"judge.mode": "pairwise"}), model=backend).budget
    # one small untimed call of each kind first, so no mode pays for the first call's set-up
    judge_logits(backend, rows[:2], config, logit_budget, seed)
    judge_pairwise(backend, rows[:2], config, pair_budget, "knockout")

    folder = tempfile.TemporaryDirectory(prefix="judge-modes-rm-")
    judges = {}
    if "reward_model" in args.modes:
        rm = stand_in_reward_model(model, config, folder.name, seed)
        rm_config = load_config(REPO / args.config, {"judge.mode": "reward_model", "judge.reward_model": folder.name})
        rm_budget = judge_for(rm_config, model=rm).budget
        judge_reward(rm, rows[:2], config, rm_budget)  # untimed warm-up
        judges["reward_model"] = lambda: judge_reward(rm, rows, config, rm_budget)
    judges["logits"] = lambda: judge_logits(backend, rows, config, logit_budget, seed)
    judges["knockout"] = lambda: judge_pairwise(backend, rows, config, pair_budget, "knockout")
    judges["round_robin"] = lambda: judge_pairwise(backend, rows, config, pair_budget, "round_robin")

    # The modes take turns, round after round, so that other work on the machine slows them alike;
    # each mode's time is its fastest round (its scores are the same in every round).
    times: dict[str, list[float]] = {mode: [] for mode in args.modes}
    scored_by: dict[str, list[dict]] = {}
    for k in range(args.repeats):
        for mode in args.modes:
            scored, seconds = timed(judges[mode])
            times[mode].append(round(seconds, 2))
            if mode in scored_by and [r["score"] for r in scored] != [r["score"] for r in scored_by[mode]]:
                print(f"note: {mode} scored differently in round {k + 1}")
            scored_by[mode] = scored
            # the 1-minute load average includes this process's own threads: about 2 on a quiet 2-core machine
            print(f"round {k + 1}: {mode} {seconds:.1f} s (load average {os.getloadavg()[0]:.1f})")

    results: dict[str, dict] = {}
    for mode in args.modes:
        scored, seconds = scored_by[mode], min(times[mode])
        scores = [r["score"] for r in scored]
        quality = judge_quality(rows, scores, samples=samples, seed=seed)
        if mode == "reward_model":
            quality["exact_match"] = None  # rewards are on no 0-5 scale
            quality["intervals"]["exact_match"] = None
        entry = {"seconds": round(seconds, 2), "seconds_per_answer": round(seconds / len(rows), 4),
                 "rounds_s": times[mode], **quality}  # fmt: skip
        entry.update(pair_accuracy(rows, scores, samples=samples, seed=seed))
        if "comparisons" in scored[0]:
            comparisons = sum(len(r["comparisons"]) for r in scored) / 2
            entry["comparisons_per_question"] = round(comparisons / questions, 3)
            entry["forward_passes_per_question"] = round(2 * comparisons / questions, 3)
            entry["position_bias"] = position_bias(scored)
            entry["position_bias_ci"] = position_bias_interval(scored, samples=samples, seed=seed)
            entry["inputs_cut"] = sum(r["judge_input_truncated"] for r in scored)
        else:
            entry["forward_passes_per_question"] = len(rows) / questions
        if mode == "logits":
            entry["format"] = config.judge.format
        if mode == "reward_model":
            entry["random_head"] = True
        results[mode] = entry
    if "reward_model" in judges:
        rm.close()
    folder.cleanup()

    reference = None
    if not args.no_reference:
        template = pairwise_template(config.judge)
        reference, seconds = timed(
            lambda: measure_pairwise_judge(backend, rows, template=template, batch_size=config.judge.batch_size,
                                           budget=pair_budget, samples=samples, seed=seed)
        )  # fmt: skip
        reference["seconds"] = round(seconds, 2)
        print(f"measure_pairwise_judge: {seconds:.1f} s for {reference['comparisons']} comparisons")
    backend.close()

    base = results.get("logits", {}).get("seconds")
    for entry in results.values():
        entry["x_logits"] = round(entry["seconds"] / base, 2) if base else None

    def ci(entry, key):
        got = entry.get("intervals", {}).get(key) if key != "pair_accuracy" else entry.get("pair_accuracy_ci")
        value = entry.get(key)
        if value is None:
            return "–"
        return f"{value:.3f} ({got[0]:.2f}–{got[1]:.2f})" if got else f"{value:.3f}"

    print()
    print("| mode | seconds | s per answer | x logit judge | pairwise accuracy (95% CI) | Spearman (95% CI) "
          "| pair accuracy (95% CI) | pairs | position bias | comparisons per question |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, e in results.items():
        bias = "–"
        if e.get("position_bias") is not None:
            lo_hi = e.get("position_bias_ci")
            bias = f"{e['position_bias']:.2f}" + (f" ({lo_hi[0]:.2f}–{lo_hi[1]:.2f})" if lo_hi else "")
        name = mode + (" (random head: timing only)" if e.get("random_head") else "")
        cells = [name, f"{e['seconds']:.1f}", f"{e['seconds_per_answer']:.3f}", e["x_logits"],
                 ci(e, "pairwise_accuracy"), ci(e, "spearman"), ci(e, "pair_accuracy"),
                 f"{e['dpo_pairs']} of {e['questions']}", bias, e.get("comparisons_per_question", "–")]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    if reference:
        lo, hi = reference["intervals"]["pairwise_accuracy"] or (None, None)
        plo, phi = reference["intervals"]["position_bias"] or (None, None)
        r = reference
        print(f"\nmeasure_pairwise_judge: {r['pairs']} pairs with different human scores, {r['comparisons']} "
              f"comparisons: pairwise accuracy {r['pairwise_accuracy']} ({lo}–{hi}), position bias "
              f"{r['position_bias']} ({plo}–{phi}), {r['seconds']} s")  # fmt: skip
    if "knockout" in results and base:
        x = results["knockout"]["x_logits"]
        verdict = "within" if x <= 3 else "NOT within"
        print(f"knockout (3 comparisons x 2 orders per 4 answers) costs {x}x the logit judge: {verdict} the 3x target")
    print(f"human scores: mean {sum(human) / len(human):.2f}")

    result = {
        "bench": "judge_modes",
        "model": model,
        "config": args.config,
        "dtype": config.model.dtype,
        "rows": len(rows),
        "questions": questions,
        "batch_size": config.judge.batch_size,
        "repeats": args.repeats,
        "modes": results,
        "reference_pairwise": reference,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
