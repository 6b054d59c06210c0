"""Failpoints: named moments where the reliability tests make a stage die, as a kill or crash would.

SELFREWARD_CRASH_AT lists "stage:iteration:point" entries, comma-separated; when the running stage
reaches a listed point it kills itself: SIGKILL, or SIGSEGV for `at_exit` (the crash on the way out
that a finished stage must survive). With SELFREWARD_CRASH_ONCE=DIR each point fires only once,
leaving a file in DIR, so the rerun that follows goes through. Unset, nothing here does anything.

Points: after_checkpoint (a trainer checkpoint is saved), after_chunk (a batch is saved to a stage's resumable
log, or to a node's part of it), after_endpoint_reply (an outside judge's reply
is cached), after_summary (manifest written and summary line printed, before the Oxen commit),
after_commit (committed, before the ledger records it), at_exit (all done).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

CRASH_ENV = "SELFREWARD_CRASH_AT"
ONCE_ENV = "SELFREWARD_CRASH_ONCE"
POINTS = ("after_checkpoint", "after_chunk", "after_endpoint_reply", "after_summary", "after_commit", "at_exit")

_stage = ""  # "stage:iteration" of the stage this process runs, set by stage.parse_stage


def set_stage(name: str, iteration: int) -> None:
    global _stage
    _stage = f"{name}:{iteration}"


def reach(point: str) -> None:
    """Die here if SELFREWARD_CRASH_AT names this stage and point; otherwise return at once."""
    wanted = os.environ.get(CRASH_ENV)
    here = f"{_stage}:{point}"
    if not wanted or here not in wanted.split(","):
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        marker = Path(once) / here.replace(":", "-")
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSEGV if point == "at_exit" else signal.SIGKILL)
