"""The prefill job as a pure state machine: one prompt computed on this worker and its KV
pushed into a decode worker's blocks. No asyncio, gRPC, torch or connector in here:
each event method updates the job and returns the effects the service then performs
(answer a call, send a chunk, free blocks...), in order.

Lifecycle of one job:

    StartPrefill --> AWAITING_CLAIM --Prefill call claims it (same key)--+
                       |  lease runs out / abort / engine drops it       |
                       v                                                 v
                     FAILED            Prefill call (none to claim) --> COMPUTING
                                                                         |  full blocks go
                                                                         |  out per tick
                                                  first token sampled,   v
                                                  last chunk queued --> SENDING
                                                                         |
                                             connector DONE --> DONE     |  any other end
                                                                         v  --> FAILED
    abort while the connector may read the blocks: COMPUTING | SENDING --> ABORTING
    --connector terminal--> FAILED (the blocks are freed only then).

- AWAITING_CLAIM: started early by the router's StartPrefill; the prompt computes and
  its blocks are held until a Prefill call with the same early_start_key (and prompt
  length) claims it, or its lease runs out (counted as dropped).
- COMPUTING: a Prefill call owns the job. With a destination, blocks that became full
  since the last tick go out as one chunk; without one (compute only) the job is DONE
  at its first token.
- SENDING: the first token was sampled and the rest of the prompt, partial tail block
  included, went out as the last chunk carrying that token; the connector decides.
- ABORTING: Abort or a cancelled call; the transfer is aborted and the job waits for
  the connector to let go of the blocks.
- DONE / FAILED: the engine request is released (its blocks stay in the prefix cache
  when computed) or aborted, the transfer released, the Prefill call and the
  StartPrefill call answered.

The first token travels once: with the KV, in the last chunk (its header for push
connectors, the store's done marker for redis). The PrefillResponse carries it only for
a call without a destination (compute only). The connector's DONE may come before the
tick that finishes the job; `answer_at_release` lets the connector thread answer the
call at once then (the tick's own answer then finds the call answered).

JobBook decides what a call does with the jobs in flight: StartPrefill starts an early
job unless its key was already started by a Prefill call (late) or its request id is
in flight (refused); a Prefill call claims the early job with its key, else starts one,
unless the request id is in flight under another key (refused).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdserve.kvtransfer.base import KVDestination, TransferState

REMEMBERED_KEYS = 4096  # a StartPrefill later than this many Prefill calls is not refused


class JobState(enum.Enum):
    AWAITING_CLAIM = "awaiting claim"
    COMPUTING = "computing"
    SENDING = "sending"
    ABORTING = "aborting"
    DONE = "done"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)


@dataclass(frozen=True)
class TransferEnd:
    """The connector's terminal status of a job's transfer (what the job needs of it)."""

    state: TransferState
    error: str = ""
    blocks_done: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0


class Progress(Protocol):
    """The engine's view of the job's prompt at a tick (LLMEngine.prompt_progress)."""

    num_blocks: int
    num_computed_tokens: int


# ---- effects (performed by the service, in the order returned) ------------------------
@dataclass(frozen=True)
class SendChunk:
    """Queue the request's blocks [src_start, src_stop) as destination positions from
    `start`; `ready`: wait for the device to write them first (not for the last chunk:
    its token was read back, so they are written)."""

    src_start: int
    src_stop: int
    start: int
    last: bool
    first_token: int | None


@dataclass(frozen=True)
class AbortTransfer:
    reason: str


@dataclass(frozen=True)
class ReleaseTransfer:
    """Forget the transfer (aborts it, and the receiver hears, if still active)."""


@dataclass(frozen=True)
class EndEngineRequest:
    """computed: release the held blocks (they stay in the prefix cache); else abort."""

    computed: bool


@dataclass(frozen=True)
class Answer:
    """The job's outcome: the Prefill call's answer."""

    state: JobState
    error: str = ""
    transfer: TransferEnd | None = None


@dataclass(frozen=True)
class AnswerCall:
    answer: Answer


@dataclass(frozen=True)
class AnswerStart:
    """StartPrefill's answer: started, and how the job ended (or why it did not start)."""

    started: bool
    reason: str


@dataclass(frozen=True)
class RecordSent:
    seconds: float
    transfer: TransferEnd


@dataclass(frozen=True)
class RecordFailed:
    kind: str


@dataclass(frozen=True)
class CountEarlyStart:
    outcome: str  # claimed | dropped | late


Effect = Any  # one of the dataclasses above

NOT_CLAIMED = "no Prefill call claimed the early start within the KV lease"
ENGINE_DROPPED = "request ended before its prompt was computed"


@dataclass
class PrefillJob:
    request_id: str
    num_tokens: int
    early_key: str = ""
    state: JobState = JobState.COMPUTING
    destination: KVDestination | None = None  # set once its transfer is registered
    call: Any = None         # the owning Prefill call's handle (opaque here)
    start_call: Any = None   # the StartPrefill call's handle, for early starts
    expires: float = 0.0     # AWAITING_CLAIM: dropped after this time
    started_early: bool = False
    first_token: int | None = None
    finish_reason: str | None = None
    queue_s: float = 0.0     # waited in the engine before its first step
    compute_s: float = 0.0   # first step -> first token
    positions_sent: int = 0  # destination positions already handed to the connector
    chunks: int = 0
    send_started: float = 0.0
    abort_reason: str = ""

    @classmethod
    def early(cls, request_id: str, num_tokens: int, key: str, expires: float,
              start_call: Any = None) -> "PrefillJob":
        return cls(request_id, num_tokens, key, JobState.AWAITING_CLAIM, expires=expires,
                   start_call=start_call, started_early=True)

    @classmethod
    def for_call(cls, request_id: str, num_tokens: int, key: str, call: Any,
                 destination: KVDestination | None) -> "PrefillJob":
        return cls(request_id, num_tokens, key, call=call, destination=destination)

    @property
    def transfer_id(self) -> str:
        return self.destination.transfer_id if self.destination else ""

    @property
    def watches_engine(self) -> bool:
        """Ticks matter to it: it expires, finishes on its first token or sends chunks."""
        return self.state in (JobState.AWAITING_CLAIM, JobState.COMPUTING)

    @property
    def renews_lease(self) -> bool:
        """Queued or computing for a destination: alive, so its lease must not run out
        before its first chunk (chunks renew it too)."""
        return self.state is JobState.COMPUTING and self.destination is not None

    # ---- events --------------------------------------------------------------------
    def claim(self, call: Any, destination: KVDestination | None) -> list[Effect]:
        """A Prefill call takes over this early job (its transfer already registered)."""
        assert self.state is JobState.AWAITING_CLAIM, self.state
        self.state, self.call, self.destination = JobState.COMPUTING, call, destination
        return [CountEarlyStart("claimed")]

    def claim_refused(self, reason: str) -> list[Effect]:
        """The claiming call's destination cannot hold the prompt: the job ends (the
        service refuses the call)."""
        assert self.state is JobState.AWAITING_CLAIM, self.state
        return [CountEarlyStart("claimed"),
                *self._finish(JobState.FAILED, f"claimed, then aborted: {reason}")]

    def first_token_sampled(self, token: int, finish_reason: str | None,
                            queue_s: float, compute_s: float) -> None:
        self.first_token, self.finish_reason = token, finish_reason
        self.queue_s, self.compute_s = queue_s, compute_s

    def transfer_ended(self, end: TransferEnd, now: float) -> list[Effect]:
        if self.state.ended:
            return []
        if end.state is TransferState.DONE and self.state is not JobState.ABORTING:
            return [RecordSent(now - self.send_started, end),
                    *self._finish(JobState.DONE, "", end)]
        return [RecordFailed(end.state.name.lower()),
                *self._finish(JobState.FAILED, end.error or self.abort_reason, end)]

    def tick(self, progress: Progress | None, now: float, block_size: int) -> list[Effect]:
        """The engine stepped (or idled): expire, finish or send what became ready."""
        if self.state is JobState.AWAITING_CLAIM:
            return self._tick_unclaimed(progress, now)
        if self.state is not JobState.COMPUTING:
            return []
        if self.destination is None and self.first_token is not None:
            return self._finish(JobState.DONE, "")
        if progress is None:
            return self._finish(JobState.FAILED, ENGINE_DROPPED)
        if self.destination is None:
            return []
        return self._next_chunk(progress, now, block_size)

    def abort(self, reason: str) -> list[Effect]:
        if self.state.ended or self.state is JobState.ABORTING:
            return []
        if self.state is JobState.AWAITING_CLAIM:
            return [CountEarlyStart("dropped"), *self._finish(JobState.FAILED,
                                                              f"aborted: {reason}")]
        if self.destination is None:
            return self._finish(JobState.FAILED, f"aborted: {reason}")
        # blocks are freed once the connector says it no longer reads them
        self.state, self.abort_reason = JobState.ABORTING, reason
        return [AbortTransfer(reason)]

    # ---- queries -------------------------------------------------------------------
    def answer_at_release(self, end: TransferEnd) -> Answer | None:
        """Connector thread, at the transfer's end: the call's answer if it can go out
        now (KV delivered, first token known), before the tick finishes the job."""
        if end.state is TransferState.DONE and self.first_token is not None \
                and self.state is JobState.SENDING:
            return Answer(JobState.DONE, "", end)
        return None

    def destination_mismatch(self, destination: KVDestination, block_size: int) -> str:
        """Why the destination cannot hold this prompt ("" when it fits)."""
        need = -(-self.num_tokens // block_size)
        have = destination.first_block_index + len(destination.block_ids)
        if have == need:
            return ""
        return (f"destination covers blocks {destination.first_block_index}..{have} but "
                f"the prompt has {need} blocks of {block_size} tokens")

    # ---- internals -----------------------------------------------------------------
    def _tick_unclaimed(self, progress: Progress | None, now: float) -> list[Effect]:
        if progress is None:
            return self._finish(JobState.FAILED, ENGINE_DROPPED)
        if now > self.expires:
            return [CountEarlyStart("dropped"), *self._finish(JobState.FAILED, NOT_CLAIMED)]
        return []

    def _next_chunk(self, progress: Progress, now: float, block_size: int) -> list[Effect]:
        first, last = self.destination.first_block_index, self.first_token is not None
        full = progress.num_blocks if last else progress.num_computed_tokens // block_size
        end = full - first
        if end <= self.positions_sent and not last:
            return []
        chunk = SendChunk(first + self.positions_sent, first + end, self.positions_sent,
                          last, self.first_token if last else None)
        self.send_started = self.send_started or now
        self.positions_sent, self.chunks = end, self.chunks + 1
        if last:
            self.state = JobState.SENDING
        return [chunk]

    def _finish(self, state: JobState, error: str,
                transfer: TransferEnd | None = None) -> list[Effect]:
        self.state = state
        effects: list[Effect] = [EndEngineRequest(computed=self.first_token is not None)]
        if self.destination is not None:
            effects.append(ReleaseTransfer())
        if self.call is not None:
            effects.append(AnswerCall(Answer(state, error, transfer)))
        if self.start_call is not None:
            reason = f"{state.value}: {error}" if error else state.value
            effects.append(AnswerStart(True, reason))
        return effects


# ---- the jobs in flight ------------------------------------------------------------
class Route(enum.Enum):
    START = "start"      # no job to claim: the call starts one
    CLAIM = "claim"      # the call takes over the early job with its key
    LATE = "late"        # StartPrefill after its Prefill call started the job
    IN_FLIGHT = "in flight"  # the request id belongs to another job: refused


@dataclass
class JobBook:
    """The jobs in flight by request id, plus the early-start keys that Prefill calls
    started (a StartPrefill with one of those is late), and the early-start counters."""

    jobs: dict[str, PrefillJob] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {
        "claimed": 0, "dropped": 0, "late": 0})
    remembered: int = REMEMBERED_KEYS
    _keys_started_by_prefill: collections.OrderedDict = field(
        default_factory=collections.OrderedDict)

    def route_start(self, request_id: str, key: str) -> Route:
        """Where a StartPrefill goes."""
        if key in self._keys_started_by_prefill:
            self.count("late")
            return Route.LATE
        return Route.IN_FLIGHT if request_id in self.jobs else Route.START

    def route_call(self, request_id: str, key: str, num_tokens: int) -> Route:
        """Where a Prefill call goes."""
        job = self.jobs.get(request_id)
        if job is None:
            return Route.START
        if job.state is JobState.AWAITING_CLAIM and key and job.early_key == key \
                and job.num_tokens == num_tokens:
            return Route.CLAIM
        return Route.IN_FLIGHT

    def add(self, job: PrefillJob) -> None:
        """A started job; a Prefill call's key is remembered (its StartPrefill is late)."""
        self.jobs[job.request_id] = job
        if job.early_key and not job.started_early:
            self._remember(job.early_key)

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def forget_ended(self, job: PrefillJob) -> None:
        if job.state.ended and self.jobs.get(job.request_id) is job:
            del self.jobs[job.request_id]

    def _remember(self, key: str) -> None:
        keys = self._keys_started_by_prefill
        keys[key] = None
        if len(keys) > self.remembered:
            keys.popitem(last=False)
