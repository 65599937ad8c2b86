"""Sampling parameters and the client-input error, torch-free.

Kept apart from `pdserve.engine.sampling` (the torch sampler) so CPU-only modules (the
scheduler, the router, the client) can use them without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class InvalidRequest(ValueError):
    """Bad input from a client; services map it to INVALID_ARGUMENT / HTTP 400."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    detokenize: bool = True  # False: token ids only (no text, no stop strings)
    # EOS and stop_token_ids cannot be sampled, and stop strings do not apply, until
    # this many tokens were generated (vLLM's min_tokens)
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                 f"got {self.min_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if math.isinf(self.temperature):
            raise InvalidRequest("temperature must be finite")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        bad = next((t for t in self.stop_token_ids if not 0 <= t < 2**31), None)
        if bad is not None:
            raise InvalidRequest(f"stop_token_ids: token id {bad} is not a valid token id")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        if self.stop and not self.detokenize:
            raise InvalidRequest("stop strings need detokenize=True")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def suppressed_ids(self, num_generated: int, eos_ids) -> tuple[int, ...]:
        """Token ids the next sample must not be: the stopping ones while fewer than
        min_tokens tokens were generated (EOS unless ignore_eos, and stop_token_ids)."""
        if num_generated >= self.min_tokens:
            return ()
        return (*(() if self.ignore_eos else tuple(eos_ids)), *self.stop_token_ids)
