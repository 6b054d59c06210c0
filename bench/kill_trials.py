"""Reliability benchmark: kill the driver at random moments and in each stage's commit window, rerun,
and compare every output byte for byte and the Oxen history commit by commit with an uninterrupted run.

    python bench/kill_trials.py                       # 24 kill trials + 3 two-driver trials, tiny config
    python bench/kill_trials.py --trials 4 --concurrent 0 --iterations 1      # a quick look

Every trial runs `self-reward.sh --config CONFIG --iterations N` in the same folder (so the absolute
paths that lineage files record are the same), interrupts it, reruns the same command until it
exits 0, and compares. Kinds of interruption, drawn in turn:
  random         SIGKILL to the driver's whole process group at a uniform random moment of the run
                 (once or twice: the first rerun may be killed too), as a crash of the machine would
  after_summary  a stage dies by SIGKILL right after its summary line, before its Oxen commit
  after_commit   a stage dies by SIGKILL right after its Oxen commit, before the ledger records it
  at_exit        a stage dies by SIGSEGV after everything (the crash on the way out); the driver goes on
  (the failpoint kinds pick a random stage and iteration; see selfreward/run/failpoints.py)
Two-driver trials start a second driver 0, 15 and 40 s after the first on one fresh folder.

Checks per trial: rows lost or repeated in any JSONL output (by id), outputs that differ from the
uninterrupted run (files that differ between two uninterrupted runs are listed and left out), Oxen
commits missing or repeated (messages without their time and memory), working files not equal to
their committed version, and reruns that failed (any exit code but 0, or 5 for the refused driver).
The result is one JSON line per trial and a summary, also written to --out.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selfreward.run.config import load_config  # noqa: E402
from selfreward.run.layout import RunLayout  # noqa: E402
from selfreward.run.stages import GENERATED  # noqa: E402

STAGES = ["00_sft", "01_gen_prompts", "02_gen_responses", "03_gen_scores", "04_gen_preferences", "05_dpo", "06_eval"]
ID_FIELDS = {"prompts": "prompt_id", "responses": "response_id", "scores": "response_id", "preferences": "prompt_id"}
KINDS = ["random", "after_summary", "after_commit", "at_exit"]
# Bookkeeping that is not an output: Oxen's own store, the lock and ledger, the driver's log.
NOT_OUTPUTS = (".oxen/", ".selfreward/", "driver.log")


def driver_command(args, run: Path) -> list[str]:
    return ["bash", str(REPO / "self-reward.sh"), "--config", args.config, "--iterations", str(args.iterations),
            "--run-dir", str(run)]  # fmt: skip


def start_driver(args, run: Path, env: dict, log: Path) -> subprocess.Popen:
    """The driver in a session of its own (so that its whole process group can be killed), output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(driver_command(args, run), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stage_points(iterations: int) -> list[tuple[str, int]]:
    return [("00_sft", 0)] + [(s, t) for t in range(1, iterations + 1) for s in STAGES[1:]]


def digests(run: Path) -> dict[str, str]:
    out = {}
    for path in sorted(run.rglob("*")):
        name = str(path.relative_to(run))
        if path.is_file() and not name.startswith(NOT_OUTPUTS) and not name.endswith(".manifest.json"):
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def normalised_history(run: Path, env: dict) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "selfreward.tools.inspect_run", "--run-dir", str(run)], cwd=REPO,
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    messages = [line.split("  ", 2)[2] for line in proc.stdout.splitlines()][::-1]
    return [re.sub(r", [\d.]+ s, peak RAM [\d.]+ GiB", "", m).replace(" (recovered)", "") for m in messages]


def row_ids(run: Path, iterations: int) -> dict[str, list[str]]:
    layout, ids = RunLayout(run), {}
    for t in range(1, iterations + 1):
        for name in GENERATED.values():
            path = layout.generated(t, name)
            if path.is_file():
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                ids[f"{t}/{name}"] = [row[ID_FIELDS[name]] for row in rows]
    return ids


def uncommitted(run: Path, iterations: int, env: dict) -> list[str]:
    """Stage outputs whose working file is not what the newest commit holds (or that no commit holds)."""
    layout, bad = RunLayout(run), []
    code = (
        "import sys\nfrom pathlib import Path\nfrom selfreward.run import versioning\n"
        "from selfreward.run.config import load_config\n"
        "run = Path(sys.argv[1]); cfg = load_config(run / 'config.yaml').oxen\n"
        "head = versioning.history(cfg, run)[0]['id']\nfor name in sys.argv[2:]:\n"
        "    try:\n        same = versioning.read_at_commit(cfg, run, run / name, head) == (run / name).read_bytes()\n"
        "    except Exception:\n        same = False\n    print(name, same)\n"
    )
    names = []
    for stage, t in stage_points(iterations):
        names.append(str(layout.manifest(stage, t).relative_to(run)))
        if stage in GENERATED:
            names.append(str(layout.generated(t, GENERATED[stage]).relative_to(run)))
    proc = subprocess.run([sys.executable, "-c", code, str(run), *names], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    for line in proc.stdout.splitlines():
        name, same = line.rsplit(" ", 1)
        if same != "True":
            bad.append(name)
    return bad


def compare(run: Path, reference: dict, args, env: dict) -> dict:
    got_ids = row_ids(run, args.iterations)
    lost = duplicated = 0
    for key, want in reference["ids"].items():
        have = collections.Counter(got_ids.get(key, []))
        lost += sum(1 for i in want if have[i] == 0)
        duplicated += sum(n - 1 for n in have.values() if n > 1)
    files = digests(run)
    differing = sorted(
        name
        for name in set(files) | set(reference["digests"])
        if name not in reference["unstable"] and files.get(name) != reference["digests"].get(name)
    )
    history = normalised_history(run, env)
    want, have = collections.Counter(reference["history"]), collections.Counter(history)
    return {
        "lost_rows": lost,
        "duplicated_rows": duplicated,
        "differing_outputs": differing,
        "missing_commits": sum((want - have).values()),
        "duplicated_commits": sum((have - want).values()),
        "history_in_order": history == reference["history"],
        "uncommitted_files": uncommitted(run, args.iterations, env),
    }


def rerun_until_done(args, run: Path, env: dict, budget: int = 5) -> tuple[list[int], str]:
    codes, log = [], ""
    for _ in range(budget):
        proc = subprocess.run(driver_command(args, run), cwd=REPO, env=env, capture_output=True, text=True)
        codes.append(proc.returncode)
        log += proc.stdout + proc.stderr
        if proc.returncode == 0:
            break
    return codes, log


def kill_trial(k: int, kind: str, args, run: Path, env: dict, reference: dict, rng: random.Random) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    trial = {"trial": k, "kind": kind}
    env = dict(env, SELFREWARD_CRASH_ONCE=str(run.parent / f"fired-{k}"))
    if kind == "random":
        kills = rng.choice([1, 2])
        trial["kill_at_s"] = []
        for _ in range(kills):
            moment = rng.uniform(0.5, reference["seconds"])
            proc = start_driver(args, run, env, run.parent / "killed.log")
            try:
                proc.wait(timeout=moment)
                trial.setdefault("finished_before_kill", 0)
                trial["finished_before_kill"] += 1
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            trial["kill_at_s"].append(round(moment, 1))
            while proc.poll() is None:  # make sure the whole group is gone before the rerun
                time.sleep(0.05)
    else:
        stage, t = rng.choice(stage_points(args.iterations))
        trial["at"] = f"{stage}:{t}:{kind}"
        proc = subprocess.run(driver_command(args, run), cwd=REPO, env=dict(env, SELFREWARD_CRASH_AT=trial["at"]),
                              capture_output=True, text=True)  # fmt: skip
        trial["first_exit"] = proc.returncode
        if kind == "at_exit":  # the driver itself must survive this one
            trial["driver_survived_crash"] = proc.returncode == 0 and "crashed (exit code 139)" in proc.stderr
    codes, log = rerun_until_done(args, run, env)
    trial["rerun_exits"] = codes
    trial["failed_reruns"] = sum(c != 0 for c in codes)
    trial["recovered_commits"] = log.count("is made now (recovered)")
    trial.update(compare(run, reference, args, env))
    return trial


def concurrent_trial(k: int, offset: float, args, run: Path, env: dict, reference: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    logs = [run.parent / "first.log", run.parent / "second.log"]
    first = start_driver(args, run, env, logs[0])
    time.sleep(offset)
    second = start_driver(args, run, env, logs[1])
    outs = [(p.pid, p.wait(), log.read_text()) for p, log in zip((first, second), logs, strict=True)]
    refused = [out for _, code, out in outs if code == 5]
    holders = [pid for pid, code, _ in outs if code != 5]
    refusal = refused[0].strip().splitlines()[-1] if refused else ""
    named = len(holders) == 1 and re.search(rf"pid {holders[0]}\b", refusal) is not None
    trial = {"trial": k, "kind": f"two drivers, {offset:g} s apart", "exits": [code for _, code, _ in outs],
             "refusals": len(refused), "refusal": refusal, "holder_pid": holders[0] if len(holders) == 1 else None,
             "refusal_names_holder": named}  # fmt: skip
    codes, _ = rerun_until_done(args, run, env) if any(code != 0 for _, code, _ in outs if code != 5) else ([], "")
    trial["failed_reruns"] = sum(c != 0 for c in codes)
    trial.update(compare(run, reference, args, env))
    return trial


def clean(trial: dict) -> bool:
    return (
        trial["lost_rows"] == 0
        and trial["duplicated_rows"] == 0
        and not trial["differing_outputs"]
        and trial["missing_commits"] == 0
        and trial["duplicated_commits"] == 0
        and trial["history_in_order"]
        and not trial["uncommitted_files"]
        and trial["failed_reruns"] == 0
        and trial.get("refusals", 1) == 1
        and trial.get("refusal_names_holder", True)
        and trial.get("driver_survived_crash", True)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--trials", type=int, default=24, help="kill trials, the kinds drawn in turn")
    parser.add_argument("--concurrent", type=int, default=3, help="two-driver trials (0, 15, 40 s apart)")
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--work", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", help="where to write every trial's result (default: WORK/kill_trials.json)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="kill-trials-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"  # one folder for every run: lineage files record absolute paths
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(work / "home"), TOKENIZERS_PARALLELISM="false")
    env.pop("OXEN_REMOTE", None)
    env.pop("SELFREWARD_CRASH_AT", None)
    (work / "home").mkdir(exist_ok=True)
    load_config(args.config)  # a bad config fails here, not in trial 1

    # Two uninterrupted runs: the reference, and what differs between two runs of the same command.
    snapshots = []
    for _ in range(2):
        shutil.rmtree(run, ignore_errors=True)
        started = time.time()
        proc = subprocess.run(driver_command(args, run), cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        snapshots.append((time.time() - started, digests(run), normalised_history(run, env)))
    unstable = sorted(n for n in snapshots[0][1] if snapshots[0][1][n] != snapshots[1][1].get(n))
    reference = {"seconds": snapshots[0][0], "digests": snapshots[0][1], "history": snapshots[0][2],
                 "ids": row_ids(run, args.iterations), "unstable": set(unstable)}  # fmt: skip
    print(json.dumps({"reference_seconds": round(reference["seconds"], 1), "files": len(reference["digests"]),
                      "commits": len(reference["history"]), "unstable_between_two_clean_runs": unstable}))  # fmt: skip

    trials = []
    for k in range(args.trials):
        trials.append(kill_trial(k, KINDS[k % len(KINDS)], args, run, env, reference, rng))
        print(json.dumps({**trials[-1], "clean": clean(trials[-1])}), flush=True)
    for k, offset in enumerate([0, 15, 40][: args.concurrent]):
        trials.append(concurrent_trial(args.trials + k, offset, args, run, env, reference))
        print(json.dumps({**trials[-1], "clean": clean(trials[-1])}), flush=True)

    summary = {
        "bench": "kill_trials",
        "config": args.config,
        "iterations": args.iterations,
        "trials": len(trials),
        "by_kind": dict(collections.Counter(t["kind"].split(",")[0] for t in trials)),
        "clean_trials": sum(clean(t) for t in trials),
        "lost_rows": sum(t["lost_rows"] for t in trials),
        "duplicated_rows": sum(t["duplicated_rows"] for t in trials),
        "differing_outputs": sum(len(t["differing_outputs"]) for t in trials),
        "missing_commits": sum(t["missing_commits"] for t in trials),
        "duplicated_commits": sum(t["duplicated_commits"] for t in trials),
        "uncommitted_files": sum(len(t["uncommitted_files"]) for t in trials),
        "failed_reruns": sum(t["failed_reruns"] for t in trials),
        "recovered_commits": sum(t.get("recovered_commits", 0) for t in trials),
        "refusals_in_two_driver_trials": [t.get("refusals") for t in trials if "refusals" in t],
        "unstable_between_two_clean_runs": unstable,
        "reference_seconds": round(reference["seconds"], 1),
    }
    result = json.dumps({"summary": summary, "trials": trials}, indent=1, default=sorted)
    Path(args.out or work / "kill_trials.json").write_text(result + "\n")
    print(json.dumps(summary))
    return 0 if summary["clean_trials"] == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
