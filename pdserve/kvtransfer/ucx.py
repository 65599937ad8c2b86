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
the sender maps it) skip ucx: a sender thread admits the chunk on the receiver's control
channel (control.py; KVTransferHeader -> ACCEPTED: the blocks are held) while the
prefill still computes it, queues the copy into the mapped pool on its own stream behind
the chunk's ready event, waits for the copy and commits (chunk_written -> STORED). Two
small TCP round trips per chunk, one thread wake per direction, instead of four ucxx
messages each crossing three threads.

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
UCX_TLS=tcp and 1 MiB TCP segments (NOTES.md: ~4 GB/s vs ~0.5 GB/s by default on
loopback; UCX_TLS=sm,self alone times out). For CUDA pools it leaves UCX_TLS alone so
cuda_ipc / RDMA are picked; GPU buffers are passed as CUDA tensors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.base import ConnectorError, TransferState
from pdserve.kvtransfer.control import ControlClient, ControlServer
from pdserve.kvtransfer.handshake import SideChannelServer, request_handshake
from pdserve.kvtransfer.messages import (HandshakeInfo, abort_header, chunk_header,
                                         run_checksum)
from pdserve.kvtransfer.receiving import RegisteringReceiver
from pdserve.kvtransfer.cuda_ipc import export_pool, open_pool
from pdserve.kvtransfer.sending import Chunk, ChunkedSender
from pdserve.kvtransfer.transfers import ChunkRejected, admit_chunk, store_chunk
from pdserve.wire import kv_pb2

PROGRESS_ENV = {
    "UCXPY_PROGRESS_MODE": "thread",
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}
log = logging.getLogger(__name__)

HOST_TRANSPORT_ENV = {
    **PROGRESS_ENV,
    "UCX_TLS": "tcp",
    "UCX_TCP_TX_SEG_SIZE": "1M",
    "UCX_TCP_RX_SEG_SIZE": "1M",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}
DEVICE_TRANSPORT_ENV = {
    **PROGRESS_ENV,
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
    tune_transport_env: bool = True  # apply HOST/DEVICE_TRANSPORT_ENV defaults


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


class UcxRuntime:
    """The process-wide ucxx event loop thread."""

    _instance: "UcxRuntime | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls, device_type: str = "cpu", tune_env: bool = True) -> "UcxRuntime":
        with cls._instance_lock:
            if cls._instance is None:
                if tune_env:
                    env = HOST_TRANSPORT_ENV if device_type == "cpu" else DEVICE_TRANSPORT_ENV
                    for key, value in env.items():
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
        self.runtime = UcxRuntime.get(pool.device.type, settings.tune_transport_env)
        self._copy_stream = _CopyStream(pool.device)
        self._endpoints: set = set()
        # in-place chunks admitted on the side channel, awaiting their commit
        self._admitted: dict[tuple[str, int], tuple[kv_pb2.KVTransferHeader, list[int], float]] = {}
        self._admitted_lock = threading.Lock()  # one control thread per sender + expiry
        self._listener = self.runtime.call(self._listen(), settings.connect_timeout_s)
        # in-place chunks are served even without an exported pool: the protocol does not
        # care how the bytes got there (tests write them in-process on the CPU)
        self._control = ControlServer(self._in_place_chunk, host=settings.host,
                                      port=settings.control_port,
                                      on_idle=self._expire_admissions)
        export = export_pool(pool) if settings.direct_gpu else {}
        self._side = SideChannelServer(hello, f"{settings.host}:{self._listener.port}",
                                       host=settings.host, port=settings.side_channel_port,
                                       export={**export,
                                               "control_address": self._control.address})

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
                seen.add(header.transfer_id)
                await self._receive_chunk(ep, header)
        except Exception as exc:  # endpoint closed or broken: fail what it carried
            for transfer_id in seen:
                self.table.finish(transfer_id, TransferState.FAILED,
                                  f"sender endpoint closed: {type(exc).__name__}: {exc}")
        finally:
            self._endpoints.discard(ep)

    def _admit(self, header: kv_pb2.KVTransferHeader, in_place: bool
               ) -> tuple[kv_pb2.KVChunkReply, list[int] | None]:
        """The reply to a chunk header: REJECTED, STORED for an abort notice, or ACCEPTED
        with the destination blocks, then held until the chunk is stored or given up."""
        reply = kv_pb2.KVChunkReply(transfer_id=header.transfer_id,
                                    chunk_index=header.chunk_index)
        try:
            if header.written_in_place != in_place and not header.abort_reason:
                raise ChunkRejected("in-place chunks are admitted on the side channel, "
                                    "payload chunks on the data endpoint")
            blocks = admit_chunk(self.table, header, self.pool.spec)
        except ChunkRejected as exc:
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, str(exc)
            return reply, None
        if blocks is None:   # abort notice
            reply.status = kv_pb2.KVChunkReply.STORED
            return reply, None
        reply.status = kv_pb2.KVChunkReply.ACCEPTED
        self.table.hold(header.transfer_id)
        return reply, blocks

    async def _receive_chunk(self, ep, header: kv_pb2.KVTransferHeader) -> None:
        reply, blocks = self._admit(header, in_place=False)
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
                store_chunk(self.table, header, blocks, seconds)
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
    def _in_place_chunk(self, request: kv_pb2.SideChannelRequest) -> kv_pb2.KVChunkReply:
        if request.WhichOneof("kind") == "chunk_header":
            return self._admit_in_place(request.chunk_header)
        return self._commit_in_place(request.chunk_written)

    def _admit_in_place(self, header: kv_pb2.KVTransferHeader) -> kv_pb2.KVChunkReply:
        reply, blocks = self._admit(header, in_place=True)
        if blocks is not None:
            with self._admitted_lock:
                self._admitted[(header.transfer_id, header.chunk_index)] = (
                    header, blocks, time.monotonic())
        return reply

    def _commit_in_place(self, written: kv_pb2.KVChunkReply) -> kv_pb2.KVChunkReply:
        reply = kv_pb2.KVChunkReply(transfer_id=written.transfer_id,
                                    chunk_index=written.chunk_index)
        with self._admitted_lock:
            entry = self._admitted.pop((written.transfer_id, written.chunk_index), None)
        if entry is None:
            reply.status = kv_pb2.KVChunkReply.REJECTED
            reply.error = "chunk was not admitted, or its admission expired"
            return reply
        header, blocks, admitted_at = entry
        try:
            store_chunk(self.table, header, blocks, time.monotonic() - admitted_at)
            reply.status = kv_pb2.KVChunkReply.STORED
        finally:
            self.table.unhold(header.transfer_id)
        return reply

    def _expire_admissions(self) -> None:
        """A sender that admitted a chunk and never committed it (died mid-copy) must not
        hold the blocks forever: after io_timeout_s the transfer fails and lets go."""
        now = time.monotonic()
        with self._admitted_lock:
            stale = [key for key, (_, _, at) in self._admitted.items()
                     if now - at > self.settings.io_timeout_s]
            expired = [self._admitted.pop(key)[0] for key in stale]
        for header in expired:
            self.table.finish(header.transfer_id, TransferState.FAILED,
                              "sender did not commit an in-place chunk within "
                              f"{self.settings.io_timeout_s:g}s")
            self.table.unhold(header.transfer_id)

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
    control: ControlClient | None = None  # in-place chunks: used by `direct` only
    # one sender thread per same-host peer: a receiver that stops answering stalls only
    # the chunks bound for it (each waits up to io_timeout_s), not every peer's
    direct: ThreadPoolExecutor | None = None


def _run_on(peer: _Peer, fn, *args) -> bool:
    """Queue fn on the peer's sender thread; False once that thread was shut down (the
    peer failed and was forgotten between lookup and submit)."""
    try:
        peer.direct.submit(fn, *args)
    except RuntimeError:
        return False
    return True


class UcxSender(ChunkedSender):
    name = "ucx"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: UcxSettings = UcxSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self.settings = settings
        self.runtime = UcxRuntime.get(pool.device.type, settings.tune_transport_env)
        self._copy_stream = _CopyStream(pool.device)
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()

    def connected(self, address: str) -> bool:
        return self._peer(address) is not None

    def connect(self, address: str) -> None:
        with self._peers_lock:
            if address in self._peers:
                return
        reply = request_handshake(address, self.hello, self.settings.connect_timeout_s)
        peer = self.runtime.call(self._new_peer(address, reply.data_address),
                                 self.settings.connect_timeout_s)
        if self.settings.direct_gpu and not self.settings.checksum and reply.control_address:
            peer.remote_pool = open_pool(reply, self.pool)
        if peer.remote_pool is not None:
            peer.control = ControlClient(reply.control_address, self.settings.io_timeout_s)
            peer.direct = ThreadPoolExecutor(1, thread_name_prefix="kv-in-place")
        else:
            try:
                self.runtime.call(self._open(peer), self.settings.connect_timeout_s + 1)
            except Exception as exc:
                raise ConnectorError(f"ucx endpoint to {reply.data_address} (side channel "
                                     f"{address}) failed: {type(exc).__name__}: {exc}") from exc
        with self._peers_lock:
            kept = self._peers.setdefault(address, peer)
        if kept is not peer and peer.direct is not None:  # a concurrent connect won
            peer.direct.shutdown(wait=False)

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
        elif not _run_on(peer, self._send_in_place, peer, chunk):
            self.fail(chunk.transfer_id, f"connection to {chunk.address} was dropped")

    # ---- same-host GPU peers: copy into the mapped pool, control on the side channel ----
    def _send_in_place(self, peer: _Peer, chunk: Chunk) -> None:
        try:
            if self.table.get(chunk.transfer_id).state.terminal:
                return
        except KeyError:  # released meanwhile
            return
        self.table.hold(chunk.transfer_id)
        try:
            # admitted while the prefill still computes the chunk: off the critical path
            header = self._admit_in_place(peer, chunk)
            if header is None:
                return
            queued = time.perf_counter()
            chunk.wait_ready()
            log.debug("in-place chunk %s/%d: device ready after %.2f ms", chunk.transfer_id,
                      chunk.index, 1000 * (time.perf_counter() - queued))
            self._copy_commit(peer, chunk, header)
        except Exception as exc:  # side channel silent, device copy failed: this peer is done
            self.fail(chunk.transfer_id, f"in-place send to {peer.side_channel} failed: "
                                         f"{type(exc).__name__}: {exc}")
            peer.control.close()
            self._forget_peer(peer)  # a restarted receiver gets a fresh handshake
            peer.direct.shutdown(wait=False)  # chunks already queued still end (FAILED)
        finally:
            self.table.unhold(chunk.transfer_id)

    def _admit_in_place(self, peer: _Peer, chunk: Chunk) -> kv_pb2.KVTransferHeader | None:
        """Hold the chunk's destination blocks on the receiver; None if refused."""
        started = time.perf_counter()
        header = chunk_header(self.pool.spec, transfer_id=chunk.transfer_id,
                              chunk_index=chunk.index, last=chunk.last,
                              dst_runs=[(d, n) for _, d, n in chunk.runs],
                              first_token=chunk.first_token)
        header.written_in_place = True
        if not self._control(peer, kv_pb2.SideChannelRequest(chunk_header=header),
                             kv_pb2.KVChunkReply.ACCEPTED, chunk):
            return None
        log.debug("in-place chunk %s/%d: admitted in %.2f ms", chunk.transfer_id,
                  chunk.index, 1000 * (time.perf_counter() - started))
        return header

    def _copy_commit(self, peer: _Peer, chunk: Chunk, header: kv_pb2.KVTransferHeader) -> None:
        started = time.perf_counter()
        self._write_in_place(peer.remote_pool, chunk)
        copied = time.perf_counter()
        written = kv_pb2.KVChunkReply(transfer_id=chunk.transfer_id, chunk_index=chunk.index,
                                      status=kv_pb2.KVChunkReply.STORED)
        if not self._control(peer, kv_pb2.SideChannelRequest(chunk_written=written),
                             kv_pb2.KVChunkReply.STORED, chunk):
            return
        done = time.perf_counter()
        self._chunk_done(chunk, header.payload_bytes, done - started)
        log.debug("in-place chunk %s/%d (%d blocks, %d runs): copy %.2f ms, commit %.2f ms",
                  chunk.transfer_id, chunk.index, chunk.num_blocks, len(chunk.runs),
                  1000 * (copied - started), 1000 * (done - copied))

    def _control(self, peer: _Peer, request, expected, chunk: Chunk) -> bool:
        """One side-channel round trip; False (transfer failed) unless `expected`."""
        reply = peer.control.call(request).chunk
        if reply.status == expected:
            return True
        self.fail(chunk.transfer_id, f"receiver answered chunk {chunk.index} with "
                                     f"{kv_pb2.KVChunkReply.Status.Name(reply.status)}: "
                                     f"{reply.error}")
        return False

    def _chunk_done(self, chunk: Chunk, nbytes: int, seconds: float) -> None:
        self.table.record_chunk(chunk.transfer_id, blocks=chunk.dst_block_ids,
                                nbytes=nbytes, seconds=seconds, sent=True)
        if chunk.last:
            self.table.finish(chunk.transfer_id, TransferState.DONE)

    def _abort_in_place(self, peer: _Peer, transfer_id: str, chunk_index: int,
                        reason: str) -> None:
        try:
            peer.control.call(kv_pb2.SideChannelRequest(
                chunk_header=abort_header(transfer_id, chunk_index, reason)))
        except ConnectorError:
            pass  # the receiver's lease frees its blocks

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

    def _write_in_place(self, remote, chunk: Chunk) -> None:
        """Device copy of the chunk's blocks into the receiver's mapped pool."""
        device = self.pool.device
        with self._copy_stream:  # synced on exit: done before the receiver is told
            if len(chunk.runs) <= self.settings.copy_runs_max:
                # one device memcpy per contiguous run: no staging buffer, copy bandwidth
                for s, d, n in chunk.runs:
                    remote.kv[d:d + n].copy_(self.pool.kv[s:s + n], non_blocking=True)
                return
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
