"""Several machines: which node a stage runs on, and where each node's share of a generating stage goes.

self-reward.sh --nnodes N --node-rank R exports SELFREWARD_NNODES and SELFREWARD_NODE_RANK to the stages it starts.
A stage whose batches are shared (stages.StageSpec.shards) then works on the batches b with b % N == R and saves
each to this node's part of the stage's resumable log (records.ChunkLog: <partial>.node<R>.jsonl), which it marks
finished at the end. Node 0 waits for every part's mark, joins the parts by batch number and finishes the stage
as one node would: the same rows in the same order, since a batch's samples depend on its contents and the run's
seed, not on the node. The other nodes wait for that stage's manifest. A killed node's part keeps the batches it
finished: its rerun does only the rest of its share. The nodes meet through the run folder, which every node must
see (shared storage); the processes of a training stage meet through torchrun or accelerate launch instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NNODES_ENV = "SELFREWARD_NNODES"
NODE_RANK_ENV = "SELFREWARD_NODE_RANK"
FINISHED = -1  # the chunk number that marks a node's part finished
POLL_SECONDS = 0.2
# How long a node waits for the others (SELFREWARD_NODE_WAIT_SECONDS): a share takes as long as the stage.
WAIT_ENV = "SELFREWARD_NODE_WAIT_SECONDS"
DEFAULT_WAIT = 7 * 24 * 3600.0

log = logging.getLogger("selfreward")


@dataclass(frozen=True)
class Node:
    nnodes: int = 1
    rank: int = 0

    @classmethod
    def here(cls) -> Node:
        """This process's node, from the driver's environment (one node when it is unset)."""
        nnodes, rank = int(os.environ.get(NNODES_ENV, "1")), int(os.environ.get(NODE_RANK_ENV, "0"))
        if nnodes < 1 or not 0 <= rank < nnodes:
            raise ValueError(f"{NODE_RANK_ENV}={rank} is not a node of {NNODES_ENV}={nnodes}")
        return cls(nnodes, rank)

    @property
    def several(self) -> bool:
        return self.nnodes > 1

    def mine(self, batch: int) -> bool:
        return batch % self.nnodes == self.rank

    def part(self, partial: Path, rank: int | None = None) -> Path:
        """Node `rank`'s (default: this node's) part of the resumable log `partial`."""
        return partial.with_name(f"{partial.stem}.node{self.rank if rank is None else rank}{partial.suffix}")


class NotThisNodes:
    """The batches this node does not generate: those done before a kill, and the other nodes' share. A stage
    passes it where a backend takes the batches to skip."""

    def __init__(self, node: Node, done):
        self.node, self.done = node, done

    def __contains__(self, batch: object) -> bool:
        return batch in self.done or not (isinstance(batch, int) and self.node.mine(batch))


def wait_for(ready: Callable[[], bool], what: str) -> None:
    """Return once ready() is true, saying every minute what is awaited; TimeoutError after WAIT_ENV seconds."""
    limit = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT))
    started = said = time.monotonic()
    while not ready():
        now = time.monotonic()
        if now - started > limit:
            raise TimeoutError(f"waited {limit:.0f} s for {what}")
        if now - said >= 60:
            log.info("still waiting for %s (%.0f s)", what, now - started)
            said = now
        time.sleep(POLL_SECONDS)
