"""The UCX runtime: the transport environment UCX reads when ucxx first initializes, the
connector's settings, and the one process-wide ucxx event loop thread (the package
docstring says why each environment default is there)."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

PROGRESS_ENV = {
    "UCXPY_PROGRESS_MODE": "thread",
    "UCXPY_ENABLE_PYTHON_FUTURE": "1",
}

# UCX's TCP transport picks its listening port from a range at random and skips ports
# in use: a worker restarted at once after kill -9 finds the port of its predecessor
# busy (TIME-WAIT; UCX sets no SO_REUSEADDR there) and takes another of the range.
DATA_PORT_SPAN = 16

HOST_TRANSPORT_ENV = {
    **PROGRESS_ENV,
    "UCX_TLS": "tcp",
    "UCX_TCP_TX_SEG_SIZE": "1M",
    "UCX_TCP_RX_SEG_SIZE": "1M",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}
DEVICE_TRANSPORT_ENV = {
    **PROGRESS_ENV,
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}


@dataclass(frozen=True)
class UcxSettings:
    host: str = "127.0.0.1"          # interface to listen on and advertise
    side_channel_port: int = 0       # 0 = any free port
    data_port: int = 0               # first of DATA_PORT_SPAN ports for UCX's TCP transport
    control_port: int = 0            # in-place chunk control (same-host GPU peers)
    lease_s: float = 30.0
    connect_timeout_s: float = 5.0
    io_timeout_s: float = 30.0       # bound on each header/run/reply step of a chunk
    checksum: bool = False           # crc32 per run (costs a host pass over the bytes)
    pack_above_runs: int = 4         # more runs than this: gather into one message
    copy_runs_max: int = 32          # in-place writes: a memcpy per run up to this many
    direct_gpu: bool = True          # same-host GPU peers: write into the mapped pool
    unanswered_max: int = 8          # in-place commits sent before their replies are read
    tune_transport_env: bool = True  # apply HOST/DEVICE_TRANSPORT_ENV defaults
    # from the cluster's internal token: handshakes are authenticated both ways
    handshake_key: bytes | None = field(default=None, repr=False)


def _rearm_blocking_progress() -> None:
    """Work around ucxx 0.52's blocking progress mode (UCXPY_PROGRESS_MODE=blocking set
    by the user) spinning a core once connected.

    Its epoll reader callback progresses the worker but never re-arms it, so the
    level-triggered descriptor stays readable and asyncio calls the callback in a busy
    loop (a full core per process at idle, and GIL contention that slows the engine
    thread next to it). Re-arming from the callback, as ucx-py did, lets the loop sleep.
    """
    from ucxx._lib_async import continuous_ucx_progress as progress

    mode = progress.BlockingMode
    if getattr(mode, "_pdserve_rearm", False):
        return

    def fd_reader_callback(self) -> None:
        self.worker.progress()
        if self.arm_task is None or self.arm_task.done():
            self.arm_task = self.event_loop.create_task(self._arm_worker())

    mode._fd_reader_callback = fd_reader_callback
    mode._pdserve_rearm = True


def interface_of(host: str) -> str | None:
    """The network interface holding IPv4 address host (None if none does)."""
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(raw[20:24]) == host:
                return name
    return None


def rdma_devices(root: str = "/sys/class/infiniband") -> list[str]:
    """This machine's RDMA ports as UCX names them ("mlx5_0:1"); none without sysfs."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    found = []
    for name in names:
        try:
            found += [f"{name}:{port}" for port in sorted(os.listdir(f"{root}/{name}/ports"))]
        except OSError:
            continue
    return found


def net_devices_env(host: str, device_type: str,
                    rdma_root: str = "/sys/class/infiniband") -> dict[str, str]:
    """UCX_NET_DEVICES for a worker whose KV address is host: UCX's TCP transport then
    listens on that interface only, not on every one the machine has. A GPU worker on
    loopback has only same-host peers; on another address its RDMA devices stay usable
    (they open no TCP port)."""
    if not host or host in ("0.0.0.0", "::"):
        return {}
    try:
        name = interface_of(host)
    except OSError:
        return {}
    if name is None:
        return {}
    rdma = [] if device_type == "cpu" or host.startswith("127.") else rdma_devices(rdma_root)
    return {"UCX_NET_DEVICES": ",".join([name, *rdma])}


def data_ports_env(data_port: int) -> dict[str, str]:
    """UCX_TCP_PORT_RANGE: the worker's TCP transport listens on one of DATA_PORT_SPAN
    ports from data_port (0: any port the system gives)."""
    if not data_port:
        return {}
    return {"UCX_TCP_PORT_RANGE": f"{data_port}-{data_port + DATA_PORT_SPAN - 1}"}


class UcxRuntime:
    """The process-wide ucxx event loop thread."""

    _instance: "UcxRuntime | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls, device_type: str = "cpu", tune_env: bool = True,
            host: str = "", data_port: int = 0) -> "UcxRuntime":
        """The first call in a process sets UCX's environment (unless already set)."""
        with cls._instance_lock:
            if cls._instance is None:
                if tune_env:
                    env = {**(HOST_TRANSPORT_ENV if device_type == "cpu"
                              else DEVICE_TRANSPORT_ENV),
                           **net_devices_env(host, device_type), **data_ports_env(data_port)}
                    for key, value in env.items():
                        os.environ.setdefault(key, value)
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        import ucxx  # noqa: F401  (imported after the environment is set)

        _rearm_blocking_progress()
        self.ucxx = ucxx
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ucxx-loop",
                                        daemon=True)
        self._thread.start()

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro, timeout_s: float):
        return self.submit(coro).result(timeout_s)

    def worker_address(self, timeout_s: float) -> bytes:
        """This process' UCX worker address: what a peer makes an endpoint from."""
        async def address() -> bytes:
            return bytes(self.ucxx.get_worker_address())
        return self.call(address(), timeout_s)
