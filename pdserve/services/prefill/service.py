"""PrefillService: computes prompts and pushes their KV into decode workers' blocks.

Lifecycle of one Prefill call (state per job: COMPUTING -> SENDING -> DONE | FAILED):
  0. Early start (optional): the router's StartPrefill, sent alongside the decode
     worker's Generate, queues the prompt at once under an early_start_key; its blocks
     are held while it waits for a destination. The decode worker's Prefill call with
     that key attaches its destination (the compute is then already under way, and
     blocks computed so far go out at the next tick); a Prefill that comes first starts
     the job itself, and a StartPrefill arriving later (even after that job ended: the
     worker remembers recent keys) is refused as late. A started job that no Prefill
     claims within the KV lease is dropped and its blocks freed. StartPrefill is
     answered when its job ends (or at once if it did not start): answering sooner
     would put that gRPC work on this process's GIL while the prompt's kernels are
     being launched, which on a slow host delays the compute itself.
  1. The handshake with the destination's receiver happens on first contact (a layout
     mismatch fails the call at once with a message naming both values).
  2. The prompt joins the engine with max_tokens=1 and hold_blocks: its KV stays after
     the first token is sampled. The scheduler gives it blocks for the whole prompt up
     front, so it is never preempted while chunks are on the wire.
  3. After every engine step, blocks that became full since the last step go out as a
     chunk (chunk i travels while chunk i+1 computes). When the first token is sampled
     the rest, including the partial tail block, goes out as the last chunk.
  4. When the connector reports DONE (its release callback, on the connector's thread)
     the call answers with the first token and transfer state at once, and wakes the
     engine thread, whose tick frees the held blocks (they stay in the prefix cache).
     Any other terminal state is answered by that tick.
  Abort or a cancelled call: the transfer is aborted, and blocks are freed only once the
  connector no longer reads them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import functools
import logging
import time
from dataclasses import dataclass, field

import grpc

from pdserve.engine.engine import LLMEngine, RequestOutput
from pdserve.engine.sampling import InvalidRequest
from pdserve.kvtransfer import ConnectorError, TransferState
from pdserve.kvtransfer.base import KVDestination
from pdserve.kvtransfer.messages import destination_from_proto
from pdserve.services.common import finish_reason_proto, sampling_from_proto, trace
from pdserve.services.engine_loop import set_exception_if_pending, set_result_if_pending
from pdserve.services.worker import WorkerCore, WorkerSettings
from pdserve.wire import kv_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "pdserve.v1.PrefillService"
REMEMBERED_KEYS = 4096  # a StartPrefill later than this many Prefill calls is not refused


class JobState(enum.Enum):
    COMPUTING = "computing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class PrefillJob:
    request_id: str
    destination: KVDestination | None
    future: asyncio.Future | None  # None while an early start awaits its Prefill call
    start_future: asyncio.Future | None = None  # StartPrefill's answer (early starts)
    arrival: float = field(default_factory=time.monotonic)
    state: JobState = JobState.COMPUTING
    positions_sent: int = 0  # destination positions already handed to the connector
    chunks: int = 0
    first_token: int | None = None
    finish_reason: str | None = None
    aborting: str = ""
    compute_done: float = 0.0
    queue_s: float = 0.0      # waited in the engine before its first step
    compute_s: float = 0.0    # first step -> first token
    send_started: float = 0.0
    early_key: str = ""        # the router's early start key, if it used one
    transfer_begun: bool = False  # registered with the sender (blocks may be held there)
    started_early: bool = False
    expires: float = 0.0       # an unclaimed early start is dropped at this time
    num_tokens: int = 0

    @property
    def awaiting(self) -> bool:
        """Started early; no Prefill call has claimed it (and brought a future) yet."""
        return self.future is None

    @property
    def transfer_id(self) -> str:
        return self.destination.transfer_id if self.destination else ""


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, settings: WorkerSettings, engine: LLMEngine,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.core = WorkerCore(settings, engine, loop, tick=self._tick)
        self.sender = self.core.connector
        self.jobs: dict[str, PrefillJob] = {}  # engine thread only
        self.early_starts = {"claimed": 0, "dropped": 0, "late": 0}
        # keys whose Prefill call came before the router's StartPrefill (bounded)
        self._keys_started_by_prefill: collections.OrderedDict[str, None] = \
            collections.OrderedDict()
        self._aio_loop = loop

    def start(self) -> None:
        self.core.loop.start()

    def stop(self) -> None:
        self.core.loop.stop()
        self.sender.close()

    # ---- RPCs ------------------------------------------------------------------------
    async def Prefill(self, request, context):
        try:
            params = _first_token_params(request)
            destination = (destination_from_proto(request.destination)
                           if request.HasField("destination") else None)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        trace(log, request.request_id, "prefill: received")
        if destination is not None and not self.sender.connected(destination.address):
            try:
                await asyncio.to_thread(self.sender.connect, destination.address)
            except ConnectorError as exc:  # handshake refused or receiver unreachable
                self.core.kv_metrics.failed("handshake")
                return worker_pb2.PrefillResponse(
                    request_id=request.request_id, kv_state=kv_pb2.TRANSFER_FAILED,
                    kv_error=str(exc), worker_id=self.core.settings.worker_id)
        job = PrefillJob(request.request_id, destination, self._aio_loop.create_future(),
                         early_key=request.early_start_key)
        if destination is not None and job.early_key:
            # the early job is computing and the engine thread is busy with it: register
            # the transfer now, so the receiver admits it meanwhile, not after the step
            job.transfer_begun = self._begin_now(job)
        # queued, not awaited: this thread is woken once, by the answer (a wake-up when
        # the claim runs would compete with the engine thread sending the KV)
        self.core.loop.submit(self._claim_or_start, job, list(request.token_ids), params)
        try:
            return await job.future
        except InvalidRequest as exc:
            if job.transfer_begun:
                self.sender.release(job.transfer_id)  # tells the receiver to let go
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            self.core.loop.submit(self._abort_job, job.request_id, "caller cancelled")
            raise

    async def StartPrefill(self, request, context):
        if not request.early_start_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "StartPrefill needs an early_start_key")
        try:
            params = _first_token_params(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        job = PrefillJob(request.request_id, None, None, early_key=request.early_start_key,
                         start_future=self._aio_loop.create_future(), started_early=True,
                         expires=time.monotonic() + self.core.settings.kv_lease_s)
        # queued, not awaited, and answered when the job ends (or at once if it does not
        # start): this thread stays idle while the prompt's kernels are being launched. A
        # caller that gives up on the answer leaves the job to the Prefill that claims it
        self.core.loop.submit(self._start_early, job, list(request.token_ids), params)
        return await job.start_future

    async def Abort(self, request, context):
        found = await self.core.loop.call(self._abort_job, request.request_id,
                                          request.reason or "aborted")
        return worker_pb2.AbortResponse(found=found)

    async def Stats(self, request, context):
        stats = self.core.stats(in_flight=len(self.jobs))
        stats.early_starts_claimed = self.early_starts["claimed"]
        stats.early_starts_dropped = self.early_starts["dropped"]
        stats.early_starts_late = self.early_starts["late"]
        return stats

    async def Describe(self, request, context):
        return self.core.describe()

    # ---- engine thread ---------------------------------------------------------------
    def _claim_or_start(self, job: PrefillJob, token_ids: list[int], params) -> None:
        """A Prefill call's job; what it raises fails the call's future (its answer)."""
        try:
            self._claim_or_start_job(job, token_ids, params)
        except Exception as exc:  # InvalidRequest: INVALID_ARGUMENT; anything else: a bug
            self._aio_loop.call_soon_threadsafe(set_exception_if_pending, job.future, exc)

    def _claim_or_start_job(self, job: PrefillJob, token_ids: list[int], params) -> None:
        early = self.jobs.get(job.request_id)
        if early is not None and early.awaiting and job.early_key == early.early_key \
                and early.num_tokens == len(token_ids):
            self._claim(early, job)
        else:
            self._start_job(job, token_ids, params)
            if job.early_key:
                self._remember_key(job.early_key)

    def _start_early(self, job: PrefillJob, token_ids: list[int], params) -> None:
        """StartPrefill's job; one that cannot start is answered started=false at once."""
        try:
            if job.early_key in self._keys_started_by_prefill:
                self.early_starts["late"] += 1
                raise InvalidRequest("late: the Prefill call with this key came first")
            self._start_job(job, token_ids, params)
        except InvalidRequest as exc:  # e.g. its Prefill call came first and started it
            response = worker_pb2.StartPrefillResponse(started=False, reason=str(exc))
            self._aio_loop.call_soon_threadsafe(set_result_if_pending, job.start_future, response)
        except Exception as exc:  # a bug: the call fails (UNKNOWN), the worker serves on
            self._aio_loop.call_soon_threadsafe(set_exception_if_pending, job.start_future, exc)

    def _remember_key(self, key: str) -> None:
        keys = self._keys_started_by_prefill
        keys[key] = None
        if len(keys) > REMEMBERED_KEYS:
            keys.popitem(last=False)

    def _claim(self, early: PrefillJob, call: PrefillJob) -> None:
        """The Prefill call takes over an early-started job: its destination and future."""
        early.destination, early.future = call.destination, call.future
        early.transfer_begun = call.transfer_begun
        self.early_starts["claimed"] += 1
        if early.destination is not None:  # None: compute only, answered when computed
            try:
                self._begin_transfer(early)
            except InvalidRequest as exc:
                self.jobs.pop(early.request_id, None)
                self._answer_start(early, f"claimed, then aborted: {exc}")
                raise
        trace(log, early.request_id, "prefill: early job claimed")

    def _start_job(self, job: PrefillJob, token_ids: list[int], params) -> None:
        if job.request_id in self.jobs:
            raise InvalidRequest(f"request id {job.request_id!r} is already being prefilled")
        engine = self.core.engine
        job.num_tokens = len(token_ids)
        engine.add_request(token_ids, params, job.request_id,
                           hold_blocks=job.destination is not None or job.awaiting)
        if job.destination is not None:
            self._begin_transfer(job)
        self.jobs[job.request_id] = job
        trace(log, job.request_id, "prefill: job started")

    def _transfer_ended(self, job: PrefillJob, status, _blocks) -> None:
        """Connector thread, once the transfer is terminal. A finished one answers the
        call at once: the decode worker waits on it, and the engine thread may be busy
        with another prompt's step for a long time. The engine thread's tick (woken
        here) then frees the held blocks; its own answer finds the call answered."""
        self.core.loop.wake()
        if status.state is TransferState.DONE and job.first_token is not None \
                and not job.aborting:
            response = self._response(job, JobState.DONE, "", status)
            self._aio_loop.call_soon_threadsafe(set_result_if_pending, job.future, response)
            trace(log, job.request_id, "prefill: answered from the connector thread")

    def _begin_transfer(self, job: PrefillJob) -> None:
        """Check the destination fits the prompt (else abort it: InvalidRequest) and
        register the transfer with the sender unless the call already did."""
        engine, dst = self.core.engine, job.destination
        bs = engine.config.block_size
        if dst.first_block_index + len(dst.block_ids) != -(-job.num_tokens // bs):
            engine.abort(job.request_id)
            raise InvalidRequest(
                f"destination covers blocks {dst.first_block_index}.."
                f"{dst.first_block_index + len(dst.block_ids)} but the prompt has "
                f"{-(-job.num_tokens // bs)} blocks of {bs} tokens")
        if not job.transfer_begun:
            self._register_transfer(job)
            job.transfer_begun = True

    def _begin_now(self, job: PrefillJob) -> bool:
        """asyncio thread: sender.begin for a call about to claim an early job; False if
        that failed (the engine thread then tries again and reports why)."""
        try:
            self._register_transfer(job)
        except (ConnectorError, ValueError):
            return False
        return True

    def _register_transfer(self, job: PrefillJob) -> None:
        self.sender.begin(job.destination, lease_s=self.core.settings.kv_lease_s,
                          on_release=functools.partial(self._transfer_ended_for,
                                                       job.request_id))

    def _transfer_ended_for(self, request_id: str, status, blocks) -> None:
        """Connector thread: the job holding this transfer now (the one that claimed an
        early start, or the call's own)."""
        job = self.jobs.get(request_id)
        if job is None or job.transfer_id != status.transfer_id:
            self.core.loop.wake()
            return
        self._transfer_ended(job, status, blocks)

    def _abort_job(self, request_id: str, reason: str) -> bool:
        job = self.jobs.get(request_id)
        if job is None:
            return self.core.engine.abort(request_id)
        job.aborting = reason
        if job.awaiting:
            self.early_starts["dropped"] += 1
        if job.transfer_begun:
            self.sender.abort(job.transfer_id, reason)  # blocks freed once it is terminal
        else:
            self._finish(job, JobState.FAILED, f"aborted: {reason}")
        return True

    def _tick(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is not None:
                job.first_token = out.new_token_ids[0]
                job.finish_reason = out.finish_reason
                job.compute_done = time.monotonic()
                job.queue_s, job.compute_s = out.queue_s or 0.0, out.prefill_s or 0.0
        self._renew_leases()
        statuses = self.sender.poll() if any(j.transfer_begun for j in self.jobs.values()) else {}
        for job in list(self.jobs.values()):
            self._advance(engine, job, statuses.get(job.transfer_id))
        self.core.update_gauges()

    def _renew_leases(self) -> None:
        """A job whose prompt is still queued or computing here is alive: its transfer's
        lease must not run out before its first chunk (a near-context prompt on a CPU
        computes for longer than the lease; chunks renew it too)."""
        for job in self.jobs.values():
            if job.transfer_begun and job.state is JobState.COMPUTING and not job.aborting:
                self.sender.table.renew(job.transfer_id)

    def _advance(self, engine: LLMEngine, job: PrefillJob, status) -> None:
        if status is not None and status.state.terminal:
            ok = status.state is TransferState.DONE and not job.aborting
            if ok:
                self.core.kv_metrics.transferred("send", status.bytes_moved,
                                                 time.monotonic() - job.send_started)
            else:
                self.core.kv_metrics.failed(status.state.name.lower())
            self._finish(job, JobState.DONE if ok else JobState.FAILED,
                         status.error or job.aborting, status)
            return
        if job.state is not JobState.COMPUTING or job.aborting:
            return
        request = engine.scheduler.get(job.request_id)
        if request is None:  # aborted or failed inside the engine
            self._finish(job, JobState.FAILED, "request ended before its prompt was computed")
        elif job.destination is None:
            if job.awaiting:
                if time.monotonic() > job.expires:
                    self.early_starts["dropped"] += 1
                    self._finish(job, JobState.FAILED, "no Prefill call claimed the early "
                                                       "start within the KV lease")
            elif job.first_token is not None:
                self._finish(job, JobState.DONE, "")
        else:
            self._send_ready_blocks(engine, job, request)

    def _send_ready_blocks(self, engine: LLMEngine, job: PrefillJob, request) -> None:
        dst, bs = job.destination, engine.config.block_size
        last = job.first_token is not None
        full_blocks = len(request.block_ids) if last else request.num_computed_tokens // bs
        end = full_blocks - dst.first_block_index
        if end <= job.positions_sent and not last:
            return
        # the sender waits for the device to write these blocks on its own thread; the
        # engine thread goes on queueing the next prefill chunk meanwhile. The last
        # chunk's blocks are written: its token was sampled and read back, so the sender
        # may commit it from this thread at once
        ready = None if last else engine.runner.ready_event()
        src = request.block_ids[dst.first_block_index + job.positions_sent:dst.first_block_index + end]
        if not job.send_started:
            job.send_started = time.monotonic()
        # the first token rides with the last chunk: the decode worker starts decoding on
        # the KV's arrival instead of waiting for this call's answer
        self.sender.send_chunk(job.transfer_id, src, start=job.positions_sent, last=last,
                               ready=ready, first_token=job.first_token if last else None)
        trace(log, job.request_id, "prefill: chunk %d queued (last=%s)", job.chunks, last)
        job.positions_sent, job.chunks = end, job.chunks + 1
        if last:
            job.state = JobState.SENDING

    def _finish(self, job: PrefillJob, state: JobState, error: str, status=None) -> None:
        log.debug("request %s: prefill job %s %s", job.request_id, state.value, error)
        engine = self.core.engine
        self.jobs.pop(job.request_id, None)
        if engine.scheduler.get(job.request_id) is not None:
            if job.first_token is None:
                engine.abort(job.request_id)
            else:
                engine.release_held(job.request_id)
        if job.transfer_begun:
            self.sender.release(job.transfer_id)  # aborts it (the receiver hears) if active
        job.state = state
        if job.future is not None:
            response = self._response(job, state, error, status)
            self._aio_loop.call_soon_threadsafe(set_result_if_pending, job.future, response)
        self._answer_start(job, f"{state.value}: {error}" if error else state.value)

    def _answer_start(self, job: PrefillJob, reason: str) -> None:
        """Answer the StartPrefill call of an early-started job that ended."""
        if job.start_future is not None:
            response = worker_pb2.StartPrefillResponse(started=True, reason=reason)
            self._aio_loop.call_soon_threadsafe(set_result_if_pending, job.start_future, response)

    def _response(self, job: PrefillJob, state: JobState, error: str, status):
        kv_state = {JobState.DONE: kv_pb2.TRANSFER_DONE}.get(state, kv_pb2.TRANSFER_FAILED)
        if status is not None and status.state is TransferState.EXPIRED:
            kv_state = kv_pb2.TRANSFER_EXPIRED
        stats = worker_pb2.PrefillStats(
            num_chunks=job.chunks, blocks_sent=status.blocks_done if status else 0,
            bytes_sent=status.bytes_moved if status else 0,
            queue_seconds=job.queue_s, compute_seconds=job.compute_s,
            transfer_seconds=status.seconds if status else 0.0, started_early=job.started_early)
        return worker_pb2.PrefillResponse(
            request_id=job.request_id, first_token_id=job.first_token or 0,
            transfer_id=job.transfer_id, kv_state=kv_state, kv_error=error,
            finish_reason=finish_reason_proto(job.finish_reason),
            stats=stats, worker_id=self.core.settings.worker_id)


def _first_token_params(request: worker_pb2.PrefillRequest):
    """The prefill worker samples exactly the first token."""
    return dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, stop=(),
                               ignore_eos=True)
