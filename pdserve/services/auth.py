"""Internal authentication: one shared secret per cluster, known to the router and every
worker, and nobody else.

Where the token comes from: `--internal-token-file PATH` (the Helm chart mounts a
Kubernetes Secret there), else the environment variable PDSERVE_INTERNAL_TOKEN (how
`pdserve up` hands a freshly generated one to its children; never a command-line
argument: /proc/*/cmdline is world-readable). With neither, a worker serves an open
internal plane and says so (mutual TLS, InternalTls, is the other way to close it).

What it guards, each with its own key derived from the token (so no one channel ever
carries the token itself):
  - gRPC calls to workers: the caller sends `x-pdserve-internal-auth: <hex key>` as
    metadata (a client interceptor on every internal channel); the worker's server
    interceptor compares it in constant time and answers UNAUTHENTICATED otherwise.
    Health checking and reflection stay open for probes.
  - the KV handshake over ZeroMQ: HMACs over a nonce and the handshake fields, both
    ways (kvtransfer/handshake.py takes the derived key).
  - Valkey: `requirepass` = valkey_password(token) (sha256, so the Helm chart can compute
    the same value with `sha256sum`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "PDSERVE_INTERNAL_TOKEN"
METADATA_KEY = "x-pdserve-internal-auth"
MIN_TOKEN_CHARS = 16
# gRPC services any client may call: kubelet/router health probes and tooling
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
REFUSAL_LOG_INTERVAL_S = 10.0


def new_token() -> str:
    """A fresh cluster secret: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def derive_key(token: str, purpose: str) -> bytes:
    """A per-purpose key, so a secret seen on one channel opens no other."""
    return hmac.new(token.encode(), b"pdserve-internal:" + purpose.encode(),
                    hashlib.sha256).digest()


def grpc_credential(token: str) -> str:
    return derive_key(token, "grpc").hex()


def kv_handshake_key(token: str) -> bytes:
    return derive_key(token, "kv-handshake")


def valkey_password(token: str) -> str:
    """Valkey's requirepass: the chart computes the same with
    `sha256sum (printf "pdserve-valkey:%s" token)`."""
    return hashlib.sha256(b"pdserve-valkey:" + token.encode()).hexdigest()


def check_token(token: str, source: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"internal token from {source} is too short ({len(token)} "
                         f"characters; at least {MIN_TOKEN_CHARS}: use e.g. "
                         "`openssl rand -base64 32`)")
    return token


def read_token_file(path: str) -> str:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --internal-token-file: {exc}") from exc
    return check_token(text, path)


@dataclass(frozen=True)
class InternalAuth:
    """Where this service's internal token comes from. `load()` resolves it (reading
    the file happens at start, not when flags are parsed)."""

    token_file: str | None = None
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, token_file: str | None = None) -> "InternalAuth":
        return cls(token_file=token_file, token=os.environ.get(TOKEN_ENV) or None)

    @property
    def configured(self) -> bool:
        return bool(self.token_file or self.token)

    def load(self) -> "InternalAuth":
        """The same settings with `token` read and checked; raises ValueError."""
        if self.token_file:
            return InternalAuth(self.token_file, read_token_file(self.token_file))
        if self.token:
            return InternalAuth(None, check_token(self.token, TOKEN_ENV))
        return self


# ---- server side ---------------------------------------------------------------------
class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the cluster's credential, except OPEN_SERVICES."""

    def __init__(self, token: str) -> None:
        self._expected = grpc_credential(token).encode()
        self._last_log = 0.0
        self.refused = 0

    def authorized(self, metadata) -> bool:
        supplied = next((v for k, v in metadata or () if k == METADATA_KEY), None)
        if isinstance(supplied, str):
            supplied = supplied.encode()
        return supplied is not None and hmac.compare_digest(supplied, self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_SERVICES) or \
                self.authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        self._note_refusal(method)
        return _refusing_handler(handler)

    def _note_refusal(self, method: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:  # a scan must not flood the log
            self._last_log = now
            log.warning("refused an internal call to %s without a valid internal token "
                        "(%d refused so far)", method, self.refused)


REFUSAL = ("missing or wrong internal token: workers accept calls only from the router "
           "and their peers (same --internal-token-file / PDSERVE_INTERNAL_TOKEN)")


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED without reading the
    request (no deserializer: an unauthenticated caller's bytes are never parsed)."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield  # pragma: no cover - makes this an async generator

    streaming_out = handler.response_streaming
    if handler.request_streaming:
        make = grpc.stream_stream_rpc_method_handler if streaming_out else \
            grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.unary_stream_rpc_method_handler if streaming_out else \
            grpc.unary_unary_rpc_method_handler
    return make(refuse_stream if streaming_out else refuse,
                response_serializer=handler.response_serializer)


# ---- client side ---------------------------------------------------------------------
def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, grpc_credential(token)),)


def _with_token(details, pairs):
    metadata = [*(details.metadata or ()), *pairs]
    return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _AioTokenClient:
    def __init__(self, token: str) -> None:
        self._pairs = auth_metadata(token)

    async def _call(self, continuation, details, request):
        return await continuation(_with_token(details, self._pairs), request)


class _UnaryUnary(_AioTokenClient, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioTokenClient._call


class _UnaryStream(_AioTokenClient, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioTokenClient._call


class _StreamUnary(_AioTokenClient, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioTokenClient._call


class _StreamStream(_AioTokenClient, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioTokenClient._call


def aio_client_interceptors(token: str | None) -> list:
    """Interceptors attaching the credential to every call of an aio channel."""
    if not token:
        return []
    return [cls(token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


class _SyncTokenClient(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                       grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._pairs = auth_metadata(token)

    def _details(self, details):
        return _SyncDetails(details.method, details.timeout,
                            [*(details.metadata or ()), *self._pairs], details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready = credentials, wait_for_ready
        self.compression = compression


def sync_channel(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """A blocking channel (tools, tests) that sends the credential on every call."""
    return grpc.intercept_channel(channel, _SyncTokenClient(token)) if token else channel
