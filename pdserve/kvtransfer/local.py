"""`local` connector: same-process transfers, for tests and single-process setups.

Receivers register under "local://<name>" in a process-wide directory. A sender's
connect() runs the same protobuf handshake as the network connectors (encoded and
decoded, mismatch refused); each chunk goes as a serialized KVTransferHeader plus the
source run views, and the receiver copies the runs into its destination blocks on the
sender's worker thread. Transfer lifecycle: see base.py; a receiver that closed makes
the sender's pending chunks FAILED.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.base import ConnectorError, HandshakeError, TransferState
from pdserve.kvtransfer.messages import (HandshakeInfo, abort_header, check_handshake,
                                         chunk_header, handshake_mismatches)
from pdserve.kvtransfer.receiving import RegisteringReceiver
from pdserve.kvtransfer.sending import Chunk, ChunkedSender
from pdserve.kvtransfer.transfers import ChunkRejected, admit_chunk, store_chunk
from pdserve.wire import kv_pb2

_DIRECTORY: dict[str, "LocalReceiver"] = {}
_DIRECTORY_LOCK = threading.Lock()
_NAMES = itertools.count()


@dataclass(frozen=True)
class LocalSettings:
    name: str = ""                  # receiver name ("" = generated)
    lease_s: float = 30.0


def _lookup(address: str) -> "LocalReceiver":
    with _DIRECTORY_LOCK:
        receiver = _DIRECTORY.get(address)
    if receiver is None:
        raise ConnectorError(f"no local KV receiver at {address} (gone or never started)")
    return receiver


class LocalReceiver(RegisteringReceiver):
    name = "local"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: LocalSettings = LocalSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self._address = f"local://{settings.name or f'receiver-{next(_NAMES)}'}"
        with _DIRECTORY_LOCK:
            if self._address in _DIRECTORY:
                raise ValueError(f"{self._address} already in use")
            _DIRECTORY[self._address] = self

    @property
    def address(self) -> str:
        return self._address

    def answer_handshake(self, request: bytes) -> bytes:
        remote = HandshakeInfo.from_proto(kv_pb2.HandshakeRequest.FromString(request).hello)
        problems = handshake_mismatches(self.hello, remote)
        return kv_pb2.HandshakeReply(
            accepted=not problems, hello=self.hello.to_proto(),
            error="KV handshake refused: " + "; ".join(problems) if problems else "",
            data_address=self._address).SerializeToString()

    def receive_chunk(self, header_bytes: bytes, sources: list[torch.Tensor]) -> bytes:
        """Apply one chunk: header (serialized KVTransferHeader) + one source byte view
        per run. Returns a serialized KVChunkReply."""
        header = kv_pb2.KVTransferHeader.FromString(header_bytes)
        reply = kv_pb2.KVChunkReply(transfer_id=header.transfer_id,
                                    chunk_index=header.chunk_index)
        started = time.perf_counter()
        try:
            blocks = admit_chunk(self.table, header, self.pool.spec)
        except ChunkRejected as exc:
            reply.status, reply.error = kv_pb2.KVChunkReply.REJECTED, str(exc)
            return reply.SerializeToString()
        if blocks is not None:
            for run, source in zip(header.runs, sources):
                self.pool.block_run_bytes(run.first, run.count).copy_(source)
            store_chunk(self.table, header, blocks, time.perf_counter() - started,
                        header.payload_bytes)
        reply.status = kv_pb2.KVChunkReply.STORED
        return reply.SerializeToString()

    def _shutdown(self) -> None:
        with _DIRECTORY_LOCK:
            _DIRECTORY.pop(self._address, None)


class LocalSender(ChunkedSender):
    name = "local"

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: LocalSettings = LocalSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self._connected: set[str] = set()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kv-local-send")

    def connected(self, address: str) -> bool:
        return address in self._connected

    def connect(self, address: str) -> None:
        if address in self._connected:
            return
        request = kv_pb2.HandshakeRequest(hello=self.hello.to_proto()).SerializeToString()
        reply = kv_pb2.HandshakeReply.FromString(_lookup(address).answer_handshake(request))
        if not reply.accepted:
            raise HandshakeError(reply.error)
        check_handshake(self.hello, HandshakeInfo.from_proto(reply.hello))
        self._connected.add(address)

    def _submit(self, chunk: Chunk) -> None:
        self._worker.submit(self._deliver, chunk)

    def _deliver(self, chunk: Chunk) -> None:
        if self.table.get(chunk.transfer_id).state.terminal:
            return
        started = time.perf_counter()
        header = chunk_header(self.pool.spec, transfer_id=chunk.transfer_id,
                              chunk_index=chunk.index, last=chunk.last,
                              dst_runs=[(d, n) for _, d, n in chunk.runs],
                              first_token=chunk.first_token)
        chunk.wait_ready()
        sources = [self.pool.block_run_bytes(s, n) for s, _, n in chunk.runs]
        try:
            reply_bytes = _lookup(chunk.address).receive_chunk(header.SerializeToString(),
                                                               sources)
        except ConnectorError as exc:
            self.fail(chunk.transfer_id, str(exc))
            return
        reply = kv_pb2.KVChunkReply.FromString(reply_bytes)
        if reply.status != kv_pb2.KVChunkReply.STORED:
            self.fail(chunk.transfer_id, f"receiver refused chunk {chunk.index}: {reply.error}")
            return
        self.table.record_chunk(chunk.transfer_id, blocks=chunk.dst_block_ids,
                                nbytes=header.payload_bytes,
                                seconds=time.perf_counter() - started, sent=True)
        if chunk.last:
            self.table.finish(chunk.transfer_id, TransferState.DONE)

    def _submit_abort(self, address: str, transfer_id: str, chunk_index: int,
                      reason: str) -> None:
        def notify() -> None:
            try:
                _lookup(address).receive_chunk(
                    abort_header(transfer_id, chunk_index, reason).SerializeToString(), [])
            except ConnectorError:
                pass
        self._worker.submit(notify)

    def _shutdown(self) -> None:
        self._worker.shutdown(wait=True)
