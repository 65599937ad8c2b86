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
    starts = meta.query_start_loc.tolist()
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len == 0:
            continue
        s = starts[i]
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
    return out


def decode_attention_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences have one query: gather contexts padded to the longest, one SDPA call."""
    num_seqs, num_heads = q.shape[0], q.shape[1]
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    max_blocks = (meta.max_seq_len + block_size - 1) // block_size
    table = meta.block_tables[:, :max_blocks].long()  # [B, nb]
    keys = k_cache[table].reshape(num_seqs, -1, num_kv_heads, head_dim)  # [B, L, kvh, d]
    values = v_cache[table].reshape(num_seqs, -1, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    # [B, kvh, group, 1, d] x [B, kvh, 1, L, d]: GQA without repeating K/V
    qg = q.view(num_seqs, num_kv_heads, group, 1, head_dim)
    kg = keys.transpose(1, 2).unsqueeze(2).to(q.dtype)
    vg = values.transpose(1, 2).unsqueeze(2).to(q.dtype)
    positions = torch.arange(keys.shape[1], device=q.device)
    mask = positions[None, :] < meta.seq_lens[:, None]  # [B, L]
    mask = mask[:, None, None, None, :]
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    return o.reshape(num_seqs, num_heads, head_dim)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only and meta.num_seqs > 1:
            return decode_attention_padded(q, k_cache, v_cache, meta, scale)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
