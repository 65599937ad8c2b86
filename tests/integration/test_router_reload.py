"""The router's policy file is hot-reloaded while it serves: a valid edit switches the
policy for the next request, a bad edit is rejected and the running policy stays."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from pdserve.services.launcher import Cluster, ClusterSpec
from tests.support.cluster import run_request

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def decisions(text: str, policy: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("pdserve:router_policy_decisions_total{") and \
                'role="prefill"' in line and f'policy="{policy}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


def test_policy_file_edits_apply_while_serving(tmp_path):
    config = tmp_path / "router.yaml"
    config.write_text("mode: always\nprefill: {policy: round_robin}\n")
    port = free_port()
    with Cluster(ClusterSpec(http_port=port, config=str(config))) as cluster:
        address = cluster.start()
        prompt = list(range(200, 240))
        run_request(address, prompt)
        assert decisions(metrics(port), "round_robin") == 1

        config.write_text("mode: always\nprefill: {policy: no_such_policy}\n")
        wait_for(lambda: 'result="rejected"} 1.0' in metrics(port))
        run_request(address, prompt)  # still served, by the policy that was running
        assert decisions(metrics(port), "round_robin") == 2

        config.write_text("mode: always\nprefill: {policy: least_loaded}\n")
        wait_for(lambda: 'result="ok"} 1.0' in metrics(port))
        run_request(address, prompt)
        text = metrics(port)
        assert decisions(text, "least_loaded") == 1 and decisions(text, "round_robin") == 2
