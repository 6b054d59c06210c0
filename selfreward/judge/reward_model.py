"""An external reward model as the judge (`judge.mode: reward_model`).

Instead of the policy judging its own answers with the rubric, a separately trained reward model, a
sequence classifier with one output (a Bradley-Terry model such as those TRL's RewardTrainer makes),
reads each (question, answer) conversation and gives one number. It is rendered in the reward model's
own chat template, the one it was trained on, not the policy's. The reward model does not change
between iterations, which makes it the fixed-judge baseline the self-rewarding loop is compared with.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Collection

import torch

from selfreward.model.chat import cut_to_fit, ensure_chat_template, tokenizer_added_prefix
from selfreward.model.generation import BatchCallback, HalvesOnOutOfMemory, plan_batches, run_batches
from selfreward.model.models import ModelNotFoundError, device_of, resolve_model_path
from selfreward.run.config import ConfigError

log = logging.getLogger("selfreward")

KEY = "judge.reward_model"


class RewardModel(HalvesOnOutOfMemory):
    """A loaded reward model and its tokenizer: renders conversations and scores them in batches."""

    name = "reward_model"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.context_length = getattr(model.config, "max_position_embeddings", None) or 1_000_000
        self.row_limit: int | None = None
        self.non_finite = 0  # rewards that came out NaN or infinite (an overflow): given as no score
        # A tokenizer that puts BOS before any text on its own was trained with it; the rendered text is
        # encoded without special tokens, so BOS is added here, once, when the template lacks it.
        self.added_prefix = tokenizer_added_prefix(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, question: str, response: str) -> str:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if self.added_prefix and not rendered.startswith(self.added_prefix):
            rendered = self.added_prefix + rendered
        return rendered

    def render(self, question: str, response: str, max_tokens: int) -> tuple[str, bool]:
        """The conversation (the question, then the response) in the reward model's chat template, within
        `max_tokens`, cutting the end of the response first, then of the question; and whether it was cut."""
        return cut_to_fit(
            self._render,
            self.encode,
            self.tokenizer.decode,
            question,
            response,
            max_tokens,
            what="the reward model's chat template",
        )

    @torch.inference_mode()
    def score(
        self,
        texts: list[str],
        batch_size: int,
        *,
        desc: str = "rewarding",
        skip: Collection[int] = (),
        on_batch: BatchCallback | None = None,
    ) -> list[float | None]:
        """The reward of every rendered text (see `render`), in input order; None where it is not finite.

        Texts are grouped by `plan_batches(lengths, batch_size)`; a batch listed in `skip` (already done
        by a killed run) is not run and its rewards are None; `on_batch(batch, indices, rewards)` is
        called after every batch that runs, as in `generation.Backend.generate`.
        """
        lengths = [len(self.encode(t)) for t in texts]
        too_long = [n for n in lengths if n > self.context_length]
        if too_long:
            raise ValueError(
                f"{len(too_long)} texts are longer than the reward model's context ({max(too_long)} > "
                f"{self.context_length} tokens); cut them with RewardModel.render"
            )
        batches = plan_batches(lengths, max(1, batch_size))
        self.model.eval()

        def run(part: list[int]) -> list[float]:
            batch = self.tokenizer(
                [texts[i] for i in part], add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(self.device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rewards = logits[:, 0].float().tolist()
            bad = sum(not math.isfinite(r) for r in rewards)
            if bad:
                self.non_finite += bad
                log.warning(
                    "the reward model gave %d non-finite reward(s) (NaN or inf: an overflow in %s?); they count as "
                    "no score (%d so far)",
                    bad,
                    self.model.dtype,
                    self.non_finite,
                )
            return [r if math.isfinite(r) else None for r in rewards]

        return run_batches(batches, lambda idx: self._halving(idx, run), desc=desc, skip=skip, on_batch=on_batch)

    def close(self) -> None:
        """Let the model go, so that the next one can load: the policy and a 7B reward model may not share a card."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reward_dtype(saved, device: str) -> torch.dtype:
    """The dtype a reward model runs in: the one it was saved in, not the policy's (a bfloat16 model run
    in float16 can overflow, and its rewards become NaN); float32 when its config names none (transformers'
    own default), and on the CPU in place of float16, which the CPU computes slowly and not in every op."""
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    dtype = saved if isinstance(saved, torch.dtype) else torch.float32
    return torch.float32 if dtype == torch.float16 and device == "cpu" else dtype


def load_reward_model(name_or_path: str, model_cfg) -> RewardModel:
    """The reward model of `judge.reward_model` (a folder, hub id or builtin name) in its own dtype (see
    `reward_dtype`), on the device and with the fallback chat template of `model_cfg` (the run's
    ModelConfig). Anything that is not a sequence classifier with one output is refused with a ConfigError
    that names the key."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # heavy

    try:
        path = resolve_model_path(name_or_path)
    except ModelNotFoundError as exc:
        raise ConfigError(f"config key '{KEY}': {exc}") from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key '{KEY}': cannot read the config of {name_or_path}: {exc}") from None
    if config.num_labels != 1:
        # A causal LM's config says 2 (transformers' default), so this is also where a policy checkpoint ends.
        archs = ", ".join(config.architectures or []) or "no architecture"
        raise ConfigError(
            f"config key '{KEY}': {name_or_path} ({archs}) has {config.num_labels} outputs; "
            "a reward model has one (a Bradley-Terry sequence classifier)"
        )
    device = device_of(model_cfg)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=reward_dtype(config.dtype, device)
        )
    except ValueError as exc:  # transformers' "Unrecognized configuration class ..." for this AutoModel
        raise ConfigError(f"config key '{KEY}': {name_or_path} is not a sequence classifier: {exc}") from None
    model.to(device)
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        ensure_chat_template(tokenizer, model_cfg.fallback_chat_template)
        fallback = model_cfg.fallback_chat_template or "the packaged fallback"
        log.info("reward model %s has no chat template: rendering with %s", name_or_path, fallback)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps every real token at the position it has alone; the classifier reads the last
    # token that is not pad_token_id, so it finds each row's end whichever side is padded.
    tokenizer.padding_side = "right"
    text_config = model.config.get_text_config()  # where the classifier looks for pad_token_id
    if getattr(text_config, "pad_token_id", None) is None:
        text_config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model, tokenizer)
