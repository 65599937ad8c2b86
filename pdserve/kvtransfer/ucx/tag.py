"""The tag-message path, both directions: a chunk's header, its raw bytes and the two
replies travel as UCX tag messages (the exchange is drawn in the package docstring).
Used for every peer the in-place path cannot reach: another host, a host-memory pool,
checksums on.

No listener: a UCX listener binds every interface (ucxx takes a port, no address), so
each side makes an endpoint to the other's UCX worker address instead. The sender names
its worker, a fresh even tag and its sender id in the (authenticated) handshake; the
receiver connects back there and serves that tag: headers and runs arrive on `tag`,
replies leave on `tag ^ 1`. Receives are posted on the endpoint to the peer, so when the
peer's process dies UCX cancels them and the transfers it carried fail at once. UCX's
own TCP transport listens on the KV interface only (runtime.net_devices_env), on a port
of the worker's data range (runtime.data_ports_env) when one is configured.

TagReceiving and TagSending are mixed into UcxReceiver and UcxSender, which provide
pool, table, settings, runtime and copy_stream (and, on the sender, fail() and
_forget_peer()); what only this path needs (connections, endpoints) it keeps itself."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import torch

from pdserve.kvtransfer.base import ConnectorError, TransferState
from pdserve.kvtransfer.messages import abort_header, chunk_header, run_checksum
from pdserve.kvtransfer.sending import Chunk
from pdserve.kvtransfer.transfers import (ChunkRejected, InvalidTransition, UnknownTransfer,
                                         admit_chunk, store_chunk)
from pdserve.kvtransfer.transport_report import endpoint_transports
from pdserve.kvtransfer.ucx.common import (known_transfer, log, record_sent_chunk,
                                           rejection_reason)
from pdserve.kvtransfer.ucx.peer import Peer
from pdserve.wire import kv_pb2

MAX_MESSAGE_BYTES = 64 << 20  # a header or reply; a larger length prefix is a broken stream


def _wire_buffer(run: torch.Tensor):
    """A pool byte view in the form ucxx takes: numpy on the host, the tensor on CUDA."""
    return run.numpy() if run.device.type == "cpu" else run


def new_tag() -> int:
    """A connection's tag: random, even (its replies travel on tag ^ 1)."""
    return int.from_bytes(os.urandom(8), "little") & ~1


async def _send_bytes(ep, body: bytes, tag: int) -> None:
    """One message as two tag sends: its length (8 bytes), then its bytes."""
    await ep.send(np.array([len(body)], dtype=np.uint64), tag=tag, force_tag=True)
    if body:
        await ep.send(np.frombuffer(body, dtype=np.uint8), tag=tag, force_tag=True)


async def _recv_bytes(ep, tag: int) -> bytes:
    size = np.zeros(1, dtype=np.uint64)
    await ep.recv(size, tag=tag, force_tag=True)
    nbytes = int(size[0])
    if nbytes > MAX_MESSAGE_BYTES:
        raise ConnectorError(f"KV message of {nbytes} bytes announced (at most "
                             f"{MAX_MESSAGE_BYTES}): broken stream")
    body = bytearray(nbytes)
    if nbytes:
        await ep.recv(body, tag=tag, force_tag=True)
    return bytes(body)


async def _send_message(ep, message, tag: int, timeout_s: float) -> None:
    await asyncio.wait_for(_send_bytes(ep, message.SerializeToString(), tag), timeout_s)


async def _recv_reply(ep, tag: int, timeout_s: float) -> kv_pb2.KVChunkReply:
    """The receiver's reply; raises if it is the receiver's goodbye (no transfer id:
    it closed this connection)."""
    reply = kv_pb2.KVChunkReply.FromString(await asyncio.wait_for(_recv_bytes(ep, tag),
                                                                  timeout_s))
    if not reply.transfer_id:
        raise ConnectorError(f"the receiver closed the connection: {reply.error}")
    return reply


async def _wait_ready(chunk: Chunk) -> None:
    """The chunk's source blocks are written; waits off the event loop's thread."""
    if chunk.ready is not None:
        await asyncio.get_running_loop().run_in_executor(None, chunk.wait_ready)


class _Connection:
    """The receiver's end of one sender's tag path: the endpoint back to the sender's
    worker and the task serving the connection's tag."""

    def __init__(self, ep, tag: int) -> None:
        self.ep, self.tag = ep, tag
        self.task: asyncio.Task | None = None

    async def close(self, reason: str) -> None:
        """Tell the sender (its pending reply fails now, not after io_timeout_s), then
        stop serving."""
        try:
            await _send_message(self.ep, kv_pb2.KVChunkReply(
                status=kv_pb2.KVChunkReply.REJECTED, error=reason), self.tag ^ 1, 1.0)
        except Exception:
            pass
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.ep.abort()


class TagReceiving:
    """The decode side: one connection per sender, opened by its handshake; on each,
    chunk after chunk."""

    def _start_tag_path(self) -> bytes:
        """Returns this worker's UCX address (handed to senders in the handshake)."""
        self._connections: dict[int, _Connection] = {}  # sender id -> connection
        return self.runtime.worker_address(self.settings.connect_timeout_s)

    def _accept_sender(self, request: kv_pb2.HandshakeRequest) -> dict:
        """The side channel's on_accept hook (its thread): serve the sender's tag path."""
        if request.HasField("ucx"):
            if request.ucx.tag & 1:
                raise ValueError("the UCX connection's tag must be even")
            self.runtime.call(self._connect_back(request.ucx),
                              self.settings.connect_timeout_s + 1)
        return {"ucx_worker_address": self._ucx_address}

    async def _connect_back(self, ucx: kv_pb2.UcxConnection) -> None:
        old = self._connections.pop(ucx.sender_id, None)
        if old is not None:  # the sender handshook again: it dropped that connection
            await old.close("replaced by a new handshake")
        ucxx = self.runtime.ucxx
        ep = await ucxx.create_endpoint_from_worker_address(
            ucxx.get_ucx_address_from_buffer(ucx.worker_address))
        connection = _Connection(ep, ucx.tag)
        self._connections[ucx.sender_id] = connection
        connection.task = asyncio.get_running_loop().create_task(
            self._serve_connection(ucx.sender_id, connection))

    async def _serve_connection(self, sender_id: int, connection: _Connection) -> None:
        seen: set[str] = set()
        ep, tag = connection.ep, connection.tag
        try:
            while True:
                header = kv_pb2.KVTransferHeader.FromString(await _recv_bytes(ep, tag))
                if not seen and not known_transfer(self.table, header.transfer_id):
                    # defence in depth (the sender authenticated): a connection that does
                    # not open with a transfer this receiver expects is dropped
                    log.warning("KV data: dropped a connection whose first message names "
                                "no expected transfer")
                    await connection.close("the first chunk names no expected transfer")
                    return
                seen.add(header.transfer_id)
                await self._receive_chunk(connection, header)
        except BaseException as exc:  # sender gone, a broken stream, replaced or closed
            for transfer_id in seen:
                self.table.finish(transfer_id, TransferState.FAILED,
                                  f"sender connection closed: {type(exc).__name__}: {exc}")
            if not isinstance(exc, Exception):
                raise
            await connection.close(f"{type(exc).__name__}: {exc}")  # a live sender learns
        finally:
            if self._connections.get(sender_id) is connection:
                del self._connections[sender_id]
                ep.abort()

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
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, rejection_reason(exc)
            return reply, None
        reply.status = kv_pb2.KVChunkReply.STORED if blocks is None else \
            kv_pb2.KVChunkReply.ACCEPTED   # STORED: an abort notice, nothing to receive
        return reply, blocks

    async def _receive_chunk(self, connection: _Connection,
                             header: kv_pb2.KVTransferHeader) -> None:
        ep, tag, timeout = connection.ep, connection.tag, self.settings.io_timeout_s
        reply, blocks = self._admit(header)
        if blocks is None:
            await _send_message(ep, reply, tag ^ 1, timeout)
            return
        try:
            await _send_message(ep, reply, tag ^ 1, timeout)
            started = time.perf_counter()
            if header.packed:
                await self._receive_packed(connection, header)
            else:
                for run in header.runs:
                    target = self.pool.block_run_bytes(run.first, run.count)
                    await asyncio.wait_for(ep.recv(_wire_buffer(target), tag=tag,
                                                   force_tag=True), timeout)
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
        await _send_message(ep, reply, tag ^ 1, timeout)

    async def _receive_packed(self, connection: _Connection,
                              header: kv_pb2.KVTransferHeader) -> None:
        """One message holding every run's blocks back to back; scatter it into place."""
        pool = self.pool
        dst = [r.first + i for r in header.runs for i in range(r.count)]
        # staging: flat uint8 [len(dst) * block_bytes], viewed as [len(dst), *block_shape]
        staging = torch.empty(len(dst) * pool.spec.bytes_per_block, dtype=torch.uint8,
                              device=pool.device)
        await asyncio.wait_for(connection.ep.recv(_wire_buffer(staging), tag=connection.tag,
                                                  force_tag=True), self.settings.io_timeout_s)
        with self.copy_stream:  # synced on exit: STORED means readable by the engine
            blocks = staging.view(pool.kv.dtype).view(len(dst), *pool.spec.block_shape)
            index = torch.tensor(dst, dtype=torch.long, device=pool.device)
            pool.kv.index_copy_(0, index, blocks)

    def _corrupt_runs(self, header: kv_pb2.KVTransferHeader) -> list[int]:
        if header.checksum_kind == kv_pb2.CHECKSUM_NONE:
            return []
        return [i for i, (run, expected) in enumerate(zip(header.runs, header.run_checksums))
                if run_checksum(self.pool.block_run_bytes(run.first, run.count)) != expected]

    def _stop_tag_path(self) -> None:
        async def stop() -> None:
            for connection in list(self._connections.values()):
                await connection.close("KV receiver closed")
            self._connections.clear()
        try:
            self.runtime.call(stop(), 5.0)
        except Exception:
            pass


class TagSending:
    """The prefill side: one endpoint per peer, held (peer.lock) for a chunk's whole
    exchange."""

    def _start_tag_sending(self) -> None:
        self._sender_id = int.from_bytes(os.urandom(8), "little")
        self._ucx_address = self.runtime.worker_address(self.settings.connect_timeout_s)

    def _tag_connection(self) -> kv_pb2.UcxConnection:
        """This sender's end of a new tag path, for the handshake."""
        return kv_pb2.UcxConnection(worker_address=self._ucx_address, tag=new_tag(),
                                    sender_id=self._sender_id)

    def _connect_endpoint(self, peer: Peer, address: str) -> None:
        try:
            self.runtime.call(self._open(peer), self.settings.connect_timeout_s + 1)
        except Exception as exc:
            raise ConnectorError(f"ucx endpoint to {peer.data_address} (side channel "
                                 f"{address}) failed: {type(exc).__name__}: {exc}") from exc

    async def _open(self, peer: Peer):
        if peer.endpoint is None:
            ucxx = self.runtime.ucxx
            peer.endpoint = await ucxx.create_endpoint_from_worker_address(
                ucxx.get_ucx_address_from_buffer(peer.ucx_address))
        return peer.endpoint

    async def _lanes(self, peer: Peer) -> list:
        return endpoint_transports(peer.endpoint)

    async def _send_chunk(self, peer: Peer, chunk: Chunk) -> None:
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

    async def _exchange_chunk(self, peer: Peer, chunk: Chunk) -> None:
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
        ep, tag = await self._open(peer), peer.tag
        started = time.perf_counter()
        await _send_message(ep, header, tag, timeout)
        reply = await _recv_reply(ep, tag ^ 1, timeout)
        if reply.status != kv_pb2.KVChunkReply.ACCEPTED:
            self.fail(chunk.transfer_id, f"receiver refused chunk {chunk.index}: {reply.error}")
            return
        for run in ([payload] if payload is not None else runs):
            await asyncio.wait_for(ep.send(_wire_buffer(run), tag=tag, force_tag=True), timeout)
        reply = await _recv_reply(ep, tag ^ 1, timeout)
        if reply.status != kv_pb2.KVChunkReply.STORED:
            self.fail(chunk.transfer_id, f"receiver did not store chunk {chunk.index}: "
                                         f"{kv_pb2.KVChunkReply.Status.Name(reply.status)} "
                                         f"{reply.error}")
            return
        record_sent_chunk(self.table, chunk, header.payload_bytes,
                          time.perf_counter() - started)

    def _should_pack(self, chunk: Chunk) -> bool:
        """Many short runs cost a message each; one gather copy on the device is cheaper."""
        return len(chunk.runs) > self.settings.pack_above_runs and not self.settings.checksum

    def _pack(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's source blocks gathered back to back: flat uint8 [n * block_bytes]."""
        pool = self.pool
        with self.copy_stream:  # source blocks are final: the prefill worker synced
            index = torch.tensor(chunk.src_block_ids, dtype=torch.long, device=pool.device)
            packed = pool.kv.index_select(0, index).reshape(-1).view(torch.uint8)
        return packed

    def _drop_endpoint(self, peer: Peer) -> None:
        if peer.endpoint is not None:
            try:
                peer.endpoint.abort()
            except Exception:
                pass
            peer.endpoint = None

    async def _retire(self, peer: Peer) -> None:
        self._drop_endpoint(peer)

    async def _send_abort(self, peer: Peer, transfer_id: str, chunk_index: int,
                          reason: str) -> None:
        async with peer.lock:
            try:
                ep = await self._open(peer)
                await _send_message(ep, abort_header(transfer_id, chunk_index, reason),
                                    peer.tag, 2.0)
                await _recv_reply(ep, peer.tag ^ 1, 2.0)
            except Exception:
                self._drop_endpoint(peer)
                self._forget_peer(peer)  # its connection may be gone: handshake anew
