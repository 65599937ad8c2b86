"""Attention-backend seam: the model calls one backend per step for every layer.

Tokens of all sequences in a step are flattened into one varlen batch (vLLM-style):
sequence i owns new tokens query_start_loc[i]:query_start_loc[i+1], which sit at the end
of its context of seq_lens[i] tokens. Context tokens live in the paged KV cache
(docs/architecture.md, "KV layout"): slot = block * block_size + offset, block ids from block_tables.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


TABLE_WIDTH_MULTIPLE = 16


def table_width(num_blocks: int) -> int:
    """Block-table columns for rows of up to num_blocks blocks: a multiple of 16, so the
    kernels always see a table row stride of one Triton specialization (Triton compiles
    a kernel again for an int argument of 1 or one not divisible by 16, on the first
    step that has it: a stall in the middle of serving)."""
    return max(1, -(-num_blocks // TABLE_WIDTH_MULTIPLE)) * TABLE_WIDTH_MULTIPLE


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

    # (decode part, chunk part) of a mixed batch, built once per step (see split_decodes)
    _split: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def split_decodes(self) -> tuple["AttentionMetadata", "AttentionMetadata"] | None:
        """A mixed batch whose first sequences have one query each (decode rows; the
        model runner puts them first) as two batches: those rows, for a decode kernel
        that splits long contexts, and the prompt chunks after them, with their query
        offsets rebased to 0. None when the batch is not of that form. Host ints only:
        no device sync; the slices and the rebased offsets are made once per step."""
        if self._split is None:
            self._split = (self._make_split(),)
        return self._split[0]

    def _make_split(self):
        num_decodes = next((i for i, n in enumerate(self.query_lens_cpu) if n != 1),
                           self.num_seqs)
        if num_decodes == 0 or num_decodes == self.num_seqs:
            return None
        d = num_decodes
        decode = AttentionMetadata(
            slot_mapping=self.slot_mapping[:d], query_start_loc=self.query_start_loc[:d + 1],
            seq_lens=self.seq_lens[:d], block_tables=self.block_tables[:d], max_query_len=1,
            max_seq_len=max(self.seq_lens_cpu[:d]), query_lens_cpu=self.query_lens_cpu[:d],
            seq_lens_cpu=self.seq_lens_cpu[:d])
        chunks = AttentionMetadata(
            slot_mapping=self.slot_mapping[d:], query_start_loc=self.query_start_loc[d:] - d,
            seq_lens=self.seq_lens[d:], block_tables=self.block_tables[d:],
            max_query_len=self.max_query_len, max_seq_len=max(self.seq_lens_cpu[d:]),
            query_lens_cpu=self.query_lens_cpu[d:], seq_lens_cpu=self.seq_lens_cpu[d:])
        return decode, chunks


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and attends over each sequence's context."""

    name: str = "abstract"
    # True: a mixed step's decode rows are attended apart from its prompt chunks when they
    # come first (AttentionMetadata.split_decodes), so the model runner puts them first
    splits_mixed_batches: bool = False

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
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend_stored(q, k, v, k_cache, v_cache, meta, scale, sliding_window,
                                  logits_soft_cap)

    @abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Writes k/v rows [num_tokens, num_kv_heads, head_dim] at slot_mapping
        ([num_tokens] int64; -1 skipped). For fixed shapes a GPU backend must queue the
        same work on every call: piecewise graphs capture it with the slots in a static
        buffer (padding rows -1)."""

    @abstractmethod
    def attend_stored(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, sliding_window: int = 0, logits_soft_cap: float = 0.0,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """forward's attention once this step's K/V are in the cache (k, v are the same
        rows, for backends that attend over them directly). Writes into out
        ([num_tokens, num_heads, head_dim]) when given and returns it. Must not
        synchronize the host with the device."""
