"""CUDA graphs for decode steps: one captured graph per padded batch size.

A decode step launches hundreds of small kernels; replaying a captured graph removes
the per-launch host cost (batch-1 decode of an 8B model is otherwise launch-bound).
Inputs live in static buffers sized for the largest batch; a batch of n runs the graph
of the next captured size >= n with the extra rows padded: slot -1 (nothing stored) and
seq_len 0 (the decode kernel writes zeros, never NaN). Graphs are captured lazily the
first time a size is needed. Requires an attention backend that never syncs the host
and whose launch shapes depend only on the batch size (TritonAttentionBackend with
graph_max_seq_len).
"""

from __future__ import annotations

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(self, model, pool, backend: AttentionBackend, max_batch: int,
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        self.model, self.pool, self.backend = model, pool, backend
        self.sizes = [s for s in CAPTURE_SIZES if s < max_batch] + [max_batch]
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.memory_pool = torch.cuda.graph_pool_handle()

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor,
            carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One decode step for n sequences; returns logits [n, vocab] (fp32). carry:
        (rows, token ids) already on the device that replace those rows' input ids."""
        n = ids.shape[0]
        size = self.padded_size(n)
        self._stage(ids, positions, slots, seq_lens, block_tables, size)
        if carry is not None:
            self.input_ids.index_copy_(0, *carry)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]

    def _stage(self, ids, positions, slots, seq_lens, tables, size: int) -> None:
        n, width = ids.shape[0], tables.shape[1]
        self.input_ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        if size > n:
            self.slots[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(0)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size], query_start_loc=self.query_start[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_lens_cpu=[1] * size, seq_lens_cpu=[self.max_model_len] * size)

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.pool,
                            self.backend, self._meta(size))
        return self.model.compute_logits(hidden)

    def _capture(self, size: int):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size)  # compiles kernels and allocates outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            logits = self._forward(size)
        return graph, logits
