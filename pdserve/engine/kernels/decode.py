"""Paged decode attention: one query per sequence over its paged context.

Flash-decoding: each sequence's context is cut into `num_splits` contiguous ranges of
KV tiles; program (seq, kv_head, split) streams its range once and attends with ALL
query heads of that KV head's GQA group (rows of one tl.dot), so each K/V byte is read
once. Partial (m, l, acc) go to a fp32 workspace and a reduce kernel merges them.

The split count is a launch argument fixed by the host (graph-capture safe): each
sequence divides its own tiles evenly among the splits on the device, so a short
sequence leaves trailing splits empty (they write m=-inf, l=0, acc=0 and the merge
weighs them 0). With num_splits == 1 the first kernel writes the output directly.

Sliding window w: the query at seq_len - 1 sees keys from seq_len - w on. The splits
divide only the tiles from that key's tile on; earlier tiles are never loaded (their
pages may be back in the allocator) and loads below the key are masked. A windowed layer
wants fewer splits (its context is at most w): choose_num_splits takes the window.
Soft cap c: scores become c * tanh(score / c) before the mask and the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.engine.kernels._common import (check_cache, device_sms, dot_precision, head_block,
                                            interpreting, score_scales, soft_cap_tanh)

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


# num_splits follows each eager step's decode row count: not specialized on (Triton would
# compile a variant for 1 and for multiples of 16 on the first step that has one)
@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    qk_scale, cap_scale, window, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_row = tl.load(query_start_ptr + seq).to(tl.int64)
    has_query = tl.load(query_start_ptr + seq + 1) > q_row

    # this split's tile range; every sequence splits its own (windowed) length evenly
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    if WINDOW:
        lo_key = tl.maximum(seq_len - window, 0)  # lowest key the query sees
        first_tile = lo_key // BLOCK_N
    else:
        lo_key = 0
        first_tile = 0
    tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    tile_hi = tl.where(has_query, tile_hi, tile_lo)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    # a sequence without a query (padding) has no rows to read or write
    g_mask = offs_g < tl.where(has_query, GROUP, 0)
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # query heads of this KV head

    # q: [BLOCK_G, BLOCK_D], rows past GROUP are padding for tl.dot's 16-row minimum
    q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_cache_ptr + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(tile_lo, tile_hi):
        pos = tile * BLOCK_N + offs_n  # [BLOCK_N] context positions
        valid = pos < seq_len
        if WINDOW:
            valid = valid & (pos >= lo_key)
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offset = (pos % BLOCK_SIZE).to(tl.int64)
        kv_mask = valid[:, None] & d_mask[None, :]
        # k, v: [BLOCK_N, BLOCK_D] gathered row by row through the block table
        k = tl.load(k_base + block[:, None] * stride_kb + offset[:, None] * stride_kt
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + block[:, None] * stride_vb + offset[:, None] * stride_vt
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_G, BLOCK_N]
        if SOFT_CAP:
            s = soft_cap_tanh(s) * cap_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    if DIRECT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])
    else:
        # workspace rows: ((seq * NUM_HEADS + head) * num_splits + split)
        row = (seq.to(tl.int64) * NUM_HEADS + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc,
                 mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    part_acc_ptr, part_ml_ptr, query_start_ptr, out_ptr,
    num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_ptr + seq).to(tl.int64)
    has_query = tl.load(query_start_ptr + seq + 1) > q_row
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    row = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits + offs_s  # [BLOCK_S]
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty: no NaN
    w = tl.exp2(m - m_max)  # [BLOCK_S]; empty splits weigh 0
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)  # [BLOCK_S, BLOCK_D]
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + q_row * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < tl.where(has_query, HEAD_DIM, 0))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, sms: int,
                      sliding_window: int = 0) -> int:
    """KV splits per sequence from host ints only.

    Enough (seq, kv_head, split) programs to fill about one wave of the GPU (3 per SM;
    the default tile fits ~4 per SM), never more than that (a partial second wave
    costs more than it gains), and no split shorter than MIN_TOKENS_PER_SPLIT of
    max_seq_len. Under CUDA graphs pass a max_seq_len that is fixed for the captured
    batch size (e.g. the model's max length): the result then depends on num_seqs alone.
    A windowed layer reads at most sliding_window keys (+ one tile of alignment).
    """
    if sliding_window > 0:
        max_seq_len = min(max_seq_len, sliding_window)
    want = (3 * sms) // max(1, num_seqs * num_kv_heads)
    cap = triton.cdiv(max(1, max_seq_len), MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap, MAX_SPLITS))


def default_decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shape and pipelining, swept on H100 under CUDA graphs (bench/NOTES-kernels.md):
    64-token tiles, 4 warps, 3 stages (~126 registers: 4 programs per SM)."""
    if interpreting():
        return {"BLOCK_N": 32, "num_warps": 1, "num_stages": 1}
    if head_dim > 128:  # keep K/V stages inside shared memory
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def decode_workspace(num_seqs: int, num_heads: int, num_splits: int, head_dim: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials: acc [seqs*heads*splits, BLOCK_D] and (m, l) [seqs*heads*splits, 2]."""
    rows = num_seqs * num_heads * num_splits
    return (torch.empty(rows, head_block(head_dim), dtype=torch.float32, device=device),
            torch.empty(rows, 2, dtype=torch.float32, device=device))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
    scale: float, max_seq_len: int, num_splits: int | None = None,
    out: torch.Tensor | None = None, workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None, sliding_window: int = 0, logits_soft_cap: float = 0.0,
) -> torch.Tensor:
    """Decode attention, at most one query per sequence.

    q: [num_tokens, num_heads, d] (query of sequence i at row query_start_loc[i]; a
    sequence with no query is skipped). k_cache/v_cache: [blocks, bs, kv_heads, d].
    block_tables: int32 [num_seqs, max_blocks]; seq_lens: int32 [num_seqs] (context
    including the new token). max_seq_len: host int bound used only to pick num_splits
    when it is None. sliding_window / logits_soft_cap as in paged_prefill_attention.
    Returns out [num_tokens, num_heads, d]. No host sync.
    """
    check_cache(k_cache, v_cache)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, device_sms(q.device),
                                       sliding_window)
    cfg = {**default_decode_config(head_dim, k_cache.dtype), **(config or {})}
    block_d = head_block(head_dim)
    direct = num_splits == 1
    if direct:
        part_acc = part_ml = out  # unused
    else:
        part_acc, part_ml = workspace or decode_workspace(num_seqs, num_heads, num_splits,
                                                          head_dim, q.device)
    qk_scale, cap_scale = score_scales(scale, logits_soft_cap)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        out, part_acc, part_ml,
        qk_scale, cap_scale, max(0, sliding_window), num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"], DIRECT=direct, UPCAST=interpreting(),
        DOT_PREC=dot_precision(k_cache.dtype),
        WINDOW=sliding_window > 0, SOFT_CAP=logits_soft_cap > 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        _decode_merge_kernel[(num_seqs, num_heads)](
            part_acc, part_ml, query_start_loc, out,
            num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=1 if interpreting() else 4,
        )
    return out
