"""Every stage's outputs committed to Oxen; inspecting files at any commit; pushes that fail."""

import http.server
import shutil
import socket
import subprocess
import sys
import threading

from conftest import REPO, stage_env

from selfreward.layout import RunLayout


def inspect(run, *args, cache):
    return subprocess.run(
        [sys.executable, "-m", "selfreward.inspect_run", "--run-dir", str(run), *args],
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


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_remote_keeps_local_commits_and_says_so_once_per_push(tmp_path, cache):
    url = f"http://127.0.0.1:{_closed_port()}/someone/runs"
    env = dict(stage_env(cache), OXEN_REMOTE=url)
    run = tmp_path / "tiny"
    proc = subprocess.run(
        ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--iterations", "1", "--run-dir",
         str(run), "--", "--oxen.push_retries", "2", "--oxen.push_backoff_seconds", "0.01"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = [line for line in proc.stdout.splitlines() if line.startswith("warning: oxen push")]
    assert len(failures) == 7  # SFT + six stages, one line each
    assert all(f"oxen push to {url} failed after 2 tries" in line for line in failures)
    assert len(inspect(run, cache=cache).stdout.splitlines()) == 7


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


def test_refusing_remote_in_strict_mode_stops_the_stage_and_the_rerun_pushes_again(tiny_run, cache, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    url = f"http://127.0.0.1:{server.server_port}/someone/runs"

    def stage04(*extra):
        return subprocess.run(
            [sys.executable, str(REPO / "scripts" / "04_gen_preferences.py"), "--run-dir", str(run), "--iteration",
             "1", "--preferences.min_margin", "0.5", "--oxen.push_retries", "2", "--oxen.push_backoff_seconds",
             "0.01", *extra],
            cwd=REPO, env=dict(stage_env(cache), OXEN_REMOTE=url), capture_output=True, text=True,
        )  # fmt: skip

    def commits_of_04() -> int:
        return sum("04_gen_preferences] iteration 1" in line for line in inspect(run, cache=cache).stdout.splitlines())

    try:
        before = commits_of_04()
        proc = stage04("--oxen.strict", "true")
        assert proc.returncode == 2
        assert f"error: oxen push to {url} failed after 2 tries" in proc.stderr
        assert "Traceback" not in proc.stderr
        # the commit itself was made before the push failed
        assert "04_gen_preferences] iteration 1" in inspect(run, cache=cache).stdout.splitlines()[0]
        tried = _Refuse.requests
        assert tried > 0
        # The stage is complete and committed, but its push is pending: a rerun does not just skip it.
        again = stage04("--oxen.strict", "true", "--skip-if-complete")
        assert again.returncode == 2 and f"error: oxen push to {url} failed" in again.stderr
        assert _Refuse.requests > tried
        lenient = stage04("--skip-if-complete")
        assert lenient.returncode == 10 and f"warning: oxen push to {url} failed after 2 tries" in lenient.stdout
        assert commits_of_04() == before + 1  # retrying the push made no second commit
    finally:
        server.shutdown()


def test_no_oxen(tmp_path, run_stage, tiny_run):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".oxen"))
    run_stage(
        "04_gen_preferences", "--run-dir", str(run), "--iteration", "1", "--no-oxen", "--preferences.min_margin", "1"
    )
    assert not (run / ".oxen").exists()
