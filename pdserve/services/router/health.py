"""gRPC health checking of discovered workers (grpc.health.v1, asyncio).

Discovery says which workers exist; `HealthChecker` says which may take traffic. Each
discovered worker is probed with Health.Check every `interval_seconds`. An explicit
NOT_SERVING (a worker draining in its preStop hook) removes it at once; errors and
timeouts remove it after `unhealthy_threshold` consecutive failures, so one lost packet
does not drop a worker. `healthy_threshold` consecutive SERVING answers bring it back.
A new worker is not routable until its first successful probe (made immediately).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.services.router.discovery import Discovery, DiscoveryEvent, Endpoint
from pdserve.services.router.policies import Role

if TYPE_CHECKING:
    from pdserve.services.router.config import HealthConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthSettings:
    interval_seconds: float = 2.0
    timeout_seconds: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    service: str = ""

    @classmethod
    def from_config(cls, cfg: "HealthConfig") -> "HealthSettings":
        return cls(cfg.interval_seconds, cfg.timeout_seconds, cfg.unhealthy_threshold,
                   cfg.healthy_threshold, cfg.service)


@dataclass(frozen=True)
class HealthEvent:
    endpoint: Endpoint
    healthy: bool
    reason: str  # "SERVING", "NOT_SERVING", a gRPC status code name, or "removed"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    definitive: bool  # the worker itself said so (NOT_SERVING): no threshold


ChannelFactory = Callable[[str, HealthSettings], grpc.aio.Channel]


def insecure_channel(address: str, settings: HealthSettings) -> grpc.aio.Channel:
    # Reconnect backoff capped near the probe interval: a restarted worker is re-admitted
    # within about one interval instead of after gRPC's default (up to 120 s) backoff.
    cap_ms = int(max(settings.interval_seconds, 0.5) * 1000)
    return grpc.aio.insecure_channel(address, options=[
        ("grpc.initial_reconnect_backoff_ms", min(200, cap_ms)),
        ("grpc.min_reconnect_backoff_ms", min(200, cap_ms)),
        ("grpc.max_reconnect_backoff_ms", cap_ms),
    ])


async def probe(channel: grpc.aio.Channel, settings: HealthSettings) -> ProbeResult:
    """One Health.Check call."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=settings.service),
                                timeout=settings.timeout_seconds)
    except grpc.aio.AioRpcError as e:
        return ProbeResult(False, e.code().name, e.code() == grpc.StatusCode.NOT_FOUND)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
    return ProbeResult(serving, status, not serving)


class _Target:
    """Probe state of one worker."""

    def __init__(self, endpoint: Endpoint, channel: grpc.aio.Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.healthy = False
        self.successes = 0
        self.failures = 0
        self.task: asyncio.Task[None] | None = None


class HealthChecker:
    """Probes every worker `discovery` knows; keeps the healthy subset per role.

    Listeners get a HealthEvent on the event loop whenever a worker enters or leaves
    the healthy set (including leaving because discovery dropped it).
    """

    def __init__(self, discovery: Discovery, settings: HealthSettings = HealthSettings(), *,
                 channel_factory: ChannelFactory = insecure_channel) -> None:
        self.discovery = discovery
        self.settings = settings
        self._channel_factory = channel_factory
        self._targets: dict[str, _Target] = {}
        self._listeners: list[Callable[[HealthEvent], None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    # --- queries --------------------------------------------------------------------

    def is_healthy(self, worker_id: str) -> bool:
        t = self._targets.get(worker_id)
        return bool(t and t.healthy)

    def healthy(self, role: Role) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.discovery.workers(role) if self.is_healthy(e.worker_id))

    def subscribe(self, listener: Callable[[HealthEvent], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Begin probing; call after discovery.start() on the same event loop."""
        if self._unsubscribe is not None:
            return
        self._unsubscribe = self.discovery.subscribe(self._on_discovery)
        for role in Role:
            for ep in self.discovery.workers(role):
                self._add(ep)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        targets, self._targets = list(self._targets.values()), {}
        await asyncio.gather(*(self._close(t) for t in targets))

    # --- internals ------------------------------------------------------------------

    def _on_discovery(self, event: DiscoveryEvent) -> None:
        for ep in event.removed:
            self._remove(ep.worker_id)
        for ep in event.changed:  # new address: a different process until proven healthy
            self._remove(ep.worker_id)
            self._add(ep)
        for ep in event.added:
            self._add(ep)

    def _add(self, ep: Endpoint) -> None:
        if ep.worker_id in self._targets:
            return
        t = _Target(ep, self._channel_factory(ep.address, self.settings))
        t.task = asyncio.get_running_loop().create_task(self._loop(t), name=f"health-{ep.worker_id}")
        self._targets[ep.worker_id] = t

    def _remove(self, worker_id: str) -> None:
        t = self._targets.pop(worker_id, None)
        if t is None:
            return
        if t.healthy:
            self._emit(HealthEvent(t.endpoint, False, "removed"))
        asyncio.get_running_loop().create_task(self._close(t))

    async def _close(self, t: _Target) -> None:
        if t.task is not None:
            t.task.cancel()
            try:
                await t.task
            except asyncio.CancelledError:
                pass
        await t.channel.close()

    async def _loop(self, t: _Target) -> None:
        while True:
            result = await probe(t.channel, self.settings)
            self._update(t, result)
            await asyncio.sleep(self.settings.interval_seconds)

    def _update(self, t: _Target, r: ProbeResult) -> None:
        if r.ok:
            t.successes, t.failures = t.successes + 1, 0
            if not t.healthy and t.successes >= self.settings.healthy_threshold:
                t.healthy = True
                self._emit(HealthEvent(t.endpoint, True, r.reason))
        else:
            t.successes, t.failures = 0, t.failures + 1
            if t.healthy and (r.definitive or t.failures >= self.settings.unhealthy_threshold):
                t.healthy = False
                self._emit(HealthEvent(t.endpoint, False, r.reason))

    def _emit(self, event: HealthEvent) -> None:
        log.info("worker %s (%s) %s: %s", event.endpoint.worker_id, event.endpoint.address,
                 "healthy" if event.healthy else "unhealthy", event.reason)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("health listener failed")
