"""PrefillService: computes prompts and pushes their KV into decode workers' blocks.

The job's lifecycle (AWAITING_CLAIM -> COMPUTING -> SENDING -> DONE | FAILED, and
ABORTING) is the pure state machine in job.py; this module wires it to gRPC, the engine
thread and the KV sender, and performs the effects its events return.

One Prefill call:
  0. Early start (optional): the router's StartPrefill, sent alongside the decode
     worker's Generate, queues the prompt at once under an early_start_key; its blocks
     are held while it waits for a destination. The decode worker's Prefill call with
     that key claims it (the compute is then already under way, and blocks computed so
     far go out at the next tick); a Prefill that comes first starts the job itself,
     and a StartPrefill arriving later (even after that job ended: the worker remembers
     recent keys) is refused as late. A started job that no Prefill claims within the KV
     lease is dropped and its blocks freed. StartPrefill is answered when its job ends
     (or at once if it did not start): answering sooner would put that gRPC work on this
     process's GIL while the prompt's kernels are being launched, which on a slow host
     delays the compute itself.
  1. The handshake with the destination's receiver happens on first contact (a layout
     mismatch fails the call at once with a message naming both values).
  2. The prompt joins the engine with max_tokens=1 and hold_blocks: its KV stays after
     the first token is sampled. The scheduler gives it blocks for the whole prompt up
     front, so it is never preempted while chunks are on the wire.
  3. After every engine step (`_tick`, engine thread) the job sends the blocks that
     became full as a chunk; at its first token the rest goes as the last chunk.
  4. When the connector reports DONE (its release callback, on the connector's thread)
     the call answers with the transfer's state and stats at once, and wakes the
     engine thread, whose tick finishes the job (held blocks freed; they stay in the
     prefix cache). Any other end is answered by that tick.
  A request id already in flight here (other than the early job its key claims) is
  refused with ALREADY_EXISTS and the job in flight does not notice. Abort or a
  cancelled call: the transfer is aborted, and blocks are freed only once the connector
  no longer reads them.

Threads: RPC handlers on the asyncio loop; every job event on the engine thread (so the
jobs are never touched concurrently), except the read-only `answer_at_release` on the
connector's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass

import grpc

from pdserve.engine.engine import LLMEngine, RequestOutput
from pdserve.engine.sampling import InvalidRequest
from pdserve.kvtransfer import ConnectorError, TransferState
from pdserve.kvtransfer.base import KVDestination, TransferStatus
from pdserve.kvtransfer.messages import destination_from_proto
from pdserve.services.common import finish_reason_proto, sampling_from_proto, trace
from pdserve.services.engine_loop import set_exception_if_pending, set_result_if_pending
from pdserve.services.prefill.job import (AbortTransfer, Answer, AnswerCall, AnswerStart,
                                          CountEarlyStart, EndEngineRequest, JobBook,
                                          JobState, PrefillJob, RecordFailed, RecordSent,
                                          ReleaseTransfer, Route, SendChunk, TransferEnd)
from pdserve.services.worker import WorkerCore, WorkerSettings
from pdserve.wire import kv_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "pdserve.v1.PrefillService"


class RequestInFlight(Exception):
    """The request id belongs to a job in flight here (ALREADY_EXISTS)."""


@dataclass
class PrefillCall:
    """A Prefill call waiting for its answer; `registered`: its transfer is registered
    with the sender (by the asyncio thread ahead of the claim, or the engine thread)."""

    future: asyncio.Future
    destination: KVDestination | None
    registered: bool = False


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, settings: WorkerSettings, engine: LLMEngine,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.core = WorkerCore(settings, engine, loop, tick=self._tick)
        self.sender = self.core.connector
        self.book = JobBook()  # engine thread only (the connector thread reads it)
        self._aio_loop = loop
        self._perform = {SendChunk: self._send_chunk, AbortTransfer: self._abort_transfer,
                         ReleaseTransfer: self._release_transfer,
                         EndEngineRequest: self._end_engine_request,
                         AnswerCall: self._answer_call_effect, AnswerStart: self._answer_start,
                         RecordSent: self._record_sent, RecordFailed: self._record_failed,
                         CountEarlyStart: self._count_early_start}

    def start(self) -> None:
        self.core.loop.start()

    def stop(self) -> None:
        self.core.loop.stop()
        self.sender.close()

    # ---- RPCs ------------------------------------------------------------------------
    async def Prefill(self, request, context):
        params, destination = await _parsed_or_abort(request, context)
        trace(log, request.request_id, "prefill: received")
        if destination is not None and not self.sender.connected(destination.address):
            refused = await self._handshake(request.request_id, destination)
            if refused is not None:
                return refused
        call = self._submit_call(request, params, destination)
        try:
            return await call.future
        except (InvalidRequest, RequestInFlight) as exc:
            if call.registered:
                self.sender.release(destination.transfer_id)  # tells the receiver to let go
            await context.abort(_status_of(exc), str(exc))
        except asyncio.CancelledError:
            self.core.loop.submit(self._cancel_call, request.request_id, call)
            raise

    async def _handshake(self, request_id: str, destination: KVDestination
                         ) -> worker_pb2.PrefillResponse | None:
        """First contact with the destination's receiver; the call's answer if refused."""
        try:
            await asyncio.to_thread(self.sender.connect, destination.address)
            return None
        except ConnectorError as exc:  # handshake refused or receiver unreachable
            self.core.kv_metrics.failed("handshake")
            return worker_pb2.PrefillResponse(
                request_id=request_id, kv_state=kv_pb2.TRANSFER_FAILED, kv_error=str(exc),
                worker_id=self.core.settings.worker_id)

    def _submit_call(self, request, params, destination: KVDestination | None) -> PrefillCall:
        """Hand the call to the engine thread, which claims its early job or starts one."""
        call = PrefillCall(self._aio_loop.create_future(), destination)
        if destination is not None and request.early_start_key:
            # the early job is computing and the engine thread is busy with it: register
            # the transfer now, so the receiver admits it meanwhile, not after the step
            call.registered = self._register_now(request.request_id, destination)
        # queued, not awaited: this thread is woken once, by the answer (a wake-up when
        # the claim runs would compete with the engine thread sending the KV)
        self.core.loop.submit(self._on_call, call, request.request_id,
                              request.early_start_key, list(request.token_ids), params)
        return call

    async def StartPrefill(self, request, context):
        if not request.early_start_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "StartPrefill needs an early_start_key")
        try:
            params = _first_token_params(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        answer = self._aio_loop.create_future()
        job = PrefillJob.early(request.request_id, len(request.token_ids),
                               request.early_start_key,
                               expires=time.monotonic() + self.core.settings.kv_lease_s,
                               start_call=answer)
        # queued, not awaited, and answered when the job ends (or at once if it does not
        # start): this thread stays idle while the prompt's kernels are being launched. A
        # caller that gives up on the answer leaves the job to the Prefill that claims it
        self.core.loop.submit(self._on_start, job, list(request.token_ids), params)
        try:
            return await answer
        except RequestInFlight as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))

    async def Abort(self, request, context):
        found = await self.core.loop.call(self._abort, request.request_id,
                                          request.reason or "aborted")
        return worker_pb2.AbortResponse(found=found)

    async def Stats(self, request, context):
        stats = self.core.stats(in_flight=len(self.book.jobs))
        counts = self.book.counts
        stats.early_starts_claimed = counts["claimed"]
        stats.early_starts_dropped = counts["dropped"]
        stats.early_starts_late = counts["late"]
        return stats

    async def Describe(self, request, context):
        return self.core.describe()

    # ---- engine thread: calls --------------------------------------------------------
    def _on_call(self, call: PrefillCall, request_id: str, key: str, token_ids: list[int],
                 params) -> None:
        """A Prefill call's job; what it raises fails the call (InvalidRequest:
        INVALID_ARGUMENT, RequestInFlight: ALREADY_EXISTS, anything else: a bug)."""
        try:
            self._claim_or_start(call, request_id, key, token_ids, params)
        except Exception as exc:
            self._aio_loop.call_soon_threadsafe(set_exception_if_pending, call.future, exc)

    def _claim_or_start(self, call: PrefillCall, request_id: str, key: str,
                        token_ids: list[int], params) -> None:
        route = self.book.route_call(request_id, key, len(token_ids))
        if route is Route.IN_FLIGHT:
            raise _in_flight(request_id)
        if route is Route.CLAIM:
            self._claim(self.book.jobs[request_id], call)
            return
        job = PrefillJob.for_call(request_id, len(token_ids), key, call, call.destination)
        self._refuse_misfit(job, call.destination)
        if call.destination is not None:
            self._ensure_registered(call, request_id)
        self._add_to_engine(job, token_ids, params, hold_blocks=call.destination is not None)

    def _claim(self, job: PrefillJob, call: PrefillCall) -> None:
        """The Prefill call takes over an early-started job: its destination and answer."""
        if call.destination is not None:
            why = job.destination_mismatch(call.destination, self.core.engine.config.block_size)
            if why:
                self._apply(job, job.claim_refused(why))
                raise InvalidRequest(why)
            self._ensure_registered(call, job.request_id)
        self._apply(job, job.claim(call, call.destination))
        trace(log, job.request_id, "prefill: early job claimed")

    def _on_start(self, job: PrefillJob, token_ids: list[int], params) -> None:
        """StartPrefill's job; one that cannot start is answered started=false at once."""
        try:
            route = self.book.route_start(job.request_id, job.early_key)
            if route is Route.IN_FLIGHT:
                raise _in_flight(job.request_id)
            if route is Route.LATE:
                raise InvalidRequest("late: the Prefill call with this key came first")
            self._add_to_engine(job, token_ids, params, hold_blocks=True)
        except InvalidRequest as exc:
            self._answer_start(job, AnswerStart(False, str(exc)))
        except Exception as exc:  # in flight: ALREADY_EXISTS; a bug: UNKNOWN
            self._aio_loop.call_soon_threadsafe(set_exception_if_pending, job.start_call, exc)

    def _refuse_misfit(self, job: PrefillJob, destination: KVDestination | None) -> None:
        why = destination and job.destination_mismatch(destination,
                                                      self.core.engine.config.block_size)
        if why:
            raise InvalidRequest(why)

    def _add_to_engine(self, job: PrefillJob, token_ids: list[int], params,
                       hold_blocks: bool) -> None:
        self.core.engine.add_request(token_ids, params, job.request_id, hold_blocks=hold_blocks)
        self.book.add(job)
        trace(log, job.request_id, "prefill: job started")

    def _abort(self, request_id: str, reason: str) -> bool:
        job = self.book.jobs.get(request_id)
        if job is None:
            return self.core.engine.abort(request_id)
        self._apply(job, job.abort(reason))
        return True

    def _cancel_call(self, request_id: str, call: PrefillCall) -> None:
        """The call's caller gave up: abort its job, never another call's."""
        job = self.book.jobs.get(request_id)
        if job is not None and job.call is call:
            self._apply(job, job.abort("caller cancelled"))
        elif call.registered:  # refused, or its job ended: only its transfer is left
            self.sender.release(call.destination.transfer_id)

    # ---- transfers -------------------------------------------------------------------
    def _register_now(self, request_id: str, destination: KVDestination) -> bool:
        """asyncio thread: sender.begin for a call about to claim an early job; False if
        that failed (the engine thread then tries again and reports why)."""
        try:
            self._register(request_id, destination)
        except (ConnectorError, ValueError):
            return False
        return True

    def _ensure_registered(self, call: PrefillCall, request_id: str) -> None:
        if not call.registered:
            self._register(request_id, call.destination)
            call.registered = True

    def _register(self, request_id: str, destination: KVDestination) -> None:
        self.sender.begin(destination, lease_s=self.core.settings.kv_lease_s,
                          on_release=functools.partial(self._transfer_released, request_id))

    def _transfer_released(self, request_id: str, status: TransferStatus, _blocks) -> None:
        """Connector thread, once the transfer is terminal. A finished one answers the
        call at once: the decode worker waits on it, and the engine thread may be busy
        with another prompt's step for a long time. The engine thread's tick (woken
        here) then finishes the job; its own answer finds the call answered."""
        self.core.loop.wake()
        job = self.book.jobs.get(request_id)
        if job is None or job.transfer_id != status.transfer_id:
            return  # a refused call's transfer, or its job already ended
        answer = job.answer_at_release(_transfer_end(status))
        if answer is not None:
            self._answer_call(job, answer)
            trace(log, job.request_id, "prefill: answered from the connector thread")

    # ---- engine thread: ticks --------------------------------------------------------
    def _tick(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        jobs = self.book.jobs
        for out in outputs:
            job = jobs.get(out.request_id)
            if job is not None:
                job.first_token_sampled(out.new_token_ids[0], out.finish_reason,
                                        out.queue_s or 0.0, out.prefill_s or 0.0)
        self._renew_leases()
        statuses = self.sender.poll() if any(j.destination is not None for j in jobs.values()) else {}
        now, block_size = time.monotonic(), engine.config.block_size
        for job in list(jobs.values()):
            status = statuses.get(job.transfer_id)
            if status is not None and status.state.terminal:
                self._apply(job, job.transfer_ended(_transfer_end(status), now))
            elif job.watches_engine:
                progress = engine.prompt_progress(job.request_id)
                self._apply(job, job.tick(progress, now, block_size))
        self.core.update_gauges()

    def _renew_leases(self) -> None:
        """A job whose prompt is still queued or computing here is alive: its transfer's
        lease must not run out before its first chunk (a near-context prompt on a CPU
        computes for longer than the lease; chunks renew it too)."""
        for job in self.book.jobs.values():
            if job.renews_lease:
                self.sender.table.renew(job.transfer_id)

    # ---- effects ---------------------------------------------------------------------
    def _apply(self, job: PrefillJob, effects: list) -> None:
        for effect in effects:
            self._perform[type(effect)](job, effect)
        if job.state.ended:
            log.debug("request %s: prefill job %s", job.request_id, job.state.value)
        self.book.forget_ended(job)

    def _send_chunk(self, job: PrefillJob, chunk: SendChunk) -> None:
        engine = self.core.engine
        # the sender waits for the device to write these blocks on its own thread; the
        # engine thread goes on queueing the next prefill chunk meanwhile. The last
        # chunk's blocks are written: its token was sampled and read back, so the sender
        # may commit it from this thread at once
        ready = None if chunk.last else engine.ready_event()
        src = engine.block_ids(job.request_id, chunk.src_start, chunk.src_stop)
        # the first token rides with the last chunk: the decode worker starts decoding on
        # the KV's arrival instead of waiting for this call's answer
        self.sender.send_chunk(job.transfer_id, src, start=chunk.start, last=chunk.last,
                               ready=ready, first_token=chunk.first_token)
        trace(log, job.request_id, "prefill: chunk %d queued (last=%s)", job.chunks - 1,
              chunk.last)

    def _abort_transfer(self, job: PrefillJob, effect: AbortTransfer) -> None:
        self.sender.abort(job.transfer_id, effect.reason)  # blocks freed once terminal

    def _release_transfer(self, job: PrefillJob, _effect) -> None:
        self.sender.release(job.transfer_id)  # aborts it (the receiver hears) if active

    def _end_engine_request(self, job: PrefillJob, effect: EndEngineRequest) -> None:
        if effect.computed:
            self.core.engine.release_held(job.request_id)
        else:
            self.core.engine.abort(job.request_id)

    def _answer_call_effect(self, job: PrefillJob, effect: AnswerCall) -> None:
        self._answer_call(job, effect.answer)

    def _answer_call(self, job: PrefillJob, answer: Answer) -> None:
        """The one place a Prefill call gets its response (any thread)."""
        response = self._response(job, answer)
        self._aio_loop.call_soon_threadsafe(set_result_if_pending, job.call.future, response)

    def _answer_start(self, job: PrefillJob, effect: AnswerStart) -> None:
        """The one place a StartPrefill call gets its response."""
        response = worker_pb2.StartPrefillResponse(started=effect.started, reason=effect.reason)
        self._aio_loop.call_soon_threadsafe(set_result_if_pending, job.start_call, response)

    def _count_early_start(self, _job: PrefillJob, effect: CountEarlyStart) -> None:
        self.book.count(effect.outcome)

    def _record_sent(self, _job: PrefillJob, effect: RecordSent) -> None:
        self.core.kv_metrics.transferred("send", effect.transfer.bytes_moved, effect.seconds)

    def _record_failed(self, _job: PrefillJob, effect: RecordFailed) -> None:
        self.core.kv_metrics.failed(effect.kind)

    def _response(self, job: PrefillJob, answer: Answer) -> worker_pb2.PrefillResponse:
        transfer = answer.transfer or TransferEnd(TransferState.PENDING)
        kv_state = kv_pb2.TRANSFER_DONE if answer.state is JobState.DONE else \
            kv_pb2.TRANSFER_FAILED
        if transfer.state is TransferState.EXPIRED:
            kv_state = kv_pb2.TRANSFER_EXPIRED
        stats = worker_pb2.PrefillStats(
            num_chunks=job.chunks, blocks_sent=transfer.blocks_done,
            bytes_sent=transfer.bytes_moved, queue_seconds=job.queue_s,
            compute_seconds=job.compute_s, transfer_seconds=transfer.seconds,
            started_early=job.started_early)
        response = worker_pb2.PrefillResponse(
            request_id=job.request_id, transfer_id=job.transfer_id, kv_state=kv_state,
            kv_error=answer.error, stats=stats, worker_id=self.core.settings.worker_id)
        if job.destination is None and job.first_token is not None:
            # compute only; with a destination the token went with the KV
            response.first_token_id = job.first_token
            response.finish_reason = finish_reason_proto(job.finish_reason)
        return response


def _transfer_end(status: TransferStatus) -> TransferEnd:
    return TransferEnd(status.state, status.error, status.blocks_done, status.bytes_moved,
                       status.seconds)


def _in_flight(request_id: str) -> RequestInFlight:
    return RequestInFlight(f"request id {request_id!r} is already being prefilled")


def _status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, RequestInFlight):
        return grpc.StatusCode.ALREADY_EXISTS
    return grpc.StatusCode.INVALID_ARGUMENT


async def _parsed_or_abort(request: worker_pb2.PrefillRequest, context):
    """(sampling params, destination or None); bad ones end the call INVALID_ARGUMENT."""
    try:
        destination = (destination_from_proto(request.destination)
                       if request.HasField("destination") else None)
        return _first_token_params(request), destination
    except InvalidRequest as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _first_token_params(request: worker_pb2.PrefillRequest):
    """The prefill worker samples exactly the first token."""
    return dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, stop=(),
                               ignore_eos=True)
