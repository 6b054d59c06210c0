"""What every stage script shares: arguments, config loading, errors, the summary line."""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selfreward.config import Config, ConfigError, all_keys, load_config, save_config
from selfreward.layout import RunLayout
from selfreward.models import ModelNotFoundError
from selfreward.records import ChunkLog, RecordError, path_fingerprint, read_manifest, write_json
from selfreward.versioning import PushError

EXIT_BAD_INPUT = 2  # bad arguments, config, data file or model path
EXIT_NO_PAIRS = 3  # stage 05 was given zero preference pairs: nothing to train on
EXIT_SKIPPED = 10  # --skip-if-complete found the output complete and did nothing

log = logging.getLogger("selfreward")

# The config sections each stage's output depends on: changing another section does not redo it.
CONFIG_SECTIONS = {
    "00_sft": ("seed", "data", "model", "lora", "sft"),
    "01_gen_prompts": ("seed", "model", "generation", "prompts"),
    "02_gen_responses": ("seed", "model", "generation", "responses"),
    "03_gen_scores": ("seed", "model", "generation", "judge"),
    "04_gen_preferences": ("preferences",),
    "05_dpo": ("seed", "model", "lora", "dpo"),
    "06_eval": ("seed", "model", "generation", "judge", "eval"),
}


class StageError(RuntimeError):
    """A stage cannot go on for a reason the user can fix; the message says which."""


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
    from importlib import metadata

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
    import resource

    import torch

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

    def begin(self, inputs: list[str | Path]) -> None:
        """Fingerprint the inputs; with --skip-if-complete, exit if the output was made from exactly these."""
        self.inputs = {str(p): path_fingerprint(p) for p in inputs}
        config = self.config.to_dict()
        used = {section: config[section] for section in CONFIG_SECTIONS[self.name]}
        # Contents only, not paths: a moved or copied run folder is still the same run.
        payload = json.dumps([self.name, self.iteration, used, list(self.inputs.values())], sort_keys=True)
        self.fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        manifest_path = self.layout.manifest(self.name, self.iteration)
        manifest = read_manifest(manifest_path)
        if self.args.skip_if_complete and manifest and manifest.get("complete"):
            if manifest.get("fingerprint") == self.fingerprint:
                print(summary_line(manifest).replace(":", ": complete, skipped;", 1), flush=True)
                sys.exit(EXIT_SKIPPED)
            log.info("inputs or config changed since the last complete run: running again")
        if manifest and manifest.get("complete"):
            # From here until finish() the old output no longer describes what is being made.
            write_json(manifest_path, {**manifest, "complete": False})

    def chunk_log(self) -> ChunkLog:
        """The resumable log of finished batches for this stage's output (see records.ChunkLog)."""
        return ChunkLog(self.layout.partial(self.name, self.iteration), self.fingerprint)

    def checkpoints(self, t: int) -> Path:
        """The trainer's checkpoint folder, emptied first if its checkpoints came from other inputs or config."""
        folder = self.layout.checkpoints(t)
        stamp = folder / "fingerprint"
        if folder.exists() and (not stamp.is_file() or stamp.read_text() != self.fingerprint):
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self.fingerprint)
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
        """Save the effective config and the manifest, print the summary line, commit it all to Oxen."""
        save_config(self.config, self.layout.stage_config(self.name, self.iteration))
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
            "config": self.config.to_dict(),
        }
        write_json(self.layout.manifest(self.name, self.iteration), manifest)
        self.layout.partial(self.name, self.iteration).unlink(missing_ok=True)
        line = summary_line(manifest)
        print(line, flush=True)
        if self.config.oxen.enabled:
            self._version([*outputs, *also_version], f"{self.layout.root.name}: {line}")

    def _version(self, outputs: list[str | Path], message: str) -> None:
        from selfreward import versioning

        merged = self.layout.model(self.iteration).resolve()
        paths = [
            Path(p)
            for p in outputs
            if self.config.oxen.include_merged_weights or Path(p).resolve() != merged  # GBs on a 7B model
        ]
        paths += [
            self.layout.config,
            self.layout.manifest(self.name, self.iteration),
            self.layout.stage_config(self.name, self.iteration),
        ]
        try:
            commit = versioning.commit_outputs(self.config.oxen, self.layout.root, paths, message)
        except versioning.PushError:
            raise
        except Exception as exc:
            raise StageError(
                f"oxen commit failed ({exc}); the outputs are complete on disk. Rerun with --no-oxen to skip versioning"
            ) from None
        if commit:
            log.info("oxen commit %s", commit[:12])


def memory_text(peak: dict) -> str:
    """'peak RAM 1.2 GiB, GPU 14.0 GiB' from a manifest's peak_memory_mb."""
    if not peak:
        return ""
    text = f"peak RAM {max(peak.get('ram', 0), peak.get('ram_child', 0)) / 1024:.1f} GiB"
    return text + (f", GPU {peak['gpu'] / 1024:.1f} GiB" if "gpu" in peak else "")


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
    """Parse a stage's command line and load the config (the run's, or --config, plus overrides)."""
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
        "--skip-if-complete", action="store_true", help=f"exit {EXIT_SKIPPED} without work if the output is complete"
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
    args = parser.parse_args(argv)
    t = getattr(args, "iteration", 0)
    if iteration and t < 1:
        parser.error(f"--iteration must be 1 or more, got {t}")
    layout = RunLayout(args.run_dir)
    overrides = {}
    for dest, raw in vars(args).items():
        if dest.startswith("override:"):
            overrides[dest.split(":", 1)[1]] = yaml.safe_load(raw) if raw.strip() else raw
    if args.no_oxen:
        overrides["oxen.enabled"] = False
    config_path = args.config or layout.config
    if not os.path.exists(config_path):
        raise ConfigError(f"no config: {config_path} does not exist; pass --config FILE")
    config = load_config(config_path, overrides)
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    # bitsandbytes says at every start on CPU that an optional kernels package is missing; it is harmless.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Stage(name, args, config, layout, t, time.time())


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); known failures end in one clear line and a distinct exit code."""
    try:
        main()
    except (ConfigError, RecordError, ModelNotFoundError, StageError, PushError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
