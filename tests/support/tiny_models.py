"""Small random-weight checkpoints for tests: HF folders that transformers and pdserve
both read, and in-memory LoadedModels for fast engine stress tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from pdserve.engine.config import ModelConfig
from pdserve.engine.loader import LoadedModel, ModelSource
from pdserve.engine.loader.tokenizer import TextTokenizer


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer whose ids stay below vocab_size (>= 258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    assert tok.get_vocab_size() <= vocab_size
    return tok


def write_hf_folder(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of the given transformers architecture as safetensors."""
    import transformers

    torch.manual_seed(seed)
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    base.update(overrides)
    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    model = model_cls(config_cls(**base)).eval()
    # sharper logits than the default init so greedy ties are unlikely
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not base["tie_word_embeddings"] else None
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer(base["vocab_size"]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def tiny_loaded_model(tokenizer: TextTokenizer, seed: int = 0, layers: int = 2,
                      hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> LoadedModel:
    """A random Llama in memory that shares the given tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    vocab = tokenizer.vocab_size
    cfg = ModelConfig(name=f"tiny-{seed}", architecture="llama", vocab_size=vocab,
                      hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                      max_position=4096, tie_embeddings=True, bos_token_id=1,
                      eos_token_ids=(2,))
    d, hd = hidden, hidden // heads

    def rnd(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    w = {"model.embed_tokens.weight": rnd(vocab, d, scale=1.0), "model.norm.weight": torch.ones(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": torch.ones(d),
            p + "post_attention_layernorm.weight": torch.ones(d),
            p + "self_attn.q_proj.weight": rnd(heads * hd, d),
            p + "self_attn.k_proj.weight": rnd(kv_heads * hd, d),
            p + "self_attn.v_proj.weight": rnd(kv_heads * hd, d),
            p + "self_attn.o_proj.weight": rnd(d, heads * hd),
            p + "mlp.gate_proj.weight": rnd(2 * d, d),
            p + "mlp.up_proj.weight": rnd(2 * d, d),
            p + "mlp.down_proj.weight": rnd(d, 2 * d),
        })
    return LoadedModel(ModelSource(cfg.name, Path("/dev/null"), "memory"), cfg, tokenizer, w)
