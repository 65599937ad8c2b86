"""The Helm chart and kustomize manifests, offline: lint, render with several values sets,
validate every object against the Kubernetes 1.32 schemas, check the wiring (selectors,
ports, probes, RBAC, router config), and run KubernetesDiscovery against pods made from
the rendered Deployments on the kmock API server emulator."""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve.services.router import config as C

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "k8s" / "helm" / "pdserve"
MANIFESTS = ROOT / "deploy" / "k8s" / "manifests"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSION = "1.32.0"


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


HELM, KUBECTL = _tool("helm"), _tool("kubectl")
needs_helm = pytest.mark.skipif(HELM is None, reason="helm missing: deploy/tools/fetch-k8s-tools.sh .venv/bin")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl missing: deploy/tools/fetch-k8s-tools.sh .venv/bin")


def run(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@lru_cache(maxsize=None)
def render(values: Path | None, release: str = "pd") -> tuple[dict[str, Any], ...]:
    args = [HELM, "template", release, str(CHART), "--namespace", "serving"]
    if values:
        args += ["-f", str(values)]
    return tuple(d for d in yaml.safe_load_all(run(*args)) if d)


def of_kind(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind: str, suffix: str) -> dict[str, Any]:
    [d] = [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith(suffix)]
    return d


def pod_spec(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]


def args_of(dep: dict[str, Any]) -> list[str]:
    return pod_spec(dep)["containers"][0]["args"]


def validate_k8s(docs) -> None:
    import kubernetes_validate

    for d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{d['kind']}/{d['metadata']['name']}: {e.message} at "
                                 f"{'.'.join(map(str, e.path))}") from None


def subset(sel: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in sel.items())


# --- helm ---------------------------------------------------------------------------

@needs_helm
def test_lint_strict_with_every_values_set():
    for values in [None, *VALUES]:
        run(HELM, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))


@needs_helm
def test_values_schema_rejects_bad_values(tmp_path):
    for bad, message in [("kvConnector: nccl", "kvConnector"),
                         ("replicas: 3", "additional properties 'replicas' not allowed"),
                         ("redis: {maxmemoryPolicy: lru}", "maxmemoryPolicy"),
                         ("prefill: {grpcPort: 0}", "grpcPort"),
                         ("decode: {kvPort: 65534}", "kvPort"),  # data + 1, control + 2
                         ("prefill: {kvPort: 9089}", "collides with grpcPort or metricsPort"),
                         ("prefill: {kvPort: 9088}", "kvPort + 2"),
                         ("tls: {internal: {secret: x}}", "additional properties 'secret' not allowed"),
                         ("tls: {internal: {mountPath: etc}}", "mountPath")]:
        f = tmp_path / "v.yaml"
        f.write_text(bad)
        p = subprocess.run([HELM, "template", "x", str(CHART), "-f", str(f)], capture_output=True, text=True)
        assert p.returncode != 0 and message in p.stderr, (bad, p.stderr)
    # cross-field rules the schema cannot express fail with a message, too
    p = subprocess.run([HELM, "template", "x", str(CHART), "--set", "kvConnector=redis"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "redis.enabled=true or redis.url" in p.stderr
    p = subprocess.run([HELM, "template", "x", str(CHART), "--set", "tls.enabled=true"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "tls.existingSecret" in p.stderr
    p = subprocess.run([HELM, "template", "x", str(CHART), "--set", "tls.internal.enabled=true"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "tls.internal.existingSecret" in p.stderr
    p = subprocess.run([HELM, "template", "x", str(CHART), "--set", "tls.internal.enabled=true",
                        "--set", "tls.internal.existingSecret=s", "--set", "tls.healthPort=9090"],
                       capture_output=True, text=True)  # the workers' metricsPort
    assert p.returncode != 0 and "tls.healthPort" in p.stderr and "collides" in p.stderr


@needs_helm
@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_rendered_objects_are_valid_and_wired(values):
    docs = render(values)
    validate_k8s(docs)
    deployments = of_kind(docs, "Deployment")
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in deployments}

    for dep in deployments:  # selectors select their own template
        assert subset(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])

    for svc in of_kind(docs, "Service"):  # every Service reaches pods, on ports they expose
        targets = [t for t in pods.values() if subset(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert len(targets) == 1, svc["metadata"]["name"]
        container_ports = {p["name"]: p["containerPort"] for c in targets[0]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (svc["metadata"]["name"], port)
            assert port["port"] == container_ports[port["targetPort"]]

    for name, tmpl in pods.items():  # probes hit ports the container serves
        for c in tmpl["spec"]["containers"]:
            served = {p["containerPort"] for p in c.get("ports", [])} | {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    action = c[probe].get("grpc") or c[probe].get("tcpSocket")
                    if action:
                        assert action["port"] in served, (name, probe)

    for np in of_kind(docs, "NetworkPolicy"):  # policies apply to something
        assert any(subset(np["spec"]["podSelector"]["matchLabels"], t["metadata"]["labels"])
                   for t in pods.values()), np["metadata"]["name"]

    values_doc = yaml.safe_load(values.read_text()) or {}
    _check_router(docs, values_doc)
    _check_workers(docs, values_doc)
    _check_rbac(docs)
    _check_autoscaling(docs, values_doc)


def _check_router(docs, values_doc) -> None:
    router = named(docs, "Deployment", "-router")
    args = args_of(router)
    assert args[0] == "router" and "--config=/etc/pdserve/router.yaml" in args
    assert "--discovery=k8s" in args and "--namespace=$(POD_NAMESPACE)" in args
    assert "--host=0.0.0.0" in args  # reachable from other pods, not just loopback
    mount = next(m for m in pod_spec(router)["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/pdserve" and "subPath" not in mount  # hot reload needs it
    svc = named(docs, "Service", "-router")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "http": 8000}

    cm = named(docs, "ConfigMap", "-router-config")
    cfg = C.parse_config(cm["data"]["router.yaml"], "configmap")  # schema-valid
    for role in ("prefill", "decode"):  # its discovery selects exactly that role's pods
        from tests.support.k8s import selector_matches

        sel = cfg.discovery.kubernetes.selector_for(role)
        matching = [d["metadata"]["name"] for d in of_kind(docs, "Deployment")
                    if selector_matches(sel, d["spec"]["template"]["metadata"]["labels"])]
        assert matching == [f"pd-pdserve-{role}"], (role, sel, matching)
    if "config" in values_doc.get("router", {}):
        assert cfg.prefill.policy == values_doc["router"]["config"]["prefill"]["policy"]

    tls = values_doc.get("tls", {}).get("enabled")
    internal = values_doc.get("tls", {}).get("internal", {}).get("enabled")
    assert _internal_tls_wired(router, "/etc/pdserve-internal-tls") == bool(internal)
    env = {e["name"] for e in pod_spec(router)["containers"][0].get("env", [])}
    assert ("PDSERVE_API_KEY" in env) == bool(values_doc.get("apiKey", {}).get("existingSecret"))
    assert any(a.startswith("--tls-cert=") for a in args) == bool(tls)
    probe_port = pod_spec(router)["containers"][0]["readinessProbe"]["grpc"]["port"]
    if tls:  # kubelet probes cannot do TLS: plaintext health on its own port
        assert "--health-port=50052" in args and probe_port == 50052
    else:
        assert not any(a.startswith("--health-port") for a in args) and probe_port == 50051


def _internal_tls_wired(dep: dict[str, Any], mount_path: str) -> bool:
    """The --internal-tls-* flags, their files on the mounted Secret: all or nothing."""
    spec = pod_spec(dep)
    c = spec["containers"][0]
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in c["args"] if a.startswith("--internal-tls-")}
    mounts = [m for m in c.get("volumeMounts", []) if m["name"] == "internal-tls"]
    volumes = [v for v in spec["volumes"] if v["name"] == "internal-tls"]
    if not (flags or mounts or volumes):
        return False
    [mount], [volume] = mounts, volumes
    assert mount["mountPath"] == mount_path and mount["readOnly"] is True
    assert volume["secret"]["secretName"]
    assert flags == {"--internal-tls-cert": f"{mount_path}/tls.crt", "--internal-tls-key": f"{mount_path}/tls.key",
                     "--internal-tls-ca": f"{mount_path}/ca.crt",
                     "--internal-tls-server-name": "pdserve-internal"}
    return True


def _check_workers(docs, values_doc) -> None:
    connector = values_doc.get("kvConnector", "ucx")
    internal = bool(values_doc.get("tls", {}).get("internal", {}).get("enabled"))
    for role in ("prefill", "decode"):
        dep = named(docs, "Deployment", f"-{role}")
        spec = pod_spec(dep)
        c = spec["containers"][0]
        args = c["args"]
        assert args[0] == role and f"--connector={connector}" in args
        assert any(a.startswith("--model=") for a in args) and "--port=50051" in args
        assert "--host=0.0.0.0" in args and "--kv-host=$(POD_IP)" in args
        assert "POD_IP" in {e["name"] for e in c["env"]}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert f"--kv-port={ports['kv']}" in args and ports["kv-ctl"] == ports["kv"] + 1
        assert ports["kv-data"] == ports["kv"] + 2
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "grpc" in c["readinessProbe"] and "grpc" in c["livenessProbe"]
        sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert spec["terminationGracePeriodSeconds"] > sleep + 30  # time left to drain after preStop
        assert dep["spec"]["template"]["metadata"]["labels"]["pdserve.io/role"] == role
        headless = named(docs, "Service", f"-{role}")
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["metadata"]["labels"]["pdserve.io/role"] == role  # copied to EndpointSlices
        # never the router's client-API TLS; mutual TLS between services with tls.internal
        assert not [a for a in args if a.startswith("--tls-")]
        assert _internal_tls_wired(dep, "/etc/pdserve-internal-tls") == internal
        probe_ports = {c[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        policy = named(docs, "NetworkPolicy", f"-{role}")
        allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
        if internal:  # workers refuse plaintext: kubelet probes use the plaintext health port
            assert "--health-port=50052" in args and ports["health"] == 50052 and probe_ports == {50052}
            [rule] = [r for r in policy["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {"health"}]
            assert "from" not in rule  # the kubelet probes from the node
        else:  # plaintext probes on the API port, no certs
            assert probe_ports == {50051} and not [a for a in args if a.startswith("--health-port")]
            certs = [v for v in spec["volumes"] if "secret" in v and v["name"] != "internal-auth"]
            assert "health" not in ports and not certs
            assert "health" not in allowed
        assert {p["name"] for p in headless["spec"]["ports"]} == {"grpc", "kv", "kv-data", "kv-ctl",
                                                                  "metrics"}
        assert {"grpc", "kv", "kv-ctl"} <= allowed
        # peers reach UCX's TCP transport on any port of its data range (UCX_TCP_PORT_RANGE)
        [data] = [p for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])
                  if p["port"] == ports["kv-data"]]
        assert data.get("endPort") == ports["kv"] + 17
        if connector == "redis":
            redis_svc = named(docs, "Service", "-redis")
            assert f"--redis-url=redis://{redis_svc['metadata']['name']}:6379/0" in args
    if values_doc.get("redis", {}).get("enabled"):
        rargs = args_of(named(docs, "Deployment", "-redis"))
        assert rargs[rargs.index("--maxmemory-policy") + 1] == "allkeys-lru"
        assert rargs[rargs.index("--maxmemory") + 1] == values_doc["redis"]["maxmemory"]
    else:
        assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]


def _check_rbac(docs) -> None:
    [role] = of_kind(docs, "Role")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {(g, r, v) for g, r in (("", "pods"), ("discovery.k8s.io", "endpointslices"))
                      for v in ("get", "list", "watch")}
    [binding] = of_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    [subject] = binding["subjects"]
    router = named(docs, "Deployment", "-router")
    assert subject["name"] == pod_spec(router)["serviceAccountName"] and subject["namespace"] == "serving"
    assert [sa["metadata"]["name"] for sa in of_kind(docs, "ServiceAccount")] == [subject["name"]]
    for role_name in ("prefill", "decode"):  # workers get no API token
        assert pod_spec(named(docs, "Deployment", f"-{role_name}"))["automountServiceAccountToken"] is False


def _check_autoscaling(docs, values_doc) -> None:
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")}
    for role in ("router", "prefill", "decode"):
        dep = named(docs, "Deployment", f"-{role}")
        on = values_doc.get(role, {}).get("autoscaling", {}).get("enabled", False)
        assert (dep["metadata"]["name"] in hpas) == on
        assert ("replicas" in dep["spec"]) == (not on)  # the HPA owns replicas


# --- kustomize ----------------------------------------------------------------------

@needs_helm
def test_kustomize_base_is_generated_from_the_chart():
    sys.path.insert(0, str(ROOT / "deploy" / "tools"))
    try:
        import render_manifests
    finally:
        sys.path.pop(0)
    assert (MANIFESTS / "base" / "pdserve.yaml").read_text() == render_manifests.render(HELM), (
        "deploy/k8s/manifests/base is stale: run python deploy/tools/render_manifests.py")


@needs_kubectl
@pytest.mark.parametrize("target", ["base", "overlays/gpu-cluster"])
def test_kustomize_builds_offline_and_validates(target):
    docs = [d for d in yaml.safe_load_all(run(KUBECTL, "kustomize", str(MANIFESTS / target))) if d]
    validate_k8s(docs)
    ns = "pdserve" if target == "base" else "llm-serving"
    assert {d["metadata"]["namespace"] for d in docs} == {ns}
    [binding] = of_kind(docs, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == ns  # the SA subject moved with the namespace
    cfg = C.parse_config(named(docs, "ConfigMap", "-router-config")["data"]["router.yaml"])
    if target != "base":
        assert cfg.mode == "auto" and cfg.prefill.policy == "prefix_aware"
        assert named(docs, "Deployment", "-decode")["spec"]["replicas"] == 4


# --- the chart's pods, found by KubernetesDiscovery on the emulator -----------------

def _pod_from(dep: dict[str, Any], i: int, ip: str) -> dict[str, Any]:
    tmpl = copy.deepcopy(dep["spec"]["template"])
    for c in tmpl["spec"]["containers"]:  # the API server stores quantities as strings
        for part in ("requests", "limits"):
            q = c.get("resources", {}).get(part, {})
            q.update({k: str(v) for k, v in q.items()})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{dep['metadata']['name']}-{i}", "namespace": "serving",
                         "labels": tmpl["metadata"]["labels"]},
            "spec": tmpl["spec"],
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def _slice_from(svc: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
    """What the EndpointSlice controller makes of a Service: its labels, ports, ready pods."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc['metadata']['name']}-x1", "namespace": "serving",
                         "labels": {**svc["metadata"]["labels"],
                                    "kubernetes.io/service-name": svc["metadata"]["name"]}},
            "addressType": "IPv4",
            "ports": [{"name": p["name"], "port": p["port"], "protocol": "TCP"} for p in svc["spec"]["ports"]],
            "endpoints": [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": p["metadata"]["name"]}} for p in pods]}


@needs_helm
@pytest.mark.parametrize("values", ["redis-values.yaml", "tls-values.yaml", "internal-tls-values.yaml"])
def test_chart_pods_are_discovered_on_emulated_cluster(values):
    pytest.importorskip("kmock")
    from kubernetes import client

    from pdserve.services.router.discovery import KubernetesDiscovery
    from pdserve.services.router.policies import Role
    from tests.support.k8s import KubeCluster

    docs = render(CHART / "ci" / values)
    cfg = C.parse_config(named(docs, "ConfigMap", "-router-config")["data"]["router.yaml"])
    kcfg = cfg.discovery.kubernetes.model_copy(update={"namespace": "serving"})
    expected: dict[Role, dict[str, str]] = {Role.PREFILL: {}, Role.DECODE: {}}
    with KubeCluster() as kube:
        core = client.CoreV1Api(kube.api_client())
        by_role: dict[str, list[dict[str, Any]]] = {}
        for n, dep in enumerate(of_kind(docs, "Deployment")):  # router, redis too: not workers
            for i in range(2):
                pod = _pod_from(dep, i, f"10.1.{n}.{i + 1}")
                core.create_namespaced_pod("serving", pod)
                role = pod["metadata"]["labels"]["pdserve.io/role"]
                by_role.setdefault(role, []).append(pod)
                if role in ("prefill", "decode"):
                    expected[Role(role)][pod["metadata"]["name"]] = f"{pod['status']['podIP']}:50051"
        if kcfg.source == "endpointslices":
            slices = client.DiscoveryV1Api(kube.api_client())
            for svc in of_kind(docs, "Service"):
                role = svc["metadata"]["labels"].get("pdserve.io/role")
                slices.create_namespaced_endpoint_slice("serving", _slice_from(svc, by_role.get(role, [])))

        async def scenario() -> None:
            disc = KubernetesDiscovery(kcfg, api_client=kube.api_client())
            await disc.start()
            try:
                for role in Role:
                    assert {e.worker_id: e.address for e in disc.workers(role)} == expected[role]
                if kcfg.source == "pods":  # scale-down: a worker pod goes away
                    core.delete_namespaced_pod("pd-pdserve-decode-1", "serving")
                    end = time.monotonic() + 5
                    while len(disc.workers(Role.DECODE)) != 1:
                        assert time.monotonic() < end
                        await asyncio.sleep(0.02)
            finally:
                await disc.stop()

        asyncio.run(scenario())
    assert kcfg.source == ("endpointslices" if values == "tls-values.yaml" else "pods")
