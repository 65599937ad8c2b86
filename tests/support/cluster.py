"""Helpers for tests that drive a real system (router + workers as processes)."""

from __future__ import annotations

import contextlib
import socket
import time

import grpc
import httpx

from pdserve.client import make_request, stream
from pdserve.engine.sampling import SamplingParams
from pdserve.services.auth import sync_channel
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import worker_pb2, worker_pb2_grpc

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def run_request(address: str, token_ids: list[int], params: SamplingParams = GREEDY,
                **kw) -> tuple[list[int], object]:
    """Token ids streamed for one request and its last chunk."""
    tokens, last = [], None
    for chunk in stream(address, make_request(token_ids=token_ids, params=params, **kw), timeout=120):
        tokens += chunk.token_ids
        last = chunk
    return tokens, last


def worker_channel(address: str, token: str | None) -> grpc.Channel:
    """A blocking channel to a worker carrying the cluster's internal token (workers
    refuse internal calls without it): `with worker_channel(addr, cluster.internal_token)`."""
    return sync_channel(grpc.insecure_channel(address), token)


def worker_stats(address: str, role: str, token: str | None = None) -> worker_pb2.WorkerStats:
    stub_cls = worker_pb2_grpc.PrefillServiceStub if role == "prefill" else worker_pb2_grpc.DecodeServiceStub
    with worker_channel(address, token) as channel:
        return stub_cls(channel).Stats(worker_pb2.StatsRequest(), timeout=10)


def wait_pools_free(cluster, timeout_s: float = 20.0) -> dict[str, worker_pb2.WorkerStats]:
    """Every live worker's KV pool fully free (transfers and aborts settle asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = {p.name: worker_stats(p.address, p.name.split("-")[0], cluster.internal_token)
                 for p in cluster.procs if p.name != "router" and p.popen.poll() is None}
        busy = {n: (s.num_free_blocks, s.num_total_blocks) for n, s in stats.items()
                if s.num_free_blocks != s.num_total_blocks or s.num_requests_running
                or s.num_requests_waiting}
        if not busy:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still held: {busy}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_cluster(log_dir: str, health_timeout_s: float = 60.0):
    """`pdserve up`'s processes with the OpenAI front end, once /health answers 200:
    yields (cluster, router gRPC address, HTTP base URL)."""
    port = free_port()
    with Cluster(ClusterSpec(connector="ucx", http_port=port, log_dir=log_dir)) as cluster:
        router = cluster.start()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + health_timeout_s
        while httpx.get(f"{base}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the router never reported healthy"
            time.sleep(0.1)
        yield cluster, router, base
