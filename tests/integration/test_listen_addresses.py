"""Every listener of the router and the workers is bound to the configured interface
(127.0.0.1 here), not to the wildcard or an external address (issue 17, item 7): UCX
included, which has no listener of its own (endpoints from worker addresses) and whose
TCP transport listens on the --kv-host interface, in the data port range.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pdserve.services.launcher import Cluster, ClusterSpec
from tests.integration.test_restart_recovery import free_ports

pytestmark = pytest.mark.slow


def _hex_address(field: str) -> tuple[str, int]:
    host, port = field.split(":")
    if len(host) == 8:  # IPv4, little-endian
        address = socket.inet_ntop(socket.AF_INET, bytes.fromhex(host)[::-1])
    else:  # IPv6: four little-endian 32-bit words
        raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, 32, 8))
        address = socket.inet_ntop(socket.AF_INET6, raw).removeprefix("::ffff:")  # v4-mapped
    return address, int(port, 16)


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process pid holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(_hex_address(fields[1]))
    return found


def test_every_listener_is_on_the_configured_interface():
    kv = free_ports(20)  # kv .. kv + 17 for the KV listeners
    metrics, http = kv + 18, kv + 19
    spec = ClusterSpec(connector="ucx", http_port=http,
                       decode_args=("--kv-port", str(kv), "--metrics-port", str(metrics)))
    with Cluster(spec) as cluster:
        cluster.start()
        seen = {p.name: listening(p.popen.pid) for p in cluster.procs}
    decode = seen["decode-0"]
    # the decode worker's gRPC, metrics, ZeroMQ side channel and control channel
    assert {("127.0.0.1", metrics), ("127.0.0.1", kv), ("127.0.0.1", kv + 1)} <= decode
    # and UCX's TCP transport, in its data range
    assert any(host == "127.0.0.1" and kv + 2 <= port <= kv + 17 for host, port in decode)
    assert ("127.0.0.1", http) in seen["router"]
    stray = {name: sorted(a for a in addrs if a[0] != "127.0.0.1")
             for name, addrs in seen.items()}
    assert not any(stray.values()), f"listeners off 127.0.0.1: {stray}"
