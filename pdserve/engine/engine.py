"""The colocated engine: scheduler + model runner + output processing.

Lifecycle of a request in one engine (see scheduler/request.py for states):
add_request validates and queues it; each step() schedules a token budget across
running and waiting requests, runs the model once, samples, detokenizes incrementally
and checks stops; finished or aborted requests free their KV blocks at once (or hold
them for a KV transfer when asked to). step() returns one RequestOutput per request
that produced something.

Asynchronous scheduling (config.async_scheduling; on with CUDA graphs): a decode step
is queued and its requests advance with a placeholder token at once; the next call
schedules and queues the following step (its input tokens come from the device) before
it reads the tokens of the queued one, so the host's scheduling, batch building and
output processing overlap the device's work. Outputs then come one call later. A step
runs ahead only when the unread tokens cannot change what it contains: nothing waits
for admission, every running request decodes, no block shortage, and no request is
sure to stop by length; otherwise the tokens are read first. A request that stops on
a token read late has already been queued once more: that row is dropped.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from pdserve.engine.config import (EngineConfig, ModelConfig, activation_bytes,
                                   gpu_kv_budget_bytes)
from pdserve.engine.kvcache.allocator import BlockAllocator
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.loader.tokenizer import IncrementalDetokenizer
from pdserve.engine.model_runner import ModelRunner, PendingTokens
from pdserve.engine.sampling import InvalidRequest, SamplingParams
from pdserve.engine.scheduler.request import FinishReason, Request
from pdserve.engine.scheduler.scheduler import ScheduledRequest, Scheduler, SchedulerConfig


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    # on the last output: arrival -> first scheduled step, and from there to the first
    # token (None when the prompt was computed elsewhere)
    queue_s: float | None = None
    prefill_s: float | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and KV pool, for stats and metrics."""

    num_running: int
    num_waiting: int  # queued for compute, for blocks or for remote KV
    kv_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int
    prefix_queries: int
    prefix_hits: int


@dataclass(frozen=True)
class PromptProgress:
    """How far a request's prompt is: its blocks and the tokens computed into them."""

    num_blocks: int
    num_computed_tokens: int


@dataclass(frozen=True)
class Reservation:
    """Blocks reserved for a prompt whose KV another worker computes: the first
    num_cached_tokens are already here (local prefix cache) and need not travel."""

    request_id: str
    block_ids: tuple[int, ...]
    num_cached_tokens: int


def _reservation(request: Request) -> Reservation:
    return Reservation(request.request_id, tuple(request.block_ids), request.num_cached_tokens)


@dataclass
class Completion:
    """A whole request's result (what generate() returns)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    ttft_s: float
    itl_s: list[float]


PLACEHOLDER = -1  # an output token sampled on the device and not read yet


@dataclass
class _InFlight:
    """A queued decode step whose tokens the host has not read."""

    tokens: PendingTokens
    # per live row: the request, its placeholder's index in output_ids, its row in tokens
    rows: list[tuple[Request, int, int]]

    def live_rows(self) -> dict[int, int]:
        """id(request) -> its row, for requests still running (ids can be reused)."""
        return {id(r): row for r, _, row in self.rows if not r.is_finished}


class _TextState:
    """Detokenizer plus stop-string handling; holds back text that may start a stop."""

    def __init__(self, detok: IncrementalDetokenizer, stops: tuple[str, ...]) -> None:
        self.detok = detok
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.emitted = 0

    def push(self, token_id: int) -> bool:
        """Add a token; True when a stop string appeared (text is cut before it)."""
        self.detok.push(token_id)
        text = self.detok.text
        cuts = [text.find(stop, max(0, self.emitted - len(stop))) for stop in self.stops]
        cut = min((c for c in cuts if c >= 0), default=-1)  # the earliest stop wins
        if cut >= 0:
            self.detok.text = text[:cut]
            return True
        return False

    def take(self, final: bool) -> str:
        end = len(self.detok.text) if final else max(self.emitted, len(self.detok.text) - self.hold)
        delta = self.detok.text[self.emitted:end]
        self.emitted = end
        return delta


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, model: str | LoadedModel | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.config = config = config or EngineConfig()
        loaded = model if isinstance(model, LoadedModel) else load_model(model, progress)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        num_blocks = config.num_blocks or self._blocks_for_memory(config, loaded)
        self.max_model_len = min(config.max_model_len or loaded.config.max_position,
                                 loaded.config.max_position)
        self.runner = ModelRunner(loaded.config, config, loaded.weights, num_blocks,
                                  self.max_model_len)
        if not isinstance(model, LoadedModel):
            loaded.weights.clear()  # ours alone: the model's parameters hold copies now
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(SchedulerConfig(
            block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            fingerprint=self.fingerprint,
            allocate_whole_prompt=config.allocate_whole_prompt,
            sliding_window=loaded.config.droppable_window), self.allocator)
        self.eos_ids = frozenset(loaded.config.eos_token_ids)
        self._texts: dict[str, _TextState] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self._inflight: _InFlight | None = None

    @staticmethod
    def _blocks_for_memory(config: EngineConfig, loaded: LoadedModel) -> int:
        from pdserve.engine.kvcache.pool import KVCacheSpec

        c = loaded.config
        spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, config.block_size, 1,
                           config.dtype)
        budget = _kv_budget_bytes(config, c)
        if budget < spec.bytes_per_block:
            raise ValueError(f"no memory left for the KV cache ({budget / 2**30:.2f} GiB "
                             f"after the weights and activations); raise "
                             f"gpu_memory_utilization or set kv_cache_memory_gb")
        return budget // spec.bytes_per_block

    @property
    def fingerprint(self) -> str:
        return self.model_config.fingerprint()

    # ---- requests --------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; this model's context "
                                 f"is {self.max_model_len} (prompt + at least one new token)")
        need = -(-(len(prompt_ids) + 1) // self.config.block_size)
        if need > self.allocator.num_blocks:
            raise InvalidRequest(f"prompt needs {need} KV blocks, the pool has "
                                 f"{self.allocator.num_blocks}")

    def make_request(self, prompt_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> Request:
        self.validate(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if self.scheduler.get(request_id) is not None:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        request = Request(request_id, list(prompt_ids), params)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        self._texts[request_id] = _TextState(detok, params.stop)
        return request

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, hold_blocks: bool = False) -> str:
        request = self.make_request(prompt_ids, params, request_id)
        request.hold_blocks = hold_blocks
        self.scheduler.add(request)
        return request.request_id

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.get(request_id)
        if request is None:
            return False
        self.scheduler.finish(request, FinishReason.ABORT)
        self._forget(request_id)
        return True

    # ---- disaggregation: KV computed elsewhere ----------------------------------------
    def reserve_remote(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> Reservation | None:
        """Decode side: allocate the prompt's blocks before KV is pushed into them. None
        when the pool is full now: the request waits in line and a later
        granted_reservations() returns its Reservation. InvalidRequest if it could never
        fit this worker's pool."""
        request = self.make_request(prompt_ids, params, request_id)
        try:
            block_ids = self.scheduler.add_remote(request)
        except MemoryError as exc:
            self._forget(request.request_id)
            raise InvalidRequest(str(exc)) from exc
        return None if block_ids is None else _reservation(request)

    def granted_reservations(self) -> list[Reservation]:
        """Reservations that were in line and got their blocks now (call once per step:
        steps and aborts free blocks)."""
        return [_reservation(r) for r in self.scheduler.grant_reservations()]

    def remote_kv_arrived(self, request_id: str, first_token: int) -> RequestOutput:
        """The KV is in place: the request decodes from here; returns the first token."""
        request = self.scheduler.remote_kv_arrived(request_id, first_token)
        return self._on_token(request, first_token, time.monotonic())

    def remote_kv_failed(self, request_id: str) -> None:
        """The transfer failed: this engine computes the (uncached part of the) prompt."""
        self.scheduler.remote_kv_failed(request_id)

    def release_held(self, request_id: str) -> None:
        """Prefill side: the KV of a finished, held request was shipped; free it."""
        self.scheduler.release_held(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- queries for the services ----------------------------------------------------
    def has_request(self, request_id: str) -> bool:
        """Queued, computing, awaiting its KV, decoding or held: known to this engine."""
        return self.scheduler.get(request_id) is not None

    def awaiting_kv(self, request_id: str) -> bool:
        """Reserved with reserve_remote and its KV not arrived (nor given up) yet."""
        return request_id in self.scheduler.remote

    def request_ids(self) -> list[str]:
        return list(self.scheduler.requests)

    def prompt_progress(self, request_id: str) -> PromptProgress | None:
        request = self.scheduler.get(request_id)
        if request is None:
            return None
        return PromptProgress(len(request.block_ids), request.num_computed_tokens)

    def block_ids(self, request_id: str, start: int, stop: int) -> list[int]:
        """The request's block ids [start, stop) (by index in its block list)."""
        return self.scheduler.requests[request_id].block_ids[start:stop]

    def ready_event(self):
        """Marks the device work queued so far (None on the CPU): see KVSender.send_chunk."""
        return self.runner.ready_event()

    @property
    def kv_pool(self):
        """The KV tensor's pool (KVCachePool), for the KV connectors."""
        return self.runner.pool

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.runner.graphs is not None

    def stats(self) -> EngineStats:
        sched, alloc = self.scheduler, self.allocator
        queued = len(sched.waiting) + len(sched.remote) + len(sched.reserving)
        return EngineStats(
            num_running=len(sched.running), num_waiting=queued,
            kv_usage=alloc.usage, num_free_blocks=alloc.num_free,
            num_total_blocks=alloc.num_blocks, num_cached_blocks=alloc.num_cached,
            prefix_queries=alloc.prefix_queries, prefix_hits=alloc.prefix_hits)

    def has_runnable(self) -> bool:
        """A step would compute something now (requests waiting for remote KV do not
        count: nothing runs for them until it arrives)."""
        return bool(self._inflight or self.scheduler.waiting or self.scheduler.running)

    # ---- stepping --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = []
        if self._inflight is not None and not self._can_run_ahead():
            outputs = self._resolve()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return outputs + self._resolve()
        if self.runner.async_scheduling and _all_decode(plan.scheduled):
            return outputs + self._launch_ahead(plan.scheduled)
        if self._inflight is not None:  # _can_run_ahead promised a decode step
            raise RuntimeError("a step was scheduled on tokens the host has not read")
        return outputs + self._run_sync(plan)

    def _run_sync(self, plan) -> list[RequestOutput]:
        sampled = self.runner.execute(plan.scheduled)
        self.num_steps += 1
        now = time.monotonic()
        outputs = []
        for s, token in zip(plan.scheduled, sampled):
            self.scheduler.advance(s, token)
            if token is not None:
                outputs.append(self._on_token(s.request, token, now))
        return outputs

    def _launch_ahead(self, scheduled: list[ScheduledRequest]) -> list[RequestOutput]:
        """Queue this decode step, then read the previous one's tokens while it runs."""
        previous = self._inflight
        rows_before = previous.live_rows() if previous else {}
        carried = [(i, rows_before[id(s.request)]) for i, s in enumerate(scheduled)
                   if id(s.request) in rows_before]
        tokens = self.runner.launch_decode(scheduled, carried,
                                           previous.tokens if previous else None)
        self.num_steps += 1
        outputs = self._resolve()
        rows = []
        for i, s in enumerate(scheduled):
            if s.request.is_finished:  # stopped on a token just read: this row is wasted
                continue
            self.scheduler.advance(s, PLACEHOLDER)
            rows.append((s.request, len(s.request.output_ids) - 1, i))
        self._inflight = _InFlight(tokens, rows) if rows else None
        return outputs

    def _resolve(self) -> list[RequestOutput]:
        """Read the queued step's tokens into its requests (stops, text, outputs)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        tokens = inflight.tokens.wait()
        now = time.monotonic()
        outputs = []
        for request, index, row in inflight.rows:
            if request.is_finished:  # aborted while its step ran
                continue
            request.output_ids[index] = tokens[row]
            outputs.append(self._on_token(request, tokens[row], now))
        return outputs

    def _can_run_ahead(self) -> bool:
        """The next schedule() is a decode step of every running request that the unread
        tokens cannot change: no admission, no prompt chunk, no preemption (a block for
        every request that needs one) and no request sure to stop by length."""
        sched = self.scheduler
        if sched.waiting or len(sched.running) > self.config.max_num_batched_tokens:
            return False
        bs, new_blocks = self.config.block_size, 0
        for r in sched.running:
            if r.num_pending_tokens() != 1 or self._stops_by_length(r):
                return False
            new_blocks += len(r.block_ids) * bs < r.num_tokens
        return new_blocks <= self.allocator.num_free

    def _stops_by_length(self, request: Request) -> bool:
        return (len(request.output_ids) >= request.params.max_tokens
                or request.num_tokens >= self.max_model_len)

    def _on_token(self, request: Request, token: int, now: float) -> RequestOutput:
        if request.first_token_time is None:
            request.first_token_time = now
        request.token_times.append(now)
        reason = self._stop_reason(request, token)
        if reason is not None:
            self.scheduler.finish(request, reason)
        text = self._texts[request.request_id]
        finished = request.is_finished
        out = RequestOutput(
            request_id=request.request_id, new_token_ids=[token],
            text_delta=text.take(final=finished) if request.params.detokenize else "",
            finished=finished,
            finish_reason=reason.value if reason else None,
            num_prompt_tokens=len(request.prompt_ids),
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=len(request.output_ids),
            ttft_s=request.first_token_time - request.arrival_time)
        if finished:
            times = request.token_times
            out.itl_s = [b - a for a, b in zip(times, times[1:])]
            if request.first_scheduled_time is not None:
                out.queue_s = request.first_scheduled_time - request.arrival_time
                out.prefill_s = request.first_token_time - request.first_scheduled_time
            self._forget(request.request_id)
        return out

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        p = request.params
        text = self._texts[request.request_id]
        if len(request.output_ids) < p.min_tokens:  # min_tokens: no stop applies yet
            if p.detokenize and token not in self.tokenizer.special_ids:
                text.detok.push(token)
            return FinishReason.LENGTH if self._stops_by_length(request) else None
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if p.detokenize and token not in self.tokenizer.special_ids and text.push(token):
            return FinishReason.STOP
        if self._stops_by_length(request):
            return FinishReason.LENGTH
        return None

    def _forget(self, request_id: str) -> None:
        self._texts.pop(request_id, None)
        self.runner.forget(request_id)

    # ---- convenience -----------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 ) -> list[Completion]:
        """Run prompts to completion together (continuous batching); results in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        done: dict[str, Completion] = {}
        parts: dict[str, list[RequestOutput]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                parts[out.request_id].append(out)
                if out.finished:
                    done[out.request_id] = _collect(parts[out.request_id],
                                                    prompts[ids.index(out.request_id)])
        return [done[i] for i in ids]

    def warm_up(self) -> int:
        """Capture every CUDA graph before serving, so no request pays for a capture or
        a kernel compilation (~2 s for an 8B model); returns the number of graphs."""
        return self.runner.capture_graphs()

    # ---- stats -----------------------------------------------------------------------
    @property
    def num_rows_in_flight(self) -> int:
        """Requests whose latest token is sampled on the device and not read yet."""
        return len(self._inflight.rows) if self._inflight else 0

    @property
    def kv_usage(self) -> float:
        return self.allocator.usage

    def pool_is_idle(self) -> bool:
        """Every block free (cached-but-unreferenced blocks count as free)."""
        return self.allocator.num_free == self.allocator.num_blocks


def _kv_budget_bytes(config: EngineConfig, model: ModelConfig) -> int:
    """kv_cache_memory_gb when set; on CUDA with 0, what gpu_memory_utilization of the
    card leaves after the weights and activations; 0.5 GiB on the CPU."""
    if config.kv_cache_memory_gb > 0 or not config.device.startswith("cuda"):
        return int((config.kv_cache_memory_gb or 0.5) * 2**30)
    import torch

    from pdserve.engine.kvcache.pool import torch_dtype

    dtype_bytes = torch_dtype(config.dtype).itemsize
    free, total = torch.cuda.mem_get_info(torch.device(config.device))
    return gpu_kv_budget_bytes(
        total=total, free=free, utilization=config.gpu_memory_utilization,
        weight_bytes=model.num_parameters() * dtype_bytes,
        activation_bytes=activation_bytes(model, config, dtype_bytes))


def _all_decode(scheduled: list[ScheduledRequest]) -> bool:
    return all(s.num_new_tokens == 1 and s.samples for s in scheduled)


def _collect(parts: list[RequestOutput], prompt: list[int]) -> Completion:
    last = parts[-1]
    return Completion(
        request_id=last.request_id, prompt_token_ids=list(prompt),
        token_ids=[t for p in parts for t in p.new_token_ids],
        text="".join(p.text_delta for p in parts), finish_reason=last.finish_reason or "",
        num_cached_tokens=last.num_cached_tokens, ttft_s=parts[0].ttft_s or 0.0,
        itl_s=last.itl_s)
