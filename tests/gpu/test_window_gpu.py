"""Sliding-window and soft-capped attention on the GPU: real shapes (Mistral-7B heads
with a 4k window; Gemma-2-9B heads, d=256, window 4096, cap 50), bf16, pages outside
each window NaN-poisoned (a kernel that reads one instead of skipping it fails), CUDA-
graph replay, and the time a window saves at a long context."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention.torch_ref import first_visible_key, paged_attention_ref
from pdserve.engine.attention.triton_backend import TritonAttentionBackend
from pdserve.engine.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from tests.gpu.test_kernels_gpu import TOL, make_meta, setup

pytestmark = pytest.mark.gpu

MISTRAL = dict(num_heads=32, kv_heads=8, head_dim=128)
GEMMA2 = dict(num_heads=16, kv_heads=8, head_dim=256)


def poison_outside_window(k_cache, v_cache, meta, window):
    block_size = k_cache.shape[1]
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        dropped = first_visible_key(seq_len, q_len, window) // block_size
        pages = meta.block_tables[i, :dropped].long()
        k_cache[pages] = float("nan")
        v_cache[pages] = float("nan")


def check(out, q, k_cache, v_cache, meta, scale, window, cap):
    assert not out.isnan().any(), "NaN: unwritten outputs, or a page outside the window read"
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale,
                              window, cap)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOL, f"relative error {err:.2e}"


PREFILL_CASES = {
    "single_8k": [(0, 8192)],
    "mixed_chunks_past_window": [(0, 1000), (4500, 700), (9000, 333), (17, 1), (5000, 1),
                                 (1024, 2048)],
}


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("shape,window,cap,block_size", [
    ("mistral", 4096, 0.0, 16), ("mistral", 100, 0.0, 16), ("gemma2", 4096, 50.0, 16),
    ("gemma2", 0, 50.0, 64)])
def test_prefill(case, shape, window, cap, block_size):
    heads = MISTRAL if shape == "mistral" else GEMMA2
    _, k_cache, v_cache, meta, q, k, v = setup(PREFILL_CASES[case], block_size, **heads)
    scale = heads["head_dim"] ** -0.5
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    poison_outside_window(k_cache, v_cache, meta, window)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                            meta.seq_lens, meta.max_query_len, scale, out=out,
                            sliding_window=window, logits_soft_cap=cap)
    check(out, q, k_cache, v_cache, meta, scale, window, cap)


@pytest.mark.parametrize("num_splits", [1, 4, None])
@pytest.mark.parametrize("shape,window,cap", [("mistral", 1024, 0.0), ("gemma2", 4096, 50.0),
                                              ("mistral", 0, 30.0)])
def test_decode_batch_64(num_splits, shape, window, cap):
    heads = MISTRAL if shape == "mistral" else GEMMA2
    gen = torch.Generator().manual_seed(2)
    lens = torch.randint(1, 8193, (64,), generator=gen).tolist()
    lens[:4] = [1, 16, 1025, 8192]
    _, k_cache, v_cache, meta, q, _, _ = setup([(s - 1, 1) for s in lens], 16, **heads)
    poison_outside_window(k_cache, v_cache, meta, window)
    scale = heads["head_dim"] ** -0.5
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                           meta.query_start_loc, scale, meta.max_seq_len,
                           num_splits=num_splits, out=out, sliding_window=window,
                           logits_soft_cap=cap)
    check(out, q, k_cache, v_cache, meta, scale, window, cap)


def test_backend_windowed_decode_under_cuda_graph():
    """Capture one windowed, capped decode step; replay with other lengths and tables."""
    lens = [(s - 1, 1) for s in (100, 5000, 7, 8192)]
    pool, k_cache, v_cache, meta, q, k, v = setup(lens, spare_blocks=800)
    backend = TritonAttentionBackend(graph_max_seq_len=16384)
    kw = dict(sliding_window=2048, logits_soft_cap=30.0)
    backend.forward(q, k, v, k_cache, v_cache, meta, 0.1, **kw)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.1, **kw)
    gen = torch.Generator().manual_seed(9)
    new = make_meta([(s - 1, 1) for s in (6000, 1, 2049, 64)], 16, k_cache.shape[0], gen)
    for name in ("slot_mapping", "query_start_loc", "seq_lens"):
        getattr(meta, name).copy_(getattr(new, name))
    meta.block_tables.zero_()
    meta.block_tables[:, :new.block_tables.shape[1]].copy_(new.block_tables)
    q.normal_(), k.normal_(), v.normal_()
    graph.replay()
    torch.cuda.synchronize()
    check(out, q, k_cache, v_cache, new, 0.1, 2048, 30.0)
