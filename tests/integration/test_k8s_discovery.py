"""KubernetesDiscovery's real client code against an emulated API server (kmock, HTTP on
loopback): workers appear, change address, disappear, and survive watch expiry."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any, Callable

import pytest

pytest.importorskip("kubernetes")
pytest.importorskip("kmock")

from kubernetes import client  # noqa: E402

from pdserve.services.router.config import DiscoveryConfig, KubernetesDiscoveryConfig  # noqa: E402
from pdserve.services.router.discovery import (  # noqa: E402
    DiscoveryEvent, KubernetesDiscovery, create_discovery,
)
from pdserve.services.router.policies import Role  # noqa: E402
from tests.support.k8s import KubeCluster, selector_matches  # noqa: E402

NS = "pdserve-test"
LABELS = {"app.kubernetes.io/name": "pdserve"}


def pod(name: str, role: str, ip: str | None, ready: bool = True, port: int = 50051,
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
                     "labels": labels if labels is not None else {**LABELS, "pdserve.io/role": role}},
        "spec": {"containers": [{"name": role, "image": "pdserve:test",
                                 "ports": [{"name": "metrics", "containerPort": 9090},
                                           {"name": "grpc", "containerPort": port}]}]},
        "status": {"phase": "Running" if ip else "Pending", **({"podIP": ip} if ip else {}),
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def endpoint_slice(name: str, role: str, endpoints: list[tuple[str, str, bool]]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {**LABELS, "pdserve.io/role": role,
                                "kubernetes.io/service-name": f"pdserve-{role}"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                       "targetRef": {"kind": "Pod", "name": pod_name, "namespace": NS}}
                      for pod_name, ip, ready in endpoints],
    }


async def eventually(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def addrs(disc: KubernetesDiscovery, role: Role) -> dict[str, str]:
    return {e.worker_id: e.address for e in disc.workers(role)}


@pytest.fixture()
def kube():
    with KubeCluster() as k:
        yield k


def test_selector_adapter_semantics():
    labels = {"a": "1", "b": "2"}
    assert selector_matches("a=1,b==2", labels) and selector_matches("", labels)
    assert selector_matches("a in (1, 3),!c,b", labels) and not selector_matches("a notin (1)", labels)
    assert not selector_matches("a!=1", labels) and not selector_matches("c", labels)


def test_pods_appear_change_address_and_disappear(kube):
    core = client.CoreV1Api(kube.api_client())
    core.create_namespaced_pod(NS, pod("prefill-0", "prefill", "10.0.0.10"))
    core.create_namespaced_pod(NS, pod("decode-0", "decode", "10.0.0.20", port=50052))
    core.create_namespaced_pod(NS, pod("prefill-starting", "prefill", None))  # no IP yet
    core.create_namespaced_pod(NS, pod("prefill-unready", "prefill", "10.0.0.12", ready=False))
    core.create_namespaced_pod(NS, pod("other-app", "prefill", "10.0.0.99",
                                       labels={"app.kubernetes.io/name": "other",
                                               "pdserve.io/role": "prefill"}))
    cfg = KubernetesDiscoveryConfig(namespace=NS, resync_seconds=30)

    async def scenario() -> list[DiscoveryEvent]:
        disc = KubernetesDiscovery(cfg, api_client=kube.api_client())
        events: list[DiscoveryEvent] = []
        disc.subscribe(events.append)
        await disc.start()  # returns with the first listing applied
        try:
            assert addrs(disc, Role.PREFILL) == {"prefill-0": "10.0.0.10:50051"}
            assert addrs(disc, Role.DECODE) == {"decode-0": "10.0.0.20:50052"}

            core.create_namespaced_pod(NS, pod("prefill-1", "prefill", "10.0.0.11"))
            await eventually(lambda: "prefill-1" in addrs(disc, Role.PREFILL))

            core.patch_namespaced_pod("prefill-0", NS, {"status": {"podIP": "10.0.1.10"}})
            await eventually(lambda: addrs(disc, Role.PREFILL)["prefill-0"] == "10.0.1.10:50051")

            core.patch_namespaced_pod("prefill-starting", NS, {"status": {
                "phase": "Running", "podIP": "10.0.0.13",
                "conditions": [{"type": "Ready", "status": "True"}]}})
            await eventually(lambda: "prefill-starting" in addrs(disc, Role.PREFILL))

            core.patch_namespaced_pod("prefill-1", NS, {"status": {
                "conditions": [{"type": "Ready", "status": "False"}]}})  # failing readiness
            await eventually(lambda: "prefill-1" not in addrs(disc, Role.PREFILL))

            core.delete_namespaced_pod("decode-0", NS)
            await eventually(lambda: not disc.workers(Role.DECODE))
            assert set(addrs(disc, Role.PREFILL)) == {"prefill-0", "prefill-starting"}
        finally:
            await disc.stop()
        return events

    started = time.monotonic()
    events = asyncio.run(scenario())
    assert time.monotonic() - started < 10  # stop() does not wait out a watch timeout
    prefill = [e for e in events if e.role is Role.PREFILL]
    assert any(e.changed and e.changed[0].address == "10.0.1.10:50051" for e in prefill)
    assert any(e.removed and e.removed[0].worker_id == "prefill-1" for e in prefill)
    assert all(e.workers == tuple(sorted(e.workers, key=lambda w: w.worker_id)) for e in events)


def test_endpointslices_source(kube):
    disco = client.DiscoveryV1Api(kube.api_client())
    disco.create_namespaced_endpoint_slice(NS, endpoint_slice(
        "pdserve-prefill-abc", "prefill", [("prefill-0", "10.0.0.10", True),
                                           ("prefill-1", "10.0.0.11", False)]))
    disco.create_namespaced_endpoint_slice(NS, endpoint_slice(
        "pdserve-decode-abc", "decode", [("decode-0", "10.0.0.20", True)]))
    cfg = DiscoveryConfig(backend="kubernetes", kubernetes=KubernetesDiscoveryConfig(
        namespace=NS, source="endpointslices", resync_seconds=30))

    async def scenario() -> None:
        disc = create_discovery(cfg)
        disc._api_client = kube.api_client()  # the registry builds it; point it at kmock
        await disc.start()
        try:
            assert addrs(disc, Role.PREFILL) == {"prefill-0": "10.0.0.10:50051"}
            assert addrs(disc, Role.DECODE) == {"decode-0": "10.0.0.20:50051"}
            # a second slice of the same Service: workers are the union
            disco.create_namespaced_endpoint_slice(NS, endpoint_slice(
                "pdserve-prefill-def", "prefill", [("prefill-2", "10.0.0.12", True)]))
            await eventually(lambda: set(addrs(disc, Role.PREFILL)) == {"prefill-0", "prefill-2"})
            # endpoints replaced: prefill-1 ready now, prefill-0 moved
            disco.patch_namespaced_endpoint_slice("pdserve-prefill-abc", NS, {"endpoints": [
                {"addresses": ["10.0.9.10"], "conditions": {"ready": True},
                 "targetRef": {"kind": "Pod", "name": "prefill-0"}},
                {"addresses": ["10.0.0.11"], "targetRef": {"kind": "Pod", "name": "prefill-1"}}]})
            await eventually(lambda: addrs(disc, Role.PREFILL) == {
                "prefill-0": "10.0.9.10:50051", "prefill-1": "10.0.0.11:50051",
                "prefill-2": "10.0.0.12:50051"})
            disco.delete_namespaced_endpoint_slice("pdserve-prefill-abc", NS)
            await eventually(lambda: set(addrs(disc, Role.PREFILL)) == {"prefill-2"})
        finally:
            await disc.stop()

    asyncio.run(scenario())


def test_resync_after_watch_expiry_and_timeout(kube):
    core = client.CoreV1Api(kube.api_client())
    core.create_namespaced_pod(NS, pod("prefill-0", "prefill", "10.0.0.10"))
    kube.emulator.expire_watches(2)  # the first two watches answer 410 Gone
    cfg = KubernetesDiscoveryConfig(namespace=NS, resync_seconds=1)

    async def scenario() -> None:
        disc = KubernetesDiscovery(cfg, api_client=kube.api_client())
        await disc.start()
        try:
            lists_at_start = kube.emulator.list_calls
            core.create_namespaced_pod(NS, pod("prefill-1", "prefill", "10.0.0.11"))
            await eventually(lambda: set(addrs(disc, Role.PREFILL)) == {"prefill-0", "prefill-1"})
            # the 1 s watch timeout ends every watch: each role lists again
            await eventually(lambda: kube.emulator.list_calls >= lists_at_start + 2, timeout=4)
            core.delete_namespaced_pod("prefill-0", NS)
            await eventually(lambda: set(addrs(disc, Role.PREFILL)) == {"prefill-1"})
        finally:
            await disc.stop()

    asyncio.run(scenario())
    assert kube.emulator.watch_calls >= 4


def test_api_server_unreachable_does_not_block_startup():
    cfg = KubernetesDiscoveryConfig(namespace=NS)
    api = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))  # nothing listens

    async def scenario() -> None:
        disc = KubernetesDiscovery(cfg, api_client=api, initial_sync_timeout=0.5)
        await disc.start()
        assert disc.workers(Role.PREFILL) == ()
        await disc.stop()

    asyncio.run(scenario())


def test_discovery_module_does_not_import_kubernetes():
    code = ("import sys; import pdserve.services.router.discovery as d, pdserve.services.router.health;"
            "d.create_discovery(__import__('pdserve.services.router.config', fromlist=['x']).DiscoveryConfig());"
            "assert 'kubernetes' not in sys.modules, 'kubernetes imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
