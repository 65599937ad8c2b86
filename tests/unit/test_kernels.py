"""Triton paged-attention kernels vs the plain-PyTorch reference (torch_ref).

Runs on the CPU under TRITON_INTERPRET=1 (conftest sets it): tiny shapes, fp32 and fp16
(the interpreter's bf16 arithmetic is unusable). Caches come from a real KVCachePool so
the per-layer views carry the pool's block-major strides; block ids are a random
permutation of the pool; outputs are poisoned with NaN before each kernel runs.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pdserve.engine.attention.base import AttentionMetadata  # noqa: E402
from pdserve.engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from pdserve.engine.attention.torch_ref import paged_attention_ref  # noqa: E402
from pdserve.engine.attention.torch_ref import store_kv as store_kv_ref  # noqa: E402
from pdserve.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pdserve.engine.kernels import (paged_decode_attention, paged_prefill_attention,  # noqa: E402
                                    store_kv)
from pdserve.engine.kernels.decode import decode_workspace  # noqa: E402
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def make_pool(num_blocks, block_size, kv_heads, head_dim, dtype, gen, layer=1):
    """Random-filled 3-layer pool; returns (pool, k_cache, v_cache) of one middle layer."""
    spec = KVCacheSpec(num_layers=3, num_kv_heads=kv_heads, head_dim=head_dim,
                       block_size=block_size, num_blocks=num_blocks, dtype=dtype)
    pool = KVCachePool(spec)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen))
    k_cache, v_cache = pool.layer_caches(layer)
    return pool, k_cache, v_cache


def make_meta(ctx_q_lens, block_size, num_blocks, gen, skip_every=0):
    """Metadata for sequences given as (context already cached, new queries) pairs.

    Blocks are drawn from a random permutation of the pool. skip_every=n marks every
    n-th new token's slot -1 (not stored)."""
    seq_lens = [c + q for c, q in ctx_q_lens]
    need = [math.ceil(s / block_size) for s in seq_lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(max(need), 1) + 1  # one spare column of padding
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    slots, used = [], 0
    for i, ((ctx, q_len), n) in enumerate(zip(ctx_q_lens, need)):
        tables[i, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
        for pos in range(ctx, ctx + q_len):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    if skip_every:
        slots = [-1 if j % skip_every == skip_every - 1 else s for j, s in enumerate(slots)]
    q_lens = [q for _, q in ctx_q_lens]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens, seq_lens_cpu=seq_lens)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def reference(q, k_cache, v_cache, meta, scale):
    """fp64 reference over the same cache contents."""
    return paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), meta, scale)


def check(out, ref, dtype):
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


# ---- KV store ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv(dtype, block_size):
    gen = torch.Generator().manual_seed(block_size)
    _, k_cache, v_cache = make_pool(12, block_size, 2, 32, dtype, gen)
    meta = make_meta([(0, 37), (block_size, 5), (3, 1)], block_size, 12, gen, skip_every=4)
    n = meta.slot_mapping.shape[0]
    # k, v: [n, kv_heads, d] as strided views of a fused qkv-like buffer
    kv = torch.randn(n, 2, 2, 32, generator=gen).to(DTYPES[dtype])
    k, v = kv[:, 0], kv[:, 1]
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    store_kv_ref(k, v, k_ref, v_ref, meta.slot_mapping)
    # equal, NaN where nothing was to be written (slot -1 and unused slots untouched)
    assert torch.equal(k_cache.isnan(), k_ref.isnan())
    assert torch.equal(v_cache.isnan(), v_ref.isnan())
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, rtol=0, atol=0)


def test_store_kv_other_layers_untouched():
    gen = torch.Generator().manual_seed(7)
    pool, k_cache, v_cache = make_pool(6, 16, 2, 16, "float32", gen)
    before = pool.kv.clone()
    meta = make_meta([(0, 40)], 16, 6, gen)
    k = torch.randn(40, 2, 16, generator=gen)
    store_kv(k, k, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(pool.kv[:, 0], before[:, 0]) and torch.equal(pool.kv[:, 2], before[:, 2])


# ---- prefill ----------------------------------------------------------------------------

# (context already cached, new queries): odd lengths, block edges, prefix hits, 1-token
MIXED = [(0, 37), (32, 16), (21, 1), (0, 1), (45, 19), (16, 16)]


def run_prefill_case(ctx_q_lens, block_size, dtype, num_heads=4, kv_heads=2, head_dim=32,
                     seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil((c + q) / block_size) for c, q in ctx_q_lens) + 3
    _, k_cache, v_cache = make_pool(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    meta = make_meta(ctx_q_lens, block_size, num_blocks, gen)
    n = meta.slot_mapping.shape[0]
    torch_dtype = DTYPES[dtype]
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(torch_dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=gen).to(torch_dtype)
    v = torch.randn(n, kv_heads, head_dim, generator=gen).to(torch_dtype)
    scale = head_dim ** -0.5
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                            meta.seq_lens, meta.max_query_len, scale, out=out)
    check(out, reference(q, k_cache, v_cache, meta, scale), torch_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_mixed_batch(dtype, block_size):
    run_prefill_case(MIXED, block_size, dtype, seed=block_size)


def test_prefill_head_dim_64_mha():
    run_prefill_case([(5, 20), (0, 3)], 16, "float16", num_heads=2, kv_heads=2, head_dim=64)


def test_prefill_head_dim_not_power_of_two_group_4():
    run_prefill_case([(17, 18)], 16, "float32", num_heads=4, kv_heads=1, head_dim=24)


def test_prefill_config_block_n_larger_than_page():
    # a KV tile spanning two 16-token pages, and a 32-row query block
    gen = torch.Generator().manual_seed(3)
    _, k_cache, v_cache = make_pool(16, 16, 2, 16, "float32", gen)
    meta = make_meta([(40, 45), (3, 30)], 16, 16, gen)
    n = meta.slot_mapping.shape[0]
    q = torch.randn(n, 4, 16, generator=gen)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                            meta.seq_lens, meta.max_query_len, 0.3, out=out,
                            config={"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 1,
                                    "num_stages": 1})
    check(out, reference(q, k_cache, v_cache, meta, 0.3), torch.float32)


# ---- decode -----------------------------------------------------------------------------

DECODE_LENS = [1, 15, 16, 17, 33, 70]  # context incl. the new token


def run_decode_case(seq_lens, block_size, dtype, num_splits, num_heads=4, kv_heads=2,
                    head_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(s / block_size) for s in seq_lens) + 2
    _, k_cache, v_cache = make_pool(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    meta = make_meta([(s - 1, 1) for s in seq_lens], block_size, num_blocks, gen)
    torch_dtype = DTYPES[dtype]
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(torch_dtype)
    out = torch.full_like(q, float("nan"))
    workspace = None
    if num_splits > 1:
        workspace = decode_workspace(len(seq_lens), num_heads, num_splits, head_dim, q.device)
        workspace = tuple(w.fill_(float("nan")) for w in workspace)
    paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                           meta.query_start_loc, head_dim ** -0.5, meta.max_seq_len,
                           num_splits=num_splits, out=out, workspace=workspace)
    check(out, reference(q, k_cache, v_cache, meta, head_dim ** -0.5), torch_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_splits", [(16, 1), (16, 3), (32, 8)])
def test_decode(dtype, block_size, num_splits):
    # 8 splits over <= 3 tiles: most splits are empty
    run_decode_case(DECODE_LENS, block_size, dtype, num_splits, seed=num_splits)


def test_decode_head_dim_64_group_8():
    run_decode_case([9, 40], 16, "float16", 2, num_heads=8, kv_heads=1, head_dim=64)


def test_decode_padded_slot_writes_zeros_not_nan():
    # a CUDA-graph padding slot: seq_len 0 attends to nothing
    gen = torch.Generator().manual_seed(5)
    _, k_cache, v_cache = make_pool(4, 16, 2, 16, "float32", gen)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    tables[0, 0] = 2
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    starts = torch.tensor([0, 1, 2], dtype=torch.int32)
    q = torch.randn(2, 4, 16, generator=gen)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, starts, 0.25, 16,
                               num_splits=splits, out=out)
        assert not out.isnan().any() and torch.equal(out[1], torch.zeros_like(out[1]))


# ---- backend ----------------------------------------------------------------------------

# decode rows first (context, 1 query), then a chunk with context and a whole prompt
MIXED_STEP = [(6, 1), (39, 1), (15, 1), (20, 12), (0, 33)]


def phase_lens(phase: str) -> list[tuple[int, int]]:
    """(context, new tokens) per sequence of a prefill-only, decode-only or mixed step."""
    return {"prefill": MIXED[:3], "decode": [(s - 1, 1) for s in (7, 16, 40)],
            "mixed": MIXED_STEP}[phase]


@pytest.mark.parametrize("phase", ["prefill", "decode", "mixed"])
def test_backend_matches_torch_backend(phase):
    gen = torch.Generator().manual_seed(11)
    lens = phase_lens(phase)
    pool, k_cache, v_cache = make_pool(24, 16, 2, 16, "float32", gen)
    meta = make_meta(lens, 16, 24, gen)
    n = meta.slot_mapping.shape[0]
    q = torch.randn(n, 4, 16, generator=gen)
    k = torch.randn(n, 2, 16, generator=gen)
    v = torch.randn(n, 2, 16, generator=gen)
    ref_kv = pool.kv.clone()
    out = TritonAttentionBackend(graph_max_seq_len=512).forward(q, k, v, k_cache, v_cache,
                                                                meta, 0.25)
    pool.kv, written = ref_kv, pool.kv
    ref = TorchAttentionBackend().forward(q, k, v, *pool.layer_caches(1), meta, 0.25)
    assert torch.equal(written, pool.kv)
    check(out, ref, torch.float32)
    assert (meta.split_decodes() is not None) == (phase == "mixed")


@pytest.mark.parametrize("backend", [TritonAttentionBackend(graph_max_seq_len=512),
                                     TorchAttentionBackend()], ids=["triton", "torch"])
@pytest.mark.parametrize("phase", ["prefill", "decode", "mixed"])
def test_store_then_attend_stored_into_out_equals_forward(backend, phase):
    """The piecewise graphs' split of forward: store_kv inside a graph, then attend_stored
    writing into the buffer the next piece reads."""
    gen = torch.Generator().manual_seed(12)
    lens = phase_lens(phase)
    pool, k_cache, v_cache = make_pool(24, 16, 2, 16, "float32", gen)
    meta = make_meta(lens, 16, 24, gen)
    n = meta.slot_mapping.shape[0]
    q, k, v = (torch.randn(n, h, 16, generator=gen) for h in (4, 2, 2))
    before = pool.kv.clone()
    want = backend.forward(q, k, v, k_cache, v_cache, meta, 0.25)
    stored_by_forward, pool.kv = pool.kv.clone(), before
    k_cache, v_cache = pool.layer_caches(1)
    backend.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(pool.kv, stored_by_forward)
    out = torch.full((n, 4, 16), float("nan"))
    got = backend.attend_stored(q, k, v, k_cache, v_cache, meta, 0.25, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_split_decodes_rebases_the_chunks_and_keeps_the_decode_rows():
    gen = torch.Generator().manual_seed(3)
    meta = make_meta(MIXED_STEP, 16, 24, gen)
    decode, chunks = meta.split_decodes()
    assert meta.split_decodes()[0] is decode  # built once per step
    assert decode.query_start_loc.tolist() == [0, 1, 2, 3] and decode.max_query_len == 1
    assert decode.seq_lens_cpu == [7, 40, 16] and decode.max_seq_len == 40
    assert chunks.query_start_loc.tolist() == [0, 12, 45] and chunks.max_query_len == 33
    assert torch.equal(chunks.block_tables, meta.block_tables[3:])
    assert torch.equal(chunks.slot_mapping, meta.slot_mapping[3:])
    # not of that form: decode only, chunks only, a chunk before the decode rows
    for lens in ([(6, 1), (9, 1)], [(0, 5), (3, 4)], [(0, 5), (6, 1)]):
        assert make_meta(lens, 16, 24, gen).split_decodes() is None
