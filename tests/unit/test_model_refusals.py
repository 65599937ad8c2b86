"""Everything that would change the math and is not implemented is refused by name: HF
config fields, GGUF keys and tensors, checkpoint tensors (quantization scales, unknown
or missing ones). A refusal is a ValueError (the CLI's exit code 2 with the message)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.cli import main
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.loader import ModelNotFound, load_model, load_model_meta
from tests.support.gguf_writer import write_gguf
from tests.support.tiny_models import write_hf_folder

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("refusals") / "llama", "llama",
                           num_hidden_layers=1)


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of the checkpoint with config.json fields changed (None: removed)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        cfg.pop(key, None) if value is None else cfg.__setitem__(key, value)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def with_tensors(src: Path, dst: Path, add=None, drop=()) -> Path:
    dst = with_config(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights.update(add or {})
    for name in drop:
        del weights[name]
    save_file(weights, str(dst / "model.safetensors"))
    return dst


# config field changes -> text the error must contain (the field's name)
CONFIG_REFUSALS = {
    "fp8": ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
            "quantization_config"),
    "longrope": ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                      "short_factor": [1.0], "long_factor": [2.0]}},
                 "longrope"),
    "mrope": ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 10000.0}}, "mrope"),
    "yarn-unknown-key": ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                              "rope_theta": 10000.0, "mrope_section": [1]}},
                         "mrope_section"),
    "partial-rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "activation": ({"hidden_act": "relu2"}, "hidden_act"),
    "softcap-on-llama": ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    "window-on-llama": ({"sliding_window": 16}, "sliding_window"),
    "qk-norm-flag": ({"use_qk_norm": True}, "use_qk_norm"),
    "residual-multiplier": ({"residual_multiplier": 0.22}, "residual_multiplier"),
    "no-rope-layers": ({"no_rope_layers": [1]}, "no_rope_layers"),
    "qwen2-moe": ({"architectures": ["Qwen2MoeForCausalLM"]}, "mixture-of-experts"),
    "gemma3-multimodal": ({"architectures": ["Gemma3ForConditionalGeneration"]}, "multimodal"),
    "unknown-arch": ({"architectures": ["FalconForCausalLM"]}, "FalconForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSALS))
def test_config_field_is_refused_by_name(case, llama_folder, tmp_path):
    changes, needle = CONFIG_REFUSALS[case]
    folder = with_config(llama_folder, tmp_path / case, **changes)
    with pytest.raises(ModelNotFound, match=needle):
        load_model_meta(str(folder))


def test_empty_unknown_fields_are_accepted(llama_folder, tmp_path):
    """null / false carry no math: a field pdserve does not know may say so."""
    folder = with_config(llama_folder, tmp_path / "m", use_qk_norm=False, no_rope_layers=None,
                         attn_logit_softcapping=None)
    assert load_model_meta(str(folder))[1].architecture == "llama"


@pytest.mark.parametrize("arch,changes,needle", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
               "layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
    ("gemma3", {"rope_parameters": {
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "sliding_attention"),
])
def test_architecture_specific_fields_are_refused(arch, changes, needle, tmp_path):
    folder = write_hf_folder(tmp_path / "src", arch, num_hidden_layers=2)
    with pytest.raises(ModelNotFound, match=needle):
        load_model_meta(str(with_config(folder, tmp_path / "m", **changes)))


@pytest.mark.parametrize("case,add,drop,needle", [
    ("fp8-scales", {"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(1, 1)}, (),
     "weight_scale_inv"),
    ("unknown-tensor", {"model.layers.0.self_attn.sinks": torch.zeros(4)}, (),
     "layers.0.self_attn.sinks"),
    ("o-bias-without-config", {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, (),
     "o_proj.bias"),
    ("missing-tensor", {}, ("model.layers.0.mlp.down_proj.weight",), "down_proj"),
    ("k-without-q", {}, ("model.layers.0.self_attn.q_proj.weight",), "q_proj"),
])
def test_checkpoint_tensors_are_checked(case, add, drop, needle, llama_folder, tmp_path):
    folder = with_tensors(llama_folder, tmp_path / case, add=add, drop=drop)
    with pytest.raises(ValueError, match=needle):
        LLMEngine(EngineConfig(), str(folder))


def test_cli_exits_2_with_the_field_named(llama_folder, tmp_path, capsys):
    folder = with_config(llama_folder, tmp_path / "m", quantization_config={"quant_method": "fp8"})
    assert main(["generate", "--local", "--model", str(folder), "--prompt", "hello"]) == 2
    assert "quantization_config" in capsys.readouterr().err
    bad = with_tensors(llama_folder, tmp_path / "t",
                       add={"model.layers.0.mlp.gate_proj.weight_scale": torch.ones(1)})
    assert main(["generate", "--local", "--model", str(bad), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "weight_scale" in err and "Traceback" not in err


# ---- GGUF ------------------------------------------------------------------------------

def gguf_with(src_folder: Path, path: Path, keys=None, tensors=None) -> Path:
    """A llama GGUF as the converter writes it, plus extra keys / tensors."""
    base = write_gguf(src_folder, path.with_suffix(".base.gguf"), "llama")
    reader = gguf.GGUFReader(str(base))
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, kind)
    for key, (value, kind) in (keys or {}).items():
        writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data.copy())
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


U32, F32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
EXPERTS = {"blk.0.ffn_gate_exps.weight": torch.zeros(4, 128, 64).numpy(),
           "blk.0.ffn_gate_inp.weight": torch.zeros(4, 64).numpy()}
GGUF_REFUSALS = {
    "moe-incomplete": ({"llama.expert_count": (4, U32), "llama.expert_used_count": (2, U32)},
                       EXPERTS, "ffn_down_exps"),
    "moe-sigmoid-gating": ({"llama.expert_count": (4, U32), "llama.expert_used_count": (2, U32),
                            "llama.expert_gating_func": (2, U32)}, EXPERTS,
                           "expert_gating_func"),
    "moe-tensors-only": ({}, EXPERTS, "ffn_gate_exps"),
    "unknown-key": ({"llama.attention.clamp_kqv": (8.0, F32)}, {}, "llama.attention.clamp_kqv"),
    "longrope": ({"llama.rope.scaling.type": ("longrope", STR)}, {}, "longrope"),
    "window-on-llama": ({"llama.attention.sliding_window": (8, U32)}, {},
                        "llama.attention.sliding_window"),
    "partial-rotary": ({"llama.rope.dimension_count": (8, U32)}, {}, "rope.dimension_count"),
    "unknown-tensor": ({}, {"blk.0.attn_sinks.weight": torch.zeros(4).numpy()},
                       "blk.0.attn_sinks.weight"),
}


@pytest.mark.parametrize("case", sorted(GGUF_REFUSALS))
def test_gguf_key_or_tensor_is_refused_by_name(case, llama_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    keys, tensors, needle = GGUF_REFUSALS[case]
    path = gguf_with(llama_folder, tmp_path / f"{case}.gguf", keys, tensors)
    with pytest.raises(ModelNotFound, match=needle):
        load_model(str(path))
    assert main(["generate", "--local", "--model", str(path), "--prompt", "hi"]) == 2


def test_unmodified_gguf_copy_loads(llama_folder, tmp_path, monkeypatch):
    """The copying helper itself changes nothing the loader minds."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model(str(gguf_with(llama_folder, tmp_path / "same.gguf")))
    assert loaded.config.num_layers == 1


def test_models_architectures_lists_every_supported_class(capsys):
    from pdserve.engine.loader.hf_loader import _ARCHITECTURES

    assert main(["models", "--architectures"]) == 0
    listed = {line.split("\t")[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed == set(_ARCHITECTURES)


# config.json fields of released checkpoints (abridged to what changes parsing)
RELEASED = {
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False,
                     "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                     "max_position_embeddings": 131072, "mlp_bias": False,
                     "model_type": "llama", "num_attention_heads": 32,
                     "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
                     "rms_norm_eps": 1e-05, "rope_scaling": {
                         "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "rope_theta": 500000.0, "tie_word_embeddings": False,
                     "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256},
    "gemma-2-9b": {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
                   "cache_implementation": "hybrid", "final_logit_softcapping": 30.0,
                   "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
                   "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
                   "intermediate_size": 14336, "max_position_embeddings": 8192,
                   "model_type": "gemma2", "num_attention_heads": 16, "num_hidden_layers": 42,
                   "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
                   "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
                   "sliding_window_size": 4096, "vocab_size": 256000},
    "gemma-3-1b": {"architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": None,
                   "final_logit_softcapping": None, "head_dim": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
                   "intermediate_size": 6912, "max_position_embeddings": 32768,
                   "model_type": "gemma3_text", "num_attention_heads": 4,
                   "num_hidden_layers": 26, "num_key_value_heads": 1,
                   "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                   "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
                   "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144},
    "phi-3-mini-4k": {"architectures": ["Phi3ForCausalLM"], "auto_map": {"AutoConfig": "x"},
                      "attention_bias": False, "embd_pdrop": 0.0, "hidden_act": "silu",
                      "hidden_size": 3072, "intermediate_size": 8192,
                      "max_position_embeddings": 4096, "num_attention_heads": 32,
                      "num_hidden_layers": 32, "num_key_value_heads": 32,
                      "original_max_position_embeddings": 4096, "resid_pdrop": 0.0,
                      "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
                      "sliding_window": 2047, "vocab_size": 32064},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
                      "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu",
                      "hidden_size": 2048, "intermediate_size": 6144,
                      "max_position_embeddings": 40960, "max_window_layers": 48,
                      "mlp_only_layers": [], "moe_intermediate_size": 768,
                      "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
                      "num_experts_per_tok": 8, "num_hidden_layers": 48,
                      "num_key_value_heads": 4, "output_router_logits": False,
                      "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
                      "router_aux_loss_coef": 0.001, "sliding_window": None,
                      "use_sliding_window": False, "vocab_size": 151936},
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_checkpoint_configs_are_read(name, tmp_path):
    from pdserve.engine.loader.hf_loader import read_config

    (tmp_path / "config.json").write_text(json.dumps(RELEASED[name]))
    cfg = read_config(tmp_path)
    if name == "gemma-2-9b":
        assert cfg.layer_sliding_windows[:2] == (4096, 0) and cfg.attn_logit_softcap == 50.0
    if name == "gemma-3-1b":
        assert cfg.layer_sliding_windows[:6] == (512,) * 5 + (0,)
        assert cfg.rope_theta_local == 10000.0 and cfg.qk_norm
    if name == "phi-3-mini-4k":
        assert set(cfg.layer_sliding_windows) == {2047}
    if name == "qwen3-30b-a3b":
        assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (128, 8, True)
        assert cfg.layer_sliding_windows == ()
    if name == "llama-3.1-8b":
        assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
