"""CUDA graphs for decode steps (one per padded batch size) and for single-sequence
prefill chunks (one per padded token count).

A decode step launches hundreds of small kernels; replaying a captured graph removes
the per-launch host cost (batch-1 decode of an 8B model is otherwise launch-bound).
Inputs live in static buffers sized for the largest batch; a batch of n runs the graph
of the next captured size >= n with the extra rows padded: slot -1 (nothing stored) and
seq_len 0 (the decode kernel writes zeros, never NaN). Graphs are captured lazily the
first time a size is needed. Requires an attention backend that never syncs the host
and whose launch shapes depend only on the batch size (TritonAttentionBackend with
graph_max_seq_len).

A step that computes one chunk of one sequence (a lone prompt: the TTFT path of a
serving worker) launches as many kernels as a decode step but is too short to hide
them: eager, a 512-token prefill of an 8B model waits on the host (~350 launches). It
replays a PrefillGraphs graph when its chunk fits a captured token count: rows past the
chunk are padding (slot -1: not stored; position 0), the chunk's length, context length
and last row are device values, and the prefill kernel's grid depends on the padded
count alone (blocks past the real queries return at once). Padded rows compute garbage
that no real row reads: attention reads K/V from the cache only, every other op works
row by row.
"""

from __future__ import annotations

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata, table_width

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Steps of 64 tokens or more pad by at most 25% (the padded rows' GEMM work is real
# work). At 2k tokens an 8B prefill is device-bound, yet queueing it eagerly takes the
# host 14-26 ms of a 48 ms step: gRPC work on the same GIL early in the step (a serving
# worker's next call arriving) then leaves the device idle; a replay frees the host at once.
PREFILL_CAPTURE_SIZES = (16, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512,
                         640, 768, 896, 1024, 1280, 1536, 1792, 2048)
# Piecewise graphs (engine/piecewise.py) serve mixed steps of any token count, e.g. 16
# decode rows beside a 1,024-token chunk: past 512 tokens a step is compute-bound, so
# they pad by at most 64 tokens there (H100, Llama-3-8B: 1,040 tokens padded to 1,280
# cost 8% over eager). Each size adds ~0.17 s of capture at start-up.
PIECEWISE_CAPTURE_SIZES = tuple(s for s in PREFILL_CAPTURE_SIZES if s <= 512) + \
    tuple(range(576, 2049, 64))


class _CapturedGraphs:
    """One graph per padded size, captured on first use (or all at once), sharing one
    memory pool. Subclasses own the static input buffers: _clear_inputs() makes them
    touch nothing, _forward(size) runs the model on them and returns the output."""

    def __init__(self, model, pool, backend: AttentionBackend, sizes: list[int],
                 max_model_len: int, memory_pool=None) -> None:
        self.model, self.pool, self.backend = model, pool, backend
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.memory_pool = memory_pool or torch.cuda.graph_pool_handle()

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size now (a worker's start-up) on inputs that touch nothing."""
        self._clear_inputs()
        for size in self.sizes:
            if size not in self.graphs:
                self.graphs[size] = capture(self._forward, size, self.memory_pool)

    def _replay(self, size: int) -> torch.Tensor:
        """Replay the graph of `size` (captured now if new) on the staged inputs."""
        if size not in self.graphs:
            self.graphs[size] = capture(self._forward, size, self.memory_pool)
        graph, out = self.graphs[size]
        graph.replay()
        return out

    def _clear_inputs(self) -> None:
        raise NotImplementedError

    def _forward(self, size: int) -> torch.Tensor:
        raise NotImplementedError


class DecodeGraphs(_CapturedGraphs):
    def __init__(self, model, pool, backend: AttentionBackend, max_batch: int,
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        super().__init__(model, pool, backend,
                         [s for s in CAPTURE_SIZES if s < max_batch] + [max_batch],
                         max_model_len)
        max_blocks = table_width(-(-max_model_len // block_size))
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)

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
        return self._replay(size)[:n]

    def _clear_inputs(self) -> None:
        # slot -1 stores nothing, seq_len 0 reads nothing
        self.slots.fill_(-1)
        self.seq_lens.zero_()

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


class PrefillGraphs(_CapturedGraphs):
    def __init__(self, model, pool, backend: AttentionBackend, max_tokens: int,
                 max_model_len: int, block_size: int, device: torch.device,
                 memory_pool=None) -> None:
        super().__init__(model, pool, backend,
                         [s for s in PREFILL_CAPTURE_SIZES if s <= max_tokens],
                         max_model_len, memory_pool)
        n = self.sizes[-1] if self.sizes else 0
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.query_start = torch.zeros(2, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(1, dtype=torch.int32, device=device)
        self.last_row = torch.zeros(1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(1, table_width(-(-max_model_len // block_size)),
                                        dtype=torch.int32, device=device)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            seq_len: int, block_table: torch.Tensor) -> torch.Tensor:
        """One chunk of n tokens of one sequence (host tensors); returns the logits of
        its last token: [1, vocab] fp32."""
        size = self.padded_size(ids.shape[0])
        self._stage(ids, positions, slots, seq_len, block_table, size)
        return self._replay(size)

    def _clear_inputs(self) -> None:
        # an empty chunk: no query, nothing stored
        self.slots.fill_(-1)
        self.query_start.zero_()
        self.seq_lens.zero_()
        self.last_row.zero_()

    def _stage(self, ids, positions, slots, seq_len: int, table, size: int) -> None:
        n = ids.shape[0]
        self.input_ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.positions[n:size].fill_(0)
        self.slots[n:size].fill_(-1)
        # one host tensor for the scalars: [n, seq_len, n - 1]
        scalars = torch.tensor([n, seq_len, n - 1], dtype=torch.int64).to(
            self.last_row.device, non_blocking=True)
        self.query_start[1:].copy_(scalars[:1])
        self.seq_lens.copy_(scalars[1:2])
        self.last_row.copy_(scalars[2:])
        self.block_tables[:, :table.shape[1]].copy_(table, non_blocking=True)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size], query_start_loc=self.query_start,
            seq_lens=self.seq_lens, block_tables=self.block_tables,
            max_query_len=size, max_seq_len=self.max_model_len,
            query_lens_cpu=[size], seq_lens_cpu=[self.max_model_len])

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.pool,
                            self.backend, self._meta(size))
        return self.model.compute_logits(hidden.index_select(0, self.last_row))


def capture(forward, size: int, memory_pool):
    """Run forward(size) once outside the capture (compiles kernels, allocates), then
    capture it; returns (graph, its output tensor)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(size)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=memory_pool):
        out = forward(size)
    return graph, out
