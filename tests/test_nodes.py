"""Several machines: two "nodes" of the tiny loop on this machine (127.0.0.1), against one node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

from conftest import REPO, run_driver, stage_env

from selfreward.run.layout import RunLayout
from selfreward.run.nodes import FINISHED, Node, NotThisNodes
from selfreward.run.records import read_chunks

# Three batches in stages 01-03 (prompts: a wave of two), so that both nodes get some of each.
OVERRIDES = ["--", "--responses.batch_size", "8", "--judge.batch_size", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(run: Path, rank: int, port: int, cache: Path, env: dict | None = None) -> subprocess.Popen:
    command = ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--iterations", "1",
               "--run-dir", str(run), "--nnodes", "2", "--node-rank", str(rank), "--master-port", str(port),
               *OVERRIDES]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, env={**stage_env(cache), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _records(run: Path) -> dict[str, list]:
    """Every JSONL of the run: its rows' ids in order (the row count where rows have no id)."""
    records = {}
    for path in sorted(run.rglob("*.jsonl")):
        rel = path.relative_to(run).as_posix()
        if rel.startswith((".oxen", ".selfreward")):
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        ids = [next((r[k] for k in ("response_id", "prompt_id", "id") if k in r), None) for r in rows]
        records[rel] = ids if all(ids) else len(rows)
    return records


def _row_counts(run: Path) -> dict[str, tuple]:
    return {
        p.relative_to(run).as_posix(): (m["complete"], m["rows_in"], m["rows_out"])
        for p in sorted(run.rglob("*.manifest.json"))
        for m in [json.loads(p.read_text())]
    }


def test_two_nodes_write_the_one_node_records_and_a_killed_node_redoes_only_its_share(tmp_path, cache):
    one = tmp_path / "one"
    proc = run_driver(one, cache, iterations=1, extra=OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Node 1 dies (SIGKILL) right after saving its first batch of stage 02; node 0, waiting for node 1's share,
    # is then killed too. Both are started again. Only node 1 carries the failpoint: with both carrying it, the
    # node that saved a batch first died, and when that was node 0, node 1 went on and waited for it forever.
    two, port = tmp_path / "two", _free_port()
    crash = {"SELFREWARD_CRASH_AT": "02_gen_responses:1:after_chunk", "SELFREWARD_CRASH_ONCE": str(tmp_path / "once")}
    node0, node1 = _node(two, 0, port, cache), _node(two, 1, port, cache, crash)
    _, err = node1.communicate(timeout=600)
    assert node1.returncode == 137, err[-3000:]
    part = Node(2, 1).part(RunLayout(two).partial("02_gen_responses", 1))
    fingerprint = json.loads(part.read_text().splitlines()[0])["fingerprint"]
    assert list(read_chunks(part, fingerprint)[0]) == [1]  # node 1's share is batch 1, saved before the kill
    os.killpg(node0.pid, signal.SIGKILL)
    first0, _ = node0.communicate(timeout=60)
    assert "[02_gen_responses] iteration 1:" not in first0

    again = [_node(two, r, port, cache, {"SELFREWARD_CRASH_ONCE": str(tmp_path / "once")}) for r in (0, 1)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=600) for p in again)
    assert again[0].returncode == 0, err0[-3000:]
    assert again[1].returncode == 0, err1[-3000:]
    assert "[02_gen_responses] iteration 1: node 1: its share done: 1 batches (1 kept from before)" in out1
    assert out0.count("[02_gen_responses] iteration 1: 6 rows in, 24 rows out") == 1  # finished once, by node 0
    assert "node 1 of 2 done" in out1

    assert _records(two) == _records(one)  # the same row ids in the same order in every JSONL
    assert _row_counts(two) == _row_counts(one)
    generated = RunLayout(two).generated(1, "responses").parent
    assert (generated / "responses.jsonl").read_bytes() == (RunLayout(one).generated(1, "responses")).read_bytes()
    assert not list(generated.glob("*.node*.jsonl"))  # the parts are gone with the stage's resumable log
    manifest = json.loads(RunLayout(two).manifest("05_dpo", 1).read_text())
    assert manifest["processes"] == 2  # one training group across the two nodes


def test_a_node_takes_the_batches_of_its_rank_and_a_bad_node_is_refused(tmp_path, cache):
    node = Node(3, 1)
    assert [b for b in range(7) if b not in NotThisNodes(node, done={4})] == [1]  # 4 was done before a kill
    assert Node(3, 2).part(Path("M0/generated/responses.partial.jsonl")).name == "responses.partial.node2.jsonl"
    assert FINISHED not in range(0, 10**6)  # never a batch's number

    def driver(*args, env=None):
        return subprocess.run(
            ["bash", str(REPO / "self-reward.sh"), "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "r"),
             *args], cwd=REPO, env={**stage_env(cache), **(env or {})}, capture_output=True, text=True,
        )  # fmt: skip

    refused = driver("--nnodes", "2", "--node-rank", "2")
    assert refused.returncode == 2 and "--node-rank 2 is not one of the 2 nodes (0 .. 1)" in refused.stderr
    slurm = driver(env={"SLURM_NNODES": "2", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "gpu[01-02]"})
    assert slurm.returncode == 2 and "--node-rank 3 is not one of the 2 nodes" in slurm.stderr  # read from SLURM
    dry = driver("--nnodes", "2", "--dry-run")
    assert dry.returncode == 2 and "--dry-run runs on one machine" in dry.stderr
    assert not (tmp_path / "r").exists()
