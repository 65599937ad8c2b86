"""gRPC client for the router: `pdserve generate --router ADDR` and a small Python API."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc

from pdserve.engine.params import SamplingParams
from pdserve.services.common import sampling_to_proto
from pdserve.wire import generate_pb2, generate_pb2_grpc

FINISH_NAMES = {v: k for k, v in {
    "stop": generate_pb2.FINISH_REASON_STOP, "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT, "error": generate_pb2.FINISH_REASON_ERROR}.items()}


def make_request(*, prompt: str | None = None, chat: list[dict] | None = None,
                 token_ids: list[int] | None = None, params: SamplingParams | None = None,
                 request_id: str | None = None, session_id: str | None = None,
                 mode: int = generate_pb2.DISAGGREGATION_MODE_UNSPECIFIED,
                 ) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(sampling=sampling_to_proto(params or SamplingParams()),
                                       mode=mode)
    if prompt is not None:
        req.text = prompt
    elif chat is not None:
        req.chat.messages.extend(generate_pb2.ChatMessage(**m) for m in chat)
        req.chat.add_generation_prompt = True
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    if request_id:
        req.request_id = request_id
    if session_id:
        req.session_id = session_id
    return req


@dataclass(frozen=True)
class TlsClient:
    """PEM files for a TLS connection: the CA that signed the router's certificate and,
    for mutual TLS, this client's certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca),
                                            private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def open_channel(address: str, tls: TlsClient | None = None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.credentials())


def stream(address: str, request: generate_pb2.GenerateRequest, api_key: str | None = None,
           timeout: float | None = None, tls: TlsClient | None = None,
           channel: grpc.Channel | None = None) -> Iterator[generate_pb2.GenerateChunk]:
    """Stream one request's chunks; on `channel` when given (a client sending many
    requests keeps one open), else on a channel of its own."""
    if channel is not None:
        yield from _generate(channel, request, api_key, timeout)
        return
    with open_channel(address, tls) as own:
        yield from _generate(own, request, api_key, timeout)


def _generate(channel: grpc.Channel, request, api_key: str | None, timeout: float | None):
    stub = generate_pb2_grpc.RouterStub(channel)
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    yield from stub.Generate(request, metadata=metadata, timeout=timeout)


def generate_remote(args, params: SamplingParams) -> int:
    chat = [{"role": "user", "content": args.chat}] if args.chat is not None else None
    request = make_request(prompt=args.prompt, chat=chat, params=params)
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsClient(args.tls_ca, args.tls_cert, args.tls_key)
    start = time.monotonic()
    text, tokens, times, last = [], [], [], None
    try:
        for chunk in stream(args.router, request, args.api_key, tls=tls):
            times.append(time.monotonic())
            tokens += chunk.token_ids
            text.append(chunk.text_delta)
            if not args.json:
                print(chunk.text_delta, end="", flush=True)
            last = chunk
    except grpc.RpcError as exc:
        print(f"\npdserve: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if not args.json:
        print()
        return 0
    itl = [round((b - a) * 1000, 3) for a, b in zip(times, times[1:])]
    print(json.dumps({
        "request_id": last.request_id, "text": "".join(text), "token_ids": tokens,
        "finish_reason": FINISH_NAMES.get(last.finish_reason, "unknown"),
        "prompt_tokens": last.usage.prompt_tokens, "cached_tokens": last.usage.cached_tokens,
        "ttft_ms": round((times[0] - start) * 1000, 3) if times else None,
        "itl_ms": itl, "itl_ms_mean": round(sum(itl) / len(itl), 3) if itl else None,
        "prefill_worker": last.prefill_worker, "decode_worker": last.decode_worker,
    }))
    return 0
