"""Process-level pieces of a prefill or decode worker: settings, engine, KV connector,
gRPC server, stats and metrics. The role-specific lifecycles live in
services/prefill/service.py and services/decode/service.py."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.kvtransfer import make_receiver, make_sender, settings_class
from pdserve.kvtransfer.messages import HandshakeInfo
from pdserve.services.auth import InternalAuth, kv_handshake_key, valkey_password
from pdserve.services.common import InternalTls
from pdserve.metrics import engine_metrics, kv_transfer_metrics, latency_metrics, new_registry
from pdserve.services.engine_loop import EngineLoop
from pdserve.wire import kv_pb2, worker_pb2

# a worker's KV ports from --kv-port P: P the handshake side channel, P + 1 the control
# channel of in-place chunks, P + 2 .. P + 17 UCX's data transport (its
# ucx.runtime.DATA_PORT_SPAN, not imported here: that would load ucxx)
KV_PORTS = 18
MAX_KV_PORT = 65535 - (KV_PORTS - 1)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    role: str  # prefill | decode
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    connector: str = "ucx"
    kv_host: str = "127.0.0.1"
    # ucx: side channel (handshake) port; data listener on kv_port + 1, in-place chunk
    # control on kv_port + 2 (0 = any free ports)
    kv_port: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"
    kv_lease_s: float = 30.0
    fallback: str = "recompute"  # recompute | fail (decode role)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    engine: EngineConfig = field(default_factory=EngineConfig)
    tls: InternalTls = field(default_factory=InternalTls)
    health_port: int = 0  # plaintext health checks (probes) when tls is on
    # the cluster's internal token (services/auth.py); start_worker loads it
    internal_auth: InternalAuth = field(default_factory=InternalAuth)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if self.fallback not in ("recompute", "fail"):
            raise ValueError(f"fallback must be recompute or fail, got {self.fallback!r}")
        if not 0 <= self.kv_port <= MAX_KV_PORT:
            raise ValueError(f"kv_port must be in [0, {MAX_KV_PORT}] (the control channel "
                             f"uses kv_port + 1, UCX data kv_port + 2 .. + "
                             f"{KV_PORTS - 1}), got {self.kv_port}")


def connector_settings(settings: WorkerSettings):
    cls = settings_class(settings.connector)
    names = set(getattr(cls, "__dataclass_fields__", {}))
    kwargs = {"lease_s": settings.kv_lease_s} if "lease_s" in names else {}
    if "host" in names:
        kwargs["host"] = settings.kv_host
    if "side_channel_port" in names:
        kwargs["side_channel_port"] = settings.kv_port
    if "control_port" in names:
        kwargs["control_port"] = settings.kv_port + 1 if settings.kv_port else 0
    if "data_port" in names:
        kwargs["data_port"] = settings.kv_port + 2 if settings.kv_port else 0
    if "url" in names:
        kwargs["url"] = settings.redis_url
    token = settings.internal_auth.token
    if token and "handshake_key" in names:
        kwargs["handshake_key"] = kv_handshake_key(token)
    if token and "password" in names:
        kwargs["password"] = valkey_password(token)
    return cls(**kwargs)


class WorkerCore:
    """The engine, its loop thread, the connector side and the metrics of one worker."""

    def __init__(self, settings: WorkerSettings, engine: LLMEngine,
                 loop: asyncio.AbstractEventLoop, tick) -> None:
        self.settings = settings
        self.engine = engine
        self.loop = EngineLoop(engine, loop, tick=tick)
        self.started = time.time()
        pool = engine.kv_pool
        self.hello = HandshakeInfo.from_spec(
            pool.spec, model_fingerprint=engine.fingerprint, connector=settings.connector,
            role=settings.role, worker_id=settings.worker_id, device_type=pool.device.type)
        make = make_sender if settings.role == "prefill" else make_receiver
        self.connector = make(settings.connector, pool, self.hello, connector_settings(settings))
        self.registry = new_registry()
        name = engine.source.name
        self.engine_metrics = engine_metrics(self.registry, name, settings.role)
        self.latency = latency_metrics(self.registry, name, settings.role)
        self.kv_metrics = kv_transfer_metrics(self.registry, settings.connector, settings.role)
        self._seen_prefix = (0, 0)

    def new_transfer_id(self) -> str:
        return f"{self.settings.worker_id}-{uuid.uuid4().hex[:12]}"

    def update_gauges(self) -> None:
        """Engine thread: refresh gauges and counters from the engine's stats."""
        now, m = self.engine.stats(), self.engine_metrics
        m.num_requests_running.set(now.num_running)
        m.num_requests_waiting.set(now.num_waiting)
        m.kv_cache_usage_perc.set(now.kv_usage)
        queries, hits = now.prefix_queries, now.prefix_hits
        m.prefix_cache_queries.inc(queries - self._seen_prefix[0])
        m.prefix_cache_hits.inc(hits - self._seen_prefix[1])
        self._seen_prefix = (queries, hits)

    def stats(self, in_flight: int) -> worker_pb2.WorkerStats:
        now, cm = self.engine.stats(), self.connector.metrics
        return worker_pb2.WorkerStats(
            worker_id=self.settings.worker_id, role=self.settings.role,
            num_requests_running=now.num_running, num_requests_waiting=now.num_waiting,
            kv_cache_usage_perc=now.kv_usage, num_free_blocks=now.num_free_blocks,
            num_total_blocks=now.num_total_blocks, num_cached_blocks=now.num_cached_blocks,
            prefix_cache_queries=now.prefix_queries, prefix_cache_hits=now.prefix_hits,
            num_transfers_in_flight=in_flight,
            kv_transfer=kv_pb2.KVTransferMetrics(
                bytes_sent=cm.bytes_sent, bytes_received=cm.bytes_received,
                transfers_done=cm.transfers_done, transfers_failed=cm.transfers_failed,
                transfers_expired=cm.transfers_expired,
                transfers_cancelled=cm.transfers_cancelled,
                first_tokens_received=cm.first_tokens_received),
            uptime_seconds=int(time.time() - self.started))

    def describe(self) -> worker_pb2.WorkerInfo:
        address = getattr(self.connector, "address", "")
        return worker_pb2.WorkerInfo(
            worker_id=self.settings.worker_id, role=self.settings.role,
            model_id=self.engine.source.name, model_fingerprint=self.engine.fingerprint,
            kv=self.hello.to_proto(), kv_address=address if isinstance(address, str) else "",
            max_context=self.engine.max_model_len,
            max_batch_tokens=self.engine.config.max_num_batched_tokens)
