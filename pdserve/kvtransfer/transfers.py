"""Per-transfer bookkeeping shared by every connector: the state machine of base.py,
leases, progress counters, and run pairing.

A TransferTable is thread-safe: connector I/O threads record progress while the owner
polls. Transitions are checked (a terminal transfer never changes again) and entering a
terminal state fires the transfer's on_release callback exactly once, outside the lock.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

from pdserve.engine.kvcache.spec import KVCacheSpec
from pdserve.kvtransfer.base import (KVDestination, ConnectorMetrics, ReleaseCallback,
                                     TransferState, TransferStatus)
from pdserve.kvtransfer.messages import header_block_ids, header_problems

_ALLOWED = {
    TransferState.PENDING: {TransferState.IN_FLIGHT, TransferState.DONE, TransferState.FAILED,
                            TransferState.EXPIRED, TransferState.CANCELLED},
    TransferState.IN_FLIGHT: {TransferState.DONE, TransferState.FAILED, TransferState.EXPIRED,
                              TransferState.CANCELLED},
}


class InvalidTransition(RuntimeError):
    pass


class UnknownTransfer(KeyError):
    pass


@dataclass
class Transfer:
    """Mutable record of one transfer; only TransferTable changes it."""
    destination: KVDestination
    held_block_ids: list[int]                # what on_release hands back
    deadline: float                          # time.monotonic() of lease expiry
    on_release: ReleaseCallback | None = None
    state: TransferState = TransferState.PENDING
    blocks_done: int = 0
    bytes_moved: int = 0
    chunks_done: int = 0
    chunks_queued: int = 0
    last_queued: bool = False
    error: str = ""
    started: float | None = None
    finished: float | None = None
    filled: set[int] = field(default_factory=set)   # destination block ids stored
    io_holds: int = 0                 # chunks whose bytes are being read/written now
    release_pending: TransferStatus | None = None   # terminal while held: fire on unhold
    first_token: int | None = None    # receiver: came with the last chunk
    lease_s: float = 0.0              # each step of progress renews the lease this long

    def renew(self) -> None:
        """Progress (a chunk queued, sent or stored): the lease runs from now. A long
        prompt computed chunk by chunk keeps its transfer alive; a stalled one expires
        lease_s after its last progress."""
        self.deadline = max(self.deadline, time.monotonic() + self.lease_s)

    @property
    def transfer_id(self) -> str:
        return self.destination.transfer_id

    @cached_property
    def destination_run_starts(self) -> list[int]:
        """run_starts(destination.block_ids): a sender takes it at begin(), while the
        prompt computes, so pairing a chunk's blocks costs a pass over its source only."""
        return run_starts(self.destination.block_ids)

    def status(self) -> TransferStatus:
        end = self.finished if self.finished is not None else time.monotonic()
        return TransferStatus(
            transfer_id=self.transfer_id, state=self.state,
            blocks_total=len(self.destination.block_ids), blocks_done=self.blocks_done,
            bytes_moved=self.bytes_moved, chunks_done=self.chunks_done, error=self.error,
            seconds=(end - self.started) if self.started is not None else 0.0,
            first_token=self.first_token)


class TransferTable:
    def __init__(self, metrics: ConnectorMetrics, default_lease_s: float) -> None:
        self.metrics = metrics
        self.default_lease_s = default_lease_s
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}

    # -- registration -------------------------------------------------------------
    def add(self, destination: KVDestination, held_block_ids: Sequence[int], *,
            lease_s: float | None, on_release: ReleaseCallback | None) -> Transfer:
        lease = self.default_lease_s if lease_s is None else lease_s
        record = Transfer(destination=destination, held_block_ids=list(held_block_ids),
                          deadline=time.monotonic() + lease, on_release=on_release,
                          lease_s=lease)
        with self._lock:
            if destination.transfer_id in self._transfers:
                raise ValueError(f"transfer {destination.transfer_id!r} already registered")
            self._transfers[destination.transfer_id] = record
        return record

    def get(self, transfer_id: str) -> Transfer:
        with self._lock:
            record = self._transfers.get(transfer_id)
        if record is None:
            raise UnknownTransfer(transfer_id)
        return record

    def active(self, transfer_id: str) -> Transfer:
        """The record if it may still move data; expires it first when overdue.
        Raises UnknownTransfer or InvalidTransition (with the reason) otherwise."""
        self.expire_due()
        record = self.get(transfer_id)
        if record.state.terminal:
            raise InvalidTransition(f"transfer {transfer_id!r} is {record.state.name}"
                                    + (f": {record.error}" if record.error else ""))
        return record

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._transfers)

    # -- progress -----------------------------------------------------------------
    def mark_queued(self, transfer_id: str, last: bool,
                    held_block_ids: Sequence[int] = ()) -> int:
        """Count one more chunk queued (sender side); returns its chunk index."""
        record = self.active(transfer_id)
        with self._lock:
            if record.last_queued:
                raise InvalidTransition(f"transfer {transfer_id!r}: chunk after the last one")
            record.chunks_queued += 1
            record.last_queued = last
            record.renew()
            record.held_block_ids.extend(held_block_ids)
            return record.chunks_queued - 1

    def set_first_token(self, transfer_id: str, token: int) -> None:
        """Receiver: the prompt's first token came with the transfer's last chunk."""
        with self._lock:
            self._transfers[transfer_id].first_token = token
        self.metrics.add(first_tokens_received=1)

    def record_chunk(self, transfer_id: str, *, blocks: Sequence[int], nbytes: int,
                     seconds: float, sent: bool) -> None:
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is None or record.state.terminal:
                return
            if record.started is None:
                record.started = time.monotonic() - seconds
            record.state = TransferState.IN_FLIGHT
            record.renew()
            record.filled.update(blocks)
            record.blocks_done = len(record.filled)
            record.bytes_moved += nbytes
            record.chunks_done += 1
        if sent:
            self.metrics.add(bytes_sent=nbytes, send_seconds=seconds)
        else:
            self.metrics.add(bytes_received=nbytes, receive_seconds=seconds)

    def mark_started(self, transfer_id: str) -> None:
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is not None and record.started is None:
                record.started = time.monotonic()
            if record is not None and not record.state.terminal:
                record.renew()

    # -- transitions --------------------------------------------------------------
    def finish(self, transfer_id: str, state: TransferState, error: str = "") -> bool:
        """Move to a terminal state; False if already terminal or unknown."""
        assert state.terminal, state
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is None or state not in _ALLOWED.get(record.state, ()):
                return False
            record.state = state
            record.error = error
            record.finished = time.monotonic()
            status = record.status()
            deferred = record.io_holds > 0
            if deferred:
                record.release_pending = status
        self.metrics.count_terminal(state)
        if not deferred:
            self._fire_release(record, status)
        return True

    def hold(self, transfer_id: str) -> None:
        """Bytes of this transfer's blocks are moving: a terminal transition now defers
        on_release until unhold(), so freed blocks are never written or read late."""
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is not None:
                record.io_holds += 1

    def hold_active(self, transfer_id: str) -> None:
        """hold() unless the transfer ended (checked atomically with taking the hold, so
        a cancel cannot free the blocks in between). Raises UnknownTransfer or
        InvalidTransition (with the reason)."""
        self.expire_due()
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is None:
                raise UnknownTransfer(transfer_id)
            if record.state.terminal:
                raise InvalidTransition(f"transfer {transfer_id!r} is {record.state.name}"
                                        + (f": {record.error}" if record.error else ""))
            record.io_holds += 1

    def unhold(self, transfer_id: str) -> None:
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is None or record.io_holds == 0:
                return
            record.io_holds -= 1
            status = record.release_pending if record.io_holds == 0 else None
            if status is not None:
                record.release_pending = None
        if status is not None:
            self._fire_release(record, status)

    @staticmethod
    def _fire_release(record: Transfer, status: TransferStatus) -> None:
        if record.on_release is not None:
            record.on_release(status, tuple(record.held_block_ids))

    def renew(self, transfer_id: str) -> bool:
        """The transfer's owner knows it is progressing (its prompt queued or computing):
        its lease runs from now. False if it is unknown or already ended."""
        with self._lock:
            record = self._transfers.get(transfer_id)
            if record is None or record.state.terminal:
                return False
            record.renew()
            return True

    def expire_due(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [r.transfer_id for r in self._transfers.values()
                   if not r.state.terminal and r.deadline <= now]
        expired = []
        for transfer_id in due:
            if self.finish(transfer_id, TransferState.EXPIRED, "lease expired"):
                expired.append(transfer_id)
        return expired

    def statuses(self) -> dict[str, TransferStatus]:
        self.expire_due()
        with self._lock:
            return {tid: r.status() for tid, r in self._transfers.items()}

    def remove(self, transfer_id: str) -> Transfer | None:
        with self._lock:
            return self._transfers.pop(transfer_id, None)

    def active_ids(self) -> list[str]:
        with self._lock:
            return [tid for tid, r in self._transfers.items() if not r.state.terminal]


def chunk_destination(destination: KVDestination, src_block_ids: Sequence[int],
                      start: int) -> list[int]:
    """Destination block ids for a chunk at positions start .. start+len(src)-1."""
    end = start + len(src_block_ids)
    if start < 0 or end > len(destination.block_ids):
        raise ValueError(f"chunk positions {start}..{end - 1} outside the transfer's "
                         f"{len(destination.block_ids)} destination blocks")
    return list(destination.block_ids[start:end])


def paired_runs(src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                dst_run_starts: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """Coalesce (src, dst) block pairs into (src_first, dst_first, count) runs where both
    sides are consecutive, order kept: each run is one contiguous byte range on both
    sides of a block-major pool. dst_run_starts: run_starts(dst_block_ids), if known."""
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks for "
                         f"{len(dst_block_ids)} destination blocks")
    n = len(src_block_ids)
    if dst_run_starts is None:
        dst_run_starts = run_starts(dst_block_ids)
    starts = sorted({*run_starts(src_block_ids), *dst_run_starts})
    ends = [*starts[1:], n]
    return [(src_block_ids[a], dst_block_ids[a], b - a) for a, b in zip(starts, ends)]


def run_starts(block_ids: Sequence[int]) -> list[int]:
    """Positions where a run of consecutive block ids starts ([] for no blocks)."""
    n = len(block_ids)
    if not n:
        return []
    first = block_ids[0]
    if list(block_ids) == list(range(first, first + n)):
        return [0]   # the common case, at C speed
    # a plain loop that records starts only: rebuilding a run per block cost twice as
    # much, and a prompt's blocks are walked on the time-to-first-token path
    starts = [0]
    for i in range(1, n):
        if block_ids[i] != block_ids[i - 1] + 1:
            starts.append(i)
    return starts


def chunk_run_starts(destination_run_starts: Sequence[int], start: int,
                     count: int) -> list[int]:
    """run_starts of destination.block_ids[start:start + count], from the whole
    destination's (computed once per transfer, not per chunk)."""
    if not count:
        return []
    first = bisect_right(destination_run_starts, start)
    last = bisect_left(destination_run_starts, start + count)
    return [0, *(p - start for p in destination_run_starts[first:last])]


def split_runs(runs: list[tuple[int, int, int]],
               max_blocks: int) -> list[tuple[int, int, int]]:
    """Split runs longer than max_blocks (bounds one message's size)."""
    out = []
    for s, d, n in runs:
        for off in range(0, n, max_blocks):
            out.append((s + off, d + off, min(max_blocks, n - off)))
    return out


# -- receiving side -------------------------------------------------------------------
class ChunkRejected(Exception):
    """A chunk header that must not be applied (reason in str())."""


def admit_chunk(table: TransferTable, header, spec: KVCacheSpec) -> list[int] | None:
    """Validate a received KVTransferHeader against the pool and the registered
    transfer. Returns the destination block ids to fill, None for an abort notice
    (the transfer is then CANCELLED); raises ChunkRejected with the reason otherwise."""
    if header.abort_reason:
        table.finish(header.transfer_id, TransferState.CANCELLED,
                     f"sender aborted: {header.abort_reason}")
        return None
    problems = header_problems(header, spec)
    if problems:
        table.finish(header.transfer_id, TransferState.FAILED, "; ".join(problems))
        raise ChunkRejected("; ".join(problems))
    record = _active_record(table, header.transfer_id)
    blocks = header_block_ids(header)
    stray = set(blocks) - set(record.destination.block_ids)
    if stray:
        reason = f"blocks {sorted(stray)[:8]} are not destinations of {header.transfer_id!r}"
        table.finish(header.transfer_id, TransferState.FAILED, reason)
        raise ChunkRejected(reason)
    table.mark_started(header.transfer_id)
    return blocks


def in_place_blocks(table: TransferTable, commit) -> list[int]:
    """The destination blocks an InPlaceCommit names by position in its transfer; raises
    ChunkRejected with the reason (positions outside the transfer also fail it)."""
    record = _active_record(table, commit.transfer_id)
    block_ids = record.destination.block_ids
    first, end = commit.first_position, commit.first_position + commit.num_blocks
    if commit.num_blocks == 0 or end > len(block_ids):
        reason = (f"positions {first}..{end - 1} are outside the {len(block_ids)} "
                  f"destination blocks of {commit.transfer_id!r}")
        table.finish(commit.transfer_id, TransferState.FAILED, reason)
        raise ChunkRejected(reason)
    table.mark_started(commit.transfer_id)
    return list(block_ids[first:end])


def _active_record(table: TransferTable, transfer_id: str) -> Transfer:
    try:
        return table.active(transfer_id)
    except UnknownTransfer:
        raise ChunkRejected(f"unknown transfer {transfer_id!r}") from None
    except InvalidTransition as exc:
        raise ChunkRejected(str(exc)) from None


def store_chunk(table: TransferTable, message, blocks: list[int], seconds: float,
                nbytes: int) -> None:
    """Record a chunk whose payload is in place (message: its KVTransferHeader or
    InPlaceCommit); the last chunk completes the transfer (DONE when every destination
    block was filled, FAILED otherwise)."""
    table.record_chunk(message.transfer_id, blocks=blocks, nbytes=nbytes, seconds=seconds,
                       sent=False)
    if not message.last_chunk:
        return
    record = table.get(message.transfer_id)
    if message.HasField("first_token_id"):
        table.set_first_token(message.transfer_id, message.first_token_id)
    # filled holds destination blocks only: as many as the destination means all of them
    missing = () if len(record.filled) >= len(record.destination.block_ids) else \
        set(record.destination.block_ids) - record.filled
    if missing:
        table.finish(message.transfer_id, TransferState.FAILED,
                     f"last chunk arrived with {len(missing)} destination blocks unfilled")
    else:
        table.finish(message.transfer_id, TransferState.DONE)
