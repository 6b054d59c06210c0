"""Every stage's outputs committed to an Oxen repository (the run folder by default), and pushed.

Oxen's native library never runs inside a stage: every call goes to a short-lived child process
(`python -m selfreward.run.versioning`, one JSON request on stdin, one JSON answer). That buys three things:
- The library starts background threads (tokio, RocksDB, jemalloc) that outlive the call. In a stage
  they were seen faulting while libtorch's exit handlers ran (about 2% of finished stages in one
  series of trials exited with SIGSEGV after their commit). The child does nothing else and leaves
  with os._exit once it has answered, so no exit handler runs beside those threads.
- A push that hangs (a remote that accepts the connection and never answers) is stopped once its
  process shows no progress for oxen.push_stall_seconds, and counts as a failed try.
- A panic of the library (a Rust PanicException, which is not an Exception) ends the child, not
  the stage, and comes back as one line.

Committing is local and never needs the network; pushing is not a stage's work. After its commit a
stage starts the run's pusher (`python -m selfreward.run.versioning --push --background`, detached, one
per run: it holds <run>/.selfreward/pusher locked, writes <run>/.selfreward/push.log) and goes on. The
pusher pushes the branch until the remote has the newest commit, from a copy of the repository's
metadata: Oxen holds the repository locked for the whole of a push, and a stage's commit must not wait
on the network. self-reward.sh's end waits oxen.final_push_wait_seconds for it and says what is still
unpushed and how to push it (`python -m selfreward.run.versioning --push --run-dir DIR`).

The ledger <run>/.selfreward/oxen.json records which manifest each stage's commit holds and which
commit each remote has, so a rerun can tell a complete stage whose commit never happened (a kill
between its summary line and its commit), and pushes left pending (a failure, a kill); both are made
up by the next stage that runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
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

from selfreward.run.config import ConfigError, OxenConfig, load_config
from selfreward.run.layout import RunLayout
from selfreward.run.records import write_json

log = logging.getLogger("selfreward")

DEFAULT_USER = ("self-reward", "self-reward@localhost")


class OxenError(RuntimeError):
    """An Oxen operation failed; the message is one line and names the repository."""


def repo_dir(cfg: OxenConfig, run_dir: Path) -> Path:
    return Path(cfg.repo) if cfg.repo else Path(run_dir)


def remote_url(cfg: OxenConfig) -> str | None:
    return os.environ.get("OXEN_REMOTE") or cfg.remote


# -- the parent's side: requests to the child ---------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the folder that holds selfreward/
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _call(request: dict, stall: float | None = None, limit: float | None = None) -> dict:
    """Run one request in a child process; its answer, or OxenError (TimeoutError when it was stopped:
    no progress for `stall` seconds, or still running after `limit`)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "selfreward.run.versioning"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            env=_child_env(),
        )
        try:
            child.stdin.write(json.dumps(request).encode())
            child.stdin.close()
        except BrokenPipeError:  # it died at once: its stderr says why
            pass
        if stall is None and limit is None:
            child.wait()
        else:
            _watch(child, (out, err), stall, limit)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    answer = None
    lines = stdout.strip().splitlines()
    if lines:
        try:
            answer = json.loads(lines[-1])
        except json.JSONDecodeError:
            answer = None
    if isinstance(answer, dict) and "error" not in answer:
        return answer  # even if the child then died on its way out: the work was done and reported
    if isinstance(answer, dict):
        raise OxenError(answer["error"])
    last = [line for line in stderr.splitlines() if line.strip() and not line.startswith("🐂")]
    raise OxenError(f"the Oxen process ended with code {child.returncode}: {last[-1] if last else 'no message'}")


def _activity(pid: int, outputs) -> tuple:
    """What a working push changes: its output, its CPU time (ns, all threads: a thread the network
    wakes runs), its file and pipe I/O. A push waiting on a silent remote changes none of them.
    (Its progress bars are no help: the library draws them only on a terminal.)"""
    sizes = tuple(os.fstat(f.fileno()).st_size for f in outputs)
    cpu = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(os.path.join(task.path, "schedstat")) as handle:
                cpu += int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux, or it just ended: output and wall time still count
        pass
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        io = ""
    return sizes, cpu, io


def _watch(child: subprocess.Popen, outputs, stall: float | None, limit: float | None) -> None:
    """Wait for `child`; stop it (TimeoutError) when it shows no activity for `stall` seconds or runs past `limit`."""
    started = last_change = time.monotonic()
    seen = None
    tick = min(1.0, stall / 4) if stall else 1.0
    while child.poll() is None:
        now = time.monotonic()
        state = _activity(child.pid, outputs)
        if state != seen:
            seen, last_change = state, now
        why = None
        if stall is not None and now - last_change > stall:
            why = f"no progress for {stall:g} s (oxen.push_stall_seconds): the remote does not answer"
        elif limit is not None and now - started > limit:
            why = f"still going after {limit:g} s (oxen.push_timeout_seconds)"
        if why:
            child.kill()
            child.wait()
            raise TimeoutError(why)
        time.sleep(tick)


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
    return {
        "name": cfg.user_name or os.environ.get("OXEN_USER_NAME"),
        "email": cfg.user_email or os.environ.get("OXEN_USER_EMAIL"),
    }


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


def push(cfg: OxenConfig, layout: RunLayout, url: str) -> str | None:
    """Push the branch with retries and doubling backoff; a try is stopped when it stalls (see _watch).

    Returns None once pushed, else why not, in one line."""
    root, mirror = repo_dir(cfg, layout.root).resolve(), layout.push_mirror.resolve()
    request = {
        "action": "push",
        "root": str(root),
        "mirror": str(mirror),
        "remote_name": cfg.remote_name,
        "url": url,
        "branch": cfg.branch,
        "busy_wait": cfg.busy_wait_seconds,
    }
    delay, error = cfg.push_backoff_seconds, ""
    for attempt in range(1, cfg.push_retries + 1):
        try:
            _call(request, stall=cfg.push_stall_seconds, limit=cfg.push_timeout_seconds)
            return None
        except (TimeoutError, OxenError) as exc:
            error = str(exc)
        finally:
            shutil.rmtree(layout.push_mirror, ignore_errors=True)
        if attempt < cfg.push_retries:
            time.sleep(delay)
            delay *= 2
    return f"failed after {cfg.push_retries} tries: {error}"


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
    write_json(layout.oxen_ledger, ledger)  # atomic: a kill leaves the old ledger or the new one


@contextlib.contextmanager
def _updating_ledger(layout: RunLayout):
    """The ledger to change in place, written back at the end: one writer at a time (a stage recording its
    commit, the pusher recording a push), so that neither loses what the other wrote."""
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.oxen_ledger_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        ledger = _read_ledger(layout)
        yield ledger
        _write_ledger(layout, ledger)
    finally:
        os.close(fd)


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
    with _updating_ledger(layout) as ledger:
        ledger.setdefault("stages", {})[stage_key(stage, iteration)] = {
            "manifest": file_digest(layout.manifest(stage, iteration)),
            "commit": commit_id,
            "recovered": recovered,
        }
        ledger["head"] = commit_id


def recovered_stages(layout: RunLayout) -> set[str]:
    """'stage/iteration' keys whose commit was made by a rerun, not by the stage itself."""
    return {key for key, entry in _read_ledger(layout).get("stages", {}).items() if entry.get("recovered")}


def _unpushed(cfg: OxenConfig, layout: RunLayout) -> tuple[str, str] | None:
    """(remote, newest commit) when a remote is set and lacks this run's newest commit."""
    url = remote_url(cfg)
    ledger = _read_ledger(layout)
    head = ledger.get("head")
    if not url or not head or ledger.get("pushed", {}).get(url) == head:
        return None
    return url, head


def start_pusher(cfg: OxenConfig, layout: RunLayout) -> None:
    """Push in the background if the remote lacks this run's newest commit: the stage goes on at once.

    A pusher already at work pushes this commit too; the one started here then leaves at once."""
    todo = _unpushed(cfg, layout)
    if todo is None:
        return
    url = todo[0]
    failed = _read_ledger(layout).get("push_errors", {}).get(url)
    if failed:  # the last pusher gave up: say so once per stage, as the push is tried again
        print(
            f"warning: oxen push to {url} {failed}; the commits are kept locally and pushed again in the "
            f"background (log: {layout.push_log})",
            flush=True,
        )
    else:
        log.info("pushing to %s in the background (log: %s)", url, layout.push_log)
    command = [
        sys.executable,
        "-m",
        "selfreward.run.versioning",
        "--push",
        "--background",
        "--run-dir",
        str(layout.root.resolve()),
        "--oxen",
        json.dumps(dataclasses.asdict(cfg)),
    ]
    with open(layout.push_log, "ab") as output:
        subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            # Its own session: the stage's end, or a Ctrl-C of the driver, does not stop a push of committed work.
            start_new_session=True,
            # No inherited descriptors: the driver's run lock (fd 9) would keep the run folder locked.
            close_fds=True,
        )


def _say(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def _pusher_pid(layout: RunLayout) -> str:
    try:
        return layout.pusher.read_text().strip() or "?"
    except OSError:
        return "?"


def _lock_pusher(layout: RunLayout, wait: bool) -> int | None:
    """Become the run's one pusher: the lock's descriptor, or None when another holds it (and not `wait`)."""
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.pusher, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            return None
        _say(f"waiting for the background push (pid {_pusher_pid(layout)}, log {layout.push_log}) to end")
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _pusher_running(layout: RunLayout) -> bool:
    if not layout.pusher.is_file():
        return False
    fd = os.open(layout.pusher, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _push_to_head(cfg: OxenConfig, layout: RunLayout) -> bool:
    """Push until the remote has the newest commit (commits made meanwhile included). False when a push failed."""
    while (todo := _unpushed(cfg, layout)) is not None:
        url, head = todo
        _say(f"pushing {head[:12]} to {url}")
        error = push(cfg, layout, url)
        with _updating_ledger(layout) as ledger:
            if error is None:
                ledger.setdefault("pushed", {})[url] = head
                ledger.get("push_errors", {}).pop(url, None)
            else:
                ledger.setdefault("push_errors", {})[url] = error
        if error is not None:
            _say(f"oxen push to {url} {error}")
            return False
        _say(f"pushed {head[:12]} to {url}")
    return True


def push_pending(cfg: OxenConfig, layout: RunLayout, wait: bool = False) -> bool:
    """The run's pusher: push, in order, until the remote has the newest commit. Returns whether it has.

    Without `wait`, leaves at once when another pusher is at work (it pushes whatever is pending)."""
    while True:
        fd = _lock_pusher(layout, wait)
        if fd is None:
            return False
        try:
            pushed = _push_to_head(cfg, layout)
        finally:
            os.close(fd)
        # A stage that committed while this one let go found it still at work and left its commit to it.
        if not pushed or _unpushed(cfg, layout) is None:
            return pushed


def _unpushed_stages(cfg: OxenConfig, layout: RunLayout, url: str) -> tuple[int, list[str]]:
    """How many commits the remote lacks, and the stages ('05_dpo/1') they hold, oldest first."""
    ledger = _read_ledger(layout)
    pushed = ledger.get("pushed", {}).get(url)
    by_commit = {entry["commit"]: key for key, entry in ledger.get("stages", {}).items()}
    try:
        commits = [c["id"] for c in history(cfg, layout.root)]
    except OxenError:  # the ledger's stages, newest first, can still tell
        commits = [entry["commit"] for entry in reversed(ledger.get("stages", {}).values())]
    missing = commits[: commits.index(pushed)] if pushed in commits else commits
    return len(missing), [by_commit[c] for c in reversed(missing) if c in by_commit]


def push_command(layout: RunLayout, url: str) -> str:
    command = f"python -m selfreward.run.versioning --push --run-dir {layout.root}"
    return f"OXEN_REMOTE={url} {command}" if os.environ.get("OXEN_REMOTE") == url else command


def unpushed_line(cfg: OxenConfig, layout: RunLayout, url: str) -> str:
    """One line: what the remote lacks, why, and the command that pushes it."""
    count, stages = _unpushed_stages(cfg, layout, url)
    shown = ", ".join(stages) if len(stages) <= 4 else f"{stages[0]} … {stages[-1]}"
    line = f"{count} commit{'s' * (count != 1)} not pushed to {url}" + (f" ({shown})" if shown else "")
    error = _read_ledger(layout).get("push_errors", {}).get(url)
    if _pusher_running(layout):
        line += f"; a push is still going in the background (pid {_pusher_pid(layout)}, log {layout.push_log})"
        if error:
            line += f"; the last one {error}"
    elif error:
        line += f": the push {error}"
    return f"{line}; the commits are kept locally; to push them: {push_command(layout, url)}"


def wait_for_pushes(cfg: OxenConfig, layout: RunLayout) -> int:
    """self-reward.sh's end: wait up to oxen.final_push_wait_seconds for the background push, then say in one
    line whether the remote has every commit. Exit code 2 when it lacks some and oxen.strict is set."""
    url = remote_url(cfg)
    if not cfg.enabled or not url or not _read_ledger(layout).get("head"):
        return 0
    deadline = time.monotonic() + cfg.final_push_wait_seconds
    while _unpushed(cfg, layout) and _pusher_running(layout) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _unpushed(cfg, layout) is None:
        print(f"oxen: every commit is pushed to {url}", flush=True)
        return 0
    line = unpushed_line(cfg, layout, url)
    if cfg.strict:
        print(f"error: {line} (oxen.strict)", file=sys.stderr, flush=True)
        return 2
    print(f"warning: {line}", flush=True)
    return 0


def push_now(cfg: OxenConfig, layout: RunLayout) -> int:
    """`--push`: push what the remote lacks, in this terminal (after a background push still going ends)."""
    url = remote_url(cfg)
    if not url:
        print(f"error: no remote to push to: set oxen.remote in {layout.config} or OXEN_REMOTE", file=sys.stderr)
        return 2
    if push_pending(cfg, layout, wait=True):
        print(f"oxen: every commit is pushed to {url}", flush=True)
        return 0
    print(f"error: {unpushed_line(cfg, layout, url)}", file=sys.stderr, flush=True)
    return 2


# -- the child's side: the only code that imports oxen ----------------------------------------------------


def _configure_user(user: dict) -> None:
    """Oxen refuses to commit without a user: the config's or the environment's, else a default.

    An identity the user already configured for Oxen is kept unless one is given.
    """
    import oxen  # in the child process only (see above)

    user_file = Path.home() / ".config" / "oxen" / "user_config.toml"
    if user.get("name") or user.get("email") or not user_file.is_file():
        oxen.user.config_user(user.get("name") or DEFAULT_USER[0], user.get("email") or DEFAULT_USER[1])


def _open_repo(root: str):
    import oxen  # in the child process only (see above)

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
    import oxen  # in the child process only (see above)

    commits = oxen.Repo(request["root"]).log()
    return {"commits": [{"id": c.id, "timestamp": str(c.timestamp), "message": c.message} for c in commits]}


def _do_push(request: dict) -> dict:
    """Push from a copy of the repository (see _copy_repository): Oxen holds a repository's locks for the
    whole of a push, and the stages' commits must not wait on the network."""
    import oxen  # in the child process only (see above)

    root, mirror = Path(request["root"]), Path(request["mirror"])
    shutil.rmtree(mirror, ignore_errors=True)  # left by a pusher that was killed
    with _repository_locked(root, request["busy_wait"]):
        _copy_repository(root, mirror)
    repo = oxen.Repo(str(mirror))
    repo.set_remote(request["remote_name"], request["url"])  # contacts the server: fails fast when unreachable
    repo.push(remote_name=request["remote_name"], branch=request["branch"])
    return {}


@contextlib.contextmanager
def _repository_locked(root: Path, wait: float):
    """Hold the repository's database locks, as an open Oxen repository does, so that no commit changes it
    meanwhile; while another process uses it, try again for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    locks = sorted(
        p
        for item in (root / ".oxen").iterdir()
        if item.is_dir() and item.name != "versions"
        for p in item.rglob("LOCK")
    )
    while True:
        held = []
        try:
            for lock in locks:
                held.append(os.open(lock, os.O_RDWR))
                fcntl.lockf(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)  # RocksDB's own lock: fcntl(F_SETLK)
        except OSError:
            for fd in held:
                os.close(fd)
            if time.monotonic() > deadline:
                raise OxenError(f"another process is using the repository (waited {wait:g} s)") from None
            time.sleep(0.1)
            continue
        try:
            yield
        finally:
            for fd in held:
                os.close(fd)
        return


def _copy_repository(root: Path, scratch: Path) -> None:
    """A copy of the repository's metadata under `scratch` whose immutable version store is linked, not copied.

    Without the databases' LOCK files, which each database makes anew: closing any descriptor of a file
    would let go of this process's lock on it (see _repository_locked)."""
    meta = scratch / ".oxen"
    for item in (root / ".oxen").iterdir():
        target = meta / item.name
        if item.name == "versions":
            shutil.copytree(item, target, copy_function=_link_or_copy)
        elif item.is_dir():
            shutil.copytree(item, target, ignore=shutil.ignore_patterns("LOCK"))
        else:
            meta.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)


def _do_read(request: dict) -> dict:
    """Restore one file of a commit into a scratch folder, from a copy of the repository, so the run's own
    files are never touched."""
    import oxen  # in the child process only (see above)

    root, scratch = Path(request["root"]), Path(request["scratch"])
    _copy_repository(root, scratch)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfreward.run.versioning",
        description="Push a run's commits to its Oxen remote (oxen.remote in the run's config.yaml, or OXEN_REMOTE).",
    )
    parser.add_argument("--run-dir", required=True, help="the run's folder, e.g. runs/default")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--push",
        action="store_true",
        help="push the commits the remote lacks, now (after a background push still going ends)",
    )
    what.add_argument(
        "--wait",
        action="store_true",
        help="what self-reward.sh does at its end: wait up to "
        "oxen.final_push_wait_seconds for the background push, then say what is not pushed",
    )
    parser.add_argument("--background", action="store_true", help=argparse.SUPPRESS)  # started by a stage
    parser.add_argument("--oxen", help=argparse.SUPPRESS)  # the stage's oxen settings, as JSON
    args = parser.parse_args(argv)
    layout = RunLayout(args.run_dir)
    try:
        cfg = OxenConfig(**json.loads(args.oxen)) if args.oxen else load_config(layout.config).oxen
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.background:
        push_pending(cfg, layout)
        return 0
    return push_now(cfg, layout) if args.push else wait_for_pushes(cfg, layout)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main())
    _child_main()  # a request from _call, on stdin
