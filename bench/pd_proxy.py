"""A small OpenAI-API proxy in front of vLLM's own prefill/decode disaggregation
(NixlConnector), for bench/serve_gpu.py's `vllm-nixl` layouts.

Each /v1/completions or /v1/chat/completions request goes first to a prefill server
with max_tokens=1, no streaming, and kv_transfer_params asking it to keep the KV for a
remote decode; the kv_transfer_params in its answer (where the KV sits) then go with the
original request to a decode server, whose answer (streamed or not) is relayed to the
client as is. Servers of each role are taken in turn (round robin). /v1/models and
/health answer from the first decode server.

    python bench/pd_proxy.py --port 8000 --prefill http://127.0.0.1:8100 \\
        --decode http://127.0.0.1:8200

Bad requests (not JSON, not an object) get an OpenAI-shaped 400; an unreachable or
failing server a 502 with its status and text.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass

# vLLM's NixlConnector reads these from the request: the prefill server keeps the KV
# (do_remote_decode) and answers where it is; the decode server pulls it (do_remote_prefill)
PREFILL_KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False,
                     "remote_engine_id": None, "remote_block_ids": None,
                     "remote_host": None, "remote_port": None}
ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ProxySettings:
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    timeout_s: float = 600.0


def prefill_body(body: dict) -> dict:
    """The request as sent to the prefill server: one token, whole answer, KV kept."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_KV_PARAMS))
    if "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    return out


def decode_body(body: dict, prefill_answer: dict) -> dict:
    """The original request plus where the prefill server left the KV."""
    params = prefill_answer.get("kv_transfer_params")
    if not isinstance(params, dict):
        raise ValueError("the prefill server's answer has no kv_transfer_params (is it "
                         "running with --kv-transfer-config NixlConnector?)")
    return {**body, "kv_transfer_params": params}


def error_body(message: str, kind: str = "invalid_request_error", code: int = 400) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def make_app(settings: ProxySettings):
    from aiohttp import ClientError, ClientSession, ClientTimeout, web

    prefill = itertools.cycle(settings.prefill)
    decode = itertools.cycle(settings.decode)
    session_key = web.AppKey("session", ClientSession)

    async def on_startup(app) -> None:
        app[session_key] = ClientSession(timeout=ClientTimeout(total=settings.timeout_s))

    async def on_cleanup(app) -> None:
        await app[session_key].close()

    def fail(message: str, status: int, kind: str) -> web.Response:
        return web.json_response(error_body(message, kind, status), status=status)

    async def generate(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return fail("request body is not JSON", 400, "invalid_request_error")
        if not isinstance(body, dict):
            return fail("request body must be a JSON object", 400, "invalid_request_error")
        session = request.app[session_key]
        path = request.path
        try:
            async with session.post(next(prefill) + path, json=prefill_body(body)) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    return fail(f"prefill server: HTTP {resp.status}: {text[:500]}",
                                resp.status if resp.status < 500 else 502, "upstream_error")
                answer = await resp.json()
            forward = decode_body(body, answer)
            async with session.post(next(decode) + path, json=forward) as resp:
                out = web.StreamResponse(status=resp.status, headers={
                    "Content-Type": resp.headers.get("Content-Type", "application/json")})
                await out.prepare(request)
                async for piece in resp.content.iter_any():
                    await out.write(piece)
                await out.write_eof()
                return out
        except ValueError as exc:
            return fail(str(exc), 502, "upstream_error")
        except (ClientError, TimeoutError) as exc:
            return fail(f"upstream unreachable: {type(exc).__name__}: {exc}", 502,
                        "upstream_error")

    async def passthrough(request: web.Request) -> web.Response:
        try:
            async with request.app[session_key].get(settings.decode[0] + request.path) as resp:
                return web.Response(status=resp.status, body=await resp.read(),
                                    content_type=resp.content_type)
        except (ClientError, TimeoutError) as exc:
            return fail(f"decode server unreachable: {exc}", 502, "upstream_error")

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    for route in ROUTES:
        app.router.add_post(route, generate)
    app.router.add_get("/v1/models", passthrough)
    app.router.add_get("/health", passthrough)
    return app


def parse_args(argv: list[str] | None) -> ProxySettings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="a prefill server's base URL (repeat for several)")
    p.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="a decode server's base URL (repeat for several)")
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    if not args.prefill or not args.decode:
        p.error("give at least one --prefill and one --decode URL")
    for url in args.prefill + args.decode:
        if not url.startswith(("http://", "https://")):
            p.error(f"{url!r} is not an http(s) URL")
    strip = lambda urls: tuple(u.rstrip("/").removesuffix("/v1") for u in urls)  # noqa: E731
    return ProxySettings(strip(args.prefill), strip(args.decode), args.host, args.port,
                         args.timeout_s)


def main(argv: list[str] | None = None) -> int:
    from aiohttp import web

    settings = parse_args(argv)
    print(f"pd_proxy on http://{settings.host}:{settings.port}: prefill {settings.prefill}, "
          f"decode {settings.decode}", file=sys.stderr, flush=True)
    web.run_app(make_app(settings), host=settings.host, port=settings.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
