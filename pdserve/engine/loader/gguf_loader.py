"""GGUF checkpoints (llama.cpp format), read with the `gguf` package; no transformers."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.loader.tokenizer import TextTokenizer, byte_level_bpe

_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_QK_NORM = {"attn_q_norm.weight": "self_attn.q_norm.weight",
            "attn_k_norm.weight": "self_attn.k_norm.weight"}
_GEMMA_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("ffn_norm")},
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    **_QK_NORM,
}
_PHI3_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",  # gate and up, fused as in the HF checkpoint
    "ffn_down.weight": "mlp.down_proj.weight",
}
# GGUF architecture -> (pdserve architecture, per-layer tensor names)
_ARCHES = {
    "llama": ("llama", _LLAMA_LAYER),
    "qwen2": ("qwen2", _LLAMA_LAYER),
    "qwen3": ("qwen3", {**_LLAMA_LAYER, **_QK_NORM}),
    "phi3": ("phi3", _PHI3_LAYER),
    "gemma2": ("gemma2", _GEMMA_LAYER),
    "gemma3": ("gemma3", _GEMMA_LAYER),
    "qwen3moe": ("qwen3_moe", {**_LLAMA_LAYER, **_QK_NORM}),
}
# llama.cpp's stacked expert tensors (read through model/moe.py's load_gguf_expert_weights)
_EXPERT_TENSORS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps",
                   "ffn_down_exps")
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3 rope scaling, one factor per frequency
_CONTROL_TOKEN = 3

# {arch}.* keys read below; any other with a non-empty value is refused by name
_KNOWN_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.freq_base_swa",
    "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
    "attention.sliding_window", "attention.sliding_window_pattern",
    "attn_logit_softcapping", "final_logit_softcapping",
    "expert_count", "expert_used_count", "expert_feed_forward_length", "expert_gating_func",
    "expert_weights_norm",
})


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    layer_names = _ARCHES[arch][1] if arch in _ARCHES else _LLAMA_LAYER
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
    return None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows (back to HF's rotate-half order)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _refuse(what: str, value, why: str) -> ValueError:
    return ValueError(f"GGUF {what} = {value!r}: {why}")


def _expert_tensor(name: str) -> bool:
    m = re.fullmatch(r"blk\.\d+\.(\w+)\.weight", name)
    return bool(m) and m.group(1) in _EXPERT_TENSORS


def _check_keys(reader, arch: str) -> None:
    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    if experts and arch not in ("llama", "qwen3moe"):
        raise _refuse(f"{arch}.expert_count", experts,
                      "mixture-of-experts is supported for llama (Mixtral) and qwen3moe only")
    stray = next((t.name for t in reader.tensors if _expert_tensor(t.name)), None)
    if stray and not experts:
        raise _refuse("tensor", stray, f"expert tensor without {arch}.expert_count")
    if experts and _field(reader, f"{arch}.expert_gating_func") not in (None, 1):
        raise _refuse(f"{arch}.expert_gating_func", _field(reader, f"{arch}.expert_gating_func"),
                      "only softmax routing is supported")
    for key in reader.fields:
        if not key.startswith(arch + "."):
            continue
        rest, value = key[len(arch) + 1:], _field(reader, key)
        if rest in _KNOWN_KEYS or value is None or value is False or value == 0:
            continue
        raise _refuse(key, value, f"not implemented for {arch} (it would change the "
                                  f"model's output)")


def _rope_freqs(reader) -> tuple[float, ...]:
    from gguf.quants import dequantize

    t = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if t is None:
        return ()
    return tuple(float(x) for x in dequantize(t.data, t.tensor_type).reshape(-1))


def _rope_scaling(reader, p: str, freq_factors: tuple[float, ...]) -> RopeScaling:
    kind = _field(reader, p + "rope.scaling.type") or "none"
    if kind == "none":
        return RopeScaling(freq_factors=freq_factors)
    if freq_factors:
        raise _refuse(p + "rope.scaling.type", kind, f"with a {ROPE_FREQS} tensor too")
    factor = float(_field(reader, p + "rope.scaling.factor", 1.0))
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=factor)
    if kind == "yarn":
        return RopeScaling(
            rope_type="yarn", factor=factor,
            original_max_position=int(_field(reader, p + "rope.scaling.original_context_length")),
            beta_fast=float(_field(reader, p + "rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(_field(reader, p + "rope.scaling.yarn_beta_slow", 1.0)),
            attention_factor=0.1 * np.log(factor) + 1.0 if factor > 1 else 1.0)
    raise _refuse(p + "rope.scaling.type", kind, "unsupported (none, linear, yarn supported)")


def _windows(reader, arch: str, p: str, num_layers: int) -> tuple[int, ...]:
    """llama.cpp's per-layer windows: Gemma alternates (2 / 6, or the file's pattern),
    other architectures window every layer when the key is there."""
    window = int(_field(reader, p + "attention.sliding_window", 0) or 0)
    if not window:
        return ()
    if arch not in ("gemma2", "gemma3", "phi3"):  # where llama.cpp windows attention
        raise _refuse(p + "attention.sliding_window", window,
                      f"llama.cpp does not window {arch} attention; which layers would be "
                      f"windowed is not defined")
    pattern = _field(reader, p + "attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer
        return tuple(window if flag else 0 for flag in pattern)
    n = int(pattern or {"gemma2": 2, "gemma3": 6}.get(arch, 0))
    if n == 0:
        return (window,) * num_layers
    return tuple(window if i % n < n - 1 else 0 for i in range(num_layers))


def _gemma_scale(arch: str, hidden: int, heads: int, head_dim: int, layers: int) -> float:
    """llama.cpp's attention scale for Gemma 2/3 (GGUF has no query_pre_attn_scalar):
    hidden / heads for the 27B models, head_dim otherwise."""
    if (arch, layers) in (("gemma2", 46), ("gemma3", 62)):
        return (hidden / heads) ** -0.5
    return head_dim ** -0.5


def read_config(reader, name: str) -> ModelConfig:
    gguf_arch = _field(reader, "general.architecture")
    if gguf_arch not in _ARCHES:
        raise ValueError(f"unsupported GGUF architecture {gguf_arch!r} "
                         f"(supported: {', '.join(sorted(_ARCHES))})")
    _check_keys(reader, gguf_arch)
    arch = _ARCHES[gguf_arch][0]
    p = f"{gguf_arch}."
    num_experts = int(_field(reader, p + "expert_count", 0) or 0)
    if arch == "llama" and num_experts:
        arch = "mixtral"  # llama.cpp writes Mixtral as llama with experts
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    kv_heads = _field(reader, p + "attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise _refuse(p + "attention.head_count_kv", kv_heads, "per-layer KV heads")
        kv_heads = kv_heads[0]
    head_dim = int(_field(reader, p + "attention.key_length", hidden // heads))
    for key in ("attention.value_length", "rope.dimension_count"):
        if int(_field(reader, p + key, head_dim)) != head_dim:
            raise _refuse(p + key, _field(reader, p + key), f"differs from the head size "
                          f"{head_dim} (partial rotary / unequal K and V heads unsupported)")
    layers = int(_field(reader, p + "block_count"))
    tensor_names = {t.name for t in reader.tensors}
    gemma = arch in ("gemma2", "gemma3")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    # Gemma 3's local layers: llama.cpp's fixed 10000 unless the file names a base
    local_theta = float(_field(reader, p + "rope.freq_base_swa", 10000.0)) \
        if arch == "gemma3" else 0.0
    return ModelConfig(
        name=name,
        architecture=arch,
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        max_position=int(_field(reader, p + "context_length", 4096)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, p, _rope_freqs(reader)),
        rms_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_down.bias" in tensor_names,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        sandwich_norms=gemma,
        embedding_scale=hidden ** 0.5 if gemma else 1.0,
        attention_scale=_gemma_scale(arch, hidden, heads, head_dim, layers) if gemma else 0.0,
        attn_logit_softcap=float(_field(reader, p + "attn_logit_softcapping", 0.0) or 0.0),
        final_logit_softcap=float(_field(reader, p + "final_logit_softcapping", 0.0) or 0.0),
        rope_theta_local=local_theta,
        layer_sliding_windows=_windows(reader, arch, p, layers),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        num_experts=num_experts,
        num_experts_per_tok=int(_field(reader, p + "expert_used_count", 0) or 0),
        moe_intermediate_size=int(_field(reader, p + "expert_feed_forward_length", 0)
                                  or _field(reader, p + "feed_forward_length"))
        if num_experts else 0,
        # llama.cpp renormalizes the kept routing weights unless the file says not to
        norm_topk_prob=bool(num_experts)
        and _field(reader, p + "expert_weights_norm", True) is not False,
    )


def read_tokenizer(reader) -> TextTokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {model!r} (byte-level BPE 'gpt2' supported)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    special = [t for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN]
    tok = byte_level_bpe(tokens, list(_field(reader, "tokenizer.ggml.merges") or []), special)
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
    """HF-named fp32 tensors with HF's values: llama.cpp's q/k row permutation undone
    (llama only) and Gemma's stored norms (1 + w) back to w. Any tensor without a name
    here is an error: a checkpoint is never half-read."""
    gguf_arch = _field(reader, "general.architecture")
    unknown = [t.name for t in reader.tensors if t.name != ROPE_FREQS
               and not (config.num_experts and _expert_tensor(t.name))
               and hf_tensor_name(t.name, gguf_arch) is None]
    if unknown:
        raise _refuse("tensor", unknown[0], f"not part of a {gguf_arch} model pdserve "
                      f"computes ({len(unknown)} such tensor(s))")
    weights, experts = {}, {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        name = hf_tensor_name(t.name, gguf_arch)
        if name is None and config.num_experts and _expert_tensor(t.name):
            experts[t.name] = torch.from_numpy(np.array(_dequantize(t), dtype=np.float32))
            continue
        if name is None:  # rope_freqs: read into the config
            continue
        w = _dequantize(t)
        if gguf_arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            w = unpermute_rope(w, heads)
        tensor = torch.from_numpy(np.array(w, dtype=np.float32))  # own, writable copy
        if config.sandwich_norms and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # llama.cpp's converter stored Gemma's 1 + w
        weights[name] = tensor
        if progress:
            progress(i + 1, total)
    if config.num_experts:
        weights.update(_expert_weights(experts, config))
    return weights


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    # gguf lists dims innermost first; numpy's (and HF's) order is the reverse
    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(s) for s in t.shape])))


def _expert_weights(experts: dict[str, torch.Tensor], config: ModelConfig
                    ) -> dict[str, torch.Tensor]:
    """Stacked expert tensors as HF's fused-experts names (router, gate_up, down)."""
    from pdserve.engine.model.moe import load_gguf_expert_weights

    out, consumed = {}, set()
    for layer in range(config.num_layers):
        got = load_gguf_expert_weights(experts, layer, consumed)
        prefix = f"model.layers.{layer}.mlp."
        out[prefix + "gate.weight"] = got["gate.weight"]
        out[prefix + "experts.gate_up_proj"] = got["w13"]
        out[prefix + "experts.down_proj"] = got["w2"]
    left = sorted(set(experts) - consumed)
    if left:
        raise _refuse("tensor", left[0], "an expert tensor no layer reads")
    return out
