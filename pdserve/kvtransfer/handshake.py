"""A receiver's ZeroMQ side channel: first contact between a sender and a receiver.

The receiving side (decode) runs a SideChannelServer: a ROUTER socket served by one
thread. Every request is a SideChannelRequest envelope, answered by a SideChannelReply.
A sender (prefill) calls `request_handshake(address, hello)` once per peer; the server
compares both KVHandshakes and answers HandshakeReply{accepted, error, hello,
data_address, ...}. Both sides check, so a mismatch is refused at connect time naming
both values. The reply also names where the rest of the conversation goes (the ucx data
listener; for same-host GPU peers the pool's IPC handle and the control channel,
control.py). Messages are protobuf only; a malformed request is answered with an error
and the server keeps serving.

Authentication (a `key` derived from the cluster's internal token, services/auth.py):
the sender's HandshakeAuth carries a fresh nonce, its clock and an HMAC over both and
its hello; the receiver checks it (constant time, a minute of clock skew, nonces not
reused) before anything else, and an unauthenticated peer learns nothing, not even
the data or control address. An accepted reply carries the receiver's HMAC over the
sender's nonce and the reply, so the sender knows it reached a peer holding the same
token. The token itself never crosses the wire. Without a key either side runs open,
and a sender with a key refuses a receiver that cannot prove it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time

import zmq

from pdserve.kvtransfer.base import ConnectorError, HandshakeError
from pdserve.kvtransfer.messages import HandshakeInfo, check_handshake, handshake_mismatches
from pdserve.wire import kv_pb2

log = logging.getLogger(__name__)
IDLE_POLL_MS = 50
NONCE_BYTES = 16
MAX_CLOCK_SKEW_S = 60.0
_REQUEST_LABEL = b"pdserve-kv-handshake-request\0"
_REPLY_LABEL = b"pdserve-kv-handshake-reply\0"


def request_mac(key: bytes, auth: kv_pb2.HandshakeAuth, request: kv_pb2.HandshakeRequest) -> bytes:
    """Covers the hello and the sender's UCX connection: neither can be swapped in transit."""
    body = auth.nonce + auth.unix_ms.to_bytes(8, "big") + \
        request.hello.SerializeToString(deterministic=True)
    if request.HasField("ucx"):
        body += request.ucx.SerializeToString(deterministic=True)
    return hmac.new(key, _REQUEST_LABEL + body, hashlib.sha256).digest()


def reply_mac(key: bytes, nonce: bytes, reply: kv_pb2.HandshakeReply) -> bytes:
    unsigned = kv_pb2.HandshakeReply()
    unsigned.CopyFrom(reply)
    unsigned.ClearField("auth_mac")
    body = nonce + unsigned.SerializeToString(deterministic=True)
    return hmac.new(key, _REPLY_LABEL + body, hashlib.sha256).digest()


def sign_request(key: bytes, request: kv_pb2.HandshakeRequest) -> kv_pb2.HandshakeAuth:
    auth = kv_pb2.HandshakeAuth(nonce=os.urandom(NONCE_BYTES), unix_ms=int(time.time() * 1000))
    auth.mac = request_mac(key, auth, request)
    return auth


class NonceWindow:
    """Nonces accepted within the clock-skew window: a replayed request is refused."""

    def __init__(self, window_s: float = MAX_CLOCK_SKEW_S) -> None:
        self.window_s = window_s
        self._seen: dict[bytes, float] = {}

    def fresh(self, nonce: bytes, now: float) -> bool:
        if len(self._seen) > 1024:  # bounded: drop what fell out of the window
            self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * self.window_s}
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


class SideChannelServer:
    """Answers side-channel requests for one receiver until close()."""

    def __init__(self, hello: HandshakeInfo, data_address: str, host: str = "127.0.0.1",
                 port: int = 0, export: dict | None = None, key: bytes | None = None,
                 on_accept=None) -> None:
        self.hello = hello
        # on_accept(request) -> extra HandshakeReply fields, called on this server's
        # thread for an accepted handshake (the ucx receiver connects back to the sender
        # there); what it raises refuses the handshake
        self._on_accept = on_accept
        self._key = key  # None: open (no internal token)
        self._nonces = NonceWindow()
        self.data_address = data_address
        self.export = export or {}  # extra HandshakeReply fields (e.g. the pool's IPC handle)
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if port:
            self._socket.bind(f"tcp://{host}:{port}")
        else:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-side-channel", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(IDLE_POLL_MS):
                frames = self._socket.recv_multipart()
                identity, payload = frames[0], frames[-1]  # [empty delimiter] between
                self._socket.send_multipart([identity, b"", self._answer(payload)])
        self._socket.close(0)

    def _answer(self, payload: bytes) -> bytes:
        try:
            request = kv_pb2.SideChannelRequest.FromString(payload)
        except Exception as exc:
            return _chunk_error(f"malformed side-channel request: {exc}")
        kind = request.WhichOneof("kind")
        if kind != "handshake":
            return _chunk_error(f"side-channel request {kind!r} is not served here (in-place "
                                "chunks go to HandshakeReply.control_address)")
        return kv_pb2.SideChannelReply(
            handshake=self._handshake(request.handshake)).SerializeToString()

    def _handshake(self, request: kv_pb2.HandshakeRequest) -> kv_pb2.HandshakeReply:
        refusal = self._authenticate(request)
        if refusal:  # says nothing about this receiver: no hello, no addresses
            self.refused.append(refusal)
            log.warning("%s", refusal)
            return kv_pb2.HandshakeReply(accepted=False, error=refusal)
        reply = kv_pb2.HandshakeReply(hello=self.hello.to_proto(),
                                      data_address=self.data_address, **self.export)
        try:
            remote = HandshakeInfo.from_proto(request.hello)
        except Exception as exc:  # malformed hello: refuse, keep serving
            reply.error = f"malformed handshake request: {exc}"
            return reply
        problems = handshake_mismatches(self.hello, remote) or self._accepted(request, reply)
        reply.accepted = not problems
        if problems:
            reply.error = "KV handshake refused: " + "; ".join(problems)
            self.refused.append(reply.error)
        elif self._key is not None:
            reply.auth_mac = reply_mac(self._key, request.auth.nonce, reply)
        return reply

    def _accepted(self, request: kv_pb2.HandshakeRequest,
                  reply: kv_pb2.HandshakeReply) -> list[str]:
        """Run the on_accept hook; its fields go into the reply, what it raises refuses."""
        if self._on_accept is None:
            return []
        try:
            fields = self._on_accept(request)
        except Exception as exc:
            return [f"{type(exc).__name__}: {exc}"]
        for name, value in fields.items():
            setattr(reply, name, value)
        return []

    def _authenticate(self, request: kv_pb2.HandshakeRequest) -> str:
        """Why the request is refused ("" = accepted or no key here)."""
        if self._key is None:
            return ""
        if not request.HasField("auth"):
            return ("KV handshake refused: this receiver requires the cluster's internal "
                    "token and the sender sent no proof of it")
        auth = request.auth
        expected = request_mac(self._key, auth, request)
        if len(auth.nonce) != NONCE_BYTES or not hmac.compare_digest(auth.mac, expected):
            return "KV handshake refused: wrong internal token (the sender's proof does not match)"
        now = time.time()
        if abs(now - auth.unix_ms / 1000) > MAX_CLOCK_SKEW_S:
            return (f"KV handshake refused: the sender's clock is {now - auth.unix_ms / 1000:+.0f} s "
                    f"off (at most {MAX_CLOCK_SKEW_S:g} s)")
        if not self._nonces.fresh(auth.nonce, now):
            return "KV handshake refused: replayed request (its nonce was used before)"
        return ""

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _chunk_error(message: str) -> bytes:
    return kv_pb2.SideChannelReply(chunk=kv_pb2.KVChunkReply(
        status=kv_pb2.KVChunkReply.REJECTED, error=message)).SerializeToString()


class SideChannelClient:
    """A REQ socket to one receiver's side channel. Not thread-safe: one thread uses it.
    A request that times out leaves REQ unusable, so the socket is then replaced."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._socket = None

    def call(self, request: kv_pb2.SideChannelRequest) -> kv_pb2.SideChannelReply:
        socket = self._socket or self._connect()
        try:
            socket.send(request.SerializeToString())
            return kv_pb2.SideChannelReply.FromString(socket.recv())
        except zmq.Again as exc:
            self.close()
            raise ConnectorError(f"KV side channel {self.address} did not answer within "
                                 f"{self.timeout_s:g}s") from exc

    def _connect(self):
        socket = zmq.Context.instance().socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, int(self.timeout_s * 1000))
        socket.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        socket.connect(self.address)
        self._socket = socket
        return socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None


def request_handshake(address: str, hello: HandshakeInfo, timeout_s: float = 5.0,
                      key: bytes | None = None,
                      ucx: kv_pb2.UcxConnection | None = None) -> kv_pb2.HandshakeReply:
    """Handshake with the SideChannelServer at address (authenticated both ways with a
    key). Returns the accepted reply; raises HandshakeError on refusal or when the
    receiver cannot prove the key, ConnectorError when nobody answers."""
    client = SideChannelClient(address, timeout_s)
    request = kv_pb2.HandshakeRequest(hello=hello.to_proto(), ucx=ucx)
    if key is not None:
        request.auth.CopyFrom(sign_request(key, request))
    try:
        answer = client.call(kv_pb2.SideChannelRequest(handshake=request))
    except ConnectorError as exc:
        raise ConnectorError(f"KV side channel {address} did not answer the handshake "
                             f"within {timeout_s:g}s") from exc
    finally:
        client.close()
    if answer.WhichOneof("kind") != "handshake":
        raise HandshakeError(f"KV side channel {address} refused the handshake: "
                             f"{answer.chunk.error}")
    reply = answer.handshake
    if not reply.accepted:
        raise HandshakeError(reply.error or f"KV handshake refused by {address}")
    if key is not None and not hmac.compare_digest(
            reply.auth_mac, reply_mac(key, request.auth.nonce, reply)):
        raise HandshakeError(f"KV handshake with {address} refused: the receiver did not "
                             "prove the cluster's internal token (it has another one, or none)")
    check_handshake(hello, HandshakeInfo.from_proto(reply.hello))
    return reply
