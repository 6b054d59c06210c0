"""One writer per run folder: the driver, or a stage run by hand, holds <run>/.selfreward/lock.

The lock is an exclusive flock(2) on that file. self-reward.sh opens it on file descriptor 9 and asks
this module to lock it; the stages it starts inherit the descriptor, and with it the lock, and
recognise their driver by the token it exports in SELFREWARD_RUN_LOCK. A stage run by hand locks the
file itself. Anyone else gets one line naming the holder. The kernel drops the lock when the last
process holding it exits, however it exits, so a killed run is taken over by the next one with no
stale lock to clean up; a stage left running by a killed driver keeps the folder locked until it ends.

    python -m selfreward.run.runlock --run-dir runs/default --fd 9 --pid $$   # what self-reward.sh does
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from selfreward.run.layout import RunLayout
from selfreward.run.nodes import NODE_RANK_ENV

LOCK_ENV = "SELFREWARD_RUN_LOCK"  # the driver's token, inherited by the stages it starts
EXIT_BUSY = 5  # the run folder is in use by another process

_held: list[int] = []  # descriptors whose lock this process keeps until it exits


class RunBusyError(RuntimeError):
    """Another process is writing this run folder; the message names it."""


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
    except ValueError:  # empty (the holder has not written it yet) or torn
        return {}
    return record if isinstance(record, dict) else {}


def _holder_record(fd: int) -> dict:
    """The holder's record, allowing it a moment to write it if it has only just taken the lock."""
    for _ in range(20):
        record = _read_record(fd)
        if record:
            return record
        time.sleep(0.05)
    return {}


def _write_record(fd: int, record: dict) -> None:
    """Say who holds the lock. In place, never by rename: the lock belongs to this inode. Only
    informative, so a full disk does not stop a stage that has nothing else to write."""
    data = (json.dumps(record) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _when(stamp) -> str:
    try:
        moment = time.localtime(float(stamp))
    except (TypeError, ValueError):
        return "an unknown time"
    same_day = time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", moment)


def busy_message(run_dir: str | Path, record: dict) -> str:
    """'runs/x is in use by self-reward.sh, pid 1234, since 13:02; wait for it or stop it'."""
    if not record:
        return f"{run_dir} is in use by another process (it has not said which yet); wait for it or stop it"
    holder = f"{record.get('holder', 'a process')}, pid {record.get('pid', '?')}"
    if record.get("host") not in (None, socket.gethostname()):
        holder += f" on {record['host']}"
    stage_pid = record.get("stage_pid")
    if not _alive(record.get("pid")) and stage_pid and _alive(stage_pid):
        return (
            f"{run_dir} is in use by {record.get('stage')}.py, pid {stage_pid}, since "
            f"{_when(record.get('stage_since'))} (started by {holder}, which has exited); wait for it or stop it"
        )
    if stage_pid and _alive(stage_pid) and record.get("stage"):
        holder += f" (now running {record['stage']})"
    return f"{run_dir} is in use by {holder}, since {_when(record.get('since'))}; wait for it or stop it"


def lock_run(run_dir: str | Path, holder: str, *, fd: int | None = None, pid: int | None = None) -> str:
    """Lock the run folder for `holder` (on `fd` if given, kept open by the caller) and return the token.

    Raises RunBusyError when another process holds it.
    """
    layout = RunLayout(run_dir)
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    if fd is None:
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _held.append(fd)
    if not _try_lock(fd):
        raise RunBusyError(busy_message(run_dir, _holder_record(fd)))
    token = secrets.token_hex(8)
    record = {"holder": holder, "pid": pid or os.getpid(), "since": time.time(), "host": socket.gethostname()}
    _write_record(fd, {**record, "token": token})
    return token


def is_rank_zero() -> bool:
    """Whether this process writes for its stage: always, except a torchrun rank other than 0, whose
    rank 0 holds the lock, writes, commits and prints for all of them, and a stage on a node other than 0
    (self-reward.sh --node-rank), whose node 0 does."""
    return int(os.environ.get("RANK") or os.environ.get(NODE_RANK_ENV) or "0") == 0


def lock_for_stage(run_dir: str | Path, stage: str) -> None:
    """Every stage calls this first: run under the driver that started it, or take the lock itself."""
    if not is_rank_zero():
        return
    layout = RunLayout(run_dir)
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _held.append(fd)
    if _try_lock(fd):
        token = secrets.token_hex(8)
        _write_record(
            fd,
            {
                "holder": f"{stage}.py",
                "pid": os.getpid(),
                "since": time.time(),
                "host": socket.gethostname(),
                "token": token,
            },
        )
        return
    record = _holder_record(fd)
    token = os.environ.get(LOCK_ENV)
    if token and record.get("token") == token:  # our driver holds it: say which stage is working
        _write_record(fd, {**record, "stage": stage, "stage_pid": os.getpid(), "stage_since": time.time()})
        return
    raise RunBusyError(busy_message(run_dir, record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--fd", type=int, required=True, help="the open lock file, which the caller keeps open")
    parser.add_argument("--pid", type=int, required=True, help="the process that holds the lock (the caller)")
    parser.add_argument("--holder", default="self-reward.sh")
    args = parser.parse_args(argv)
    try:
        print(lock_run(args.run_dir, args.holder, fd=args.fd, pid=args.pid))
    except RunBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    return 0


if __name__ == "__main__":
    sys.exit(main())
