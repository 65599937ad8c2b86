"""Triton paged-attention kernels vs the PyTorch reference on the GPU: real shapes
(Llama-3-8B heads: 32 q heads, 8 KV heads, d=128), bf16/fp16, contexts up to several k,
batches up to 64, a pool past 2^31 elements (int64 offsets), CUDA-graph replay."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.torch_ref import paged_attention_ref
from pdserve.engine.attention.torch_ref import store_kv as store_kv_ref
from pdserve.engine.attention.triton_backend import TritonAttentionBackend
from pdserve.engine.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = 1.5e-2  # relative L2 error for bf16/fp16 operands vs an fp32 reference


def make_meta(ctx_q_lens, block_size, num_blocks, gen, first_block=0):
    seq_lens = [c + q for c, q in ctx_q_lens]
    need = [math.ceil(s / block_size) for s in seq_lens]
    perm = (torch.randperm(num_blocks - first_block, generator=gen) + first_block).tolist()
    tables = torch.zeros(len(seq_lens), max(need) + 1, dtype=torch.int32)
    slots, used = [], 0
    for i, ((ctx, q_len), n) in enumerate(zip(ctx_q_lens, need)):
        row = torch.tensor(perm[used:used + n], dtype=torch.int64)
        tables[i, :n] = row.to(torch.int32)
        used += n
        pos = torch.arange(ctx, ctx + q_len)
        slots.append(row[pos // block_size] * block_size + pos % block_size)
    q_lens = [q for _, q in ctx_q_lens]
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.cat(slots).to(DEV), query_start_loc=starts.to(DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
        block_tables=tables.to(DEV), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens, seq_lens_cpu=seq_lens)


def setup(ctx_q_lens, block_size=16, dtype=torch.bfloat16, num_heads=32, kv_heads=8,
          head_dim=128, seed=0, num_layers=2, spare_blocks=8, first_block=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = first_block + sum(math.ceil((c + q) / block_size) for c, q in ctx_q_lens)
    num_blocks += spare_blocks
    spec = KVCacheSpec(num_layers, kv_heads, head_dim, block_size, num_blocks,
                       dtype=str(dtype).split(".")[-1])
    pool = KVCachePool(spec, device=DEV)
    pool.kv.normal_()
    k_cache, v_cache = pool.layer_caches(num_layers - 1)
    meta = make_meta(ctx_q_lens, block_size, num_blocks, gen, first_block)
    n = meta.slot_mapping.shape[0]
    q = torch.randn(n, num_heads, head_dim, device=DEV, dtype=dtype)
    k = torch.randn(n, kv_heads, head_dim, device=DEV, dtype=dtype)
    v = torch.randn(n, kv_heads, head_dim, device=DEV, dtype=dtype)
    return pool, k_cache, v_cache, meta, q, k, v


def check(out, q, k_cache, v_cache, meta, scale):
    assert not out.isnan().any(), "NaN (unwritten) outputs"
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("block_size", [16, 64])
def test_store_kv_exact(block_size):
    _, k_cache, v_cache, meta, _, k, v = setup([(0, 1000), (100, 37)], block_size)
    meta.slot_mapping[::7] = -1
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    store_kv_ref(k, v, k_ref, v_ref, meta.slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, rtol=0, atol=0)


PREFILL_CASES = {
    "single_2k": [(0, 2048)],
    "mixed_prefix_chunks": [(0, 1000), (512, 700), (3000, 333), (17, 1), (0, 1), (1024, 128)],
}


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("block_size,dtype,head_dim", [
    (16, torch.bfloat16, 128), (32, torch.float16, 128), (64, torch.bfloat16, 64)])
def test_prefill(case, block_size, dtype, head_dim):
    _, k_cache, v_cache, meta, q, k, v = setup(PREFILL_CASES[case], block_size, dtype,
                                               head_dim=head_dim)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                            meta.seq_lens, meta.max_query_len, head_dim ** -0.5, out=out)
    check(out, q, k_cache, v_cache, meta, head_dim ** -0.5)


@pytest.mark.parametrize("num_splits", [1, 4, None, 64])
@pytest.mark.parametrize("block_size,dtype,head_dim", [
    (16, torch.bfloat16, 128), (32, torch.float16, 64)])
def test_decode_batch_64(num_splits, block_size, dtype, head_dim):
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    lens[:4] = [1, 16, 17, 4096]
    _, k_cache, v_cache, meta, q, _, _ = setup([(s - 1, 1) for s in lens], block_size, dtype,
                                               head_dim=head_dim)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                           meta.query_start_loc, head_dim ** -0.5, meta.max_seq_len,
                           num_splits=num_splits, out=out)
    check(out, q, k_cache, v_cache, meta, head_dim ** -0.5)


def test_decode_long_context_batch_1():
    _, k_cache, v_cache, meta, q, _, _ = setup([(32767, 1)])
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                           meta.query_start_loc, 128 ** -0.5, meta.max_seq_len, out=out)
    check(out, q, k_cache, v_cache, meta, 128 ** -0.5)


def test_int64_offsets_pool_past_2_pow_31_elements():
    # one layer, 16-token blocks of 8x128 (K and V): 32768 elements a block; blocks
    # past 65536 start beyond 2^31 elements of the pool (4.6 GB in bf16)
    lens = [(300, 40), (0, 77)]
    pool, k_cache, v_cache, meta, q, k, v = setup(lens, num_layers=1, first_block=70000,
                                                  spare_blocks=2)
    assert pool.kv.numel() > 2 ** 31
    backend = TritonAttentionBackend()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 128 ** -0.5)
    check(out, q, k_cache, v_cache, meta, 128 ** -0.5)
    dmeta = make_meta([(339, 1), (76, 1)], 16, k_cache.shape[0], torch.Generator(), 0)
    dmeta.block_tables = meta.block_tables  # same pages: decode over what prefill wrote
    dq = torch.randn(2, 32, 128, device=DEV, dtype=torch.bfloat16)
    out = paged_decode_attention(dq, k_cache, v_cache, dmeta.block_tables, dmeta.seq_lens,
                                 dmeta.query_start_loc, 128 ** -0.5, 340, num_splits=3)
    check(out, dq, k_cache, v_cache, dmeta, 128 ** -0.5)


def test_backend_decode_under_cuda_graph():
    """Capture one decode step, replay it with other lengths and tables: same as eager."""
    lens = [(s - 1, 1) for s in (100, 1500, 7, 2048)]
    pool, k_cache, v_cache, meta, q, k, v = setup(lens, spare_blocks=400)
    backend = TritonAttentionBackend(graph_max_seq_len=4096)
    backend.forward(q, k, v, k_cache, v_cache, meta, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.1)
    gen = torch.Generator().manual_seed(9)
    new = make_meta([(s - 1, 1) for s in (2000, 1, 333, 64)], 16, k_cache.shape[0], gen)
    for name in ("slot_mapping", "query_start_loc", "seq_lens"):
        getattr(meta, name).copy_(getattr(new, name))
    meta.block_tables.zero_()
    meta.block_tables[:, :new.block_tables.shape[1]].copy_(new.block_tables)
    q.normal_(), k.normal_(), v.normal_()
    graph.replay()
    torch.cuda.synchronize()
    check(out, q, k_cache, v_cache, new, 0.1)
