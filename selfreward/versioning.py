"""Every stage's outputs committed to an Oxen repository (the run folder by default), and pushed.

Committing is local and never needs the network. A push that fails is retried with backoff and
then reported in one line; the local commit stays and the run goes on, unless `oxen.strict`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from selfreward.config import OxenConfig

log = logging.getLogger("selfreward")

DEFAULT_USER = ("self-reward", "self-reward@localhost")


class PushError(RuntimeError):
    """A push failed after every retry and the run asked for strict mode."""


def _oxen():
    import oxen  # the oxenai package: a compiled core, imported only when versioning is on

    return oxen


def configure_user(cfg: OxenConfig) -> None:
    """Oxen refuses to commit without a user: take it from the config, then the environment.

    An identity the user already configured for Oxen is kept unless the config names one.
    """
    name = cfg.user_name or os.environ.get("OXEN_USER_NAME")
    email = cfg.user_email or os.environ.get("OXEN_USER_EMAIL")
    user_file = Path.home() / ".config" / "oxen" / "user_config.toml"
    if name or email or not user_file.is_file():
        _oxen().user.config_user(name or DEFAULT_USER[0], email or DEFAULT_USER[1])


def repo_dir(cfg: OxenConfig, run_dir: Path) -> Path:
    return Path(cfg.repo) if cfg.repo else run_dir


def remote_url(cfg: OxenConfig) -> str | None:
    return os.environ.get("OXEN_REMOTE") or cfg.remote


def open_repo(cfg: OxenConfig, run_dir: Path):
    oxen = _oxen()
    root = repo_dir(cfg, run_dir)
    root.mkdir(parents=True, exist_ok=True)
    repo = oxen.Repo(str(root))
    if not (root / ".oxen").is_dir():
        repo.init()
    return repo


def commit_outputs(cfg: OxenConfig, run_dir: Path, paths: list[Path], message: str) -> str | None:
    """Add `paths` (files or folders under the repository) and commit; push if a remote is set.

    Returns the commit id, or None when nothing changed since the last commit.
    """
    configure_user(cfg)
    repo = open_repo(cfg, run_dir)
    root = repo_dir(cfg, run_dir).resolve()
    for path in paths:
        path = Path(path).resolve()
        if not path.exists():
            continue
        if not path.is_relative_to(root):
            raise ValueError(f"oxen.repo {root} does not contain {path}: point oxen.repo at the run folder")
        repo.add(str(path))
    try:
        commit = repo.commit(message)
    except ValueError as exc:
        if "No changes to commit" in str(exc):
            return None
        raise
    commit_id = getattr(commit, "id", None) or str(commit)
    url = remote_url(cfg)
    if url:
        push(repo, cfg, url)
    return commit_id


def push(repo, cfg: OxenConfig, url: str) -> bool:
    """Push with retries and exponential backoff; one line on final failure (an error if strict)."""
    delay, error = cfg.push_backoff_seconds, None
    for attempt in range(1, cfg.push_retries + 1):
        try:
            repo.set_remote(cfg.remote_name, url)  # contacts the server: fails fast when unreachable
            repo.push(remote_name=cfg.remote_name, branch=cfg.branch)
            return True
        except Exception as exc:  # the Rust core raises ValueError, OSError or its own types
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if attempt < cfg.push_retries:
                time.sleep(delay)
                delay *= 2
    line = f"oxen push to {url} failed after {cfg.push_retries} tries: {error}; the commit is kept locally"
    if cfg.strict:
        raise PushError(line)
    print(f"warning: {line}", flush=True)
    return False


def history(cfg: OxenConfig, run_dir: Path) -> list:
    """The repository's commits, newest first."""
    return list(open_repo(cfg, run_dir).log())


def read_at_commit(cfg: OxenConfig, run_dir: Path, path: Path, commit_id: str) -> bytes:
    """A file's bytes as committed in `commit_id`, without touching the run's working files.

    The repository metadata is copied to a scratch folder (its immutable version store is linked,
    not copied) and the file is restored there.
    """
    root = repo_dir(cfg, run_dir).resolve()
    relative = Path(path).resolve().relative_to(root)
    with tempfile.TemporaryDirectory(prefix="oxen-read-") as scratch:
        meta = Path(scratch) / ".oxen"
        for item in (root / ".oxen").iterdir():
            target = meta / item.name
            if item.name == "versions":
                shutil.copytree(item, target, copy_function=_link_or_copy)
            elif item.is_dir():
                shutil.copytree(item, target)
            else:
                meta.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)
        scratch_repo = _oxen().Repo(scratch)
        scratch_repo.restore(str(relative), source=commit_id)
        return (Path(scratch) / relative).read_bytes()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
