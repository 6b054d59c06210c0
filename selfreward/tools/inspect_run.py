"""Look at a run the way Oxen.ai shows a repository: its commits, and any JSONL file at any commit.

python -m selfreward.tools.inspect_run --run-dir runs/default                  # the commits, newest first
python -m selfreward.tools.inspect_run --run-dir runs/default --stages         # time and peak memory per stage
python -m selfreward.tools.inspect_run --run-dir runs/default --file M0/generated/scores.jsonl
python -m selfreward.tools.inspect_run --run-dir runs/default --file M0/generated/scores.jsonl --commit 1a2b3c
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from selfreward.run import versioning
from selfreward.run.config import OxenConfig, load_config, run_algorithm
from selfreward.run.layout import RunLayout
from selfreward.run.records import memory_text, read_manifest
from selfreward.run.stages import ITERATION_STAGES


def summarize_jsonl(text: str, name: str, show_rows: int = 3) -> str:
    """Row count, fields, score histogram (if the rows have scores) and the first rows, as text."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = [f"{name}: {len(rows)} rows"]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    out.append("fields: " + (", ".join(fields) if fields else "(none)"))
    for key in ("score", "score_chosen", "score_rejected"):
        if any(key in row for row in rows):
            out.append(score_histogram([row.get(key) for row in rows], key))
    for row in rows[:show_rows]:
        shown = {k: (v[:80] + "…" if isinstance(v, str) and len(v) > 80 else v) for k, v in row.items()}
        if "judgments" in shown:
            shown["judgments"] = f"[{len(row['judgments'])} judgments]"
        if "comparisons" in shown:
            shown["comparisons"] = f"[{len(row['comparisons'])} comparisons]"
        out.append("  " + json.dumps(shown, ensure_ascii=False))
    return "\n".join(out)


def score_histogram(scores: list, key: str, width: int = 40) -> str:
    """Counts per whole point 0-5 (a score is counted at its nearest point) plus the nulls."""
    counts = Counter("null" if s is None else str(int(min(5, max(0, round(s))))) for s in scores)
    top = max(counts.values(), default=1)
    lines = [f"{key} histogram (nearest point):"]
    for label in [*map(str, range(6)), "null"]:
        n = counts.get(label, 0)
        lines.append(f"  {label:>4} | {'#' * round(width * n / top):<{width}} {n}")
    return "\n".join(lines)


def iteration_stages(layout) -> tuple[str, ...]:
    """The stages of one iteration of the run's algorithm (its config.yaml; srlm if it cannot be read)."""
    return ITERATION_STAGES[run_algorithm(layout.config) or "srlm"]


def stage_table(run_dir: Path) -> str:
    """Every stage's manifest in run order: seconds, peak memory, backend, rows; and the total time."""
    layout = RunLayout(run_dir)
    recovered = versioning.recovered_stages(layout)
    found = [("00_sft", 0, read_manifest(layout.manifest("00_sft", 0)))]
    stages = iteration_stages(layout)
    t = 1
    while any(layout.manifest(s, t).is_file() for s in stages):
        found += [(s, t, read_manifest(layout.manifest(s, t))) for s in stages]
        t += 1
    # As wide as the longest entry: on a GPU box the memory text also names the GPU's peak.
    memory = {(s, t): memory_text((m or {}).get("peak_memory_mb", {})) for s, t, m in found}
    width = max([len("memory"), *map(len, memory.values())]) + 2
    lines = [f"{'stage':<20}{'iter':>5}{'seconds':>10}  {'memory':<{width}}{'backend':<9}rows in -> out"]
    total = 0.0
    for stage, t, manifest in found:
        if not manifest:
            lines.append(f"{stage:<20}{t:>5}{'-':>10}  (not run)")
            continue
        total += manifest.get("seconds", 0)
        state = "" if manifest.get("complete") else "  (incomplete)"
        if versioning.stage_key(stage, t) in recovered:
            state += "  (Oxen commit recovered by a rerun)"
        lines.append(
            f"{stage:<20}{t:>5}{manifest.get('seconds', 0):>10.1f}  "
            f"{memory[stage, t]:<{width}}{manifest.get('backend', ''):<9}"
            f"{manifest.get('rows_in')} -> {manifest.get('rows_out')}{state}"
        )
    lines.append(f"{'all stages':<25}{total:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--file", help="a JSONL file of the run, relative to the run folder")
    parser.add_argument("--commit", help="a commit id or its prefix (default: the newest commit)")
    parser.add_argument("--rows", type=int, default=3, help="how many rows to show")
    parser.add_argument("--stages", action="store_true", help="seconds and peak memory of every stage, from manifests")
    args = parser.parse_args(argv)
    if args.stages:
        print(stage_table(Path(args.run_dir)))
        return 0

    run_dir = Path(args.run_dir)
    config_file = run_dir / "config.yaml"
    cfg = load_config(config_file).oxen if config_file.is_file() else OxenConfig()
    if not (versioning.repo_dir(cfg, run_dir) / ".oxen").is_dir():
        print(f"error: {run_dir} is not an Oxen repository (was the run made with --no-oxen?)", file=sys.stderr)
        return 2
    try:
        commits = versioning.history(cfg, run_dir)
    except versioning.OxenError as exc:
        print(f"error: cannot read the history of {run_dir}: {exc}", file=sys.stderr)
        return 2
    if not args.file:
        for commit in commits:
            print(f"{commit['id'][:12]}  {commit['timestamp'][:19]}  {commit['message']}")
        return 0
    if not commits:
        print("error: the repository has no commits yet", file=sys.stderr)
        return 2
    wanted = args.commit or commits[0]["id"]
    matches = [c for c in commits if c["id"].startswith(wanted)]
    if len(matches) != 1:
        print(f"error: {len(matches)} commits match '{wanted}'", file=sys.stderr)
        return 2
    commit = matches[0]
    try:
        data = versioning.read_at_commit(cfg, run_dir, run_dir / args.file, commit["id"])
    except (versioning.OxenError, OSError, ValueError) as exc:
        print(f"error: {args.file} is not in commit {commit['id'][:12]} ({exc})", file=sys.stderr)
        return 2
    print(f"commit {commit['id'][:12]}: {commit['message']}")
    print(summarize_jsonl(data.decode("utf-8"), args.file, args.rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # piped into head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
