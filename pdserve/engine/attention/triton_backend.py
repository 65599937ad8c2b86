"""Attention backend on the Triton paged kernels (pdserve/engine/kernels)."""

from __future__ import annotations

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.kernels import (choose_num_splits, paged_decode_attention,
                                    paged_prefill_attention, store_kv)
from pdserve.engine.kernels._common import device_sms


class TritonAttentionBackend(AttentionBackend):
    """Store kernel, then split-KV decode (all queries of length 1) or paged prefill.

    Neither path synchronizes the host; grids come from host ints in the metadata.

    CUDA graphs. A decode step's launch shape is (num_seqs, kv_heads, num_splits); the
    split count must stay the same between capture and replay, so it may not follow the
    step's max_seq_len. Construct the backend with ``graph_max_seq_len`` set to the
    longest context the captured graphs must serve (e.g. the model's max length): the
    decode split count is then ``choose_num_splits(num_seqs, kv_heads,
    graph_max_seq_len, SMs)``, a function of the batch size alone, and each sequence
    divides its own context among those splits on the device (short sequences leave
    splits empty; that is correct, only slightly wasteful). ``decode_splits`` forces one
    count for every batch size instead. Without either, eager decode picks splits from
    ``meta.max_seq_len``. Padded batch slots are safe: a sequence with seq_len 0 or no
    query writes no NaN (outputs 0 or nothing). The decode path allocates its fp32
    split workspace with torch.empty, which graph capture serves from its private pool.
    ``num_splits_for(meta, num_kv_heads, device)`` tells which count a step will use.
    """

    name = "triton"

    def __init__(self, graph_max_seq_len: int | None = None, decode_splits: int | None = None):
        self.graph_max_seq_len = graph_max_seq_len
        self.decode_splits = decode_splits

    def num_splits_for(self, meta: AttentionMetadata, num_kv_heads: int,
                       device: torch.device) -> int:
        if self.decode_splits is not None:
            return self.decode_splits
        bound = self.graph_max_seq_len if self.graph_max_seq_len is not None else meta.max_seq_len
        return choose_num_splits(meta.num_seqs, num_kv_heads, bound, device_sms(device))

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        # q: [num_tokens, num_heads, d]; k, v: [num_tokens, kv_heads, d]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            splits = self.num_splits_for(meta, k_cache.shape[2], q.device)
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                          meta.query_start_loc, scale, meta.max_seq_len,
                                          num_splits=splits)
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                       meta.query_start_loc, meta.seq_lens, meta.max_query_len,
                                       scale)
