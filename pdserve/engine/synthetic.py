"""Random-weight models of real shapes, for GPU benchmarks where no weights travel.

`synthetic_model("llama3-8b")` describes Llama-3-8B's shapes with a placeholder
tokenizer (token "<t{i}>" per id); the runner initializes the weights on the device.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models

from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.loader import LoadedModel, ModelSource
from pdserve.engine.loader.tokenizer import TextTokenizer

SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        name="llama3-8b-random", architecture="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position=8192, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), rms_eps=1e-5,
        bos_token_id=128000, eos_token_ids=(128001,)),
    "qwen3-8b": ModelConfig(
        name="qwen3-8b-random", architecture="qwen3", vocab_size=151936, hidden_size=4096,
        intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position=40960, rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True,
        bos_token_id=151643, eos_token_ids=(151645,)),
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b-random", architecture="qwen3_moe", vocab_size=151936,
        hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32, num_kv_heads=4,
        head_dim=128, max_position=40960, rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True, bos_token_id=151643, eos_token_ids=(151645,)),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m-random", architecture="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        max_position=8192, rope_theta=100000.0, rms_eps=1e-5, tie_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,)),
}


_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_config(shape: str) -> dict:
    """The config.json of a shape, for a peer server loading dummy weights of the same
    model (vLLM's --load-format dummy); read back by pdserve it gives SHAPES[shape]."""
    c = SHAPES[shape]
    if c.architecture not in _HF_ARCHITECTURES:
        raise ValueError(f"no HF config for architecture {c.architecture!r}")
    cfg = {
        "architectures": [_HF_ARCHITECTURES[c.architecture]], "model_type": c.architecture,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_position,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_eps, "hidden_act": c.hidden_act,
        "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "bfloat16",
        "attention_bias": False, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids),
    }
    if c.rope_scaling.rope_type != "default":
        r = c.rope_scaling
        cfg["rope_scaling"] = {"rope_type": r.rope_type, "factor": r.factor,
                               "low_freq_factor": r.low_freq_factor,
                               "high_freq_factor": r.high_freq_factor,
                               "original_max_position_embeddings": r.original_max_position}
    if c.num_experts:
        cfg.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                   moe_intermediate_size=c.moe_intermediate_size,
                   norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    return cfg


def placeholder_tokenizer(vocab_size: int) -> TextTokenizer:
    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    return TextTokenizer(tokenizer=Tokenizer(models.WordLevel(vocab, unk_token="<t0>")))


def synthetic_model(shape: str, max_position: int | None = None) -> LoadedModel:
    """A model with no weights: ModelRunner initializes it randomly on its device."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}; choose from {sorted(SHAPES)}")
    config = SHAPES[shape]
    if max_position:
        import dataclasses

        config = dataclasses.replace(config, max_position=max_position)
    return LoadedModel(ModelSource(config.name, Path("/dev/null"), "synthetic"), config,
                       placeholder_tokenizer(config.vocab_size), weights={})
