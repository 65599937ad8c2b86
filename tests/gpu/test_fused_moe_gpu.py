"""Triton fused MoE (kernels/fused_moe.py) on the GPU at real shapes, bf16.

Shapes: Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, expert width 768) and a small
Mixtral-like block (hidden 1024, 8 experts, top-2, width 2048), at decode (1, 7, 64) and
prefill (512, 4096) token counts. References are fp32 computations over the same bf16
weights; the kernel's error must stay within what torch's own bf16 path
(SparseMoeBlock.forward_torch, transformers' loop) makes against the same reference.

Routing is checked separately: bf16 logits tie often (8-bit mantissas over 128 experts),
and torch.topk picks among equal values in no specified order, so chosen weights are
compared as sorted values and ids only where the k-th and (k+1)-th probabilities differ.
Then CUDA-graph capture: replay with new inputs (including every token on one expert,
the worst case of the padded sizes) equals eager runs.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kernels import fused_moe as fm
from pdserve.engine.model.moe import SparseMoeBlock, route_softmax_topk

pytestmark = pytest.mark.gpu
DEV = "cuda"
DT = torch.bfloat16
# name: (hidden, inter, experts, top_k, norm_topk_prob)
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8, True), "mixtral-small": (1024, 2048, 8, 2, True)}
TOKENS = [1, 7, 64, 512, 4096]


def gen(seed: int) -> torch.Generator:
    return torch.Generator(DEV).manual_seed(seed)


def make_block(shape: str, dtype=DT, seed: int = 0) -> SparseMoeBlock:
    hidden, inter, experts, top_k, norm = SHAPES[shape]
    with torch.device(DEV):  # built on the device: ~0.4 G parameters
        block = SparseMoeBlock(hidden, inter, experts, top_k, norm)
    g = gen(seed)
    with torch.no_grad():
        # router logits of std ~1-2 (a realistic spread); expert outputs O(1)
        block.gate.weight.normal_(0, 1.5 / hidden ** 0.5, generator=g)
        block.w13.normal_(0, 1 / hidden ** 0.5, generator=g)
        block.w2.normal_(0, 1 / inter ** 0.5, generator=g)
    return block.to(dtype).eval()


def inputs(t: int, hidden: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, hidden, device=DEV, generator=gen(seed)).to(DT)


def experts_fp32(x, w13, w2, topk_w, topk_ids) -> torch.Tensor:
    """fp32 math over the same (bf16) weights and the given routing: [T, H] fp32."""
    x, w13, w2 = x.float(), w13.float(), w2.float()
    out = torch.zeros_like(x)
    flat = topk_ids.long().flatten()
    for e in flat.unique().tolist():
        slot_rows = torch.nonzero(topk_ids.long() == e)  # [n, 2]: (token, slot)
        tok, slot = slot_rows[:, 0], slot_rows[:, 1]
        gate, up = (x[tok] @ w13[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        out.index_add_(0, tok, y * topk_w[tok, slot, None].float())
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_fused_experts_bf16(shape, t):
    block = make_block(shape, seed=t)
    x = inputs(t, block.hidden_size)
    with torch.no_grad():
        topk_w, topk_ids = route_softmax_topk(block.gate(x), block.top_k, block.norm_topk_prob)
        out = fm.fused_experts(x, block.w13, block.w2, topk_w, topk_ids)
        ref = experts_fp32(x, block.w13, block.w2, topk_w, topk_ids)
        # torch's bf16 path (the same routing ops on the same logits): bf16's own error
        torch_bf16 = block.forward_torch(x)
    err, budget = rel_err(out, ref), rel_err(torch_bf16, ref)
    assert out.dtype == DT and bool(torch.isfinite(out).all())
    assert err <= max(1.5 * budget, 4e-3), (err, budget)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_route_topk_bf16(shape, t):
    block = make_block(shape, seed=t)
    x = inputs(t, block.hidden_size, seed=t + 2)
    with torch.no_grad():
        logits = block.gate(x)
    weights, ids = fm.route_topk(logits, block.top_k, block.norm_topk_prob)
    ref_w, ref_ids = route_softmax_topk(logits, block.top_k, block.norm_topk_prob)
    torch.testing.assert_close(weights.sort(-1).values, ref_w.sort(-1).values,
                               rtol=2e-6, atol=1e-7)
    probs = torch.softmax(logits.float(), dim=-1).sort(-1, descending=True).values
    untied = probs[:, block.top_k - 1] > probs[:, block.top_k] if block.top_k < probs.shape[1] \
        else torch.ones(t, dtype=torch.bool, device=DEV)
    same = (ids.long().sort(-1).values == ref_ids.sort(-1).values).all(-1)
    assert bool(same[untied].all())
    # weights sit with their experts: the kernel's (id, weight) pairs are the softmax's
    full = torch.softmax(logits.float(), dim=-1)
    picked = full.gather(1, ids.long())
    if block.norm_topk_prob:
        picked = picked / picked.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, picked, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [1, 64, 512])
def test_fused_block_bf16(shape, t):
    """The whole block (router matmul, routing kernel, alignment, GEMMs) against fp32
    math over the kernel's own routing (checked on its own above); the budget is torch's
    bf16 path against fp32 math over torch's routing (~5e-3 at these shapes)."""
    block = make_block(shape, seed=3 * t)
    x = inputs(t, block.hidden_size, seed=t)
    with torch.no_grad():
        out = block(x)  # CUDA: the fused path
        weights, ids = fm.route_topk(block.gate(x), block.top_k, block.norm_topk_prob)
        err = rel_err(out, experts_fp32(x, block.w13, block.w2, weights, ids))
        budget = rel_err(block.forward_torch(x),
                         experts_fp32(x, block.w13, block.w2, *block.route(x)))
    assert err <= max(1.5 * budget, 4e-3), (err, budget)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_exact_dots(shape):
    block = make_block(shape, dtype=torch.float32, seed=11)
    x = inputs(33, block.hidden_size).float()
    with torch.no_grad():
        out = block.forward_fused(x)
        ref = block.forward_torch(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [1, 64])
def test_cuda_graph_replay(t):
    block = make_block("qwen3-30b-a3b", seed=5)
    hidden = block.hidden_size
    static_x = inputs(t, hidden, seed=6)
    with torch.no_grad():
        block(static_x)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = block(static_x)
        cases = [inputs(t, hidden, seed=7),
                 inputs(1, hidden, seed=8).expand(t, hidden).contiguous()]  # one expert set
        for x in cases:
            static_x.copy_(x)
            graph.replay()
            eager = block(x)
            torch.cuda.synchronize()
            assert torch.equal(static_out, eager)
