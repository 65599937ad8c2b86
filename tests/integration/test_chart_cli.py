"""The Helm chart and the `pdserve` CLI agree: every container the chart renders (with
each values set in deploy/k8s/helm/pdserve/ci/) runs a command line that
`pdserve.cli.build_parser()` accepts, and the parsed settings are the ones a pod needs
(router: Kubernetes discovery of this release's workers, bound on all interfaces;
workers: all interfaces for gRPC, the pod IP and the chart's ports for KV transfer).
Also the precedence of the router's discovery flags over the config file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve import cli
from pdserve.services.router import config as C

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "k8s" / "helm" / "pdserve"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "serving"
RELEASE = "pd"
# What the kubelet would put in the $(VAR) references of command and args.
POD_ENV = {"POD_NAMESPACE": NAMESPACE, "POD_IP": "10.1.2.3", "POD_NAME": "pd-pdserve-x-0"}
_VAR = re.compile(r"(\$+)\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _helm() -> str | None:
    local = Path(sys.executable).parent / "helm"
    return str(local) if local.exists() else shutil.which("helm")


HELM = _helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="helm missing: deploy/tools/fetch-k8s-tools.sh .venv/bin")


@lru_cache(maxsize=None)
def render(values: Path) -> tuple[dict[str, Any], ...]:
    p = subprocess.run([HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                        "-f", str(values)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return tuple(d for d in yaml.safe_load_all(p.stdout) if d)


def containers(docs) -> dict[str, dict[str, Any]]:
    """component (router, prefill, decode, redis) -> its only container."""
    out = {}
    for d in docs:
        if d["kind"] == "Deployment":
            [c] = d["spec"]["template"]["spec"]["containers"]
            out[d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = c
    return out


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion ($$ escapes); every reference must be a defined env var."""
    def sub(m: re.Match) -> str:
        dollars, name = m.group(1), m.group(2)
        if len(dollars) % 2 == 0:  # escaped: $$(X) -> $(X)
            return "$" * (len(dollars) // 2) + f"({name})"
        assert name in env, f"{arg!r} references ${name}, which the container does not define"
        return "$" * (len(dollars) // 2) + env[name]
    return _VAR.sub(sub, arg)


def command_line(c: dict[str, Any]) -> list[str]:
    defined = {e["name"] for e in c.get("env", [])}
    env = {k: POD_ENV.get(k, f"dummy-{k.lower()}") for k in defined}
    return [expand(a, env) for a in [*c.get("command", []), *c.get("args", [])]]


def parse(argv: list[str], capsys):
    assert argv[0] == "pdserve", argv
    try:
        return cli.build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse: unknown flag, bad value, missing argument
        pytest.fail(f"pdserve rejects the chart's command line (exit {e.code}):\n"
                    f"  {' '.join(argv)}\n{capsys.readouterr().err}")


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


@needs_helm
@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_chart_command_lines_parse_and_wire_up(values, capsys):
    from pdserve.services.router.discovery import KubernetesDiscovery
    from pdserve.services.router.service import make_discovery
    from pdserve.services.worker import connector_settings

    docs = render(values)
    values_doc = yaml.safe_load(values.read_text()) or {}
    tls = bool(values_doc.get("tls", {}).get("enabled"))
    internal = bool(values_doc.get("tls", {}).get("internal", {}).get("enabled"))
    by_component = containers(docs)
    assert {"router", "prefill", "decode"} <= set(by_component)

    # --- router -----------------------------------------------------------------------
    c = by_component["router"]
    args = parse(command_line(c), capsys)
    assert args.command == "router" and args.func is cli.cmd_router
    s = cli._router_settings(args)
    assert s.host == "0.0.0.0" and (s.port, s.http_port) == (ports(c)["grpc"], ports(c)["http"])
    assert s.discovery == "k8s" and s.namespace == NAMESPACE and not (s.prefill or s.decode)
    assert s.selector == f"app.kubernetes.io/name=pdserve,app.kubernetes.io/instance={RELEASE}"
    assert s.worker_tls.enabled == internal  # mutual TLS towards the workers
    if internal:
        _check_internal_tls(s.worker_tls, c)
    if tls:
        assert s.tls_cert and s.tls_key and s.tls_ca
        assert s.health_port == ports(c)["health"] == c["readinessProbe"]["grpc"]["port"]
    else:
        assert not (s.tls_cert or s.health_port) and "health" not in ports(c)
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-router-config")]
    assert s.config_path == "/etc/pdserve/router.yaml"
    cfg = C.parse_config(cm["data"]["router.yaml"], "configmap")
    disc = make_discovery(s, cfg)
    assert isinstance(disc, KubernetesDiscovery)
    assert disc.cfg.namespace == NAMESPACE and disc.cfg.selector == s.selector
    assert disc.cfg.source == cfg.discovery.kubernetes.source  # the file's other keys stay
    assert disc.cfg.port_name in ports(by_component["prefill"])

    # --- workers ----------------------------------------------------------------------
    connector = values_doc.get("kvConnector", "ucx")
    for role in ("prefill", "decode"):
        c = by_component[role]
        argv = command_line(c)
        assert not [a for a in argv if a.startswith("--tls-")], argv  # the router's client TLS only
        if not internal:  # plaintext workers: no TLS flags at all
            assert not [a for a in argv if a.startswith(("--internal-tls-", "--health-port"))], argv
        args = parse(argv, capsys)
        assert args.command == role and args.func is cli.cmd_worker
        w = cli._worker_settings(args, role)
        p = ports(c)
        assert w.tls.enabled == internal
        assert w.role == role and w.connector == connector
        assert w.host == "0.0.0.0" and w.port == p["grpc"] and w.metrics_port == p["metrics"]
        assert w.kv_host == POD_ENV["POD_IP"]
        assert w.kv_port == p["kv"] and p["kv-ctl"] == p["kv"] + 1 and p["kv-data"] == p["kv"] + 2
        if internal:  # workers refuse plaintext: probes use the plaintext health port
            _check_internal_tls(w.tls, c)
            assert w.health_port == p["health"] and w.health_port not in (w.port, w.metrics_port)
        else:
            assert not w.health_port and "health" not in p
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # plaintext gRPC port
            assert c[probe]["grpc"]["port"] == (p["health"] if internal else p["grpc"]), (role, probe)
        if connector == "ucx":
            cs = connector_settings(w)
            assert (cs.host, cs.side_channel_port, cs.data_port, cs.control_port) == (
                POD_ENV["POD_IP"], p["kv"], p["kv-data"], p["kv-ctl"])

    for component, c in by_component.items():  # anything else (valkey) expands cleanly too
        if component not in ("router", "prefill", "decode"):
            assert "$(" not in " ".join(command_line(c)).replace("$$(", "")


def _check_internal_tls(tls, c: dict[str, Any]) -> None:
    """All three --internal-tls-* files, each on the Secret volume the container mounts."""
    assert tls.cert and tls.key and tls.ca
    mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "internal-tls"]
    assert len(mounts) == 1, c["volumeMounts"]
    for path, name in ((tls.cert, "tls.crt"), (tls.key, "tls.key"), (tls.ca, "ca.crt")):
        assert path == f"{mounts[0]}/{name}"


# --- the router's discovery flags, without the chart -----------------------------------

def _settings(**kw):
    from pdserve.services.router.service import RouterSettings

    return RouterSettings(**kw)


K8S_FILE = C.RouterConfig(discovery=C.DiscoveryConfig(
    backend="kubernetes", kubernetes=C.KubernetesDiscoveryConfig(
        namespace="from-file", selector="app=from-file", source="endpointslices")))
STATIC_FILE = C.RouterConfig(discovery=C.DiscoveryConfig(
    static=C.StaticDiscoveryConfig(prefill=["p:1"], decode=["d:1"])))


def test_discovery_flags_override_the_config_file():
    from pdserve.services.router.discovery import KubernetesDiscovery, StaticDiscovery
    from pdserve.services.router.policies import Role
    from pdserve.services.router.service import make_discovery

    d = make_discovery(_settings(discovery="k8s", namespace="ns", selector="a=b"), STATIC_FILE)
    assert isinstance(d, KubernetesDiscovery) and (d.cfg.namespace, d.cfg.selector) == ("ns", "a=b")
    d = make_discovery(_settings(discovery="k8s", namespace="ns"), K8S_FILE)  # only what is given
    assert (d.cfg.namespace, d.cfg.selector, d.cfg.source) == ("ns", "app=from-file", "endpointslices")
    d = make_discovery(_settings(), K8S_FILE)  # no flags: the file decides
    assert isinstance(d, KubernetesDiscovery) and d.cfg.namespace == "from-file"
    d = make_discovery(_settings(discovery="static"), K8S_FILE.model_copy(update={"discovery": C.DiscoveryConfig(
        backend="kubernetes", static=C.StaticDiscoveryConfig(decode=["d:2"]))}))
    assert isinstance(d, StaticDiscovery) and d._initial[Role.DECODE] == ["d:2"]
    d = make_discovery(_settings(decode=("d:9",)), K8S_FILE)  # addresses mean static
    assert isinstance(d, StaticDiscovery) and d._initial[Role.DECODE] == ["d:9"]
    with pytest.raises(ValueError, match="cannot be combined"):
        make_discovery(_settings(discovery="k8s", decode=("d:9",)), K8S_FILE)


def test_router_cli_flags_reach_settings():
    args = cli.build_parser().parse_args(
        ["router", "--discovery", "k8s", "--namespace", "ns", "--selector", "a=b", "--health-port", "7"])
    s = cli._router_settings(args)
    assert (s.discovery, s.namespace, s.selector, s.health_port, s.host) == ("k8s", "ns", "a=b", 7, "127.0.0.1")
    s = cli._router_settings(cli.build_parser().parse_args(["router"]))
    assert (s.discovery, s.namespace, s.selector) == (None, None, None)


def test_worker_kv_port_sets_every_ucx_listener():
    from pdserve.kvtransfer.ucx import UcxSettings
    from pdserve.services.worker import WorkerSettings, connector_settings

    args = cli.build_parser().parse_args(["decode", "--kv-port", "7000", "--kv-host", "10.0.0.1"])
    w = cli._worker_settings(args, "decode")
    assert w.kv_port == 7000
    assert connector_settings(w) == UcxSettings(host="10.0.0.1", side_channel_port=7000,
                                                control_port=7001, data_port=7002)
    w = cli._worker_settings(cli.build_parser().parse_args(["prefill"]), "prefill")
    cs = connector_settings(w)
    assert w.kv_port == 0 and (cs.side_channel_port, cs.data_port, cs.control_port) == (0, 0, 0)
    assert "side_channel_port" not in vars(connector_settings(WorkerSettings("decode", connector="redis", kv_port=7000)))
    with pytest.raises(ValueError, match="kv_port"):
        WorkerSettings("decode", kv_port=65519)  # its data range would pass 65535
    WorkerSettings("decode", kv_port=65518)


def test_kustomize_base_command_lines_parse(capsys):
    """The committed plain manifests (rendered from the chart) run, too."""
    base = ROOT / "deploy" / "k8s" / "manifests" / "base" / "pdserve.yaml"
    by_component = containers([d for d in yaml.safe_load_all(base.read_text()) if d])
    for component in ("router", "prefill", "decode"):
        args = parse(command_line(by_component[component]), capsys)
        settings = (cli._router_settings(args) if component == "router"
                    else cli._worker_settings(args, component))
        assert settings.host == "0.0.0.0"
        if component != "router":
            assert settings.kv_port == ports(by_component[component])["kv"]


def test_worker_defaults_pick_the_device_and_its_fast_path():
    """No engine flags: the CPU reference path here; on CUDA the triton backend with
    graphs and a pool sized from GPU memory (tests/gpu checks that side)."""
    import torch

    cfg = cli._worker_settings(cli.build_parser().parse_args(["decode"]), "decode").engine
    if torch.cuda.is_available():
        assert (cfg.device, cfg.attention_backend, cfg.cuda_graphs) == ("cuda", "triton", True)
    else:
        assert (cfg.device, cfg.attention_backend, cfg.cuda_graphs) == ("cpu", "torch", False)
    assert cfg.kv_cache_memory_gb == 0 and cfg.gpu_memory_utilization == 0.9
    gpu = torch.cuda.is_available()
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == ((256, 8192) if gpu else (64, 512))
    off = cli._worker_settings(cli.build_parser().parse_args(
        ["decode", "--device", "cuda", "--no-cuda-graphs", "--kv-cache-gb", "4"]), "decode").engine
    assert (off.attention_backend, off.cuda_graphs, off.dtype) == ("triton", False, "bfloat16")
    assert off.kv_cache_memory_gb == 4


def test_worker_engine_flags_reach_the_engine_config():
    on = cli._worker_settings(cli.build_parser().parse_args(
        ["decode", "--device", "cuda", "--attention-backend", "triton", "--cuda-graphs"]), "decode")
    assert on.engine.fused_kernels and on.engine.cuda_graphs and on.engine.dtype == "bfloat16"
    assert on.engine.async_scheduling is None  # auto: on with CUDA graphs
    assert on.engine.prefill_graph_max_tokens == 2048
    off = cli._worker_settings(cli.build_parser().parse_args(
        ["prefill", "--no-fused-kernels", "--no-async-scheduling", "--prefill-graph-tokens",
         "0"]), "prefill")
    assert not off.engine.fused_kernels and not off.engine.cuda_graphs
    assert off.engine.async_scheduling is False and off.engine.prefill_graph_max_tokens == 0
