"""Shared fixtures: one tiny end-to-end run of the driver that many tests inspect."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stage_env(cache: Path) -> dict[str, str]:
    # HOME too: Oxen writes its user config there, and tests leave the user's own alone.
    home = cache / "home"
    home.mkdir(exist_ok=True)
    env = dict(
        os.environ, PYTHON=sys.executable, SELF_REWARD_CACHE=str(cache), TOKENIZERS_PARALLELISM="false", HOME=str(home)
    )
    env.pop("OXEN_REMOTE", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def silent_server() -> socket.socket:
    """A remote that accepts connections (the kernel completes them) and never answers; close() resets them."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    return server


def stop_pusher(run_dir: Path) -> None:
    """End the run's background pusher, if one is at work, and the push it started (its process group)."""
    pusher = Path(run_dir) / ".selfreward" / "pusher"
    if not pusher.is_file():
        return
    with pusher.open() as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return  # none at work
        except BlockingIOError:
            pid = int(pusher.read_text())
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory) -> Path:
    """Builtin models are built into a fresh folder: tests never read or fill the user's cache."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["SELF_REWARD_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def run_stage(cache):
    """Run one stage script as a user would; returns the CompletedProcess."""

    def run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / f"{script}.py"), *args],
            cwd=REPO,
            env=stage_env(cache),
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    return run


def run_driver(run_dir: Path, cache: Path, config: str = "configs/tiny.yaml", iterations: int = 2, extra=(), env=None,
               timeout=None):  # fmt: skip
    """self-reward.sh as a user runs it; returns the CompletedProcess."""
    return subprocess.run(
        ["bash", str(REPO / "self-reward.sh"), "--config", config, "--iterations", str(iterations),
         "--run-dir", str(run_dir), *extra],
        cwd=REPO, env=env or stage_env(cache), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def live_models_at_load(monkeypatch) -> list[int]:
    """How many models loaded through backends.load_backend or reward_model.load_reward_model are still
    alive when the next one loads: a stage or tool that lets each go before loading the next records only
    zeros."""
    import gc
    import weakref

    from selfreward.judge import reward_model
    from selfreward.model import backends

    live, alive_at_load = weakref.WeakSet(), []

    def counting(load):
        def load_and_count(*args, **kwargs):
            gc.collect()
            alive_at_load.append(len(live))
            loaded = load(*args, **kwargs)
            live.add(loaded.model)
            return loaded

        return load_and_count

    monkeypatch.setattr(backends, "load_backend", counting(backends.load_backend))
    monkeypatch.setattr(reward_model, "load_reward_model", counting(reward_model.load_reward_model))
    return alive_at_load


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache) -> Path:
    """SFT + 2 iterations of the tiny config through self-reward.sh."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    started = time.time()
    proc = run_driver(run_dir, cache)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (run_dir / "driver.log").write_text(proc.stdout + proc.stderr)
    (run_dir / "driver.seconds").write_text(f"{time.time() - started:.3f}")
    return run_dir


@pytest.fixture(scope="session")
def tiny_model(cache):
    """The tiny random model and its chat format, loaded in-process."""
    from selfreward.model.chat import ChatFormat
    from selfreward.model.models import TINY, load_model, load_tokenizer, resolve_model_path
    from selfreward.run.config import ModelConfig

    cfg = ModelConfig(name_or_path=TINY, device="cpu")
    path = resolve_model_path(TINY)
    tokenizer = load_tokenizer(path, cfg)
    return load_model(path, cfg), ChatFormat.from_tokenizer(tokenizer), path
