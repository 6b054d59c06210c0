"""Which generation backend runs, and loading it: vLLM when it is installed and a GPU is present, else hf.

The backends themselves are `generation.HFBackend` and `vllm_backend.VLLMBackend`; both implement
`generation.Backend`.
"""

from __future__ import annotations

import importlib.util
import logging

from selfreward.model.generation import Backend, HFBackend
from selfreward.model.models import device_of, gpu_present, load_for_generation
from selfreward.model.vllm_backend import VLLMBackend
from selfreward.run.config import ConfigError


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str) -> str:
    """`auto` is vLLM when it is installed and a GPU is present, else `hf`."""
    if requested == "auto":
        return "vllm" if vllm_available() and gpu_present() else "hf"
    if requested not in ("hf", "vllm"):
        raise ConfigError(f"generation.backend must be auto, hf or vllm, got '{requested}'")
    if requested == "vllm" and not vllm_available():
        raise ConfigError("generation.backend is 'vllm' but vllm is not installed (make install-vllm; see README)")
    return requested


def load_backend(model_dir, model_cfg, gen_cfg) -> Backend:
    """The configured backend with the model in `model_dir` and the chat template saved with it."""
    name = choose_backend(gen_cfg.backend)
    if name == "vllm":
        return VLLMBackend(model_dir, model_cfg, gen_cfg)
    if gen_cfg.tensor_parallel_size > 1 and device_of(model_cfg).startswith("cuda"):
        raise ConfigError(
            f"config key 'generation.tensor_parallel_size' is {gen_cfg.tensor_parallel_size}, but the hf backend "
            "generates on one GPU: install vllm (make install-vllm VLLM=vllm), or set it to 1"
        )
    if gen_cfg.quantization:
        logging.getLogger("selfreward").warning(
            "generation.quantization %s is vLLM's; the hf backend generates in model.dtype (%s)",
            gen_cfg.quantization,
            model_cfg.dtype,
        )
    model, chat = load_for_generation(model_dir, model_cfg)
    return HFBackend(model, chat, prefix_cache=gen_cfg.prefix_cache, max_model_len=gen_cfg.max_model_len)
