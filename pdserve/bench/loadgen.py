"""`pdserve bench`: an async load generator for a pdserve router.

    pdserve bench --router 127.0.0.1:50051 --num-requests 200 --rate 4 \\
        --input-len 128 --input-len-spread 0.2 --output-len 64 \\
        --shared-prefix-len 256 --num-prefixes 8 --slo ttft=500,tpot=100 --json out.json
    pdserve bench --openai http://127.0.0.1:8000/v1 [--model NAME] [--endpoint chat] ...

`--router` drives pdserve's gRPC API; `--openai URL` drives any OpenAI-compatible server
(vLLM, SGLang, pdserve's HTTP front end) through streamed /v1/completions or
/v1/chat/completions with the same workload and metrics (pdserve/bench/openai_load.py).

Workload. Each prompt is a list of random token ids: one of K shared prefixes (chosen at
random per request, `--shared-prefix-len L --num-prefixes K`) followed by a unique part
of `--input-len` tokens (so a prompt has L + input-len tokens, as in vLLM's random
dataset). A length with a spread s > 0 is drawn uniformly from [len*(1-s), len*(1+s)];
s = 0 keeps it fixed. Requests set `ignore_eos` and `max_tokens` = the drawn output
length, so every request generates exactly that many tokens.

Arrivals. `--rate R` requests/s, `--arrival fixed` (every 1/R s) or `poisson`
(exponential gaps, mean 1/R); `--rate inf` sends them all at once. `--concurrency C`
caps requests in flight; a request waits for a slot, and its latencies start when it is
sent. The schedule and the prompts come from `--seed` (separate streams, so changing the
rate does not change the prompts).

Metrics (client side, from the moment a request is sent):
  TTFT  time to the first chunk that carries tokens;
  TPOT  (E2E - TTFT) / (output tokens - 1), per request (requests with 1 token: none);
  ITL   every gap between consecutive token-bearing chunks, over all requests;
  E2E   time to the last chunk.
Each as mean and p50/p90/p99 (linear interpolation). Throughput = completed requests
and output tokens over the run's duration (first send to last completion). Prefix-cache
hit rate = sum(usage.cached_tokens) / sum(usage.prompt_tokens) of completed requests.
Goodput (with `--slo ttft=MS,tpot=MS`) = completed requests meeting every given bound,
per second. SLO attainment is always reported at (TTFT, TPOT) = (200, 30), (500, 50) and
(1000, 100) ms: goodput and the share of all sent requests meeting both bounds. A request fails on any gRPC error or an error/abort finish reason; failures
are counted and reported, never fatal.

This module imports only the standard library at the top (grpc and the wire stubs are
imported when a run starts), so `pdserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

ARRIVALS = ("poisson", "fixed")
MODES = ("policy", "always", "never", "auto")


# ---- settings ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkloadSpec:
    """What the prompts look like."""

    num_requests: int = 100
    input_len: int = 128
    input_len_spread: float = 0.0
    output_len: int = 64
    output_len_spread: float = 0.0
    shared_prefix_len: int = 0
    num_prefixes: int = 1
    vocab_low: int = 100          # skip the low ids, where special tokens usually live
    vocab_high: int = 32000       # exclusive; below every supported model's vocab size
    seed: int = 0


@dataclass(frozen=True)
class ArrivalSpec:
    """When requests are sent."""

    rate: float = math.inf        # requests per second; inf = all at once
    arrival: str = "poisson"      # poisson | fixed
    concurrency: int = 0          # max requests in flight; 0 = unbounded
    seed: int = 0


@dataclass(frozen=True)
class SLO:
    """Latency bounds for goodput, in milliseconds; None = not bounded."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None


# (TTFT, TPOT) bounds every summary reports attainment at (issue 15)
DEFAULT_SLOS = (SLO(200.0, 30.0), SLO(500.0, 50.0), SLO(1000.0, 100.0))


@dataclass(frozen=True)
class BenchConfig:
    router: str
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    arrivals: ArrivalSpec = field(default_factory=ArrivalSpec)
    slo: SLO = field(default_factory=SLO)
    temperature: float = 0.0
    mode: str = "policy"          # per-request disaggregation override; policy = router's
    timeout_s: float = 600.0      # per request
    ready_timeout_s: float = 120.0  # wait for the router to serve a probe; 0 = don't
    api_key: str | None = None


@dataclass(frozen=True)
class Prompt:
    token_ids: tuple[int, ...]
    output_len: int
    prefix_index: int | None = None


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds."""

    index: int
    ok: bool = False
    error: str = ""
    scheduled_s: float = 0.0      # planned send time, from the run's start
    sent_s: float = 0.0           # actual send time (later if it waited for a slot)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requested_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    finish_reason: str = ""
    prefill_worker: str = ""
    decode_worker: str = ""
    server_ttft_s: float | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ---- workload synthesis --------------------------------------------------------------------
def sample_length(rng: random.Random, mean: int, spread: float) -> int:
    """`mean` when spread is 0, else uniform in [mean*(1-spread), mean*(1+spread)]; >= 1."""
    if spread <= 0:
        return max(1, mean)
    low = max(1, math.floor(mean * (1 - spread)))
    high = max(low, math.ceil(mean * (1 + spread)))
    return rng.randint(low, high)


def random_tokens(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    return [rng.randrange(low, high) for _ in range(n)]


def synthesize_prompts(spec: WorkloadSpec) -> list[Prompt]:
    """The run's prompts, deterministic in spec (seed included)."""
    if spec.vocab_high <= spec.vocab_low:
        raise ValueError("vocab_high must be above vocab_low")
    rng = random.Random(f"prompts-{spec.seed}")
    prefixes = [random_tokens(rng, spec.shared_prefix_len, spec.vocab_low, spec.vocab_high)
                for _ in range(max(1, spec.num_prefixes))] if spec.shared_prefix_len > 0 else []
    prompts = []
    for _ in range(spec.num_requests):
        which = rng.randrange(len(prefixes)) if prefixes else None
        head = prefixes[which] if prefixes else []
        body = random_tokens(rng, sample_length(rng, spec.input_len, spec.input_len_spread),
                             spec.vocab_low, spec.vocab_high)
        prompts.append(Prompt(tuple(head + body),
                              sample_length(rng, spec.output_len, spec.output_len_spread), which))
    return prompts


def arrival_times(n: int, rate: float, arrival: str = "poisson", seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start, non-decreasing, the first at 0."""
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {ARRIVALS}, not {arrival!r}")
    if rate <= 0:
        raise ValueError("rate must be positive (or inf)")
    if math.isinf(rate):
        return [0.0] * n
    if arrival == "fixed":
        return [i / rate for i in range(n)]
    rng = random.Random(f"arrivals-{seed}")
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


# ---- statistics ----------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """q in [0, 100], linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict | None:
    """mean/p50/p90/p99/min/max of values (seconds) in ms (scale); None if empty."""
    if not values:
        return None
    out = {"n": len(values), "mean": sum(values) / len(values)}
    for q in (50, 90, 99):
        out[f"p{q}"] = percentile(values, q)
    out["min"], out["max"] = min(values), max(values)
    return {k: (v if k == "n" else round(v * scale, 3)) for k, v in out.items()}


def meets_slo(r: RequestResult, slo: SLO) -> bool:
    if not r.ok:
        return False
    if slo.ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > slo.ttft_ms):
        return False
    tpot = r.tpot_s
    return slo.tpot_ms is None or tpot is None or tpot * 1000 <= slo.tpot_ms


def slo_attainment(results: Sequence[RequestResult], duration_s: float,
                   slos: Sequence[SLO] = DEFAULT_SLOS) -> list[dict]:
    """Per SLO: requests meeting it, goodput (per second) and attainment (share of all
    sent requests; a failed request misses every SLO)."""
    rows = []
    for slo in slos:
        good = sum(1 for r in results if meets_slo(r, slo))
        rows.append({"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "good_requests": good,
                     "goodput": round(good / duration_s, 4) if duration_s > 0 else 0.0,
                     "attainment": round(good / len(results), 4) if results else None})
    return rows


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO = SLO()) -> dict:
    """The run's metrics (latencies in ms, throughputs per second)."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out = {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": errors,
        "output_len_mismatches": sum(1 for r in ok if r.output_tokens != r.requested_tokens),
        "duration_s": round(duration_s, 4),
        "prompt_tokens": prompt, "cached_tokens": cached, "output_tokens": output,
        "request_throughput": round(per_s(len(ok)), 4),
        "output_throughput": round(per_s(output), 4),
        "total_token_throughput": round(per_s(prompt + output), 4),
        "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else None,
        "ttft_ms": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl_s]),
        "e2e_ms": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        "slo_attainment": slo_attainment(results, duration_s),
    }
    if not slo.empty:
        good = sum(1 for r in ok if meets_slo(r, slo))
        out["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
        out["good_requests"] = good
        out["goodput"] = round(per_s(good), 4)
    return out


# ---- sending -------------------------------------------------------------------------------
def build_request(prompt: Prompt, cfg: BenchConfig, index: int):
    from pdserve.wire import generate_pb2

    mode = {"policy": generate_pb2.DISAGGREGATION_MODE_UNSPECIFIED,
            "always": generate_pb2.DISAGGREGATION_ALWAYS,
            "never": generate_pb2.DISAGGREGATION_NEVER,
            "auto": generate_pb2.DISAGGREGATION_AUTO}[cfg.mode]
    sampling = generate_pb2.SamplingParams(
        max_tokens=prompt.output_len, temperature=cfg.temperature, ignore_eos=True,
        seed=cfg.workload.seed * 1_000_003 + index)
    req = generate_pb2.GenerateRequest(sampling=sampling, mode=mode)
    req.token_ids.ids.extend(prompt.token_ids)
    return req


def _metadata(cfg: BenchConfig):
    return [("authorization", f"Bearer {cfg.api_key}")] if cfg.api_key else None


async def send_one(stub, prompt: Prompt, cfg: BenchConfig, result: RequestResult,
                   t0: float) -> RequestResult:
    """Stream one request, filling result; never raises (except cancellation)."""
    import grpc

    from pdserve.wire import generate_pb2

    result.requested_tokens = prompt.output_len
    result.prompt_tokens = len(prompt.token_ids)
    sent = time.perf_counter()
    result.sent_s = sent - t0
    last_token_at = None
    try:
        call = stub.Generate(build_request(prompt, cfg, result.index), timeout=cfg.timeout_s,
                             metadata=_metadata(cfg))
        async for chunk in call:
            now = time.perf_counter()
            if chunk.token_ids:
                if last_token_at is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last_token_at)
                last_token_at = now
                result.output_tokens += len(chunk.token_ids)
            if chunk.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
                _finish(result, chunk, now - sent)
    except grpc.aio.AioRpcError as exc:
        result.ok, result.error = False, f"grpc:{exc.code().name}"
        result.e2e_s = time.perf_counter() - sent
    except Exception as exc:  # counted, not fatal
        result.ok, result.error = False, f"client:{type(exc).__name__}"
    if not result.ok and not result.error:
        result.error = "no final chunk"
    return result


def _finish(result: RequestResult, chunk, e2e_s: float) -> None:
    from pdserve.wire import generate_pb2

    reason = generate_pb2.FinishReason.Name(chunk.finish_reason)
    result.finish_reason = reason.removeprefix("FINISH_REASON_").lower()
    result.e2e_s = e2e_s
    result.cached_tokens = chunk.usage.cached_tokens
    result.prompt_tokens = chunk.usage.prompt_tokens or result.prompt_tokens
    result.prefill_worker, result.decode_worker = chunk.prefill_worker, chunk.decode_worker
    result.server_ttft_s = chunk.timing.ttft_seconds or None
    failed = chunk.finish_reason in (generate_pb2.FINISH_REASON_ERROR,
                                     generate_pb2.FINISH_REASON_ABORT)
    result.ok = not failed and result.ttft_s is not None
    if failed:
        result.error = f"finish:{result.finish_reason}"
    elif result.ttft_s is None:
        result.error = "no tokens"


async def run_load(cfg: BenchConfig, prompts: Sequence[Prompt],
                   schedule: Sequence[float]) -> tuple[list[RequestResult], float]:
    """Send every prompt at its scheduled offset; returns results and the run's duration."""
    import grpc

    from pdserve.wire import generate_pb2_grpc

    slots = asyncio.Semaphore(cfg.arrivals.concurrency) if cfg.arrivals.concurrency > 0 else None
    results = [RequestResult(i, scheduled_s=s) for i, s in enumerate(schedule)]
    async with grpc.aio.insecure_channel(cfg.router, options=_CHANNEL_OPTIONS) as channel:
        stub = generate_pb2_grpc.RouterStub(channel)
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            delay = schedule[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is None:
                await send_one(stub, prompts[i], cfg, results[i], t0)
                return
            async with slots:
                await send_one(stub, prompts[i], cfg, results[i], t0)

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        ends = [r.sent_s + (r.e2e_s or 0.0) for r in results]
    return results, max(ends, default=0.0)


_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


async def wait_ready(address: str, timeout_s: float, api_key: str | None = None) -> float:
    """Send a 1-token probe until it completes; returns seconds waited.

    A freshly started router may answer UNAVAILABLE until its health checks admit the
    workers; the probe's one-token prompt fills no KV block, so no prefix cache warms.
    """
    import grpc

    from pdserve.wire import generate_pb2, generate_pb2_grpc

    probe = generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    probe.token_ids.ids.append(1000)
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    start = time.monotonic()
    last = "no attempt"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.RouterStub(channel)
        while time.monotonic() - start < timeout_s:
            try:
                async for _ in stub.Generate(probe, timeout=max(1.0, timeout_s),
                                             metadata=metadata):
                    pass
                return time.monotonic() - start
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                last = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.25)
    raise TimeoutError(f"router {address} not ready after {timeout_s:.0f} s ({last})")


async def run_benchmark_async(cfg: BenchConfig) -> dict:
    prompts = synthesize_prompts(cfg.workload)
    schedule = arrival_times(len(prompts), cfg.arrivals.rate, cfg.arrivals.arrival,
                             cfg.arrivals.seed)
    waited = await wait_ready(cfg.router, cfg.ready_timeout_s, cfg.api_key) \
        if cfg.ready_timeout_s > 0 else 0.0
    load_before = _loadavg()
    results, duration = await run_load(cfg, prompts, schedule)
    return {
        "config": config_dict(cfg),
        "summary": summarize(results, duration, cfg.slo),
        "environment": {**environment(), "loadavg_before": load_before,
                        "loadavg_after": _loadavg(), "ready_wait_s": round(waited, 3)},
        "requests": [request_record(r, p) for r, p in zip(results, prompts)],
    }


def run_benchmark(cfg: BenchConfig) -> dict:
    """Synchronous entry point for scripts: run the load and return the JSON-able result."""
    return asyncio.run(run_benchmark_async(cfg))


# ---- reporting -----------------------------------------------------------------------------
def config_dict(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    d.pop("api_key", None)
    rate = d["arrivals"]["rate"]
    d["arrivals"]["rate"] = "inf" if math.isinf(rate) else rate
    return d


def request_record(r: RequestResult, p: Prompt) -> dict:
    rec = asdict(r)
    rec["tpot_s"] = r.tpot_s
    rec["prefix_index"] = p.prefix_index
    return rec


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the checkout (+dirty), or PDSERVE_COMMIT where set: a tree copied to a
    device machine has no .git, or stale metadata."""
    if os.environ.get("PDSERVE_COMMIT"):
        return os.environ["PDSERVE_COMMIT"]
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    return {
        "machine": platform.machine(), "processor": platform.processor() or None,
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "hostname": platform.node(),
        "git_commit": git_commit(), "command": " ".join(sys.argv),
        "time_unix": round(time.time(), 3),
    }


def format_report(summary: dict) -> str:
    s = summary
    lines = [
        f"requests     {s['completed']}/{s['num_requests']} completed, {s['failed']} failed"
        + (f" {s['errors']}" if s["errors"] else ""),
        f"duration     {s['duration_s']:.2f} s",
        f"throughput   {s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} output tok/s",
        f"tokens       {s['prompt_tokens']} prompt ({s['cached_tokens']} cached), "
        f"{s['output_tokens']} output ({s['output_len_mismatches']} length mismatches)",
    ]
    if s["prefix_cache_hit_rate"] is not None:
        lines.append(f"prefix cache {s['prefix_cache_hit_rate'] * 100:.1f}% of prompt tokens cached")
    if "goodput" in s:
        lines.append(f"goodput      {s['goodput']:.3f} req/s ({s['good_requests']} requests "
                     f"within ttft<={s['slo']['ttft_ms']} ms, tpot<={s['slo']['tpot_ms']} ms)")
    for row in s.get("slo_attainment", ()):
        share = row["attainment"] * 100 if row["attainment"] is not None else 0.0
        lines.append(f"slo {row['ttft_ms']:g}/{row['tpot_ms']:g} ms  goodput "
                     f"{row['goodput']:.3f} req/s, attainment {share:.1f}%")
    lines.append(f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = s[f"{name}_ms"]
        if d:
            lines.append(f"{name.upper():<6}" + "".join(f"{d[k]:>10.1f}" for k in
                                                       ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# ---- command line --------------------------------------------------------------------------
def parse_rate(text: str) -> float:
    rate = float(text)  # accepts "inf"
    if not rate > 0:
        raise argparse.ArgumentTypeError("rate must be > 0 (or inf)")
    return rate


def parse_slo(text: str) -> SLO:
    """'ttft=500,tpot=50' (ms) -> SLO; either key may be left out."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot"):
            raise argparse.ArgumentTypeError(f"bad SLO term {part!r}: use ttft=MS,tpot=MS")
        try:
            values[f"{key}_ms"] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad SLO value {value!r} in {part!r}") from None
    return SLO(**values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--router", metavar="ADDR", help="host:port of a pdserve router (gRPC)")
    target.add_argument("--openai", metavar="URL",
                        help="base URL of any OpenAI-compatible server, e.g. "
                             "http://127.0.0.1:8000/v1 (streamed completions)")
    p.add_argument("--model", default=None,
                   help="--openai: model name to request (default: the server's first model)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="--openai: /v1/completions with token-id prompts (default) or "
                        "/v1/chat/completions with a text prompt of about --input-len words")
    p.add_argument("--http-client", choices=("auto", "aiohttp", "httpx"), default="auto",
                   help="--openai: HTTP library (auto: aiohttp if installed, else httpx)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--rate", type=parse_rate, default=math.inf,
                   help="requests per second; 'inf' = all at once (default)")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    p.add_argument("--concurrency", type=int, default=0, help="max in flight; 0 = no cap")
    p.add_argument("--input-len", type=int, default=128, help="unique tokens per prompt")
    p.add_argument("--input-len-spread", type=float, default=0.0,
                   help="0 = fixed; s > 0 = uniform in [len*(1-s), len*(1+s)]")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output-len-spread", type=float, default=0.0)
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens of a shared prefix put before each prompt")
    p.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes")
    p.add_argument("--vocab-range", default="100:32000", metavar="LOW:HIGH",
                   help="token ids are drawn from [LOW, HIGH)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--mode", choices=MODES, default="policy",
                   help="per-request disaggregation override (default: router policy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", type=parse_slo, default=SLO(), metavar="ttft=MS,tpot=MS")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, s")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="wait this long for the router to serve a probe; 0 = no probe")
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"))
    p.add_argument("--json", metavar="PATH", help="write config, summary and every request here")


def workload_from_args(args: argparse.Namespace) -> WorkloadSpec:
    low, sep, high = args.vocab_range.partition(":")
    try:
        vocab_low, vocab_high = int(low), int(high)
    except ValueError:
        raise ValueError(f"--vocab-range {args.vocab_range!r}: use LOW:HIGH") from None
    for name in ("num_requests", "input_len", "output_len"):
        if getattr(args, name) < (0 if name == "num_requests" else 1):
            raise ValueError(f"--{name.replace('_', '-')} is too small")
    if args.shared_prefix_len < 0 or args.num_prefixes < 1:
        raise ValueError("--shared-prefix-len must be >= 0 and --num-prefixes >= 1")
    return WorkloadSpec(
        num_requests=args.num_requests, input_len=args.input_len,
        input_len_spread=args.input_len_spread, output_len=args.output_len,
        output_len_spread=args.output_len_spread, shared_prefix_len=args.shared_prefix_len,
        num_prefixes=args.num_prefixes, vocab_low=vocab_low, vocab_high=vocab_high,
        seed=args.seed)


def arrivals_from_args(args: argparse.Namespace) -> ArrivalSpec:
    if args.concurrency < 0:
        raise ValueError("--concurrency must be >= 0")
    return ArrivalSpec(rate=args.rate, arrival=args.arrival, concurrency=args.concurrency,
                       seed=args.seed)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(router=args.router, workload=workload_from_args(args),
                       arrivals=arrivals_from_args(args), slo=args.slo,
                       temperature=args.temperature, mode=args.mode, timeout_s=args.timeout,
                       ready_timeout_s=args.ready_timeout, api_key=args.api_key)


def run_cli(args: argparse.Namespace) -> int:
    if getattr(args, "openai", None):
        from pdserve.bench.openai_load import run_cli as run_openai_cli

        return run_openai_cli(args)
    return report_run(lambda: run_benchmark(config_from_args(args)), args.json)


def report_run(run, json_path: str | None, errors=(TimeoutError,)) -> int:
    """Run a benchmark, print its report, write its JSON; the CLI's exit status (1 when
    the run could not start or nothing completed)."""
    try:
        result = run()
    except errors as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 1
    print(format_report(result["summary"]))
    if json_path:
        write_json(json_path, result)
        print(f"wrote {json_path}", file=sys.stderr)
    return 0 if result["summary"]["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
