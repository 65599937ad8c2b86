"""Attention backends, chosen by name; each imports lazily (the triton one needs triton)."""

from __future__ import annotations

import importlib

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata

_BACKENDS = {
    "torch": "pdserve.engine.attention.torch_ref:TorchAttentionBackend",
    "triton": "pdserve.engine.attention.triton_backend:TritonAttentionBackend",
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_backend(name: str, **options) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {available_backends()}")
    module_name, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(**options)


__all__ = ["AttentionBackend", "AttentionMetadata", "available_backends", "get_attention_backend"]
