"""A request's state inside one engine.

    WAITING ──schedule──> RUNNING ──stop/length──> FINISHED
       ^                  │  ^
       └─── PREEMPTED <───┘  │  (blocks ran out: freed, recomputed later)
                             │
    decode side, KV computed elsewhere (add_remote):
    RESERVING ──blocks free──> WAITING_FOR_KV ──KV arrived──┘
    (pool full when it came)        └──transfer failed──> WAITING (recomputed here)

num_computed_tokens counts tokens whose KV is in the cache; a request is in prefill
while it is below len(all_token_ids) - 1 and decodes one token per step after that.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pdserve.engine.params import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"
    RESERVING = "reserving"  # decode side: in line for the blocks its remote KV needs
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    state: RequestState = RequestState.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    block_ids: list[int] = field(default_factory=list)
    # leading block_ids already back in the allocator (outside a sliding window; stale)
    num_dropped_blocks: int = 0
    block_keys: list[bytes] = field(default_factory=list)  # keys of full blocks, in order
    num_registered_blocks: int = 0
    finish_reason: FinishReason | None = None
    hold_blocks: bool = False  # keep KV after finishing (a prefill worker ships it)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # first step that computed any of it
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def suppressed_ids(self, eos_ids) -> tuple[int, ...]:
        """Token ids its next sample must not be (min_tokens not reached yet)."""
        return self.params.suppressed_ids(len(self.output_ids), eos_ids)

    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed_tokens
