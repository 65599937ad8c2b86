"""Process entry points: run a prefill, decode or router server until SIGINT/SIGTERM.

Each prints one line `READY <role> <address>` on stdout once it serves, which
`pdserve up` and the tests wait for. On a signal the server reports NOT_SERVING to
health checks, stops taking new calls and drains in-flight ones for `grace_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from pdserve.services.common import new_server, serve_metrics, set_serving

log = logging.getLogger(__name__)


@dataclass
class Running:
    """A started server: its address and how to stop it."""

    role: str
    address: str
    stop: Callable[[], Awaitable[None]]
    servicer: object = None


def announce(role: str, address: str) -> None:
    print(f"READY {role} {address}", flush=True)


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# The engine thread, the gRPC loop and the KV connector's loop share one GIL; with the
# default 5 ms switch interval each hand-off of a KV chunk's control messages waits
# behind a busy engine thread. A short interval keeps transfers moving during compute.
WORKER_SWITCH_INTERVAL_S = float(os.environ.get("PDSERVE_SWITCH_INTERVAL_S", "0.0002"))


async def start_worker(settings, grace_s: float = 5.0) -> Running:
    from pdserve.engine.engine import LLMEngine
    from pdserve.services.lenient import add_lenient_servicer
    from pdserve.wire import worker_pb2

    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)

    credentials = settings.tls.server_credentials() if settings.tls.enabled else None
    settings = dataclasses.replace(settings, internal_auth=settings.internal_auth.load())
    warn_if_open(settings)
    engine = await asyncio.to_thread(LLMEngine, settings.engine, settings.model)
    if engine.uses_cuda_graphs:
        started = time.monotonic()
        count = await asyncio.to_thread(engine.warm_up)
        log.info("captured %d CUDA graphs in %.1f s", count, time.monotonic() - started)
    loop = asyncio.get_running_loop()
    if settings.role == "prefill":
        from pdserve.services.prefill.service import SERVICE_NAME, PrefillServicer

        servicer = PrefillServicer(settings, engine, loop)
    else:
        from pdserve.services.decode.service import SERVICE_NAME, DecodeServicer

        servicer = DecodeServicer(settings, engine, loop)
    server, health = new_server([SERVICE_NAME], settings.internal_auth.token)
    service = worker_pb2.DESCRIPTOR.services_by_name[SERVICE_NAME.rsplit(".", 1)[1]]
    add_lenient_servicer(servicer, server, service)
    bind = f"{settings.host}:{settings.port}"
    port = (server.add_secure_port(bind, credentials) if credentials is not None
            else server.add_insecure_port(bind))
    servicer.start()
    await server.start()
    health_server = await start_health_server(health, settings.host, settings.health_port)
    serve_metrics(servicer.core.registry, settings.metrics_port, settings.host)
    await set_serving(health, [SERVICE_NAME], True)

    async def stop() -> None:
        await set_serving(health, [SERVICE_NAME], False)
        await server.stop(grace_s)
        if health_server is not None:
            await health_server.stop(None)
        servicer.stop()

    return Running(settings.role, f"{settings.host}:{port}", stop, servicer)


def warn_if_open(settings) -> None:
    if not (settings.internal_auth.token or (settings.tls.enabled and settings.tls.ca)):
        log.warning("INTERNAL PLANE OPEN: this %s worker accepts internal gRPC calls "
                    "(no router API key; KV destinations from any caller) and KV handshakes "
                    "from anyone who can reach its ports. Give every service the same secret "
                    "(--internal-token-file, or PDSERVE_INTERNAL_TOKEN as `pdserve up` "
                    "does) or mutual TLS (--internal-tls-cert/-key/-ca).", settings.role)


async def start_router(settings, grace_s: float = 5.0) -> Running:
    from pdserve.services.router.service import (SERVICE_NAME, RouterCore, RouterServicer,
                                                 add_router_servicer)

    credentials = grpc_server_credentials(settings)  # bad TLS files fail before anything starts
    core = await asyncio.to_thread(RouterCore, settings)
    await core.start()
    if settings.decode and not await core.wait_ready(timeout_s=60):
        log.warning("no decode worker became healthy; serving anyway")
    server, health = new_server([SERVICE_NAME])
    add_router_servicer(RouterServicer(core), server)  # malformed bytes: INVALID_ARGUMENT
    address = f"{settings.host}:{settings.port}"
    port = (server.add_secure_port(address, credentials) if credentials
            else server.add_insecure_port(address))
    await server.start()
    health_server = await start_health_server(health, settings.host, settings.health_port)
    http = None
    if settings.http_port:
        from pdserve.services.router.http import TlsFiles, start_http

        http = await start_http(core, settings.host, settings.http_port,
                                tls=TlsFiles.from_settings(settings))
    await set_serving(health, [SERVICE_NAME], True)

    async def stop() -> None:
        await set_serving(health, [SERVICE_NAME], False)
        draining = [server.stop(grace_s)] + ([http.stop(grace_s)] if http is not None else [])
        await asyncio.gather(*draining)  # gRPC and HTTP drain in-flight calls together
        if health_server is not None:
            await health_server.stop(0)
        await core.stop()

    return Running("router", f"{settings.host}:{port}", stop, core)


def grpc_server_credentials(settings) -> grpc.ServerCredentials | None:
    """TLS credentials from settings.tls_cert/tls_key (+ tls_ca: client certs required)."""
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_ca
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    try:
        pair = (Path(key).read_bytes(), Path(cert).read_bytes())
        root = Path(ca).read_bytes() if ca else None
    except OSError as exc:
        raise ValueError(f"cannot read TLS file: {exc}") from exc
    return grpc.ssl_server_credentials([pair], root_certificates=root,
                                       require_client_auth=root is not None)


async def start_health_server(health_servicer, host: str, port: int) -> grpc.aio.Server | None:
    """Plaintext gRPC health checking only, on its own port (kubelet probes cannot speak
    TLS); it reports what the main server's health servicer reports."""
    if not port:
        return None
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server


async def serve_until_signal(*starters: Callable[[], Awaitable[Running]]) -> None:
    """Start servers in order, announce each, run until a signal, stop in reverse."""
    running: list[Running] = []
    try:
        for start in starters:
            r = await start()
            running.append(r)
            announce(r.role, r.address)
        await wait_for_signal()
    finally:
        for r in reversed(running):
            await r.stop()


def run(coro) -> int:
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper(),
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    return 0
