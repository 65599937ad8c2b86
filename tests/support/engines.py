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
