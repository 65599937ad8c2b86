"""The in-place control channel: admit and commit chunks that same-host GPU senders write
straight into a receiver's mapped pool.

Why not the ZeroMQ side channel: every ZeroMQ message also crosses its I/O thread on
both ends, so one request/reply wakes six threads; between idle processes on a GPU VM
that measured 0.5-1.7 ms, more than the device copy of a whole prompt's KV.
Here each sender (prefill) keeps one TCP connection per receiver and a receiver thread
per connection answers in place: one wake per direction (bench/control_rtt.py).

Frames, both directions: a 4-byte big-endian length, then one protobuf message -
SideChannelRequest (admit: hold a transfer's blocks; commit: a chunk copied in place;
chunk_header: an abort notice) from the sender, SideChannelReply{chunk} back, one per request, in order (a
sender may send several requests before reading their replies). The address
is learned from an accepted handshake on the side channel (HandshakeReply
.control_address), so a peer only gets here after the version and layout checks.
A malformed frame is answered REJECTED and the connection keeps serving; an oversized
length closes the connection (the stream cannot be resynchronized).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
from typing import Callable

from google.protobuf.message import DecodeError

from pdserve.kvtransfer.base import ConnectorError
from pdserve.wire import kv_pb2

log = logging.getLogger(__name__)
FRAME_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 20   # a header lists at most a few thousand runs
IDLE_TICK_S = 0.05
# handler(request, connection id): every request of one connection comes from one sender
ChunkHandler = Callable[[kv_pb2.SideChannelRequest, int], kv_pb2.KVChunkReply]
CONTROL_KINDS = ("admit", "commit", "chunk_header")


class FrameTooLarge(ConnectionError):
    pass


class StrangerRefused(ConnectionError):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("connection closed")
        data += part
    return bytes(data)


def recv_frame(sock: socket.socket) -> bytes:
    (length,) = FRAME_LENGTH.unpack(_recv_exact(sock, FRAME_LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {length} bytes (limit {MAX_FRAME_BYTES})")
    return _recv_exact(sock, length)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(FRAME_LENGTH.pack(len(payload)) + payload)


def _no_delay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def chunk_error(message: str) -> kv_pb2.SideChannelReply:
    return kv_pb2.SideChannelReply(chunk=kv_pb2.KVChunkReply(
        status=kv_pb2.KVChunkReply.REJECTED, error=message))


class ControlServer:
    """Serves one receiver's in-place chunk requests until close(). `on_idle` runs on the
    accept thread at least every IDLE_TICK_S (the receiver expires stale admissions);
    `on_disconnect(connection id)` runs once a sender's connection is gone."""

    def __init__(self, handler: ChunkHandler, host: str = "127.0.0.1", port: int = 0,
                 on_idle: Callable[[], None] | None = None,
                 on_disconnect: Callable[[int], None] | None = None,
                 accept_first: Callable[[kv_pb2.SideChannelRequest], bool] | None = None
                 ) -> None:
        self._handler = handler
        # a connection whose first chunk request fails this (names no transfer the
        # receiver expects: transfer ids travel only in authenticated calls) is closed
        self._accept_first = accept_first or (lambda _: True)
        self._vetted: set[int] = set()  # connections whose first chunk request passed
        self._on_idle = on_idle or (lambda: None)
        self._on_disconnect = on_disconnect or (lambda _: None)
        self._next_id = 0
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(IDLE_TICK_S)
        self.address = "%s:%d" % (host, self._listener.getsockname()[1])
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kv-control",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                conn = None
            except OSError:
                break  # listener closed
            if conn is not None:
                self._start_connection(_no_delay(conn))
            self._on_idle()
        self._listener.close()

    def _start_connection(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        with self._lock:
            self._connections.add(conn)
            self._next_id += 1
        threading.Thread(target=self._serve, args=(conn, self._next_id),
                         name="kv-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, conn_id: int) -> None:
        try:
            while True:
                reply = self._answer(recv_frame(conn), conn_id)
                send_frame(conn, reply.SerializeToString())
        except (FrameTooLarge, StrangerRefused) as exc:
            log.warning("KV control channel: %s; closing the connection", exc)
            _try_send(conn, chunk_error(str(exc)))
        except OSError:
            pass  # peer closed, or close() shut the socket down
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._vetted.discard(conn_id)
            conn.close()
            self._disconnected(conn_id)

    def _disconnected(self, conn_id: int) -> None:
        try:
            self._on_disconnect(conn_id)
        except Exception:  # pragma: no cover - a bug; the server keeps serving
            log.exception("KV control disconnect handler failed")

    def _answer(self, payload: bytes, conn_id: int) -> kv_pb2.SideChannelReply:
        try:
            request = kv_pb2.SideChannelRequest.FromString(payload)
        except Exception as exc:
            return chunk_error(f"malformed control request: {exc}")
        kind = request.WhichOneof("kind")
        if kind not in CONTROL_KINDS:
            return chunk_error(f"control request {kind!r} is not served here "
                               "(handshakes go to the side channel)")
        self._vet(request, conn_id)
        try:
            return kv_pb2.SideChannelReply(chunk=self._handler(request, conn_id))
        except Exception as exc:  # one bad chunk must not stop the channel
            log.exception("KV control %s request failed", kind)
            return chunk_error(f"{kind} failed on the receiver: {type(exc).__name__}: {exc}")

    def _vet(self, request: kv_pb2.SideChannelRequest, conn_id: int) -> None:
        if conn_id in self._vetted:
            return
        if not self._accept_first(request):
            raise StrangerRefused("the first chunk request names no transfer this receiver "
                                  "expects")
        with self._lock:
            self._vetted.add(conn_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread blocked in recv
            except OSError:
                pass


def _try_send(conn: socket.socket, reply: kv_pb2.SideChannelReply) -> None:
    try:
        send_frame(conn, reply.SerializeToString())
    except OSError:
        pass


class ControlClient:
    """One connection to a receiver's ControlServer. Not thread-safe: its calls must not
    overlap (the in-place sender runs them one at a time, on its SerialThread or inline).
    A request that fails or times out closes the connection (a late reply would be taken
    for the next request's) and raises ConnectorError; the next request reconnects, in a
    new `session`: the receiver forgets what the closed connection held."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.session = 0      # counts connections made; 0 = none yet
        self._sock: socket.socket | None = None

    def call(self, request: kv_pb2.SideChannelRequest) -> kv_pb2.SideChannelReply:
        self.send(request)
        return self.receive()

    def send(self, request: kv_pb2.SideChannelRequest) -> None:
        """Send without reading the reply: receive() gets replies in request order."""
        self._guarded(lambda: send_frame(self._sock or self._connect(),
                                         request.SerializeToString()))

    def receive(self) -> kv_pb2.SideChannelReply:
        if self._sock is None:
            raise ConnectorError(f"KV control channel {self.address}: no request pending")
        return self._guarded(lambda: kv_pb2.SideChannelReply.FromString(
            recv_frame(self._sock)))

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def peer_closed(self) -> bool:
        """True once the receiver closed this connection (it died, and may be back on the
        same port): a readable socket whose peek finds the end. Reads nothing, so it may
        run beside the thread that uses the connection."""
        sock = self._sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or closed meanwhile
            return True

    def _guarded(self, step):
        try:
            return step()
        except (OSError, DecodeError) as exc:   # timeouts, resets, refused; bad framing
            self.close()
            raise ConnectorError(f"KV control channel {self.address} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc

    def _connect(self) -> socket.socket:
        host, port = self.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        sock.settimeout(self.timeout_s)
        self._sock = _no_delay(sock)
        self.session += 1
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
