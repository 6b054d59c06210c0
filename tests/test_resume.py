"""Exactly-once stages: SIGKILL at random points, rerun, and every id is there once, as if never killed."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time

from conftest import REPO, stage_env

from selfreward.run.layout import RunLayout
from selfreward.run.records import ChunkLog, read_jsonl, write_jsonl


def test_chunk_log_drops_a_torn_last_line_and_foreign_logs(tmp_path):
    path = tmp_path / "x.partial.jsonl"
    log = ChunkLog(path, "fp1")
    log.append(0, [{"id": "a"}])
    log.append(1, [{"id": "b"}, {"id": "c"}])
    with path.open("ab") as handle:
        handle.write(b'{"chunk": 2, "rows": [{"id": "d"')  # a write cut short by SIGKILL
    again = ChunkLog(path, "fp1")
    assert sorted(again.done) == [0, 1] and [r["id"] for r in again.rows()] == ["a", "b", "c"]
    again.append(2, [{"id": "d"}])
    assert [r["id"] for r in ChunkLog(path, "fp1").rows()] == ["a", "b", "c", "d"]
    assert ChunkLog(path, "other config").done == {}  # rows made under another config are not reused


def _run(script, run, *args, cache):
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), "--run-dir", str(run), "--iteration", "1", *args],
        cwd=REPO, env=stage_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _chunks_written(path) -> int:
    try:
        return max(0, len(path.read_bytes().split(b"\n")) - 2)  # header line, and the text after the last newline
    except FileNotFoundError:
        return 0


def _kill_and_resume(script, run, args, rng, kills, cache):
    """Run the stage once to completion, timing when its first batch lands; then SIGKILL it `kills`
    times at seeded random moments between that and its end, rerunning each time; then let it finish."""
    layout = RunLayout(run)
    out = {"02_gen_responses": "responses", "03_gen_scores": "scores"}[script]
    partial = layout.partial(script, 1)
    start = time.time()
    proc = _run(script, run, *args, cache=cache)
    first = None
    while proc.poll() is None:
        if first is None and _chunks_written(partial) > 0:
            first = time.time() - start
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    end = time.time() - start
    expected = layout.generated(1, out).read_text()
    layout.generated(1, out).unlink()
    layout.manifest(script, 1).unlink()
    chunks_at_kill = []
    for _ in range(kills):
        proc = _run(script, run, *args, cache=cache)
        time.sleep(rng.uniform(first or 0, end))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        chunks_at_kill.append(_chunks_written(partial))
        if layout.generated(1, out).exists():  # it finished before the kill: start that point again
            layout.generated(1, out).unlink()
            # the kill may have landed after the output's rename and before its manifest's write
            layout.manifest(script, 1).unlink(missing_ok=True)
    proc = _run(script, run, *args, cache=cache)
    assert proc.wait() == 0, proc.stderr.read()
    return expected, layout.generated(1, out).read_text(), chunks_at_kill


def test_sigkill_during_stages_02_and_03_loses_and_repeats_nothing(tiny_run, cache, tmp_path):
    rng = random.Random(20261122)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    layout = RunLayout(run)
    # 40 prompts in batches of 2 so that a kill lands between batches as well as inside one
    prompts = [{"prompt_id": f"p{i:02d}", "prompt": f"Task number {i}: describe item {i}.", "source": "test",
                "iteration": 1} for i in range(40)]  # fmt: skip
    write_jsonl(layout.generated(1, "prompts"), prompts)
    args02 = ["--responses.batch_size", "8", "--responses.max_new_tokens", "48"]
    want02, got02, chunks02 = _kill_and_resume("02_gen_responses", run, args02, rng, 6, cache)
    ids = [r["response_id"] for r in read_jsonl(layout.generated(1, "responses"))]
    assert sorted(ids) == sorted(f"p{i:02d}-r{k}" for i in range(40) for k in range(4))  # each once
    assert got02 == want02  # and the very rows an uninterrupted run writes

    args03 = ["--judge.mode", "sample", "--judge.num_samples", "2", "--judge.batch_size", "8",
              "--judge.max_new_tokens", "16"]  # fmt: skip
    want03, got03, chunks03 = _kill_and_resume("03_gen_scores", run, args03, rng, 5, cache)
    scored = [r["response_id"] for r in read_jsonl(layout.generated(1, "scores"))]
    assert scored == ids
    assert got03 == want03
    assert not layout.partial("03_gen_scores", 1).exists()  # the log is gone once the output is final
    # the kills really interrupted work in progress, not only start-up
    assert any(0 < n for n in chunks02 + chunks03), (chunks02, chunks03)


def test_a_killed_dpo_resumes_from_its_checkpoint(tiny_run, cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    layout = RunLayout(run)
    shutil.rmtree(layout.model_root(1))
    args = ["--dpo.max_steps", "12", "--dpo.save_steps", "2", "--dpo.batch_size", "1"]
    # Killed (SIGKILL) right after its second checkpoint is saved: a failpoint, not a timer.
    env = dict(stage_env(cache), SELFREWARD_CRASH_AT="05_dpo:1:after_checkpoint", SELFREWARD_CRASH_ONCE=str(tmp_path))
    script = [sys.executable, str(REPO / "scripts" / "05_dpo.py"), "--run-dir", str(run), "--iteration", "1", *args]
    killed = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in layout.checkpoints(1).glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (layout.model(1) / "config.json").exists()
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr and "checkpoint-2" in done.stderr
    steps = [json.loads(line).get("step", 0) for line in layout.train_log(1).read_text().splitlines()]
    assert max(steps) == 12
    assert (layout.model(1) / "config.json").is_file()


def test_a_checkpoint_killed_while_saving_is_not_resumed(tmp_path):
    from selfreward.model.training import last_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert last_checkpoint(tmp_path / "none") is None
