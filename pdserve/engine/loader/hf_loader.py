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
}


def _rope_params(cfg: dict) -> dict:
    """transformers < 5 writes rope_scaling (+ top-level rope_theta); 5 writes rope_parameters."""
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _rope_scaling(cfg: dict) -> RopeScaling:
    rs = _rope_params(cfg)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return RopeScaling()
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (llama3 supported)")
    return RopeScaling(
        rope_type="llama3", factor=float(rs["factor"]),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position=int(rs.get("original_max_position_embeddings", 8192)))


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def read_config(folder: Path) -> ModelConfig:
    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"unsupported architectures {archs} (supported: {sorted(_ARCHITECTURES)})")
    heads = int(cfg["num_attention_heads"])
    return ModelConfig(
        name=folder.name,
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=float(cfg.get("rope_theta", _rope_params(cfg).get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(cfg),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_token_ids(cfg.get("eos_token_id")),
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
