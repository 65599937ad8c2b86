"""Write a tiny HF checkpoint as GGUF the way llama.cpp's convert_hf_to_gguf.py does
(for the architectures it converts): its metadata keys, its tensor names (gguf's own
name map), q/k rows permuted for `llama`, Llama 3 rope scaling as a `rope_freqs` tensor,
Gemma norms stored as 1 + w, no LM head when embeddings are tied. Weights stay F32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tests.support.tiny_models import byte_tokenizer

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3", "mixtral": "llama",
             "qwen3_moe": "qwen3moe"}
# per-expert projection -> the converter's stacked tensor
_EXPERT_PARTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps",
                 "down_proj": "ffn_down_exps", "w1": "ffn_gate_exps", "w3": "ffn_up_exps",
                 "w2": "ffn_down_exps"}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def llama3_rope_factors(cfg: dict, rope: dict, head_dim: int) -> np.ndarray:
    """What the converter writes as rope_freqs.weight for rope_type llama3."""
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _rope_params(cfg: dict) -> dict:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    return params


def _write_metadata(w, cfg: dict, arch: str, garch: str, head_dim: int) -> None:
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = _rope_params(cfg)
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if garch in ("llama", "phi3"):
        w.add_rope_dimension_count(head_dim)
    if garch in ("qwen3", "gemma2", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):
        raise ValueError(f"llama.cpp's converter has no {kind} rope for {arch}")
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch in ("gemma2", "gemma3", "phi3") and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma3" and cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch in ("mixtral", "qwen3_moe"):
        w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if not cfg.get("norm_topk_prob"):
            raise ValueError("llama.cpp renormalizes Qwen3-MoE routing weights")


def _write_tokenizer(w, vocab_size: int) -> None:
    tok = byte_tokenizer(vocab_size)
    vocab = tok.get_vocab()
    tokens = [""] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    for i in range(len(vocab), vocab_size):  # rows the tokenizer never emits
        tokens[i] = f"[PAD{i}]"
    types = [3 if t in ("<s>", "</s>") else (5 if t.startswith("[PAD") else 1) for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


_LAYER = r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\."


def _stack_experts(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The converter's MoE layout: per layer, the router as ffn_gate_inp and each
    projection of every expert stacked, [E, out, in]. Removes what it takes."""
    import re

    found: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    out = {}
    for name in list(weights):
        m = re.fullmatch(_LAYER + r"experts\.(\d+)\.(\w+)\.weight", name)
        g = re.fullmatch(_LAYER + r"gate\.weight", name)
        if m:
            found.setdefault((int(m.group(1)), _EXPERT_PARTS[m.group(3)]), {})[int(m.group(2))] = \
                weights.pop(name)
        elif g:
            out[f"blk.{g.group(1)}.ffn_gate_inp.weight"] = weights.pop(name)
    for (layer, part), per_expert in found.items():
        out[f"blk.{layer}.{part}.weight"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def _tensors(weights: dict[str, torch.Tensor], cfg: dict, arch: str, garch: str):
    import gguf

    for name, t in _stack_experts(weights).items():
        yield name, t.float().numpy()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[garch.upper()],
                                        cfg["num_hidden_layers"])
    gemma = arch.startswith("gemma")
    for name, t in weights.items():
        if name == "lm_head.weight" and (gemma or cfg.get("tie_word_embeddings")):
            continue  # the converter skips a tied head
        t = t.float()
        if garch == "llama" and ".q_proj." in name:  # weight and bias alike
            t = permute(t, cfg["num_attention_heads"])
        elif garch == "llama" and ".k_proj." in name:
            t = permute(t, cfg["num_key_value_heads"])
        if gemma and name.endswith("norm.weight"):
            t = t + 1
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"the converter has no GGUF name for {name}")
        yield new, t.numpy()


def write_gguf(folder: Path, path: Path, arch: str) -> Path:
    """Convert the HF folder (config.json + model.safetensors) to a GGUF at path."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    garch = GGUF_ARCH[arch]
    if arch in ("llama", "mistral") and cfg.get("hidden_act", "silu") != "silu":
        raise ValueError("llama.cpp's llama architecture is SiLU only")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if arch.startswith("gemma") and cfg.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise ValueError("llama.cpp derives Gemma's attention scale from the head size; "
                         "query_pre_attn_scalar has no GGUF key")
    w = gguf.GGUFWriter(str(path), garch)
    w.add_name(folder.name)
    _write_metadata(w, cfg, arch, garch, head_dim)
    _write_tokenizer(w, cfg["vocab_size"])
    weights = load_file(str(folder / "model.safetensors"))
    for name, array in _tensors(weights, cfg, arch, garch):
        w.add_tensor(name, np.ascontiguousarray(array))
    rope = _rope_params(cfg)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg, rope, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
