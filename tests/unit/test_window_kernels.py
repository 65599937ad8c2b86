"""Sliding-window attention and attention soft-capping: Triton kernels vs the torch
reference, and the reference vs the definition (a dense per-query loop).

Under TRITON_INTERPRET=1 on the CPU (conftest), tiny shapes, fp32/fp16. Pages wholly
before a sequence's window are filled with NaN first: the scheduler may have returned
them to the allocator, so a kernel that reads one (instead of skipping it) poisons its
output.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pdserve.engine.attention.torch_ref import (TorchAttentionBackend,  # noqa: E402
                                                first_visible_key, paged_attention_ref)
from pdserve.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pdserve.engine.kernels import (choose_num_splits, paged_decode_attention,  # noqa: E402
                                    paged_prefill_attention, store_kv)
from pdserve.engine.kernels.decode import decode_workspace  # noqa: E402
from tests.unit.test_kernels import DTYPES, MIXED, check, make_meta, make_pool  # noqa: E402


def poison_outside_window(k_cache, v_cache, meta, window):
    """NaN into every page wholly before the first key a sequence's queries see."""
    block_size = k_cache.shape[1]
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        dropped = first_visible_key(seq_len, q_len, window) // block_size
        for block in meta.block_tables[i, :dropped].tolist():
            k_cache[block] = float("nan")
            v_cache[block] = float("nan")


def reference(q, k_cache, v_cache, meta, scale, window, cap):
    """fp64 reference over the same cache contents."""
    return paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), meta, scale,
                               window, cap)


def dense_definition(q, k_cache, v_cache, meta, scale, window, cap):
    """Query at p sees keys p - w < j <= p; scores s -> cap * tanh(s / cap); one query at
    a time over the whole gathered context (NaN-free caches only)."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    row = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        pages = meta.block_tables[i, :math.ceil(seq_len / block_size)].long()
        keys = k_cache[pages].flatten(0, 1)[:seq_len]  # [seq_len, kvh, d]
        values = v_cache[pages].flatten(0, 1)[:seq_len]
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        for j in range(q_len):
            p = seq_len - q_len + j
            s = torch.einsum("hd,khd->hk", q[row + j], keys) * scale  # [heads, seq_len]
            if cap:
                s = cap * torch.tanh(s / cap)
            j_pos = torch.arange(seq_len)
            hidden = (j_pos > p) | ((j_pos <= p - window) if window else False)
            s[:, hidden] = float("-inf")
            out[row + j] = torch.einsum("hk,khd->hd", s.softmax(-1), values)
        row += q_len
    return out


def qkv(n, num_heads, kv_heads, head_dim, dtype, gen):
    return tuple(torch.randn(n, h, head_dim, generator=gen).to(dtype)
                 for h in (num_heads, kv_heads, kv_heads))


# ---- the reference itself -------------------------------------------------------------

@pytest.mark.parametrize("window,cap", [(0, 0.0), (1, 0.0), (5, 0.0), (16, 0.0), (17, 2.0),
                                        (0, 1.5), (40, 0.0)])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_torch_reference_matches_definition(window, cap, phase):
    gen = torch.Generator().manual_seed(window)
    lens = MIXED if phase == "prefill" else [(s - 1, 1) for s in (1, 16, 17, 40, 70)]
    _, k_cache, v_cache = make_pool(24, 16, 2, 8, "float32", gen)
    k_cache, v_cache = k_cache.double(), v_cache.double()
    meta = make_meta(lens, 16, 24, gen)
    n = meta.slot_mapping.shape[0]
    q, k, v = qkv(n, 4, 2, 8, torch.float64, gen)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv(k, v, want_k, want_v, meta.slot_mapping)
    want = dense_definition(q, want_k, want_v, meta, 0.3, window, cap)
    # the backend's batched decode path, and the per-sequence path
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.3,
                                          sliding_window=window, logits_soft_cap=cap)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reference(q, k_cache, v_cache, meta, 0.3, window, cap), want,
                               rtol=1e-10, atol=1e-10)


def test_torch_reference_skips_pages_before_window():
    gen = torch.Generator().manual_seed(1)
    _, k_cache, v_cache = make_pool(16, 16, 2, 8, "float32", gen)
    meta = make_meta([(60, 1), (40, 1), (3, 1)], 16, 16, gen)
    poison_outside_window(k_cache, v_cache, meta, 18)
    q, k, v = qkv(3, 4, 2, 8, torch.float32, gen)
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.3,
                                          sliding_window=18)
    assert not out.isnan().any()


# ---- prefill kernel ----------------------------------------------------------------------

def run_prefill(ctx_q_lens, block_size, dtype, window, cap, config=None, seed=0,
                num_heads=4, kv_heads=2, head_dim=32):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil((c + q) / block_size) for c, q in ctx_q_lens) + 3
    _, k_cache, v_cache = make_pool(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    meta = make_meta(ctx_q_lens, block_size, num_blocks, gen)
    torch_dtype = DTYPES[dtype]
    q, k, v = qkv(meta.slot_mapping.shape[0], num_heads, kv_heads, head_dim, torch_dtype, gen)
    scale = head_dim ** -0.5
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    poison_outside_window(k_cache, v_cache, meta, window)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                            meta.seq_lens, meta.max_query_len, scale, out=out, config=config,
                            sliding_window=window, logits_soft_cap=cap)
    check(out, reference(q, k_cache, v_cache, meta, scale, window, cap), torch_dtype)


@pytest.mark.parametrize("dtype,window", [("float32", 1), ("float16", 7), ("float32", 16),
                                          ("float16", 24)])
def test_prefill_window(dtype, window):
    # chunked prefills past the window (context 32..45), prompts longer than it, 1-token
    run_prefill(MIXED, 16, dtype, window, 0.0, seed=window)


def test_prefill_window_larger_than_every_sequence():
    run_prefill(MIXED[:3], 16, "float32", 1000, 0.0)


@pytest.mark.parametrize("window", [5, 16, 40])
def test_prefill_window_tiles_span_pages(window):
    # 32-key tiles over 16-token pages: a tile at the window's edge holds a dropped page
    run_prefill([(40, 45), (3, 30), (70, 9)], 16, "float32", window, 0.0, seed=3,
                config={"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 1, "num_stages": 1})


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_soft_cap(dtype):
    # a scale large enough that the cap changes the scores a lot
    run_prefill(MIXED[:4], 16, dtype, 0, 1.5, seed=8, head_dim=16)


def test_prefill_window_and_soft_cap_block_32():
    run_prefill(MIXED, 32, "float16", 20, 4.0, seed=9)


# ---- decode kernel -----------------------------------------------------------------------

def run_decode(seq_lens, block_size, dtype, num_splits, window, cap, seed=0,
               num_heads=4, kv_heads=2, head_dim=32):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(s / block_size) for s in seq_lens) + 2
    _, k_cache, v_cache = make_pool(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    meta = make_meta([(s - 1, 1) for s in seq_lens], block_size, num_blocks, gen)
    poison_outside_window(k_cache, v_cache, meta, window)
    torch_dtype = DTYPES[dtype]
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(torch_dtype)
    out = torch.full_like(q, float("nan"))
    workspace = None
    if num_splits > 1:
        workspace = decode_workspace(len(seq_lens), num_heads, num_splits, head_dim, q.device)
        workspace = tuple(w.fill_(float("nan")) for w in workspace)
    scale = head_dim ** -0.5
    paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                           meta.query_start_loc, scale, meta.max_seq_len,
                           num_splits=num_splits, out=out, workspace=workspace,
                           sliding_window=window, logits_soft_cap=cap)
    check(out, reference(q, k_cache, v_cache, meta, scale, window, cap), torch_dtype)


DECODE_LENS = [1, 15, 16, 17, 33, 70, 97]


@pytest.mark.parametrize("dtype,window,num_splits", [
    ("float32", 1, 1), ("float16", 16, 3), ("float32", 17, 1), ("float16", 40, 8),
    ("float32", 40, 3)])
def test_decode_window(dtype, window, num_splits):
    run_decode(DECODE_LENS, 16, dtype, num_splits, window, 0.0, seed=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_soft_cap(dtype):
    run_decode(DECODE_LENS[:5], 16, dtype, 2, 0, 1.5, seed=2, head_dim=16)


def test_decode_window_and_soft_cap_group_8():
    run_decode([9, 40, 100], 32, "float16", 2, 33, 5.0, num_heads=8, kv_heads=1, head_dim=64)


def test_choose_num_splits_follows_the_window():
    # a 4k-window layer in a 128k model: splits sized for 4k keys, not 128k
    full = choose_num_splits(1, 8, 131072, 132)
    windowed = choose_num_splits(1, 8, 131072, 132, sliding_window=4096)
    assert windowed == choose_num_splits(1, 8, 4096, 132) < full


# ---- backend -----------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_backend_window_matches_torch_backend(phase):
    gen = torch.Generator().manual_seed(12)
    lens = MIXED[:5] if phase == "prefill" else [(s - 1, 1) for s in (7, 16, 40, 66)]
    pool, k_cache, v_cache = make_pool(20, 16, 2, 16, "float32", gen)
    meta = make_meta(lens, 16, 20, gen)
    q, k, v = qkv(meta.slot_mapping.shape[0], 4, 2, 16, torch.float32, gen)
    ref_kv = pool.kv.clone()
    triton_backend = TritonAttentionBackend(graph_max_seq_len=512)
    out = triton_backend.forward(q, k, v, k_cache, v_cache, meta, 0.25, sliding_window=9,
                                 logits_soft_cap=3.0)
    pool.kv, written = ref_kv, pool.kv
    ref = TorchAttentionBackend().forward(q, k, v, *pool.layer_caches(1), meta, 0.25,
                                          sliding_window=9, logits_soft_cap=3.0)
    assert torch.equal(written, pool.kv)
    check(out, ref, torch.float32)
