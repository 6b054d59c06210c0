"""What every stage script shares: arguments, config loading, errors, the summary line."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from selfreward.config import Config, ConfigError, all_keys, load_config, save_config
from selfreward.layout import RunLayout
from selfreward.models import ModelNotFoundError
from selfreward.records import RecordError, read_manifest, write_manifest

EXIT_BAD_INPUT = 2  # bad arguments, config, data file or model path
EXIT_NO_PAIRS = 3  # stage 05 was given zero preference pairs: nothing to train on
EXIT_SKIPPED = 10  # --skip-if-complete found the output complete and did nothing

log = logging.getLogger("selfreward")


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


@dataclass
class Stage:
    name: str
    args: argparse.Namespace
    config: Config
    layout: RunLayout
    iteration: int
    started: float

    def finish(
        self, *, rows_in: int, rows_out: int, inputs: list[str], outputs: list[str], extra: dict | None = None
    ) -> None:
        """Save the effective config and the manifest, then print the stage's one summary line."""
        save_config(self.config, self.layout.stage_config(self.name, self.iteration))
        manifest = write_manifest(
            self.layout.manifest(self.name, self.iteration),
            stage=self.name,
            iteration=self.iteration,
            rows_in=rows_in,
            rows_out=rows_out,
            started=self.started,
            inputs=inputs,
            outputs=outputs,
            extra={"config": self.config.to_dict(), **(extra or {})},
        )
        print(summary_line(manifest), flush=True)


def summary_line(manifest: dict) -> str:
    made = f"wrote {manifest['model']}" if manifest.get("model") else f"{manifest['rows_out']} rows out"
    return (
        f"[{manifest['stage']}] iteration {manifest['iteration']}: {manifest['rows_in']} rows in, "
        f"{made}, {manifest['seconds']:.1f} s"
    )


def parse_stage(name: str, doc: str, *, iteration: bool = True, argv: list[str] | None = None) -> Stage:
    """Parse a stage's command line; exits with EXIT_SKIPPED if --skip-if-complete finds the output complete."""
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
    parser.add_argument(
        "--skip-if-complete", action="store_true", help=f"exit {EXIT_SKIPPED} without work if the output is complete"
    )
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
    config_path = args.config or layout.config
    if not os.path.exists(config_path):
        raise ConfigError(f"no config: {config_path} does not exist; pass --config FILE")
    config = load_config(config_path, overrides)
    if args.skip_if_complete:
        manifest = read_manifest(layout.manifest(name, t))
        if manifest and manifest.get("complete"):
            print(summary_line(manifest).replace(":", ": complete, skipped;", 1), flush=True)
            sys.exit(EXIT_SKIPPED)
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    # bitsandbytes says at every start on CPU that an optional kernels package is missing; it is harmless.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Stage(name, args, config, layout, t, time.time())


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); known failures end in one clear line and a distinct exit code."""
    try:
        main()
    except (ConfigError, RecordError, ModelNotFoundError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
