"""DecodeService: receives prompt KV into its own paged memory and streams tokens.

A remotely prefilled request's admission (RESERVED -> WAITING_FOR_KV -> JOINED |
RECOMPUTE | FAILED) is the pure state machine in admission.py; its events run on the
engine thread, here. One Generate call with kv_source=remote_prefill:
  1. reserve: the engine allocates blocks for the prompt (its own prefix-cache hits are
     kept and not transferred; while the pool is full the call waits in line, in arrival
     order, until finished requests free enough) and the KV receiver expects the rest
     under a fresh transfer id with a lease (RESERVED);
  2. the call asks the chosen PrefillService to compute the prompt and push the KV into
     those blocks (with the router's early_start_key it claims the job the router
     already started there); the first token comes with the KV's last chunk, and the
     call answers with the transfer's state and the prefill worker's timing
     (WAITING_FOR_KV);
  3. as soon as the receiver reports DONE with the first token (connector thread) the
     request joins the running batch (JOINED) and tokens stream back, one chunk per
     engine step; a call answering DONE first waits for that; the call's timing is
     awaited only for the last chunk;
  4. if the prefill worker is unreachable, the handshake is refused or the transfer
     fails or expires, the receiver stops taking data for the transfer, and the engine
     recomputes the prompt here (RECOMPUTE, fallback=recompute, default) or the call
     ends with UNAVAILABLE (FAILED, fallback=fail).
A cancelled call aborts the engine request and tells the prefill worker to stop; every
block returns to the pool. kv_source=local_prefill runs the whole request here. A
request id already in flight here is refused with ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from pdserve.engine.engine import LLMEngine, RequestOutput, Reservation
from pdserve.engine.sampling import InvalidRequest
from pdserve.kvtransfer import TransferState
from pdserve.kvtransfer.messages import destination_to_proto
from pdserve.services.decode.admission import (AbortRequest, Admission, AdmissionState,
                                               JoinBatch, Recompute)
from pdserve.services.common import (ChannelPool, chunk_from_output, remote_timing,
                                     sampling_from_proto, sampling_to_proto, trace)
from pdserve.services.engine_loop import next_output, set_result_if_pending
from pdserve.services.worker import WorkerCore, WorkerSettings
from pdserve.wire import kv_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
# The Prefill call covers the prompt's queueing and compute (a near-context prompt on
# a CPU: a minute or more); a stall is caught sooner by the KV lease, which each chunk
# renews, not by this bound (issue 17, item 8: the lease as the call's timeout made
# such prompts time out while computing and be recomputed here).
PREFILL_CALL_TIMEOUT_S = 600.0
# The Prefill call answered DONE: its transfer's last data is at most this far behind
LANDING_WAIT_S = 5.0
SERVICE_NAME = "pdserve.v1.DecodeService"
FINAL_ERROR_KEY = "pdserve-final-error"


class TransferFailed(Exception):
    pass


@dataclass
class _Handoff:
    """One remotely prefilled request's hand-off, as its Generate call holds it."""

    admission: Admission
    address: str  # the prefill worker's
    lease_s: float
    released: asyncio.Event  # the receiver let go of the blocks (no write can land)
    landed: asyncio.Future  # the receiver's DONE status (see _kv_landed)
    started: float = field(default_factory=time.monotonic)

    @property
    def transfer_id(self) -> str:
        return self.admission.transfer_id


def _done(loop: asyncio.AbstractEventLoop, value) -> asyncio.Future:
    future = loop.create_future()
    future.set_result(value)
    return future


async def _first_end(handoff: _Handoff, timeout_s: float) -> None:
    """Until the receiver ends the transfer (DONE: landed; any other end: released) or
    timeout_s passes. Event-driven: no thread polls the receiver meanwhile."""
    released = asyncio.ensure_future(handoff.released.wait())
    try:
        await asyncio.wait({asyncio.shield(handoff.landed), released}, timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        released.cancel()


async def _stats_of(call: asyncio.Future) -> worker_pb2.PrefillStats | None:
    response, _ = await call
    return response.stats if response is not None else None


async def _soon(stats: asyncio.Future, timeout_s: float = 2.0):
    """The prefill worker's stats for the last chunk; None if its answer is late."""
    if stats.cancelled():
        return None
    try:
        return await asyncio.wait_for(asyncio.shield(stats), timeout_s)
    except asyncio.TimeoutError:
        return None


class DecodeServicer(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, settings: WorkerSettings, engine: LLMEngine,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.core = WorkerCore(settings, engine, loop, tick=self._tick)
        self.receiver = self.core.connector
        self._channels = ChannelPool(settings.tls, settings.internal_auth.token)
        self._admissions: dict[str, Admission] = {}  # awaiting their KV, by request id
        self._calls: set[str] = set()  # request ids whose Generate call is in flight
        # in line for blocks (the pool was full when they came), by request id
        self._granting: dict[str, asyncio.Future] = {}
        self._aio_loop = loop
        self._perform = {JoinBatch: self._join_batch, Recompute: self._recompute,
                         AbortRequest: self._abort_request}

    def start(self) -> None:
        self.core.loop.start()

    def stop(self) -> None:
        self.core.loop.stop()
        self.receiver.close()

    # ---- RPCs ------------------------------------------------------------------------
    async def Generate(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        if request.WhichOneof("kv_source") is None:
            # e.g. a peer still sending the removed `reserved` source: never guess
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "kv_source must be remote_prefill or local_prefill")
        if request_id in self._calls:
            # refused before taking anything: the stream and the engine request under
            # this id belong to the call in flight, which must not notice
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {request_id!r} "
                                "is already in use by a request in flight")
        self._calls.add(request_id)
        stream = self.core.loop.open_stream(request_id)
        finished = False
        try:
            params = sampling_from_proto(request.sampling)
            ids = list(request.token_ids)
            trace(log, request_id, "decode: received")
            remote_stats: asyncio.Future | None = None
            if request.WhichOneof("kv_source") == "remote_prefill":
                remote_stats = await self._remote_prefill(request_id, ids, params, request,
                                                          context)
            else:
                await self.core.loop.call(self.core.engine.add_request, ids, params, request_id)
            while not finished:
                out: RequestOutput = await next_output(stream)
                finished = out.finished
                self._observe(out)
                if out.num_output_tokens == len(out.new_token_ids):
                    trace(log, request_id, "decode: first token out")
                chunk = chunk_from_output(out, self.core.settings.worker_id)
                if finished and remote_stats is not None:
                    stats = await _soon(remote_stats)
                    if stats is not None:
                        remote_timing(chunk.timing, stats)
                yield chunk
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TransferFailed as exc:
            # a decision, not a crash: the router must not retry it elsewhere
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc),
                                trailing_metadata=((FINAL_ERROR_KEY, "kv-transfer"),))
        finally:
            if remote_stats is not None and not remote_stats.done():
                remote_stats.cancel()
            self.core.loop.close_stream(request_id)
            if not finished:
                self.core.loop.submit(self.core.engine.abort, request_id)
            self._calls.discard(request_id)

    async def Abort(self, request, context):
        found = await self.core.loop.call(self.core.engine.abort, request.request_id)
        return worker_pb2.AbortResponse(found=found)

    async def Stats(self, request, context):
        return self.core.stats(in_flight=len(self._admissions))

    async def Describe(self, request, context):
        return self.core.describe()

    # ---- remote prefill --------------------------------------------------------------
    async def _remote_prefill(self, request_id, ids, params, request, context
                              ) -> asyncio.Future | None:
        """Once the prompt's KV is here and the request decodes: a future of the prefill
        worker's stats (None when it failed); None if this worker recomputes instead."""
        reserved = await self._reserve(request_id, ids, params)
        handoff, destination = self._expect_kv(request, reserved, ids)
        call = asyncio.ensure_future(self._prefill_rpc(
            handoff.address, request_id, ids, params, destination, handoff.lease_s,
            request.remote_prefill.early_start_key))
        try:
            stats, error = await self._kv_joined(handoff, call)
        finally:
            self._admissions.pop(request_id, None)
        trace(log, request_id, "decode: KV here (%s)", error or "ok")
        if error is not None:
            return await self._kv_failed(handoff, error)
        # bookkeeping after the first token went out (the next suspension)
        asyncio.get_running_loop().call_soon(
            self._kv_received, handoff.transfer_id, handoff.landed.result(), handoff.started)
        return stats

    def _expect_kv(self, request, reserved: Reservation, ids: list[int]):
        """RESERVED: the receiver expects the blocks the prompt misses here under a fresh
        transfer id with a lease; (the hand-off, the destination for the prefill call)."""
        first = reserved.num_cached_tokens // self.core.engine.config.block_size
        aio_loop = asyncio.get_running_loop()
        handoff = _Handoff(
            Admission(reserved.request_id, self.core.new_transfer_id(), self._fallback(request)),
            request.remote_prefill.prefill_address,
            (request.kv_lease_ms / 1000.0) or self.core.settings.kv_lease_s,
            asyncio.Event(), aio_loop.create_future())
        destination = self.receiver.expect(
            handoff.transfer_id, reserved.block_ids[first:], first_block_index=first,
            block_keys=self._block_keys(ids)[first:], num_tokens=len(ids),
            lease_s=handoff.lease_s,
            on_release=lambda *_: aio_loop.call_soon_threadsafe(handoff.released.set),
            on_done=functools.partial(self._kv_landed, handoff.admission, aio_loop,
                                      handoff.landed))
        self._admissions[reserved.request_id] = handoff.admission
        trace(log, reserved.request_id, "decode: reserved")
        handoff.admission.prefill_called()
        return handoff, destination

    async def _kv_joined(self, handoff: _Handoff, call: asyncio.Future):
        """WAITING_FOR_KV until the KV landed with its first token (the connector thread
        already had the request join the batch), or the transfer or the call failed:
        (future of the prefill stats, None) or (None, error). A cancelled call stops
        the transfer and gives its blocks back before it ends."""
        keep = asyncio.ensure_future(self._keep_lease(handoff.transfer_id, call,
                                                      handoff.lease_s))
        try:
            await asyncio.wait({call, handoff.landed}, return_when=asyncio.FIRST_COMPLETED)
            if not handoff.landed.done():
                error = await self._landing_after(await call, handoff)
                if error is not None:
                    return None, error
            if handoff.landed.result().first_token is None:
                return None, "the KV arrived without its first token"
            return asyncio.ensure_future(_stats_of(call)), None
        except asyncio.CancelledError:
            call.cancel()
            self.core.loop.submit(self._on_cancelled, handoff.admission)
            await asyncio.shield(self._cancel_transfer(handoff))
            raise
        finally:
            keep.cancel()

    async def _reserve(self, request_id: str, ids: list[int], params) -> Reservation:
        """The prompt's blocks; while the pool is full, the call waits in line (FIFO)
        until steps or aborts free enough of them (the tick hands them out)."""
        granted = self._granting[request_id] = self._aio_loop.create_future()
        try:
            reserved = await self.core.loop.call(self.core.engine.reserve_remote, ids, params,
                                                 request_id, inline=True)
            if reserved is None:
                trace(log, request_id, "decode: in line for KV blocks")
                reserved = await granted
            return reserved
        finally:
            self._granting.pop(request_id, None)

    def _granted(self, reservations: list[Reservation]) -> None:
        for reservation in reservations:
            waiter = self._granting.get(reservation.request_id)
            if waiter is not None:
                set_result_if_pending(waiter, reservation)

    async def _kv_failed(self, handoff: _Handoff, error: str) -> asyncio.Future | None:
        """The KV will not come: recompute here, or fail the call (TransferFailed)."""
        await self._cancel_transfer(handoff)
        self.core.kv_metrics.failed("transfer")
        admission, address = handoff.admission, handoff.address
        state = await self.core.loop.call(self._on_kv_failed, admission, error)
        if state is AdmissionState.FAILED:
            raise TransferFailed(f"KV transfer from prefill worker {address} failed: {error}")
        if state is AdmissionState.JOINED:  # its KV landed just before the failure did
            trace(log, admission.request_id, "decode: joined before the failure (%s)", error)
            return _done(asyncio.get_running_loop(), None)
        log.warning("request %s: KV transfer from %s failed (%s); recomputing the prompt here",
                    admission.request_id, address, error)
        return None

    async def _keep_lease(self, transfer_id: str, call: asyncio.Future, lease_s: float) -> None:
        """While the Prefill call is open its worker is alive and on the prompt (queued
        or computing): the blocks' lease runs from its last renewal, not from here."""
        table = getattr(self.receiver, "table", None)
        while table is not None and not call.done() and table.renew(transfer_id):
            await asyncio.sleep(lease_s / 4)

    def _kv_landed(self, admission: Admission, aio_loop, landed, status) -> None:
        """Connector thread: the KV is DONE. With the first token alongside it, the
        request joins the batch on the engine thread right away; asyncio hears after."""
        trace(log, admission.request_id, "decode: KV landed")
        if status.first_token is not None:
            self.core.loop.submit(self._on_kv_arrived, admission, status.first_token,
                                  inline=True)
        aio_loop.call_soon_threadsafe(set_result_if_pending, landed, status)

    # ---- engine thread: admission events ---------------------------------------------
    def _on_kv_arrived(self, admission: Admission, first_token: int) -> None:
        self._apply(admission, admission.kv_arrived(first_token))

    def _on_kv_failed(self, admission: Admission, error: str) -> AdmissionState:
        self._apply(admission, admission.kv_failed(error))
        return admission.state

    def _on_cancelled(self, admission: Admission) -> None:
        self._apply(admission, admission.cancelled())

    def _apply(self, admission: Admission, effects: list) -> None:
        for effect in effects:
            self._perform[type(effect)](admission.request_id, effect)

    def _join_batch(self, request_id: str, effect: JoinBatch) -> None:
        """The one place a remotely prefilled request joins the batch and its first token
        goes to the stream (the engine may have dropped it: e.g. a failed step)."""
        engine = self.core.engine
        if engine.awaiting_kv(request_id):
            self.core.loop.deliver(engine.remote_kv_arrived(request_id, effect.first_token))
            trace(log, request_id, "decode: joined the batch")

    def _recompute(self, request_id: str, _effect: Recompute) -> None:
        if self.core.engine.awaiting_kv(request_id):
            self.core.engine.remote_kv_failed(request_id)

    def _abort_request(self, request_id: str, _effect: AbortRequest) -> None:
        self.core.engine.abort(request_id)

    async def _prefill_rpc(self, address, request_id, ids, params, destination, lease_s,
                           early_key: str = ""):
        """(PrefillResponse, None) or (None, why the call failed)."""
        stub = worker_pb2_grpc.PrefillServiceStub(self._channel(address))
        try:
            response = await stub.Prefill(worker_pb2.PrefillRequest(
                request_id=request_id, token_ids=ids, sampling=sampling_to_proto(params),
                destination=destination_to_proto(destination), early_start_key=early_key),
                timeout=max(lease_s, PREFILL_CALL_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            return None, f"prefill call failed: {exc.code().name}: {exc.details()}"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s: prefill stats %s", request_id,
                      str(response.stats).replace("\n", " "))
        return response, None

    async def _landing_after(self, answer, handoff: _Handoff) -> str | None:
        """The call answered before the KV landed: None once the receiver's DONE (and
        its first token) is in hand, else why the KV will not come."""
        response, error = answer
        if error is not None:
            return error
        if response.kv_state != kv_pb2.TRANSFER_DONE:
            return response.kv_error or kv_pb2.TransferState.Name(response.kv_state)
        status = self.receiver.poll().get(handoff.transfer_id)
        if status is None or not status.state.terminal:  # the last reply may still be landing
            await _first_end(handoff, LANDING_WAIT_S)
            status = self.receiver.poll().get(handoff.transfer_id)
        if status is None or status.state is not TransferState.DONE:
            seen = f"{status.state.name}: {status.error}" if status else "no such transfer"
            return f"receiver saw {seen}"
        try:  # on_done ran with that status; its hand-off to this loop is on the way
            await asyncio.wait_for(asyncio.shield(handoff.landed), 5.0)
        except asyncio.TimeoutError:
            return "the receiver's DONE did not reach the call"
        return None

    def _kv_received(self, transfer_id: str, status, started: float) -> None:
        self.core.kv_metrics.transferred("recv", status.bytes_moved, time.monotonic() - started)
        self.receiver.release(transfer_id)

    async def _cancel_transfer(self, handoff: _Handoff) -> None:
        """Stop taking data; wait until no write into our blocks can still land (a DONE
        transfer has none left: its blocks hold the request's KV and go with it). The
        prefill worker is told first: a sender writing in place holds the blocks until
        it says it stopped (or its connection closes)."""
        transfer_id = handoff.transfer_id
        self.receiver.cancel(transfer_id, "request ended")
        abort = asyncio.ensure_future(self._abort_prefill(handoff.address,
                                                          handoff.admission.request_id))
        status = self.receiver.poll().get(transfer_id)
        try:
            if status is None or status.state is not TransferState.DONE:
                await asyncio.wait_for(handoff.released.wait(), timeout=10.0)
        except asyncio.TimeoutError:
            log.error("transfer %s did not release its blocks in time", transfer_id)
        self.receiver.release(transfer_id)
        await abort

    async def _abort_prefill(self, address: str, request_id: str) -> None:
        stub = worker_pb2_grpc.PrefillServiceStub(self._channel(address))
        try:
            await stub.Abort(worker_pb2.AbortRequest(request_id=request_id, reason="decode gave up"),
                             timeout=2.0)
        except grpc.aio.AioRpcError:
            pass  # the prefill worker may be the thing that died

    def _fallback(self, request) -> str:
        if request.fallback == worker_pb2.FALLBACK_FAIL:
            return "fail"
        if request.fallback == worker_pb2.FALLBACK_RECOMPUTE:
            return "recompute"
        return self.core.settings.fallback

    def _block_keys(self, ids: list[int]) -> list[bytes]:
        if self.core.settings.connector != "redis":
            return []
        from pdserve.kvtransfer.redis_pool import transfer_block_keys

        return transfer_block_keys(ids, self.core.engine.config.block_size,
                                   self.core.engine.fingerprint)

    def _channel(self, address: str) -> grpc.aio.Channel:
        return self._channels.get(address)

    # ---- engine thread / metrics -----------------------------------------------------
    def _tick(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        self.receiver.poll()  # expires overdue leases (every step, or every idle wait)
        granted = engine.granted_reservations()
        if granted:
            self._aio_loop.call_soon_threadsafe(self._granted, granted)
        self.core.update_gauges()

    def _observe(self, out: RequestOutput) -> None:
        m = self.core.latency
        self.core.engine_metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished:
            m.time_to_first_token_seconds.observe(out.ttft_s or 0.0)
            for gap in out.itl_s:
                m.inter_token_latency_seconds.observe(gap)
            m.e2e_request_latency_seconds.observe((out.ttft_s or 0.0) + sum(out.itl_s))
