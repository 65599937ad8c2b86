"""`ucx` connector: point-to-point KV push over ucxx (UCX) endpoints.

Peers. The decode worker's UcxReceiver listens twice: a ZeroMQ side channel for the
handshake (handshake.py) and a ucxx listener for data. The handshake reply carries the
data address ("host:port"). A prefill worker's UcxSender handshakes once per receiver,
then opens one ucxx endpoint to it and keeps it.

One chunk on an endpoint (the sender holds the endpoint for the whole exchange):

    sender                                        receiver
    KVTransferHeader (send_obj)          ---->    admit: pool shape, lease, block set
                                         <----    KVChunkReply ACCEPTED | REJECTED
    raw bytes of run 1 .. run n          ---->    recv straight into
      (tag messages, zero copy from                pool.block_run_bytes(first, count)
       pool.block_run_bytes)
                                         <----    KVChunkReply STORED | CORRUPT

Same-host GPU peers (the handshake reply exports the receiver's pool over CUDA IPC and
the sender maps it) skip ucx and talk on the receiver's control channel (control.py):

    sender (one thread per peer)                  receiver
    begin:  InPlaceAdmit                 ---->    hold the transfer's blocks for this
                                         <----    connection: ACCEPTED | REJECTED
    per chunk: wait for its ready event, queue the copy into the mapped pool (one
    cudaMemcpyAsync per run) and record an interprocess CUDA event after it (a ready
    chunk on the caller's thread when the sender thread is idle)
            InPlaceCommit (positions     ---->    map the positions to the blocks it
              in the transfer, names              registered, wait for that event, then
              the event)                          store: STORED | REJECTED (the last
                                                  chunk's commit ends the hold)

The admission is answered while the prompt still computes, and the commit travels while
the copy runs, so a chunk costs little more than its copy. The commit names the chunk by
its positions in the transfer, not by block ids: building and checking it costs a few
fields on each side, not a run list (on the H100 VM the receiver's check of a 256-block
commit took 0.07-0.09 ms with a run list, 0.02 ms by position). The sender reads the
replies of earlier commits before its next request that needs an answer (always after
the last chunk). The receiver also lets go of an admission on an abort notice, when the
sender's connection closes, or io_timeout_s after the transfer ended on its side (the
sender never said it stopped writing).

An abort is a header with abort_reason and no runs (receiver -> CANCELLED). Transfer
states: see base.py. The sender marks a transfer FAILED when any step raises (peer
gone: UCX endpoint error) or exceeds io_timeout_s, and drops the endpoint; the receiver
marks every unfinished transfer it saw on a broken endpoint FAILED. Neither side frees
blocks while their bytes are moving (TransferTable.hold).

Threads. ucxx is asyncio-based: one process-wide UcxRuntime runs its event loop in a
daemon thread; public methods only submit coroutines to it and return.

Transport settings. UCX reads its environment when ucxx first initializes. The runtime
sets, unless already set, UCXPY_PROGRESS_MODE=thread with UCXPY_ENABLE_PYTHON_FUTURE=1:
a C++ thread progresses the worker and completed requests resolve asyncio futures. In
the other modes ucxx waits for each request by yielding to the event loop in a loop, so
a posted receive (any open endpoint) keeps a core busy and takes the GIL from the engine
thread thousands of times a second (measured: a full core at idle, and a 512-token
prefill 2-3x slower on the decode worker next to it). For host (CPU) pools it also sets
UCX_TLS=tcp and 1 MiB TCP segments (measured: ~4 GB/s vs ~0.5 GB/s by default on
loopback; UCX_TLS=sm,self alone times out). For CUDA pools it leaves UCX_TLS alone so
cuda_ipc / RDMA are picked; GPU buffers are passed as CUDA tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.base import PROTOCOL_VERSION, ConnectorError, TransferState
from pdserve.kvtransfer.control import ControlClient, ControlServer
from pdserve.kvtransfer.handshake import SideChannelServer, request_handshake
from pdserve.kvtransfer.messages import (HandshakeInfo, abort_header, chunk_header,
                                         run_checksum)
from pdserve.kvtransfer.receiving import RegisteringReceiver
from pdserve.kvtransfer.cuda_ipc import export_pool, open_pool
from pdserve.kvtransfer.sending import Chunk, ChunkedSender
from pdserve.kvtransfer.serial import SerialThread
from pdserve.kvtransfer.transport_report import classify, endpoint_transports, report
from pdserve.kvtransfer.transfers import (ChunkRejected, InvalidTransition, UnknownTransfer,
                                         admit_chunk, in_place_blocks, store_chunk)
from pdserve.wire import kv_pb2

PROGRESS_ENV = {
    "UCXPY_PROGRESS_MODE": "thread",
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}
log = logging.getLogger(__name__)

# A listener restarted on its fixed port binds at once although connections of the
# process before it (killed) sit in TIME-WAIT there (UCX's default: busy for ~60 s).
LISTENER_ENV = {"UCX_TCP_CM_REUSEADDR": "y"}

HOST_TRANSPORT_ENV = {
    **PROGRESS_ENV,
    **LISTENER_ENV,
    "UCX_TLS": "tcp",
    "UCX_TCP_TX_SEG_SIZE": "1M",
    "UCX_TCP_RX_SEG_SIZE": "1M",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}
DEVICE_TRANSPORT_ENV = {
    **PROGRESS_ENV,
    **LISTENER_ENV,
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}


@dataclass(frozen=True)
class UcxSettings:
    host: str = "127.0.0.1"          # interface to listen on and advertise
    side_channel_port: int = 0       # 0 = any free port
    data_port: int = 0
    control_port: int = 0            # in-place chunk control (same-host GPU peers)
    lease_s: float = 30.0
    connect_timeout_s: float = 5.0
    io_timeout_s: float = 30.0       # bound on each header/run/reply step of a chunk
    checksum: bool = False           # crc32 per run (costs a host pass over the bytes)
    # endpoints to a receiver that went quiet are closed after this long (an open
    # endpoint keeps a receive posted there; costless in thread progress mode)
    idle_close_s: float = 30.0
    pack_above_runs: int = 4         # more runs than this: gather into one message
    copy_runs_max: int = 32          # in-place writes: a memcpy per run up to this many
    direct_gpu: bool = True          # same-host GPU peers: write into the mapped pool
    unanswered_max: int = 8          # in-place commits sent before their replies are read
    tune_transport_env: bool = True  # apply HOST/DEVICE_TRANSPORT_ENV defaults
    # from the cluster's internal token: handshakes are authenticated both ways
    handshake_key: bytes | None = field(default=None, repr=False)


def _rearm_blocking_progress() -> None:
    """Work around ucxx 0.52's blocking progress mode (UCXPY_PROGRESS_MODE=blocking set
    by the user) spinning a core once connected.

    Its epoll reader callback progresses the worker but never re-arms it, so the
    level-triggered descriptor stays readable and asyncio calls the callback in a busy
    loop (a full core per process at idle, and GIL contention that slows the engine
    thread next to it). Re-arming from the callback, as ucx-py did, lets the loop sleep.
    """
    from ucxx._lib_async import continuous_ucx_progress as progress

    mode = progress.BlockingMode
    if getattr(mode, "_pdserve_rearm", False):
        return

    def fd_reader_callback(self) -> None:
        self.worker.progress()
        if self.arm_task is None or self.arm_task.done():
            self.arm_task = self.event_loop.create_task(self._arm_worker())

    mode._fd_reader_callback = fd_reader_callback
    mode._pdserve_rearm = True


def interface_of(host: str) -> str | None:
    """The network interface holding IPv4 address host (None if none does)."""
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(raw[20:24]) == host:
                return name
    return None


def net_devices_env(host: str, device_type: str) -> dict[str, str]:
    """UCX_NET_DEVICES for a worker whose KV address is host: UCX's TCP transport then
    listens on that interface only, not on every one the machine has. A GPU worker is
    restricted only to loopback (its peers are on this host; elsewhere RDMA devices must
    stay usable). ucxx 0.52's data listener itself takes a port, no address: it still
    binds the wildcard address (its API has no way to say otherwise)."""
    if not host or host in ("0.0.0.0", "::"):
        return {}
    try:
        name = interface_of(host)
    except OSError:
        return {}
    if name is None or (device_type != "cpu" and not host.startswith("127.")):
        return {}
    return {"UCX_NET_DEVICES": name}


class UcxRuntime:
    """The process-wide ucxx event loop thread."""

    _instance: "UcxRuntime | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls, device_type: str = "cpu", tune_env: bool = True,
            host: str = "") -> "UcxRuntime":
        with cls._instance_lock:
            if cls._instance is None:
                if tune_env:
                    env = HOST_TRANSPORT_ENV if device_type == "cpu" else DEVICE_TRANSPORT_ENV
                    for key, value in {**env, **net_devices_env(host, device_type)}.items():
                        os.environ.setdefault(key, value)
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        import ucxx  # noqa: F401  (imported after the environment is set)

        _rearm_blocking_progress()
        self.ucxx = ucxx
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ucxx-loop",
                                        daemon=True)
        self._thread.start()

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro, timeout_s: float):
        return self.submit(coro).result(timeout_s)


class _CopyStream:
    """A side CUDA stream for packing/unpacking, so the connector never waits behind
    (or stalls) the engine's kernels on the default stream; on the CPU a no-op."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.stream is not None:
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self._ctx.__exit__(*exc)
            self.stream.synchronize()  # done before the wire or the engine touches it


def _wire_buffer(run: torch.Tensor):
    """A pool byte view in the form ucxx takes: numpy on the host, the tensor on CUDA."""
    return run.numpy() if run.device.type == "cpu" else run


async def _send_message(ep, message, timeout_s: float) -> None:
    await asyncio.wait_for(ep.send_obj(message.SerializeToString()), timeout_s)


async def _recv_reply(ep, timeout_s: float) -> kv_pb2.KVChunkReply:
    return kv_pb2.KVChunkReply.FromString(bytes(await asyncio.wait_for(ep.recv_obj(),
                                                                       timeout_s)))


def _trace(transfer_id: str, event: str) -> None:
    """At DEBUG: a hop of an in-place transfer on the host-wide monotonic clock, in the
    services' trace format (bench/disagg_gpu.py merges them)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("trace %s %s %.3f", transfer_id, event, time.monotonic() * 1000)


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnknownTransfer):
        return f"unknown transfer {exc.args[0]!r}"
    return str(exc)


async def _wait_ready(chunk: Chunk) -> None:
    """The chunk's source blocks are written; waits off the event loop's thread."""
    if chunk.ready is not None:
        await asyncio.get_running_loop().run_in_executor(None, chunk.wait_ready)


class UcxReceiver(RegisteringReceiver):
    name = "ucx"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: UcxSettings = UcxSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self.settings = settings
        self.runtime = UcxRuntime.get(pool.device.type, settings.tune_transport_env,
                                      settings.host)
        self._copy_stream = _CopyStream(pool.device)
        self._endpoints: set = set()
        # in-place transfers admitted: transfer id -> (control connection, last activity)
        self._admitted: dict[str, tuple[int, float]] = {}
        self._admitted_lock = threading.Lock()  # one control thread per sender + expiry
        self._copy_events: dict[bytes, torch.cuda.Event] = {}  # senders' IPC events
        self._listener = self.runtime.call(self._listen(), settings.connect_timeout_s)
        # in-place chunks are served even without an exported pool: the protocol does not
        # care how the bytes got there (tests write them in-process on the CPU)
        self._control = ControlServer(self._control_request, host=settings.host,
                                      port=settings.control_port,
                                      on_idle=self._expire_admissions,
                                      on_disconnect=self._sender_gone,
                                      accept_first=self._names_known_transfer)
        export = export_pool(pool) if settings.direct_gpu else {}
        self._side = SideChannelServer(hello, f"{settings.host}:{self._listener.port}",
                                       host=settings.host, port=settings.side_channel_port,
                                       export={**export,
                                               "control_address": self._control.address},
                                       key=settings.handshake_key)

    @property
    def address(self) -> str:
        return self._side.address

    @property
    def data_address(self) -> str:
        return self._side.data_address

    @property
    def control_address(self) -> str:
        return self._control.address

    async def _listen(self):
        return self.runtime.ucxx.create_listener(self._serve_endpoint,
                                                 port=self.settings.data_port)

    async def _serve_endpoint(self, ep) -> None:
        seen: set[str] = set()
        self._endpoints.add(ep)
        try:
            while True:
                header = kv_pb2.KVTransferHeader.FromString(bytes(await ep.recv_obj()))
                if not seen and not self._known_transfer(header.transfer_id):
                    # transfer ids travel only in authenticated gRPC calls: a connection
                    # that does not open with one of ours is a stranger's, dropped
                    log.warning("KV data: dropped a connection whose first message names "
                                "no expected transfer")
                    ep.abort()
                    return
                seen.add(header.transfer_id)
                await self._receive_chunk(ep, header)
        except Exception as exc:  # endpoint closed or broken: fail what it carried
            for transfer_id in seen:
                self.table.finish(transfer_id, TransferState.FAILED,
                                  f"sender endpoint closed: {type(exc).__name__}: {exc}")
        finally:
            self._endpoints.discard(ep)

    def _known_transfer(self, transfer_id: str) -> bool:
        try:
            self.table.get(transfer_id)
        except UnknownTransfer:
            return False
        return True

    def _names_known_transfer(self, request: kv_pb2.SideChannelRequest) -> bool:
        kind = request.WhichOneof("kind")
        message = getattr(request, kind) if kind else None
        return message is not None and self._known_transfer(message.transfer_id)

    def _admit(self, header: kv_pb2.KVTransferHeader
               ) -> tuple[kv_pb2.KVChunkReply, list[int] | None]:
        """The reply to a payload chunk's header: REJECTED, STORED for an abort notice, or
        ACCEPTED with the destination blocks, then held until the chunk is stored or
        given up."""
        reply = kv_pb2.KVChunkReply(transfer_id=header.transfer_id,
                                    chunk_index=header.chunk_index)
        try:
            blocks = admit_chunk(self.table, header, self.pool.spec)
            if blocks is not None:
                self.table.hold_active(header.transfer_id)
        except (ChunkRejected, UnknownTransfer, InvalidTransition) as exc:
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, _reason(exc)
            return reply, None
        reply.status = kv_pb2.KVChunkReply.STORED if blocks is None else \
            kv_pb2.KVChunkReply.ACCEPTED   # STORED: an abort notice, nothing to receive
        return reply, blocks

    async def _receive_chunk(self, ep, header: kv_pb2.KVTransferHeader) -> None:
        reply, blocks = self._admit(header)
        if blocks is None:
            await _send_message(ep, reply, self.settings.io_timeout_s)
            return
        try:
            await _send_message(ep, reply, self.settings.io_timeout_s)
            started = time.perf_counter()
            if header.packed:
                await self._receive_packed(ep, header)
            else:
                for run in header.runs:
                    target = self.pool.block_run_bytes(run.first, run.count)
                    await asyncio.wait_for(ep.recv(_wire_buffer(target)),
                                           self.settings.io_timeout_s)
            seconds = time.perf_counter() - started
            corrupt = self._corrupt_runs(header)
            if corrupt:
                error = f"checksum mismatch in runs {corrupt}"
                self.table.finish(header.transfer_id, TransferState.FAILED, error)
                reply.status, reply.error = kv_pb2.KVChunkReply.CORRUPT, error
            else:
                store_chunk(self.table, header, blocks, seconds, header.payload_bytes)
                reply.status = kv_pb2.KVChunkReply.STORED
        finally:
            self.table.unhold(header.transfer_id)
        await _send_message(ep, reply, self.settings.io_timeout_s)

    async def _receive_packed(self, ep, header: kv_pb2.KVTransferHeader) -> None:
        """One message holding every run's blocks back to back; scatter it into place."""
        pool = self.pool
        dst = [r.first + i for r in header.runs for i in range(r.count)]
        staging = torch.empty(len(dst) * pool.spec.bytes_per_block, dtype=torch.uint8,
                              device=pool.device)
        await asyncio.wait_for(ep.recv(_wire_buffer(staging)), self.settings.io_timeout_s)
        with self._copy_stream:  # synced on exit: STORED means readable by the engine
            blocks = staging.view(pool.kv.dtype).view(len(dst), *pool.spec.block_shape)
            index = torch.tensor(dst, dtype=torch.long, device=pool.device)
            pool.kv.index_copy_(0, index, blocks)

    # ---- in-place chunks (control channel threads) ------------------------------------
    # A sender admits a transfer once (its blocks are held for that sender's connection),
    # copies chunk after chunk into the mapped pool and commits each (InPlaceCommit).
    def _control_request(self, request: kv_pb2.SideChannelRequest,
                         conn_id: int) -> kv_pb2.KVChunkReply:
        kind = request.WhichOneof("kind")
        if kind == "admit":
            return self._admit_transfer(request.admit, conn_id)
        if kind == "commit":
            return self._commit_in_place(request.commit, conn_id)
        return self._abort_notice(request.chunk_header, conn_id)

    def _admit_transfer(self, admit: kv_pb2.InPlaceAdmit, conn_id: int) -> kv_pb2.KVChunkReply:
        reply = kv_pb2.KVChunkReply(transfer_id=admit.transfer_id)
        try:
            if admit.version != PROTOCOL_VERSION:
                raise ChunkRejected(f"protocol version {admit.version}, expected "
                                    f"{PROTOCOL_VERSION}")
            with self._admitted_lock:
                holder = self._admitted.get(admit.transfer_id)
                if holder is not None and holder[0] != conn_id:
                    raise ChunkRejected("transfer already admitted for another sender")
                if holder is None:
                    self.table.hold_active(admit.transfer_id)
                    self._admitted[admit.transfer_id] = (conn_id, time.monotonic())
        except (ChunkRejected, UnknownTransfer, InvalidTransition) as exc:
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, _reason(exc)
            return reply
        reply.status = kv_pb2.KVChunkReply.ACCEPTED
        return reply

    def _commit_in_place(self, commit: kv_pb2.InPlaceCommit,
                         conn_id: int) -> kv_pb2.KVChunkReply:
        """A chunk the sender copied (or queued the copy of): wait for the copy, store it.
        The last one, stored or not, ends the admission."""
        _trace(commit.transfer_id, f"kv: commit {commit.chunk_index} received")
        reply = kv_pb2.KVChunkReply(transfer_id=commit.transfer_id,
                                    chunk_index=commit.chunk_index)
        with self._admitted_lock:
            admission = self._admitted.get(commit.transfer_id)
        try:
            if admission is None or admission[0] != conn_id:
                raise ChunkRejected("transfer was not admitted on this connection, or its "
                                    "admission ended")
            blocks = in_place_blocks(self.table, commit)
            self._wait_copy(commit.copy_done_event)
            _trace(commit.transfer_id, f"kv: copy {commit.chunk_index} landed")
            store_chunk(self.table, commit, blocks, time.monotonic() - admission[1],
                        len(blocks) * self.pool.spec.bytes_per_block)
            reply.status = kv_pb2.KVChunkReply.STORED
            _trace(commit.transfer_id, f"kv: commit {commit.chunk_index} stored")
        except ChunkRejected as exc:
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, str(exc)
        if commit.last_chunk:
            self._end_admission(commit.transfer_id, conn_id)
        elif admission is not None:
            self._touch_admission(commit.transfer_id, conn_id)
        return reply

    def _abort_notice(self, header: kv_pb2.KVTransferHeader,
                      conn_id: int) -> kv_pb2.KVChunkReply:
        """The sender gave the transfer up (any connection may say so): CANCELLED, and the
        admission this connection held ends."""
        reply = kv_pb2.KVChunkReply(transfer_id=header.transfer_id,
                                    chunk_index=header.chunk_index)
        if not header.abort_reason:
            reply.status = kv_pb2.KVChunkReply.REJECTED
            reply.error = ("the control channel takes chunk headers only as abort notices; "
                           f"in-place chunks are committed with InPlaceCommit (protocol "
                           f"{PROTOCOL_VERSION})")
            return reply
        admit_chunk(self.table, header, self.pool.spec)
        self._end_admission(header.transfer_id, conn_id)
        reply.status = kv_pb2.KVChunkReply.STORED
        return reply

    def _touch_admission(self, transfer_id: str, conn_id: int) -> None:
        with self._admitted_lock:
            if transfer_id in self._admitted:
                self._admitted[transfer_id] = (conn_id, time.monotonic())

    def _wait_copy(self, handle: bytes) -> None:
        """Block until the sender's copy of the chunk is done (no event: it was done
        before the commit was sent)."""
        if not handle:
            return
        event = self._copy_events.get(handle)
        if event is None:
            if self.pool.device.type != "cuda":
                raise ChunkRejected("a CUDA copy event for a host-memory pool")
            try:
                event = torch.cuda.Event.from_ipc_handle(self.pool.device, handle)
            except Exception as exc:
                raise ChunkRejected(f"copy event does not open: {exc}") from None
            if len(self._copy_events) >= 64:  # senders that reconnected left old ones
                self._copy_events.clear()
            self._copy_events[handle] = event
        event.synchronize()

    def _end_admission(self, transfer_id: str, conn_id: int, error: str = "") -> None:
        with self._admitted_lock:
            admission = self._admitted.get(transfer_id)
            if admission is None or admission[0] != conn_id:
                return
            del self._admitted[transfer_id]
        if error:
            self.table.finish(transfer_id, TransferState.FAILED, error)
        self.table.unhold(transfer_id)

    def _sender_gone(self, conn_id: int) -> None:
        """The sender's connection closed: nothing more will be written for it."""
        with self._admitted_lock:
            held = [tid for tid, (conn, _) in self._admitted.items() if conn == conn_id]
        for transfer_id in held:
            self._end_admission(transfer_id, conn_id,
                                "the sender's control connection closed mid-transfer")

    def _expire_admissions(self) -> None:
        """A transfer that ended here (cancelled, expired) stays held until its sender
        says it stopped writing; a sender that never does (hung) lets go after
        io_timeout_s."""
        self.table.expire_due()
        now = time.monotonic()
        with self._admitted_lock:
            admitted = list(self._admitted.items())
        for transfer_id, (conn_id, _) in admitted:
            try:
                record = self.table.get(transfer_id)
            except UnknownTransfer:
                self._end_admission(transfer_id, conn_id)
                continue
            if record.state.terminal and now - record.finished > self.settings.io_timeout_s:
                self._end_admission(transfer_id, conn_id)

    def _corrupt_runs(self, header: kv_pb2.KVTransferHeader) -> list[int]:
        if header.checksum_kind == kv_pb2.CHECKSUM_NONE:
            return []
        return [i for i, (run, expected) in enumerate(zip(header.runs, header.run_checksums))
                if run_checksum(self.pool.block_run_bytes(run.first, run.count)) != expected]

    def _shutdown(self) -> None:
        self._side.close()
        self._control.close()

        async def stop() -> None:
            for ep in list(self._endpoints):
                ep.abort()
            self._listener.close()
        try:
            self.runtime.call(stop(), 5.0)
        except Exception:
            pass


@dataclass
class _Peer:
    side_channel: str
    data_address: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    endpoint: object = None
    uses: int = 0  # chunks sent so far; an idle-close timer checks it did not move
    remote_pool: object = None  # the receiver's pool mapped over CUDA IPC, if possible
    control: ControlClient | None = None  # in-place chunks: used by calls run on `direct`
    # in-place transfers admitted (id -> control session) and commits not yet answered
    # (chunk, bytes, start): both only touched by calls run on `direct`
    admitted: dict = field(default_factory=dict)
    unanswered: deque = field(default_factory=deque)
    # GPU pools: recorded after each in-place copy; its IPC handle rides with the commit
    copy_event: object = None
    copy_event_handle: bytes = b""
    # one sender thread per same-host peer: a receiver that stops answering stalls only
    # the chunks bound for it (each waits up to io_timeout_s), not every peer's
    direct: SerialThread | None = None


def _run_on(peer: _Peer, fn, *args) -> bool:
    """Queue fn on the peer's sender thread; False once that thread was shut down (the
    peer failed and was forgotten between lookup and submit)."""
    return peer.direct.submit(fn, *args)


class UcxSender(ChunkedSender):
    name = "ucx"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: UcxSettings = UcxSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self.settings = settings
        self.runtime = UcxRuntime.get(pool.device.type, settings.tune_transport_env,
                                      settings.host)
        self._copy_stream = _CopyStream(pool.device)
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()

    def connected(self, address: str) -> bool:
        """A peer whose endpoint UCX found broken (the receiver died, and may be back on
        the same ports) is forgotten here, so the next transfer handshakes anew instead
        of failing on the dead endpoint and recomputing."""
        peer = self._peer(address)
        if peer is None:
            return False
        endpoint, control = peer.endpoint, peer.control
        if (endpoint is not None and endpoint.closed) or \
                (control is not None and control.peer_closed()):
            self._forget_peer(peer)
            if peer.direct is not None:  # its calls run there: close it there, last
                peer.direct.submit(control.close)
                peer.direct.shutdown(wait=False)
            self.runtime.submit(self._retire(peer))
            return False
        return True

    async def _retire(self, peer: _Peer) -> None:
        self._drop_endpoint(peer)

    def connect(self, address: str) -> None:
        with self._peers_lock:
            if address in self._peers:
                return
        reply = request_handshake(address, self.hello, self.settings.connect_timeout_s,
                                  key=self.settings.handshake_key)
        peer = self.runtime.call(self._new_peer(address, reply.data_address),
                                 self.settings.connect_timeout_s)
        if self.settings.direct_gpu and not self.settings.checksum and reply.control_address:
            peer.remote_pool = open_pool(reply, self.pool)
        if peer.remote_pool is not None:
            peer.control = ControlClient(reply.control_address, self.settings.io_timeout_s)
            self._make_copy_event(peer)
            peer.direct = SerialThread("kv-in-place")
        else:
            try:
                self.runtime.call(self._open(peer), self.settings.connect_timeout_s + 1)
            except Exception as exc:
                raise ConnectorError(f"ucx endpoint to {reply.data_address} (side channel "
                                     f"{address}) failed: {type(exc).__name__}: {exc}") from exc
        self._report_transport(address, reply, peer)
        with self._peers_lock:
            kept = self._peers.setdefault(address, peer)
        if kept is not peer and peer.direct is not None:  # a concurrent connect won
            peer.direct.shutdown(wait=False)

    def _report_transport(self, address: str, reply, peer: _Peer) -> None:
        """Log and export the transport KV takes to this peer, as used (UCX's lanes)."""
        gpu = self.pool.device.type == "cuda"
        if peer.remote_pool is not None:
            report(address, "cuda_ipc", gpu_pool=gpu,
                   detail=f"in place into {reply.hello.worker_id or 'the peer'}'s pool")
            return
        try:
            lanes = self.runtime.call(self._lanes(peer), self.settings.connect_timeout_s)
        except Exception:
            lanes = []
        report(address, classify(lanes), gpu_pool=gpu,
               detail="lanes " + (", ".join(f"{t}/{d}" if d else t for t, d in lanes)
                                  or "unknown"))

    async def _lanes(self, peer: _Peer) -> list:
        return endpoint_transports(peer.endpoint)

    async def _new_peer(self, address: str, data_address: str) -> _Peer:
        return _Peer(address, data_address)   # created on the loop: its Lock binds there

    async def _open(self, peer: _Peer):
        if peer.endpoint is None:
            host, port = peer.data_address.rsplit(":", 1)
            peer.endpoint = await self.runtime.ucxx.create_endpoint(
                host, int(port), connect_timeout=self.settings.connect_timeout_s)
        return peer.endpoint

    def _peer(self, address: str) -> _Peer | None:
        with self._peers_lock:
            return self._peers.get(address)

    def _submit(self, chunk: Chunk) -> None:
        peer = self._peer(chunk.address)
        if peer is None:  # the connection broke earlier in this transfer
            self.fail(chunk.transfer_id, f"no connection to {chunk.address}")
            return
        if peer.remote_pool is None:
            self.runtime.submit(self._send_chunk(peer, chunk))
        elif chunk.ready is None and peer.direct.run_if_idle(self._send_in_place, peer, chunk):
            return
        elif not _run_on(peer, self._send_in_place, peer, chunk):
            self.fail(chunk.transfer_id, f"connection to {chunk.address} was dropped")

    # ---- same-host GPU peers: copy into the mapped pool, control channel -----------
    # Everything below runs on the peer's sender thread, in submission order: the
    # transfer's admission (queued by begin, so it is answered while the prompt
    # computes), then per chunk: wait for the device, copy, send the commit. Commits of
    # chunks before the last are not waited for (their replies are read before the next
    # request that needs an answer), so a ready chunk costs the copy plus one message.
    # A chunk that needs no waiting (ready=None) is committed on the caller's thread
    # when the sender thread is idle, one thread wake-up sooner; its settling (wait for
    # the copy, read the replies) still goes to the sender thread.
    def begin(self, destination, *, lease_s=None, on_release=None) -> None:
        super().begin(destination, lease_s=lease_s, on_release=on_release)
        peer = self._peer(destination.address)
        if peer is not None and peer.remote_pool is not None and \
                not _run_on(peer, self._admit_transfer, peer, destination.transfer_id):
            self.fail(destination.transfer_id, f"connection to {destination.address} "
                                               "was dropped")

    def _admit_transfer(self, peer: _Peer, transfer_id: str) -> None:
        """Have the receiver hold the destination blocks for this connection."""
        if self._ended(transfer_id):
            return
        started = time.perf_counter()
        try:
            reply = self._call(peer, kv_pb2.SideChannelRequest(admit=kv_pb2.InPlaceAdmit(
                version=PROTOCOL_VERSION, transfer_id=transfer_id))).chunk
        except Exception as exc:
            self._peer_failed(peer, transfer_id, exc)
            return
        if reply.status != kv_pb2.KVChunkReply.ACCEPTED:
            self.fail(transfer_id, f"receiver refused the transfer: {reply.error}")
            return
        peer.admitted[transfer_id] = peer.control.session
        log.debug("in-place transfer %s: admitted in %.2f ms", transfer_id,
                  1000 * (time.perf_counter() - started))

    def _send_in_place(self, peer: _Peer, chunk: Chunk) -> None:
        """Commit the chunk now; settle it (wait for the copy, read replies) on the sender
        thread after what is queued there by then, so chunks ready together are copied
        back to back."""
        if self._commit_chunk(peer, chunk) and \
                not _run_on(peer, self._settle_chunk, peer, chunk):
            self.table.unhold(chunk.transfer_id)  # the peer failed meanwhile

    def _commit_chunk(self, peer: _Peer, chunk: Chunk) -> bool:
        """Copy the chunk into the mapped pool and send its commit; True if sent (the
        transfer stays held until _settle_chunk)."""
        if self._ended(chunk.transfer_id):
            return False
        if peer.admitted.get(chunk.transfer_id) != peer.control.session or \
                not peer.control.connected:  # refused, or its connection was reset
            self.fail(chunk.transfer_id, "in-place transfer is not admitted on the receiver")
            return False
        self.table.hold(chunk.transfer_id)
        try:
            _trace(chunk.transfer_id, f"kv: chunk {chunk.index} picked up")
            chunk.wait_ready()
            started = time.perf_counter()
            # the copy first: the commit is built and sent while the device copies
            self._queue_chunk_copy(peer, chunk)
            commit = kv_pb2.InPlaceCommit(transfer_id=chunk.transfer_id,
                                          chunk_index=chunk.index,
                                          first_position=chunk.start,
                                          num_blocks=chunk.num_blocks, last_chunk=chunk.last)
            if chunk.last and chunk.first_token is not None:
                commit.first_token_id = chunk.first_token
            peer.unanswered.append(
                (chunk, chunk.num_blocks * self.pool.spec.bytes_per_block, started))
            self._send_commit(peer, chunk, commit)
        except Exception as exc:  # control channel silent, device copy failed: peer is done
            self._peer_failed(peer, chunk.transfer_id, exc)
            self.table.unhold(chunk.transfer_id)
            return False
        return True

    def _settle_chunk(self, peer: _Peer, chunk: Chunk, deferred: bool = False) -> None:
        """After the commit: wait for the copy (the source blocks stay until it is done),
        then read replies if the chunk was the last or too many are unread. A copy still
        running lets calls queued meanwhile (the next chunks' commits) go first, once."""
        if not deferred and peer.direct.waiting() and not self._copies_done(peer) and \
                _run_on(peer, self._settle_chunk, peer, chunk, True):
            return
        try:
            if peer.copy_event is not None:
                self._copy_stream.stream.synchronize()
            if chunk.last:
                peer.admitted.pop(chunk.transfer_id, None)  # its commit ends the hold
            if chunk.last or len(peer.unanswered) >= self.settings.unanswered_max:
                self._drain(peer)
        except Exception as exc:
            self._peer_failed(peer, chunk.transfer_id, exc)
        finally:
            self.table.unhold(chunk.transfer_id)

    @staticmethod
    def _copies_done(peer: _Peer) -> bool:
        return peer.copy_event is None or peer.copy_event.query()

    def _make_copy_event(self, peer: _Peer) -> None:
        if self.pool.device.type != "cuda":
            return
        with torch.cuda.stream(self._copy_stream.stream):
            event = torch.cuda.Event(interprocess=True)
            event.record()  # created on this device before its handle is taken
        peer.copy_event, peer.copy_event_handle = event, bytes(event.ipc_handle())

    def _queue_chunk_copy(self, peer: _Peer, chunk: Chunk) -> None:
        """Copy the chunk into the mapped pool: on a GPU queued on the copy stream, its
        end marked by the peer's copy event; a host pool's copy is done on return."""
        if peer.copy_event is None:
            self._queue_copy(peer.remote_pool, chunk, None)
            return
        stream = self._copy_stream.stream
        self._queue_copy(peer.remote_pool, chunk, stream)
        peer.copy_event.record(stream)
        _trace(chunk.transfer_id, f"kv: copy {chunk.index} queued")

    def _send_commit(self, peer: _Peer, chunk: Chunk, commit: kv_pb2.InPlaceCommit) -> None:
        """On a GPU the commit goes out while the copy runs, naming the event that marks
        its end; the receiver waits for that event (the sender, in _settle_chunk)."""
        if peer.copy_event is not None:
            commit.copy_done_event = peer.copy_event_handle
        peer.control.send(kv_pb2.SideChannelRequest(commit=commit))
        _trace(chunk.transfer_id, f"kv: commit {chunk.index} sent")

    def _call(self, peer: _Peer, request) -> kv_pb2.SideChannelReply:
        """A request whose answer is needed now; earlier commits' replies come first."""
        self._drain(peer)
        return peer.control.call(request)

    def _drain(self, peer: _Peer) -> None:
        """Read the replies of the commits sent so far; a refused chunk fails its transfer
        and, unless it was the last, tells the receiver to stop holding it."""
        refused = []
        while peer.unanswered:
            chunk, nbytes, started = peer.unanswered[0]
            reply = peer.control.receive().chunk
            peer.unanswered.popleft()
            if reply.status == kv_pb2.KVChunkReply.STORED:
                self._chunk_done(chunk, nbytes, time.perf_counter() - started)
                continue
            self.fail(chunk.transfer_id, f"receiver answered chunk {chunk.index} with "
                                         f"{kv_pb2.KVChunkReply.Status.Name(reply.status)}: "
                                         f"{reply.error}")
            if peer.admitted.pop(chunk.transfer_id, None) is not None:
                refused.append(chunk)
        for chunk in refused:
            peer.control.call(kv_pb2.SideChannelRequest(chunk_header=abort_header(
                chunk.transfer_id, chunk.index + 1, "a chunk was refused")))

    def _ended(self, transfer_id: str) -> bool:
        try:
            return self.table.get(transfer_id).state.terminal
        except KeyError:  # released meanwhile
            return True

    def _peer_failed(self, peer: _Peer, transfer_id: str, exc: Exception) -> None:
        """The receiver stopped answering (or the device copy failed): every transfer
        in the air to it fails; closing the connection makes it drop what it held."""
        error = f"in-place send to {peer.side_channel} failed: {type(exc).__name__}: {exc}"
        self.fail(transfer_id, error)
        for chunk, _, _ in peer.unanswered:
            self.fail(chunk.transfer_id, error)
        peer.unanswered.clear()
        peer.admitted.clear()
        peer.control.close()
        self._forget_peer(peer)  # a restarted receiver gets a fresh handshake
        peer.direct.shutdown(wait=False)  # chunks already queued still end (FAILED)

    def _chunk_done(self, chunk: Chunk, nbytes: int, seconds: float) -> None:
        self.table.record_chunk(chunk.transfer_id, blocks=chunk.dst_block_ids,
                                nbytes=nbytes, seconds=seconds, sent=True)
        if chunk.last:
            self.table.finish(chunk.transfer_id, TransferState.DONE)

    def _abort_in_place(self, peer: _Peer, transfer_id: str, chunk_index: int,
                        reason: str) -> None:
        peer.admitted.pop(transfer_id, None)
        try:
            self._call(peer, kv_pb2.SideChannelRequest(
                chunk_header=abort_header(transfer_id, chunk_index, reason)))
        except ConnectorError:
            pass  # the connection is closed: the receiver let go of what it held

    async def _send_chunk(self, peer: _Peer, chunk: Chunk) -> None:
        async with peer.lock:
            if self.table.get(chunk.transfer_id).state.terminal:
                return
            self.table.hold(chunk.transfer_id)
            try:
                await self._exchange_chunk(peer, chunk)
            except Exception as exc:
                self.fail(chunk.transfer_id, f"ucx send to {peer.data_address} failed: "
                                             f"{type(exc).__name__}: {exc}")
                self._drop_endpoint(peer)
                self._forget_peer(peer)  # a restarted receiver gets a fresh handshake
            finally:
                self.table.unhold(chunk.transfer_id)
                peer.uses += 1
                self._close_when_idle(peer)

    def _close_when_idle(self, peer: _Peer) -> None:
        if self.pool.device.type != "cpu":
            return  # payload over UCX's cuda_ipc: reopening re-maps GPU memory, keep it
        uses = peer.uses

        async def close_if_unused() -> None:
            async with peer.lock:
                # a transfer between chunks (prefill still computing) keeps its endpoint:
                # closing it would make the receiver fail that transfer
                if peer.uses == uses and not self._active_to(peer.side_channel):
                    self._drop_endpoint(peer)

        self.runtime.loop.call_later(self.settings.idle_close_s,
                                     lambda: self.runtime.loop.create_task(close_if_unused()))

    async def _exchange_chunk(self, peer: _Peer, chunk: Chunk) -> None:
        timeout = self.settings.io_timeout_s
        runs = [self.pool.block_run_bytes(s, n) for s, _, n in chunk.runs]
        await _wait_ready(chunk)
        checksums = [run_checksum(r) for r in runs] if self.settings.checksum else None
        header = chunk_header(self.pool.spec, transfer_id=chunk.transfer_id,
                              chunk_index=chunk.index, last=chunk.last,
                              dst_runs=[(d, n) for _, d, n in chunk.runs], checksums=checksums,
                              first_token=chunk.first_token)
        payload = self._pack(chunk) if self._should_pack(chunk) else None
        header.packed = payload is not None
        ep = await self._open(peer)
        started = time.perf_counter()
        await _send_message(ep, header, timeout)
        reply = await _recv_reply(ep, timeout)
        if reply.status != kv_pb2.KVChunkReply.ACCEPTED:
            self.fail(chunk.transfer_id, f"receiver refused chunk {chunk.index}: {reply.error}")
            return
        for run in ([payload] if payload is not None else runs):
            await asyncio.wait_for(ep.send(_wire_buffer(run)), timeout)
        reply = await _recv_reply(ep, timeout)
        if reply.status != kv_pb2.KVChunkReply.STORED:
            self.fail(chunk.transfer_id, f"receiver did not store chunk {chunk.index}: "
                                         f"{kv_pb2.KVChunkReply.Status.Name(reply.status)} "
                                         f"{reply.error}")
            return
        self._chunk_done(chunk, header.payload_bytes, time.perf_counter() - started)

    def _queue_copy(self, remote, chunk: Chunk, stream) -> None:
        """Copy the chunk's blocks into the receiver's mapped pool: queued on `stream`
        (None: a host pool, done on return)."""
        if len(chunk.runs) <= self.settings.copy_runs_max or remote.kv.device != self.pool.device:
            # one memcpy per contiguous run: no staging buffer, copy bandwidth (and the
            # only way into another GPU's pool: index_copy_ wants one device)
            remote.queue_copy_runs(self.pool.kv, chunk.runs, stream)
            return
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            device = self.pool.device
            src = torch.tensor(chunk.src_block_ids, dtype=torch.long, device=device)
            dst = torch.tensor(chunk.dst_block_ids, dtype=torch.long, device=device)
            remote.kv.index_copy_(0, dst, self.pool.kv.index_select(0, src))

    def _should_pack(self, chunk: Chunk) -> bool:
        """Many short runs cost a message each; one gather copy on the device is cheaper."""
        return len(chunk.runs) > self.settings.pack_above_runs and not self.settings.checksum

    def _pack(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's source blocks gathered back to back: flat uint8 [n * block_bytes]."""
        pool = self.pool
        with self._copy_stream:  # source blocks are final: the prefill worker synced
            index = torch.tensor(chunk.src_block_ids, dtype=torch.long, device=pool.device)
            packed = pool.kv.index_select(0, index).reshape(-1).view(torch.uint8)
        return packed

    def _active_to(self, address: str) -> bool:
        for transfer_id in self.table.active_ids():
            try:
                if self.table.get(transfer_id).destination.address == address:
                    return True
            except KeyError:  # released meanwhile
                continue
        return False

    def _forget_peer(self, peer: _Peer) -> None:
        with self._peers_lock:
            if self._peers.get(peer.side_channel) is peer:
                del self._peers[peer.side_channel]

    def _drop_endpoint(self, peer: _Peer) -> None:
        if peer.endpoint is not None:
            try:
                peer.endpoint.abort()
            except Exception:
                pass
            peer.endpoint = None

    def _submit_abort(self, address: str, transfer_id: str, chunk_index: int,
                      reason: str) -> None:
        peer = self._peer(address)
        if peer is not None and peer.remote_pool is not None:
            _run_on(peer, self._abort_in_place, peer, transfer_id, chunk_index, reason)
        elif peer is not None:
            self.runtime.submit(self._send_abort(peer, transfer_id, chunk_index, reason))

    async def _send_abort(self, peer: _Peer, transfer_id: str, chunk_index: int,
                          reason: str) -> None:
        async with peer.lock:
            try:
                ep = await self._open(peer)
                await _send_message(ep, abort_header(transfer_id, chunk_index, reason), 2.0)
                await _recv_reply(ep, 2.0)
            except Exception:
                self._drop_endpoint(peer)

    def _shutdown(self) -> None:
        for peer in list(self._peers.values()):
            if peer.direct is not None:
                peer.direct.submit(peer.control.close)  # on the thread that uses it
                peer.direct.shutdown(wait=True)

        async def stop() -> None:
            for peer in list(self._peers.values()):
                async with peer.lock:
                    self._drop_endpoint(peer)
        try:
            self.runtime.call(stop(), 5.0)
        except Exception:
            pass
