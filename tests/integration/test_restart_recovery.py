"""A decode worker killed with SIGKILL and restarted at once on its fixed ports (issue 17,
items 4 and 5): it binds its UCX listener although the last process's connections sit
in TIME-WAIT there, and the router routes to it within 2 s of its READY (health
SERVING); the router's /health never says 200 while requests to it would fail."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from pdserve.services.launcher import Backoff, Cluster, ClusterSpec
from tests.support.cluster import run_request

PROMPT = list(range(1, 40))


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def http_health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_for(predicate, timeout_s: float, what: str, tick_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(tick_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# UCX's data transport as a worker with --kv-port sets it up (pdserve's UCX runtime and
# environment: its TCP transport listens in the data port range), and a peer that keeps
# an endpoint to its worker address with a message sent, as a prefill worker does.
DATA_SIDE = """
import sys
from pdserve.kvtransfer.ucx import UcxRuntime
rt = UcxRuntime.get("cpu", True, "127.0.0.1", int(sys.argv[1]))
try:
    address = rt.worker_address(10)
except Exception as exc:
    print("FAILED", type(exc).__name__, exc, flush=True)
    sys.exit(1)
print("READY " + address.hex(), flush=True)
sys.stdin.read()
"""
PEER = """
import sys
import numpy as np
from pdserve.kvtransfer.ucx import UcxRuntime
rt = UcxRuntime.get("cpu", True, "127.0.0.1")
async def connect():
    ucxx = rt.ucxx
    ep = await ucxx.create_endpoint_from_worker_address(
        ucxx.get_ucx_address_from_buffer(bytes.fromhex(sys.argv[1])))
    await ep.send(np.zeros(8, dtype=np.uint8), tag=2, force_tag=True)
    return ep
ep = rt.call(connect(), 10)
print("CONNECTED", flush=True)
sys.stdin.read()
"""


def start(script: str, arg: str, expect: str) -> tuple[subprocess.Popen, str]:
    """The process and the rest of its first line, which must begin with expect."""
    proc = subprocess.Popen([sys.executable, "-c", script, arg], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith(expect):
        proc.kill()
        proc.wait()
        raise AssertionError(f"expected {expect}, got {line!r}")
    return proc, line[len(expect):].strip()


def test_control_client_sees_its_receiver_gone():
    """A same-host GPU sender's control connection tells when its receiver died, so the
    sender handshakes the restarted one instead of failing a transfer on the old one."""
    from pdserve.kvtransfer.control import ControlClient, ControlServer
    from pdserve.wire import kv_pb2

    server = ControlServer(lambda request, conn: kv_pb2.KVChunkReply(
        status=kv_pb2.KVChunkReply.ACCEPTED), accept_first=lambda _: True)
    client = ControlClient(server.address, timeout_s=5)
    try:
        reply = client.call(kv_pb2.SideChannelRequest(
            admit=kv_pb2.InPlaceAdmit(version=1, transfer_id="t")))
        assert reply.chunk.status == kv_pb2.KVChunkReply.ACCEPTED
        assert not client.peer_closed()
        server.close()
        wait_for(client.peer_closed, 5, "the client to see the connection end")
    finally:
        client.close()
        server.close()


@pytest.mark.slow
def test_ucx_data_side_restarts_at_once_in_its_port_range_after_sigkill():
    """A worker's UCX TCP transport holds a port of its range with a peer connected;
    killed and restarted at once it comes up (its old port sits in TIME-WAIT: with one
    fixed port this failed with UCXXBusyError for ~60 s)."""
    port = free_ports(16)
    data_side, address = start(DATA_SIDE, str(port), "READY")
    peer, _ = start(PEER, address, "CONNECTED")
    again = None
    try:
        data_side.send_signal(signal.SIGKILL)
        data_side.wait()
        time.sleep(0.5)  # the peer's side notices; the dead side's socket lingers
        again, _ = start(DATA_SIDE, str(port), "READY")
    finally:
        for proc in (data_side, peer, again):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_decode_restart_on_fixed_kv_port_is_routed_within_2s():
    kv = free_ports(19)  # kv .. kv + 17 for the KV listeners
    http_port = kv + 18
    spec = ClusterSpec(connector="ucx", http_port=http_port,
                       decode_args=("--kv-port", str(kv)),
                       backoff=Backoff(first_s=0.1))
    with Cluster(spec) as cluster:
        address = cluster.start()
        cluster.supervise()
        # a disaggregated request: the prefill worker's UCX endpoint to the decode worker
        assert len(run_request(address, PROMPT)[0]) == 12
        decode = cluster.proc("decode-0")
        old_pid = decode.popen.pid
        cluster.kill("decode-0")
        wait_for(lambda: http_health(http_port) == 503, 10, "/health to notice the death")
        wait_for(lambda: decode.popen.pid != old_pid and decode.ready_at, 90,
                 "the restarted decode worker's READY (it must bind its fixed KV ports)")
        assert decode.restarts == 1, "the restarted worker died again (port busy?)"
        ready_at = decode.ready_at
        # /health turns 200 only when requests are routed there too
        wait_for(lambda: http_health(http_port) == 200, 10, "/health 200 again")
        healthy_s = time.monotonic() - ready_at
        tokens, last = run_request(address, PROMPT)
        routed_s = time.monotonic() - ready_at
        assert len(tokens) == 12 and last.decode_worker == decode.address
        # routed within 2 s of SERVING; the request itself (disaggregated, CPU) takes ~1 s
        assert routed_s - last.timing.e2e_seconds < 2.0, \
            f"/health 200 {healthy_s:.2f} s, request served {routed_s:.2f} s after READY " \
            f"(its own e2e {last.timing.e2e_seconds:.2f} s, ttft {last.timing.ttft_seconds:.2f} s)"
        assert decode.restarts == 1
