"""`pdserve bench --openai URL`: the load generator against any OpenAI-compatible server.

    pdserve bench --openai http://127.0.0.1:8000/v1 --input-len 1024 --output-len 128 \\
        --rate 16 --num-requests 200 [--model NAME] [--endpoint chat] [--api-key KEY]

One client path for every server (vLLM, SGLang, pdserve's HTTP front end): aiohttp (httpx
where aiohttp is missing) streams `POST /v1/completions` (or `/v1/chat/completions`) with
`stream: true`, `stream_options.include_usage` and vLLM's `ignore_eos` extension, and this
module parses the server-sent events itself. Completions send the prompt as a list of
token ids, so every server sees exactly the workload's tokens; chat sends a text of one
word per token id (about --input-len tokens; the server's usage gives the real count).

Per request, from the moment it is sent:
  TTFT  time to the first event whose choice carries text (a chat role chunk or an
        empty finish chunk is not a token);
  ITL   gaps between consecutive text-bearing events;
  E2E   time to the end of the stream (`data: [DONE]`);
  TPOT  (E2E - TTFT) / (output tokens - 1), output tokens from the usage event (the
        count of text-bearing events when a server sends no usage).
Workload, arrivals and the summary (throughput, percentiles, goodput, SLO attainment)
are the gRPC load generator's (pdserve/bench/loadgen.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence
from urllib.parse import urlsplit

from pdserve.bench.loadgen import (
    SLO, ArrivalSpec, Prompt, RequestResult, WorkloadSpec, _loadavg, arrival_times,
    arrivals_from_args, environment, report_run, request_record, summarize,
    synthesize_prompts, workload_from_args)

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}

# chat prompts: one common word per token id (a word is about one token in most vocabularies)
WORDS = tuple("""time year people way day man thing woman life child world school state
family student group country problem hand part place case week company system program
question work government number night point home water room mother area money story fact
month lot right study book eye job word business issue side kind head house service friend
father power hour game line end member law car city community name president team minute
idea kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force
education""".split())


@dataclass(frozen=True)
class OpenAIBenchConfig:
    base_url: str                 # http(s)://host:port/v1
    model: str | None = None      # None: the first model the server lists
    endpoint: str = "completions"  # completions | chat
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    arrivals: ArrivalSpec = field(default_factory=ArrivalSpec)
    slo: SLO = field(default_factory=SLO)
    temperature: float = 0.0
    timeout_s: float = 600.0      # per request
    ready_timeout_s: float = 120.0  # wait for the server to list a model and answer a probe
    deadline_s: float = 0.0       # cut the whole run after this long; 0 = no cut
    api_key: str | None = None
    http_client: str = "auto"     # auto (aiohttp if importable, else httpx) | aiohttp | httpx


# ---- requests ------------------------------------------------------------------------------
def normalize_base_url(url: str) -> str:
    """'http://h:p' or 'http://h:p/v1/' -> 'http://h:p/v1'; anything else is refused."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--openai {url!r}: expected a base URL like http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/") or "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


def chat_text(token_ids: Sequence[int]) -> str:
    return " ".join(WORDS[t % len(WORDS)] for t in token_ids)


def request_body(prompt: Prompt, cfg: OpenAIBenchConfig, model: str, index: int) -> dict:
    body = {"model": model, "max_tokens": prompt.output_len, "temperature": cfg.temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.temperature > 0:
        body["seed"] = cfg.workload.seed * 1_000_003 + index
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": chat_text(prompt.token_ids)}]
    else:
        body["prompt"] = list(prompt.token_ids)
    return body


def _headers(cfg: OpenAIBenchConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


# ---- one stream ----------------------------------------------------------------------------
class StreamParser:
    """Folds one response's SSE `data:` payloads into a RequestResult."""

    def __init__(self, result: RequestResult, sent: float) -> None:
        self.result, self.sent = result, sent
        self.last_token_at: float | None = None
        self.deltas = 0
        self.usage: dict | None = None
        self.done_at: float | None = None  # when [DONE] came

    def feed(self, payload: str, now: float) -> bool:
        """One event's data; True once the stream is over ([DONE] or an error)."""
        if payload == "[DONE]":
            self.done_at = now
            return True
        obj = json.loads(payload)
        error = obj.get("error") or (obj if obj.get("object") == "error" else None)
        if error:
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            self.result.error = f"stream: {str(message)[:100]}"
            return True
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            self._choice(choice, now)
        return False

    def _choice(self, choice: dict, now: float) -> None:
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            if self.last_token_at is None:
                self.result.ttft_s = now - self.sent
            else:
                self.result.itl_s.append(now - self.last_token_at)
            self.last_token_at = now
            self.deltas += 1
        if choice.get("finish_reason"):
            self.result.finish_reason = choice["finish_reason"]

    def finish(self, now: float) -> RequestResult:
        """The request's outcome; E2E ends at [DONE] (else now: the stream's close)."""
        r = self.result
        r.e2e_s = (self.done_at if self.done_at is not None else now) - self.sent
        if self.usage:
            r.output_tokens = int(self.usage.get("completion_tokens") or 0)
            r.prompt_tokens = int(self.usage.get("prompt_tokens") or r.prompt_tokens)
            details = self.usage.get("prompt_tokens_details") or {}
            r.cached_tokens = int(details.get("cached_tokens") or 0)
        else:
            r.output_tokens = self.deltas
        if not r.error:
            if self.done_at is None and not r.finish_reason:
                r.error = "stream ended early"
            elif r.ttft_s is None:
                r.error = "no tokens"
        r.ok = not r.error
        return r


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error") or {}
        return str(err.get("message", err) if isinstance(err, dict) else err)[:100]
    except (ValueError, AttributeError):
        return raw[:100].decode(errors="replace")


# ---- transports ----------------------------------------------------------------------------
class AiohttpTransport:
    """aiohttp (vLLM's own benchmark client): per request it costs a fraction of httpx's
    CPU, and a burst of hundreds of streams opens its connections at once."""

    name = "aiohttp"

    def __init__(self) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        # limit=0: no cap on open connections (the run's --concurrency is the only cap)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             trust_env=False)
        self.errors = (aiohttp.ClientError,)

    async def get(self, url: str, headers: dict, timeout_s: float) -> tuple[int, bytes]:
        timeout = self._aiohttp.ClientTimeout(total=timeout_s)
        async with self.session.get(url, headers=headers, timeout=timeout) as resp:
            return resp.status, await resp.read()

    async def post_stream(self, url: str, body: dict, headers: dict, timeout_s: float,
                          on_line) -> tuple[int, bytes]:
        """POST; (status, body) unless 200, else each line to on_line(text) until it
        returns True: (200, b'')."""
        timeout = self._aiohttp.ClientTimeout(total=timeout_s, sock_connect=30.0)
        async with self.session.post(url, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                return resp.status, await resp.read()
            async for raw in resp.content:
                if on_line(raw.decode().rstrip("\r\n")):
                    break
            return 200, b""

    async def close(self) -> None:
        await self.session.close()


class HttpxTransport:
    """httpx, where aiohttp is not installed. Keep-alive is off: with an idle pooled
    connection, httpx (0.29) opened a burst's new connections one at a time (~30 ms
    apart on a loaded 2-core host), which showed up as TTFT."""

    name = "httpx"

    def __init__(self) -> None:
        import httpx

        self._httpx = httpx
        self.client = httpx.AsyncClient(trust_env=False, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=0))
        self.errors = (httpx.HTTPError,)

    async def get(self, url: str, headers: dict, timeout_s: float) -> tuple[int, bytes]:
        resp = await self.client.get(url, headers=headers, timeout=timeout_s)
        return resp.status_code, resp.content

    async def post_stream(self, url: str, body: dict, headers: dict, timeout_s: float,
                          on_line) -> tuple[int, bytes]:
        timeout = self._httpx.Timeout(timeout_s, connect=30.0)
        async with self.client.stream("POST", url, json=body, headers=headers,
                                      timeout=timeout) as resp:
            if resp.status_code != 200:
                return resp.status_code, await resp.aread()
            async for line in resp.aiter_lines():
                if on_line(line):
                    break
            return 200, b""

    async def close(self) -> None:
        await self.client.aclose()


def make_transport(name: str = "auto"):
    """aiohttp when importable (or asked for), else httpx."""
    if name in ("auto", "aiohttp"):
        try:
            return AiohttpTransport()
        except ImportError:
            if name == "aiohttp":
                raise
    return HttpxTransport()


async def send_one(transport, url: str, body: dict, headers: dict, result: RequestResult,
                   t0: float, timeout_s: float) -> RequestResult:
    """Stream one request into result; never raises (except cancellation)."""
    result.requested_tokens = body["max_tokens"]
    sent = time.perf_counter()
    result.sent_s = sent - t0
    parser = StreamParser(result, sent)

    def on_line(line: str) -> bool:
        return line.startswith("data:") and parser.feed(line[5:].strip(), time.perf_counter())

    try:
        status, raw = await transport.post_stream(url, body, headers, timeout_s, on_line)
        if status != 200:
            result.error = f"http:{status} {_error_message(raw)}"
    except asyncio.TimeoutError:  # aiohttp's timeouts (and httpx's, below)
        result.error = "client:timeout"
    except transport.errors + (ValueError,) as exc:  # transport failure or a bad event
        name = type(exc).__name__
        result.error = "client:timeout" if "Timeout" in name else f"client:{name}"
    return parser.finish(time.perf_counter())


async def run_load(transport, cfg: OpenAIBenchConfig, model: str, prompts: Sequence[Prompt],
                   schedule: Sequence[float]) -> tuple[list[RequestResult], float]:
    """Send every prompt at its offset; returns results and the run's duration (first
    send to last stream end). With cfg.deadline_s, requests still open then are cut."""
    url = cfg.base_url + ENDPOINTS[cfg.endpoint]
    headers = _headers(cfg)
    slots = asyncio.Semaphore(cfg.arrivals.concurrency) if cfg.arrivals.concurrency > 0 else None
    results = [RequestResult(i, scheduled_s=s, prompt_tokens=len(p.token_ids),
                             requested_tokens=p.output_len)
               for i, (s, p) in enumerate(zip(schedule, prompts))]
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        delay = schedule[i] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        body = request_body(prompts[i], cfg, model, i)
        if slots is None:
            await send_one(transport, url, body, headers, results[i], t0, cfg.timeout_s)
            return
        async with slots:
            await send_one(transport, url, body, headers, results[i], t0, cfg.timeout_s)

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    _, pending = await asyncio.wait(tasks, timeout=cfg.deadline_s or None) if tasks else ((), ())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for r in results:
        if not r.ok and not r.error:
            r.error = "cut: run deadline"
    ends = [r.sent_s + r.e2e_s for r in results if r.e2e_s is not None]
    duration = cfg.deadline_s if pending else max(ends, default=0.0)
    return results, duration


async def discover_model(transport, cfg: OpenAIBenchConfig) -> str:
    status, raw = await transport.get(cfg.base_url + "/models", _headers(cfg), 10.0)
    if status != 200:
        raise ConnectionError(f"http:{status} {_error_message(raw)} (GET /models)")
    models = json.loads(raw).get("data") or []
    if not models:
        raise ConnectionError("GET /models lists no model")
    return models[0]["id"]


def _fatal(error: str) -> bool:
    """A probe answer that waiting will not change: a 4xx other than 404/408/429 (a bad
    key, a model name the server does not serve, a request it refuses)."""
    return error.startswith("http:4") and not error.startswith(("http:404", "http:408",
                                                                  "http:429"))


async def wait_ready(transport, cfg: OpenAIBenchConfig) -> tuple[str, float]:
    """Until the server lists a model and completes a one-token probe: (model, seconds).
    The probe's one-token prompt fills no KV block, so no prefix cache warms."""
    start = time.monotonic()
    last = "no attempt"
    while time.monotonic() - start < cfg.ready_timeout_s:
        try:
            model = cfg.model or await discover_model(transport, cfg)
            probe = await send_one(transport, cfg.base_url + ENDPOINTS[cfg.endpoint],
                                   request_body(Prompt((1000,), 1), cfg, model, 0),
                                   _headers(cfg), RequestResult(-1), time.perf_counter(),
                                   max(1.0, cfg.ready_timeout_s))
            if probe.ok:
                return model, time.monotonic() - start
            last = probe.error
        except ConnectionError as exc:
            last = str(exc)
        except transport.errors + (ValueError, asyncio.TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if _fatal(last):
            raise ConnectionError(f"{cfg.base_url} refused the probe request: {last}")
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{cfg.base_url} not ready after {cfg.ready_timeout_s:.0f} s ({last})")


async def run_benchmark_async(cfg: OpenAIBenchConfig, keep_requests: bool = True) -> dict:
    prompts = synthesize_prompts(cfg.workload)
    schedule = arrival_times(len(prompts), cfg.arrivals.rate, cfg.arrivals.arrival,
                             cfg.arrivals.seed)
    transport = make_transport(cfg.http_client)
    try:
        if cfg.ready_timeout_s > 0:
            model, waited = await wait_ready(transport, cfg)
        else:
            model, waited = cfg.model or await discover_model(transport, cfg), 0.0
        load_before, cpu0 = _loadavg(), time.process_time()
        results, duration = await run_load(transport, cfg, model, prompts, schedule)
        cpu = time.process_time() - cpu0
    finally:
        await transport.close()
    out = {
        "config": {**config_dict(cfg), "model": model},
        "summary": summarize(results, duration, cfg.slo),
        "environment": {**environment(), "loadavg_before": load_before,
                        "loadavg_after": _loadavg(), "ready_wait_s": round(waited, 3),
                        "http_client": transport.name,
                        # the client's own CPU share: near 1.0 means it, not the server,
                        # may be what limits the measured rates
                        "client_cpu_s": round(cpu, 3),
                        "client_cpu_frac": round(cpu / duration, 3) if duration > 0 else None},
    }
    if keep_requests:
        out["requests"] = [request_record(r, p) for r, p in zip(results, prompts)]
    return out


def run_benchmark(cfg: OpenAIBenchConfig, keep_requests: bool = True) -> dict:
    return asyncio.run(run_benchmark_async(cfg, keep_requests))


def config_dict(cfg: OpenAIBenchConfig) -> dict:
    d = asdict(cfg)
    d.pop("api_key", None)
    rate = d["arrivals"]["rate"]
    d["arrivals"]["rate"] = "inf" if math.isinf(rate) else rate
    return d


# ---- command line (arguments are loadgen.add_arguments') -----------------------------------
def config_from_args(args: argparse.Namespace) -> OpenAIBenchConfig:
    if args.mode != "policy":
        raise ValueError("--mode is a pdserve gRPC extension; it applies to --router only")
    return OpenAIBenchConfig(
        base_url=normalize_base_url(args.openai), model=args.model, endpoint=args.endpoint,
        workload=workload_from_args(args), arrivals=arrivals_from_args(args), slo=args.slo,
        temperature=args.temperature, timeout_s=args.timeout,
        ready_timeout_s=args.ready_timeout, api_key=args.api_key, http_client=args.http_client)


def run_cli(args: argparse.Namespace) -> int:
    return report_run(lambda: run_benchmark(config_from_args(args)), args.json,
                      errors=(TimeoutError, ConnectionError))
