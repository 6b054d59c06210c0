"""Generation for stages 01-03: one interface, two backends, never one call per sample.

`backends.load_backend` picks the backend from the config's `generation` section:
- `hf` (here): batched Hugging Face `generate`. Prompts are sorted by length so a batch wastes little
  padding. The tokens every prompt of a call starts with (the chat header; for the judge, the whole
  rubric) are run through the model once and their key/value cache is reused by every batch; each
  prompt's own tokens are then prefilled once and that cache is shared by its N samples. A batch that
  runs out of memory is halved and retried.
- `vllm` (`selfreward.model.vllm_backend`): vLLM's offline engine with prefix caching.
Both return the same `Generation` records; only the new tokens are ever decoded.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import time
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from selfreward.model.chat import ChatFormat

log = logging.getLogger("selfreward")


@dataclass(frozen=True)
class Sampling:
    num_samples: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    batch_size: int = 16  # sequences per call: prompts x samples
    min_new_tokens: int = 0  # > 0 forces answers to this length (benchmarks compare equal work)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "eos": the model ended its turn; "length": max_new_tokens ran out
    num_tokens: int  # generated tokens, the stop token included


def batch_seed(seed: int, keys: list[str]) -> int:
    """A seed that depends on the run seed and the batch's contents, not on its position in the run."""
    digest = hashlib.sha256(f"{seed}\x00".encode() + "\x00".join(keys).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def split_generated(token_ids: list[int], stop_ids: set[int]) -> tuple[list[int], str, int]:
    """Cut a generated row at its first stop token: (answer tokens, finish reason, tokens generated)."""
    for i, tok in enumerate(token_ids):
        if tok in stop_ids:
            return token_ids[:i], "eos", i + 1
    return token_ids, "length", len(token_ids)


def stop_token_ids(chat: ChatFormat, declared_eos: int | list[int] | None) -> list[int]:
    """Tokens that end an answer, the same on both backends: the chat format's (EOS, the end-of-turn token)
    and every EOS the model's generation_config.json declares (Qwen2.5-Instruct's adds <|endoftext|>),
    which vLLM adds to every request on its own."""
    declared = [declared_eos] if isinstance(declared_eos, int) else list(declared_eos or [])
    return list(dict.fromkeys([*chat.stop_token_ids(), *declared]))


@contextmanager
def without_model_defaults(model):
    """`generate` fills every option it is not given from the model's generation_config.json
    (Qwen2.5-Instruct's sets repetition_penalty 1.05, top_k 20; every merged M<t> inherits the file),
    which vLLM, given explicit sampling parameters, never applies: during the call the model has none."""
    from transformers import GenerationConfig  # heavy

    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def encode_prompts(chat: ChatFormat, prompts: list[str], context_length: int) -> list[list[int]]:
    """The prompts' token ids; a prompt that leaves no room for one new token is refused before any work:
    vLLM would refuse it for its whole call, the hf backend run it past the model's context."""
    encoded = [chat.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) >= context_length:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, and the context holds {context_length} "
                "(generation.max_model_len): the stage must fit its prompts (ChatFormat.fit, models.prompt_budget)"
            )
    return encoded


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row ending at the last column, where generation continues."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention[i, width - len(r) :] = 1
    return input_ids, attention


def plan_batches(lengths: list[int], per_call: int) -> list[list[int]]:
    """Indices grouped into batches of similar length; the same inputs always give the same plan."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + per_call] for start in range(0, len(order), per_call)]


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share, leaving every row at least one token of its own."""
    if not rows:
        return 0
    first, length = rows[0], min(len(r) for r in rows) - 1
    for row in rows[1:]:
        i = 0
        while i < length and row[i] == first[i]:
            i += 1
        length = i
    return max(length, 0)


def is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator raises a RuntimeError that says so.
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


# on_batch(batch index, input indices, their results): called after every batch, e.g. to save it.
BatchCallback = Callable[[int, list[int], list], None]


class Backend(Protocol):
    """What stages 01-03 need from a generation engine; `HFBackend` and `vllm_backend.VLLMBackend` provide it."""

    name: str
    chat: ChatFormat
    context_length: int

    def generate(
        self,
        prompts: list[str],
        sampling: Sampling,
        *,
        seed: int,
        desc: str = "generating",
        skip: Collection[int] = (),
        on_batch: BatchCallback | None = None,
    ) -> list[list[Generation] | None]:
        """`sampling.num_samples` continuations of every rendered prompt, in input order.

        Prompts are grouped by `plan_batches(lengths, batch_size // num_samples)`; a batch listed in
        `skip` (already done by a killed run) is not generated and its results are None.
        """
        ...

    def next_token_probs(
        self,
        prompts: list[str],
        token_ids: list[int],
        batch_size: int,
        *,
        desc: str = "scoring",
        skip: Collection[int] = (),
        on_batch: BatchCallback | None = None,
    ) -> list[list[float] | None]:
        """For every rendered prompt, the probability of each of `token_ids` being the next token."""
        ...

    def close(self) -> None: ...


class _Progress:
    """A progress bar in prompts/s that also shows generated tokens/s."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)
        self.started, self.tokens = time.time(), 0

    def update(self, prompts: int, tokens: int = 0) -> None:
        self.tokens += tokens
        self.bar.update(prompts)
        if self.tokens:
            self.bar.set_postfix(tok_s=f"{self.tokens / max(time.time() - self.started, 1e-6):.0f}")

    def close(self) -> None:
        self.bar.close()


def run_batches(
    batches: list[list[int]],
    run: Callable[[list[int]], list],
    *,
    desc: str,
    skip: Collection[int] = (),
    on_batch: BatchCallback | None = None,
    generated: bool = False,
    call_capacity: int | None = None,
    size: Callable[[list[int]], int] = len,
) -> list:
    """Results of run(indices) for every planned batch not in `skip`, in input order, each batch saved
    through `on_batch` as soon as the call that held it is done; with `generated`, the bar also counts
    tokens. Each batch is a call of its own, unless `call_capacity` is given: then consecutive batches
    share one call while their total `size` fits it (an engine that schedules best with many requests)."""
    results: list = [None] * sum(len(idx) for idx in batches)
    progress = _Progress(len(results), desc)
    progress.update(sum(len(idx) for b, idx in enumerate(batches) if b in skip))
    calls: list[list[int]] = []  # batch numbers per call
    used = 0
    for b in (b for b in range(len(batches)) if b not in skip):
        cost = size(batches[b])
        if calls and call_capacity and used + cost <= call_capacity:
            calls[-1].append(b)
            used += cost
        else:
            calls.append([b])
            used = cost
    for call in calls:
        idx = [i for b in call for i in batches[b]]
        for i, result in zip(idx, run(idx), strict=True):
            results[i] = result
        for b in call:
            if on_batch:
                on_batch(b, batches[b], [results[i] for i in batches[b]])
            tokens = sum(g.num_tokens for i in batches[b] for g in results[i]) if generated else 0
            progress.update(len(batches[b]), tokens)
    progress.close()
    return results


class HalvesOnOutOfMemory:
    """Runs each batch in pieces that are halved on out-of-memory; the smaller size lasts for later batches
    and calls, since a size that ran out once will again. Shared by `HFBackend` and `reward_model.RewardModel`."""

    row_limit: int | None = None  # prompts per call after an out-of-memory halving

    def _halving(self, idx: list[int], run: Callable[[list[int]], list]) -> list:
        """run(idx) in pieces; on out-of-memory the piece is halved, retried, and kept small afterwards."""
        results: list = []
        start = 0
        while start < len(idx):
            size = min(len(idx) - start, self.row_limit or len(idx))
            part = idx[start : start + size]
            try:
                results += run(part)
            except Exception as exc:
                if not is_out_of_memory(exc) or size == 1:
                    raise
                self.row_limit = max(1, size // 2)
                log.warning("out of memory with %d prompts per call: retrying with %d", size, self.row_limit)
            else:
                start += size
                continue
            # Out here, not in the except block: there the traceback still holds the failed call's tensors,
            # and emptying the cache would free none of their memory.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return results


def sliding_window(config) -> int | None:
    """The attention window of a model with sliding-window layers (Gemma-3, Mistral v0.1), else None."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:  # Qwen2 names one it does not use
        return None
    return int(window)


class HFBackend(HalvesOnOutOfMemory):
    """Batched generation with a Hugging Face model in this process."""

    name = "hf"
    MIN_SHARED_PREFIX = 8  # shorter shared prefixes are not worth a separate forward pass

    def __init__(self, model, chat: ChatFormat, *, prefix_cache: bool = True, max_model_len: int | None = None):
        self.model, self.chat, self.prefix_cache = model, chat, prefix_cache
        self.device = next(model.parameters()).device
        positions = getattr(model.config, "max_position_embeddings", None) or 1_000_000
        # generation.max_model_len bounds both backends, so one config fits prompts alike on each
        self.context_length = min(positions, max_model_len) if max_model_len else positions
        self.row_limit: int | None = None  # prompts per call after an out-of-memory halving
        self.stop_ids = stop_token_ids(chat, model.generation_config.eos_token_id)

    def close(self) -> None:
        """Let the model go, so that the next one can load: two 7B models do not fit one 24 GB card."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- the shared prefix and each row's own tokens -------------------------------------------------

    def _prefix(self, encoded: list[list[int]], new_tokens: int = 0):
        """(length, key/value cache) of the tokens all prompts share; (0, None) when not worth it, or when a
        row could outgrow a sliding attention window: the padding between the shared prefix and a row's own
        tokens would take places in the window (Gemma-3's 512) that real tokens have without the cache, and
        the scores would depend on the batch."""
        length = shared_prefix_length(encoded) if self.prefix_cache and len(encoded) > 1 else 0
        if length < self.MIN_SHARED_PREFIX:  # also when there is nothing to run (a resumed stage, a dry run)
            return 0, None
        window = sliding_window(self.model.config)
        if window and max(len(e) for e in encoded) + new_tokens > window:
            return 0, None
        ids = torch.tensor([encoded[0][:length]], device=self.device)
        return length, self.model(input_ids=ids, use_cache=True).past_key_values

    def _extend(self, prefix, rows: list[list[int]], upto: int):
        """Run the rows' own tokens (left-padded, after the shared prefix) through the model, except the
        last `upto` columns; returns (full input ids, full attention mask, cache, output of that pass)."""
        from transformers import DynamicCache  # heavy

        length, cache = prefix
        own, own_mask = left_pad([r[length:] for r in rows], self.chat.tokenizer.pad_token_id)
        batch = len(rows)
        if cache is None:
            cache = DynamicCache()
        else:
            cache = copy.deepcopy(cache)  # the prefix's cache is reused by every batch: extend a copy
            cache.batch_repeat_interleave(batch)
        prefix_ids = torch.tensor([rows[0][:length]], dtype=torch.long).expand(batch, length)
        input_ids = torch.cat([prefix_ids, own], dim=1).to(self.device)
        attention = torch.cat([torch.ones((batch, length), dtype=torch.long), own_mask], dim=1).to(self.device)
        stop = own.shape[1] - upto
        out = None
        if stop > 0:
            # Positions count real tokens only, as `generate` counts them, so padding in the middle is harmless.
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=input_ids[:, length : length + stop],
                attention_mask=attention[:, : length + stop],
                position_ids=positions[:, length : length + stop],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return input_ids, attention, cache, out

    # -- the Backend interface -----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts, sampling, *, seed, desc="generating", skip=(), on_batch=None):
        chat, n = self.chat, sampling.num_samples
        encoded = encode_prompts(chat, prompts, self.context_length)
        batches = plan_batches([len(e) for e in encoded], max(1, sampling.batch_size // n))
        stop_ids = set(self.stop_ids)
        self.model.eval()
        # from all prompts, skipped or not: a resumed run computes the same
        prefix = self._prefix(encoded, sampling.max_new_tokens)
        sample = sampling.temperature > 0

        def run(part: list[int]) -> list[list[Generation]]:
            torch.manual_seed(batch_seed(seed, [prompts[i] for i in part]))
            input_ids, attention, cache, _ = self._extend(prefix, [encoded[i] for i in part], upto=1)
            # Every prompt's own tokens were prefilled once (all but its last); its N samples share that cache.
            cache.batch_repeat_interleave(n)
            with without_model_defaults(self.model):
                out = self.model.generate(
                    input_ids=input_ids.repeat_interleave(n, dim=0),
                    attention_mask=attention.repeat_interleave(n, dim=0),
                    past_key_values=cache,
                    do_sample=sample,
                    temperature=sampling.temperature if sample else None,
                    top_p=sampling.top_p if sample else None,
                    top_k=0 if sample else None,
                    max_new_tokens=sampling.max_new_tokens,
                    min_new_tokens=sampling.min_new_tokens or None,
                    eos_token_id=sorted(stop_ids),
                    pad_token_id=chat.tokenizer.pad_token_id,
                )
            new = out[:, input_ids.shape[1] :].tolist()
            gens = []
            for row in range(len(part)):
                samples = []
                for k in range(n):
                    ids, reason, count = split_generated(new[row * n + k], stop_ids)
                    samples.append(Generation(chat.tokenizer.decode(ids, skip_special_tokens=True), reason, count))
                gens.append(samples)
            return gens

        return run_batches(
            batches, lambda idx: self._halving(idx, run), desc=desc, skip=skip, on_batch=on_batch, generated=True
        )

    @torch.inference_mode()
    def next_token_probs(self, prompts, token_ids, batch_size, *, desc="scoring", skip=(), on_batch=None):
        encoded = encode_prompts(self.chat, prompts, self.context_length)
        batches = plan_batches([len(e) for e in encoded], max(1, batch_size))
        self.model.eval()
        prefix = self._prefix(encoded)

        def run(part: list[int]) -> list[list[float]]:
            _, _, _, out = self._extend(prefix, [encoded[i] for i in part], upto=0)
            probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)[:, token_ids]
            return probs.tolist()

        return run_batches(batches, lambda idx: self._halving(idx, run), desc=desc, skip=skip, on_batch=on_batch)


def generate(model, chat: ChatFormat, prompts: list[str], sampling: Sampling, *, seed: int, **kwargs):
    """`HFBackend(model, chat).generate(...)`: for tests and benchmarks that hold a model already."""
    return HFBackend(model, chat).generate(prompts, sampling, seed=seed, **kwargs)
