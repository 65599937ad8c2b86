"""Shared receiving-side plumbing: registration of destination blocks per transfer.

expect() registers a transfer PENDING with a lease and returns its KVDestination; the
backend admits chunks through transfers.admit_chunk/store_chunk (IN_FLIGHT, then DONE
or FAILED); cancel(), lease expiry (EXPIRED) and close() hand the blocks back through
on_release unless the transfer is DONE.
"""

from __future__ import annotations

import time
from typing import Sequence

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.base import (ConnectorMetrics, DoneCallback, KVDestination,
                                     KVReceiver, ReleaseCallback, TransferState,
                                     TransferStatus)
from pdserve.kvtransfer.messages import HandshakeInfo
from pdserve.kvtransfer.transfers import TransferTable


class RegisteringReceiver(KVReceiver):
    def __init__(self, pool: KVCachePool, hello: HandshakeInfo, *, lease_s: float) -> None:
        self.pool = pool
        self.hello = hello
        self.metrics = ConnectorMetrics(self.name)
        self.table = TransferTable(self.metrics, lease_s)
        self._closed = False

    def expect(self, transfer_id: str, block_ids: Sequence[int], *, first_block_index: int = 0,
               block_keys: Sequence[bytes] = (), num_tokens: int = 0,
               lease_s: float | None = None,
               on_release: ReleaseCallback | None = None,
               on_done: DoneCallback | None = None) -> KVDestination:
        block_ids = tuple(int(b) for b in block_ids)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("destination block ids must be distinct")
        if any(b < 0 or b >= self.pool.spec.num_blocks for b in block_ids):
            raise ValueError(f"destination block ids outside the pool's "
                             f"{self.pool.spec.num_blocks} blocks")
        if block_keys and len(block_keys) != len(block_ids):
            raise ValueError(f"{len(block_keys)} block keys for {len(block_ids)} blocks")
        lease = self.table.default_lease_s if lease_s is None else lease_s
        destination = KVDestination(
            connector=self.name, address=self.address, transfer_id=transfer_id,
            block_ids=block_ids, first_block_index=first_block_index,
            block_keys=tuple(block_keys), num_tokens=num_tokens,
            lease_expires_unix_ms=int((time.time() + lease) * 1000),
            receiver_id=self.hello.worker_id)
        releasing = _by_outcome(on_release, on_done)
        self.table.add(destination, block_ids, lease_s=lease, on_release=releasing)
        self._registered(destination)
        return destination

    def cancel(self, transfer_id: str, reason: str = "") -> None:
        self.table.finish(transfer_id, TransferState.CANCELLED, reason or "cancelled")

    def poll(self) -> dict[str, TransferStatus]:
        return self.table.statuses()

    def release(self, transfer_id: str) -> None:
        self.cancel(transfer_id, "released while active")
        self.table.remove(transfer_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for transfer_id in self.table.active_ids():
            self.table.finish(transfer_id, TransferState.CANCELLED, "receiver closed")
        self._shutdown()

    def _registered(self, destination: KVDestination) -> None:
        """Hook: a backend that pulls (redis) starts watching the new transfer."""

    def _shutdown(self) -> None:
        """Hook: stop listeners and threads."""


def _by_outcome(on_release: ReleaseCallback | None,
                on_done: DoneCallback | None) -> ReleaseCallback | None:
    """Receiver blocks go back only when the transfer did not fill them; a filled
    transfer tells on_done instead."""
    if on_release is None and on_done is None:
        return None

    def settle(status: TransferStatus, block_ids: tuple[int, ...]) -> None:
        if status.state is TransferState.DONE:
            if on_done is not None:
                on_done(status)
        elif on_release is not None:
            on_release(status, block_ids)
    return settle
