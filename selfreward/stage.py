"""What every stage script shares: arguments, config loading, errors, the summary line.

The driver's config step runs here too, so that the run's config.yaml is checked as a stage checks it:

    python -m selfreward.stage config --config configs/tiny.yaml --out runs/default/config.yaml -- --seed 3
"""

from __future__ import annotations

import argparse
import difflib
import errno
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml
from tqdm import tqdm

from selfreward import dryrun
from selfreward.judge.endpoint import check_endpoint_settings
from selfreward.judge.rubric import check_judge_settings
from selfreward.model.models import HostMemoryError, ModelNotFoundError
from selfreward.run import failpoints, versioning
from selfreward.run.config import (
    Config,
    ConfigError,
    all_keys,
    load_config,
    override_value,
    parse_override_args,
    per_process_batch,
    save_config,
)
from selfreward.run.layout import RunLayout
from selfreward.run.nodes import FINISHED, Node, NotThisNodes, wait_for
from selfreward.run.records import (
    ChunkLog,
    RecordError,
    memory_text,
    path_fingerprint,
    read_chunks,
    read_manifest,
    write_json,
    write_text,
)
from selfreward.run.runlock import EXIT_BUSY, RunBusyError, is_rank_zero, lock_for_stage
from selfreward.run.stages import BASE_MODEL_KEYS, fingerprinted_config, run_stages, spec
from selfreward.run.versioning import OxenError

EXIT_BAD_INPUT = 2  # bad arguments, config, data file or model path; a disk or permission error; Oxen failed
EXIT_NO_PAIRS = 3  # stage 05 was given zero preference pairs: nothing to train on
EXIT_GATE = 4  # judge.gate stop: the judge is not better than chance on held-out EFT rows
# EXIT_BUSY = 5: another process is writing the run folder (selfreward.run.runlock)
EXIT_CANARY = 6  # judge.canary_gate stop: a canary trick fooled the judge more often than the config allows
EXIT_SKIPPED = 10  # --skip-if-complete found the output complete and did nothing
CHECKPOINT_STAMP_WAIT = 600  # seconds a torchrun rank waits for rank 0 to prepare the checkpoint folder
EXIT_FILE_ENV = "SELFREWARD_EXIT_FILE"  # set by self-reward.sh --num-processes: see _report_exit

log = logging.getLogger("selfreward")


def load_checked_config(path: str | Path, overrides: dict[str, object] | None = None) -> Config:
    """load_config, then the checks that need the judge (its templates and score pattern): the config of
    every stage, and the run's config.yaml the driver writes, pass both."""
    config = load_config(path, overrides)
    check_judge_settings(config.judge)
    check_endpoint_settings(config.eval)
    return config


class StageError(RuntimeError):
    """A stage cannot go on for a reason the user can fix; the message says which."""


class GateError(StageError):
    """judge.gate is stop and the judge failed its check (exit code 4)."""


class CanaryGateError(StageError):
    """judge.canary_gate is stop and a canary trick fooled the judge too often (exit code 6)."""


def unused_override(stage: str, key: str) -> str | None:
    """Why an override cannot change what `stage` does, or None if the stage reads that key."""
    section = key.split(".", 1)[0] if "." in key else key
    used = (*spec(stage).fingerprints, "oxen")
    if key in used:  # a single key the stage reads, e.g. judge.format for 00_sft
        return None
    if key in BASE_MODEL_KEYS and stage != "00_sft":
        return (
            f"--{key} does not apply to {stage}: it loads M<t-1> from the run folder; the base model is "
            "read by 00_sft only (stage 06 takes another judge with --eval.judge_model)"
        )
    if section not in used:
        return f"--{key} does not apply to {stage}, which reads only: {', '.join(used)}"
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        # argparse says "unrecognized arguments"; also name the nearest valid option.
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()[0].split("=")[0]
            options = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(bad, options, n=1, cutoff=0.5)
            if close:
                message += f" (did you mean {close[0]}?)"
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("selfreward", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "oxenai"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def peak_memory_mb() -> dict[str, int]:
    """Peak resident memory of this process and of its largest finished child (a vLLM engine, a
    torchrun worker), and the peak GPU memory PyTorch allocated, in MiB."""
    import torch  # heavy: a stage that finds its work complete exits without it

    peak = {"ram": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}  # Linux reports KiB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    if children:
        peak["ram_child"] = children
    if torch.cuda.is_available():
        peak["gpu"] = torch.cuda.max_memory_allocated() // 2**20
    return peak


@dataclass
class Stage:
    name: str
    args: argparse.Namespace
    config: Config
    layout: RunLayout
    iteration: int
    started: float
    inputs: dict[str, str] = field(default_factory=dict)  # path -> content fingerprint
    fingerprint: str = ""
    dry_run: dict | None = None  # --dry-run: the model stood in for and its estimated memory here
    node: Node = field(default_factory=Node.here)  # self-reward.sh --nnodes: this machine's place (run/nodes.py)
    resumed_chunks: int = 0  # chunks its resumable log held when it was opened (saved before a kill)

    def begin(self, inputs: list[str | Path]) -> None:
        """Fingerprint the inputs; with --skip-if-complete, exit if the output was made from exactly these. On a
        node other than 0, a stage that neither shares its batches nor trains waits for node 0 to make it."""
        self.inputs = {str(p): path_fingerprint(p) for p in inputs}
        used = fingerprinted_config(self.name, self.config)
        # Contents only, not paths: a moved or copied run folder is still the same run.
        payload = json.dumps([self.name, self.iteration, used, list(self.inputs.values())], sort_keys=True)
        self.fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        manifest = read_manifest(self.layout.manifest(self.name, self.iteration))
        if self.args.skip_if_complete and manifest and manifest.get("complete"):
            if manifest.get("fingerprint") == self.fingerprint:
                self._skip(manifest)
            log.info("inputs or config changed since the last complete run: running again")
        if self.node.rank and not (spec(self.name).shards or spec(self.name).trains):
            self._await_node_zero()
            sys.exit(EXIT_SKIPPED)

    def _skip(self, manifest: dict) -> None:
        """The output is complete: make up its Oxen commit if it never happened, push in the background if
        the remote lacks it, then exit."""
        line = summary_line(manifest).replace(":", ": complete, skipped;", 1)
        if self.config.oxen.enabled and is_rank_zero():  # torchrun: rank 0 commits
            if versioning.committed_commit(self.config.oxen, self.layout, self.name, self.iteration) is None:
                # Killed between its summary line and its commit, or run with --no-oxen before.
                if self._version(manifest, recovered=True):
                    line += "; its Oxen commit was missing and is made now (recovered)"
            else:
                versioning.start_pusher(self.config.oxen, self.layout)
        if is_rank_zero():  # one line, not one per torchrun rank
            print(line, flush=True)
        sys.exit(EXIT_SKIPPED)

    def start_writing(self) -> None:
        """Call once the inputs are read and checked, before the first output file changes: from here
        until finish() a previous complete manifest no longer describes the output, so it says so."""
        path = self.layout.manifest(self.name, self.iteration)
        manifest = read_manifest(path)
        if manifest and manifest.get("complete"):
            write_json(path, {**manifest, "complete": False})

    def chunk_log(self) -> ChunkLog:
        """The resumable log of finished batches for this stage's output (see records.ChunkLog); on several nodes,
        this node's part of it."""
        chunks = ChunkLog(self._part(self.node.rank), self.fingerprint)
        self.resumed_chunks = len(chunks.done)
        return chunks

    def _sharded(self) -> bool:
        return self.node.several and spec(self.name).shards

    def _part(self, rank: int) -> Path:
        partial = self.layout.partial(self.name, self.iteration)
        return self.node.part(partial, rank) if self._sharded() else partial

    def skip(self, done) -> object:
        """The batches this process does not generate: `done` (by a killed run), and on several nodes the other
        nodes' share."""
        return NotThisNodes(self.node, done) if self._sharded() else done

    def wave(self, chunks: ChunkLog, batches: list[int]) -> dict[int, dict]:
        """The saved chunks of `batches`: on one node this node's log; on several, each from whichever node's part
        holds it, once every one of them is saved (stage 01 filters a wave of batches in order on every node)."""
        if not self._sharded():
            return chunks.done
        found: dict[int, dict] = {}

        def saved() -> bool:
            for rank in range(self.node.nnodes):
                part = chunks.done if rank == self.node.rank else read_chunks(self._part(rank), self.fingerprint)[0]
                found.update({b: part[b] for b in batches if b in part})
            return all(b in found for b in batches)

        self._wait(saved, f"the other nodes' batches {batches} of {self.name}")
        return found

    def join_parts(self, chunks: ChunkLog) -> dict[int, dict]:
        """This node's share is done. On one node: its chunks. On several, the part is marked finished; node 0
        waits for every node's and returns their chunks joined by number, another node waits for node 0 to finish
        the stage and exits."""
        if not self._sharded():
            return chunks.done
        mark = {"nnodes": self.node.nnodes}
        if chunks.done.get(FINISHED, {}).get("state") != mark:  # a mark from a run on other nodes does not count
            chunks.append(FINISHED, [], mark)
        if self.node.rank:
            ours = len([k for k in chunks.done if k != FINISHED])
            kept = len([k for k in list(chunks.done)[: self.resumed_chunks] if k != FINISHED])
            print(
                f"[{self.name}] iteration {self.iteration}: node {self.node.rank}: its share done: {ours} batches "
                f"({kept} kept from before)",
                flush=True,
            )
            self._await_node_zero()
            sys.exit(0)
        parts: list[dict[int, dict]] = []

        def finished() -> bool:
            parts[:] = [read_chunks(self._part(rank), self.fingerprint)[0] for rank in range(self.node.nnodes)]
            return all(part.get(FINISHED, {}).get("state") == mark for part in parts)

        self._wait(finished, f"every node's share of {self.name}")
        return {k: chunk for part in parts for k, chunk in part.items() if k != FINISHED}

    def _await_node_zero(self) -> None:
        """Wait until node 0 has finished this stage from the same inputs and config."""
        path = self.layout.manifest(self.name, self.iteration)

        def finished() -> bool:
            manifest = read_manifest(path)
            return bool(manifest and manifest.get("complete") and manifest.get("fingerprint") == self.fingerprint)

        self._wait(finished, f"node 0 to finish {self.name}")

    def _wait(self, ready, what: str) -> None:
        try:
            wait_for(ready, what)
        except TimeoutError as exc:
            raise StageError(f"{exc}: is it running? (the run folder must be on storage every node sees)") from None

    def checkpoints(self, t: int) -> Path:
        """The trainer's checkpoint folder, emptied first if its checkpoints came from other inputs or config."""
        folder = self.layout.checkpoints(t)
        stamp = folder / "fingerprint"

        def stamped() -> bool:
            return stamp.is_file() and stamp.read_text() == self.fingerprint

        if not is_rank_zero():
            # Under torchrun only rank 0 empties and stamps the folder: another rank that found it between
            # rank 0's mkdir and its stamp would delete it under rank 0's feet. The others wait for the stamp.
            waited = time.monotonic()
            while not stamped():
                if time.monotonic() - waited > CHECKPOINT_STAMP_WAIT:
                    raise StageError(f"{stamp}: rank 0 has not stamped it in {CHECKPOINT_STAMP_WAIT} s")
                time.sleep(0.1)
            return folder
        if folder.exists() and not stamped():
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        # A stamp rewritten in place reads "" to another rank meanwhile: left alone when it matches.
        if not stamped():
            write_text(stamp, self.fingerprint)
        return folder

    def finish(
        self,
        *,
        rows_in: int,
        rows_out: int,
        outputs: list[str | Path],
        extra: dict | None = None,
        also_version: list[Path] = (),
    ) -> None:
        """Save the effective config and the manifest, print the summary line, commit it all to Oxen.

        The stage is complete once its manifest says so and its Oxen commit is recorded; a rerun with
        --skip-if-complete makes up a commit that a kill in between prevented.
        """
        save_config(self.config, self.layout.stage_config(self.name, self.iteration))
        merged = self.layout.model(self.iteration).resolve()
        versioned = [
            p
            for p in [*outputs, *also_version]
            if self.config.oxen.include_merged_weights or Path(p).resolve() != merged  # GBs on a 7B model
        ]
        versioned += [
            self.layout.config,
            self.layout.manifest(self.name, self.iteration),
            self.layout.stage_config(self.name, self.iteration),
        ]
        manifest = {
            "stage": self.name,
            "iteration": self.iteration,
            "complete": True,
            "rows_in": rows_in,
            "rows_out": rows_out,
            "seconds": round(time.time() - self.started, 2),
            "peak_memory_mb": peak_memory_mb(),
            "inputs": [{"path": p, "fingerprint": f} for p, f in self.inputs.items()],
            "outputs": [str(p) for p in outputs],
            "fingerprint": self.fingerprint,
            "versions": library_versions(),
            **(extra or {}),
            **({"dry_run": self.dry_run} if self.dry_run else {}),
            "versioned": [self._relative(p) for p in versioned],  # what its Oxen commit holds
            "config": self.config.to_dict(),
        }
        write_json(self.layout.manifest(self.name, self.iteration), manifest)
        self._drop_partial()
        print(summary_line(manifest), flush=True)
        failpoints.reach("after_summary")
        if self.config.oxen.enabled:
            self._version(manifest)

    def _drop_partial(self) -> None:
        """The stage's resumable log, and every node's part of it: the output is complete."""
        partial = self.layout.partial(self.name, self.iteration)
        for path in [partial, *partial.parent.glob(f"{partial.stem}.node*{partial.suffix}")]:
            path.unlink(missing_ok=True)

    def _relative(self, path: str | Path) -> str:
        """A path inside the run folder, relative to it: a moved run folder still finds it."""
        path = Path(path).resolve()
        root = self.layout.root.resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    def _version(self, manifest: dict, recovered: bool = False) -> bool:
        """Commit what the manifest lists, record the commit in the ledger, and with a remote set start
        the run's background pusher (the stage never waits on the network).

        Returns whether a new commit was made (not when these files already are the head commit)."""
        paths = [self.layout.root / p for p in manifest.get("versioned", [])]
        if not paths:  # a manifest written before the list was recorded
            paths = [Path(p) for p in manifest.get("outputs", [])] + [
                self.layout.config,
                self.layout.manifest(self.name, self.iteration),
                self.layout.stage_config(self.name, self.iteration),
            ]
        message = f"{self.layout.root.name}: {summary_line(manifest)}" + (" (recovered)" if recovered else "")
        cfg = self.config.oxen
        try:
            made, head = versioning.commit(cfg, self.layout.root, paths, message)
        except OxenError as exc:
            why = str(exc)
            if any(sign in why for sign in DISK_FULL_SIGNS):
                why = f"no space left on the device under {versioning.repo_dir(cfg, self.layout.root)} ({why[:160]}…)"
            raise StageError(
                f"oxen commit failed: {why}. The outputs are complete on disk; rerun to commit them "
                "(or pass --no-oxen to skip versioning)"
            ) from None
        failpoints.reach("after_commit")
        if made:
            log.info("oxen commit %s%s", made[:12], " (recovered)" if recovered else "")
        if made or head:
            # Nothing new to commit means these very files are already in the head commit.
            versioning.record_commit(self.layout, self.name, self.iteration, made or head, recovered and bool(made))
        versioning.start_pusher(cfg, self.layout)
        return bool(made)


def summary_line(manifest: dict) -> str:
    made = f"wrote {manifest['model']}" if manifest.get("model") else f"{manifest['rows_out']} rows out"
    line = (
        f"[{manifest['stage']}] iteration {manifest['iteration']}: {manifest['rows_in']} rows in, "
        f"{made}, {manifest['seconds']:.1f} s"
    )
    memory = memory_text(manifest.get("peak_memory_mb", {}))
    return f"{line}, {memory}" if memory else line


def parse_stage(
    name: str,
    doc: str,
    *,
    iteration: bool = True,
    argv: list[str] | None = None,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Stage:
    """Parse a stage's command line, load the config (the run's, or --config, plus overrides), swap in the
    dry run's stand-in if asked, set up logging and take the run's lock."""
    parser = _stage_parser(name, doc, iteration, extra_args)
    args = parser.parse_args(argv)
    t = getattr(args, "iteration", 0)
    if iteration and t < 1:
        parser.error(f"--iteration must be 1 or more, got {t}")
    layout = RunLayout(args.run_dir)
    overrides = _overrides(name, args, parser)
    config_path = args.config or layout.config
    if not os.path.exists(config_path):
        raise ConfigError(f"no config: {config_path} does not exist; pass --config FILE")
    config = load_checked_config(config_path, overrides)
    dry_run = None
    if args.dry_run:
        config, dry_run = _dry_run(name, config, layout)
    elif (layout.root / ".selfreward" / "dry-run").is_file():
        dryrun.guard_run_folder(layout.root, dry=False)  # refuses: a real stage in a dry run's folder
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    # bitsandbytes says at every start on CPU that an optional kernels package is missing; it is harmless.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    process_defaults()
    lock_for_stage(layout.root, name)  # one writer per run folder: the driver that started us, or this stage
    stage = Stage(name, args, config, layout, t, time.time(), dry_run=dry_run)
    _running.append(stage)
    failpoints.set_stage(name, t)
    return stage


def _stage_parser(
    name: str, doc: str, iteration: bool, extra_args: Callable[[argparse.ArgumentParser], None] | None
) -> argparse.ArgumentParser:
    """The options every stage takes, the stage's own (`extra_args`), and one --section.key per config key."""
    parser = _Parser(
        prog=f"{name}.py",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--run-dir", required=True, help="the run's folder, e.g. runs/default")
    if iteration:
        parser.add_argument("--iteration", type=int, required=True, help="1, 2, ...: iteration t uses M<t-1>")
    parser.add_argument("--config", help="YAML config (default: the run's saved config.yaml)")
    parser.add_argument("--no-oxen", action="store_true", help="do not commit the outputs to Oxen (oxen.enabled false)")
    parser.add_argument(
        "--skip-if-complete",
        action="store_true",
        help=f"exit {EXIT_SKIPPED} without work if the output is complete (making its Oxen commit or push if missing)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run with every setting of the config but a tiny random stand-in for the model, on the CPU, and "
        "print the real model's estimated memory (see selfreward/dryrun.py)",
    )
    if extra_args:
        extra_args(parser)
    keys = parser.add_argument_group("config overrides (any key of the config, e.g. --dpo.beta 0.2)")
    defaults = Config().to_dict()
    for key in all_keys():
        section, _, field_name = key.rpartition(".")
        default = defaults[section][field_name] if section else defaults[field_name]
        keys.add_argument(
            f"--{key}", dest=f"override:{key}", metavar="VALUE", default=argparse.SUPPRESS, help=f"default: {default}"
        )
    return parser


def _overrides(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The --section.key options given, as config overrides; one the stage does not read is refused."""
    overrides = {}
    for dest, raw in vars(args).items():
        if dest.startswith("override:"):
            key = dest.split(":", 1)[1]
            why = unused_override(name, key)
            if why:
                parser.error(why)
            overrides[key] = override_value(key, raw)
    if args.no_oxen:
        overrides["oxen.enabled"] = False
    return overrides


_running: list[Stage] = []  # the stage this process runs, for the error handler


def process_defaults() -> None:
    """Environment defaults for a process that loads models, set before CUDA starts; a user's own win.

    PyTorch's CUDA allocator with expandable segments: generation grows every sequence's key/value cache a
    token at a time, and the default allocator cannot reuse the blocks it leaves behind. Measured on an
    H200 for one stage-02 call at Mistral-7B's shape: 96 GiB reserved for 25 GiB in use. A 24 GB card
    has no such room: there the allocator must flush its cache and retry, and fails when no free block
    fits. With expandable segments the 2-layer stand-in's call reserved 3.7 GiB instead of 65.7 for the
    same 3.2 in use (bench/RESULTS.md).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def _dry_run(name: str, config: Config, layout: RunLayout) -> tuple[Config, dict]:
    """--dry-run: check the settings, print this stage's memory estimate, swap in the stand-in model."""
    dryrun.guard_run_folder(layout.root, dry=True)
    if dryrun.is_stand_in(config.model.name_or_path):  # a config written by a dry run: already swapped
        return config, {"stands_in_for": config.model.name_or_path}
    plan = dryrun.plan(config)
    stage = spec(name)
    rows = [
        r
        for r in plan.rows
        if r.stage == name or (r.kind == "host" and stage.trains) or (r.kind == "vllm" and stage.generates)
    ]
    dry = dryrun.dry_config(config)
    if rows and is_rank_zero():
        print(
            f"[{name}] dry run: {config.model.name_or_path} replaced by a tiny random model of its "
            f"architecture on {dry.model.device}; the real model's estimated memory (GiB):",
            flush=True,
        )
        print("\n".join(f"[{name}]   {line}" for line in dryrun.memory_table(rows).splitlines()), flush=True)
    estimate = {
        r.stage: {"gpu_gib": round(r.gpu / dryrun.GIB, 2), "host_gib": round(r.host / dryrun.GIB, 2), "what": r.what}
        for r in rows
    }
    info = {
        "stands_in_for": config.model.name_or_path,
        "architecture_from": plan.source,
        "estimate": estimate,
        "device": dry.model.device,
    }
    config, data_stands_in = dryrun.stand_in_data(dry)
    if data_stands_in and "data" in spec(name).fingerprints:  # said by the stage that reads the data
        info["data_stands_in"] = data_stands_in
        if is_rank_zero():
            print(
                f"[{name}] dry run: {', '.join(data_stands_in)} not found, standing in: "
                f"{', '.join(data_stands_in.values())} (a real run needs them; scripts/prepare_data.py writes "
                "the OASST profile's)",
                flush=True,
            )
    return config, info


# Messages of libraries that failed to write because the disk is full (torch.save says basic_ios::clear).
DISK_FULL_SIGNS = (
    "No space left on device",
    "basic_ios::clear",
    "PytorchStreamWriter failed",
    "StorageFull",
    "file write failed",
    "Disk quota exceeded",
)


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


def environment_error(exc: BaseException) -> str | None:
    """One line for a failure of the machine rather than of the code (disk full, a folder that cannot be
    written), naming the path; None for anything else."""
    run_dir = _running[-1].layout.root if _running else Path(".")
    if isinstance(exc, OSError):
        where = exc.filename or run_dir
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"no space left on the device writing {where} ({_free_space(run_dir)}); "
                "free some and rerun: finished work is kept"
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write {where}: {exc.strerror}; make {run_dir} writable (or use another --run-dir) and rerun"
        return f"{exc.strerror or exc}: {where}"
    text = str(exc)
    if any(sign in text for sign in DISK_FULL_SIGNS):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return (
            f"writing under {run_dir} failed ({first[:200]}): the disk is probably full ({_free_space(run_dir)}); "
            "free some and rerun: finished work is kept"
        )
    return None


def _fail(line: str, code: int) -> None:
    """Print the one error line on a line of its own (after closing any progress bar it interrupted) and exit."""
    try:
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # the message matters more than the bars
        pass
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


def _report_exit(code: object) -> bool:
    """Under the driver's torchrun (SELFREWARD_EXIT_FILE set), rank 0 leaves its exit code in that file:
    torchrun itself exits 1 whenever a rank fails, which would hide skipped (10), no pairs (3) or bad
    input (2). Returns True for a skip there: every rank then exits 0, so torchrun reports no failure."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path:
        return False
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") exits 1
        code = 1
    if is_rank_zero():
        Path(path).write_text(f"{code}\n", encoding="utf-8")
    return code == EXIT_SKIPPED


def _run_main(main: Callable[[], None]) -> None:
    """main(); a known failure becomes one clear line and its exit code (SystemExit)."""
    try:
        main()
    except GateError as exc:
        _fail(str(exc), EXIT_GATE)
    except CanaryGateError as exc:
        _fail(str(exc), EXIT_CANARY)
    except (ConfigError, RecordError, ModelNotFoundError, HostMemoryError, StageError, OxenError) as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except RunBusyError as exc:
        _fail(str(exc), EXIT_BUSY)
    except Exception as exc:
        line = environment_error(exc)
        if line is None:
            raise
        _fail(line, EXIT_BAD_INPUT)


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); known failures end in one clear line and a distinct exit code."""
    try:
        _run_main(main)
    except SystemExit as exc:
        if _report_exit(exc.code):
            sys.exit(0)
        raise
    _report_exit(0)
    failpoints.reach("at_exit")


def write_run_config(source: str | Path, target: str | Path, args: list[str]) -> None:
    """The run's config.yaml, which every stage reads: `source` as it is, or with `args` overrides applied.

    Overrides given to self-reward.sh are written here, not passed to each stage, so that a stage rerun
    by hand later sees the same settings as the run.
    """
    source, target = Path(source), Path(target)
    overrides = parse_override_args(args)
    config = load_checked_config(source, overrides)  # checks every key and value, overrides included
    if overrides:
        shown = " ".join(args)
        text = f"# {source} with the overrides {shown}\n" + yaml.safe_dump(config.to_dict(), sort_keys=False)
    else:
        text = source.read_text(encoding="utf-8")
    if target.is_file() and target.read_text(encoding="utf-8", errors="replace") != text:
        print(f"note: the run's config changes ({target}); stages whose settings changed run again")
    write_text(target, text)


def main(argv: list[str] | None = None) -> int:
    """self-reward.sh's config step: write the run's config.yaml, or check its processes."""
    parser = argparse.ArgumentParser(prog="python -m selfreward.stage", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("config", description="Write a run's config.yaml from a config file and overrides.")
    command.add_argument("--config", required=True, help="the config file")
    command.add_argument("--out", help="the run's config.yaml")
    command.add_argument(
        "--processes",
        type=int,
        help="check instead that this many training processes can share the global batches of the stages that train",
    )
    command.add_argument("overrides", nargs=argparse.REMAINDER, help="-- --key value ...")
    args = parser.parse_args(argv)
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    if not args.processes and not args.out:
        command.error("--out is required")
    try:
        if args.processes:
            config = load_config(args.config)
            for name in run_stages(config.algorithm):
                if spec(name).trains:
                    per_process_batch(getattr(config, spec(name).trains), args.processes)
            return 0
        write_run_config(args.config, args.out, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
