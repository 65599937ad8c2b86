"""First contact between two workers over a ZeroMQ side channel.

The receiving side (decode) runs a SideChannelServer: a ROUTER socket served by one
thread. A sender (prefill) calls `request_handshake(address, hello)` once per peer: it
sends HandshakeRequest{hello}, the server compares both KVHandshakes and answers
HandshakeReply{accepted, error, hello, data_address}. Both sides check, so a mismatch is
refused at connect time with an error naming both values. Messages are protobuf only.
"""

from __future__ import annotations

import threading

import zmq

from pdserve.kvtransfer.base import ConnectorError, HandshakeError
from pdserve.kvtransfer.messages import HandshakeInfo, check_handshake, handshake_mismatches
from pdserve.wire import kv_pb2


class SideChannelServer:
    """Answers handshakes for one receiver until close()."""

    def __init__(self, hello: HandshakeInfo, data_address: str, host: str = "127.0.0.1",
                 port: int = 0, export: dict | None = None) -> None:
        self.hello = hello
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
            if not poller.poll(50):
                continue
            identity, payload = self._recv_request()
            self._socket.send_multipart([identity, b"", self._answer(payload)])
        self._socket.close(0)

    def _recv_request(self) -> tuple[bytes, bytes]:
        frames = self._socket.recv_multipart()
        return frames[0], frames[-1]   # identity, [empty delimiter,] request

    def _answer(self, payload: bytes) -> bytes:
        reply = kv_pb2.HandshakeReply(hello=self.hello.to_proto(),
                                      data_address=self.data_address, **self.export)
        try:
            remote = HandshakeInfo.from_proto(kv_pb2.HandshakeRequest.FromString(payload).hello)
        except Exception as exc:  # malformed request: refuse, keep serving
            reply.error = f"malformed handshake request: {exc}"
            return reply.SerializeToString()
        problems = handshake_mismatches(self.hello, remote)
        reply.accepted = not problems
        if problems:
            reply.error = "KV handshake refused: " + "; ".join(problems)
            self.refused.append(reply.error)
        return reply.SerializeToString()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def request_handshake(address: str, hello: HandshakeInfo,
                      timeout_s: float = 5.0) -> kv_pb2.HandshakeReply:
    """Handshake with the SideChannelServer at address. Returns the accepted reply;
    raises HandshakeError on refusal, ConnectorError when nobody answers."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        socket.connect(address)
        socket.send(kv_pb2.HandshakeRequest(hello=hello.to_proto()).SerializeToString())
        reply = kv_pb2.HandshakeReply.FromString(socket.recv())
    except zmq.Again as exc:
        raise ConnectorError(f"KV side channel {address} did not answer the handshake "
                             f"within {timeout_s:g}s") from exc
    finally:
        socket.close(0)
    if not reply.accepted:
        raise HandshakeError(reply.error or f"KV handshake refused by {address}")
    check_handshake(hello, HandshakeInfo.from_proto(reply.hello))
    return reply
