"""KV connectors: move KV blocks between a prefill pool and a decode pool.

One interface (base.py: KVSender on prefill, KVReceiver on decode), backends chosen by
name and imported lazily so that e.g. ucxx or redis are only needed when used:

    receiver = make_receiver("ucx", pool, hello)            # decode
    sender = make_sender("ucx", pool, hello)                # prefill

`hello` is a HandshakeInfo (messages.py), usually HandshakeInfo.from_spec(pool.spec,
model_fingerprint=..., connector=name, role=...). Backend settings are frozen
dataclasses: LocalSettings, UcxSettings, RedisSettings.
"""

from __future__ import annotations

import importlib
from typing import Any

from pdserve.kvtransfer.base import (PROTOCOL_VERSION, ConnectorError, ConnectorMetrics,
                                     HandshakeError, KVDestination, KVReceiver, KVSender,
                                     TransferState, TransferStatus)

# name -> (module, sender class, receiver class, settings class)
_BACKENDS = {
    "local": ("pdserve.kvtransfer.local", "LocalSender", "LocalReceiver", "LocalSettings"),
    "ucx": ("pdserve.kvtransfer.ucx", "UcxSender", "UcxReceiver", "UcxSettings"),
    "redis": ("pdserve.kvtransfer.redis_pool", "RedisSender", "RedisReceiver",
              "RedisSettings"),
}

CONNECTORS = tuple(_BACKENDS)


def _backend(name: str, index: int) -> Any:
    if name not in _BACKENDS:
        raise ValueError(f"unknown KV connector {name!r}; choose from {sorted(_BACKENDS)}")
    module = importlib.import_module(_BACKENDS[name][0])
    return getattr(module, _BACKENDS[name][index])


def settings_class(name: str) -> type:
    return _backend(name, 3)


def make_sender(name: str, pool, hello, settings=None) -> KVSender:
    cls = _backend(name, 1)
    return cls(pool, hello) if settings is None else cls(pool, hello, settings)


def make_receiver(name: str, pool, hello, settings=None) -> KVReceiver:
    cls = _backend(name, 2)
    return cls(pool, hello) if settings is None else cls(pool, hello, settings)


def get_connector(name: str, role: str, pool, hello, settings=None) -> KVSender | KVReceiver:
    """role "prefill" (or "sender") -> KVSender; "decode" (or "receiver") -> KVReceiver."""
    if role in ("prefill", "sender"):
        return make_sender(name, pool, hello, settings)
    if role in ("decode", "receiver"):
        return make_receiver(name, pool, hello, settings)
    raise ValueError(f"unknown role {role!r}: prefill|decode")


__all__ = [
    "CONNECTORS", "PROTOCOL_VERSION", "ConnectorError", "ConnectorMetrics", "HandshakeError",
    "KVDestination", "KVReceiver", "KVSender", "TransferState", "TransferStatus",
    "get_connector", "make_receiver", "make_sender", "settings_class",
]
