"""Fused mixture-of-experts (Qwen3-MoE, Mixtral): routing, token sorting, grouped GEMMs.

fused_moe_block(x, gate_weight, w13, w2, top_k, renormalize) runs, for x [T, H]:
1. router logits x @ gate_weight^T (torch; cuBLAS), then `_route_kernel`: softmax over the
   E experts in fp32, top-k, optional renormalization -> topk_ids/topk_weights [T, k]; it
   also counts, per chunk of tokens, how many of the chunk's T*k (token, slot) entries
   went to each expert;
2. `_scan_kernel` (only when there are many chunks): exclusive prefix of those counts over
   the chunks, so each chunk knows where its entries start inside each expert's run;
3. `_align_kernel`: every entry gets its place in `sorted_ids`, where each expert's entries
   are contiguous (stable: in token order) and padded to a multiple of BLOCK_M with the
   sentinel T*k; `expert_ids` names the expert of each BLOCK_M rows; `num_padded` ends it;
4. `_moe_gemm_kernel` (gated): per BLOCK_M rows of one expert, x rows @ w13[e]^T for the
   gate and the up half at once, then silu(gate) * up -> inter [T*k, I];
5. `_moe_gemm_kernel` (down): inter rows @ w2[e]^T times the entry's routing weight ->
   out_k [T*k, H]; 6. out = sum over the k slots (torch).

CUDA graphs: nothing reads device memory on the host. Every buffer's size and every grid
depend only on T (and the weights' shapes): sorted_ids is sized for the worst case,
T*k + min(E, T*k)*(BLOCK_M - 1) (each expert that got any entry pads fewer than BLOCK_M),
and programs past the device-side `num_padded` return at once.

Rounding follows transformers' per-expert loop: each projection's output is rounded to
x's dtype, silu then the product rounded, the down output rounded before the routing
weight (fp32) scales it; the k slots are summed in fp32 and rounded once.
Offsets into weights and activations are int64 (E * 2I * H passes 2^31 on large models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.engine.kernels._common import dot_precision, interpreting
from pdserve.engine.kernels._common import exp_maybe_libdevice as _exp

# ---- device code --------------------------------------------------------------------------


@triton.jit
def _chunk_counts(ids, valid, experts):
    # ids, valid: [C]; experts: [E_BLOCK] -> entries per expert: [E_BLOCK] int32
    hit = (ids[:, None] == experts[None, :]) & valid[:, None]
    return tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, weights_ptr, counts_ptr, num_tokens, stride_l,
                  E: tl.constexpr, E_BLOCK: tl.constexpr, K: tl.constexpr,
                  K_BLOCK: tl.constexpr, TOK: tl.constexpr, RENORM: tl.constexpr,
                  LIBDEVICE: tl.constexpr):
    chunk = tl.program_id(0)
    toks = chunk * TOK + tl.arange(0, TOK)
    t_mask = toks < num_tokens
    experts = tl.arange(0, E_BLOCK)
    e_mask = experts < E
    # logits: [TOK, E_BLOCK] fp32; padded experts -inf (probability 0)
    ptrs = logits_ptr + toks[:, None].to(tl.int64) * stride_l + experts[None, :]
    logits = tl.load(ptrs, mask=t_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    p = _exp(logits - tl.max(logits, axis=1)[:, None], LIBDEVICE)
    probs = tl.math.div_rn(p, tl.sum(p, axis=1)[:, None])
    slots = tl.arange(0, K_BLOCK)
    top_w = tl.zeros((TOK, K_BLOCK), tl.float32)
    top_i = tl.zeros((TOK, K_BLOCK), tl.int32)
    counts = tl.zeros((E_BLOCK,), tl.int32)
    total = tl.zeros((TOK,), tl.float32)
    for j in tl.static_range(K):
        best = tl.max(probs, axis=1)  # [TOK]
        idx = tl.argmax(probs, axis=1).to(tl.int32)  # the lowest index among equals
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, idx[:, None], top_i)
        total += best
        chosen = experts[None, :] == idx[:, None]
        probs = tl.where(chosen, -1.0, probs)  # probabilities are >= 0: out of the race
        counts += tl.sum((chosen & t_mask[:, None]).to(tl.int32), axis=0)
    if RENORM:
        top_w = tl.math.div_rn(top_w, total[:, None])
    out = toks[:, None].to(tl.int64) * K + slots[None, :]
    o_mask = t_mask[:, None] & (slots[None, :] < K)
    tl.store(ids_ptr + out, top_i, mask=o_mask)
    tl.store(weights_ptr + out, top_w, mask=o_mask)
    tl.store(counts_ptr + chunk * E + experts, counts, mask=e_mask)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_entries, E: tl.constexpr, E_BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr, CHUNK_BLOCK: tl.constexpr):
    # the route kernel's counts, for top-k ids computed elsewhere
    chunk = tl.program_id(0)
    local = tl.arange(0, CHUNK_BLOCK)
    offs = chunk * CHUNK + local
    valid = (local < CHUNK) & (offs < num_entries)
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    experts = tl.arange(0, E_BLOCK)
    tl.store(counts_ptr + chunk * E + experts, _chunk_counts(ids, valid, experts),
             mask=experts < E)


@triton.jit
def _scan_kernel(counts_ptr, num_chunks, E: tl.constexpr, E_BLOCK: tl.constexpr,
                 ROWS: tl.constexpr):
    # counts: [num_chunks + 1, E] in place: row c <- sum of rows < c; last row <- totals
    experts = tl.arange(0, E_BLOCK)
    e_mask = experts < E
    running = tl.zeros((E_BLOCK,), tl.int32)
    for r0 in range(0, num_chunks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ptrs = counts_ptr + rows[:, None].to(tl.int64) * E + experts[None, :]
        mask = (rows[:, None] < num_chunks) & e_mask[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)  # [ROWS, E_BLOCK]
        tl.store(ptrs, running[None, :] + tl.cumsum(tile, axis=0) - tile, mask=mask)
        running += tl.sum(tile, axis=0)
    tl.store(counts_ptr + num_chunks * E + experts, running, mask=e_mask)


@triton.jit
def _align_kernel(ids_ptr, counts_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr,
                  num_entries, num_chunks, max_blocks, E: tl.constexpr, E_BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr, CHUNK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                  SCANNED: tl.constexpr, ROWS: tl.constexpr, TILE_B: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_BLOCK)
    e_mask = experts < E
    # base: this chunk's entries earlier in each expert's run; total: entries per expert
    if SCANNED:
        base = tl.load(counts_ptr + chunk * E + experts, mask=e_mask, other=0)
        total = tl.load(counts_ptr + num_chunks * E + experts, mask=e_mask, other=0)
    else:  # few chunks: every program sums the rows itself
        base = tl.zeros((E_BLOCK,), tl.int32)
        total = tl.zeros((E_BLOCK,), tl.int32)
        for r0 in range(0, num_chunks, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            mask = (rows[:, None] < num_chunks) & e_mask[None, :]
            tile = tl.load(counts_ptr + rows[:, None] * E + experts[None, :], mask=mask, other=0)
            total += tl.sum(tile, axis=0)
            base += tl.sum(tl.where(rows[:, None] < chunk, tile, 0), axis=0)
    padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
    run_end = tl.cumsum(padded, axis=0)  # [E_BLOCK]: end of each expert's padded run
    run_start = run_end - padded
    # this chunk's entries: rank among the chunk's entries of the same expert, in order
    local = tl.arange(0, CHUNK_BLOCK)
    offs = chunk * CHUNK + local
    valid = (local < CHUNK) & (offs < num_entries)
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    onehot = ((ids[:, None] == experts[None, :]) & valid[:, None]).to(tl.int32)  # [C, E_BLOCK]
    place = tl.cumsum(onehot, axis=0) - 1 + (run_start + base)[None, :]
    dest = tl.sum(onehot * place, axis=1)
    tl.store(sorted_ptr + dest, offs, mask=valid)
    if chunk == 0:
        # padding rows of each run (fewer than BLOCK_M) get the sentinel
        pad = tl.arange(0, BLOCK_M)
        pad_mask = e_mask[:, None] & (pad[None, :] < (padded - total)[:, None])
        tl.store(sorted_ptr + (run_start + total)[:, None] + pad[None, :],
                 tl.zeros((E_BLOCK, BLOCK_M), tl.int32) + num_entries, mask=pad_mask)
        # expert of each block of BLOCK_M rows (E past the last run)
        for b0 in range(0, max_blocks, TILE_B):
            blocks = b0 + tl.arange(0, TILE_B)
            ended = (run_end[None, :] <= blocks[:, None] * BLOCK_M) & e_mask[None, :]
            tl.store(expert_ids_ptr + blocks, tl.sum(ended.to(tl.int32), axis=1),
                     mask=blocks < max_blocks)
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr,
                     topk_w_ptr, num_entries, N, K_DIM, stride_am, stride_we, stride_wn,
                     stride_om, up_off, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr,
                     SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                     LIBDEVICE: tl.constexpr):
    """out[entry, n] for the BLOCK_M sorted entries of one expert and BLOCK_N outputs.

    A row of an entry is entry // A_ROW_DIV (x's token for the gated GEMM, the entry's own
    row of inter for the down GEMM). Weights w: [E, rows, K_DIM], K_DIM contiguous; gated:
    output n takes gate row n and up row N + n, up_off = N * stride_wn elements on."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    m_block = pid // num_n
    n_block = pid % num_n
    if m_block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + m_block).to(tl.int64)
    entry = tl.load(sorted_ptr + m_block * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    valid = entry < num_entries
    rows = (entry // A_ROW_DIV).to(tl.int64)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # a: [BLOCK_M, BLOCK_K] gathered rows; b: [BLOCK_K, BLOCK_N] = w[e, n, k] transposed
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        k_mask = offs_k + k0 < K_DIM
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & n_mask[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if GATED:
            b_up = tl.load(b_ptrs + up_off, mask=b_mask, other=0.0)
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    res = acc.to(dtype).to(tl.float32)  # the projection's output, rounded as torch's
    if GATED:
        act = tl.math.div_rn(res, 1.0 + _exp(-res, LIBDEVICE)).to(dtype).to(tl.float32)
        res = act * acc_up.to(dtype).to(tl.float32)
    if SCALE:
        res = res * tl.load(topk_w_ptr + entry, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + entry[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, res.to(dtype), mask=valid[:, None] & n_mask[None, :])


# ---- host side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeKernelConfig:
    """Tiles of the grouped GEMMs. block_m is also the alignment of each expert's rows."""

    block_m: int = 16
    block_n_gated: int = 32
    block_n_down: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n_gated", "block_n_down", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def default_moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoeKernelConfig:
    """Tiles by the mean rows per expert (a function of shapes only: graph-safe)."""
    if interpreting():  # small tiles: tiny tests still span several blocks and K steps
        return MoeKernelConfig(16, 16, 16, 16, 1, 1)
    # Thresholds from bench/moe_kernel.py's sweep on an H100 (moe_kernel-h100.json): the
    # narrow tiles win only while most experts get a handful of rows; Mixtral at 64 tokens
    # (16 rows each) is 11% faster with block_m 64, and from ~128 rows an expert the
    # 128-row tiles on 8 warps are 1.1x (Qwen3-MoE) to 1.7x (Mixtral) faster than 64.
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 8:  # decode: weight streaming, many narrow programs
        return MoeKernelConfig(16, 32, 64, 128, 4, 4)
    if per_expert <= 96:
        return MoeKernelConfig(64, 64, 128, 64, 4, 3)
    return MoeKernelConfig(128, 64, 128, 64, 8, 3)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@dataclass(frozen=True)
class _Plan:
    """Sizes of one call, all from (tokens, top_k, experts, block_m)."""

    num_entries: int
    chunk_tokens: int
    num_chunks: int
    max_padded: int
    max_blocks: int


def _plan(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> _Plan:
    entries = num_tokens * top_k
    # a chunk's one-hot [entries, experts] stays ~8k elements; the interpreter: tiny
    # chunks, so small tests cover several chunks and the scan
    budget = 64 if interpreting() else 8192
    chunk_tokens = max(1, budget // (_pow2(top_k) * _pow2(num_experts)))
    max_padded = entries + min(num_experts, entries) * (block_m - 1)
    return _Plan(entries, chunk_tokens, triton.cdiv(num_tokens, chunk_tokens), max_padded,
                 triton.cdiv(max_padded, block_m))


def _check_route_inputs(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"router logits must be [tokens, experts] with unit last stride, "
                         f"got {tuple(logits.shape)}")
    if not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"top_k must be in [1, {logits.shape[1]}], got {top_k}")


def _route(logits: torch.Tensor, top_k: int, renormalize: bool, plan: _Plan):
    """-> (weights fp32 [T, k], ids int32 [T, k], counts int32 [num_chunks + 1, E])."""
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    counts = torch.empty(plan.num_chunks + 1, num_experts, dtype=torch.int32, device=logits.device)
    if num_tokens:
        _route_kernel[(plan.num_chunks,)](
            logits, ids, weights, counts, num_tokens, logits.stride(0), E=num_experts,
            E_BLOCK=_pow2(num_experts), K=top_k, K_BLOCK=_pow2(top_k), TOK=plan.chunk_tokens,
            RENORM=renormalize, LIBDEVICE=not interpreting(), num_warps=4)
    return weights, ids, counts


def route_topk(logits: torch.Tensor, top_k: int,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (fp32), top-k, optional renormalization, in one kernel.

    logits: [T, E] -> (weights fp32 [T, k], ids int32 [T, k]), slots in descending weight."""
    _check_route_inputs(logits, top_k)
    plan = _plan(logits.shape[0], top_k, logits.shape[1], 16)
    weights, ids, _ = _route(logits, top_k, renormalize, plan)
    return weights, ids


def _count(topk_ids: torch.Tensor, num_experts: int, plan: _Plan) -> torch.Tensor:
    counts = torch.empty(plan.num_chunks + 1, num_experts, dtype=torch.int32,
                         device=topk_ids.device)
    chunk = plan.chunk_tokens * topk_ids.shape[1]
    _count_kernel[(plan.num_chunks,)](topk_ids, counts, plan.num_entries, E=num_experts,
                                      E_BLOCK=_pow2(num_experts), CHUNK=chunk,
                                      CHUNK_BLOCK=_pow2(chunk), num_warps=4)
    return counts


def _align(topk_ids: torch.Tensor, counts: torch.Tensor, num_experts: int, block_m: int,
           plan: _Plan, scan: bool | None = None):
    """-> (sorted_ids int32 [max_padded], expert_ids int32 [max_blocks], num_padded int32 [1])."""
    dev = topk_ids.device
    sorted_ids = torch.empty(plan.max_padded, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(plan.max_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    e_block = _pow2(num_experts)
    rows = max(1, 4096 // e_block)
    if scan is None:  # few chunks: each program sums the counts itself, one launch fewer
        scan = plan.num_chunks > 4 * rows
    if scan:
        _scan_kernel[(1,)](counts, plan.num_chunks, E=num_experts, E_BLOCK=e_block, ROWS=rows,
                           num_warps=4)
    chunk = plan.chunk_tokens * topk_ids.shape[1]
    _align_kernel[(plan.num_chunks,)](
        topk_ids, counts, sorted_ids, expert_ids, num_padded, plan.num_entries,
        plan.num_chunks, plan.max_blocks, E=num_experts, E_BLOCK=e_block, CHUNK=chunk,
        CHUNK_BLOCK=_pow2(chunk), BLOCK_M=block_m, SCANNED=scan, ROWS=rows,
        TILE_B=min(256, _pow2(plan.max_blocks)), num_warps=8 if chunk * e_block > 4096 else 4)
    return sorted_ids, expert_ids, num_padded


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                     scan: bool | None = None):
    """Sort (token, slot) entries by expert, each expert's run padded to block_m.

    topk_ids: int32 [T, k] contiguous. Returns sorted_ids int32 [max_padded] (flat entry
    token * k + slot, or the sentinel T*k on padding; past num_padded: unset), expert_ids
    int32 [max_blocks] (E past the end) and num_padded int32 [1]. scan forces (True) or
    skips (False) the separate prefix-scan launch; by default it runs for many chunks."""
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous():
        raise ValueError("topk_ids must be a contiguous int32 [tokens, top_k] tensor")
    plan = _plan(topk_ids.shape[0], topk_ids.shape[1], num_experts, block_m)
    if plan.num_entries == 0:
        raise ValueError("no tokens to align")
    counts = _count(topk_ids, num_experts, plan)
    return _align(topk_ids, counts, num_experts, block_m, plan, scan)


def _check_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [tokens, hidden] with unit last stride, got {tuple(x.shape)}")
    num_experts, two_inter, hidden = w13.shape
    if w2.shape != (num_experts, hidden, two_inter // 2) or two_inter % 2 or x.shape[1] != hidden:
        raise ValueError(f"expert weights w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not "
                         f"fit x {tuple(x.shape)} ([E, 2I, H] and [E, H, I])")
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("expert weights need unit stride along their last dim")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"expert weights ({w13.dtype}, {w2.dtype}) must have x's dtype {x.dtype}")


def _gemm(a, w, out, sorted_ids, expert_ids, num_padded, topk_w, plan: _Plan, n: int,
          row_div: int, gated: bool, block_n: int, cfg: MoeKernelConfig) -> None:
    grid = (plan.max_blocks * triton.cdiv(n, block_n),)
    _moe_gemm_kernel[grid](
        a, w, out, sorted_ids, expert_ids, num_padded, topk_w, plan.num_entries, n,
        a.shape[1], a.stride(0), w.stride(0), w.stride(1), out.stride(0), n * w.stride(1),
        A_ROW_DIV=row_div,
        GATED=gated, SCALE=not gated, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
        BLOCK_K=cfg.block_k, UPCAST=interpreting(), DOT_PREC=dot_precision(a.dtype),
        LIBDEVICE=not interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _experts(x, w13, w2, topk_weights, topk_ids, counts, plan: _Plan, cfg: MoeKernelConfig):
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = w2.shape[2]
    sorted_ids, expert_ids, num_padded = _align(topk_ids, counts, w13.shape[0], cfg.block_m, plan)
    h = torch.empty(plan.num_entries, inter, dtype=x.dtype, device=x.device)  # [T*k, I]
    _gemm(x, w13, h, sorted_ids, expert_ids, num_padded, topk_weights, plan, inter, top_k,
          True, cfg.block_n_gated, cfg)
    out_k = torch.empty(plan.num_entries, hidden, dtype=x.dtype, device=x.device)  # [T*k, H]
    _gemm(h, w2, out_k, sorted_ids, expert_ids, num_padded, topk_weights, plan, hidden, 1,
          False, cfg.block_n_down, cfg)
    # [T, k, H] -> [T, H]: fp32 accumulation, one rounding
    return out_k.view(num_tokens, top_k, hidden).sum(dim=1)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  config: MoeKernelConfig | None = None) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for routing done elsewhere.

    x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I];
    topk_weights: fp32 [T, k]; topk_ids: int [T, k] -> [T, H] in x's dtype."""
    _check_experts(x, w13, w2)
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk ids {tuple(topk_ids.shape)} / weights "
                         f"{tuple(topk_weights.shape)} do not match {x.shape[0]} tokens")
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return torch.empty_like(x)
    cfg = config or default_moe_config(num_tokens, top_k, w13.shape[0])
    plan = _plan(num_tokens, top_k, w13.shape[0], cfg.block_m)
    topk_ids = topk_ids.to(torch.int32).contiguous()
    topk_weights = topk_weights.to(torch.float32).contiguous()
    counts = _count(topk_ids, w13.shape[0], plan)
    return _experts(x, w13, w2, topk_weights, topk_ids, counts, plan, cfg)


def fused_moe_block(x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, top_k: int, renormalize: bool,
                    config: MoeKernelConfig | None = None) -> torch.Tensor:
    """The whole sparse MoE block: x [T, H], router gate_weight [E, H] -> [T, H]."""
    _check_experts(x, w13, w2)
    if gate_weight.shape != (w13.shape[0], x.shape[1]):
        raise ValueError(f"router weight {tuple(gate_weight.shape)} does not fit "
                         f"{w13.shape[0]} experts of width {x.shape[1]}")
    logits = F.linear(x, gate_weight)  # [T, E] in x's dtype, as transformers rounds it
    _check_route_inputs(logits, top_k)
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return torch.empty_like(x)
    cfg = config or default_moe_config(num_tokens, top_k, w13.shape[0])
    plan = _plan(num_tokens, top_k, w13.shape[0], cfg.block_m)
    weights, ids, counts = _route(logits, top_k, renormalize, plan)
    return _experts(x, w13, w2, weights, ids, counts, plan, cfg)
