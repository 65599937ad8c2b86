"""The tag-message path, both directions: a chunk's header, its raw bytes and the two
replies travel as UCX tag messages on one endpoint per peer (the exchange is drawn in
the package docstring). Used for every peer the in-place path cannot reach: another
host, a host-memory pool, checksums on.

TagReceiving and TagSending are mixed into UcxReceiver and UcxSender, which provide
pool, table, settings, runtime and copy_stream (and, on the sender, fail() and
_forget_peer()); what only this path needs (the listener, the endpoints) it keeps
itself."""

from __future__ import annotations

import asyncio
import time

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


class TagReceiving:
    """The decode side: a ucxx listener; on each endpoint, chunk after chunk."""

    def _start_listener(self):
        self._endpoints: set = set()
        return self.runtime.call(self._listen(), self.settings.connect_timeout_s)

    async def _listen(self):
        return self.runtime.ucxx.create_listener(self._serve_endpoint,
                                                 port=self.settings.data_port)

    async def _serve_endpoint(self, ep) -> None:
        seen: set[str] = set()
        self._endpoints.add(ep)
        try:
            while True:
                header = kv_pb2.KVTransferHeader.FromString(bytes(await ep.recv_obj()))
                if not seen and not known_transfer(self.table, header.transfer_id):
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
        # staging: flat uint8 [len(dst) * block_bytes], viewed as [len(dst), *block_shape]
        staging = torch.empty(len(dst) * pool.spec.bytes_per_block, dtype=torch.uint8,
                              device=pool.device)
        await asyncio.wait_for(ep.recv(_wire_buffer(staging)), self.settings.io_timeout_s)
        with self.copy_stream:  # synced on exit: STORED means readable by the engine
            blocks = staging.view(pool.kv.dtype).view(len(dst), *pool.spec.block_shape)
            index = torch.tensor(dst, dtype=torch.long, device=pool.device)
            pool.kv.index_copy_(0, index, blocks)

    def _corrupt_runs(self, header: kv_pb2.KVTransferHeader) -> list[int]:
        if header.checksum_kind == kv_pb2.CHECKSUM_NONE:
            return []
        return [i for i, (run, expected) in enumerate(zip(header.runs, header.run_checksums))
                if run_checksum(self.pool.block_run_bytes(run.first, run.count)) != expected]

    def _stop_listener(self) -> None:
        async def stop() -> None:
            for ep in list(self._endpoints):
                ep.abort()
            self._listener.close()
        try:
            self.runtime.call(stop(), 5.0)
        except Exception:
            pass


class TagSending:
    """The prefill side: one endpoint per peer, held (peer.lock) for a chunk's whole
    exchange; on a CPU pool closed again after idle_close_s without use."""

    def _connect_endpoint(self, peer: Peer, address: str) -> None:
        try:
            self.runtime.call(self._open(peer), self.settings.connect_timeout_s + 1)
        except Exception as exc:
            raise ConnectorError(f"ucx endpoint to {peer.data_address} (side channel "
                                 f"{address}) failed: {type(exc).__name__}: {exc}") from exc

    async def _open(self, peer: Peer):
        if peer.endpoint is None:
            host, port = peer.data_address.rsplit(":", 1)
            peer.endpoint = await self.runtime.ucxx.create_endpoint(
                host, int(port), connect_timeout=self.settings.connect_timeout_s)
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
                peer.uses += 1
                self._close_when_idle(peer)

    def _close_when_idle(self, peer: Peer) -> None:
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

    def _active_to(self, address: str) -> bool:
        for transfer_id in self.table.active_ids():
            try:
                if self.table.get(transfer_id).destination.address == address:
                    return True
            except KeyError:  # released meanwhile
                continue
        return False

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
                await _send_message(ep, abort_header(transfer_id, chunk_index, reason), 2.0)
                await _recv_reply(ep, 2.0)
            except Exception:
                self._drop_endpoint(peer)
