"""Round-trip time of a small control message between two processes, per transport.

The in-place KV path (same-host GPU peers) needs one control exchange per chunk, so its
latency bounds a transfer as much as the device copy does. This measures what each
candidate transport costs for a ~100-byte request and a ~20-byte reply, back to back
(gap 0) and after an idle gap (as between the chunks of a prompt being computed):

  zmq   REQ -> ROUTER served by a polling thread (the side channel's design); every
        message also crosses ZeroMQ's I/O thread on both ends
  tcp   a blocking stream socket per peer, TCP_NODELAY, length-prefixed frames
  unix  the same over an AF_UNIX socket

    python bench/control_rtt.py --iters 2000 --gaps-us 0,2000 --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.kv_transfer import git_commit, machine_info  # noqa: E402
from bench.report import write_report  # noqa: E402
from pdserve.kvtransfer.control import recv_frame, send_frame  # noqa: E402

REQUEST = b"r" * 100
REPLY = b"a" * 20


def _serve_stream(listener: socket.socket) -> None:
    """The control channel's framing (pdserve.kvtransfer.control), echoing REPLY."""
    conn, _ = listener.accept()
    if conn.family == socket.AF_INET:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            recv_frame(conn)
            send_frame(conn, REPLY)
    except ConnectionError:
        pass


def _serve_zmq(address_out) -> None:
    import zmq
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    address_out.send(f"tcp://127.0.0.1:{port}")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        if poller.poll(50):
            frames = sock.recv_multipart()
            if frames[-1] == b"stop":
                return
            sock.send_multipart([frames[0], b"", REPLY])


def server_main(transport: str, address_out) -> None:
    if transport == "zmq":
        _serve_zmq(address_out)
        return
    if transport == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        address = "%s:%d" % listener.getsockname()
    else:
        path = os.path.join(tempfile.mkdtemp(), "ctl.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        address = path
    listener.listen(1)
    address_out.send(address)
    _serve_stream(listener)


def _zmq_client(address: str):
    import zmq
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(address)

    def call() -> None:
        sock.send(REQUEST)
        sock.recv()

    def close() -> None:
        sock.send(b"stop")
        sock.close(0)
    return call, close


def _stream_client(transport: str, address: str):
    if transport == "tcp":
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)

    def call() -> None:
        send_frame(sock, REQUEST)
        recv_frame(sock)
    return call, sock.close


def _pause(gap_s: float) -> None:
    if gap_s > 0:
        time.sleep(gap_s)


def measure(transport: str, iters: int, gap_s: float) -> list[float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=server_main, args=(transport, child), daemon=True)
    server.start()
    address = parent.recv()
    call, close = _zmq_client(address) if transport == "zmq" else \
        _stream_client(transport, address)
    for _ in range(50):  # warm up
        call()
    samples = []
    for _ in range(iters):
        _pause(gap_s)
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    close()
    server.join(5)
    if server.is_alive():
        server.terminate()
    return samples


def summarize(samples: list[float]) -> dict:
    us = sorted(1e6 * s for s in samples)
    return {"median_us": round(statistics.median(us), 1),
            "p90_us": round(us[int(0.9 * (len(us) - 1))], 1),
            "p99_us": round(us[int(0.99 * (len(us) - 1))], 1),
            "min_us": round(us[0], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", default="zmq,tcp,unix")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--gaps-us", default="0,2000",
                        help="idle time before each call (comma-separated)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    results = []
    for gap_us in (int(g) for g in args.gaps_us.split(",")):
        for transport in args.transports.split(","):
            stats = summarize(measure(transport, args.iters, gap_us / 1e6))
            results.append({"transport": transport, "gap_us": gap_us, **stats})
            print(f"{transport:5s} gap {gap_us:5d} us: {stats}", file=sys.stderr)
    write_report({"bench": "control_rtt", "machine": machine_info("cpu"),
                  "commit": git_commit(), "command": " ".join(sys.argv),
                  "iters": args.iters, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
