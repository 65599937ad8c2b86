"""Triton fused-MoE kernels (kernels/fused_moe.py) vs PyTorch references, on the CPU.

Runs under TRITON_INTERPRET=1 (conftest sets it; set here too for a direct run): tiny
shapes, fp32 and fp16 (the interpreter's bf16 arithmetic is unusable). Under the
interpreter the kernels take 16-wide tiles and 64-element routing chunks, so these shapes
still cover several chunks (and the separate prefix scan), masked N/K tails, experts with
no tokens, padding, and blocks past the end. References: SparseMoeBlock.forward_torch
(transformers' per-expert loop) and torch.softmax/topk.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from pdserve.engine.kernels import fused_moe as fm  # noqa: E402
from pdserve.engine.model.moe import SparseMoeBlock, route_softmax_topk  # noqa: E402

HIDDEN, INTER = 32, 24  # INTER: a partial 16-wide N tile in the gated GEMM


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moe_block(num_experts: int, top_k: int, norm: bool = True, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> SparseMoeBlock:
    block = SparseMoeBlock(HIDDEN, INTER, num_experts, top_k, norm)
    g = gen(seed)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(num_experts, HIDDEN, generator=g))
        block.w13.copy_(0.2 * torch.randn(block.w13.shape, generator=g))
        block.w2.copy_(0.2 * torch.randn(block.w2.shape, generator=g))
    return block.to(dtype).eval()


def experts_ref(x, w13, w2, topk_w, topk_ids):
    """fp64 sum_j w[t, j] * down(silu(gate x) * up x) per token, no rounding in between."""
    x, w13, w2 = x.detach().double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += topk_w[t, j].item() * (w2[e] @ (F.silu(gate) * up))
    return out


# ---- routing ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_experts,top_k,norm", [(8, 2, True), (6, 3, False), (5, 1, True),
                                                    (8, 8, True)])
def test_route_topk_matches_torch(dtype, num_experts, top_k, norm):
    logits = (2 * torch.randn(11, num_experts, generator=gen(num_experts + top_k))).to(dtype)
    weights, ids = fm.route_topk(logits, top_k, norm)
    ref_w, ref_ids = route_softmax_topk(logits, top_k, norm)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)


def test_route_reads_strided_logits():
    wide = torch.randn(9, 13, generator=gen(3))
    logits = wide[:, 2:10]  # row stride 13
    weights, ids = fm.route_topk(logits, 2, True)
    ref_w, ref_ids = route_softmax_topk(logits, 2, True)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w)


# ---- alignment ----------------------------------------------------------------------------

def check_alignment(topk_ids: torch.Tensor, num_experts: int, block_m: int, scan) -> None:
    sorted_ids, expert_ids, num_padded = fm.align_block_size(topk_ids, num_experts, block_m, scan)
    flat = topk_ids.flatten().long()
    entries = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    n = int(num_padded)
    assert n == int(padded.sum())
    # the worst-case bound the buffers are sized by (graph capture cannot see the data)
    assert sorted_ids.numel() >= n
    assert sorted_ids.numel() == entries + min(num_experts, entries) * (block_m - 1)
    rows = sorted_ids[:n].long()
    real = rows[rows < entries]
    assert bool((rows[rows >= entries] == entries).all()), "padding must be the sentinel"
    assert torch.equal(real.sort().values, torch.arange(entries)), "each entry exactly once"
    start = 0
    for e in range(num_experts):
        run = rows[start:start + int(padded[e])]
        mine = run[run < entries]
        assert mine.numel() == int(counts[e])
        assert bool((flat[mine] == e).all())
        assert bool((mine[1:] > mine[:-1]).all()), "token order kept inside an expert"
        assert bool((run[int(counts[e]):] == entries).all()), "padding after the entries"
        blocks = expert_ids[start // block_m:(start + int(padded[e])) // block_m]
        assert bool((blocks == e).all())
        start += int(padded[e])
    assert bool((expert_ids[n // block_m:] == num_experts).all())


@pytest.mark.parametrize("scan", [None, True, False])
@pytest.mark.parametrize("tokens,top_k,num_experts", [(1, 2, 8), (13, 2, 8), (21, 3, 6),
                                                      (40, 1, 5)])
def test_align_random(scan, tokens, top_k, num_experts):
    g = gen(tokens * 7 + top_k)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    check_alignment(ids.to(torch.int32), num_experts, 16, scan)


@pytest.mark.parametrize("scan", [True, False])
def test_align_skewed_and_worst_case(scan):
    # every token on the same two experts: runs longer than one block, six empty experts
    ids = torch.tensor([[3, 6]] * 37, dtype=torch.int32)
    check_alignment(ids, 8, 16, scan)
    # one entry per expert: the padding bound is reached exactly
    ids = torch.arange(8, dtype=torch.int32).view(4, 2)
    check_alignment(ids, 8, 16, scan)
    sorted_ids, _, num_padded = fm.align_block_size(ids, 8, 16, scan)
    assert int(num_padded) == sorted_ids.numel() == 8 * 16


def test_align_rejects_bad_ids():
    with pytest.raises(ValueError, match="int32"):
        fm.align_block_size(torch.zeros(3, 2, dtype=torch.int64), 4, 16)


# ---- grouped GEMMs ------------------------------------------------------------------------

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=5e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,num_experts,top_k", [(1, 6, 2), (9, 6, 2), (17, 8, 3)])
def test_fused_experts_vs_fp64(dtype, tokens, num_experts, top_k):
    block = moe_block(num_experts, top_k, seed=tokens, dtype=dtype)
    x = torch.randn(tokens, HIDDEN, generator=gen(tokens + 1)).to(dtype)
    with torch.no_grad():
        topk_w, topk_ids = route_softmax_topk(block.gate(x).float(), top_k, True)
    out = fm.fused_experts(x, block.w13.detach(), block.w2.detach(), topk_w, topk_ids)
    assert out.dtype == dtype and out.shape == x.shape
    ref = experts_ref(x, block.w13.detach(), block.w2.detach(), topk_w, topk_ids)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("tokens", [1, 6, 19])
def test_fused_block_matches_torch_path_fp32(norm, tokens):
    block = moe_block(8, 2, norm, seed=tokens)
    # x rows of a wider buffer: a row stride other than hidden
    x = torch.randn(tokens, HIDDEN + 5, generator=gen(tokens))[:, 2:2 + HIDDEN]
    with torch.no_grad():
        out = block.forward_fused(x)
        ref = block.forward_torch(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fused_block_fp16_matches_torch_path():
    block = moe_block(6, 2, seed=5, dtype=torch.float16)
    x = torch.randn(10, HIDDEN, generator=gen(9)).to(torch.float16)
    with torch.no_grad():
        out = block.forward_fused(x)
        ref = block.forward_torch(x)  # fp16 torch on the CPU, rounding at the same places
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=2e-3)


def test_every_expert_contributes():
    # a wrong expert's weights (e.g. a stale expert id per block) would show here: one
    # expert's weights zeroed must change exactly the tokens routed to it
    block = moe_block(6, 2, seed=2)
    x = torch.randn(12, HIDDEN, generator=gen(2))
    _, topk_ids = route_softmax_topk(block.gate(x).detach(), 2, True)
    topk_w = torch.full(topk_ids.shape, 0.5)  # no vanishing weight hides a contribution
    w13, w2 = block.w13.detach().clone(), block.w2.detach()
    base = fm.fused_experts(x, w13, w2, topk_w, topk_ids)
    victim = int(topk_ids[0, 0])
    w13[victim] = 0
    changed = fm.fused_experts(x, w13, w2, topk_w, topk_ids).ne(base).any(dim=1)
    assert torch.equal(changed, (topk_ids == victim).any(dim=1))


def test_explicit_config_and_empty_input():
    block = moe_block(4, 2, seed=1)
    x = torch.randn(5, HIDDEN, generator=gen(1))
    w13, w2, gw = block.w13.detach(), block.w2.detach(), block.gate.weight.detach()
    cfg = fm.MoeKernelConfig(block_m=32, block_n_gated=32, block_n_down=16, block_k=32,
                             num_warps=1, num_stages=1)
    out = fm.fused_moe_block(x, gw, w13, w2, 2, True, config=cfg)
    with torch.no_grad():
        torch.testing.assert_close(out, block.forward_torch(x), rtol=1e-5, atol=1e-6)
    assert fm.fused_moe_block(x[:0], gw, w13, w2, 2, True).shape == (0, HIDDEN)


def test_bad_inputs_are_clear_errors():
    block = moe_block(4, 2)
    x = torch.randn(3, HIDDEN)
    w13, w2, gw = block.w13.detach(), block.w2.detach(), block.gate.weight.detach()
    with pytest.raises(ValueError, match="do not fit"):
        fm.fused_moe_block(x[:, :16], gw, w13, w2, 2, True)
    with pytest.raises(ValueError, match="dtype"):
        fm.fused_moe_block(x, gw, w13.half(), w2.half(), 2, True)
    with pytest.raises(ValueError, match="top_k"):
        fm.fused_moe_block(x, gw, w13, w2, 5, True)
    with pytest.raises(ValueError, match="router weight"):
        fm.fused_moe_block(x, gw[:3], w13, w2, 2, True)
    with pytest.raises(ValueError, match="power of two"):
        fm.MoeKernelConfig(block_m=24)
