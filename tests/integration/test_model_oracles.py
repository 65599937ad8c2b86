"""Oracles per architecture and variant: pdserve's greedy tokens equal transformers' on a
tiny random-weight checkpoint (fp32, CPU), read from safetensors and, where llama.cpp
converts the architecture, from a GGUF written the way its converter writes it.

Norm weights and biases are random (not ones / zeros), prompts (40 tokens) are longer
than every window (8), and a 16-token prefill budget splits prompts into chunks, so a
window crosses chunk boundaries and is applied by both prefill and decode.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.loader import load_model
from pdserve.engine.sampling import SamplingParams
from tests.support.engines import engine_on
from tests.support.gguf_writer import write_gguf
from tests.support.tiny_models import hf_reference, write_hf_folder

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 16
WINDOW = 8
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 500000.0}

# id -> (transformers architecture, config overrides, also as GGUF)
CASES = {
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}, True),
    "llama-gelu": ("llama", {"hidden_act": "gelu"}, False),
    "llama-gelu_new": ("llama", {"hidden_act": "gelu_new"}, False),
    "llama-gelu_pytorch_tanh": ("llama", {"hidden_act": "gelu_pytorch_tanh"}, False),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3}, True),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 10000.0}}, True),
    "llama-rope-dynamic": ("llama", {"max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}}, False),
    "llama-rope-yarn": ("llama", {"max_position_embeddings": 128, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "rope_theta": 10000.0}}, True),
    "mistral-window": ("mistral", {"sliding_window": WINDOW}, False),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW,
                              "max_window_layers": 1}, False),
    "qwen3": ("qwen3", {}, True),
    "qwen3-layer-types": ("qwen3", {"use_sliding_window": True, "sliding_window": WINDOW,
                                   "layer_types": ["sliding_attention", "full_attention"]},
                          False),
    "phi3-window": ("phi3", {"sliding_window": WINDOW}, True),
    # query_pre_attn_scalar 1 (scale 1, not head_dim ** -0.5): scores large enough for the
    # cap to bite. GGUF has no such key (llama.cpp derives the scale from the head size),
    # so the GGUF case keeps the real models' scalar = head_dim and a cap that bites there
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "attn_logit_softcapping": 1.0,
                          "query_pre_attn_scalar": 1, "final_logit_softcapping": 5.0,
                          "num_hidden_layers": 3}, False),
    "gemma2-head-scale": ("gemma2", {"sliding_window": WINDOW, "attn_logit_softcapping": 0.2,
                                     "final_logit_softcapping": 5.0, "num_hidden_layers": 3},
                          True),
    "gemma3": ("gemma3", {"sliding_window": WINDOW, "num_hidden_layers": 6,
                          "rope_parameters": {
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                 "rope_theta": 1000000.0}}}, True),
    "qwen3-moe": ("qwen3_moe", {}, False),
    "qwen3-moe-norm-topk": ("qwen3_moe", {"norm_topk_prob": True}, True),
    "mixtral": ("mixtral", {}, True),
    "mixtral-window": ("mixtral", {"sliding_window": WINDOW}, False),
}


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation with transformers' own forward and cache, no EOS stop."""
    ids, out, past = torch.tensor([prompt_ids]), [], None
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(2, 258, (n,), generator=gen).tolist() for n in (40, 23)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per case, built on first use: (HF folder, transformers' tokens per prompt)."""
    built = {}

    def get(case: str):
        if case not in built:
            arch, overrides, _ = CASES[case]
            folder = write_hf_folder(tmp_path_factory.mktemp(case) / "hf", arch,
                                     random_vectors=True, **overrides)
            model = hf_reference(arch, folder)
            built[case] = folder, [hf_greedy(model, p, NEW_TOKENS) for p in prompts()]
        return built[case]
    return get


def pdserve_greedy(model_path: str) -> list[list[int]]:
    engine = engine_on(load_model(model_path), max_num_batched_tokens=16, block_size=16)
    got = engine.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert engine.pool_is_idle()
    return [c.token_ids for c in got]


@pytest.mark.parametrize("case", sorted(CASES))
def test_safetensors_greedy_matches_transformers(case, checkpoints):
    folder, expected = checkpoints(case)
    assert pdserve_greedy(str(folder)) == expected


@pytest.mark.parametrize("case", sorted(c for c, (_, _, as_gguf) in CASES.items() if as_gguf))
def test_gguf_greedy_matches_transformers(case, checkpoints, tmp_path, monkeypatch):
    pytest.importorskip("gguf")  # here only: the GPU tests share this module's cases
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    folder, expected = checkpoints(case)
    path = write_gguf(folder, tmp_path / f"{case}.gguf", CASES[case][0])
    assert pdserve_greedy(str(path)) == expected
    # a second load reads the converted cache: same config, same tokens
    assert pdserve_greedy(str(path)) == expected


def test_final_logit_soft_cap_matches_transformers(checkpoints):
    """Greedy tokens cannot see a monotonic cap: compare logits from the same hidden states."""
    folder, _ = checkpoints("gemma2")
    hf = hf_reference("gemma2", folder)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([prompts()[0]]), output_hidden_states=True)
    engine = engine_on(load_model(str(folder)))
    ours = engine.runner.model.compute_logits(out.hidden_states[-1][0])
    torch.testing.assert_close(ours, out.logits[0], rtol=1e-5, atol=1e-5)
    assert ours.abs().max() < 5.0  # capped, and the cap was reached for
    assert ours.abs().max() > 2.0


def test_oracle_cases_exercise_what_they_name(checkpoints):
    """The configs really carry the features (a silently dropped override would make an
    oracle vacuous)."""
    cfg = {case: load_model(str(checkpoints(case)[0])).config
           for case in ("llama-biases", "gemma2", "gemma3", "qwen2-window", "phi3-window")}
    assert cfg["llama-biases"].o_bias and cfg["llama-biases"].mlp_bias
    assert cfg["gemma2"].layer_sliding_windows == (WINDOW, 0, WINDOW)
    assert cfg["gemma2"].attn_logit_softcap == 1.0 and cfg["gemma2"].final_logit_softcap == 5.0
    assert cfg["gemma2"].softmax_scale == 1.0
    assert cfg["gemma3"].layer_sliding_windows == (WINDOW,) * 5 + (0,)
    assert cfg["gemma3"].rope_theta_local == 10000.0
    assert cfg["gemma3"].rope_scaling.rope_type == "linear"
    assert cfg["qwen2-window"].layer_sliding_windows == (0, WINDOW)
    assert cfg["phi3-window"].layer_sliding_windows == (WINDOW, WINDOW)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen3", "gemma2"])
def test_fused_elementwise_path_matches_transformers(case, checkpoints):
    """The Triton elementwise path (CUDA's; here under the interpreter) with q/k norms,
    Gemma's sandwich norms and embedding scale, and a GELU MLP (torch's op: the fused
    kernel is SiLU's) gives transformers' tokens. One prompt, 6 tokens: the interpreter
    is slow."""
    pytest.importorskip("triton")
    folder, expected = checkpoints(case)
    engine = engine_on(load_model(str(folder)), max_num_batched_tokens=16)
    engine.runner.model.fused_elementwise = True
    got = engine.generate(prompts()[:1], SamplingParams(max_tokens=6, ignore_eos=True))
    assert got[0].token_ids == expected[0][:6]


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 4.0},
    LLAMA3,
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
     "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
     "attention_factor": 1.3},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
     "mscale": 1.0, "mscale_all_dim": 0.5},
], ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if k != "rope_theta"))
def test_rope_frequencies_equal_transformers(rope, tmp_path):
    """Inverse frequencies bitwise, and YaRN's cos/sin factor, for settings the token
    oracles do not reach (YaRN's ramp without truncation, mscale, explicit factors)."""
    import json

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pdserve.engine.loader.hf_loader import read_config
    from pdserve.engine.model.llama import rope_inv_freq

    rope = {"rope_theta": 10000.0, **rope}
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                      max_position_embeddings=128, rope_parameters=dict(rope))
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg.to_dict() | {
        "architectures": ["LlamaForCausalLM"]}))
    cfg = read_config(tmp_path)
    got = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(got, want)
    assert cfg.rope_scaling.attention_factor == pytest.approx(want_factor, rel=1e-12)
