"""Plain-PyTorch paged attention: the reference every kernel is checked against."""

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


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's cached rows: [seq_len, kv_heads, d]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    rows = cache[block_table[:num_blocks].long()]  # [nb, bs, kvh, d]
    return rows.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged context."""
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    s = 0  # start row of sequence i (host ints: no device sync)
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len == 0:
            continue
        keys = gather_context(k_cache, meta.block_tables[i], seq_len)
        values = gather_context(v_cache, meta.block_tables[i], seq_len)
        # [heads, len, d], KV heads repeated for GQA
        qi = q[s:s + q_len].transpose(0, 1)
        ki = keys.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        vi = values.transpose(0, 1).repeat_interleave(group, dim=0).to(q.dtype)
        # query j sits at position seq_len - q_len + j and sees keys 0..that position
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[s:s + q_len] = o.transpose(0, 1)
        s += q_len
    return out


def decode_attention_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences have one query: gather contexts padded to the longest, one SDPA call."""
    return decode_attention(q, k_cache, v_cache, DecodePlan(meta, k_cache.shape[1]), scale)


class DecodePlan:
    """What every layer of a decode-only step shares: block indexes and the padding mask,
    built once per step instead of once per layer."""

    def __init__(self, meta: AttentionMetadata, block_size: int) -> None:
        self.num_seqs = meta.num_seqs
        self.context = meta.max_seq_len
        max_blocks = (meta.max_seq_len + block_size - 1) // block_size
        self.table = meta.block_tables[:, :max_blocks].long()  # [B, nb]
        self.mask = None  # [B, 1, 1, L]; None when every context is L long
        if min(meta.seq_lens_cpu) < self.context:
            positions = torch.arange(self.context, device=meta.seq_lens.device)
            self.mask = (positions[None, :] < meta.seq_lens[:, None])[:, None, None, :]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     plan: DecodePlan, scale: float) -> torch.Tensor:
    """One query per sequence. GQA without repeating K/V: the query heads of one KV head
    are that head's query rows, [B, kv_heads, group, d] x [B, kv_heads, L, d]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys = _gather(k_cache, plan).to(q.dtype)  # [B, kvh, L, d]
    values = _gather(v_cache, plan).to(q.dtype)
    qg = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=plan.mask, scale=scale)
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
    which the model passes unchanged to every layer of one step)."""

    name = "torch"

    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._store: StorePlan | None = None
        self._decode: DecodePlan | None = None

    def _plans(self, meta: AttentionMetadata, block_size: int):
        if meta is not self._meta:
            self._meta = meta
            self._store = StorePlan(meta.slot_mapping, block_size)
            self._decode = DecodePlan(meta, block_size) if meta.is_decode_only else None
        return self._store, self._decode

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        store, decode = self._plans(meta, k_cache.shape[1])
        store.store(k, v, k_cache, v_cache)
        if decode is not None:
            return decode_attention(q, k_cache, v_cache, decode, scale)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
