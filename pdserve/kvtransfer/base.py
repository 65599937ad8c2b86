"""The KV connector interface: a sending side on prefill, a receiving side on decode.

Lifecycle of one transfer (push model, docs/architecture.md):

    decode                                   prefill
    ------                                   -------
    dst = receiver.expect(tid, blocks, lease_s)      (blocks allocated before KV moves)
          --- dst travels in PrefillRequest --->
                                             sender.begin(dst, lease_s)  (handshake on first
                                                                          contact: refused
                                                                          here on mismatch)
                                             sender.send_chunk(tid, src, start=0, last=False)
                                             sender.send_chunk(tid, src, start=k, last=True)
    receiver.poll()[tid].state == DONE       sender.poll()[tid].state == DONE
    receiver.release(tid)                    sender.release(tid)

Per-transfer state machine (both sides):

    PENDING --first chunk--> IN_FLIGHT --last chunk stored--> DONE
       |                         |
       +-------------------------+--> FAILED     peer gone, refused, corrupt, store down
                                 +--> EXPIRED    lease deadline passed before DONE
                                 +--> CANCELLED  abort()/cancel() by the owner

DONE, FAILED, EXPIRED and CANCELLED are terminal. `on_release(status, block_ids)` is how
held blocks are freed: on the sender it fires once on any terminal state (the source
blocks may be reused); on the receiver it fires only when the transfer ends without
filling its blocks (FAILED/EXPIRED/CANCELLED: hand them back to the allocator) - DONE
blocks hold the request's KV and stay with the owner. Leases are checked by poll() and
whenever data for a transfer arrives, so an expired lease frees its blocks.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

PROTOCOL_VERSION = 5  # 5: the ucx tag path over worker-address endpoints (no listener)
POOL_LAYOUT = "block_major_v1"   # pdserve.engine.kvcache.pool: [blocks, layers, 2, bs, h, d]


class ConnectorError(RuntimeError):
    """The connector cannot work: peer or store unreachable, protocol violation. Callers
    fall back to recomputing the prompt (policy `recompute`) or fail the request."""


class HandshakeError(ConnectorError):
    """First contact refused: the two workers disagree on protocol/model/KV layout."""


class TransferState(enum.Enum):
    PENDING = 1
    IN_FLIGHT = 2
    DONE = 3
    FAILED = 4
    EXPIRED = 5
    CANCELLED = 6

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TransferState.DONE, TransferState.FAILED,
                       TransferState.EXPIRED, TransferState.CANCELLED})


@dataclass(frozen=True)
class TransferStatus:
    transfer_id: str
    state: TransferState
    blocks_total: int
    blocks_done: int = 0
    bytes_moved: int = 0
    chunks_done: int = 0
    error: str = ""
    seconds: float = 0.0          # first chunk started -> terminal (or now)
    first_token: int | None = None  # receiver: sent with the last chunk, if the sender did


@dataclass(frozen=True)
class KVDestination:
    """Where a transfer's KV lands; made by the receiver, mirrored by kv.proto's
    KVDestination (see pdserve.kvtransfer.messages for the conversion)."""
    connector: str
    address: str
    transfer_id: str
    block_ids: tuple[int, ...]
    first_block_index: int = 0
    block_keys: tuple[bytes, ...] = ()
    num_tokens: int = 0
    lease_expires_unix_ms: int = 0
    receiver_id: str = ""


ReleaseCallback = Callable[[TransferStatus, tuple[int, ...]], None]
DoneCallback = Callable[[TransferStatus], None]


class ReadyEvent(Protocol):
    """Marks queued device work (torch.cuda.Event fits): synchronize() blocks until done."""

    def synchronize(self) -> None: ...


@dataclass
class ConnectorMetrics:
    """Plain counters per connector instance; services export them to Prometheus."""
    connector: str
    bytes_sent: int = 0
    bytes_received: int = 0
    send_seconds: float = 0.0
    receive_seconds: float = 0.0
    transfers_done: int = 0
    transfers_failed: int = 0
    transfers_expired: int = 0
    transfers_cancelled: int = 0
    first_tokens_received: int = 0  # receiver: transfers whose last chunk carried it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def count_terminal(self, state: TransferState) -> None:
        name = {TransferState.DONE: "transfers_done", TransferState.FAILED: "transfers_failed",
                TransferState.EXPIRED: "transfers_expired",
                TransferState.CANCELLED: "transfers_cancelled"}[state]
        self.add(**{name: 1})


class KVSender(ABC):
    """Prefill side: pushes blocks of the local pool into a receiver's blocks.

    Every method returns without waiting for the network; progress is observed with
    poll(). Source blocks named in send_chunk must stay untouched until the transfer is
    terminal (on_release tells when)."""

    name: str
    metrics: ConnectorMetrics

    @abstractmethod
    def connect(self, address: str) -> None:
        """Handshake with the receiver at `address` unless already done. Raises
        HandshakeError naming both values on any mismatch, ConnectorError if the peer
        does not answer. begin() calls it; call it early to fail fast."""

    def connected(self, address: str) -> bool:
        """True when connect(address) would return at once (no I/O); must not block."""
        return False

    @abstractmethod
    def begin(self, destination: KVDestination, *, lease_s: float | None = None,
              on_release: ReleaseCallback | None = None) -> None:
        """Register transfer destination.transfer_id (state PENDING) with a lease of
        lease_s seconds (None: the connector default). Connects first (may raise)."""

    @abstractmethod
    def send_chunk(self, transfer_id: str, src_block_ids: Sequence[int], *, start: int,
                   last: bool, ready: ReadyEvent | None = None,
                   first_token: int | None = None) -> None:
        """Queue local blocks src_block_ids for destination positions
        start .. start+len-1 of the transfer (positions index destination.block_ids).
        Chunks go out in call order; `last` completes the transfer. Must not wait for
        the device or the peer (it may queue a copy and send a message from the
        caller's thread when its own thread is idle).
        `ready` marks the device work that writes those blocks (a CUDA event recorded
        after the step): the sender waits for it on its own thread before reading them,
        so the caller never stalls the device queue; None = the blocks are readable.
        `first_token` (last chunk): the prompt's sampled token, which push connectors
        deliver with the chunk (the receiver's DONE status carries it); pull connectors
        may drop it."""

    @abstractmethod
    def abort(self, transfer_id: str, reason: str = "") -> None:
        """Give up a transfer (-> CANCELLED); tells the receiver when possible."""

    @abstractmethod
    def poll(self) -> dict[str, TransferStatus]:
        """Status of every transfer not yet released; expires overdue leases."""

    @abstractmethod
    def release(self, transfer_id: str) -> None:
        """Forget a terminal transfer (aborts it first if it is still active)."""

    @abstractmethod
    def close(self) -> None:
        """Abort active transfers and free sockets/endpoints/threads. Idempotent."""

    def send(self, destination: KVDestination, src_block_ids: Sequence[int], *,
             lease_s: float | None = None, on_release: ReleaseCallback | None = None) -> None:
        """begin() + one chunk covering every destination block."""
        self.begin(destination, lease_s=lease_s, on_release=on_release)
        self.send_chunk(destination.transfer_id, src_block_ids, start=0, last=True)

    def wait(self, transfer_id: str, timeout_s: float = 30.0) -> TransferStatus:
        return wait_terminal(self.poll, transfer_id, timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KVReceiver(ABC):
    """Decode side: owns destination blocks registered per transfer and reports when
    they are filled."""

    name: str
    metrics: ConnectorMetrics

    @property
    @abstractmethod
    def address(self) -> str:
        """Where senders connect (goes into KVDestination.address)."""

    @abstractmethod
    def expect(self, transfer_id: str, block_ids: Sequence[int], *, first_block_index: int = 0,
               block_keys: Sequence[bytes] = (), num_tokens: int = 0,
               lease_s: float | None = None,
               on_release: ReleaseCallback | None = None,
               on_done: DoneCallback | None = None) -> KVDestination:
        """Register destination blocks for a transfer (state PENDING) and return the
        descriptor to hand to the sender. Data for unknown, expired or cancelled
        transfers is refused. block_keys are required by key-addressed connectors
        (redis), one per block. on_done(status) runs once, on a connector thread, when
        the transfer is DONE (on_release covers every other end); it must not block."""

    @abstractmethod
    def cancel(self, transfer_id: str, reason: str = "") -> None:
        """Stop accepting data for a transfer (-> CANCELLED; on_release gets its blocks)."""

    @abstractmethod
    def poll(self) -> dict[str, TransferStatus]:
        """Status of every transfer not yet released; expires overdue leases."""

    @abstractmethod
    def release(self, transfer_id: str) -> None:
        """Forget a terminal transfer (cancels it first if it is still active)."""

    @abstractmethod
    def close(self) -> None:
        """Cancel active transfers, stop listening. Idempotent."""

    def wait(self, transfer_id: str, timeout_s: float = 30.0) -> TransferStatus:
        return wait_terminal(self.poll, transfer_id, timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_terminal(poll: Callable[[], dict[str, TransferStatus]], transfer_id: str,
                  timeout_s: float, interval_s: float = 0.001) -> TransferStatus:
    """Poll until transfer_id is terminal or timeout_s passes (returns the last status)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = poll().get(transfer_id)
        if status is None:
            raise KeyError(f"unknown transfer {transfer_id!r}")
        if status.state.terminal or time.monotonic() >= deadline:
            return status
        time.sleep(interval_s)
