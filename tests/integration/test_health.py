"""HealthChecker against real grpc.aio servers: SERVING/NOT_SERVING flips, a killed and
restarted worker process, unknown service names, discovery adding and removing workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.services.router.discovery import StaticDiscovery
from pdserve.services.router.health import HealthChecker, HealthEvent, HealthSettings
from pdserve.services.router.policies import Role

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST = HealthSettings(interval_seconds=0.1, timeout_seconds=0.5, unhealthy_threshold=2,
                      healthy_threshold=1)

WORKER_SCRIPT = """
import asyncio, sys, grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


class Worker:
    """An in-process grpc.aio server with the standard health service."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    async def start(self, status=SERVING) -> "Worker":
        await self.health.set("", status)
        await self.server.start()
        return self

    async def set(self, status, service: str = "") -> None:
        await self.health.set(service, status)


def spawn_worker(script: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line, "worker process did not start"
    return proc, int(line)


async def eventually(pred: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def healthy_ids(hc: HealthChecker, role: Role) -> set[str]:
    return {e.worker_id for e in hc.healthy(role)}


def test_flip_kill_restart_and_discovery_changes():
    proc, proc_port = spawn_worker(WORKER_SCRIPT)
    try:
        asyncio.run(_scenario(proc, proc_port))
    finally:
        for p in [proc] + _restarted:
            if p.poll() is None:
                p.kill()
            p.wait()


_restarted: list[subprocess.Popen] = []


async def _scenario(proc: subprocess.Popen, proc_port: int) -> None:
    a, b, d = [await Worker().start() for _ in range(3)]
    proc_addr = f"127.0.0.1:{proc_port}"
    disc = StaticDiscovery(prefill=[a.address, b.address, proc_addr], decode=[d.address])
    await disc.start()
    hc = HealthChecker(disc, FAST)
    events: list[HealthEvent] = []
    hc.subscribe(events.append)
    await hc.start()
    try:
        await eventually(lambda: healthy_ids(hc, Role.PREFILL) == {a.address, b.address, proc_addr})
        await eventually(lambda: healthy_ids(hc, Role.DECODE) == {d.address})

        # NOT_SERVING (draining) removes at once; SERVING re-adds.
        await a.set(NOT_SERVING)
        took = await eventually(lambda: a.address not in healthy_ids(hc, Role.PREFILL))
        assert took < 1.0
        await a.set(SERVING)
        await eventually(lambda: a.address in healthy_ids(hc, Role.PREFILL))

        # A killed process: removed after consecutive failures; back when it restarts.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        await eventually(lambda: proc_addr not in healthy_ids(hc, Role.PREFILL))
        assert {a.address, b.address} <= healthy_ids(hc, Role.PREFILL)
        restarted, _ = spawn_worker(WORKER_SCRIPT, proc_port)
        _restarted.append(restarted)
        took = await eventually(lambda: proc_addr in healthy_ids(hc, Role.PREFILL))
        assert took < 3.0  # reconnect backoff is capped near the probe interval

        # A stopped in-process server too (connection refused, not a status).
        await b.server.stop(grace=None)
        await eventually(lambda: b.address not in healthy_ids(hc, Role.PREFILL))

        # Discovery drops a worker: it leaves the healthy set and is no longer probed.
        disc.set_addresses(Role.DECODE, [])
        assert healthy_ids(hc, Role.DECODE) == set()
        assert any(e.endpoint.address == d.address and e.reason == "removed" for e in events)
        # ... and adds one: probed right away.
        disc.set_addresses(Role.DECODE, [d.address])
        await eventually(lambda: healthy_ids(hc, Role.DECODE) == {d.address}, timeout=1.0)
    finally:
        await hc.stop()
        await disc.stop()
        for w in (a, b, d):
            await w.server.stop(grace=None)

    reasons = [(e.endpoint.address, e.healthy, e.reason) for e in events]
    assert (a.address, False, "NOT_SERVING") in reasons
    assert (proc_addr, False, "UNAVAILABLE") in reasons


def test_named_service_and_unreachable_worker():
    async def scenario() -> None:
        w = await Worker().start()
        await w.set(SERVING, "pdserve.v1.Prefill")
        disc = StaticDiscovery(prefill=[w.address, "127.0.0.1:9"])  # nothing on port 9
        await disc.start()
        hc = HealthChecker(disc, HealthSettings(0.05, 0.3, 2, 2, "pdserve.v1.Prefill"))
        await hc.start()
        try:
            await eventually(lambda: healthy_ids(hc, Role.PREFILL) == {w.address})
            await w.set(NOT_SERVING, "pdserve.v1.Prefill")  # only that service drains
            await eventually(lambda: not hc.healthy(Role.PREFILL))
            await asyncio.sleep(0.3)
            assert not hc.is_healthy("127.0.0.1:9")  # never seen healthy
        finally:
            await hc.stop()
            await w.server.stop(grace=None)

        hc = HealthChecker(disc, HealthSettings(0.05, 0.3, 1, 1, "no.such.Service"))
        await hc.start()
        await asyncio.sleep(0.3)
        assert not hc.healthy(Role.PREFILL)  # NOT_FOUND is not healthy
        await hc.stop()

    asyncio.run(scenario())
