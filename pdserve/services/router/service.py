"""The router: the public gRPC API (and the core the OpenAI HTTP front end shares).

Lifecycle of one Generate call:
  1. ACCEPT    a request id already in flight here is refused (ALREADY_EXISTS); a
               prompt too long to fit is refused by its length, a long one tokenized
               on a tokenizer thread (the event loop keeps serving); sampling validated
               (ids against the vocabulary, prompt + max_tokens within the context).
               Bad input ends here with INVALID_ARGUMENT and touches no worker.
  2. ROUTE     the current policy generation (hot-reloaded YAML) picks the route
               (disaggregated or decode-only), a prefill worker and a decode worker
               among the healthy ones, using the workers' last reported load.
  3. STREAM    DecodeService.Generate streams chunks back; the router adds router-side
               timing (TTFT from arrival here) and worker names to the last chunk.
  4. RETRY     a decode worker that fails before the first token is replaced by
               another one (up to max_attempts); after tokens were streamed the call
               ends with UNAVAILABLE naming the worker.
  Cancel: the client's cancellation cancels the decode stream, and the decode worker
  aborts the request and tells its prefill worker to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from pdserve.engine.loader import load_model_meta
from pdserve.engine.params import InvalidRequest
from pdserve.engine.loader.tokenizer import ChatTemplateError
from pdserve.metrics import latency_metrics, new_registry, router_metrics
from pdserve.services.auth import InternalAuth
from pdserve.services.common import (ChannelPool, InternalTls, internal_channel,
                                     sampling_from_proto, trace)
from pdserve.services.lenient import Malformed, add_lenient_servicer
from pdserve.services.router.config import RouterConfig, ConfigWatcher, DiscoveryConfig
from pdserve.services.router.discovery import Discovery, StaticDiscovery, create_discovery
from pdserve.services.router.health import HealthChecker, HealthSettings, insecure_channel
from pdserve.services.router.policies import (NoWorkersError, PolicySet, Role, Route,
                                              StatsRecorder, WorkerView, build_policies,
                                              make_request_view)
from pdserve.wire import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "pdserve.v1.Router"
# StartPrefill is answered when its job ends: queueing, compute and the KV's transfer,
# or the prefill worker's KV lease for a job nobody claims
START_PREFILL_TIMEOUT_S = 600.0
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
# a decode worker's answers about the request itself: passed on, never retried
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}
# prompts up to this many characters are tokenized on the event loop (well under 1 ms);
# longer ones on the tokenizer threads
_INLINE_TOKENIZE_CHARS = 2048
# a token covers at most its vocabulary string's length in bytes (byte-level BPE) and
# a character is at least one byte; the factor leaves room for normalizers
_CHARS_PER_TOKEN_SLACK = 4


def _is_final(exc: grpc.aio.AioRpcError) -> bool:
    """A worker's deliberate failure (e.g. KV transfer failed, fallback=fail): no retry."""
    return any(key == "pdserve-final-error" for key, _ in (exc.trailing_metadata() or ()))


# a request's own disaggregation mode; UNSPECIFIED (absent) leaves it to the config
_REQUEST_MODES = {generate_pb2.DISAGGREGATION_ALWAYS: "always",
                  generate_pb2.DISAGGREGATION_NEVER: "never",
                  generate_pb2.DISAGGREGATION_AUTO: "auto"}


class RouterError(Exception):
    """A request the router cannot serve; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RouterSettings:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int = 0
    config_path: str | None = None
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    block_size: int = 16
    stats_interval_s: float = 0.5
    max_attempts: int = 3
    api_key: str | None = None
    tls_cert: str | None = None      # PEM certificate (chain) for the gRPC and HTTP ports
    tls_key: str | None = None       # its private key
    tls_ca: str | None = None        # client CA: set = mutual TLS, client certificates required
    health_port: int = 0             # plaintext gRPC health only (probes while TLS is on)
    worker_tls: InternalTls = field(default_factory=InternalTls)  # router -> workers
    internal_auth: InternalAuth = field(default_factory=InternalAuth)  # router -> workers
    discovery: str | None = None     # static | k8s (kubernetes); None = the config file's
    namespace: str | None = None     # k8s discovery: overrides the config file's namespace
    selector: str | None = None      # k8s discovery: overrides the config file's selector
    health: HealthSettings = field(default_factory=lambda: HealthSettings(interval_seconds=1.0))
    # disaggregated requests: StartPrefill goes to the prefill worker alongside the decode
    # worker's Generate, so the prompt computes while the decode worker reserves blocks
    early_prefill_start: bool = True
    max_request_bytes: int = 32 << 20  # HTTP bodies (413 beyond) and gRPC requests
    tokenizer_threads: int = 2         # prompts tokenized off the event loop


_DISCOVERY_BACKENDS = {"static": "static", "k8s": "kubernetes", "kubernetes": "kubernetes"}


def make_discovery(settings: RouterSettings, config: RouterConfig) -> Discovery:
    """Command-line flags win over the config file's discovery section: --prefill/--decode
    addresses mean static discovery; --discovery picks the backend, and --namespace and
    --selector override those keys of the file's kubernetes section."""
    backend = config.discovery.backend
    if settings.discovery is not None:
        try:
            backend = _DISCOVERY_BACKENDS[settings.discovery]
        except KeyError:
            raise ValueError(f"unknown discovery {settings.discovery!r}; choose from "
                             f"{sorted(_DISCOVERY_BACKENDS)}") from None
    if settings.prefill or settings.decode:
        if settings.discovery is not None and backend != "static":
            raise ValueError("--prefill/--decode addresses are static discovery; "
                             f"they cannot be combined with --discovery {settings.discovery}")
        return StaticDiscovery(settings.prefill, settings.decode)
    if backend == "kubernetes":
        update = {k: v for k, v in (("namespace", settings.namespace),
                                    ("selector", settings.selector)) if v}
        kubernetes = config.discovery.kubernetes.model_copy(update=update)
        return create_discovery(DiscoveryConfig(backend="kubernetes", kubernetes=kubernetes))
    return create_discovery(config.discovery.model_copy(update={"backend": backend}))


class RouterCore:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.source, self.model_config, self.tokenizer = load_model_meta(settings.model)
        self.fingerprint = self.model_config.fingerprint()
        self.max_prompt_chars = (self.model_config.max_position * _CHARS_PER_TOKEN_SLACK
                                 * _longest_token_chars(self.tokenizer))
        self._tokenize_pool = ThreadPoolExecutor(settings.tokenizer_threads,
                                                 thread_name_prefix="tokenize")
        self._active: set[str] = set()  # request ids of the calls in flight here
        self.watcher: ConfigWatcher | None = None
        if settings.config_path:
            self.watcher = ConfigWatcher(settings.config_path, build=build_policies,
                                         on_change=lambda _: self.metrics.config_reloads.labels("ok").inc(),
                                         on_error=lambda _: self.metrics.config_reloads.labels("rejected").inc())
            config = self.watcher.current.config
        else:
            config = RouterConfig()
        self._default_policies = build_policies(config)
        self.discovery = make_discovery(settings, config)
        self.health = HealthChecker(self.discovery, settings.health,
                                    channel_factory=self._health_channel)
        self.recorders = {Role.PREFILL: StatsRecorder(), Role.DECODE: StatsRecorder()}
        self.worker_stats: dict[str, worker_pb2.WorkerStats] = {}
        self._channels = ChannelPool(settings.worker_tls, settings.internal_auth.load().token)
        self.registry = new_registry()
        self.metrics = router_metrics(self.registry)
        self.latency = latency_metrics(self.registry, self.source.name, "router")
        self._background: set[asyncio.Task] = set()  # fire-and-forget calls in flight
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await self.discovery.start()
        await self.health.start()
        self.health.subscribe(self._on_health)
        if self.watcher is not None:
            self.watcher.start()
        self._tasks.append(asyncio.create_task(self._poll_stats(), name="worker-stats"))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._background]:
            task.cancel()
        if self.watcher is not None:
            await self.watcher.stop()
        await self.health.stop()
        await self.discovery.stop()
        await self._channels.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """True once at least one decode worker is healthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.health.healthy(Role.DECODE):
                return True
            await asyncio.sleep(0.05)
        return False

    @property
    def policies(self) -> PolicySet:
        return self.watcher.current.built if self.watcher is not None else self._default_policies

    # ---- requests --------------------------------------------------------------------
    async def tokenize(self, request: generate_pb2.GenerateRequest) -> list[int]:
        """prompt_ids, on a tokenizer thread unless the prompt is short: the tokenizer
        releases the GIL, so the event loop (and /health) keeps answering meanwhile."""
        chars = _prompt_chars(request)
        if chars > self.max_prompt_chars:  # cannot fit: refused before any work
            raise InvalidRequest(
                f"This model's maximum context length is {self.model_config.max_position} "
                f"tokens. However, your prompt ({chars} characters) is longer than that. "
                "Please reduce the length of the prompt.")
        if chars <= _INLINE_TOKENIZE_CHARS:
            return self.prompt_ids(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self.prompt_ids, request)

    def prompt_ids(self, request: generate_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        try:
            if kind == "text":
                ids = self.tokenizer.encode(request.text)
            elif kind == "chat":
                messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                if not messages:
                    raise InvalidRequest("chat has no messages")
                ids = self.tokenizer.encode_chat(messages)
            elif kind == "token_ids":
                ids = list(request.token_ids.ids)
            else:
                raise InvalidRequest("request has no input: set text, chat or token_ids")
        except ChatTemplateError as exc:
            raise InvalidRequest(str(exc)) from exc
        if not ids:
            raise InvalidRequest("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.model_config.max_position:
            raise InvalidRequest(
                f"This model's maximum context length is {self.model_config.max_position} "
                f"tokens. However, your prompt has {len(ids)} tokens, which leaves no room "
                "for the completion. Please reduce the length of the prompt.")
        return ids

    def sampling(self, msg: generate_pb2.SamplingParams, prompt_tokens: int):
        """Validated engine parameters (raises InvalidRequest naming the field)."""
        params = sampling_from_proto(msg)
        vocab = self.model_config.vocab_size
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest(f"stop_token_ids: token id {bad} is outside the vocabulary "
                                 f"[0, {vocab})")
        context = self.model_config.max_position
        if msg.HasField("max_tokens") and prompt_tokens + params.max_tokens > context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_tokens + params.max_tokens} tokens ({prompt_tokens} in the "
                f"prompt, {params.max_tokens} in the completion). Please reduce the length of "
                "the prompt or completion.")
        return params

    def check_model(self, model: str) -> None:
        if model and model not in (self.source.name, self.model_config.name):
            raise RouterError(grpc.StatusCode.NOT_FOUND,
                              f"model {model!r} is not served here (serving {self.source.name!r})")

    async def generate(self, request: generate_pb2.GenerateRequest
                       ) -> AsyncIterator[generate_pb2.GenerateChunk]:
        """Validate, route and stream one request; raises RouterError for the caller."""
        arrival = time.monotonic()
        size, limit = request.ByteSize(), self.settings.max_request_bytes
        if size > limit:  # the HTTP API's body limit, for gRPC callers too
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"request is {size} bytes; this server's limit is {limit} bytes")
        self.check_model(request.model)
        request_id = request.request_id or uuid.uuid4().hex  # "" names nothing
        if request_id in self._active:
            # refused before it owns anything: the call holding the id is not touched
            raise RouterError(grpc.StatusCode.ALREADY_EXISTS,
                              f"request id {request_id!r} is already in use by a request in flight")
        self._active.add(request_id)
        try:
            # closed here, not by the garbage collector: its decode stream ends with ours
            async with contextlib.aclosing(self._generate(request, request_id, arrival)) as gen:
                async for chunk in gen:
                    yield chunk
        finally:
            self._active.discard(request_id)

    async def _generate(self, request: generate_pb2.GenerateRequest, request_id: str,
                        arrival: float) -> AsyncIterator[generate_pb2.GenerateChunk]:
        try:
            ids = await self.tokenize(request)
            self.sampling(request.sampling, len(ids))
        except InvalidRequest as exc:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        session = request.session_id if request.HasField("session_id") else None
        failed: set[str] = set()
        last_error = ""
        for _ in range(self.settings.max_attempts):
            try:
                route, prefill, decode = self._choose(request, request_id, ids, session, failed)
            except RouterError as exc:
                if last_error:
                    exc.args = (f"{exc} (last failure: {last_error})",)
                raise
            decode_request = self._decode_request(request_id, ids, request.sampling, route, prefill)
            if prefill is not None and self.settings.early_prefill_start:
                self._start_prefill_early(prefill, decode_request)
            trace(log, request_id, "router: routed")
            sent = 0
            try:
                async for chunk in self._stream(decode, decode_request, prefill, arrival):
                    sent += 1
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _REFUSALS or _is_final(exc):
                    raise RouterError(exc.code(), exc.details()) from exc
                if sent or exc.code() not in _RETRYABLE:
                    raise RouterError(grpc.StatusCode.UNAVAILABLE,
                                      f"decode worker {decode.worker_id} failed after {sent} "
                                      f"chunks: {exc.code().name}: {exc.details()}") from exc
                log.warning("request %s: decode worker %s failed before the first token "
                            "(%s); retrying elsewhere", request_id, decode.worker_id, exc.code().name)
                if prefill is not None and self.settings.early_prefill_start:
                    await self._abort_prefill(prefill, request_id)  # the retry starts anew
                failed.add(decode.worker_id)
                last_error = f"{exc.code().name}: {exc.details()}"
        raise RouterError(grpc.StatusCode.UNAVAILABLE,
                          f"no decode worker could serve the request after "
                          f"{self.settings.max_attempts} attempts (last: {last_error})")

    def _start_prefill_early(self, prefill: WorkerView, req: worker_pb2.DecodeRequest) -> None:
        """Fire StartPrefill under a fresh key that the decode worker's Prefill call
        will bring; if it fails, that call starts the prefill itself."""
        key = uuid.uuid4().hex
        req.remote_prefill.early_start_key = key
        start = worker_pb2.PrefillRequest(request_id=req.request_id, token_ids=req.token_ids,
                                          sampling=req.sampling, early_start_key=key)
        stub = worker_pb2_grpc.PrefillServiceStub(self._channel(prefill.address))
        # answered when the job ends (its KV sent, or dropped unclaimed after the lease)
        self._spawn(self._call_quietly(stub.StartPrefill, start, "StartPrefill",
                                       timeout_s=START_PREFILL_TIMEOUT_S))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_prefill(self, prefill: WorkerView, request_id: str) -> None:
        stub = worker_pb2_grpc.PrefillServiceStub(self._channel(prefill.address))
        await self._call_quietly(stub.Abort, worker_pb2.AbortRequest(
            request_id=request_id, reason="the router retries the request"), "Abort")

    @staticmethod
    async def _call_quietly(method, message, name: str, timeout_s: float = 5.0) -> None:
        try:
            await method(message, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:  # an optimisation or clean-up: never fatal
            log.debug("request %s: %s failed: %s", message.request_id, name, exc.code().name)

    def _choose(self, request, request_id, ids, session, failed):
        policies = self.policies
        view = make_request_view(request_id, ids, block_size=policies.prefix_block_size,
                                 fingerprint=self.fingerprint, session_id=session)
        prefill_workers = self._views(Role.PREFILL, failed)
        route = self._route(request.mode, policies, view, bool(prefill_workers))
        try:
            decode = self._decide(Role.DECODE, policies.decode, view, failed)
            prefill = (self._decide(Role.PREFILL, policies.prefill, view, failed)
                       if route is Route.DISAGGREGATED else None)
        except NoWorkersError as exc:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        self.metrics.disaggregation.labels(route.value).inc()
        return route, prefill, decode

    @staticmethod
    def _route(mode: int, policies: PolicySet, view, prefill_available: bool) -> Route:
        return policies.route(view, prefill_available, _REQUEST_MODES.get(mode))

    def _decide(self, role: Role, policy, view, failed) -> WorkerView:
        recorder = self.recorders[role]
        workers = self._views(role, failed)
        if not workers:
            known = len(self.discovery.workers(role))
            raise NoWorkersError(f"no healthy {role.value} worker ({known} known, "
                                 f"{len(failed)} failed for this request)")
        decision = policy(view, workers, recorder.snapshot())
        recorder.record(view, decision)
        self.metrics.policy_decisions.labels(role.value, decision.policy, decision.reason).inc()
        self.metrics.requests.labels(role.value, decision.worker.worker_id).inc()
        return decision.worker

    def _views(self, role: Role, exclude: set[str]) -> list[WorkerView]:
        views = []
        for ep in self.health.healthy(role):
            if ep.worker_id in exclude:
                continue
            s = self.worker_stats.get(ep.worker_id)
            views.append(WorkerView(
                ep.worker_id, ep.address, role, True,
                waiting=s.num_requests_waiting if s else 0,
                running=s.num_requests_running if s else 0,
                kv_usage=s.kv_cache_usage_perc if s else 0.0))
        return views

    def _decode_request(self, request_id, ids, sampling, route, prefill) -> worker_pb2.DecodeRequest:
        req = worker_pb2.DecodeRequest(request_id=request_id, token_ids=ids, sampling=sampling,
                                       arrival_unix=time.time())
        if route is Route.DISAGGREGATED:
            req.remote_prefill.CopyFrom(worker_pb2.RemotePrefill(
                prefill_address=prefill.address, prefill_worker_id=prefill.worker_id))
        else:
            req.local_prefill.SetInParent()
        return req

    async def _stream(self, decode: WorkerView, req, prefill: WorkerView | None, arrival: float):
        stub = worker_pb2_grpc.DecodeServiceStub(self._channel(decode.address))
        call = stub.Generate(req)
        first_at = None
        try:
            async for chunk in call:
                now = time.monotonic()
                if first_at is None and chunk.token_ids:
                    first_at = now
                    trace(log, req.request_id, "router: first token from decode")
                if chunk.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
                    self._finalize(chunk, arrival, first_at or now, now, prefill, decode)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # the client left before its first token: an early-started prefill that the
            # decode worker never claimed would otherwise hold its blocks until its lease
            if prefill is not None and first_at is None and self.settings.early_prefill_start:
                self._spawn(self._abort_prefill(prefill, req.request_id))
            raise
        finally:
            call.cancel()
            self.recorders[Role.DECODE].finished(decode.worker_id)
            if prefill is not None:
                self.recorders[Role.PREFILL].finished(prefill.worker_id)

    def _finalize(self, chunk, arrival, first_at, now, prefill, decode) -> None:
        chunk.timing.ttft_seconds = first_at - arrival
        chunk.timing.e2e_seconds = now - arrival
        chunk.prefill_worker = prefill.worker_id if prefill else ""
        chunk.decode_worker = decode.worker_id
        self.latency.time_to_first_token_seconds.observe(first_at - arrival)
        self.latency.e2e_request_latency_seconds.observe(now - arrival)

    # ---- worker state ----------------------------------------------------------------
    def _health_channel(self, address: str, settings: HealthSettings) -> grpc.aio.Channel:
        if not self.settings.worker_tls.enabled:
            return insecure_channel(address, settings)
        cap_ms = int(max(settings.interval_seconds, 0.5) * 1000)  # as health.insecure_channel
        return internal_channel(address, self.settings.worker_tls,
                                options=[("grpc.max_reconnect_backoff_ms", cap_ms)])

    def _channel(self, address: str) -> grpc.aio.Channel:
        return self._channels.get(address)

    def _on_health(self, event) -> None:
        if event.healthy:
            stale = self._channels.discard_if_failed(event.endpoint.address)
            if stale is not None:
                self._spawn(stale.close())
        else:
            self.recorders[event.endpoint.role].forget(event.endpoint.worker_id)
            self.worker_stats.pop(event.endpoint.worker_id, None)
        for role in Role:
            healthy = len(self.health.healthy(role))
            self.metrics.workers.labels(role.value, "healthy").set(healthy)
            self.metrics.workers.labels(role.value, "unhealthy").set(
                len(self.discovery.workers(role)) - healthy)

    async def _poll_stats(self) -> None:
        while True:
            endpoints = [ep for role in Role for ep in self.health.healthy(role)]
            results = await asyncio.gather(*(self._stats(ep) for ep in endpoints))
            for ep, stats in zip(endpoints, results):
                if stats is not None:
                    self.worker_stats[ep.worker_id] = stats
            await asyncio.sleep(self.settings.stats_interval_s)

    async def _stats(self, ep):
        stub_cls = (worker_pb2_grpc.PrefillServiceStub if ep.role is Role.PREFILL
                    else worker_pb2_grpc.DecodeServiceStub)
        try:
            return await stub_cls(self._channel(ep.address)).Stats(worker_pb2.StatsRequest(),
                                                                   timeout=1.0)
        except grpc.aio.AioRpcError:
            return None


class RouterServicer(generate_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def _check_key(self, context) -> None:
        key = self.core.settings.api_key
        if not key:
            return
        metadata = dict(context.invocation_metadata() or ())
        supplied = metadata.get("authorization", "").removeprefix("Bearer ").strip() or \
            metadata.get("x-api-key", "")
        if not hmac.compare_digest(_utf8(supplied), key.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    async def _admit(self, request, context) -> None:
        """The API key, then a request that could be decoded at all."""
        await self._check_key(context)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())

    async def Generate(self, request, context):
        await self._admit(request, context)
        try:
            async for chunk in self.core.generate(request):
                yield chunk
        except RouterError as exc:
            await context.abort(exc.code, str(exc))

    async def GenerateUnary(self, request, context):
        await self._admit(request, context)
        parts: list[generate_pb2.GenerateChunk] = []
        try:
            async for chunk in self.core.generate(request):
                parts.append(chunk)
        except RouterError as exc:
            await context.abort(exc.code, str(exc))
        last = parts[-1]
        return generate_pb2.GenerateResponse(
            request_id=last.request_id, token_ids=[t for p in parts for t in p.token_ids],
            text="".join(p.text_delta for p in parts), finish_reason=last.finish_reason,
            stop_reason=last.stop_reason, usage=last.usage, timing=last.timing, error=last.error,
            prefill_worker=last.prefill_worker, decode_worker=last.decode_worker)

    async def ListModels(self, request, context):
        await self._admit(request, context)
        return generate_pb2.ListModelsResponse(models=[generate_pb2.ModelInfo(
            id=self.core.source.name, fingerprint=self.core.fingerprint,
            max_context=self.core.model_config.max_position, owned_by="pdserve")])


# ---- helpers -----------------------------------------------------------------------------
def _longest_token_chars(tokenizer) -> int:
    return max(map(len, tokenizer.tokenizer.get_vocab(with_added_tokens=True)), default=1)


def _prompt_chars(request: generate_pb2.GenerateRequest) -> int:
    kind = request.WhichOneof("input")
    if kind == "text":
        return len(request.text)
    if kind == "chat":
        return sum(len(m.content) + len(m.role) for m in request.chat.messages)
    return 0


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def add_router_servicer(servicer: RouterServicer, server) -> None:
    """generate_pb2_grpc.add_RouterServicer_to_server with lenient request decoding
    (the servicer refuses malformed bytes after checking the API key)."""
    add_lenient_servicer(servicer, server, generate_pb2.DESCRIPTOR.services_by_name["Router"],
                         refuse_malformed=False)
