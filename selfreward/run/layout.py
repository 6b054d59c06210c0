"""The one module that knows where a run keeps its files.

    runs/<name>/
      config.yaml                   the run's config (written by the driver, read by every stage)
      M0/train/                     what M0 was trained on: ift.jsonl, eft.jsonl
      M<t>/model/                   merged weights + tokenizer: what every stage loads as M<t>
      M<t>/adapter/                 the LoRA adapter that produced M<t> from its parent
      M<t>/checkpoints/             trainer checkpoints, kept for resuming a killed run
      M<t>/lineage.json             base, parent, stage, data, config of M<t>
      M<t>/train_log.jsonl          the trainer's logged loss, rewards, learning rate per step
      M<t>/generated/               what M<t> wrote for iteration t+1:
        prompts.jsonl responses.jsonl scores.jsonl preferences.jsonl (srlm, spin), selected.jsonl (raft)
        canaries.jsonl              stage 03's planted answers, judged beside the real ones, never paired
      M<t+1>/train/preferences.jsonl  the pairs M<t+1> was trained on (a copy; raft: selected.jsonl)
      M0/train/heldout_prompts.jsonl, heldout_eft.jsonl   set aside for stage 06, never trained on
      M<t>/eval/eval.json           stage 06 after iteration t: head-to-head, judge quality, drift
      M<t>/eval/benchmark.jsonl     with eval.benchmark: M<t>'s answer and the verdict per benchmark prompt,
        alpaca_eval/model_outputs.json and mt_bench/<run>-M<t>.jsonl: the answers for those tools
      report.md, report/*.png       the report over all iterations, rewritten by stage 06
      .selfreward/lock              held by the one process writing the run (the driver or a stage)
      .selfreward/oxen.json         which stage outputs are committed to Oxen, and what was pushed
      .selfreward/pusher, push.log  held by the run's one background pusher; what it did

Iteration t (1, 2, ...) starts from M<t-1>: stages 01-04 write M<t-1>/generated/, stage 05 writes M<t>.
Every output has a `<name>.manifest.json` beside it and the effective config as `<name>.config.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfreward.run.stages import spec


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def model_root(self, t: int) -> Path:
        return self.root / f"M{t}"

    def model(self, t: int) -> Path:
        return self.model_root(t) / "model"

    @staticmethod
    def model_number(name: str) -> int | None:
        """t for a model's name "M<t>" (M0, M2, ...); None for anything else."""
        return int(name[1:]) if name[:1] == "M" and name[1:].isdigit() else None

    def adapter(self, t: int) -> Path:
        return self.model_root(t) / "adapter"

    def checkpoints(self, t: int) -> Path:
        return self.model_root(t) / "checkpoints"

    def lineage(self, t: int) -> Path:
        return self.model_root(t) / "lineage.json"

    def train_log(self, t: int) -> Path:
        return self.model_root(t) / "train_log.jsonl"

    def tensorboard(self, t: int) -> Path:
        """TensorBoard event files of the training that made M<t> (with sft/dpo.report_to: tensorboard)."""
        return self.model_root(t) / "tensorboard"

    def train_dir(self, t: int) -> Path:
        return self.model_root(t) / "train"

    def generated(self, iteration: int, name: str) -> Path:
        """A JSONL file of iteration `iteration` ("prompts", "responses", "scores", "preferences", "selected")."""
        if iteration < 1:
            raise ValueError(f"iterations start at 1, got {iteration}")
        return self.model_root(iteration - 1) / "generated" / f"{name}.jsonl"

    def heldout(self, name: str) -> Path:
        """The rows stage 00 set aside for evaluation; `name` is "prompts" or "eft"."""
        return self.train_dir(0) / f"heldout_{name}.jsonl"

    def eval_result(self, t: int, name: str = "eval") -> Path:
        return self.model_root(t) / "eval" / f"{name}.json"

    def benchmark(self, t: int) -> Path:
        """M<t>'s answers to eval.benchmark's prompts, judged against the references."""
        return self.model_root(t) / "eval" / "benchmark.jsonl"

    def benchmark_model_id(self, t: int) -> str:
        """M<t>'s name in the answer files other tools read (a leaderboard row, a file name)."""
        return f"{self.root.name}-M{t}"

    def alpaca_eval_outputs(self, t: int) -> Path:
        return self.model_root(t) / "eval" / "alpaca_eval" / "model_outputs.json"

    def mt_bench_answers(self, t: int) -> Path:
        """FastChat's llm_judge finds a model's answers as model_answer/<model_id>.jsonl."""
        return self.model_root(t) / "eval" / "mt_bench" / f"{self.benchmark_model_id(t)}.jsonl"

    @property
    def state_dir(self) -> Path:
        """Bookkeeping about the run, not part of its results: never committed to Oxen."""
        return self.root / ".selfreward"

    @property
    def endpoint_cache(self) -> Path:
        """The outside judge's replies (eval.judge_endpoint), kept so that a rerun asks nothing twice."""
        return self.state_dir / "judge-endpoint-cache.jsonl"

    @property
    def lock(self) -> Path:
        return self.state_dir / "lock"  # self-reward.sh opens this path itself

    @property
    def oxen_ledger(self) -> Path:
        return self.state_dir / "oxen.json"

    @property
    def oxen_ledger_lock(self) -> Path:
        return self.state_dir / "oxen.json.lock"

    @property
    def pusher(self) -> Path:
        """Locked by the one process pushing this run's commits; it holds that process's pid."""
        return self.state_dir / "pusher"

    @property
    def push_log(self) -> Path:
        return self.state_dir / "push.log"

    @property
    def push_mirror(self) -> Path:
        """A copy of the repository's metadata that a push works from (see versioning._do_push)."""
        return self.state_dir / "push-mirror"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def stage_output(self, stage: str, iteration: int) -> Path:
        """The main output of a stage: a JSONL file, eval.json, or a model folder for the stages that train."""
        writes = spec(stage).writes
        if writes == "eval":
            return self.eval_result(iteration)
        if writes == "model":
            return self.model(iteration)  # 00_sft runs as iteration 0: M0
        return self.generated(iteration, writes)

    def manifest(self, stage: str, iteration: int) -> Path:
        out = self.stage_output(stage, iteration)
        if out.suffix in (".jsonl", ".json"):
            return out.with_suffix(".manifest.json")
        return out.parent / f"{stage}.manifest.json"

    def partial(self, stage: str, iteration: int) -> Path:
        """The log of finished batches a stage keeps while it runs, for resuming after a kill."""
        manifest = self.manifest(stage, iteration)
        return manifest.with_name(manifest.name.replace(".manifest.json", ".partial.jsonl"))

    def stage_config(self, stage: str, iteration: int) -> Path:
        manifest = self.manifest(stage, iteration)
        return manifest.with_name(manifest.name.replace(".manifest.json", ".config.yaml"))
