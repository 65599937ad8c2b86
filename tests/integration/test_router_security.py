"""Router security against one real system started the way the Helm chart starts it
with TLS on: `--tls-cert --tls-key --tls-ca` (so mutual TLS), `--health-port` for
plaintext probes and PDSERVE_API_KEY. Checked over gRPC and the OpenAI HTTP API: the
API key (401 / UNAUTHENTICATED), the server certificate (a client without the CA
fails), client certificates (a client without one is refused). One-way TLS (no
client CA) is checked in process, on the same credential code the router uses."""

from __future__ import annotations

import socket
import ssl
import time
import types

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.client import TlsClient, make_request, stream
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.services.router.http import TlsFiles, start_http
from pdserve.services.router.service import RouterSettings
from pdserve.services.serve import grpc_server_credentials
from pdserve.wire import generate_pb2, generate_pb2_grpc
from tests.support.certs import have_openssl, make_certs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_openssl(), reason="needs the openssl CLI")]

KEY = "s3cret-test-key"
SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssl_context(certs, *, ca: bool = True, client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.ca if ca else None)
    if client_cert:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
    return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def system(certs, tmp_path_factory):
    http_port, health_port = free_port(), free_port()
    spec = ClusterSpec(
        connector="ucx", http_port=http_port, env={"PDSERVE_API_KEY": KEY},
        log_dir=str(tmp_path_factory.mktemp("security-logs")),
        router_args=("--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                     "--tls-ca", certs.ca, "--health-port", str(health_port)))
    with Cluster(spec) as cluster:
        router = cluster.start()
        base = f"https://127.0.0.1:{http_port}"
        with httpx.Client(base_url=base, verify=ssl_context(certs), timeout=120) as http:
            _wait_healthy(http)
            yield types.SimpleNamespace(router=router, http=http, base=base,
                                        health=f"127.0.0.1:{health_port}")


def _wait_healthy(http: httpx.Client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("router never reported a healthy decode worker")


def request() -> generate_pb2.GenerateRequest:
    req = make_request(prompt="The capital of France is")
    req.sampling.max_tokens, req.sampling.temperature = 3, 0.0
    return req


def grpc_error(address, tls, api_key=KEY) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stream(address, request(), api_key=api_key, timeout=20, tls=tls))
    return info.value


# ---- gRPC ------------------------------------------------------------------------------
def test_grpc_mtls_with_key_works(system, certs):
    tls = TlsClient(certs.ca, certs.client_cert, certs.client_key)
    chunks = list(stream(system.router, request(), api_key=KEY, timeout=120, tls=tls))
    assert chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].finish_reason != generate_pb2.FINISH_REASON_ERROR


@pytest.mark.parametrize("api_key", [None, "wrong-key"])
def test_grpc_api_key_required(system, certs, api_key):
    tls = TlsClient(certs.ca, certs.client_cert, certs.client_key)
    assert grpc_error(system.router, tls, api_key).code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.secure_channel(system.router, tls.credentials()) as ch:
        with pytest.raises(grpc.RpcError) as info:
            generate_pb2_grpc.RouterStub(ch).ListModels(generate_pb2.ListModelsRequest(),
                                                        timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_plaintext_refused(system):
    assert grpc_error(system.router, None).code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_without_ca_refused(system, certs):
    tls = TlsClient(None, certs.client_cert, certs.client_key)  # system roots only
    assert grpc_error(system.router, tls).code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_without_client_certificate_refused(system, certs):
    assert grpc_error(system.router, TlsClient(certs.ca)).code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_health_port(system):
    with grpc.insecure_channel(system.health) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == SERVING
        with pytest.raises(grpc.RpcError) as info:  # the API itself is not on this port
            generate_pb2_grpc.RouterStub(ch).ListModels(generate_pb2.ListModelsRequest(),
                                                        timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- HTTP --------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"},
                                     {"Authorization": f"Basic {KEY}"}],
                         ids=["none", "wrong", "not-bearer"])
def test_http_api_key_required(system, headers):
    r = system.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                         headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert system.http.get("/v1/models", headers=headers).status_code == 401


def test_http_health_and_metrics_stay_open(system):
    assert system.http.get("/health").status_code == 200
    assert system.http.get("/metrics").status_code == 200


def test_openai_client_with_key(system, certs):
    with httpx.Client(verify=ssl_context(certs)) as http_client:
        good = openai.OpenAI(base_url=f"{system.base}/v1", api_key=KEY, max_retries=0,
                             http_client=http_client, timeout=120)
        out = good.chat.completions.create(model="", max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert out.usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url=f"{system.base}/v1", api_key="wrong", max_retries=0,
                            http_client=http_client)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


@pytest.mark.parametrize("ca,client_cert", [(True, False), (False, True)],
                         ids=["no-client-cert", "no-ca"])
def test_https_refused_without_certificates(system, certs, ca, client_cert):
    with httpx.Client(verify=ssl_context(certs, ca=ca, client_cert=client_cert)) as c:
        with pytest.raises(httpx.TransportError):
            c.get(f"{system.base}/health", timeout=10)


def test_http_plaintext_refused(system):
    with pytest.raises(httpx.TransportError):
        httpx.get(system.base.replace("https://", "http://") + "/health", timeout=10)


# ---- one-way TLS and configuration errors, in process ----------------------------------
def test_tls_settings_validation(certs):
    assert grpc_server_credentials(RouterSettings()) is None
    with pytest.raises(ValueError, match="--tls-key"):
        grpc_server_credentials(RouterSettings(tls_cert=certs.server_cert))
    with pytest.raises(ValueError, match="cannot read"):
        grpc_server_credentials(RouterSettings(tls_cert="/nonexistent.crt",
                                               tls_key=certs.server_key))
    assert TlsFiles.from_settings(RouterSettings()) is None
    with pytest.raises(ValueError):
        TlsFiles.from_settings(RouterSettings(tls_ca=certs.ca))


@pytest.mark.asyncio
async def test_one_way_tls_grpc(certs):
    creds = grpc_server_credentials(RouterSettings(tls_cert=certs.server_cert,
                                                   tls_key=certs.server_key))
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', creds)}"
    await server.start()
    try:
        ca_only = grpc.ssl_channel_credentials(certs.read("ca"))
        async with grpc.aio.secure_channel(address, ca_only) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=10)
            assert reply.status == SERVING
        async with grpc.aio.insecure_channel(address) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_one_way_tls_http(certs):
    core = types.SimpleNamespace(settings=types.SimpleNamespace(api_key=None),
                                 health=types.SimpleNamespace(healthy=lambda role: ["d"]))
    handle = await start_http(core, "127.0.0.1", 0,
                              tls=TlsFiles(certs.server_cert, certs.server_key))
    try:
        async with httpx.AsyncClient(verify=ssl_context(certs, client_cert=False)) as c:
            assert (await c.get(f"{handle.url}/health")).status_code == 200
        async with httpx.AsyncClient() as c:  # system roots: the test CA is unknown
            with pytest.raises(httpx.ConnectError):
                await c.get(f"{handle.url}/health")
    finally:
        await handle.stop()


def test_generate_cli_over_mtls(system, certs, capsys):
    from pdserve.cli import main

    common = ["generate", "--router", system.router, "--prompt", "Hello", "--max-tokens", "2",
              "--json", "--api-key", KEY, "--tls-ca", certs.ca]
    assert main(common + ["--tls-cert", certs.client_cert, "--tls-key", certs.client_key]) == 0
    assert '"finish_reason"' in capsys.readouterr().out
    assert main(common) == 1  # no client certificate: refused, reported without a traceback
    assert "UNAVAILABLE" in capsys.readouterr().err
