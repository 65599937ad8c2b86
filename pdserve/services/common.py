"""What every service shares: proto <-> engine conversions, gRPC server setup (health
checking + reflection), error mapping and the /metrics endpoint."""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from pdserve.engine.params import InvalidRequest, SamplingParams
from pdserve.services.auth import TokenServerInterceptor, aio_client_interceptors
from pdserve.wire import generate_pb2, worker_pb2

if TYPE_CHECKING:  # the router imports this module and must not import torch
    from pdserve.engine.engine import RequestOutput

log = logging.getLogger(__name__)


def trace(logger: logging.Logger, request_id: str, event: str, *args) -> None:
    """At DEBUG: one line per hop of a request with a host-wide monotonic time in ms,
    so the router's and workers' logs line up (`grep ' trace <request id>'`). `event`
    is %-formatted with args only when the line is written."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("trace %s %s %.3f", request_id, event % args if args else event,
                     time.monotonic() * 1000)

DEFAULT_MAX_TOKENS = 256
FINISH_REASONS = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
    "error": generate_pb2.FINISH_REASON_ERROR,
}
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20)]


def sampling_from_proto(msg: generate_pb2.SamplingParams) -> SamplingParams:
    """Proto params with documented defaults; raises InvalidRequest on bad values."""
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    temperature = msg.temperature if msg.HasField("temperature") else 1.0
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    # a float field holds inf for any JSON number beyond float32 (e.g. temperature 1e39)
    if not (math.isfinite(temperature) and math.isfinite(top_p)):
        raise InvalidRequest("temperature and top_p must be finite numbers")
    return SamplingParams(
        max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
        top_k=int(msg.top_k) if msg.HasField("top_k") else 0,
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos, min_tokens=int(msg.min_tokens))


def sampling_to_proto(p: SamplingParams) -> generate_pb2.SamplingParams:
    msg = generate_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def finish_reason_proto(reason: str | None) -> int:
    if not reason:
        return generate_pb2.FINISH_REASON_UNSPECIFIED
    return FINISH_REASONS.get(reason.split(":", 1)[0], generate_pb2.FINISH_REASON_ERROR)


def chunk_from_output(out: RequestOutput, worker_id: str = "") -> generate_pb2.GenerateChunk:
    chunk = generate_pb2.GenerateChunk(
        request_id=out.request_id, token_ids=out.new_token_ids, text_delta=out.text_delta,
        finish_reason=finish_reason_proto(out.finish_reason))
    if out.finished:
        chunk.usage.CopyFrom(generate_pb2.Usage(
            prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens))
        chunk.timing.CopyFrom(timing_proto(out.ttft_s or 0.0, out.itl_s))
        chunk.timing.queue_seconds = out.queue_s or 0.0
        chunk.timing.prefill_seconds = out.prefill_s or 0.0
        chunk.decode_worker = worker_id
        if out.finish_reason and out.finish_reason.startswith("error"):
            chunk.error = out.finish_reason.partition(":")[2].strip() or "failed"
    return chunk


def remote_timing(timing: generate_pb2.Timing, stats: worker_pb2.PrefillStats) -> None:
    """A remotely prefilled request's stages, as its prefill worker measured them."""
    timing.queue_seconds = stats.queue_seconds
    timing.prefill_seconds = stats.compute_seconds
    timing.kv_transfer_seconds = stats.transfer_seconds


def timing_proto(ttft_s: float, itl_s: list[float]) -> generate_pb2.Timing:
    t = generate_pb2.Timing(ttft_seconds=ttft_s)
    if itl_s:
        ordered = sorted(itl_s)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        t.itl_mean_seconds = statistics.fmean(itl_s)
        t.itl_p50_seconds, t.itl_p90_seconds, t.itl_p99_seconds = pct(0.5), pct(0.9), pct(0.99)
        t.itl_max_seconds = ordered[-1]
        t.tpot_seconds = t.itl_mean_seconds
    return t


async def abort_invalid(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def new_server(service_names: list[str], internal_token: str | None = None
               ) -> tuple[grpc.aio.Server, health.HealthServicer]:
    """An aio server with gRPC health checking and reflection for the given services.
    With an internal token, every other call must carry it (services/auth.py)."""
    interceptors = [TokenServerInterceptor(internal_token)] if internal_token else []
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else \
        health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_serving(health_servicer, service_names: list[str], serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ["", *service_names]:
        result = health_servicer.set(name, status)
        if hasattr(result, "__await__"):
            await result


def serve_metrics(registry, port: int, host: str = "0.0.0.0") -> None:
    if port:
        start_http_server(port, addr=host, registry=registry)


@dataclass(frozen=True)
class InternalTls:
    """PEM files for traffic between pdserve services (router -> workers, decode ->
    prefill). Servers present cert/key and, with a CA, require clients to present a
    certificate it signed (mutual TLS); clients verify servers with the same CA and
    present the same cert/key."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    # workers are dialed by pod IP, which no certificate made ahead of time can name:
    # verify the peer's certificate against this fixed name instead
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        if not (self.cert and self.key):
            raise ValueError("internal TLS needs both --internal-tls-cert and --internal-tls-key")
        try:
            return (Path(self.cert).read_bytes(), Path(self.key).read_bytes(),
                    Path(self.ca).read_bytes() if self.ca else None)
        except OSError as exc:
            raise ValueError(f"cannot read internal TLS file: {exc}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)


# Peers are in the same cluster and a restarted one is back within seconds: reconnect
# within 1 s instead of after gRPC's default backoff (up to 120 s), so a worker the
# router's health check re-admits also takes requests (issue 17, item 5).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


def internal_channel(address: str, tls: InternalTls | None, options=(),
                     internal_token: str | None = None) -> grpc.aio.Channel:
    """A channel to another pdserve service, over TLS when internal TLS is configured;
    with an internal token, every call carries it."""
    given = {key for key, _ in options}
    options = [*GRPC_OPTIONS, *(o for o in RECONNECT_OPTIONS if o[0] not in given), *options]
    interceptors = aio_client_interceptors(internal_token)
    if tls is not None and tls.enabled:
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class ChannelPool:
    """One cached channel per peer address (internal TLS and the internal token applied
    when configured)."""

    def __init__(self, tls: InternalTls | None, internal_token: str | None = None) -> None:
        self._tls = tls
        self._token = internal_token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = internal_channel(
                address, self._tls, internal_token=self._token)
        return channel

    def discard_if_failed(self, address: str) -> grpc.aio.Channel | None:
        """Drop the cached channel to `address` when it is waiting out a reconnect backoff
        and return it for closing; the next get() connects at once. Called when the peer
        is known to be back (its health check passed again), so the first request after
        a restart does not fail fast on the old channel's backoff."""
        channel = self._channels.get(address)
        failed = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        if channel is None or channel.get_state() is not failed:
            return None
        return self._channels.pop(address)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
