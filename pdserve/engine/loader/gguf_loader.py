"""GGUF checkpoints (llama.cpp format), read with the `gguf` package; no transformers."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.loader.tokenizer import TextTokenizer, byte_level_bpe

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONTROL_TOKEN = 3


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows (back to HF's rotate-half order)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (llama, qwen2 supported)")
    p = f"{arch}."
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        name=name,
        architecture=arch,
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=int(_field(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, p + "rope.dimension_count", hidden // heads)),
        max_position=int(_field(reader, p + "context_length", 4096)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=RopeScaling(),
        rms_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def read_tokenizer(reader) -> TextTokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {model!r} (byte-level BPE 'gpt2' supported)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    special = [t for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN]
    tok = byte_level_bpe(tokens, list(_field(reader, "tokenizer.ggml.merges")), special)
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    return TextTokenizer(
        tokenizer=tok,
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=tokens[bos] if bos is not None else "",
        eos_token=tokens[eos] if eos is not None else "",
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        special_ids=frozenset(i for i, kind in enumerate(types) if kind == _CONTROL_TOKEN),
    )


def read_weights(reader, config: ModelConfig,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    weights = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(s) for s in t.shape])))
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_rope(w, config.num_heads) if config.architecture == "llama" else w
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_rope(w, config.num_kv_heads) if config.architecture == "llama" else w
        weights[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # own, writable copy
        if progress:
            progress(i + 1, total)
    return weights
