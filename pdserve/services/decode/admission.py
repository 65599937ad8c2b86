"""The decode admission of one remotely prefilled request as a pure state machine: how
a request whose prompt KV another worker computes gets into this engine's running
batch. No asyncio, gRPC, torch or connector in here: each event returns the effects the
service performs on the engine thread, where every event of an admission runs (so a
failure racing a late arrival is decided in one order).

    RESERVED --Prefill call out--> WAITING_FOR_KV --KV here + first token--> JOINED
                                        |
                                        +--KV failed--> RECOMPUTE   (fallback recompute)
                                        +--KV failed--> FAILED      (fallback fail)
                                        +--cancelled--> FAILED

- RESERVED: the engine allocated blocks for the prompt (its own prefix hits kept) and
  the receiver expects the rest under a fresh transfer id with a lease.
- WAITING_FOR_KV: the Prefill call is out; the KV streams in.
- JOINED: the KV is DONE and the first token known; the request joins the batch and
  its first token goes to the stream. The token arrives one way only: on the
  receiver's DONE status (every connector carries it with the last chunk), handled on
  the connector's thread as soon as the KV is in place. A DONE without a token (a
  sender that did not send it) is a failed transfer.
- RECOMPUTE: unreachable prefill worker, refused handshake, failed or expired transfer:
  the engine computes the (uncached part of the) prompt itself.
- FAILED: the same with fallback=fail: the request is aborted, the call ends
  UNAVAILABLE; or the Generate call was cancelled (its end aborts the request).

A failure that races a DONE which already joined the batch (the Prefill call timing out
just as the KV landed) finds JOINED: the request keeps decoding on the KV it has.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class AdmissionState(enum.Enum):
    RESERVED = "reserved"
    WAITING_FOR_KV = "waiting for kv"
    JOINED = "joined"
    RECOMPUTE = "recompute"
    FAILED = "failed"

    @property
    def awaiting_kv(self) -> bool:
        return self in (AdmissionState.RESERVED, AdmissionState.WAITING_FOR_KV)


# ---- effects (performed on the engine thread) -----------------------------------------
@dataclass(frozen=True)
class JoinBatch:
    """The request decodes from here; its first token goes to the stream."""

    first_token: int


@dataclass(frozen=True)
class Recompute:
    """The engine computes the prompt itself (its blocks and cached prefix stay)."""


@dataclass(frozen=True)
class AbortRequest:
    """Give the request up: its blocks return to the pool."""

    error: str


Effect = Any  # one of the dataclasses above


@dataclass
class Admission:
    request_id: str
    transfer_id: str
    fallback: str = "recompute"  # recompute | fail
    state: AdmissionState = AdmissionState.RESERVED
    first_token: int | None = None
    error: str = ""

    def prefill_called(self) -> None:
        assert self.state is AdmissionState.RESERVED, self.state
        self.state = AdmissionState.WAITING_FOR_KV

    def kv_arrived(self, first_token: int) -> list[Effect]:
        """The KV is DONE here with its first token (the receiver's status)."""
        if not self.state.awaiting_kv:
            return []
        self.state, self.first_token = AdmissionState.JOINED, first_token
        return [JoinBatch(first_token)]

    def cancelled(self) -> list[Effect]:
        """The Generate call was cancelled: a KV landing now must not join the batch
        (the call's end aborts the request: no effect here)."""
        if self.state.awaiting_kv:
            self.state, self.error = AdmissionState.FAILED, "cancelled"
        return []

    def kv_failed(self, error: str) -> list[Effect]:
        """The KV will not come; nothing changes once the request joined."""
        if not self.state.awaiting_kv:
            return []
        self.error = error
        if self.fallback == "fail":
            self.state = AdmissionState.FAILED
            return [AbortRequest(error)]
        self.state = AdmissionState.RECOMPUTE
        return [Recompute()]
