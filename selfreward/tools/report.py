"""runs/<name>/report.md with PNG plots: every iteration's eval.json and the trainers' logs at a glance."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from selfreward.run.config import run_algorithm
from selfreward.run.layout import RunLayout
from selfreward.run.records import read_manifest, write_text

QUALITY = ("pairwise_accuracy", "exact_match", "spearman", "kendall_tau")


def load_evals(layout: RunLayout) -> list[dict]:
    evals, t = [], 1
    while layout.model_root(t).exists():
        path = layout.eval_result(t)
        if path.is_file():
            evals.append(json.loads(path.read_text()))
        t += 1
    return evals


def _train_log(layout: RunLayout, t: int) -> list[dict]:
    path = layout.train_log(t)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _figure(title: str, ncols: int = 1):
    import matplotlib  # heavy

    matplotlib.use("Agg")  # files only: no display on a training box
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its INFO lines are about fonts and units
    import matplotlib.pyplot as plt  # heavy

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), squeeze=False)
    fig.suptitle(title, fontsize=12)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_scores(evals: list[dict], out: Path) -> str:
    plt, fig, (ax,) = _figure("Self-assigned scores per iteration")
    width = 0.8 / max(1, len(evals))
    for k, e in enumerate(evals):
        hist = e["drift"]["score_histogram"]
        counts = [hist[str(s)] for s in range(6)]
        ax.bar([s + k * width for s in range(6)], counts, width, label=f"iteration {e['iteration']}")
    ax.set_xticks([s + 0.4 - width / 2 for s in range(6)], [str(s) for s in range(6)])
    ax.set_xlabel("score (nearest point, 0-5)")
    ax.set_ylabel("responses")
    ax.legend()
    return _save(plt, fig, out)


def plot_lengths(evals: list[dict], out: Path) -> str:
    plt, fig, (chars, tokens) = _figure("Response length per iteration", 2)
    its = [e["iteration"] for e in evals]
    chars.plot(its, [e["drift"]["response_chars"] or 0 for e in evals], marker="o")
    chars.set_ylabel("mean characters per response")
    tokens.plot(its, [e["drift"]["response_tokens"] or 0 for e in evals], marker="o", color="tab:orange")
    tokens.set_ylabel("mean tokens per response")
    for ax in (chars, tokens):
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        ax.set_ylim(bottom=0)
    return _save(plt, fig, out)


def plot_head_to_head(evals: list[dict], out: Path) -> str:
    rows = [(name, c) for e in evals for name, c in e["head_to_head"].items()]
    plt, fig, (ax,) = _figure("Head-to-head on held-out prompts")
    labels = [name for name, _ in rows]
    left = [0] * len(rows)
    for key, color in (("wins", "tab:green"), ("ties", "tab:gray"), ("losses", "tab:red")):
        values = [c[key] for _, c in rows]
        ax.barh(labels, values, left=left, color=color, label=key)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("prompts")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    return _save(plt, fig, out)


def judge_qualities(layout: RunLayout, evals: list[dict]) -> dict[str, dict]:
    """Judge quality by judge: the base model (stage 00, judge.measure_base) and every model stage 06 measured."""
    m0 = read_manifest(layout.manifest("00_sft", 0)) or {}
    quality = {"base": m0["base_judge_quality"]} if m0.get("base_judge_quality") else {}
    for e in evals:
        quality.update(e["judge_quality"])
    return quality


def base_check(quality: dict[str, dict]) -> list[str]:
    """Whether M0 judges at least as well as the model it was trained from (pairwise accuracy)."""
    if "base" not in quality or "M0" not in quality:
        return []
    m0, base = quality["M0"].get("pairwise_accuracy"), quality["base"].get("pairwise_accuracy")
    if m0 is None or base is None:
        return []
    figures = (
        f"pairwise accuracy {_with_interval(quality['M0'], 'pairwise_accuracy')} against the base model's "
        f"{_with_interval(quality['base'], 'pairwise_accuracy')}"
    )
    if m0 >= base:
        return [f"M0 judges no worse than the model it came from: {figures}.", ""]
    return [
        f"**Warning: M0 judges worse than the model it came from: {figures}. Training took away what the base "
        "model had; judge.objective ranking trains the score the judge reads (docs/judge.md).**",
        "",
    ]


def plot_judge_quality(quality: dict[str, dict], out: Path) -> str:
    models = sorted(quality, key=_model_order)
    plt, fig, (ax,) = _figure("Judge quality on held-out EFT rows")
    x = list(range(len(models)))
    for shift, key in zip((-0.09, -0.03, 0.03, 0.09), QUALITY, strict=True):
        values = [quality[m].get(key) if quality[m].get(key) is not None else float("nan") for m in models]
        low, high = [], []
        for m, v in zip(models, values, strict=True):
            interval = (quality[m].get("intervals") or {}).get(key)
            low.append(v - interval[0] if interval else 0.0)
            high.append(interval[1] - v if interval else 0.0)
        # 95% bootstrap intervals as error bars, the four figures side by side at each model
        ax.errorbar(
            [i + shift for i in x], values, yerr=[low, high], marker="o", capsize=3, label=key.replace("_", " ")
        )
    ax.set_xticks(x, models)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("model")
    ax.set_ylabel("agreement with human scores (95% CI)")
    ax.set_ylim(-1, 1)
    if ax.get_legend_handles_labels()[0]:  # nothing measured yet: no legend, no warning
        ax.legend(fontsize=8)
    return _save(plt, fig, out)


def plot_dpo(layout: RunLayout, iterations: list[int], out: Path) -> str:
    plt, fig, axes = _figure("DPO training (from M<t>/train_log.jsonl)", 3)
    for t in iterations:
        log = _train_log(layout, t)
        for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies"), strict=True):
            points = [(r["step"], r[key]) for r in log if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=f"M{t}")
    for ax, label in zip(axes, ("DPO loss", "reward margin (chosen - rejected)", "reward accuracy"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(plt, fig, out)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _with_interval(quality: dict, key: str) -> str:
    interval = (quality.get("intervals") or {}).get(key)
    text = _fmt(quality.get(key))
    return f"{text} ({interval[0]:.2f}–{interval[1]:.2f})" if interval else text


def head_to_head_table(evals: list[dict]) -> list[str]:
    """The head-to-head results of these eval.json records as Markdown table lines."""
    # An outside judge may write replies that name neither letter: counted, and shown when there are any.
    unreadable = any(c.get("unreadable") for e in evals for c in e["head_to_head"].values())
    extra = " unreadable |" if unreadable else ""
    header = (
        f"| iteration | comparison | judged by | wins | ties | losses |{extra} win rate | preference | position bias |"
    )
    lines = [header, "|---" * (10 if unreadable else 9) + "|"]
    for e in evals:
        by = e.get("head_to_head_by", "pairs")  # "pairs" or "scores"; records from before it was kept were pairs
        for name, c in e["head_to_head"].items():
            counts = f"{c['wins']} | {c['ties']} | {c['losses']}" + (
                f" | {c.get('unreadable', 0)}" if unreadable else ""
            )
            lines.append(
                f"| {e['iteration']} | {name} | {by} | {counts} | {_with_interval(c, 'win_rate')} | "
                f"{_with_interval(c, 'preference')} | {_fmt(c.get('position_bias'))} |"
            )
    return lines


def judge_quality_table(quality: dict[str, dict]) -> list[str]:
    """Judge quality per model ("M0": eval.json's figures), each with its interval, as Markdown table lines."""
    keys = QUALITY + (("position_bias",) if any("position_bias" in q for q in quality.values()) else ())
    label = {
        "pairwise_accuracy": "pairwise accuracy",
        "exact_match": "exact match",
        "spearman": "Spearman",
        "kendall_tau": "Kendall τ",
        "position_bias": "position bias",
    }
    names = " | ".join(label[k] for k in keys)
    lines = [f"| judge | pairs | {names} |", "|---" * (len(keys) + 2) + "|"]
    for m in sorted(quality, key=_model_order):
        q = quality[m]
        lines.append(f"| {m} | {q['pairs']} | " + " | ".join(_with_interval(q, k) for k in keys) + " |")
    return lines


def _model_order(name: str) -> tuple[int, str]:
    """The base model, then M0, M1, ... by number; another judge (the reward model) after them."""
    if name == "base":
        return (-1, "")
    return (int(name[1:]), "") if name[:1] == "M" and name[1:].isdigit() else (1 << 30, name)


def write_report(layout: RunLayout) -> Path:
    """Rewrite report.md and report/*.png from everything stage 06 has written so far."""
    evals = load_evals(layout)
    layout.report_dir.mkdir(parents=True, exist_ok=True)
    its = [e["iteration"] for e in evals]
    plots = {
        "scores": plot_scores(evals, layout.report_dir / "scores.png"),
        "lengths": plot_lengths(evals, layout.report_dir / "response_length.png"),
        "head_to_head": plot_head_to_head(evals, layout.report_dir / "head_to_head.png"),
        "judge": plot_judge_quality(judge_qualities(layout, evals), layout.report_dir / "judge_quality.png"),
        "dpo": plot_dpo(layout, its, layout.report_dir / "dpo_training.png"),
    }
    lines = [f"# Self-rewarding run: {layout.root.name}", "", f"Iterations evaluated: {', '.join(map(str, its))}.", ""]
    for e in evals:  # the gate's verdict on the judge that made this iteration's pairs (stage 04)
        gate = e.get("gate") or {}
        if gate.get("better_than_chance") is False:
            lines += [f"**Warning, iteration {e['iteration']}: {gate['verdict']}.**", ""]
        elif gate.get("verdict"):
            lines += [f"Iteration {e['iteration']}: {gate['verdict']}.", ""]
    agreeing = [e for e in evals if e.get("consistency")]
    if agreeing:
        lines += [
            "## Consistency of the judge between iterations (preferences.consistency, CREAM)",
            "",
            "| iteration | judges | mean Kendall τ, all prompts | mean Kendall τ, prompts with a pair | "
            "pairs dropped |",
            "|---|---|---|---|---|",
        ]
        for e in agreeing:
            c, t = e["consistency"], e["iteration"]
            lines.append(
                f"| {t} | M{t - 1} vs M{t - 2} | {_fmt(c.get('mean_agreement'))} | "
                f"{_fmt(c.get('mean_agreement_of_pairs'))} | {c.get('dropped', 0)} |"
            )
        lines += ["", "1 is the same ranking of a prompt's answers by both judges, 0 no relation, -1 the reverse.", ""]
    lines += ["## Head-to-head (held-out prompts)", ""]
    lines += head_to_head_table(evals)
    lines += [
        "",
        "Judged by pairs: the judge sees both answers in both orders and the newer model wins a prompt only when "
        "picked in both; an order-dependent verdict is a tie, and position bias is the share of such prompts. "
        "Judged by scores (eval.head_to_head scores): the judge grades each answer alone with the rubric and the "
        "higher score wins. Preference counts a tie as half a win; each rate with its 95% bootstrap interval "
        "over prompts.",
        "",
    ]
    lines += ["", f"![head-to-head](report/{plots['head_to_head']})", ""]
    lines += benchmark_section(evals, layout.report_dir)
    quality = judge_qualities(layout, evals)
    lines += ["## Judge quality (held-out EFT rows against their human scores)", ""]
    lines += base_check(quality)
    lines += judge_quality_table(quality)
    lines += [
        "",
        "Each figure with its 95% bootstrap interval over held-out questions: a judge is better than "
        "chance when the interval of its pairwise accuracy lies above 0.5.",
        "",
    ]
    lines += ["", f"![judge quality](report/{plots['judge']})", ""]
    lines += canary_section(layout, its)
    keys = (
        "response_tokens",
        "response_chars",
        "distinct_1",
        "distinct_2",
        "mean_score",
        "score_spread",
        "tie_rate",
        "parse_failure_rate",
        "pair_yield",
        "chosen_minus_rejected_chars",
        "shorter_chosen",
        "chosen_minus_rejected_tokens",
    )
    lines += [
        "## Drift",
        "",
        "| iteration | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for e in evals:
        lines.append(f"| {e['iteration']} | " + " | ".join(_fmt(e["drift"].get(k)) for k in keys) + " |")
    lines += ["", f"![scores](report/{plots['scores']})", "", f"![response length](report/{plots['lengths']})", ""]
    lines += ["## DPO training", "", f"![DPO training](report/{plots['dpo']})", ""]
    write_text(layout.report, "\n".join(lines))
    return layout.report


def benchmark_table(evals: list[dict]) -> list[str]:
    """Win rate and length-controlled win rate against the benchmark's references, as Markdown table lines."""
    lines = [
        "| iteration | prompts | wins | ties | losses | win rate | LC win rate | answer chars | reference chars |",
        "|---" * 9 + "|",
    ]
    for e in evals:
        if b := e.get("benchmark"):
            lines.append(
                f"| {e['iteration']} | {b['prompts']} | {b['wins']} | {b['ties']} | {b['losses']} | "
                f"{_with_interval(b, 'win_rate')} | {_with_interval(b, 'lc_win_rate')} | "
                f"{_fmt(b['answer_chars'])} | {_fmt(b['reference_chars'])} |"
            )
    return lines


def plot_benchmark(evals: list[dict], out: Path) -> str:
    """Both rates per iteration, their 95% intervals as error bars."""
    plt, fig, (ax,) = _figure("Against the benchmark's reference answers")
    rows = [e for e in evals if e.get("benchmark")]
    for shift, key, label in ((-0.05, "win_rate", "win rate"), (0.05, "lc_win_rate", "length-controlled win rate")):
        its, values, low, high = [], [], [], []
        for e in rows:
            value, interval = e["benchmark"].get(key), (e["benchmark"].get("intervals") or {}).get(key)
            if value is None:
                continue
            its.append(e["iteration"] + shift)
            values.append(value)
            low.append(value - interval[0] if interval else 0.0)
            high.append(interval[1] - value if interval else 0.0)
        ax.errorbar(its, values, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set_xticks([e["iteration"] for e in rows])
    ax.set_xlim(rows[0]["iteration"] - 0.5, rows[-1]["iteration"] + 0.5)  # one iteration: not a wide empty axis
    ax.axhline(0.5, color="black", linewidth=0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("rate against the reference (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def benchmark_section(evals: list[dict], report_dir: Path) -> list[str]:
    """The report's benchmark section (eval.benchmark), with its plot; nothing when no iteration has one."""
    if not any(e.get("benchmark") for e in evals):
        return []
    files = sorted({e["benchmark"]["file"] for e in evals if e.get("benchmark")})
    plot = plot_benchmark(evals, report_dir / "benchmark.png")
    return [
        f"## Against a fixed benchmark ({', '.join(files)}; judged in both orders)",
        "",
        *benchmark_table(evals),
        "",
        "Win rate: the share of prompts whose answer the judge preferred to the reference in both orders, a tie "
        "counting half. LC win rate: AlpacaEval 2.0's length-controlled rate, the win rate a logistic fit on the "
        "length difference predicts for an answer as long as the reference. Lengths in characters.",
        "",
        f"![benchmark](report/{plot})",
        "",
    ]


def _judge_name(path: str | None) -> str:
    """M<t> for a model folder of a run (<run>/M<t>/model), else the path as given."""
    if not path:
        return "?"
    p = Path(path)
    return p.parent.name if p.name == "model" and RunLayout.model_number(p.parent.name) is not None else path


def write_comparison(runs: list[Path], out: Path) -> Path:
    """One Markdown report of several runs side by side (say srlm, spin and raft on the same data):
    per iteration, each run's head-to-head against M<t-1> and M0, its judge's quality where it has
    one, and its drift figures, each table with a run column."""
    algorithms = [run_algorithm(RunLayout(Path(r)).config) or "?" for r in runs]
    named = [(f"{Path(r).name} ({a})", load_evals(RunLayout(Path(r)))) for r, a in zip(runs, algorithms, strict=True)]
    lines = ["# Runs compared", "", "| run | algorithm | iterations evaluated |", "|---|---|---|"]
    for r, a, (_, evals) in zip(runs, algorithms, named, strict=True):
        lines.append(f"| {r} | {a} | {', '.join(str(e['iteration']) for e in evals)} |")
    lines += [
        "",
        "## Head-to-head (held-out prompts, judged in both orders; an order-dependent verdict is a tie)",
        "",
        "| run | iteration | comparison | judge | wins | ties | losses | win rate | position bias |",
        "|---" * 9 + "|",
    ]
    for name, evals in named:
        for e in evals:
            for comparison, c in e["head_to_head"].items():
                lines.append(
                    f"| {name} | {e['iteration']} | {comparison} | {_judge_name(e.get('judge_model'))} | "
                    f"{c['wins']} | {c['ties']} | {c['losses']} | {_fmt(c['win_rate'])} | "
                    f"{_fmt(c.get('position_bias'))} |"
                )
    lines += [
        "",
        "Each run's judge is its own newest model unless eval.judge_model names one: for a fair "
        "comparison, give every run the same judge (python scripts/06_eval.py ... --eval.judge_model PATH).",
        "",
        "## Judge quality (held-out EFT rows against their human scores)",
        "",
        "| run | judge | pairs | pairwise accuracy | Spearman |",
        "|---|---|---|---|---|",
    ]
    for name, evals in named:
        quality: dict[str, dict] = {}
        for e in evals:
            quality.update(e["judge_quality"])
        for m in sorted(quality, key=_model_order):
            q = quality[m]
            lines.append(
                f"| {name} | {m} | {q['pairs']} | {_with_interval(q, 'pairwise_accuracy')} | "
                f"{_with_interval(q, 'spearman')} |"
            )
    keys = (
        "response_tokens",
        "response_chars",
        "distinct_1",
        "distinct_2",
        "mean_score",
        "tie_rate",
        "pair_yield",
        "chosen_minus_rejected_chars",
    )
    lines += [
        "",
        "## Drift",
        "",
        "| run | iteration | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for name, evals in named:
        for e in evals:
            lines.append(f"| {name} | {e['iteration']} | " + " | ".join(_fmt(e["drift"].get(k)) for k in keys) + " |")
    write_text(out, "\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite a run's report.md, or compare several runs in one.")
    parser.add_argument("--runs", nargs="+", required=True, help="run folders; one: rewrite its report.md")
    parser.add_argument("--out", help="where the comparison goes (default: report-compare.md here)")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not RunLayout(Path(r)).config.is_file()]
    if missing:
        parser.error(f"not a run folder (no config.yaml): {', '.join(missing)}")
    if len(args.runs) == 1:
        print(write_report(RunLayout(Path(args.runs[0]))))
    else:
        print(write_comparison([Path(r) for r in args.runs], Path(args.out or "report-compare.md")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def canary_section(layout: RunLayout, iterations: list[int]) -> list[str]:
    """The canaries stage 03 planted each iteration (selfreward/loop/canaries.py): per trick, how often it
    scored above every real answer of its prompt, with its 95% Wilson interval, and the canary gate's
    warning where stage 04 gave one."""
    lines = [
        "## Canaries (planted answers that try to fool the judge; stage 03)",
        "",
        "| iteration | trick | canaries | fooled | fool rate (95% CI) |",
        "|---|---|---|---|---|",
    ]
    warnings = []
    for t in iterations:
        rates = (read_manifest(layout.manifest("03_gen_scores", t)) or {}).get("canaries")
        if not rates:
            lines.append(f"| {t} | no canaries | – | – | – |")
        for trick, r in (rates or {}).items():
            interval = f" ({r['interval'][0]:.2f}–{r['interval'][1]:.2f})" if r.get("interval") else ""
            lines.append(f"| {t} | {trick} | {r['canaries']} | {r['fooled']} | {_fmt(r['fool_rate'])}{interval} |")
        gate = (read_manifest(layout.manifest("04_gen_preferences", t)) or {}).get("canary_gate") or {}
        if gate.get("passed") is False:
            warnings += [f"**Warning, iteration {t}: {gate['verdict']}.**", ""]
    return lines + [
        "",
        "A trick's fool rate is the share of its canaries that the judge scored above every real answer of "
        "their prompt: near 0 for a judge that cannot be fooled, about 1/(N+1) for one that scores at random "
        "(N answers per prompt), 1 for one that the trick always fools.",
        "",
        *warnings,
    ]
