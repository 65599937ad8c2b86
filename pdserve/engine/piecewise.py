"""Piecewise CUDA graphs: a step of any layout (decode rows beside prompt chunks, several
chunks, several sequences) in one pass over the weights, with few host launches.

Everything but attention works row by row, so it can be captured once per padded token
count and replayed for any layout of that many tokens. Attention depends on the layout
(how many sequences, how long): it runs eagerly between the pieces, on the step's real
rows, with the step's own metadata (so the backend's mixed-batch split, its decode kernel
and cuDNN for whole prompts all apply). A model of L layers has L + 1 pieces per size:

    piece 0       embed; layer 0's input norm and q/k/v (normed, rotated), its K/V
                  stored into the cache
    piece i       layer i-1's o_proj and MLP (residual adds fused into the norms);
                  layer i's input norm, q/k/v and K/V store
    piece L       layer L-1's o_proj and MLP; the final norm

Between pieces only the attention kernels run eagerly (the backend's attend_stored),
writing straight into the buffer the next piece reads. Pieces pass data through static
buffers allocated outside the graphs: token ids, positions, cache slots, the residual
stream, q, k, v, the attention output and the final hidden state. Rows past the step's
tokens are padding (token 0, position 0, slot -1: stored nowhere, stale values
elsewhere): computed, never read, since attention reads the real rows and the cache.

Against the model runner's other way for mixed steps (a decode graph for the decode rows
plus a prefill graph per chunk, each replay reading every weight), the weights are read
once per step; against an eager step, the host queues L + 1 replays and L attentions
instead of ~10 launches per layer. The elementwise ops are the Triton ones
(LlamaForCausalLM's fused path), as in the other graphs.
"""

from __future__ import annotations

from typing import Callable

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.cuda_graphs import PIECEWISE_CAPTURE_SIZES, capture


class PiecewiseGraphs:
    """The pieces of every padded size up to max_tokens (PIECEWISE_CAPTURE_SIZES below it,
    then max_tokens itself, so every step within the token budget fits), captured on
    first use or by capture_all(), sharing memory_pool. graphs=False runs each piece
    eagerly instead of replaying it: the same buffers and arithmetic without CUDA (the
    CPU tests check the split with it)."""

    def __init__(self, model, pool, backend: AttentionBackend, max_tokens: int,
                 device: torch.device, memory_pool=None, graphs: bool = True) -> None:
        self.model, self.pool, self.backend = model, pool, backend
        self.sizes = [s for s in PIECEWISE_CAPTURE_SIZES if s < max_tokens] + \
            [max_tokens] * (max_tokens > 0)
        self.use_graphs = graphs
        self.memory_pool = (memory_pool or torch.cuda.graph_pool_handle()) if graphs else None
        self.pieces: dict[int, list[Callable[[], None]]] = {}
        n = self.sizes[-1] if self.sizes else 0
        attn = model.layers[0].self_attn
        dtype = model.lm_head.weight.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.residual = torch.zeros(n, model.config.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros_like(self.residual)
        self.q = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(n, attn.num_kv_heads, attn.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.attn_out = torch.zeros(n, attn.q_size, dtype=dtype, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size now (a worker's start-up)."""
        for size in self.sizes:
            self._pieces(size)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            rows: torch.Tensor) -> torch.Tensor:
        """One step of n tokens laid out as meta says; returns the logits of `rows`
        (indices into the step's tokens): [len(rows), vocab] fp32.
        ids, positions: [n] int64 on the model's device."""
        n = ids.shape[0]
        size = self.padded_size(n)
        pieces = self._pieces(size)  # before staging: a capture runs its pieces once
        self._stage(ids, positions, meta.slot_mapping, n, size)
        out = self.attn_out[:n].view(n, *self.q.shape[1:])  # [n, num_heads, head_dim]
        pieces[0]()
        for i, layer in enumerate(self.model.layers):
            k_cache, v_cache = self.pool.layer_caches(i)
            layer.self_attn.attend_stored(self.q[:n], self.k[:n], self.v[:n], self.backend,
                                          k_cache, v_cache, meta, out)
            pieces[i + 1]()
        return self.model.compute_logits(self.hidden.index_select(0, rows))

    def _stage(self, ids, positions, slots, n: int, size: int) -> None:
        self.input_ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        if size > n:  # padding rows: valid token and rotary-table indices, no cache slot
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slots[n:size].fill_(-1)

    def _pieces(self, size: int) -> list[Callable[[], None]]:
        if size not in self.pieces:
            # a capture runs each piece: with no slots its K/V stores write nothing (the
            # buffers hold the last step's rows, and the cache their K/V)
            self.slots.fill_(-1)
            fns = [self._piece(i, size) for i in range(len(self.model.layers) + 1)]
            self.pieces[size] = [self._captured(fn) for fn in fns] if self.use_graphs else fns
        return self.pieces[size]

    def _captured(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph, _ = capture(lambda _size: fn(), 0, self.memory_pool)
        return graph.replay

    def _piece(self, i: int, size: int) -> Callable[[], None]:
        """Piece i over the first `size` rows of the buffers (see the module docstring)."""
        model, layers = self.model, self.model.layers
        residual = self.residual[:size]

        def run() -> None:
            if i == 0:
                residual.copy_(model.embed(self.input_ids[:size]))
                update = None
            else:
                before = layers[i - 1]
                update = before.after_attention_fused(
                    before.self_attn.o_proj(self.attn_out[:size]), residual)
            if i == len(layers):
                self.hidden[:size].copy_(model.norm.forward_fused(update, residual))
                return
            layer = layers[i]
            h = layer.input_layernorm.forward_fused(update, residual)
            rope = model.fused_ropes(self.positions[:size])[layer.local_rope]
            q, k, v = layer.self_attn.project(h, rope, fused=True)
            self.q[:size].copy_(q)
            self.k[:size].copy_(k)
            self.v[:size].copy_(v)
            self.backend.store_kv(self.k[:size], self.v[:size], *self.pool.layer_caches(i),
                                  self.slots[:size])

        return run
