"""Attention-backend seam: the model calls one backend per step for every layer.

Tokens of all sequences in a step are flattened into one varlen batch (vLLM-style):
sequence i owns new tokens query_start_loc[i]:query_start_loc[i+1], which sit at the end
of its context of seq_lens[i] tokens. Context tokens live in the paged KV cache
(docs/architecture.md, "KV layout"): slot = block * block_size + offset, block ids from block_tables.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One step's batch layout. Tensors live on the model's device."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = do not store
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32; context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and attends over each sequence's context."""

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int = 0,
        logits_soft_cap: float = 0.0,
    ) -> torch.Tensor:
        """Called once per layer per step.

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], any strides.
        Writes k/v at meta.slot_mapping first, then each new query at position p of its
        sequence attends causally to context positions 0..p. GQA: query head h reads KV
        head h // (num_heads // num_kv_heads).

        sliding_window w > 0 (this layer's, fixed for the model's lifetime): the query at
        p sees only keys j with p - w < j <= p (w positions, itself included), as
        transformers' Mistral / Qwen2 / Gemma 2 masks do. Blocks wholly before the first
        visible key of a sequence's first new query must never be read: the scheduler
        may have returned them to the allocator (their block-table entries stay, stale).
        logits_soft_cap c > 0 (Gemma 2): scaled scores s = scale * q.k become
        c * tanh(s / c) before masking and softmax. 0 / 0.0 turn either off.
        Returns [num_tokens, num_heads, head_dim] in q's dtype. Must not synchronize
        the host with the device (the decode step is captured in a CUDA graph).
        """
