"""Paged prefill attention: a varlen batch of new tokens over their paged context.

Sequence i has q_len new queries (query j sits at position seq_len - q_len + j) that
attend causally to everything before them: context already in the cache (prefix hit,
earlier chunks of a chunked prefill) and the new tokens themselves, which the store
kernel has written to the cache first. K/V are read only from the paged cache.

FA2-style: program (q_head, seq, q_block) keeps BLOCK_M query rows in registers and
streams BLOCK_N-token KV tiles, each gathered through the block table (a tile may span
several pages, or part of one). Tiles entirely below the diagonal run without masks;
only the last ceil(BLOCK_M / BLOCK_N) + 1 tiles are masked; tiles above it are skipped.
Heads are the fastest grid axis so the programs of one GQA group run together and share
K/V through L2; query blocks run heaviest first to shorten the causal tail.

Sliding window w (per layer, a launch argument): the query at p sees keys p - w < j <= p.
A query block starts at the tile of the lowest key its first row sees: tiles wholly
before it are skipped, never loaded (their pages may already be back in the allocator,
reused by another sequence), and loads below that key are masked. Tiles every row sees
whole run unmasked as before; the window's lower edge adds masked tiles at the start.
Soft cap c: scores become c * tanh(score / c) before the masks and the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.kernels._common import (check_cache, device_sms, dot_precision, head_block,
                                            interpreting, score_scales, soft_cap_tanh)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_base, v_base, table, n0, seq_len, q_pos,
                 qk_scale, cap_scale, window, lo_key, stride_kb, stride_kt, stride_vb,
                 stride_vt, offs_n, offs_d, d_mask,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr,
                 SOFT_CAP: tl.constexpr):
    pos = n0 + offs_n  # [BLOCK_N] key positions
    if MASKED:
        valid = pos < seq_len
        if WINDOW:  # keys below lo_key: no row sees them, their page may be freed
            valid = valid & (pos >= lo_key)
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
    offset = (pos % BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_base + block[:, None] * stride_kb + offset[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + block[:, None] * stride_vb + offset[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)
    elif PAD_D:
        k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    else:  # the hot loop: no predicates at all
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
    if SOFT_CAP:
        s = soft_cap_tanh(s) * cap_scale
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
        if WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with nothing visible yet keep m = -inf; shift by 0 then so no NaN appears
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, query_start_ptr, seq_lens_ptr,
    qk_scale, cap_scale, window,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
):
    head = tl.program_id(0)
    seq = tl.program_id(1)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    # heaviest (last) query block first
    q_block = tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(2)
    if q_block < 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = ctx_len + offs_m  # [BLOCK_M] positions of this block's queries
    rows = (q_start + offs_m).to(tl.int64)

    # q: [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    kv_head = (head // GROUP).to(tl.int64)
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # keys [full_lo, full_end) are visible to every row of the block: no masks there
    first_pos = ctx_len + q_block * BLOCK_M
    full_end = (tl.minimum(first_pos + 1, seq_len) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
    if WINDOW:
        lo_key = tl.maximum(first_pos - window + 1, 0)  # lowest key the first row sees
        kv_lo = (lo_key // BLOCK_N) * BLOCK_N
        # every row (the last at kv_end - 1) sees keys from kv_end - window on
        full_lo = tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(full_lo, full_end)  # kv_lo <= full_lo <= full_end
    else:
        lo_key = 0
        kv_lo = 0
        full_lo = 0
    for n0 in range(kv_lo, full_lo, BLOCK_N):  # the window's lower edge
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, table, n0, seq_len,
                                     q_pos, qk_scale, cap_scale, window, lo_key, stride_kb,
                                     stride_kt, stride_vb, stride_vt, offs_n, offs_d, d_mask,
                                     BLOCK_SIZE, True, BLOCK_D != HEAD_DIM, UPCAST, DOT_PREC,
                                     WINDOW, SOFT_CAP)
    for n0 in range(full_lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, table, n0, seq_len,
                                     q_pos, qk_scale, cap_scale, window, lo_key, stride_kb,
                                     stride_kt, stride_vb, stride_vt, offs_n, offs_d, d_mask,
                                     BLOCK_SIZE, False, BLOCK_D != HEAD_DIM, UPCAST, DOT_PREC,
                                     WINDOW, SOFT_CAP)
    for n0 in range(full_end, kv_end, BLOCK_N):  # the diagonal
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, table, n0, seq_len,
                                     q_pos, qk_scale, cap_scale, window, lo_key, stride_kb,
                                     stride_kt, stride_vb, stride_vt, offs_n, offs_d, d_mask,
                                     BLOCK_SIZE, True, BLOCK_D != HEAD_DIM, UPCAST, DOT_PREC,
                                     WINDOW, SOFT_CAP)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def default_prefill_config(head_dim: int, dtype: torch.dtype, num_programs_m128: int = 1 << 30,
                           sms: int = 132) -> dict:
    """Tile shape and pipelining, measured on H100 (bench/NOTES-kernels.md): 128x128
    tiles, 8 warps, 3 stages; 64-row blocks when 128-row ones leave the GPU under two
    programs per SM (short prompts), trading tile efficiency for occupancy."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    if head_dim > 128:  # keep K/V stages inside shared memory
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if num_programs_m128 < 2 * sms:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    max_query_len: int, scale: float,
    out: torch.Tensor | None = None, config: dict | None = None,
    sliding_window: int = 0, logits_soft_cap: float = 0.0,
) -> torch.Tensor:
    """Causal varlen attention of new queries over their paged context.

    q: [num_tokens, num_heads, d]; k_cache/v_cache: [blocks, bs, kv_heads, d] (already
    holding this step's K/V); block_tables int32 [num_seqs, max_blocks];
    query_start_loc int32 [num_seqs + 1]; seq_lens int32 [num_seqs]; max_query_len:
    host int sizing the grid. sliding_window > 0: the query at p sees keys
    p - w < j <= p only, and no page wholly before that is read. logits_soft_cap > 0:
    scores s -> c * tanh(s / c). Returns out [num_tokens, num_heads, d] in q's dtype.
    """
    check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv heads {num_kv_heads}")
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    programs_m128 = num_heads * num_seqs * triton.cdiv(max_query_len, 128)
    cfg = {**default_prefill_config(head_dim, k_cache.dtype, programs_m128, device_sms(q.device)),
           **(config or {})}
    grid = (num_heads, num_seqs, triton.cdiv(max_query_len, cfg["BLOCK_M"]))
    qk_scale, cap_scale = score_scales(scale, logits_soft_cap)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        qk_scale, cap_scale, max(0, sliding_window),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        UPCAST=interpreting(), DOT_PREC=dot_precision(k_cache.dtype),
        WINDOW=sliding_window > 0, SOFT_CAP=logits_soft_cap > 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
