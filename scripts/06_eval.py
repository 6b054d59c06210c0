"""Stage 06: is M<t> better than M<t-1> and M0, is its judge any good, and is the loop drifting?

Reads:  <run>/M0/train/heldout_prompts.jsonl (or --prompts FILE), M0/train/heldout_eft.jsonl,
        the models M0, M<t-1>, M<t>, and iteration t's prompts/responses/scores/preferences
Writes: <run>/M<t>/eval/eval.json and eval.{manifest.json,config.yaml}; <run>/report.md and
        <run>/report/*.png, rewritten from every iteration's eval.json

1. Head-to-head: each model answers the held-out prompts greedily; the judge (eval.judge_model, by
   default M<t>) is shown both answers in both orders and picks A or B from its next-token
   probabilities. M<t> wins a prompt only if it is picked in both orders; a pick that follows the
   position is a tie. With eval.head_to_head scores, the judge grades each answer alone with the loop's
   rubric instead, and the higher score wins (by more than eval.score_margin). Win rate and preference
   (ties count half), each with its 95% bootstrap interval over prompts.
2. Judge quality of every loaded model on held-out EFT rows, judged as stage 03 judges (judge.mode,
   judge.format): pairwise accuracy, exact match, Spearman and Kendall tau against the human scores,
   each with a 95% bootstrap interval over questions (eval.bootstrap_samples). Stage 03 measured M0
   and M<t-1> that way already (its gate check); those figures are reused when its settings match.
3. Drift of iteration t: response length, distinct-1/2, score histogram, tie rate, parse failures,
   pair yield, and the length gap between chosen and rejected answers.
4. With eval.benchmark: M<t> answers every benchmark prompt greedily and the head-to-head judge compares each
   answer with the prompt's reference in both orders, as in 1. Per prompt to M<t>/eval/benchmark.jsonl; the
   win rate and the length-controlled win rate, each with its 95% bootstrap interval, to eval.json; the
   answers for AlpacaEval (eval/alpaca_eval/model_outputs.json) and MT-Bench (eval/mt_bench/<run>-M<t>.jsonl).

    python scripts/06_eval.py --run-dir runs/demo --iteration 2
    python scripts/06_eval.py --run-dir runs/demo --iteration 2 --prompts my_prompts.jsonl
"""

import time
from pathlib import Path

from selfreward.judge.endpoint import EndpointError, endpoint_from_config
from selfreward.judge.head_to_head import EndpointPicker, model_picker
from selfreward.judge.judges import Judge, judge_for
from selfreward.judge.rubric import pairwise_template, template_files
from selfreward.loop.benchmark import alpaca_eval_outputs, judged_rows, mt_bench_answers, read_benchmark, win_rates
from selfreward.loop.evaluation import drift
from selfreward.model.models import prompt_budget
from selfreward.run.records import (
    EFT,
    PREFERENCE,
    PROMPT,
    RESPONSE,
    SCORE,
    read_jsonl,
    read_manifest,
    write_json,
    write_jsonl,
)
from selfreward.stage import StageError, parse_stage, run
from selfreward.tools.report import write_report

# Iteration t's records whose drift this stage measures.
ITERATION_FILES = ("prompts", "responses", "scores", "preferences")


def option(parser) -> None:
    parser.add_argument("--prompts", help="a JSONL file with a 'prompt' field per row (default: the held-out prompts)")


def asked(judge, question: str, rows: list[tuple[str, str, str]], template: str):
    """judge.picks (each (question, X, Y)'s picks, "A", "B" or None, with X shown first, then Y first) or
    judge.compare (X against Y: head-to-head figures), a StageError naming the judge when it cannot answer."""
    try:
        return getattr(judge, question)(rows, template)
    except (ValueError, EndpointError) as exc:
        raise StageError(f"the head-to-head judge ({judge.name}): {exc}") from None


def measured_by_stage_03(layout, m: int, config) -> dict | None:
    """Stage 03 of iteration m+1 judged the held-out EFT rows with M<m> before making pairs; when it did
    so with the same judge settings, its figures are the ones this stage would compute again."""
    manifest = read_manifest(layout.manifest("03_gen_scores", m + 1)) or {}
    heldout = (manifest.get("judge_check") or {}).get("heldout")
    used = manifest.get("config") or {}
    # They change what happens after the measurement, or what else stage 03 judges, not the measurement.
    ignore = {"gate", "noise_samples", "canaries", "canary_gate", "canary_max_fool_rate"}

    def judge(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in ignore}

    same = (
        manifest.get("complete")
        and judge(used.get("judge", {})) == judge(config.to_dict()["judge"])
        and used.get("seed") == config.seed
        and used.get("eval", {}).get("bootstrap_samples") == config.eval.bootstrap_samples
    )
    return {**heldout, "measured_by": f"03_gen_scores iteration {m + 1}"} if same and heldout else None


def main() -> None:
    stage = parse_stage("06_eval", __doc__, extra_args=option)
    config, layout, t = stage.config, stage.layout, stage.iteration
    prompts_path = Path(stage.args.prompts) if stage.args.prompts else layout.heldout("prompts")
    stage.begin(inputs=inputs_of(stage, prompts_path))
    questions, eft = read_heldout(prompts_path, layout.heldout("eft"))
    benchmark = read_benchmark(config.eval.benchmark) if config.eval.benchmark else []

    answers, quality, judge, benchmark_answers = answers_and_judge_quality(config, layout, t, questions, eft, benchmark)
    comparisons = head_to_heads(judge, questions, answers, config, t)
    judged = judged_benchmark(judge, benchmark, benchmark_answers, config)
    judge.close()
    result = {
        "iteration": t,
        "model": f"M{t}",
        "prompts_file": str(prompts_path),
        "judge_model": judge.name,
        **judge.report(),
        "head_to_head": comparisons,
        "judge_quality": quality,
        **iteration_figures(layout, t),
        **({"benchmark": benchmark_figures(judged, config)} if judged else {}),
        "answers": {f"M{m}": answers[m] for m in sorted(answers)},
    }

    out = layout.eval_result(t)
    stage.start_writing()
    benchmark_files = write_benchmark_files(layout, t, judged)
    write_json(out, result)
    write_report(layout)
    stage.finish(
        rows_in=len(questions) + len(benchmark),
        rows_out=sum(c["prompts"] for c in comparisons.values()) + len(judged),
        outputs=[str(out), *benchmark_files],
        also_version=[layout.report, layout.report_dir],
    )


def inputs_of(stage, prompts_path: Path) -> list:
    """What the stage reads: the prompts, the held-out EFT rows, the models, iteration t's records, stage 03's
    manifests (their measurements are reused), eval.judge_model when it is a folder, eval.benchmark, the judge's
    templates."""
    config, layout, t = stage.config, stage.layout, stage.iteration
    names = sorted({0, t - 1, t})
    inputs = [prompts_path, layout.heldout("eft"), *[layout.model(m) for m in names]]
    inputs += [layout.generated(t, n) for n in ITERATION_FILES]
    inputs += [layout.manifest("03_gen_scores", m + 1) for m in names if m < t]
    if config.eval.judge_model and Path(config.eval.judge_model).exists():
        inputs.append(config.eval.judge_model)
    if config.eval.benchmark:
        inputs.append(config.eval.benchmark)
    return inputs + template_files(config.judge)


def read_heldout(prompts_path: Path, eft_path: Path) -> tuple[list[str], list[dict]]:
    """The questions the models answer and the EFT rows the judge is measured on."""
    questions = [r["prompt"] for r in read_jsonl(prompts_path, {"prompt": (str,)})]
    eft = read_jsonl(eft_path, EFT, id_field="id")
    if not questions:
        raise StageError(f"{prompts_path} has no prompts to evaluate on")
    return questions, eft


def answers_and_judge_quality(config, layout, t: int, questions: list[str], eft: list[dict], benchmark: list[dict]):
    """Each of M0, M<t-1> and M<t> answers the questions greedily, loaded one at a time, and M<t> the benchmark's
    prompts too; the judge the loop uses is measured on the EFT rows (see measured). Returns the answers by
    model, the judge quality by judge, the head-to-head judge, loaded (M<t>, which stays loaded after
    answering, or eval.judge_model), and M<t>'s answers to the benchmark."""
    from selfreward.model.backends import load_backend  # torch: a complete stage exits without loading it

    quality = {}
    loop_judge = judge_for(config, layout.model(t), f"M{t}")
    if eft and loop_judge.fixed:  # before the policies: two 7B models may not share a card
        quality[loop_judge.name] = measured(loop_judge, eft, layout, t - 1, config)
        loop_judge.close()
    answers, kept, benchmark_answers = {}, None, []
    for m in sorted({0, t - 1, t}):  # ascending: M<t> comes last and, by default, stays loaded as the judge
        backend = load_backend(layout.model(m), config.model, config.generation)
        answers[m] = greedy_answers(backend, questions, config, f"M{m}")
        if m == t and benchmark:
            benchmark_answers = greedy_answers(backend, [r["prompt"] for r in benchmark], config, f"M{m} benchmark")
        if eft and not loop_judge.fixed:  # the model judges as it judges in stage 03
            quality[f"M{m}"] = measured(
                judge_for(config, layout.model(m), f"M{m}", model=backend), eft, layout, m, config
            )
        if m == t and not config.eval.judge_model and not config.eval.judge_endpoint:
            kept = model_picker(config, backend, layout.model(t), str(layout.model(t)))
        else:
            backend.close()
    return answers, quality, kept or head_to_head_judge(config, layout), benchmark_answers


def head_to_head_judge(config, layout):
    """The head-to-head judge when it is not M<t>: the outside endpoint, or eval.judge_model loaded."""
    from selfreward.model.backends import load_backend  # torch

    endpoint = endpoint_from_config(config.eval)
    if endpoint:
        return EndpointPicker(endpoint, layout.endpoint_cache, config)
    backend = load_backend(config.eval.judge_model, config.model, config.generation)
    return model_picker(config, backend, config.eval.judge_model, str(config.eval.judge_model))


def greedy_answers(backend, questions: list[str], config, name: str) -> list[str]:
    """The model's greedy answer to each question, cut to fit its context with eval.max_new_tokens to spare."""
    from selfreward.model.generation import Sampling  # torch

    greedy = Sampling(1, 0.0, 1.0, config.eval.max_new_tokens, config.eval.batch_size)
    budget = prompt_budget(backend.context_length, config.model, config.eval.max_new_tokens)
    gens = backend.generate([backend.chat.fit(q, budget)[0] for q in questions], greedy, seed=config.seed, desc=name)
    return [g[0].text for g in gens]


def measured(judge: Judge, eft: list[dict], layout, m: int, config) -> dict:
    """The judge's quality on the EFT rows: stage 03's figures when it measured M<m> (or the fixed judge in
    iteration m+1) with the same settings, else measured here."""
    reused = measured_by_stage_03(layout, m, config)
    return reused or judge.measure(eft, samples=config.eval.bootstrap_samples, seed=config.seed)


def head_to_heads(judge, questions: list[str], answers: dict[int, list[str]], config, t: int) -> dict:
    """M<t> against M<t-1> and M0, the judge asked in both orders."""
    comparisons, template = {}, pairwise_template(config.judge)
    for other in sorted({t - 1, 0}, reverse=True):
        triples = list(zip(questions, answers[t], answers[other], strict=True))
        comparisons[f"M{t} vs M{other}"] = asked(judge, "compare", triples, template)
    return comparisons


def judged_benchmark(judge, benchmark: list[dict], answers: list[str], config) -> list[dict]:
    """M<t>'s answer to each benchmark prompt against the prompt's reference, judged as the head-to-head is."""
    if not benchmark:
        return []
    triples = [(row["prompt"], answer, row["reference"]) for row, answer in zip(benchmark, answers, strict=True)]
    as_a, as_b = asked(judge, "picks", triples, pairwise_template(config.judge))
    return judged_rows(benchmark, answers, as_a, as_b)


def benchmark_figures(judged: list[dict], config) -> dict:
    """What eval.json says of the benchmark: the file, and the win rates with their intervals."""
    samples = config.eval.bootstrap_samples
    return {"file": config.eval.benchmark, **win_rates(judged, samples=samples, seed=config.seed)}


def write_benchmark_files(layout, t: int, judged: list[dict]) -> list[str]:
    """The judged benchmark rows, and M<t>'s answers as AlpacaEval and FastChat's MT-Bench read them."""
    if not judged:
        return []
    name = layout.benchmark_model_id(t)
    write_jsonl(layout.benchmark(t), judged)
    write_json(layout.alpaca_eval_outputs(t), alpaca_eval_outputs(judged, name))
    write_jsonl(layout.mt_bench_answers(t), mt_bench_answers(judged, name, tstamp=round(time.time(), 3)))
    return [str(p) for p in (layout.benchmark(t), layout.alpaca_eval_outputs(t), layout.mt_bench_answers(t))]


def iteration_figures(layout, t: int) -> dict:
    """Drift of iteration t, and what stage 04 found when it made pairs."""
    files = {n: layout.generated(t, n) for n in ITERATION_FILES}

    def rows(name: str, schema: dict) -> list[dict]:
        return read_jsonl(files[name], schema) if files[name].is_file() else []

    responses, scores = rows("responses", RESPONSE), rows("scores", SCORE)
    pairs, prompts = rows("preferences", PREFERENCE), rows("prompts", PROMPT)
    made_pairs = read_manifest(layout.manifest("04_gen_preferences", t)) or {}
    return {
        # RAFT makes no pairs: its pair figures are unknown, not zero
        "drift": drift(responses, scores, pairs if files["preferences"].is_file() else None, len(prompts)),
        "gate": made_pairs.get("gate"),
        "consistency": made_pairs.get("consistency"),  # preferences.consistency: how alike two judges rank
    }


if __name__ == "__main__":
    run(main)
