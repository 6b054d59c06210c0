"""Every stage's outputs committed to an Oxen repository (the run folder by default), and pushed.

Oxen's native library never runs inside a stage: every call goes to a short-lived child process
(`python -m selfreward.versioning`, one JSON request on stdin, one JSON answer). That buys three things:
- The library starts background threads (tokio, RocksDB, jemalloc) that outlive the call. In a stage
  they were seen faulting while libtorch's exit handlers ran (about 2% of finished stages in one
  series of trials exited with SIGSEGV after their commit). The child does nothing else and leaves
  with os._exit once it has answered, so no exit handler runs beside those threads.
- A push that hangs (a remote that accepts the connection and never answers) is killed after
  oxen.push_timeout_seconds and counts as a failed try.
- A panic of the library (a Rust PanicException, which is not an Exception) ends the child, not
  the stage, and comes back as one line.

Committing is local and never needs the network. The ledger <run>/.selfreward/oxen.json records
which manifest each stage's commit holds and which commit each remote has, so a rerun can tell a
complete stage whose commit never happened (a kill between its summary line and its commit), and
pushes left pending (a failure, oxen.strict, a kill); both are made up by the next stage that runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfreward.config import OxenConfig
from selfreward.layout import RunLayout

log = logging.getLogger("selfreward")

DEFAULT_USER = ("self-reward", "self-reward@localhost")


class PushError(RuntimeError):
    """A push failed after every retry and the run asked for strict mode."""


class OxenError(RuntimeError):
    """An Oxen operation failed; the message is one line and names the repository."""


def repo_dir(cfg: OxenConfig, run_dir: Path) -> Path:
    return Path(cfg.repo) if cfg.repo else Path(run_dir)


def remote_url(cfg: OxenConfig) -> str | None:
    return os.environ.get("OXEN_REMOTE") or cfg.remote


# -- the parent's side: requests to the child ---------------------------------------------------------


def _call(request: dict, timeout: float | None = None) -> dict:
    """Run one request in a child process; its answer, or OxenError (TimeoutError when it timed out)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "selfreward.versioning"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"no answer after {timeout:g} s") from None
    answer = None
    lines = proc.stdout.strip().splitlines()
    if lines:
        try:
            answer = json.loads(lines[-1])
        except json.JSONDecodeError:
            answer = None
    if isinstance(answer, dict) and "error" not in answer:
        return answer  # even if the child then died on its way out: the work was done and reported
    if isinstance(answer, dict):
        raise OxenError(answer["error"])
    last = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("🐂")]
    raise OxenError(f"the Oxen process ended with code {proc.returncode}: {last[-1] if last else 'no message'}")


def _busy(error: Exception) -> bool:
    text = str(error)
    return "LOCK" in text and ("temporarily unavailable" in text or "lock" in text.lower())


def _call_waiting(request: dict, wait: float) -> dict:
    """A request that waits up to `wait` seconds (with backoff) while another process holds the
    repository's lock: the user's `oxen` command, inspect_run, or a run sharing oxen.repo."""
    deadline, delay = time.time() + wait, 0.25
    while True:
        try:
            return _call(request)
        except OxenError as exc:
            if not _busy(exc) or time.time() + delay > deadline:
                if _busy(exc):
                    raise OxenError(f"another process is using the repository ({exc})") from None
                raise
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def _user(cfg: OxenConfig) -> dict:
    return {"name": cfg.user_name or os.environ.get("OXEN_USER_NAME"),
            "email": cfg.user_email or os.environ.get("OXEN_USER_EMAIL")}  # fmt: skip


def commit(cfg: OxenConfig, run_dir: Path, paths: list[Path], message: str) -> tuple[str | None, str | None]:
    """Add `paths` (files or folders under the repository) and commit them.

    Returns (new commit id or None when nothing changed since the last commit, the branch's head).
    """
    root = repo_dir(cfg, run_dir).resolve()
    files = []
    for path in paths:
        path = Path(path).resolve()
        if not path.is_relative_to(root):
            raise OxenError(f"oxen.repo {root} does not contain {path}: point oxen.repo at the run folder")
        if path.exists():
            files.append(str(path))
    request = {"action": "commit", "root": str(root), "paths": files, "message": message, "user": _user(cfg)}
    answer = _call_waiting(request, cfg.busy_wait_seconds)
    return answer["commit"], answer["head"]


def known_commit(cfg: OxenConfig, run_dir: Path, commit_id: str) -> bool:
    """Whether the repository's history has this commit (it may have been deleted or made anew)."""
    root = repo_dir(cfg, run_dir)
    if not (root / ".oxen").is_dir():
        return False
    return any(c["id"] == commit_id for c in history(cfg, run_dir))


def history(cfg: OxenConfig, run_dir: Path) -> list[dict]:
    """The repository's commits, newest first: [{id, timestamp, message}]."""
    request = {"action": "log", "root": str(repo_dir(cfg, run_dir).resolve())}
    return _call_waiting(request, cfg.busy_wait_seconds)["commits"]


def read_at_commit(cfg: OxenConfig, run_dir: Path, path: Path, commit_id: str) -> bytes:
    """A file's bytes as committed in `commit_id`, without touching the run's working files."""
    root = repo_dir(cfg, run_dir).resolve()
    relative = Path(path).resolve().relative_to(root)
    with tempfile.TemporaryDirectory(prefix="oxen-read-") as scratch:
        request = {"action": "read", "root": str(root), "path": str(relative), "commit": commit_id, "scratch": scratch}
        _call_waiting(request, cfg.busy_wait_seconds)
        return (Path(scratch) / relative).read_bytes()


def push(cfg: OxenConfig, run_dir: Path, url: str) -> bool:
    """Push the branch with retries and doubling backoff, each try limited to oxen.push_timeout_seconds.

    On final failure: one warning line and False, or PushError with oxen.strict.
    """
    root = str(repo_dir(cfg, run_dir).resolve())
    request = {"action": "push", "root": root, "remote_name": cfg.remote_name, "url": url, "branch": cfg.branch}
    delay, error = cfg.push_backoff_seconds, ""
    for attempt in range(1, cfg.push_retries + 1):
        try:
            _call(request, timeout=cfg.push_timeout_seconds)
            return True
        except TimeoutError as exc:
            error = f"the remote did not answer ({exc})"
        except OxenError as exc:
            error = str(exc)
        if attempt < cfg.push_retries:
            time.sleep(delay)
            delay *= 2
    line = f"oxen push to {url} failed after {cfg.push_retries} tries: {error}; the commit is kept locally"
    if cfg.strict:
        raise PushError(line + " (the next run of any stage retries it)")
    print(f"warning: {line}; the next stage retries it", flush=True)
    return False


# -- the ledger: which stage outputs are committed, which commits each remote has -----------------------


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_ledger(layout: RunLayout) -> dict:
    try:
        ledger = json.loads(layout.oxen_ledger.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"stages": {}, "pushed": {}}
    return ledger if isinstance(ledger, dict) else {"stages": {}, "pushed": {}}


def _write_ledger(layout: RunLayout, ledger: dict) -> None:
    from selfreward.records import write_json

    write_json(layout.oxen_ledger, ledger)


def stage_key(stage: str, iteration: int) -> str:
    return f"{stage}/{iteration}"


def committed_commit(cfg: OxenConfig, layout: RunLayout, stage: str, iteration: int) -> str | None:
    """The commit holding this stage's current manifest, or None if it never got one."""
    entry = _read_ledger(layout).get("stages", {}).get(stage_key(stage, iteration))
    manifest = layout.manifest(stage, iteration)
    if not entry or not manifest.is_file() or entry.get("manifest") != file_digest(manifest):
        return None
    return entry["commit"] if known_commit(cfg, layout.root, entry["commit"]) else None


def record_commit(layout: RunLayout, stage: str, iteration: int, commit_id: str, recovered: bool) -> None:
    ledger = _read_ledger(layout)
    ledger.setdefault("stages", {})[stage_key(stage, iteration)] = {
        "manifest": file_digest(layout.manifest(stage, iteration)),
        "commit": commit_id,
        "recovered": recovered,
    }
    ledger["head"] = commit_id
    _write_ledger(layout, ledger)


def recovered_stages(layout: RunLayout) -> set[str]:
    """'stage/iteration' keys whose commit was made by a rerun, not by the stage itself."""
    return {key for key, entry in _read_ledger(layout).get("stages", {}).items() if entry.get("recovered")}


def push_pending(cfg: OxenConfig, layout: RunLayout) -> None:
    """Push if a remote is set and it lacks this run's newest commit (a push failed, or was never made)."""
    url = remote_url(cfg)
    ledger = _read_ledger(layout)
    head = ledger.get("head")
    if not url or not head or ledger.get("pushed", {}).get(url) == head:
        return
    if push(cfg, layout.root, url):
        ledger = _read_ledger(layout)
        ledger.setdefault("pushed", {})[url] = head
        _write_ledger(layout, ledger)


# -- the child's side: the only code that imports oxen ----------------------------------------------------


def _configure_user(user: dict) -> None:
    """Oxen refuses to commit without a user: the config's or the environment's, else a default.

    An identity the user already configured for Oxen is kept unless one is given.
    """
    import oxen

    user_file = Path.home() / ".config" / "oxen" / "user_config.toml"
    if user.get("name") or user.get("email") or not user_file.is_file():
        oxen.user.config_user(user.get("name") or DEFAULT_USER[0], user.get("email") or DEFAULT_USER[1])


def _open_repo(root: str):
    import oxen

    Path(root).mkdir(parents=True, exist_ok=True)
    repo = oxen.Repo(root)
    if not (Path(root) / ".oxen").is_dir():
        repo.init()
    return repo


def _do_commit(request: dict) -> dict:
    _configure_user(request["user"])
    repo = _open_repo(request["root"])
    for path in request["paths"]:
        repo.add(path)
    try:
        made = repo.commit(request["message"])
    except ValueError as exc:
        if "No changes to commit" not in str(exc):
            raise
        commits = list(repo.log())
        return {"commit": None, "head": commits[0].id if commits else None}
    commit_id = getattr(made, "id", None) or str(made)
    return {"commit": commit_id, "head": commit_id}


def _do_log(request: dict) -> dict:
    if not (Path(request["root"]) / ".oxen").is_dir():
        return {"commits": []}
    import oxen

    commits = oxen.Repo(request["root"]).log()
    return {"commits": [{"id": c.id, "timestamp": str(c.timestamp), "message": c.message} for c in commits]}


def _do_push(request: dict) -> dict:
    repo = _open_repo(request["root"])
    repo.set_remote(request["remote_name"], request["url"])  # contacts the server: fails fast when unreachable
    repo.push(remote_name=request["remote_name"], branch=request["branch"])
    return {}


def _do_read(request: dict) -> dict:
    """Restore one file of a commit into a scratch folder: a copy of the repository's metadata whose
    immutable version store is linked, not copied, so the run's own files are never touched."""
    import oxen

    root, scratch = Path(request["root"]), Path(request["scratch"])
    meta = scratch / ".oxen"
    for item in (root / ".oxen").iterdir():
        target = meta / item.name
        if item.name == "versions":
            shutil.copytree(item, target, copy_function=_link_or_copy)
        elif item.is_dir():
            shutil.copytree(item, target)
        else:
            meta.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
    oxen.Repo(str(scratch)).restore(request["path"], source=request["commit"])
    if not (scratch / request["path"]).is_file():
        raise FileNotFoundError(f"{request['path']} is not in commit {request['commit'][:12]}")
    return {}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


ACTIONS = {"commit": _do_commit, "log": _do_log, "push": _do_push, "read": _do_read}


def _child_main() -> None:
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # the library prints progress to stdout; only the answer goes there
    request: dict = {}
    try:
        request = json.loads(sys.stdin.read())
        answer, code = ACTIONS[request["action"]](request), 0
    except BaseException as exc:  # a Rust panic is a BaseException: report it in one line like any error
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        answer, code = {"error": f"{message} (repository {request.get('root', '?')})"}, 1
    os.write(answer_fd, (json.dumps(answer) + "\n").encode())
    sys.stderr.flush()
    # Leave without exit handlers: the library's background threads may still be running.
    os._exit(code)


if __name__ == "__main__":
    _child_main()
