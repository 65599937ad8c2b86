"""SparseMoeBlock's torch path vs transformers' own MoE blocks (fp32, CPU, random weights).

Oracles: Qwen3MoeSparseMoeBlock (norm_topk_prob on and off) and MixtralSparseMoeBlock on
the same weights; the weights travel the way a checkpoint carries them (transformers 5's
fused in-memory layout, and the per-expert names save_pretrained writes) through
load_hf_expert_weights. Router weights are large enough that tokens spread over experts.
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from pdserve.engine.model.moe import (SparseMoeBlock, load_gguf_expert_weights,  # noqa: E402
                                      load_hf_expert_weights, route_softmax_topk)

HIDDEN, INTER, EXPERTS, TOP_K, TOKENS = 32, 24, 8, 2, 40


def qwen3_config(norm_topk_prob: bool, top_k: int = TOP_K):
    return transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=INTER,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=EXPERTS, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob)


def mixtral_config(top_k: int = TOP_K):
    return transformers.MixtralConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=EXPERTS,
        num_experts_per_tok=top_k)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 1.0 if name.endswith("gate.weight") else 0.2  # router: spread the choices
            p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_block(style: str, norm_topk_prob: bool = True, top_k: int = TOP_K, seed: int = 0):
    if style == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        block = Qwen3MoeSparseMoeBlock(qwen3_config(norm_topk_prob, top_k))
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        block = MixtralSparseMoeBlock(mixtral_config(top_k))
    randomize_(block, seed)
    return block.eval()


def ours_from(weights: dict, prefix: str, style: str, norm_topk_prob: bool,
              top_k: int = TOP_K) -> SparseMoeBlock:
    block = SparseMoeBlock(HIDDEN, INTER, EXPERTS, top_k, norm_topk_prob)
    block.load_hf_weights(weights, prefix, style)
    return block.eval()


def hf_out(block, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return block(x[None])[0]


def tokens(seed: int = 1, n: int = TOKENS) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def in_memory_weights(block, prefix: str, module: str) -> dict:
    return {f"{prefix}{module}.{k}": v for k, v in block.state_dict().items()}


CASES = [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)]


@pytest.mark.parametrize("style,norm", CASES)
@pytest.mark.parametrize("top_k", [1, TOP_K, 3])
def test_matches_transformers_block(style, norm, top_k):
    ref = hf_block(style, norm, top_k)
    ours = ours_from(in_memory_weights(ref, "model.layers.0.", "mlp"), "model.layers.0.",
                     style, norm, top_k)
    x = tokens()
    out = ours.forward_torch(x)
    expected = hf_out(ref, x)
    # same ops in the same order: bitwise in fp32
    assert torch.equal(out, expected), (out - expected).abs().max()
    # routing actually spread tokens: most experts got some
    _, ids = ours.route(x)
    assert ids.unique().numel() >= EXPERTS - 2


def test_forward_on_cpu_is_the_torch_path():
    ref = hf_block("qwen3_moe")
    ours = ours_from(in_memory_weights(ref, "", "mlp"), "", "qwen3_moe", True)
    x = tokens(3, 6)
    assert torch.equal(ours(x), hf_out(ref, x))
    # leading dims are flattened and restored
    assert torch.equal(ours(x.view(2, 3, HIDDEN)), hf_out(ref, x).view(2, 3, HIDDEN))


def test_norm_topk_prob_matters():
    ref = hf_block("qwen3_moe", norm_topk_prob=False)
    weights = in_memory_weights(ref, "", "mlp")
    x = tokens()
    plain = ours_from(weights, "", "qwen3_moe", False).forward_torch(x)
    normed = ours_from(weights, "", "qwen3_moe", True).forward_torch(x)
    assert not torch.allclose(plain, normed)


def test_routing_weights():
    logits = torch.randn(6, EXPERTS, generator=torch.Generator().manual_seed(4))
    weights, ids = route_softmax_topk(logits, 3, norm_topk_prob=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    # Mixtral's formulation: softmax over the top-k logits only
    top_logits, top_ids = torch.topk(logits, 3, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(weights, torch.softmax(top_logits, dim=-1))


def saved_checkpoint(tmp_path, style: str) -> tuple[dict, object]:
    """A one-layer model saved by transformers (its on-disk names) and the model itself."""
    if style == "qwen3_moe":
        model = transformers.Qwen3MoeForCausalLM(qwen3_config(True))
    else:
        model = transformers.MixtralForCausalLM(mixtral_config())
    randomize_(model, 7)
    # inside a model transformers defaults to grouped_mm experts (other fp32 sums, a few
    # ulp away); eager is the per-expert loop of the standalone blocks
    model.set_experts_implementation("eager")
    model.save_pretrained(tmp_path)
    return load_file(os.path.join(tmp_path, "model.safetensors")), model


@pytest.mark.parametrize("style", ["qwen3_moe", "mixtral"])
def test_saved_checkpoint_names(tmp_path, style):
    weights, model = saved_checkpoint(tmp_path, style)
    module = "mlp" if style == "qwen3_moe" else "block_sparse_moe"
    assert f"model.layers.0.{module}.experts.0.{'gate_proj' if module == 'mlp' else 'w1'}.weight" \
        in weights  # per-expert names on disk
    consumed: set[str] = set()
    ours = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, True)
    ours.load_hf_weights(weights, "model.layers.0", style, consumed)
    moe_names = {n for n in weights if f".{module}." in n}
    assert consumed == moe_names
    x = tokens(5)
    assert torch.equal(ours.forward_torch(x), hf_out(model.model.layers[0].mlp, x))


def test_missing_expert_is_named():
    ref = hf_block("mixtral")
    g = torch.Generator().manual_seed(0)
    weights = {"l.block_sparse_moe.gate.weight": ref.gate.weight.detach()}
    for e in range(EXPERTS):
        for proj, shape in (("w1", (INTER, HIDDEN)), ("w3", (INTER, HIDDEN)), ("w2", (HIDDEN, INTER))):
            weights[f"l.block_sparse_moe.experts.{e}.{proj}.weight"] = torch.randn(shape, generator=g)
    load_hf_expert_weights(weights, "l.", "mixtral")  # complete: loads
    del weights["l.block_sparse_moe.experts.5.w3.weight"]
    with pytest.raises(ValueError, match=r"experts\.5\.w3\.weight"):
        load_hf_expert_weights(weights, "l.", "mixtral")


def test_bad_names_and_shapes_are_errors():
    ref = hf_block("qwen3_moe")
    weights = in_memory_weights(ref, "m.", "mlp")
    with pytest.raises(ValueError, match="style"):
        load_hf_expert_weights(weights, "m.", "deepseek")
    with pytest.raises(ValueError, match=r"x\.mlp\.gate\.weight"):
        load_hf_expert_weights(weights, "x.", "qwen3_moe")
    wrong = SparseMoeBlock(HIDDEN, INTER + 8, EXPERTS, TOP_K, True)
    with pytest.raises(ValueError, match="w13"):
        wrong.load_hf_weights(weights, "m.", "qwen3_moe")
    with pytest.raises(ValueError, match="top_k"):
        SparseMoeBlock(HIDDEN, INTER, EXPERTS, EXPERTS + 1, True)
    with pytest.raises(ValueError, match="routing"):
        SparseMoeBlock(HIDDEN, INTER, EXPERTS, 2, True, routing="sigmoid")


@pytest.mark.parametrize("fused", [False, True])
def test_gguf_expert_tensors(fused):
    """llama.cpp's stacked expert tensors (numpy order) map onto the same parameters."""
    ref = hf_block("mixtral")
    state = {k: v.detach() for k, v in ref.state_dict().items()}
    w13, w2 = state["experts.gate_up_proj"], state["experts.down_proj"]
    tensors = {"blk.2.ffn_gate_inp.weight": state["gate.weight"],
               "blk.2.ffn_down_exps.weight": w2}
    if fused:
        tensors["blk.2.ffn_gate_up_exps.weight"] = w13
    else:
        tensors["blk.2.ffn_gate_exps.weight"] = w13[:, :INTER].contiguous()
        tensors["blk.2.ffn_up_exps.weight"] = w13[:, INTER:].contiguous()
    consumed: set[str] = set()
    ours = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, True)
    params = load_gguf_expert_weights(tensors, 2, consumed)
    with torch.no_grad():
        for name, tensor in params.items():
            ours.get_parameter(name).copy_(tensor)
    assert consumed == set(tensors)
    x = tokens(6)
    assert torch.equal(ours.forward_torch(x), hf_out(ref, x))
    del tensors["blk.2.ffn_down_exps.weight"]
    with pytest.raises(ValueError, match="ffn_down_exps"):
        load_gguf_expert_weights(tensors, 2)
