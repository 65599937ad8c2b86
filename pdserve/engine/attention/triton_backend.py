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

    Dense prefill. A step that is one whole prompt with nothing cached before it, of
    ``dense_prefill_min_tokens`` tokens or more, has its K/V contiguous in k and v: it
    runs torch's cuDNN attention on them (1.2x the paged kernel at 4k tokens, 1.4x at
    8k on an H100; equal at 2k: bench/prefill_dense.py; the engine's default is 3,072).
    The paged kernel serves every other prefill (batches, prefix hits, later chunks).
    0 turns it off. Windowed or soft-capped layers always take the paged kernel. A mixed
    step (decode rows first, then prompt chunks: the model runner orders it so) runs as
    two batches: the decode rows through the decode kernel, the chunks as above (a whole
    prompt among decode rows also takes cuDNN).

    Sliding window and soft cap (per layer, fixed for the model's lifetime) are launch
    arguments: graph-safe. A windowed layer's decode split count is chosen for a context
    of at most its window (the same for every replay of one batch size).
    """

    name = "triton"
    splits_mixed_batches = True

    def __init__(self, graph_max_seq_len: int | None = None, decode_splits: int | None = None,
                 dense_prefill_min_tokens: int = 0):
        self.graph_max_seq_len = graph_max_seq_len
        self.decode_splits = decode_splits
        self.dense_prefill_min_tokens = dense_prefill_min_tokens

    def num_splits_for(self, meta: AttentionMetadata, num_kv_heads: int,
                       device: torch.device, sliding_window: int = 0) -> int:
        if self.decode_splits is not None:
            return self.decode_splits
        bound = self.graph_max_seq_len if self.graph_max_seq_len is not None else meta.max_seq_len
        return choose_num_splits(meta.num_seqs, num_kv_heads, bound, device_sms(device),
                                 sliding_window)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)  # one launch of num_tokens programs

    def attend_stored(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                      sliding_window: int = 0, logits_soft_cap: float = 0.0, out=None):
        # q: [num_tokens, num_heads, d]; k, v: [num_tokens, kv_heads, d]
        split = None if meta.is_decode_only else meta.split_decodes()
        if split is None:
            return self._attend(q, k, v, k_cache, v_cache, meta, scale, sliding_window,
                                logits_soft_cap, out)
        # a mixed step: its decode rows through the decode kernel (split over long
        # contexts; the prefill kernel would give each a 1-row query block per head)
        decode, chunks = split
        d = decode.num_seqs
        out = torch.empty_like(q) if out is None else out
        self._attend(q[:d], k[:d], v[:d], k_cache, v_cache, decode, scale, sliding_window,
                     logits_soft_cap, out[:d])
        self._attend(q[d:], k[d:], v[d:], k_cache, v_cache, chunks, scale, sliding_window,
                     logits_soft_cap, out[d:])
        return out

    def _attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int, logits_soft_cap: float, out: torch.Tensor | None = None):
        """Attention of one batch whose K/V are already in the cache, into out if given."""
        if meta.is_decode_only:
            splits = self.num_splits_for(meta, k_cache.shape[2], q.device, sliding_window)
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                          meta.query_start_loc, scale, meta.max_seq_len,
                                          num_splits=splits, out=out,
                                          sliding_window=sliding_window,
                                          logits_soft_cap=logits_soft_cap)
        if (self._dense(meta) and q.dtype in (torch.float16, torch.bfloat16)
                and logits_soft_cap <= 0 and not 0 < sliding_window < meta.max_seq_len):
            dense = dense_causal_attention(q, k, v, scale)
            return dense if out is None else out.copy_(dense)
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                       meta.query_start_loc, meta.seq_lens, meta.max_query_len,
                                       scale, out=out, sliding_window=sliding_window,
                                       logits_soft_cap=logits_soft_cap)

    def _dense(self, meta: AttentionMetadata) -> bool:
        """One sequence, all of it new (host ints: a padded graph step never qualifies)."""
        return (0 < self.dense_prefill_min_tokens <= meta.max_query_len and meta.num_seqs == 1
                and meta.seq_lens_cpu[0] == meta.query_lens_cpu[0])


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Causal attention of one sequence over itself with torch's cuDNN backend.
    q: [n, heads, d]; k, v: [n, kv_heads, d] -> [n, heads, d]"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    # [1, heads, n, d]; GQA by repeating K/V heads (cuDNN takes no grouped heads)
    qh = q.transpose(0, 1)[None]
    kh = k.transpose(0, 1).repeat_interleave(group, dim=0)[None]
    vh = v.transpose(0, 1).repeat_interleave(group, dim=0)[None]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                               scale=scale)
    return out[0].transpose(0, 1)
