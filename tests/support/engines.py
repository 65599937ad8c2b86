"""Shared engine fixtures: the bundled model loaded once per test session."""

from __future__ import annotations

import functools

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.loader import LoadedModel, load_model


@functools.lru_cache(maxsize=1)
def bundled_model() -> LoadedModel:
    return load_model(None)


def bundled_engine(**config) -> LLMEngine:
    """A fresh engine on the bundled model (fp32, CPU); weights are read once."""
    return LLMEngine(EngineConfig(**config), bundled_model())


def engine_on(model: LoadedModel, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(**config), model)


def abort_one(engine: LLMEngine, live: set[str], rng) -> None:
    """Abort a random live request (it must be known to the engine)."""
    victim = rng.choice(sorted(live))
    assert engine.abort(victim)
    live.discard(victim)


def run_to_end(engine: LLMEngine, live: set[str]) -> int:
    """Step until nothing is unfinished; every output must belong to a live request.
    Returns how many requests finished."""
    finished = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id in live  # nothing arrives for an aborted request
            if out.finished:
                live.discard(out.request_id)
                finished += 1
    return finished
