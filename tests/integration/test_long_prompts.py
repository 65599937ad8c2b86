"""Long prompts on the CPU (issue 17, item 8), scaled down: a prompt whose prefill
takes longer than the KV lease still arrives by transfer (each chunk renews the lease;
the decode worker's Prefill call is not bounded by it), and a short request sent while
a long prompt computes is served before it ends instead of waiting for the whole
prompt (its chunks share the steps)."""

from __future__ import annotations

import random
import threading
import time
import urllib.request

import pytest

from pdserve.engine.sampling import SamplingParams
from pdserve.kvtransfer.base import ConnectorMetrics, KVDestination, TransferState
from pdserve.kvtransfer.transfers import TransferTable
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import generate_pb2
from tests.integration.test_restart_recovery import free_ports
from tests.support.cluster import run_request, worker_stats

LEASE_S = 2.0
ALWAYS = generate_pb2.DISAGGREGATION_ALWAYS


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def test_progress_renews_the_lease():
    table = TransferTable(ConnectorMetrics("ucx"), default_lease_s=0.2)
    dst = KVDestination(connector="ucx", address="a", transfer_id="t", block_ids=(1, 2, 3))
    table.add(dst, (), lease_s=None, on_release=None)
    for _ in range(4):  # 0.4 s in all: twice the lease, progress every 0.1 s
        time.sleep(0.1)
        table.mark_queued("t", last=False)
        table.record_chunk("t", blocks=[1], nbytes=1, seconds=0.0, sent=True)
    assert table.statuses()["t"].state is TransferState.IN_FLIGHT
    time.sleep(0.3)  # no progress for longer than the lease
    assert table.statuses()["t"].state is TransferState.EXPIRED


@pytest.mark.slow
def test_prefill_longer_than_the_lease_and_a_short_request_meanwhile():
    http = free_ports(1)
    spec = ClusterSpec(connector="ucx", http_port=http,
                       worker_args=("--kv-lease-s", str(LEASE_S)))
    with Cluster(spec) as cluster:
        address = cluster.start()
        run_request(address, prompt(40, 0), mode=ALWAYS)  # warm both workers up
        long_done: dict = {}

        def long_request() -> None:
            tokens, last = run_request(address, prompt(1536, 1), mode=ALWAYS,
                                       params=SamplingParams(max_tokens=1, ignore_eos=True))
            long_done.update(at=time.monotonic(), last=last)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(1.0)  # the long prompt is computing
        probe = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=30) as resp:
            assert resp.status == 200
        health_s = time.monotonic() - probe
        tokens, short = run_request(address, prompt(16, 2), mode=ALWAYS,
                                    params=SamplingParams(max_tokens=4, ignore_eos=True))
        short_at = time.monotonic()
        worker.join(300)
        long = long_done["last"]
        print(f"\nlong prompt: ttft {long.timing.ttft_seconds:.2f} s (prefill "
              f"{long.timing.prefill_seconds:.2f} s); short request meanwhile: e2e "
              f"{short.timing.e2e_seconds:.2f} s, ttft {short.timing.ttft_seconds:.2f} s; "
              f"/health {health_s * 1000:.0f} ms")
        assert len(tokens) == 4 and short.prefill_worker
        # the long prompt's compute outlived the lease, and its KV still came by transfer
        assert long.timing.prefill_seconds > LEASE_S, "prompt too short to test the lease"
        assert long.prefill_worker and long.timing.kv_transfer_seconds > 0
        decode = worker_stats(cluster.proc("decode-0").address, "decode",
                              getattr(cluster, "internal_token", None))
        assert decode.kv_transfer.transfers_failed == 0
        assert decode.kv_transfer.transfers_expired == 0
        assert short_at < long_done["at"], "the short request waited for the long prompt"
        assert health_s < 1.0

