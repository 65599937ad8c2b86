"""gRPC client for the router: `pdserve generate --router ADDR` and a small Python API."""

from __future__ import annotations

import json
import sys
import time
from typing import Iterator

import grpc

from pdserve.engine.sampling import SamplingParams
from pdserve.services.common import sampling_to_proto
from pdserve.wire import generate_pb2, generate_pb2_grpc

FINISH_NAMES = {v: k for k, v in {
    "stop": generate_pb2.FINISH_REASON_STOP, "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT, "error": generate_pb2.FINISH_REASON_ERROR}.items()}


def make_request(*, prompt: str | None = None, chat: list[dict] | None = None,
                 token_ids: list[int] | None = None, params: SamplingParams | None = None,
                 request_id: str | None = None, session_id: str | None = None,
                 ) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(sampling=sampling_to_proto(params or SamplingParams()))
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


def stream(address: str, request: generate_pb2.GenerateRequest, api_key: str | None = None,
           timeout: float | None = None) -> Iterator[generate_pb2.GenerateChunk]:
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.RouterStub(channel)
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        yield from stub.Generate(request, metadata=metadata, timeout=timeout)


def generate_remote(args, params: SamplingParams) -> int:
    chat = [{"role": "user", "content": args.chat}] if args.chat is not None else None
    request = make_request(prompt=args.prompt, chat=chat, params=params)
    start = time.monotonic()
    text, tokens, times, last = [], [], [], None
    try:
        for chunk in stream(args.router, request, args.api_key):
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
