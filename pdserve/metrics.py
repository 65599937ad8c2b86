"""Prometheus metric definitions shared by the services.

Names follow vLLM's where one exists, with the `pdserve:` prefix (Counters gain `_total`
when exposed). No global registry: each service calls `new_registry()` and the
`*_metrics(registry, ...)` functions it needs, and serves that registry on `/metrics`.
The Grafana dashboard (deploy/grafana/pdserve-dashboard.json) queries these names;
tests/unit/test_router_config.py checks the two agree.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest

PREFIX = "pdserve:"

# Buckets as vLLM uses them: TTFT spans ms (short prompt, idle) to minutes (queued long prompt).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> bytes:
    """Text exposition format, for a /metrics handler."""
    return generate_latest(registry)


@dataclass(frozen=True)
class EngineMetrics:
    """A prefill or decode worker's scheduler and cache (children bound to model/role)."""

    num_requests_running: Gauge
    num_requests_waiting: Gauge
    kv_cache_usage_perc: Gauge
    prefix_cache_queries: Counter  # blocks looked up
    prefix_cache_hits: Counter  # blocks found
    prompt_tokens: Counter
    generation_tokens: Counter


@dataclass(frozen=True)
class LatencyMetrics:
    """Client-visible latencies (decode workers and the router record these)."""

    time_to_first_token_seconds: Histogram
    inter_token_latency_seconds: Histogram
    e2e_request_latency_seconds: Histogram


@dataclass(frozen=True)
class KVTransferMetrics:
    """KV connector traffic of one worker; `direction` is send (prefill) or recv (decode)."""

    connector: str
    role: str
    bytes: Counter  # labels: connector, role, direction
    seconds: Histogram  # labels: connector, role, direction
    failures: Counter  # labels: connector, role, reason

    def transferred(self, direction: str, nbytes: int, seconds: float) -> None:
        self.bytes.labels(self.connector, self.role, direction).inc(nbytes)
        self.seconds.labels(self.connector, self.role, direction).observe(seconds)

    def failed(self, reason: str) -> None:
        self.failures.labels(self.connector, self.role, reason).inc()


@dataclass(frozen=True)
class RouterMetrics:
    requests: Counter  # .labels(role=..., worker=...)
    policy_decisions: Counter  # .labels(role=..., policy=..., reason=...)
    workers: Gauge  # .labels(role=..., state=healthy|unhealthy)
    disaggregation: Counter  # .labels(route=disaggregated|decode_only|decode_only_fallback)
    config_reloads: Counter  # .labels(result=ok|rejected)


def engine_metrics(registry: CollectorRegistry, model_name: str, role: str) -> EngineMetrics:
    labels = ("model_name", "role")

    def g(name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=registry).labels(model_name, role)

    def c(name: str, doc: str) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=registry).labels(model_name, role)

    return EngineMetrics(
        g("num_requests_running", "Requests in the running batch."),
        g("num_requests_waiting", "Requests waiting to be scheduled."),
        g("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)."),
        c("prefix_cache_queries", "Prefix cache blocks queried."),
        c("prefix_cache_hits", "Prefix cache blocks found."),
        c("prompt_tokens", "Prompt tokens processed."),
        c("generation_tokens", "Tokens generated."),
    )


def latency_metrics(registry: CollectorRegistry, model_name: str, role: str) -> LatencyMetrics:
    labels = ("model_name", "role")

    def h(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(PREFIX + name, doc, labels, registry=registry,
                         buckets=buckets).labels(model_name, role)

    return LatencyMetrics(
        h("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS),
        h("inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS),
        h("e2e_request_latency_seconds", "Request latency, arrival to finish.", E2E_BUCKETS),
    )


# The KV transport each peer of this process is reached over (peer address -> transport:
# cuda_ipc | ucx-rc | ucx-tcp | ...), set by the connector at handshake. Process-wide: the
# connector has no registry, and one process has one sender.
_KV_TRANSPORTS: dict[str, str] = {}
_KV_TRANSPORTS_LOCK = threading.Lock()


def note_kv_transport(peer: str, transport: str) -> bool:
    """Record peer's transport; True when it is new or changed (log it then)."""
    with _KV_TRANSPORTS_LOCK:
        changed = _KV_TRANSPORTS.get(peer) != transport
        _KV_TRANSPORTS[peer] = transport
    return changed


def kv_transports() -> dict[str, str]:
    with _KV_TRANSPORTS_LOCK:
        return dict(_KV_TRANSPORTS)


class _TransportInfo:
    """kv_transfer_transport_info{peer, transport} = 1, read at scrape time."""

    def __init__(self, connector: str, role: str) -> None:
        self.connector, self.role = connector, role

    def collect(self):
        family = GaugeMetricFamily(
            PREFIX + "kv_transfer_transport_info",
            "KV transport used to each peer (1 per peer): cuda_ipc, ucx-rc, ucx-tcp, ...",
            labels=("connector", "role", "peer", "transport"))
        for peer, transport in sorted(kv_transports().items()):
            family.add_metric((self.connector, self.role, peer, transport), 1)
        yield family


def kv_transfer_metrics(registry: CollectorRegistry, connector: str, role: str) -> KVTransferMetrics:
    registry.register(_TransportInfo(connector, role))
    return KVTransferMetrics(
        connector, role,
        Counter(PREFIX + "kv_transfer_bytes", "KV cache bytes moved between workers.",
                ("connector", "role", "direction"), registry=registry),
        Histogram(PREFIX + "kv_transfer_seconds", "Duration of one request's KV transfer.",
                  ("connector", "role", "direction"), registry=registry, buckets=TRANSFER_BUCKETS),
        Counter(PREFIX + "kv_transfer_failures", "Failed or timed-out KV transfers.",
                ("connector", "role", "reason"), registry=registry),
    )


def router_metrics(registry: CollectorRegistry) -> RouterMetrics:
    return RouterMetrics(
        Counter(PREFIX + "router_requests", "Requests sent to each worker.",
                ("role", "worker"), registry=registry),
        Counter(PREFIX + "router_policy_decisions", "Routing decisions by policy and reason.",
                ("role", "policy", "reason"), registry=registry),
        Gauge(PREFIX + "router_workers", "Workers known to the router by health state.",
              ("role", "state"), registry=registry),
        Counter(PREFIX + "router_disaggregation", "Requests by route (mode auto/always/never).",
                ("route",), registry=registry),
        Counter(PREFIX + "router_config_reloads", "Policy file reloads by result.",
                ("result",), registry=registry),
    )


# Every metric family name defined above, as exposed (Counters with _total): the contract
# with the Grafana dashboard.
EXPOSED_NAMES = frozenset(
    [PREFIX + n for n in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                          "router_workers", "kv_transfer_transport_info")]
    + [PREFIX + n + "_total" for n in (
        "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens",
        "kv_transfer_bytes", "kv_transfer_failures", "router_requests",
        "router_policy_decisions", "router_disaggregation", "router_config_reloads")]
    + [PREFIX + n + s for n in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                                "e2e_request_latency_seconds", "kv_transfer_seconds")
       for s in ("_bucket", "_sum", "_count")]
)
