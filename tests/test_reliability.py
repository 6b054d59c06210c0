"""Nothing lost, for real: kills in a stage's commit window, a crash on the way out, two writers on one
run folder, failed reruns that must leave the previous outputs alone, and failures of the machine
(disk full, a read-only folder, a hung remote, a busy repository) that end in one line.

bench/kill_trials.py runs the long version of the first test: kills at random moments of the driver.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, silent_server, stage_env, stop_pusher

from selfreward.run.layout import RunLayout

ITERATION_1_FILES = ["M0/train/ift.jsonl", "M0/train/eft.jsonl", "M0/train/heldout_prompts.jsonl",
                     "M0/generated/prompts.jsonl", "M0/generated/responses.jsonl", "M0/generated/scores.jsonl",
                     "M0/generated/preferences.jsonl", "M1/train/preferences.jsonl",
                     "M0/adapter/adapter_model.safetensors", "M1/adapter/adapter_model.safetensors",
                     "M1/model/model.safetensors"]  # fmt: skip


def history(run, cache) -> list[str]:
    """Commit messages, oldest first."""
    proc = subprocess.run(
        [sys.executable, "-m", "selfreward.tools.inspect_run", "--run-dir", str(run)],
        cwd=REPO, env=stage_env(cache), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line.split("  ", 2)[2] for line in proc.stdout.splitlines()][::-1]


def same_commit(message: str) -> str:
    """A commit message without what differs between two runs of the same work: time and memory."""
    return re.sub(r", [\d.]+ s, peak RAM [\d.]+ GiB", "", message).replace(" (recovered)", "")


def stage(script, run, *args, cache, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), "--run-dir", str(run), *args],
        cwd=REPO, env=env or stage_env(cache), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(proc, code, *phrases):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # a progress bar may be cut short on the line: a terminal shows what follows its last \r
    errors = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def run(tiny_run, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_run, copy)
    return copy


def test_kills_in_the_commit_window_and_a_crash_at_exit_lose_nothing(tiny_run, cache, tmp_path):
    """Three reruns of one iteration, interrupted (1) between 02's summary line and its commit, (2) by a
    SIGSEGV after 03 finished, (3) between 05's commit and its record; against the uninterrupted run."""
    run = tmp_path / "tiny"  # the same folder name as tiny_run's, which commit messages start with
    env = dict(stage_env(cache), SELFREWARD_CRASH_ONCE=str(tmp_path / "fired"))

    def driver(crash_at: str):
        return subprocess.run(
            ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--iterations", "1",
             "--run-dir", str(run)],
            cwd=REPO, env=dict(env, SELFREWARD_CRASH_AT=crash_at), capture_output=True, text=True,
        )  # fmt: skip

    first = driver("02_gen_responses:1:after_summary")
    assert first.returncode == 137, first.stderr[-3000:]
    assert "[02_gen_responses] iteration 1: 6 rows in" in first.stdout
    assert len(history(run, cache)) == 2  # 00 and 01 only: 02 was killed before its commit

    second = driver("03_gen_scores:1:at_exit,05_dpo:1:after_commit")
    assert second.returncode == 137, second.stderr[-3000:]
    assert "[02_gen_responses] iteration 1: complete, skipped;" in second.stdout
    assert "its Oxen commit was missing and is made now (recovered)" in second.stdout
    assert "03_gen_scores --iteration 1 crashed (exit code 139)" in second.stderr
    assert "03_gen_scores --iteration 1 had finished and committed its work before it crashed" in second.stderr

    third = driver("")
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("complete, skipped") == 6  # 00-05 (05 had committed), then 06 runs

    got, want = history(run, cache), history(tiny_run, cache)[:7]
    assert [same_commit(m) for m in got] == [same_commit(m) for m in want]  # none lost, none twice
    assert [m for m in got if m.endswith("(recovered)")] == [got[2]] and "[02_gen_responses]" in got[2]
    for name in ITERATION_1_FILES:
        assert digest(run / name) == digest(tiny_run / name), name
    table = subprocess.run([sys.executable, "-m", "selfreward.tools.inspect_run", "--run-dir", str(run), "--stages"],
                           cwd=REPO, env=env, capture_output=True, text=True).stdout  # fmt: skip
    assert [line.split()[0] for line in table.splitlines() if "recovered by a rerun" in line] == ["02_gen_responses"]


def test_two_drivers_started_at_once_one_refuses(tiny_run, cache, tmp_path):
    run = tmp_path / "tiny"
    command = ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--iterations", "0",
               "--run-dir", str(run)]  # fmt: skip
    drivers = [subprocess.Popen(command, cwd=REPO, env=stage_env(cache), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [(d.pid, d.wait(), d.stderr.read()) for d in drivers]
    codes = sorted(code for _, code, _ in results)
    assert codes == [0, 5], results
    (winner,) = [pid for pid, code, _ in results if code == 0]
    (refusal,) = [err for _, code, err in results if code == 5]
    # "(now running 00_sft)" when the winner had already started its first stage
    assert re.search(
        rf"{re.escape(str(run))} is in use by self-reward.sh, pid {winner}( \(now running 00_sft\))?, since ", refusal
    )
    assert refusal.strip().endswith("; wait for it or stop it")
    got = history(run, cache)
    assert [same_commit(m) for m in got] == [same_commit(history(tiny_run, cache)[0])]
    assert digest(RunLayout(run).model(0) / "model.safetensors") == digest(
        RunLayout(tiny_run).model(0) / "model.safetensors"
    )


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from selfreward.run.runlock import lock_run
    lock_run(sys.argv[1], "self-reward.sh")
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_stage_by_hand_is_refused_while_the_folder_is_in_use_and_runs_once_the_holder_died(run, cache):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=REPO, env=stage_env(cache),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = stage("04_gen_preferences", run, "--iteration", "1", cache=cache)
        one_line_error(proc, 5, f"{run} is in use by self-reward.sh, pid {holder.pid}, since ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: nothing to clean up
    proc = stage("04_gen_preferences", run, "--iteration", "1", "--skip-if-complete", cache=cache)
    assert proc.returncode == 10, proc.stderr[-2000:]


def test_the_refusal_names_a_stage_its_killed_driver_left_running():
    from selfreward.run.runlock import busy_message

    dead = subprocess.Popen(["true"])
    dead.wait()
    record = {"holder": "self-reward.sh", "pid": dead.pid, "since": 0, "stage": "02_gen_responses",
              "stage_pid": os.getpid(), "stage_since": 0}  # fmt: skip
    message = busy_message("runs/x", record)
    assert message.startswith(f"runs/x is in use by 02_gen_responses.py, pid {os.getpid()}, since ")
    assert f"(started by self-reward.sh, pid {dead.pid}, which has exited)" in message


@pytest.mark.parametrize("script", ["02_gen_responses", "03_gen_scores"])
def test_a_failed_rerun_leaves_the_complete_stage_as_it_was(run, cache, script):
    layout = RunLayout(run)
    name = {"02_gen_responses": "prompts", "03_gen_scores": "responses"}[script]
    source = layout.generated(1, name)
    good = source.read_bytes()
    lines = good.splitlines(keepends=True)
    source.write_bytes(b"".join([lines[0], lines[1][:-9] + b"\n", *lines[2:]]))  # a line cut short
    manifest = layout.manifest(script, 1)
    before = {p: p.read_bytes() for p in (manifest, layout.stage_output(script, 1), layout.stage_config(script, 1))}
    one_line_error(stage(script, run, "--iteration", "1", cache=cache), 2, f"{source}:2: not valid JSON")
    assert {p: p.read_bytes() for p in before} == before
    source.write_bytes(good)
    assert stage(script, run, "--iteration", "1", "--skip-if-complete", cache=cache).returncode == 10


def test_non_utf8_input_gets_file_and_line(run, cache):
    path = RunLayout(run).generated(1, "prompts")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][:5] + b"\xff" + lines[1][5:] + b"".join(lines[2:]))
    one_line_error(stage("02_gen_responses", run, "--iteration", "1", cache=cache), 2,
                   f"{path}:2: not valid UTF-8 (byte 0xff at column 6)")  # fmt: skip


def test_overrides_a_stage_cannot_use_are_refused(run, cache):
    before = len(history(run, cache))
    proc = stage("02_gen_responses", run, "--iteration", "1", "--model.name_or_path", "/nonexistent", cache=cache)
    assert proc.returncode == 2 and "--model.name_or_path does not apply to 02_gen_responses" in proc.stderr
    proc = stage("02_gen_responses", run, "--iteration", "1", "--dpo.beta", "0.3", cache=cache)
    assert proc.returncode == 2 and "--dpo.beta does not apply to 02_gen_responses" in proc.stderr
    assert len(history(run, cache)) == before  # nothing ran, nothing was committed


def test_driver_overrides_go_into_the_run_config(tmp_path):
    from selfreward.run.config import load_config

    out = tmp_path / "config.yaml"
    command = [
        sys.executable,
        "-m",
        "selfreward.stage",
        "config",
        "--config",
        "configs/tiny.yaml",
        "--out",
        str(out),
        "--",
    ]
    proc = subprocess.run([*command, "--judge.num_samples", "2", "--no-oxen"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    config = load_config(out)
    assert config.judge.num_samples == 2 and not config.oxen.enabled and config.seed == 7
    assert out.read_text().startswith("# configs/tiny.yaml with the overrides --judge.num_samples 2 --no-oxen")
    proc = subprocess.run([*command, "--judge.num_sample", "2"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'judge.num_samples'" in proc.stderr


def test_stages_never_load_the_oxen_library(run, cache):
    """Oxen's native threads outliving the interpreter crashed stages on exit; it now lives in a child."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(REPO / 'scripts' / '04_gen_preferences.py')!r}, '--run-dir', {str(run)!r}, "
        "'--iteration', '1', '--preferences.min_margin', '0.01']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "print('oxen loaded:', 'oxen' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=stage_env(cache), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "oxen commit" in proc.stderr and "oxen loaded: False" in proc.stdout


def test_a_hung_remote_holds_up_no_stage_and_the_next_run_pushes_again(run, cache):
    server = silent_server()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/someone/runs"
    env = dict(stage_env(cache), OXEN_REMOTE=url)
    args = ["--iteration", "1", "--preferences.min_margin", "0.01", "--oxen.push_stall_seconds", "2",
            "--oxen.push_timeout_seconds", "1000", "--oxen.push_retries", "2",
            "--oxen.push_backoff_seconds", "0.01"]  # fmt: skip
    try:
        proc = stage("04_gen_preferences", run, *args, cache=cache, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # The stage did not wait for its push: wait for it here, as self-reward.sh's end does.
        waited = subprocess.run([sys.executable, "-m", "selfreward.run.versioning", "--wait", "--run-dir", str(run)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        failed = "failed after 2 tries: no progress for 2 s (oxen.push_stall_seconds): the remote does not answer"
        assert waited.returncode == 0 and f"the push {failed}" in waited.stdout, waited.stdout
        again = stage("04_gen_preferences", run, *args, "--skip-if-complete", cache=cache, env=env, timeout=300)
        assert again.returncode == 10 and f"warning: oxen push to {url} {failed}" in again.stdout  # tried again
    finally:
        server.close()
        stop_pusher(run)


def _can_mount() -> bool:
    probe = "mkdir -p /tmp/.selfreward-mount-probe && mount -t tmpfs -o size=1m tmpfs /tmp/.selfreward-mount-probe"
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    try:
        return subprocess.run([*unshare, "sh", "-c", probe], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


ON_SMALL_DISK = textwrap.dedent("""
    set -u
    mnt=$1; src=$2; free_kb=$3; readonly=$4; shift 4
    mkdir -p "$mnt" && mount -t tmpfs -o size=64m tmpfs "$mnt" && cp -a "$src/." "$mnt/"
    fill=$(( $(df -k --output=avail "$mnt" | tail -1) - free_kb ))
    [ "$fill" -gt 0 ] && dd if=/dev/zero of="$mnt/.filler" bs=1k count=$fill status=none
    [ "$readonly" = 1 ] && mount -o remount,ro "$mnt"
    (cd "$mnt" && find . -path ./.filler -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) > "$mnt.before"
    "$@" > "$mnt.stdout" 2> "$mnt.stderr"; echo $? > "$mnt.code"
    (cd "$mnt" && find . -path ./.filler -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) > "$mnt.after"
""")


def on_small_disk(run, tmp_path, free_kb, command, cache, readonly=False):
    """Run `command` with the run folder on a 64 MiB tmpfs that has `free_kb` KiB free (or is read-only).

    Returns (CompletedProcess-like, file digests before, after)."""
    if not _can_mount():
        pytest.skip("mount namespaces are not available on this machine (unshare -m)")
    mnt = tmp_path / "disk"
    script = tmp_path / "on_small_disk.sh"
    script.write_text(ON_SMALL_DISK)
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    command = [str(mnt) if part == "RUN" else part for part in command]
    subprocess.run([*unshare, "bash", str(script), str(mnt), str(run), str(free_kb), str(int(readonly)), *command],
                   cwd=REPO, env=stage_env(cache), check=True)  # fmt: skip
    out = {name: (tmp_path / f"disk.{name}").read_text() for name in ("code", "stdout", "stderr", "before", "after")}
    proc = subprocess.CompletedProcess(command, int(out["code"]), out["stdout"], out["stderr"])
    return proc, out["before"], out["after"]


def _changed(before: str, after: str) -> set[str]:
    return {line.split()[1] for line in set(before.splitlines()) ^ set(after.splitlines())}


def test_a_full_disk_ends_in_one_line_and_keeps_every_output(run, cache, tmp_path):
    script = [sys.executable, str(REPO / "scripts" / "02_gen_responses.py"), "--run-dir", "RUN", "--iteration", "1",
              "--responses.max_new_tokens", "8"]  # fmt: skip
    proc, before, after = on_small_disk(run, tmp_path, 0, script, cache)
    one_line_error(proc, 2, "no space left on the device", "free some and rerun")
    # the complete responses, their manifest and everything else are as they were; only the log of
    # finished batches (a scratch file for resuming) and the lock's note of who holds it may differ
    assert _changed(before, after) <= {"./.selfreward/lock", "./M0/generated/responses.partial.jsonl"}


def test_a_full_disk_during_a_dpo_checkpoint_ends_in_one_line(run, cache, tmp_path):
    shutil.rmtree(RunLayout(run).model_root(1))
    script = [sys.executable, str(REPO / "scripts" / "05_dpo.py"), "--run-dir", "RUN", "--iteration", "1",
              "--dpo.save_steps", "1"]  # fmt: skip
    proc, before, after = on_small_disk(run, tmp_path, 600, script, cache)
    one_line_error(proc, 2, "the disk is probably full", "free some and rerun")
    assert not {p for p in _changed(before, after) if not p.startswith(("./M1/", "./.selfreward/"))}


def test_a_read_only_run_folder_ends_in_one_line(run, cache, tmp_path):
    script = [sys.executable, str(REPO / "scripts" / "04_gen_preferences.py"), "--run-dir", "RUN", "--iteration", "1",
              "--preferences.min_margin", "0.01"]  # fmt: skip
    proc, before, after = on_small_disk(run, tmp_path, 1000, script, cache, readonly=True)
    one_line_error(proc, 2, "cannot write", "Read-only file system", "make")
    assert before == after
    driver = ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--run-dir", "RUN"]
    proc, _, _ = on_small_disk(run, tmp_path, 1000, driver, cache, readonly=True)
    assert proc.returncode == 2 and "self-reward.sh: error: cannot write the run folder" in proc.stderr


def test_a_busy_oxen_repository_waits_then_ends_in_one_line_and_the_rerun_commits(run, cache):
    lock = os.open(run / ".oxen" / "refs" / "LOCK", os.O_RDWR)
    fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as an open Oxen repository holds it
    try:
        proc = stage("04_gen_preferences", run, "--iteration", "1", "--preferences.min_margin", "0.01",
                     "--oxen.busy_wait_seconds", "1", cache=cache)  # fmt: skip
    finally:
        os.close(lock)
    one_line_error(proc, 2, "oxen commit failed: another process is using the repository", "rerun to commit them")
    manifest = json.loads(RunLayout(run).manifest("04_gen_preferences", 1).read_text())
    assert manifest["complete"] and manifest["config"]["preferences"]["min_margin"] == 0.01
    again = stage("04_gen_preferences", run, "--iteration", "1", "--preferences.min_margin", "0.01",
                  "--skip-if-complete", cache=cache)  # fmt: skip
    assert again.returncode == 10 and "(recovered)" in again.stdout
    assert history(run, cache)[-1].endswith("(recovered)")


@pytest.mark.parametrize(
    ("error", "phrase"),
    [
        (OSError(28, "No space left on device", "/runs/x/M0/generated/.responses.jsonl.1.tmp"),
         "no space left on the device writing /runs/x/M0/generated/.responses.jsonl.1.tmp"),
        (PermissionError(13, "Permission denied", "/runs/x/M0/generated/.prompts.manifest.json.1.tmp"),
         "cannot write /runs/x/M0/generated/.prompts.manifest.json.1.tmp: Permission denied"),
        (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1200\nbasic_ios::clear"),
         "the disk is probably full"),
    ],
)  # fmt: skip
def test_machine_failures_become_one_line(error, phrase):
    from selfreward.stage import environment_error

    assert phrase in environment_error(error)
    assert environment_error(ValueError("a bug")) is None


def test_a_driver_runs_to_its_end_when_its_script_changes_under_it(cache, tmp_path):
    """bash reads a script as it goes; a git pull while a run takes hours must not change what it does."""
    run = tmp_path / "run"
    driver = tmp_path / "self-reward.sh"
    where = 'here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)'  # the copy runs the repository's stages
    driver.write_text((REPO / "self-reward.sh").read_text().replace(where, f"here={REPO}"))
    python = tmp_path / "python"  # the first Python the driver starts spoils the rest of its script
    python.write_text(f'#!/bin/sh\nprintf "\\n)) not bash ((\\n" >> {driver}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    proc = subprocess.run(["bash", str(driver), "--config", "configs/tiny.yaml", "--iterations", "0", "--run-dir",
                           str(run), "--no-oxen"], cwd=REPO, env=dict(stage_env(cache), PYTHON=str(python)),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: M0..M0" in proc.stdout and "not bash" in driver.read_text()
