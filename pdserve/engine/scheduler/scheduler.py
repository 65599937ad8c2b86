"""Unified scheduler: chunked prefill and continuous decode batching in one token budget.

Each step, running requests go first in arrival order (a decoding request needs one
token, a partly prefilled one gets the next chunk), then waiting requests are admitted
while the budget, max_num_seqs and free blocks allow. When a running request cannot get
a block, the most recently admitted running request is preempted (blocks freed, it will
be recomputed): the oldest requests always progress, so the engine never deadlocks.

Sliding window (config.sliding_window = w > 0, a window every layer shares): before a
request's next chunk or decode token, the blocks wholly before the first key its first
new query sees (position num_computed_tokens - w + 1), less one position, go back to the
allocator. The one position is for a decode step queued ahead (async scheduling): it may
still be reading key num_computed_tokens - w on the device while this step's blocks are
handed out (and a KV transfer on another stream writes into them). Their
entries stay in block_ids (stale, so block positions and tables keep their shape) and
request.num_dropped_blocks counts them; the attention kernels never read them. A dropped
block keeps its prefix key until the allocator hands it out again (which forgets the
key), so a prefix hit on it is still valid KV. Requests held for a KV transfer
(hold_blocks: a prefill worker ships the whole prompt) drop nothing.
Pure CPU logic: no torch.
"""

from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.kvcache.allocator import BlockAllocator
from pdserve.engine.kvcache.prefix import prefix_block_keys
from pdserve.engine.scheduler.request import FinishReason, Request, RequestState


@dataclass(frozen=True)
class SchedulerConfig:
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool = True
    fingerprint: str = ""
    # prefill workers: admit a prompt only with blocks for all of it, so a request whose
    # finished chunks are already on the wire is never preempted (its blocks stay put)
    allocate_whole_prompt: bool = False
    # a sliding window every layer shares (ModelConfig.droppable_window): blocks wholly
    # before it go back to the allocator while a request runs; 0 = keep every block
    sliding_window: int = 0


def _share(budget: int, others: bool) -> int:
    """Tokens one request may take this step: half of what is left while others run or
    wait, so a long prompt's chunks share each step with short prompts and decode tokens
    instead of starving them until it is done (a decode token needs 1)."""
    return max(1, budget // 2) if others else budget


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence (a token is sampled)."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, Request] = {}  # finished, blocks kept for a KV transfer
        self.remote: dict[str, Request] = {}  # WAITING_FOR_KV
        self.reserving: deque[Request] = deque()  # RESERVING: add_remote found no room
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self._register(request)
        self.waiting.append(request)

    def add_remote(self, request: Request) -> list[int] | None:
        """Reserve blocks for a prompt whose KV another worker will push (decode side).

        Returns the block ids for the whole prompt; the first num_cached_tokens of it
        are already here (prefix cache) and need not be sent. None when the pool cannot
        take it now: it waits in line (RESERVING) and grant_reservations() hands it out
        once steps free enough blocks. MemoryError if the whole pool could never hold it.
        """
        need = self._blocks_for(len(request.prompt_ids))
        if need > self.allocator.num_blocks:
            raise MemoryError(f"a prompt of {len(request.prompt_ids)} tokens needs {need} KV "
                              f"blocks; this worker's pool has {self.allocator.num_blocks}")
        self._register(request)
        if not self.reserving and self._try_reserve(request):
            return list(request.block_ids)
        request.state = RequestState.RESERVING
        self.reserving.append(request)
        return None

    def grant_reservations(self) -> list[Request]:
        """Reservations in line that fit now, in arrival order (none overtakes another);
        each is WAITING_FOR_KV with its blocks when returned."""
        granted = []
        while self.reserving and self._try_reserve(self.reserving[0]):
            granted.append(self.reserving.popleft())
        return granted

    def _try_reserve(self, request: Request) -> bool:
        """Blocks for the whole prompt, leaving one free block per running request (its
        next decode block), so a reservation never makes a step preempt."""
        # like a local prompt, the last token is always computed (it yields the first
        # sample), so at least the final block travels
        self._lookup_prefix(request, len(request.prompt_ids) - 1)
        need = self._blocks_for(len(request.prompt_ids)) - len(request.block_ids)
        if need + len(self.running) > self.allocator.num_free:
            self._unpin(request)  # a request in line must not pin cached blocks
            return False
        self._ensure_blocks(request, len(request.prompt_ids))
        request.state = RequestState.WAITING_FOR_KV
        self.remote[request.request_id] = request
        return True

    def remote_kv_arrived(self, request_id: str, first_token: int) -> Request:
        """The pushed KV is in place; the request joins the running batch."""
        request = self.remote.pop(request_id)
        request.num_computed_tokens = len(request.prompt_ids)
        request.output_ids.append(first_token)
        request.state = RequestState.RUNNING
        self._register_full_blocks(request)
        self.running.append(request)
        return request

    def remote_kv_failed(self, request_id: str) -> Request:
        """The transfer failed: compute the prompt here (blocks stay, cached ones count)."""
        request = self.remote.pop(request_id)
        request.num_computed_tokens = request.num_cached_tokens
        request.state = RequestState.WAITING
        self.waiting.appendleft(request)
        return request

    def _register(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request

    # ---- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            others = i + 1 < len(self.running) or bool(self.waiting)
            n = min(request.num_pending_tokens(), _share(budget, others))
            self._drop_outside_window(request)
            if self._make_room(request, n, out):
                out.scheduled.append(ScheduledRequest(request, n))
                budget -= n
                i += 1
            # else: request itself was preempted and removed from running
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _make_room(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        while not self._ensure_blocks(request, request.num_computed_tokens + n):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            looked_up = request.num_computed_tokens == 0 and not request.block_ids
            if looked_up:
                self._lookup_prefix(request, request.num_tokens - 1)
            n = min(request.num_pending_tokens(), _share(budget, len(self.waiting) > 1))
            need = request.num_tokens if self.config.allocate_whole_prompt else \
                request.num_computed_tokens + n
            self._drop_outside_window(request)
            if not self._ensure_blocks(request, need):
                if looked_up:  # a waiting request must not pin cached blocks
                    self._unpin(request)
                break
            self.waiting.popleft()
            request.state = RequestState.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, n))
            budget -= n

    # ---- after the model ran ---------------------------------------------------------
    def advance(self, scheduled: ScheduledRequest, sampled: int | None) -> None:
        """Record a computed chunk and, at the end of the sequence, the sampled token."""
        request = scheduled.request
        request.num_computed_tokens += scheduled.num_new_tokens
        self._register_full_blocks(request)
        if sampled is not None:
            request.output_ids.append(sampled)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Stop a request wherever it is; its blocks go back unless held for a transfer.
        Aborting a finished request that is held lets go of its blocks."""
        if request.is_finished:
            if reason is FinishReason.ABORT:
                self.release_held(request.request_id)
            return
        if request in self.running:
            self.running.remove(request)
        elif request.state in (RequestState.WAITING, RequestState.PREEMPTED):
            self.waiting.remove(request)
        elif request.state is RequestState.RESERVING:
            self.reserving.remove(request)
        self.remote.pop(request.request_id, None)
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        if request.hold_blocks and reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.held[request.request_id] = request
        else:
            self._release(request)
            self.requests.pop(request.request_id, None)

    def release_held(self, request_id: str) -> None:
        """A held request's KV was shipped (or the transfer gave up): free its blocks."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self._release(request)
            self.requests.pop(request_id, None)

    # ---- blocks ----------------------------------------------------------------------
    def _lookup_prefix(self, request: Request, max_tokens: int) -> None:
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        keys = self._keys_up_to(request, max_tokens // bs)
        hits = self.allocator.lookup_prefix(keys)
        request.block_ids = hits
        request.num_registered_blocks = len(hits)
        request.num_computed_tokens = request.num_cached_tokens = len(hits) * bs

    def _keys_up_to(self, request: Request, num_blocks: int) -> list[bytes]:
        have = len(request.block_keys)
        if num_blocks > have:
            parent = request.block_keys[-1] if have else b"\x00" * 16
            request.block_keys += prefix_block_keys(
                request.all_token_ids[:num_blocks * self.config.block_size],
                self.config.block_size, self.config.fingerprint, parent, start_block=have)
        return request.block_keys[:num_blocks]

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def _ensure_blocks(self, request: Request, num_tokens: int) -> bool:
        need = self._blocks_for(num_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        request.block_ids += self.allocator.allocate(need)
        return True

    def _register_full_blocks(self, request: Request) -> None:
        if not self.config.enable_prefix_caching:
            return
        full = min(request.num_computed_tokens // self.config.block_size, len(request.block_ids))
        if full <= request.num_registered_blocks:
            return
        keys = self._keys_up_to(request, full)
        # a dropped block may belong to another request by now: never name it
        for b in range(max(request.num_registered_blocks, request.num_dropped_blocks), full):
            self.allocator.register(request.block_ids[b], keys[b])
        request.num_registered_blocks = full

    def _drop_outside_window(self, request: Request) -> None:
        """Free the blocks that neither a query from num_computed_tokens on nor the step
        before it can see (window w: the query at p sees keys p - w < j <= p)."""
        window = self.config.sliding_window
        if window <= 0 or request.hold_blocks:
            return
        first_key = max(0, request.num_computed_tokens - window)
        keep_from = min(first_key // self.config.block_size, len(request.block_ids))
        if keep_from > request.num_dropped_blocks:
            self.allocator.free(request.block_ids[request.num_dropped_blocks:keep_from])
            request.num_dropped_blocks = keep_from

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.state = RequestState.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _unpin(self, request: Request) -> None:
        """Back to holding nothing, prefix hits included (a request that did not get in)."""
        self._release(request)
        request.num_computed_tokens = request.num_cached_tokens = 0

    def _release(self, request: Request) -> None:
        live = request.block_ids[request.num_dropped_blocks:]
        if live:
            self.allocator.free(live)
        request.block_ids = []
        request.num_registered_blocks = request.num_dropped_blocks = 0

    # ---- views -----------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.remote) + len(self.reserving)

    def get(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)
