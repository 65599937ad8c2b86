"""OpenAI-compatible HTTP API of the router, served by uvicorn inside the router's loop.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (API key
when one is set), GET /health (200 while a decode worker is healthy, else 503) and
GET /metrics (the router's Prometheus registry); /health and /metrics stay open.

Lifecycle of one completion request:
  1. AUTH      an ASGI gate checks `Authorization: Bearer KEY` (or `x-api-key`) before
               anything is read; a miss is 401 in OpenAI's error shape.
  2. PARSE     the body (413 past max_request_bytes) is validated by strict pydantic
               models (JSON types as sent, finite floats, ranges, n == 1, no unsupported
               features); malformed JSON or a bad field is 400 naming it.
  3. CONVERT   the request becomes a pdserve.v1.GenerateRequest (text, chat or token
               ids + sampling), exactly what a gRPC client would send.
  4. START     RouterCore.generate is driven to its first chunk *before* the response
               starts, so everything that fails before the first token (unknown model,
               prompt too long, no workers) gets a real HTTP status: 400/404/503.
  5. RESPOND   stream=true: one SSE event `data: {json}\\n\\n` per chunk (chat: a role
               delta first, then content deltas, then the finish_reason), an optional
               usage chunk (stream_options.include_usage), then `data: [DONE]`; an
               error after the first token is sent as an SSE error event.
               stream=false: the chunks are joined into one response object.
  6. CANCEL    a client that disconnects cancels the task driving the generation; the
               cancellation closes the router's decode stream (RouterCore._stream), the
               decode worker aborts the request, frees its KV blocks and tells prefill.

Nothing from pdserve.engine (or torch) is imported here; clients never see tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Literal

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.services.router.policies import Role
from pdserve.services.router.service import RouterError, RouterSettings
from pdserve.wire import generate_pb2

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})
FINISH = {generate_pb2.FINISH_REASON_STOP: "stop", generate_pb2.FINISH_REASON_LENGTH: "length",
          generate_pb2.FINISH_REASON_ABORT: "abort"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_STATUS = {  # RouterError (gRPC) code -> HTTP status, OpenAI error type
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_INT32, _UINT32, _UINT64 = 2**31 - 1, 2**32 - 1, 2**64 - 1
# a token id as the wire carries it (int32); the router checks it against the vocabulary
TokenId = Annotated[int, Field(ge=0, le=_INT32)]


# ---- errors ------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code

    @classmethod
    def from_router(cls, exc: RouterError) -> "ApiError":
        status, type_ = _STATUS.get(exc.code, (500, "server_error"))
        code = "model_not_found" if exc.code == grpc.StatusCode.NOT_FOUND else None
        param = "model" if code else None
        return cls(status, str(exc), type_, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {err['msg']}")
    if err["type"] == "model_type" and not err["loc"]:
        return ApiError(400, "request body must be a JSON object")
    path = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    param = str(err["loc"][0]) if err["loc"] else None
    return ApiError(400, f"{path}: {message}" if path else message, param=param)


# ---- request models ----------------------------------------------------------------------
class _Strict(BaseModel):
    """JSON types as sent, as vLLM's request models take them: no "5" for an int, no
    "yes" for a bool, no Infinity or NaN for a float (an int is a fine float)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _SamplingBody(_Strict):
    """Fields shared by both endpoints; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = Field(None, ge=1, le=_UINT32)
    min_tokens: int | None = Field(None, ge=0, le=_UINT32)  # extension (vLLM)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=_INT32)  # extension; -1 or 0 = off
    seed: int | None = Field(None, ge=-(2**63), le=_UINT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None  # extension (vLLM)
    ignore_eos: bool | None = False  # extension (vLLM)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    session_id: str | None = None  # extension: router session affinity

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    def unsupported(self) -> str | None:
        """The first requested feature this server cannot honour, if any."""
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions",
                     "logit_bias"):
            if extra.get(name) not in (None, False, 0, "", [], {}):
                return name
        if extra.get("best_of") not in (None, 1):
            return "best_of"
        for name in ("presence_penalty", "frequency_penalty"):
            if extra.get(name) not in (None, 0, 0.0):
                return name
        return None


class CompletionBody(_SamplingBody):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]


class ContentPart(_Strict):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class MessageIn(_Strict):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" or p.text is None for p in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(p.text for p in self.content)


class ChatBody(_SamplingBody):
    messages: list[MessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=_UINT32)


def _parse(model: type[BaseModel], raw: bytes):
    try:
        body = model.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise _validation_error(exc) from None
    feature = body.unsupported()
    if feature:
        raise ApiError(400, f"{feature} is not supported by this server", param=feature)
    return body


# ---- OpenAI request -> GenerateRequest ---------------------------------------------------
def _sampling(body: _SamplingBody, max_tokens: int | None) -> generate_pb2.SamplingParams:
    s = generate_pb2.SamplingParams(ignore_eos=bool(body.ignore_eos))
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if body.min_tokens is not None:
        s.min_tokens = body.min_tokens
    if body.temperature is not None:
        s.temperature = body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    if body.top_k is not None:
        s.top_k = max(body.top_k, 0)
    if body.seed is not None:
        s.seed = body.seed & _UINT64
    s.stop.extend([body.stop] if isinstance(body.stop, str) else (body.stop or []))
    s.stop_token_ids.extend(body.stop_token_ids or [])
    return s


def _base_request(body: _SamplingBody, request_id: str, max_tokens: int | None
                  ) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(sampling=_sampling(body, max_tokens), model=body.model,
                                       request_id=request_id)
    if body.session_id:
        req.session_id = body.session_id
    return req


def completion_request(body: CompletionBody, request_id: str) -> generate_pb2.GenerateRequest:
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    req = _base_request(body, request_id, max_tokens)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "batched prompts are not supported; send one prompt per request",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)  # int32 range checked by TokenId
    return req


def chat_request(body: ChatBody, request_id: str) -> generate_pb2.GenerateRequest:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    req = _base_request(body, request_id, max_tokens)
    req.chat.add_generation_prompt = True
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        req.chat.messages.append(generate_pb2.ChatMessage(role=role, content=m.text()))
    return req


# ---- driving the core --------------------------------------------------------------------
@dataclass
class _Started:
    """A generation that produced its first chunk; iterate for all of them."""

    first: generate_pb2.GenerateChunk
    rest: AsyncIterator[generate_pb2.GenerateChunk]

    async def chunks(self) -> AsyncIterator[generate_pb2.GenerateChunk]:
        yield self.first
        async for chunk in self.rest:
            yield chunk

    async def close(self) -> None:
        await self.rest.aclose()


async def _start(core, req: generate_pb2.GenerateRequest) -> _Started:
    """Run the request up to its first chunk; errors before it become ApiError."""
    gen = core.generate(req)
    try:
        first = await gen.__anext__()
    except RouterError as exc:
        raise ApiError.from_router(exc) from None
    except StopAsyncIteration:
        raise ApiError(500, "the decode worker ended the stream without output",
                       "server_error") from None
    except BaseException:
        await gen.aclose()
        raise
    return _Started(first, gen)


def _chunk_error(chunk: generate_pb2.GenerateChunk) -> ApiError | None:
    if chunk.finish_reason == generate_pb2.FINISH_REASON_ERROR:
        return ApiError(500, f"generation failed: {chunk.error or 'unknown error'}",
                        "server_error")
    return None


async def _collect(started: _Started) -> tuple[str, generate_pb2.GenerateChunk]:
    text, last = [], started.first
    try:
        async for chunk in started.chunks():
            text.append(chunk.text_delta)
            last = chunk
    except RouterError as exc:
        raise ApiError.from_router(exc) from None
    finally:
        await started.close()
    error = _chunk_error(last)
    if error is not None:
        raise error
    return "".join(text), last


async def _unless_disconnected(request: Request, work):
    """Await `work`, cancelling it if the client goes away first (non-streaming calls)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task not in done:
        log.info("client disconnected; generation cancelled")
        raise ApiError(499, "client disconnected")  # never reaches the client
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- response shapes ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    """How one endpoint's objects look; builds every JSON object it sends."""

    chat: bool
    id: str
    created: int
    model: str
    include_usage: bool = False

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, last: generate_pb2.GenerateChunk) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=FINISH.get(last.finish_reason),
                      stop_reason=last.stop_reason or None)
        return {**self._head(self.object), "choices": [choice], "usage": usage(last.usage)}

    def chunk(self, *, text: str | None = None, role: bool = False,
              finish: str | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice.update(logprobs=None, finish_reason=finish)
        obj = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
               "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return obj

    def usage_chunk(self, last: generate_pb2.GenerateChunk) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(last.usage)}


def usage(u: generate_pb2.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _events(started: _Started, shape: _Shape) -> AsyncIterator[bytes]:
    """SSE events for one generation, ending in `data: [DONE]`."""
    last = started.first
    if shape.chat:
        yield sse(shape.chunk(role=True, text=""))
    try:
        async for chunk in started.chunks():
            last = chunk
            if chunk.text_delta:
                yield sse(shape.chunk(text=chunk.text_delta))
            error = _chunk_error(chunk)
            if error is not None:
                yield sse(error.body())
                break
            if chunk.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
                yield sse(shape.chunk(finish=FINISH.get(chunk.finish_reason)))
        else:
            if shape.include_usage:
                yield sse(shape.usage_chunk(last))
    except RouterError as exc:
        yield sse(ApiError.from_router(exc).body())
    finally:
        await started.close()
    yield sse("[DONE]")


class _EventStream(StreamingResponse):
    """StreamingResponse that always closes its iterator, so a client disconnect (which
    makes Starlette cancel the sending task) closes the generation deterministically."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# ---- the app -----------------------------------------------------------------------------
class ApiKeyGate:
    """ASGI middleware: every path but OPEN_PATHS needs the API key (when one is set)."""

    def __init__(self, app, key: str | None) -> None:
        self.app, self.key = app, (key or "").encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.key and scope["path"] not in OPEN_PATHS \
                and not self._authorized(scope):
            response = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                "authentication_error", code="invalid_api_key").response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or ())
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        supplied = token.strip() if scheme.lower() == b"bearer" else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(supplied, self.key)


def create_app(core) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    started_at = int(time.time())
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        ok = bool(core.health.healthy(Role.DECODE))
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(core.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": core.source.name, "object": "model", "created": started_at,
            "owned_by": "pdserve", "max_model_len": core.model_config.max_position}]})

    limit = getattr(core.settings, "max_request_bytes", RouterSettings.max_request_bytes)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _parse(CompletionBody, await read_body(request, limit))
        request_id = uuid.uuid4().hex
        return await _serve(core, request, body, completion_request(body, request_id),
                            chat=False, rid=f"cmpl-{request_id}")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatBody, await read_body(request, limit))
        request_id = uuid.uuid4().hex
        return await _serve(core, request, body, chat_request(body, request_id),
                            chat=True, rid=f"chatcmpl-{request_id}")

    return ApiKeyGate(app, core.settings.api_key)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it when
    Content-Length says so, else as soon as the chunks read exceed it)."""
    too_large = ApiError(413, f"request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def _serve(core, request: Request, body: _SamplingBody,
                 req: generate_pb2.GenerateRequest, *, chat: bool, rid: str) -> Response:
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    shape = _Shape(chat, rid, int(time.time()), core.source.name, include_usage)
    started = await _unless_disconnected(request, _start(core, req))
    if body.stream:
        return _EventStream(_events(started, shape), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, last = await _unless_disconnected(request, _collect(started))
    return JSONResponse(shape.full(text, last))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError) -> Response:
        if exc.status >= 500:
            log.warning("HTTP %d: %s", exc.status, exc.message)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException) -> Response:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_).response()

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception) -> Response:
        log.exception("unhandled error in the HTTP API")
        return ApiError(500, "internal server error", "server_error").response()


# ---- server ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate and key; with `ca`, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: str
    key: str
    ca: str | None = None

    @classmethod
    def from_settings(cls, settings) -> "TlsFiles | None":
        cert, key, ca = (getattr(settings, f"tls_{n}", None) for n in ("cert", "key", "ca"))
        if not (cert or key or ca):
            return None
        if not (cert and key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        return cls(cert, key, ca)

    def uvicorn_options(self) -> dict:
        opts: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.ca:
            opts.update(ssl_ca_certs=self.ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return opts


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signal handling to the router process."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class HttpHandle:
    server: _EmbeddedServer
    task: asyncio.Task
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace_s + 1.0)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


async def start_http(core, host: str, port: int, tls: TlsFiles | None = None,
                     grace_s: float = 5.0) -> HttpHandle:
    """Serve the HTTP API on host:port (port 0 = any free one) until stop()."""
    sock = _listen(host, port)
    config = uvicorn.Config(create_app(core), lifespan="off", log_level="warning",
                            access_log=False, timeout_graceful_shutdown=grace_s,
                            **(tls.uvicorn_options() if tls else {}))
    try:
        config.load()  # bad certificate files fail here, with the file named
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise ValueError(f"cannot load TLS files for the HTTP API: {exc}") from exc
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-api")
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise RuntimeError("the HTTP API server exited during startup")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    log.info("OpenAI-compatible HTTP API on %s://%s:%d", "https" if tls else "http", host, bound)
    return HttpHandle(server, task, host, bound, "https" if tls else "http")
