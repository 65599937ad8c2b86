"""Plain-PyTorch paged attention: the reference every kernel is checked against.

Sliding window w > 0: a query at position p sees keys j with p - w < j <= p. Only the
blocks that hold such keys are gathered: blocks wholly before the window may have been
returned to the allocator (and reused by another sequence), so they are never read.
Soft cap c > 0: scaled scores s become c * tanh(s / c) before masking and softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v rows [num_tokens, kv_heads, d] into their cache slots; slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def first_visible_key(seq_len: int, query_len: int, sliding_window: int) -> int:
    """Lowest key position any of a sequence's new queries sees (0 without a window)."""
    if sliding_window <= 0:
        return 0
    return max(0, seq_len - query_len - sliding_window + 1)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                   first_block: int = 0) -> torch.Tensor:
    """One sequence's cached rows from block first_block on: [seq_len - first_block * bs,
    kv_heads, d]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    rows = cache[block_table[first_block:num_blocks].long()]  # [nb, bs, kvh, d]
    return rows.reshape(-1, *cache.shape[2:])[:seq_len - first_block * block_size]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, logits_soft_cap: float = 0.0) -> torch.Tensor:
    """Softmax attention. q: [..., Lq, d]; k, v: [..., Lk, d]; mask (True = visible)
    broadcasts to [..., Lq, Lk]. Soft-capped scores take the explicit path (SDPA has no
    cap), with a half-precision softmax done in fp32 as transformers' eager attention does."""
    if logits_soft_cap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., Lq, Lk]
    s = torch.tanh(s / logits_soft_cap) * logits_soft_cap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    wide = s.float() if s.element_size() < 4 else s  # half types: softmax in fp32
    p = torch.softmax(wide, dim=-1).to(v.dtype)
    return torch.matmul(p, v)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, sliding_window: int = 0,
                        logits_soft_cap: float = 0.0) -> torch.Tensor:
    """Causal (optionally windowed, soft-capped) attention of each sequence's new queries
    over its paged context."""
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    s = 0  # start row of sequence i (host ints: no device sync)
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len == 0:
            continue
        first_block = first_visible_key(seq_len, q_len, sliding_window) // block_size
        keys = gather_context(k_cache, meta.block_tables[i], seq_len, first_block)
        values = gather_context(v_cache, meta.block_tables[i], seq_len, first_block)
        # [heads, len, d], KV heads repeated for GQA
        qi = q[s:s + q_len].transpose(0, 1)
        ki = keys.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        vi = values.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        # query j sits at position seq_len - q_len + j and sees keys 0..that position
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(first_block * block_size, seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, keys]
        if sliding_window > 0:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        o = attend(qi, ki, vi, mask, scale, logits_soft_cap)
        out[s:s + q_len] = o.transpose(0, 1)
        s += q_len
    return out


def decode_attention_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, sliding_window: int = 0,
                            logits_soft_cap: float = 0.0) -> torch.Tensor:
    """All sequences have one query: gather contexts padded to the longest, one SDPA call."""
    plan = DecodePlan(meta, k_cache.shape[1], sliding_window)
    return decode_attention(q, k_cache, v_cache, plan, scale, logits_soft_cap)


class DecodePlan:
    """What every layer of a decode-only step with one window shares: block indexes and
    the padding mask, built once per step instead of once per layer.

    Without a window the context is blocks 0.. of the longest sequence. With window w
    each sequence gathers the fixed number of blocks any w consecutive positions can
    span, starting at the block of its first visible key (indexes computed on the
    device: no host sync)."""

    def __init__(self, meta: AttentionMetadata, block_size: int, sliding_window: int = 0) -> None:
        self.num_seqs = meta.num_seqs
        self.context = meta.max_seq_len
        self.mask = None  # [B, 1, 1, L]; None when every position is visible
        if sliding_window <= 0 or meta.max_seq_len <= sliding_window:  # window cuts nothing
            max_blocks = (meta.max_seq_len + block_size - 1) // block_size
            self.table = meta.block_tables[:, :max_blocks].long()  # [B, nb]
            if min(meta.seq_lens_cpu) < self.context:
                positions = torch.arange(self.context, device=meta.seq_lens.device)
                self.mask = _visible(positions[None, :], meta.seq_lens, 0)
            return
        span = (sliding_window + block_size - 2) // block_size + 1  # blocks w positions span
        seq_lens = meta.seq_lens.long()
        first = (seq_lens - sliding_window).clamp(min=0) // block_size  # [B]
        cols = first[:, None] + torch.arange(span, device=first.device)  # [B, span]
        cols = cols.clamp(max=meta.block_tables.shape[1] - 1)  # past the end: masked below
        self.table = meta.block_tables.gather(1, cols).long()  # [B, span]
        self.context = span * block_size
        positions = first[:, None] * block_size + torch.arange(self.context, device=first.device)
        self.mask = _visible(positions, seq_lens, sliding_window)


def _visible(positions: torch.Tensor, seq_lens: torch.Tensor, window: int) -> torch.Tensor:
    """positions: [B or 1, L] key positions -> [B, 1, 1, L], True where the query at
    seq_len - 1 sees the key."""
    visible = positions < seq_lens[:, None]
    if window > 0:
        visible &= positions >= seq_lens[:, None] - window
    return visible[:, None, None, :]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     plan: DecodePlan, scale: float, logits_soft_cap: float = 0.0) -> torch.Tensor:
    """One query per sequence. GQA without repeating K/V: the query heads of one KV head
    are that head's query rows, [B, kv_heads, group, d] x [B, kv_heads, L, d]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys = _gather(k_cache, plan).to(q.dtype)  # [B, kvh, L, d]
    values = _gather(v_cache, plan).to(q.dtype)
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = attend(qg, keys, values, plan.mask, scale, logits_soft_cap)
    return o.reshape(num_seqs, num_heads, head_dim)


def _gather(cache: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    rows = cache[plan.table]  # [B, nb, bs, kvh, d]
    rows = rows.reshape(plan.num_seqs, -1, *cache.shape[2:])[:, :plan.context]
    return rows.transpose(1, 2)


class StorePlan:
    """Cache addresses of a step's new K/V rows (slot -1 skipped), once per step."""

    def __init__(self, slot_mapping: torch.Tensor, block_size: int) -> None:
        keep = slot_mapping >= 0
        self.rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)
        slots = slot_mapping if self.rows is None else slot_mapping[self.rows]
        self.blocks, self.offsets = slots // block_size, slots % block_size

    def store(self, k, v, k_cache, v_cache) -> None:
        if self.rows is not None:
            k, v = k[self.rows], v[self.rows]
        k_cache.index_put_((self.blocks, self.offsets), k.to(k_cache.dtype))
        v_cache.index_put_((self.blocks, self.offsets), v.to(v_cache.dtype))


class TorchAttentionBackend(AttentionBackend):
    """Reference semantics; decode-only steps take a batched path whose per-step indexes
    are built at the first layer and reused by the others (keyed by the metadata object,
    which the model passes unchanged to every layer of one step; one plan per window
    size, as layers may differ)."""

    name = "torch"

    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._store: StorePlan | None = None
        self._decode: dict[int, DecodePlan] = {}

    def _plans(self, meta: AttentionMetadata, block_size: int, sliding_window: int):
        if meta is not self._meta:
            self._meta = meta
            self._store = StorePlan(meta.slot_mapping, block_size)
            self._decode = {}
        decode = None
        if meta.is_decode_only:
            decode = self._decode.get(sliding_window)
            if decode is None:
                decode = self._decode[sliding_window] = DecodePlan(meta, block_size,
                                                                   sliding_window)
        return self._store, decode

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, sliding_window: int = 0,
                logits_soft_cap: float = 0.0):
        store, _ = self._plans(meta, k_cache.shape[1], sliding_window)
        store.store(k, v, k_cache, v_cache)  # the step's addresses, built at its first layer
        return self.attend_stored(q, k, v, k_cache, v_cache, meta, scale, sliding_window,
                                  logits_soft_cap)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def attend_stored(self, q, k, v, k_cache, v_cache, meta, scale, sliding_window: int = 0,
                      logits_soft_cap: float = 0.0, out=None):
        _, decode = self._plans(meta, k_cache.shape[1], sliding_window)
        if decode is not None:
            result = decode_attention(q, k_cache, v_cache, decode, scale, logits_soft_cap)
        else:
            result = paged_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window,
                                         logits_soft_cap)
        return result if out is None else out.copy_(result)
