"""The one table of stages: which algorithms run each, what it reads and writes, the config it depends on,
whether it trains, and what the dry run estimates for it. The run layout, the stage runner, the dry run's
memory rows and the driver all read it.

A stage's name is its script's in scripts/ (00_sft.py ...); 00_sft runs once, before the iterations.

    python -m selfreward.run.stages --algorithm raft        # one iteration's stages, in order
    python -m selfreward.run.stages --config runs/x/config.yaml   # ... of that config's algorithm
    python -m selfreward.run.stages --training              # the stages that train (torchrun takes them)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from selfreward.run.config import CHOICES, Config, ConfigError, load_config

ALGORITHMS = CHOICES["algorithm"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    algorithms: tuple[str, ...]  # the algorithms whose iteration runs it (00_sft: before every one)
    reads: str  # what it reads, in words (the script's docstring has the detail)
    writes: str  # "model" (M<t>/), "eval" (M<t>/eval.json), or the name of M<t-1>/generated/<name>.jsonl
    # The config sections (or single keys, "section.key") its output depends on: changing anything else
    # does not redo it. `not_fingerprinted` takes keys of those sections back out (the gate only decides
    # whether to go on).
    fingerprints: tuple[str, ...]
    not_fingerprinted: tuple[str, ...] = ()
    # Keys (or sections) added after runs were made with this stage: they enter the fingerprint only when
    # set away from their default, so a finished run stays finished for the code that added them.
    when_set: tuple[str, ...] = ()
    # "sft" or "dpo": it trains with that config section, merges the adapter at its end, and runs as
    # N processes under `self-reward.sh --num-processes N`.
    trains: str | None = None
    # The generation the dry run estimates memory for: "prompts", "responses", "judge" or "eval".
    generates: str | None = None
    # Its batches are shared among the nodes of self-reward.sh --nnodes (run/nodes.py); a stage that neither
    # shares nor trains runs on node 0, and the others wait for it.
    shards: bool = False


# Stage 03 measures the canaries, stage 04 acts on them (judge.canary_gate).
CANARY_GATE_KEYS = ("judge.canary_gate", "judge.canary_max_fool_rate")
# How stage 00 trains the judge, and whether it measures the base model: no other stage reads them.
JUDGE_TRAINING_KEYS = (
    "judge.objective",
    "judge.ranking_weight",
    "judge.ranking_pairs",
    "judge.judgment_beta",
    "judge.measure_base",
)
# The training engine changes how a checkpoint is saved (FSDP shards it): another engine starts afresh.
ENGINE = "train.engine"
# vLLM's quantization changes the weights that generate.
QUANTIZATION = "generation.quantization"

STAGES = (
    StageSpec(
        "00_sft",
        ALGORITHMS,
        "the IFT and EFT seed data (data.*)",
        "model",
        ("seed", "data", "model", "lora", "sft", "judge.format", "judge.template", "judge.score_pattern", ENGINE)
        + JUDGE_TRAINING_KEYS,
        when_set=(ENGINE, *JUDGE_TRAINING_KEYS),
        trains="sft",
    ),
    StageSpec(
        "01_gen_prompts",
        ("srlm",),
        "M<t-1>, the IFT prompts as few-shot examples",
        "prompts",
        ("seed", "model", "generation", "prompts"),
        when_set=(QUANTIZATION,),
        generates="prompts",
        shards=True,
    ),
    StageSpec(
        "01_sft_prompts",
        ("spin", "raft"),
        "the IFT seed data",
        "prompts",
        ("seed", "algorithm", "spin.num_prompts", "raft.num_prompts"),
    ),
    StageSpec(
        "02_gen_responses",
        ALGORITHMS,
        "M<t-1>, prompts.jsonl",
        "responses",
        ("seed", "model", "generation", "responses", "algorithm", "raft.samples_per_prompt"),
        when_set=(QUANTIZATION,),
        generates="responses",
        shards=True,
    ),
    StageSpec(
        "03_gen_scores",
        ("srlm", "raft"),
        "M<t-1> (or judge.model), responses.jsonl",
        "scores",
        ("seed", "model", "generation", "judge", "eval.bootstrap_samples", "preferences.consistency"),
        # the gates only decide whether stage 04 goes on
        not_fingerprinted=("judge.gate", *CANARY_GATE_KEYS, *JUDGE_TRAINING_KEYS),
        when_set=("judge.canaries", QUANTIZATION),
        generates="judge",
        shards=True,
    ),
    StageSpec(
        "04_gen_preferences",
        ("srlm",),
        "scores.jsonl",
        "preferences",
        ("preferences", "judge.gate", *CANARY_GATE_KEYS),
        when_set=CANARY_GATE_KEYS,
    ),
    StageSpec(
        "04_spin_pairs", ("spin",), "responses.jsonl (the SFT answer against the model's own)", "preferences", ()
    ),
    StageSpec("04_raft_select", ("raft",), "scores.jsonl", "selected", ("raft",)),
    StageSpec(
        "05_dpo",
        ("srlm", "spin"),
        "M<t-1>, preferences.jsonl",
        "model",
        ("seed", "model", "lora", "dpo", ENGINE),
        when_set=(ENGINE,),
        trains="dpo",
    ),
    StageSpec(
        "05_raft_sft",
        ("raft",),
        "M<t-1>, selected.jsonl",
        "model",
        ("seed", "model", "lora", "sft", "raft.epochs", ENGINE),
        when_set=(ENGINE,),
        trains="sft",
    ),
    StageSpec(
        "06_eval",
        ALGORITHMS,
        "M<t-1>, M<t>, the held-out rows",
        "eval",
        ("seed", "model", "generation", "judge", "eval"),
        # How the outside judge is reached changes no verdict: its key, concurrency, timeout and retries.
        not_fingerprinted=(
            "judge.gate",
            "judge.canaries",  # stage 06 plants no canaries
            *CANARY_GATE_KEYS,
            *JUDGE_TRAINING_KEYS,
            "eval.judge_endpoint_key_env",
            "eval.judge_endpoint_concurrency",
            "eval.judge_endpoint_timeout_seconds",
            "eval.judge_endpoint_retries",
        ),
        when_set=(
            "eval.judge_endpoint",
            "eval.judge_endpoint_model",
            "eval.judge_endpoint_body",
            "eval.benchmark",
            "eval.head_to_head",
            "eval.score_margin",
            QUANTIZATION,
        ),
        generates="eval",
    ),
)

SPECS = {s.name: s for s in STAGES}

# Keys that only stage 00 reads: every later stage loads M<t-1> from the run folder instead.
BASE_MODEL_KEYS = ("model.name_or_path", "model.fallback_chat_template")


def spec(name: str) -> StageSpec:
    return SPECS[name]


def iteration_stages(algorithm: str) -> tuple[str, ...]:
    """The stages of one iteration of `algorithm`, in order; every algorithm starts from 00_sft's M0."""
    return tuple(s.name for s in STAGES[1:] if algorithm in s.algorithms)


def run_stages(algorithm: str) -> tuple[str, ...]:
    """Every stage a run of `algorithm` has: 00_sft, then one iteration's."""
    return (STAGES[0].name, *iteration_stages(algorithm))


def training_stages() -> tuple[str, ...]:
    return tuple(s.name for s in STAGES if s.trains)


def responses_per_prompt(config: Config) -> int:
    """The answers stage 02 samples per prompt: SPIN's rejected side is one answer of the model's own; RAFT
    keeps the best of raft.samples_per_prompt; self-rewarding judges responses.num_samples."""
    return {"spin": 1, "raft": config.raft.samples_per_prompt}.get(config.algorithm, config.responses.num_samples)


def fingerprinted_config(name: str, config: Config) -> dict:
    """The part of `config` that stage `name`'s output depends on (its manifest's fingerprint hashes it)."""
    values, defaults = config.to_dict(), Config().to_dict()
    stage = spec(name)
    used = {part: _value(values, part) for part in stage.fingerprints}
    for part in stage.not_fingerprinted + tuple(p for p in stage.when_set if _value(values, p) == _value(defaults, p)):
        section, _, key = part.partition(".")
        if part in used:  # a section, or a single key the stage fingerprints by itself (04: judge.gate)
            del used[part]
        else:  # a key of a section the stage fingerprints whole
            used[section] = {k: v for k, v in used[section].items() if k != key}
    return used


def _value(config: dict, part: str):
    section, _, key = part.partition(".")
    return config[section][key] if key else config[section]


# Views of the table by what their readers look up.
ITERATION_STAGES = {a: iteration_stages(a) for a in ALGORITHMS}
GENERATED = {s.name: s.writes for s in STAGES if s.writes not in ("model", "eval")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfreward.run.stages", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--algorithm", choices=ALGORITHMS, help="print the stages of one iteration of it")
    which.add_argument("--config", help="print the stages of one iteration of this config's algorithm")
    which.add_argument("--training", action="store_true", help="print the stages that train")
    args = parser.parse_args(argv)
    if args.training:
        print(" ".join(training_stages()))
        return 0
    algorithm = args.algorithm
    if args.config:
        try:
            algorithm = load_config(args.config).algorithm
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(" ".join(iteration_stages(algorithm)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
