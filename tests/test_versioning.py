"""Every stage's outputs committed to Oxen; inspecting files at any commit; pushes that fail."""

import fcntl
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading

import yaml
from conftest import REPO, run_driver, silent_server, stage_env, stop_pusher

from selfreward.run import versioning
from selfreward.run.config import OxenConfig
from selfreward.run.layout import RunLayout


def inspect(run, *args, cache):
    return subprocess.run(
        [sys.executable, "-m", "selfreward.tools.inspect_run", "--run-dir", str(run), *args],
        cwd=REPO, env=stage_env(cache), capture_output=True, text=True,
    )  # fmt: skip


def test_one_commit_per_stage_per_iteration(tiny_run, cache):
    proc = inspect(tiny_run, cache=cache)
    assert proc.returncode == 0, proc.stderr
    messages = [line.split("  ", 2)[2] for line in proc.stdout.splitlines()]
    expected = ["00_sft] iteration 0"] + [
        f"{stage}] iteration {t}"
        for t in (1, 2)
        for stage in ("01_gen_prompts", "02_gen_responses", "03_gen_scores", "04_gen_preferences", "05_dpo", "06_eval")
    ]
    oldest_first = messages[::-1][: len(expected)]  # later tests may rerun stages and add commits
    for message, want in zip(oldest_first, expected, strict=True):
        assert want in message and message.startswith("tiny: [")
    assert "rows in" in oldest_first[0] and "wrote M0" in oldest_first[0]


def test_inspect_shows_any_file_at_any_commit(tiny_run, run_stage, cache, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    layout = RunLayout(run)
    before = len(layout.generated(1, "preferences").read_text().splitlines())
    assert before > 0
    # a rerun with another margin leaves no pairs and makes a new commit of the same file
    run_stage("04_gen_preferences", "--run-dir", str(run), "--iteration", "1", "--preferences.min_margin", "100")
    log = inspect(run, cache=cache).stdout.splitlines()
    newest, older = (
        log[0].split()[0],
        next(line.split()[0] for line in log[1:] if "04_gen_preferences] iteration 1" in line),
    )
    now = inspect(run, "--file", "M0/generated/preferences.jsonl", "--commit", newest, cache=cache)
    then = inspect(run, "--file", "M0/generated/preferences.jsonl", "--commit", older, cache=cache)
    assert "preferences.jsonl: 0 rows" in now.stdout
    assert f"preferences.jsonl: {before} rows" in then.stdout
    assert "fields: prompt_id, prompt, chosen, rejected, score_chosen, score_rejected" in then.stdout
    assert "score_chosen histogram" in then.stdout
    scores = inspect(run, "--file", "M0/generated/scores.jsonl", cache=cache)
    assert "score histogram (nearest point):" in scores.stdout and "judgments" in scores.stdout
    assert len(layout.generated(1, "preferences").read_text().splitlines()) == 0  # working files untouched


def test_a_silent_remote_holds_up_no_stage_and_the_end_says_what_is_unpushed(tmp_path, cache):
    """A remote that accepts connections and never answers, and pushes judged stalled only after 1000 s: the run
    still ends, since no stage waits on a push (each used to wait for its tries, and retry every earlier one)."""
    server = silent_server()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/someone/runs"
    env = dict(stage_env(cache), OXEN_REMOTE=url)
    run = tmp_path / "tiny"
    try:
        overrides = ["--oxen.push_stall_seconds", "1000", "--oxen.push_timeout_seconds", "1000", "--oxen.push_retries",
                     "2", "--oxen.push_backoff_seconds", "0.01", "--oxen.final_push_wait_seconds", "1"]  # fmt: skip
        proc = run_driver(run, cache, iterations=1, env=env, timeout=900, extra=["--", *overrides])
        assert proc.returncode == 0, proc.stderr[-3000:]
        last = proc.stdout.strip().splitlines()[-1]
        assert last.startswith(f"warning: 7 commits not pushed to {url} (00_sft/0 … 06_eval/1); a push is still "
                               "going in the background (pid "), last  # fmt: skip
        assert last.endswith(
            f"to push them: OXEN_REMOTE={url} python -m selfreward.run.versioning --push --run-dir {run}"
        )
        ledger = json.loads(RunLayout(run).oxen_ledger.read_text())
        assert ledger["head"] and url not in ledger.get("pushed", {})
        assert len(inspect(run, cache=cache).stdout.splitlines()) == 7  # every commit is made, locally
        # The pusher keeps no lock on the run folder: a stage runs (here: finds its work done).
        again = subprocess.run([sys.executable, str(REPO / "scripts" / "06_eval.py"), "--run-dir", str(run),
                                "--iteration", "1", "--skip-if-complete"], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=300)  # fmt: skip
        assert again.returncode == 10, again.stderr[-2000:]

        server.close()  # the remote goes away: the push now fails, and the command to push says so in one line
        push = [sys.executable, "-m", "selfreward.run.versioning", "--push", "--run-dir", str(run)]
        pushed = subprocess.run(push, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert pushed.returncode == 2 and pushed.stderr.count("\n") == 1, pushed.stderr
        assert pushed.stderr.startswith(f"error: 7 commits not pushed to {url} (00_sft/0 … 06_eval/1): the push "
                                        "failed after 2 tries: ")  # fmt: skip
        # oxen.strict: the run is not done until its commits are pushed
        config = yaml.safe_load(RunLayout(run).config.read_text())
        config["oxen"]["strict"] = True
        RunLayout(run).config.write_text(yaml.safe_dump(config))
        wait = [sys.executable, "-m", "selfreward.run.versioning", "--wait", "--run-dir", str(run)]
        strict = subprocess.run(wait, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert strict.returncode == 2 and strict.stderr.startswith("error: 7 commits not pushed")
        assert strict.stderr.strip().endswith("(oxen.strict)")
    finally:
        server.close()
        stop_pusher(run)


class _Refuse(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802
        type(self).requests += 1
        self.send_response(403)
        self.end_headers()
        self.wfile.write(b'{"status": "error", "status_message": "forbidden"}')

    do_POST = do_PUT = do_GET

    def log_message(self, *args):
        pass


def test_a_refused_push_is_told_and_tried_again_by_the_next_stage(tiny_run, cache, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    url = f"http://127.0.0.1:{server.server_port}/someone/runs"
    env = dict(stage_env(cache), OXEN_REMOTE=url)

    def stage04(*extra):
        return subprocess.run(
            [sys.executable, str(REPO / "scripts" / "04_gen_preferences.py"), "--run-dir", str(run), "--iteration",
             "1", "--preferences.min_margin", "0.5", "--oxen.push_retries", "2", "--oxen.push_backoff_seconds",
             "0.01", *extra],
            cwd=REPO, env=env, capture_output=True, text=True,
        )  # fmt: skip

    def wait_for_the_pusher():
        return subprocess.run([sys.executable, "-m", "selfreward.run.versioning", "--wait", "--run-dir", str(run)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    def commits_of_04() -> int:
        return sum("04_gen_preferences] iteration 1" in line for line in inspect(run, cache=cache).stdout.splitlines())

    try:
        before = commits_of_04()
        proc = stage04()
        assert proc.returncode == 0 and f"pushing to {url} in the background" in proc.stderr, proc.stderr[-2000:]
        assert "04_gen_preferences] iteration 1" in inspect(run, cache=cache).stdout.splitlines()[0]  # committed
        waited = wait_for_the_pusher()
        assert waited.returncode == 0 and f"not pushed to {url}" in waited.stdout
        assert "the push failed after 2 tries: " in waited.stdout
        tried = _Refuse.requests
        assert tried > 0
        # The stage is complete and committed, but its push is pending: a rerun says why, and pushes again.
        again = stage04("--skip-if-complete")
        assert again.returncode == 10, again.stderr[-2000:]
        assert f"warning: oxen push to {url} failed after 2 tries: " in again.stdout
        wait_for_the_pusher()
        assert _Refuse.requests > tried
        assert commits_of_04() == before + 1  # retrying the push made no second commit
        assert "failed after 2 tries" in RunLayout(run).push_log.read_text()
    finally:
        server.shutdown()
        stop_pusher(run)


def test_no_oxen(tmp_path, run_stage, tiny_run):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    run_stage(
        "04_gen_preferences", "--run-dir", str(run), "--iteration", "1", "--no-oxen", "--preferences.min_margin", "1"
    )
    assert not (run / ".oxen").exists()


def _record(layout: RunLayout, stage: str, iteration: int, commit: str) -> None:
    """What a stage does after its commit: the ledger notes it (its manifest must exist)."""
    manifest = layout.manifest(stage, iteration)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"stage": stage}))
    versioning.record_commit(layout, stage, iteration, commit, recovered=False)


def test_the_pusher_pushes_until_the_remote_has_the_newest_commit_and_keeps_a_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("OXEN_REMOTE", raising=False)
    url = "http://127.0.0.1:9/someone/runs"
    cfg, layout = OxenConfig(remote=url), RunLayout(tmp_path / "run")
    pushed = []

    def push_while_a_stage_commits(cfg, layout, url):
        pushed.append(json.loads(layout.oxen_ledger.read_text())["head"])
        if len(pushed) == 1:  # the next stage commits while this push is under way
            _record(layout, "01_gen_prompts", 1, "c2")
        return None

    monkeypatch.setattr(versioning, "push", push_while_a_stage_commits)
    _record(layout, "00_sft", 0, "c1")
    assert versioning.push_pending(cfg, layout)
    assert pushed == ["c1", "c2"]  # in order, until the newest
    ledger = json.loads(layout.oxen_ledger.read_text())
    assert ledger["pushed"] == {url: "c2"} and set(ledger["stages"]) == {"00_sft/0", "01_gen_prompts/1"}
    assert versioning.push_pending(cfg, layout) and len(pushed) == 2  # nothing left to push

    _record(layout, "02_gen_responses", 1, "c3")
    monkeypatch.setattr(versioning, "push", lambda cfg, layout, url: "failed after 3 tries: refused")
    assert not versioning.push_pending(cfg, layout)
    ledger = json.loads(layout.oxen_ledger.read_text())
    assert ledger["pushed"] == {url: "c2"} and ledger["push_errors"] == {url: "failed after 3 tries: refused"}

    # One pusher per run: one started while another is at work leaves it the work.
    monkeypatch.setattr(versioning, "push", lambda cfg, layout, url: pushed.append("again"))
    with layout.pusher.open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        assert not versioning.push_pending(cfg, layout)
    assert len(pushed) == 2


def _watched(code: str) -> str | None:
    """Run `code` in a child as a push is run; why the watch stopped it, or None if it ran to its end."""
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=out)
        try:
            versioning._watch(child, (out,), stall=3, limit=1000)
        except TimeoutError as exc:
            return str(exc)
        return None


def test_a_push_is_stopped_when_it_shows_no_progress_not_when_it_is_slow():
    # Both run longer than the 3 s without progress that stops a push: one writes, one computes, for 8 s.
    assert _watched("import time\nfor _ in range(40):\n    print('.', flush=True)\n    time.sleep(0.2)") is None
    assert _watched("import time\nt = time.time()\nwhile time.time() - t < 8:\n    pass") is None
    assert _watched("import time\ntime.sleep(1000)").startswith("no progress for 3 s (oxen.push_stall_seconds)")


class _OxenThatHangs(http.server.BaseHTTPRequestHandler):
    """Answers the repository lookup as an Oxen server (oxenai 0.65) does, then never answers the push."""

    protocol_version = "HTTP/1.1"
    pushing = threading.Event()
    release = threading.Event()

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/") != "/api/repos/someone/runs":
            return self._hang()
        repository = {"namespace": "someone", "name": "runs", "min_version": None, "is_empty": True,
                      "storage_kind": "local"}  # fmt: skip
        body = json.dumps({"status": "success", "status_message": "resource_found", "repository": repository})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._hang()

    do_PUT = do_POST

    def _hang(self):
        type(self).pushing.set()
        type(self).release.wait(600)
        self.close_connection = True  # and no answer

    def log_message(self, *args):
        pass


def test_a_push_under_way_leaves_the_repository_free_for_the_next_commit(tmp_path, cache, monkeypatch):
    """Oxen holds a repository locked for the whole of a push: a stage's commit waited on the network
    (and failed after oxen.busy_wait_seconds). The push now works from a copy."""
    monkeypatch.setenv("HOME", stage_env(cache)["HOME"])  # Oxen's user config goes there
    run = tmp_path / "run"
    run.mkdir()
    (run / "a.txt").write_text("a")
    cfg = OxenConfig(push_stall_seconds=600, push_timeout_seconds=600, push_retries=1, busy_wait_seconds=5)
    assert versioning.commit(cfg, run, [run / "a.txt"], "first")[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OxenThatHangs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/someone/runs"
    outcome = []
    pushing = threading.Thread(target=lambda: outcome.append(versioning.push(cfg, RunLayout(run), url)))
    pushing.start()
    try:
        assert _OxenThatHangs.pushing.wait(120), "the push never got past the repository lookup"
        (run / "b.txt").write_text("b")
        made, _ = versioning.commit(cfg, run, [run / "b.txt"], "second")  # OxenError "another process is using..."
        assert made
    finally:
        _OxenThatHangs.release.set()
        pushing.join(120)
        server.shutdown()
    assert outcome and outcome[0].startswith("failed after 1 tries: ")
