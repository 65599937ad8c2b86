"""The closed internal plane with real processes: `pdserve up`'s children share one
generated secret (in their environment, never on a command line); workers refuse gRPC
calls and KV handshakes without it while the router serves end to end; Valkey wants
its password; `pdserve up --api-key` closes the public router (gRPC and HTTP)."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from pdserve.client import make_request, stream
from pdserve.services import auth
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.services.common import sampling_to_proto
from pdserve.wire import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.cluster import GREEDY, run_request, wait_pools_free, worker_channel

pytestmark = pytest.mark.slow
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def cluster():
    with Cluster(ClusterSpec(connector="ucx")) as c:
        c.start()
        yield c


def _decode_call(address: str, token: str | None):
    with worker_channel(address, token) as ch:
        request = worker_pb2.DecodeRequest(request_id="direct", token_ids=PROMPT,
                                           sampling=sampling_to_proto(GREEDY))
        request.local_prefill.SetInParent()
        return [c for c in worker_pb2_grpc.DecodeServiceStub(ch).Generate(request, timeout=60)]


def _prefill_call(address: str, token: str | None, kv_address: str):
    """Prefill with a caller-chosen KV destination (any host:port)."""
    with worker_channel(address, token) as ch:
        request = worker_pb2.PrefillRequest(request_id="direct-p", token_ids=PROMPT,
                                            sampling=sampling_to_proto(GREEDY))
        request.destination.address = kv_address
        request.destination.transfer_id = "stranger"
        return worker_pb2_grpc.PrefillServiceStub(ch).Prefill(request, timeout=60)


def _unauthenticated(call) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
    assert "internal token" in refused.value.details()
    return refused.value.details()


def test_router_with_the_token_serves_end_to_end(cluster):
    tokens, last = run_request(cluster.router_address, PROMPT)
    assert len(tokens) == GREEDY.max_tokens and last.prefill_worker  # disaggregated
    wait_pools_free(cluster)


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_workers_refuse_internal_calls_without_the_token(cluster, token):
    token = auth.new_token() if token else None
    decode, prefill = cluster.proc("decode-0").address, cluster.proc("prefill-0").address
    _unauthenticated(lambda: _decode_call(decode, token))   # no bypass of the router
    # no caller-chosen KV destination: an open port that would see the connection
    with socket.create_server(("127.0.0.1", 0)) as bait:
        bait.settimeout(0.5)
        target = "tcp://127.0.0.1:%d" % bait.getsockname()[1]
        _unauthenticated(lambda: _prefill_call(prefill, token, target))
        with pytest.raises(socket.timeout):
            bait.accept()
    with worker_channel(decode, token) as ch:
        stub = worker_pb2_grpc.DecodeServiceStub(ch)
        _unauthenticated(lambda: stub.Stats(worker_pb2.StatsRequest(), timeout=10))
    # probes need no token
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(decode) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_worker_with_the_token_answers_directly(cluster):
    chunks = _decode_call(cluster.proc("decode-0").address, cluster.internal_token)
    assert sum(len(c.token_ids) for c in chunks) == GREEDY.max_tokens
    wait_pools_free(cluster)


def test_token_travels_in_the_environment_not_the_command_line(cluster):
    for p in cluster.procs:
        proc = Path(f"/proc/{p.popen.pid}")
        assert cluster.internal_token.encode() not in (proc / "cmdline").read_bytes()
        env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0")
                   if b"=" in kv)
        assert env[auth.TOKEN_ENV.encode()] == cluster.internal_token.encode()


def test_kv_handshake_needs_the_token(cluster):
    from pdserve.kvtransfer.base import HandshakeError
    from pdserve.kvtransfer.handshake import request_handshake
    from pdserve.kvtransfer.messages import HandshakeInfo

    with worker_channel(cluster.proc("decode-0").address, cluster.internal_token) as ch:
        info = worker_pb2_grpc.DecodeServiceStub(ch).Describe(worker_pb2.DescribeRequest(),
                                                              timeout=10)
    hello = HandshakeInfo.from_proto(info.kv)
    hello = HandshakeInfo(**{**hello.__dict__, "role": "prefill", "worker_id": "stranger"})
    for key in (None, auth.kv_handshake_key(auth.new_token())):
        with pytest.raises(HandshakeError, match="internal token"):
            request_handshake(info.kv_address, hello, key=key)
    reply = request_handshake(info.kv_address, hello,
                              key=auth.kv_handshake_key(cluster.internal_token))
    assert reply.accepted and reply.data_address


def test_in_process_cluster_shares_one_token():
    from pdserve.services.launcher import start_in_process

    async def main():
        router, workers = await start_in_process(ClusterSpec(connector="local"))
        try:
            decode = next(w for w in workers if w.role == "decode").address
            await asyncio.to_thread(_unauthenticated, lambda: _decode_call(decode, None))
            async with grpc.aio.insecure_channel(router.address) as ch:
                request = make_request(token_ids=PROMPT, params=GREEDY)
                chunks = [c async for c in generate_pb2_grpc.RouterStub(ch).Generate(
                    request, timeout=120)]
            assert sum(len(c.token_ids) for c in chunks) == GREEDY.max_tokens
        finally:
            await router.stop()
            for w in reversed(workers):
                await w.stop()

    asyncio.run(main())


# ---- pdserve up --api-key, redis connector -------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def up_with_key(tmp_path_factory):
    key, http_port = "sk-" + auth.new_token(), _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PDSERVE_API_KEY", None)
    env.pop(auth.TOKEN_ENV, None)
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--connector", "redis", "--device", "cpu",
           "--port", "0", "--http-port", str(http_port), "--api-key", key]
    log = open(tmp_path_factory.mktemp("up") / "up.log", "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.decode()) for l in proc.stdout],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, Path(log.name).read_text()[-3000:]
                continue
            if line.startswith("READY up "):
                yield key, line.split()[2], f"http://127.0.0.1:{http_port}", proc
                break
        else:
            pytest.fail("pdserve up did not start:\n" + Path(log.name).read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_up_api_key_closes_the_public_router(up_with_key):
    key, router, base, _ = up_with_key
    request = make_request(token_ids=PROMPT, params=GREEDY)
    with grpc.insecure_channel(router) as ch:
        stub = generate_pb2_grpc.RouterStub(ch)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        chunks = list(stub.Generate(request, timeout=120,
                                    metadata=[("authorization", f"Bearer {key}")]))
    assert sum(len(c.token_ids) for c in chunks) == GREEDY.max_tokens
    body = {"model": "", "prompt": PROMPT, "max_tokens": 4}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 401
    answer = httpx.post(f"{base}/v1/completions", json=body, timeout=120,
                        headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text


def test_up_valkey_refuses_clients_without_the_password(up_with_key):
    import re

    import redis

    key, router, _, proc = up_with_key
    list(stream(router, make_request(token_ids=PROMPT, params=GREEDY), api_key=key,
                timeout=120))  # the workers fill the pool
    children = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _children(proc.pid)}
    [valkey] = [pid for pid, argv in children.items() if b"valkey-server" in argv]
    worker = next(pid for pid, argv in children.items() if b"prefill" in argv)
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    token = next(kv.split(b"=", 1)[1] for kv in environ
                 if kv.startswith(auth.TOKEN_ENV.encode() + b"=")).decode()
    password = auth.valkey_password(token)
    assert password.encode() not in children[valkey]  # valkey retitles itself: host:port
    port = int(re.search(rb"127\.0\.0\.1:(\d+)", children[valkey]).group(1))
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).keys("*")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, password=auth.valkey_password(
            auth.new_token()), socket_timeout=5).keys("*")
    assert redis.Redis(host="127.0.0.1", port=port, password=password,
                       socket_timeout=5).keys("pdserve:kv:*")  # the workers' chunks


# ---- the Helm chart --------------------------------------------------------------------
def test_chart_shares_a_generated_secret_and_its_valkey_derives_the_password(tmp_path):
    """Every pdserve container reads --internal-token-file from the chart's Secret; the
    Valkey container's own script (run here with sh and a real valkey-server) sets
    the password the workers derive from that token."""
    import redis
    import yaml

    from pdserve.kvtransfer.valkey_server import find_server_binary, free_port

    root = Path(__file__).resolve().parents[2]
    helm = Path(sys.executable).parent / "helm"
    if not helm.exists():
        pytest.skip("helm missing: deploy/tools/fetch-k8s-tools.sh .venv/bin")
    chart = root / "deploy" / "k8s" / "helm" / "pdserve"
    out = subprocess.run([str(helm), "template", "pd", str(chart), "-f",
                          str(chart / "ci" / "redis-values.yaml")],
                         capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith(
        "-internal-auth")]
    assert len(secret["data"]["token"]) > 40
    pods = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
            d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}
    for component in ("router", "prefill", "decode", "redis"):
        spec = pods[component]
        [volume] = [v for v in spec["volumes"] if v["name"] == "internal-auth"]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "internal-auth"]
        assert mount["mountPath"] == "/etc/pdserve-internal-auth"
        if component != "redis":
            assert "--internal-token-file=/etc/pdserve-internal-auth/token" in \
                spec["containers"][0]["args"]

    valkey = pods["redis"]["containers"][0]
    assert valkey["command"][:2] == ["sh", "-c"]
    token = auth.new_token()
    (tmp_path / "token").write_text(token)
    script = valkey["command"][2].replace("$$(", "$(")  # what the kubelet hands sh
    script = script.replace("/etc/pdserve-internal-auth", str(tmp_path))
    script = script.replace("/data/", f"{tmp_path}/")
    port = free_port()
    args = [a if a != "6379" else str(port) for a in valkey["args"]] + ["--bind", "127.0.0.1"]
    env = {**os.environ, "PATH": f"{Path(find_server_binary()).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(["sh", "-c", script, *valkey["command"][3:], *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        good = redis.Redis(port=port, password=auth.valkey_password(token), socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert good.ping()
                break
            except redis.AuthenticationError:
                raise  # up, but another password than the workers derive
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).get("k")
    finally:
        server.terminate()
        server.wait(10)


# ---- the KV data plane: strangers are dropped ----------------------------------------
@pytest.fixture
def ucx_receiver():
    from pdserve.kvtransfer import make_receiver
    from pdserve.kvtransfer.ucx import UcxSettings
    from tests.integration.test_connectors import SPEC, hello
    from pdserve.engine.kvcache.pool import KVCachePool

    key = auth.kv_handshake_key(TOKEN_FOR_KV)
    receiver = make_receiver("ucx", KVCachePool(SPEC), hello("ucx", "decode"),
                             UcxSettings(io_timeout_s=2, handshake_key=key))
    yield receiver
    receiver.close()


TOKEN_FOR_KV = auth.new_token()


def test_control_connection_opening_with_an_unknown_transfer_is_dropped(ucx_receiver):
    from pdserve.kvtransfer import PROTOCOL_VERSION
    from pdserve.kvtransfer.control import recv_frame, send_frame
    from pdserve.wire import kv_pb2

    def admit(transfer_id):
        return kv_pb2.SideChannelRequest(admit=kv_pb2.InPlaceAdmit(
            version=PROTOCOL_VERSION, transfer_id=transfer_id)).SerializeToString()

    host, port = ucx_receiver.control_address.rsplit(":", 1)
    ucx_receiver.expect("known", [1, 2])
    with socket.create_connection((host, int(port)), timeout=5) as stranger:
        send_frame(stranger, admit("guessed"))
        reply = kv_pb2.SideChannelReply.FromString(recv_frame(stranger)).chunk
        assert reply.status == kv_pb2.KVChunkReply.REJECTED and "expects" in reply.error
        assert stranger.recv(1) == b""  # closed: no second guess on this connection
    with socket.create_connection((host, int(port)), timeout=5) as peer:
        send_frame(peer, admit("known"))  # opens with a transfer it was told about
        reply = kv_pb2.SideChannelReply.FromString(recv_frame(peer)).chunk
        assert reply.status == kv_pb2.KVChunkReply.ACCEPTED
        send_frame(peer, admit("guessed"))  # later unknown ids: refused, still connected
        reply = kv_pb2.SideChannelReply.FromString(recv_frame(peer)).chunk
        assert reply.status == kv_pb2.KVChunkReply.REJECTED and "unknown transfer" in reply.error


def _ucx_handshake(receiver, key, connection):
    from tests.integration.test_connectors import hello
    from pdserve.kvtransfer.handshake import request_handshake

    return request_handshake(receiver.address, hello("ucx", "prefill"), key=key, ucx=connection)


def test_ucx_connection_needs_the_token(ucx_receiver):
    """The receiver connects back to a sender's UCX worker only after an authenticated
    handshake: a stranger cannot make it reach out, nor learn its worker address."""
    from pdserve.kvtransfer.base import HandshakeError
    from pdserve.kvtransfer.ucx import UcxRuntime
    from pdserve.kvtransfer.ucx.tag import new_tag
    from pdserve.wire import kv_pb2

    runtime = UcxRuntime.get()
    stranger = kv_pb2.UcxConnection(worker_address=runtime.worker_address(5), tag=new_tag(),
                                    sender_id=1)
    for key in (None, auth.kv_handshake_key(auth.new_token())):
        with pytest.raises(HandshakeError, match="internal token"):
            _ucx_handshake(ucx_receiver, key, stranger)
    assert not ucx_receiver._connections
    reply = _ucx_handshake(ucx_receiver, auth.kv_handshake_key(TOKEN_FOR_KV), stranger)
    assert reply.ucx_worker_address and list(ucx_receiver._connections) == [1]


def test_data_connection_opening_with_an_unknown_transfer_is_dropped(ucx_receiver):
    from pdserve.kvtransfer.ucx import UcxRuntime
    from pdserve.kvtransfer.ucx.tag import _recv_bytes, _send_message, new_tag
    from pdserve.wire import kv_pb2

    runtime = UcxRuntime.get()
    connection = kv_pb2.UcxConnection(worker_address=runtime.worker_address(5), tag=new_tag(),
                                      sender_id=2)
    reply = _ucx_handshake(ucx_receiver, auth.kv_handshake_key(TOKEN_FOR_KV), connection)

    async def exchange():
        ucxx = runtime.ucxx
        ep = await ucxx.create_endpoint_from_worker_address(
            ucxx.get_ucx_address_from_buffer(reply.ucx_worker_address))
        header = kv_pb2.KVTransferHeader(transfer_id="guessed", chunk_index=0,
                                         runs=[kv_pb2.BlockRun(first=1, count=1)])
        try:
            await _send_message(ep, header, connection.tag, 3)
            return kv_pb2.KVChunkReply.FromString(
                await asyncio.wait_for(_recv_bytes(ep, connection.tag ^ 1), 3))
        finally:
            ep.abort()

    goodbye = runtime.call(exchange(), 10)  # at once, not after a timeout
    assert goodbye.status == kv_pb2.KVChunkReply.REJECTED and not goodbye.transfer_id
    assert "no expected transfer" in goodbye.error
    deadline = time.monotonic() + 5
    while ucx_receiver._connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ucx_receiver._connections  # the connection is closed, not served on