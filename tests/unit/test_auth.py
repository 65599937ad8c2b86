"""Internal authentication pieces on their own: the token's sources, the gRPC server
interceptor against real aio servers and channels (no model), the KV handshake's HMACs
over a real ZeroMQ side channel, and Valkey's password."""

from __future__ import annotations

import asyncio
import os
import stat

import grpc
import pytest

from pdserve.services import auth
from pdserve.services.auth import InternalAuth
from pdserve.services.common import internal_channel, new_server
from pdserve.wire import generate_pb2, worker_pb2, worker_pb2_grpc

TOKEN = auth.new_token()


# ---- tokens --------------------------------------------------------------------------
def test_token_file_wins_over_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.setenv(auth.TOKEN_ENV, "x" * 40)
    assert InternalAuth.from_env(str(path)).load().token == TOKEN  # stripped
    assert InternalAuth.from_env(None).load().token == "x" * 40
    monkeypatch.delenv(auth.TOKEN_ENV)
    assert InternalAuth.from_env(None).load().token is None


@pytest.mark.parametrize("content, message", [("short", "too short"), (None, "cannot read")])
def test_bad_token_files_are_refused_with_a_message(tmp_path, content, message):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        InternalAuth(token_file=str(path)).load()


def test_token_never_shows_in_settings_repr():
    from pdserve.services.worker import WorkerSettings

    settings = WorkerSettings(role="decode", internal_auth=InternalAuth(token=TOKEN))
    assert TOKEN not in repr(settings)


def test_derived_secrets_differ_by_purpose_and_token():
    other = auth.new_token()
    assert auth.grpc_credential(TOKEN) != auth.grpc_credential(other)
    assert auth.kv_handshake_key(TOKEN) != auth.derive_key(TOKEN, "grpc")
    assert TOKEN not in auth.grpc_credential(TOKEN) + auth.valkey_password(TOKEN)


# ---- gRPC ----------------------------------------------------------------------------
class _Decode(worker_pb2_grpc.DecodeServiceServicer):
    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(worker_id="w")

    async def Generate(self, request, context):
        yield generate_pb2.GenerateChunk(request_id=request.request_id, token_ids=[7])


async def _serve(token):
    server, health = new_server(["pdserve.v1.DecodeService"], token)
    worker_pb2_grpc.add_DecodeServiceServicer_to_server(_Decode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, health, f"127.0.0.1:{port}"


async def _calls(address, token):
    """(Stats, Generate) status codes through a channel carrying token (or none)."""
    codes = []
    async with internal_channel(address, None, internal_token=token) as channel:
        stub = worker_pb2_grpc.DecodeServiceStub(channel)
        for call in (lambda: stub.Stats(worker_pb2.StatsRequest(), timeout=5),
                     lambda: _drain(stub.Generate(worker_pb2.DecodeRequest(request_id="r"),
                                                  timeout=5))):
            try:
                await call()
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                    assert "internal token" in exc.details()
    return codes


async def _drain(call):
    return [c async for c in call]


def test_worker_calls_need_the_token_but_health_stays_open():
    async def main():
        server, health, address = await _serve(TOKEN)
        try:
            ok, unauth = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
            assert await _calls(address, TOKEN) == [ok, ok]
            assert await _calls(address, None) == [unauth, unauth]
            assert await _calls(address, auth.new_token()) == [unauth, unauth]
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            async with grpc.aio.insecure_channel(address) as ch:  # no token at all
                reply = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status is not None
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_without_a_token_the_server_is_open():
    async def main():
        server, _, address = await _serve(None)
        try:
            assert await _calls(address, None) == [grpc.StatusCode.OK] * 2
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_blocking_channel_helper_carries_the_token():
    async def main():
        server, _, address = await _serve(TOKEN)

        def blocking(token):
            with auth.sync_channel(grpc.insecure_channel(address), token) as ch:
                return worker_pb2_grpc.DecodeServiceStub(ch).Stats(worker_pb2.StatsRequest(),
                                                                   timeout=5)
        try:
            assert (await asyncio.to_thread(blocking, TOKEN)).worker_id == "w"
            with pytest.raises(grpc.RpcError) as refused:
                await asyncio.to_thread(blocking, None)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(main())


# ---- the KV handshake ----------------------------------------------------------------
def _hello(role):
    from pdserve.kvtransfer.messages import HandshakeInfo

    return HandshakeInfo(protocol_version=3, model_fingerprint="fp", dtype="float32",
                         block_size=16, num_layers=2, num_kv_heads=2, head_dim=8,
                         layout="block_major_v1", connector="ucx", role=role, worker_id=role)


@pytest.fixture
def side_channel():
    from pdserve.kvtransfer.handshake import SideChannelServer

    servers = []

    def make(key):
        server = SideChannelServer(_hello("decode"), "127.0.0.1:1234", key=key,
                                   export={"control_address": "127.0.0.1:5678",
                                           "pool_ipc_handle": b"gpu-pool-handle"})
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.close()


def test_handshake_with_the_same_token_is_accepted_both_ways(side_channel):
    from pdserve.kvtransfer.handshake import request_handshake

    key = auth.kv_handshake_key(TOKEN)
    server = side_channel(key)
    reply = request_handshake(server.address, _hello("prefill"), key=key)
    assert reply.accepted and reply.data_address == "127.0.0.1:1234" and reply.auth_mac
    assert reply.pool_ipc_handle == b"gpu-pool-handle"


@pytest.mark.parametrize("sender_key", [None, auth.kv_handshake_key(auth.new_token())],
                         ids=["no-token", "wrong-token"])
def test_handshake_without_the_token_is_refused_and_learns_nothing(side_channel, sender_key):
    from pdserve.kvtransfer.base import HandshakeError
    from pdserve.kvtransfer.handshake import SideChannelClient, request_handshake
    from pdserve.wire import kv_pb2

    server = side_channel(auth.kv_handshake_key(TOKEN))
    with pytest.raises(HandshakeError, match="internal token"):
        request_handshake(server.address, _hello("prefill"), key=sender_key)
    client = SideChannelClient(server.address, 5)  # the raw reply: no addresses in it
    request = kv_pb2.HandshakeRequest(hello=_hello("prefill").to_proto())
    reply = client.call(kv_pb2.SideChannelRequest(handshake=request)).handshake
    client.close()
    assert not reply.accepted and not reply.data_address and not reply.control_address
    assert not reply.HasField("hello") and not reply.pool_ipc_handle  # nor the GPU pool


def test_a_signed_handshake_whose_ucx_connection_was_swapped_is_refused(side_channel):
    """The MAC covers the sender's UCX worker address: a man in the middle cannot point
    the receiver's connect-back at another worker."""
    from pdserve.kvtransfer.handshake import SideChannelClient, sign_request
    from pdserve.wire import kv_pb2

    key = auth.kv_handshake_key(TOKEN)
    server = side_channel(key)
    request = kv_pb2.HandshakeRequest(hello=_hello("prefill").to_proto(), ucx=kv_pb2.UcxConnection(
        worker_address=b"the sender's worker", tag=2, sender_id=1))
    request.auth.CopyFrom(sign_request(key, request))
    request.ucx.worker_address = b"somebody else's worker"
    client = SideChannelClient(server.address, 5)
    reply = client.call(kv_pb2.SideChannelRequest(handshake=request)).handshake
    client.close()
    assert not reply.accepted and "wrong internal token" in reply.error


def test_handshake_replay_and_an_impostor_receiver_are_refused(side_channel):
    from pdserve.kvtransfer.base import HandshakeError
    from pdserve.kvtransfer.handshake import SideChannelClient, request_handshake, sign_request
    from pdserve.wire import kv_pb2

    key = auth.kv_handshake_key(TOKEN)
    server = side_channel(key)
    request = kv_pb2.HandshakeRequest(hello=_hello("prefill").to_proto())
    request.auth.CopyFrom(sign_request(key, request))
    answers = []
    for _ in range(2):  # the same signed request twice: the second is a replay
        client = SideChannelClient(server.address, 5)
        answers.append(client.call(kv_pb2.SideChannelRequest(handshake=request)).handshake)
        client.close()
    assert answers[0].accepted and not answers[1].accepted
    assert "replayed" in answers[1].error
    open_receiver = side_channel(None)  # cannot prove the token: the sender refuses it
    with pytest.raises(HandshakeError, match="did not prove"):
        request_handshake(open_receiver.address, _hello("prefill"), key=key)


# ---- Valkey --------------------------------------------------------------------------
def test_valkey_refuses_clients_without_the_password(tmp_path):
    import redis

    from pdserve.kvtransfer.valkey_server import ValkeyServer, ValkeySettings

    password = auth.valkey_password(TOKEN)
    server = ValkeyServer(ValkeySettings(password=password, config_dir=str(tmp_path)))
    with server:
        assert password not in " ".join(server.command())  # not on the command line
        [config] = tmp_path.iterdir()
        assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url, socket_timeout=5).set("k", b"v")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url, password="wrong" * 8, socket_timeout=5).ping()
        good = redis.Redis.from_url(server.url, password=password, socket_timeout=5)
        assert good.set("k", b"v") and good.get("k") == b"v"
        assert good.config_get("protected-mode")["protected-mode"] == "yes"
    assert not list(tmp_path.iterdir())  # the password file goes with the server
