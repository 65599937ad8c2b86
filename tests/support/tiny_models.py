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


HF_CLASSES = {  # architecture -> (transformers config class, model class) names
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}


def hf_model_class(arch: str):
    import transformers

    return getattr(transformers, HF_CLASSES[arch][1])


def hf_reference(arch: str, folder: Path):
    """The transformers model of a checkpoint folder as the oracle, fp32 on the CPU, with
    eager attention: the exact math (some versions default Gemma 2 to SDPA, which has no
    logit soft cap and so is not the model)."""
    import torch

    return hf_model_class(arch).from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def write_hf_folder(folder: Path, arch: str, seed: int = 0, random_vectors: bool = False,
                    **overrides) -> Path:
    """Save a tiny random model of the given transformers architecture as safetensors.

    random_vectors: norm weights and biases random too (transformers initializes them to
    ones / zeros, which would hide a norm or bias applied wrongly)."""
    import transformers

    torch.manual_seed(seed)
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if arch in ("qwen3", "qwen3_moe"):
        base.update(head_dim=16)
    if arch in ("qwen3_moe", "mixtral"):  # 4 experts, 2 per token, narrow
        base.update(num_experts_per_tok=2, num_local_experts=4)
        base.update(moe_intermediate_size=32) if arch == "qwen3_moe" else \
            base.update(intermediate_size=32)
    if arch == "phi3":  # its default pad id lies outside a tiny vocabulary
        base.update(pad_token_id=None)
    if arch in ("gemma2", "gemma3"):  # tied, as Gemma checkpoints (and llama.cpp) are
        base.update(head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True)
    base.update(overrides)
    names = HF_CLASSES[arch]
    config_cls, model_cls = getattr(transformers, names[0]), getattr(transformers, names[1])
    model = model_cls(config_cls(**base)).eval()
    with torch.no_grad():
        # sharper logits than the default init so greedy ties are unlikely
        if not base["tie_word_embeddings"]:
            model.lm_head.weight.mul_(8.0)
        elif arch.startswith("gemma"):
            # Gemma scales embeddings by sqrt(hidden) = 8: std 0.1 keeps a token's own
            # embedding from dominating the residual (it would repeat the last token)
            model.get_input_embeddings().weight.normal_(0.0, 0.1)
        if random_vectors:
            _randomize_vectors(model, arch)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer(base["vocab_size"]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def _randomize_vectors(model, arch: str) -> None:
    """Norm weights around their identity (Gemma's (1 + w) around 0) and biases around 0;
    q and k projections 4x larger, so attention is sharp enough that which keys a window
    (or a soft cap) leaves out changes the tokens."""
    gen = torch.Generator().manual_seed(1234)
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
            param.mul_(4.0)
        if name.endswith("mlp.gate.weight"):  # MoE router: clear top-k choices, no near-ties
            param.mul_(5.0)
        if param.dim() != 1:
            continue
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            identity = 0.0 if arch.startswith("gemma") else 1.0
            param.copy_(identity + 0.2 * noise)
        else:
            param.copy_(0.1 * noise)


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
