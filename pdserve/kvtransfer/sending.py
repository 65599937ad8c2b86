"""Shared sending-side plumbing for point-to-point connectors (local, ucx).

A sender's transfer: begin() handshakes with the receiver (once per address) and
registers the transfer PENDING; each send_chunk() pairs source and destination blocks
into contiguous runs and hands a Chunk to the backend's _submit(), which must deliver
chunks of one transfer in order, call chunk.wait_ready() on its own thread before reading
the source blocks, and report through the table (record_chunk / finish).
The first delivered chunk moves the transfer to IN_FLIGHT, the last one to DONE.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Sequence

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.base import (ConnectorMetrics, KVDestination, KVSender, ReadyEvent,
                                     ReleaseCallback, TransferState, TransferStatus)
from pdserve.kvtransfer.messages import HandshakeInfo
from pdserve.kvtransfer.transfers import (TransferTable, chunk_destination, chunk_run_starts,
                                         paired_runs)


@dataclass(frozen=True)
class Chunk:
    transfer_id: str
    address: str
    index: int
    runs: tuple[tuple[int, int, int], ...]   # (src_first, dst_first, count)
    last: bool
    start: int = 0                           # transfer position of the first block
    ready: ReadyEvent | None = None          # device work that writes the source blocks
    first_token: int | None = None           # last chunk: the prompt's sampled token

    def wait_ready(self) -> None:
        """Block (on the sender's thread) until the source blocks are written."""
        if self.ready is not None:
            self.ready.synchronize()

    @property
    def src_block_ids(self) -> list[int]:
        return [s + i for s, _, n in self.runs for i in range(n)]

    @property
    def dst_block_ids(self) -> list[int]:
        return [d + i for _, d, n in self.runs for i in range(n)]

    @property
    def num_blocks(self) -> int:
        return sum(n for _, _, n in self.runs)


class ChunkedSender(KVSender):
    def __init__(self, pool: KVCachePool, hello: HandshakeInfo, *, lease_s: float) -> None:
        self.pool = pool
        self.hello = hello
        self.metrics = ConnectorMetrics(self.name)
        self.table = TransferTable(self.metrics, lease_s)
        self._closed = False

    def begin(self, destination: KVDestination, *, lease_s: float | None = None,
              on_release: ReleaseCallback | None = None) -> None:
        self.connect(destination.address)
        record = self.table.add(destination, (), lease_s=lease_s, on_release=on_release)
        record.destination_run_starts  # noqa: B018 (computed now, off the chunks' path)

    def send_chunk(self, transfer_id: str, src_block_ids: Sequence[int], *, start: int,
                   last: bool, ready: ReadyEvent | None = None,
                   first_token: int | None = None) -> None:
        record = self.table.get(transfer_id)
        destination = record.destination
        dst_block_ids = chunk_destination(destination, src_block_ids, start)
        runs = paired_runs(list(src_block_ids), dst_block_ids, chunk_run_starts(
            record.destination_run_starts, start, len(dst_block_ids)))
        index = self.table.mark_queued(transfer_id, last, src_block_ids)
        self._submit(Chunk(transfer_id, destination.address, index, tuple(runs), last, start,
                           ready, first_token))

    def abort(self, transfer_id: str, reason: str = "") -> None:
        record = self.table.get(transfer_id)
        if self.table.finish(transfer_id, TransferState.CANCELLED, reason or "aborted"):
            self._submit_abort(record.destination.address, transfer_id,
                               record.chunks_queued, reason or "aborted")

    def poll(self) -> dict[str, TransferStatus]:
        return self.table.statuses()

    def release(self, transfer_id: str) -> None:
        if transfer_id in self.table.active_ids():
            self.abort(transfer_id, "released while active")
        self.table.remove(transfer_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for transfer_id in self.table.active_ids():
            self.table.finish(transfer_id, TransferState.CANCELLED, "sender closed")
        self._shutdown()

    def fail(self, transfer_id: str, error: str) -> None:
        self.table.finish(transfer_id, TransferState.FAILED, error)

    @abstractmethod
    def _submit(self, chunk: Chunk) -> None: ...

    @abstractmethod
    def _submit_abort(self, address: str, transfer_id: str, chunk_index: int,
                      reason: str) -> None: ...

    @abstractmethod
    def _shutdown(self) -> None: ...
