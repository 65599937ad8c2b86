"""Hugging Face checkpoint folders: config.json + *.safetensors + tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.loader.tokenizer import TextTokenizer

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
# What `pdserve models --architectures` lists: (transformers class, GGUF architecture or
# "", what is implemented). Anything else a checkpoint asks for is refused by name.
SUPPORTED = (
    ("LlamaForCausalLM", "llama", "Llama 2 / 3.x, SmolLM2; rope default, linear, dynamic, "
     "llama3 (GGUF rope_freqs), yarn; attention_bias (q/k/v/o), mlp_bias; hidden_act silu, "
     "gelu, gelu_new, gelu_pytorch_tanh"),
    ("MistralForCausalLM", "llama", "sliding_window (every layer)"),
    ("Qwen2ForCausalLM", "qwen2", "q/k/v biases; use_sliding_window + max_window_layers, "
     "layer_types (GGUF: no windows, as llama.cpp)"),
    ("Qwen3ForCausalLM", "qwen3", "q/k RMSNorm per head; windows as Qwen2"),
    ("Phi3ForCausalLM", "phi3", "fused qkv_proj / gate_up_proj; sliding_window (longrope "
     "refused)"),
    ("Gemma2ForCausalLM", "gemma2", "GeGLU, (1 + w) norms, pre/post-feedforward norms, "
     "sqrt(hidden) embedding scale, query_pre_attn_scalar, attention and final logit soft "
     "caps, alternating sliding / global layers"),
    ("Gemma3ForCausalLM", "gemma3", "as Gemma 2 without soft caps, plus q/k norms and a "
     "separate rope base (rope_local_base_freq) on sliding layers"),
    ("Qwen3MoeForCausalLM", "qwen3moe", "Qwen3 attention, softmax top-k routed SiLU experts "
     "in every layer, norm_topk_prob"),
    ("MixtralForCausalLM", "llama", "Mistral attention, top-k routed experts (GGUF: llama "
     "with expert_count)"),
)

# refused with a reason of their own (the rest: "unsupported architecture")
_REFUSED_ARCHITECTURES = {
    "Qwen2MoeForCausalLM": "this mixture-of-experts family (shared experts) is not "
                           "supported (Qwen3-MoE and Mixtral are)",
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 checkpoint is not supported "
                                      "(its text-only Gemma3ForCausalLM is)",
}

# Fields that never change the computed tokens (training-only, bookkeeping).
_INERT = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "pad_token_id", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "embd_pdrop", "resid_pdrop", "cache_implementation", "attn_implementation",
    "_attn_implementation_autoset", "auto_map", "tokenizer_class", "bos_token_id",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",  # training only
    "eos_token_id", "pretraining_tp", "tie_word_embeddings", "max_position_embeddings",
    "original_max_position_embeddings", "num_key_value_heads", "head_dim",
})
_COMMON = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
})
_WINDOWED = frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"})
# Gemma configs also carry hidden_act (transformers reads hidden_activation) and older
# ones sliding_window_size (checked equal to sliding_window)
_GEMMA = frozenset({"hidden_activation", "query_pre_attn_scalar", "final_logit_softcapping",
                    "attn_logit_softcapping", "attention_bias", "sliding_window", "layer_types",
                    "hidden_act", "sliding_window_size"})
# Fields each architecture's transformers model reads (and pdserve implements).
_READ = {
    "llama": _COMMON | {"hidden_act", "attention_bias", "mlp_bias"},
    "mistral": _COMMON | {"hidden_act", "sliding_window"},
    "qwen2": _COMMON | {"hidden_act"} | _WINDOWED,
    "qwen3": _COMMON | {"hidden_act", "attention_bias"} | _WINDOWED,
    "phi3": _COMMON | {"hidden_act", "sliding_window", "partial_rotary_factor"},
    "gemma2": _COMMON | _GEMMA,
    "gemma3": _COMMON | _GEMMA | {"rope_local_base_freq", "sliding_window_pattern",
                                  "_sliding_window_pattern", "use_bidirectional_attention"},
    "qwen3_moe": _COMMON | {"hidden_act", "attention_bias", "sliding_window", "layer_types",
                            "max_window_layers", "num_experts", "num_local_experts",
                            "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                            "decoder_sparse_step", "mlp_only_layers"},
    "mixtral": _COMMON | {"hidden_act", "sliding_window", "num_local_experts",
                          "num_experts_per_tok"},
}
# what a missing rope_theta means in transformers' config classes
_DEFAULT_THETA = {"gemma3": 1_000_000.0}
# what other missing fields mean there (a config.json may omit defaults)
_GEMMA_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
_QWEN_DEFAULTS = {"sliding_window": 4096, "max_window_layers": 28}
_DEFAULTS = {
    "mistral": {"sliding_window": 4096},
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": {**_QWEN_DEFAULTS, "head_dim": 128},
    "gemma2": {**_GEMMA_DEFAULTS, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0},
    "gemma3": _GEMMA_DEFAULTS,
    "qwen3_moe": {"head_dim": 128},
}
_ROPE_KEYS = {
    "default": set(), "dynamic": {"factor"}, "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "original_max_position_embeddings", "truncate"},
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
                "gelu_pytorch_tanh": "gelu_pytorch_tanh"}


def _refuse(field: str, value, why: str) -> ValueError:
    return ValueError(f"config.json {field}={json.dumps(value)}: {why}")


def _architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in _ARCHITECTURES:
            return _ARCHITECTURES[a]
        if a in _REFUSED_ARCHITECTURES:
            raise _refuse("architectures", archs, _REFUSED_ARCHITECTURES[a])
    raise _refuse("architectures", archs, f"unsupported architecture (supported: "
                  f"{', '.join(sorted(_ARCHITECTURES))})")


def _check_fields(cfg: dict, arch: str) -> None:
    """Every field must be inert, or one this architecture's math reads; anything else is
    refused by name unless it is empty (null / false), so no field is silently ignored."""
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise _refuse("quantization_config", {"quant_method": method},
                      "quantized checkpoints are not supported (unquantized weights only)")
    for key, value in cfg.items():
        if key in _INERT or key in _READ[arch] or value is None or value is False:
            continue
        raise _refuse(key, value, f"not implemented for {arch} (it would change the "
                                  f"model's output)")


def _rope_sections(cfg: dict, arch: str) -> tuple[dict, dict | None]:
    """(global rope parameters, Gemma 3's local ones or None), old and new spellings
    (transformers < 5: rope_scaling + top-level rope_theta; 5: rope_parameters)."""
    params = dict(cfg.get("rope_parameters") or {})
    local = None
    if "full_attention" in params or "sliding_attention" in params:
        local = dict(params.get("sliding_attention") or {})
        params = dict(params.get("full_attention") or {})
    for key, value in (cfg.get("rope_scaling") or {}).items():
        params.setdefault(key, value)
    if "rope_theta" not in params:
        params["rope_theta"] = cfg.get("rope_theta", _DEFAULT_THETA.get(arch, 10000.0))
    if arch == "gemma3":
        local = local or {}
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    return params, local


def _rope_scaling(params: dict, cfg: dict, head_dim: int) -> RopeScaling:
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in _ROPE_KEYS:
        raise _refuse("rope_scaling.rope_type", kind, f"unsupported rope scaling (supported: "
                      f"{', '.join(sorted(_ROPE_KEYS))})")
    extra = set(params) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta",
                                              "partial_rotary_factor"}
    if extra:
        key = sorted(extra)[0]
        raise _refuse(f"rope_scaling.{key}", params[key], f"not implemented for {kind} rope")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse("partial_rotary_factor", params["partial_rotary_factor"],
                      "partial rotary embeddings are not supported")
    if kind == "default":
        return RopeScaling()
    original = int(cfg.get("original_max_position_embeddings")
                   or params.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings", 4096))
    factor = params.get("factor")
    if kind in ("linear", "dynamic"):
        return RopeScaling(rope_type=kind, factor=float(factor))
    if kind == "llama3":
        return RopeScaling(
            rope_type="llama3", factor=float(factor),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=original)
    return _yarn(params, cfg, original, head_dim)


def _yarn(params: dict, cfg: dict, original: int, head_dim: int) -> RopeScaling:
    """transformers' _compute_yarn_parameters, settings only (the model computes)."""
    import math

    factor = params.get("factor")
    factor = float(factor) if factor is not None else cfg["max_position_embeddings"] / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all \
            else mscale(factor)
    return RopeScaling(rope_type="yarn", factor=factor, original_max_position=original,
                       beta_fast=float(params.get("beta_fast") or 32),
                       beta_slow=float(params.get("beta_slow") or 1),
                       attention_factor=float(attention_factor),
                       truncate=bool(params.get("truncate", True)))


def _layer_windows(cfg: dict, arch: str, num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows (0 = full), as the architecture's transformers config
    derives them: Mistral and Phi-3 window every layer; Qwen2/3 only with
    use_sliding_window, from max_window_layers on; Gemma alternates (layer_types or its
    pattern)."""
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window"):
        window = None
    if not window:
        return ()
    window = int(window)
    types = cfg.get("layer_types")
    if types is None:
        if arch in ("mistral", "phi3", "mixtral"):
            types = ["sliding_attention"] * num_layers
        elif arch in ("qwen2", "qwen3"):
            first = int(cfg.get("max_window_layers", num_layers))
            types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(num_layers)]
        else:
            pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
                          or (2 if arch == "gemma2" else 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise _refuse("layer_types", types, f"expected {num_layers} entries of "
                      f"sliding_attention / full_attention")
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _softcap(cfg: dict, key: str) -> float:
    return float(cfg.get(key) or 0.0)


def _moe_fields(cfg: dict, arch: str) -> dict:
    """ModelConfig's MoE fields; every layer sparse (other layouts refused by name)."""
    if arch not in ("qwen3_moe", "mixtral"):
        return {}
    if int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise _refuse("decoder_sparse_step", cfg["decoder_sparse_step"],
                      "dense layers between sparse ones are not supported")
    if cfg.get("mlp_only_layers"):
        raise _refuse("mlp_only_layers", cfg["mlp_only_layers"],
                      "dense layers between sparse ones are not supported")
    if (cfg.get("hidden_act") or "silu") not in ("silu", "swish"):
        raise _refuse("hidden_act", cfg["hidden_act"], "MoE experts are SiLU only")
    mixtral = arch == "mixtral"
    return dict(
        num_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
        num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["intermediate_size"] if mixtral
                                  else cfg["moe_intermediate_size"]),
        norm_topk_prob=mixtral or bool(cfg.get("norm_topk_prob", False)),
    )


def read_config(folder: Path) -> ModelConfig:
    cfg = json.loads((folder / "config.json").read_text())
    arch = _architecture(cfg)
    _check_fields(cfg, arch)
    cfg = {**_DEFAULTS.get(arch, {}), **cfg}
    if cfg.get("sliding_window_size") not in (None, cfg.get("sliding_window")):
        raise _refuse("sliding_window_size", cfg["sliding_window_size"],
                      f"differs from sliding_window {cfg.get('sliding_window')}")
    if cfg.get("use_bidirectional_attention"):
        raise _refuse("use_bidirectional_attention", True, "only causal attention is supported")
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    num_layers = int(cfg["num_hidden_layers"])
    params, local = _rope_sections(cfg, arch)
    gemma = arch in ("gemma2", "gemma3")
    act_key = "hidden_activation" if gemma else "hidden_act"
    act = cfg.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in _ACTIVATIONS:
        raise _refuse(act_key, act, f"unsupported activation (supported: "
                      f"{', '.join(sorted(_ACTIVATIONS))})")
    if local is not None and _rope_scaling(local, cfg, head_dim) != RopeScaling():
        raise _refuse("rope_parameters.sliding_attention", local,
                      "scaled rope on local layers is not supported")
    attention_bias = bool(cfg.get("attention_bias", False)) and "attention_bias" in _READ[arch]
    scalar = cfg.get("query_pre_attn_scalar") if gemma else None
    return ModelConfig(
        name=folder.name,
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=float(params["rope_theta"]),
        rope_scaling=_rope_scaling(params, cfg, head_dim),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=arch == "llama" and bool(cfg.get("mlp_bias", False)),
        hidden_act=_ACTIVATIONS[act],
        qk_norm=arch in ("qwen3", "gemma3", "qwen3_moe"),
        sandwich_norms=gemma,
        embedding_scale=hidden ** 0.5 if gemma else 1.0,
        attention_scale=float(scalar) ** -0.5 if scalar else 0.0,
        attn_logit_softcap=_softcap(cfg, "attn_logit_softcapping") if gemma else 0.0,
        final_logit_softcap=_softcap(cfg, "final_logit_softcapping") if gemma else 0.0,
        rope_theta_local=float(local["rope_theta"]) if local is not None else 0.0,
        layer_sliding_windows=_layer_windows(cfg, arch, num_layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_token_ids(cfg.get("eos_token_id")),
        **_moe_fields(cfg, arch),
    )


def read_tokenizer(folder: Path) -> TextTokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}

    def token_text(value) -> str:
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    tokenizer = Tokenizer.from_file(str(path))
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    return TextTokenizer(
        tokenizer=tokenizer,
        chat_template=tok_cfg.get("chat_template"),
        bos_token=token_text(tok_cfg.get("bos_token")),
        eos_token=token_text(tok_cfg.get("eos_token")),
        special_ids=frozenset(tokenizer.token_to_id(t) for t in special),
        uses_post_processor=True,
    )


def read_weights(folder: Path, progress: Callable[[int, int], None] | None = None
                 ) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    weights = {}
    for i, f in enumerate(files):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                weights[name] = sf.get_tensor(name)
        if progress:
            progress(i + 1, len(files))
    return weights
