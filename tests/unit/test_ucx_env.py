"""The UCX environment a worker sets from its KV address and ports: UCX's TCP transport
listens on the KV interface only, in the data port range (issue 17, items 4 and 7)."""

from __future__ import annotations

from pdserve.kvtransfer.ucx import DATA_PORT_SPAN, data_ports_env, net_devices_env
from pdserve.services.worker import KV_PORTS


def test_loopback_address_keeps_every_worker_on_lo():
    for device in ("cpu", "cuda"):
        assert net_devices_env("127.0.0.1", device) == {"UCX_NET_DEVICES": "lo"}


def test_wildcard_or_unknown_address_leaves_ucx_alone():
    assert net_devices_env("0.0.0.0", "cpu") == {}
    assert net_devices_env("", "cuda") == {}
    assert net_devices_env("192.0.2.77", "cpu") == {}  # no interface holds it


def test_gpu_worker_on_another_address_keeps_its_rdma_ports(tmp_path, monkeypatch):
    from pdserve.kvtransfer.ucx import runtime

    for device, ports in (("mlx5_0", ("1",)), ("mlx5_1", ("1", "2"))):
        for port in ports:
            (tmp_path / device / "ports" / port).mkdir(parents=True)
    monkeypatch.setattr(runtime, "interface_of", lambda host: "eth7")
    gpu = net_devices_env("10.1.2.3", "cuda", rdma_root=str(tmp_path))
    assert gpu == {"UCX_NET_DEVICES": "eth7,mlx5_0:1,mlx5_1:1,mlx5_1:2"}
    cpu = net_devices_env("10.1.2.3", "cpu", rdma_root=str(tmp_path))
    assert cpu == {"UCX_NET_DEVICES": "eth7"}  # a host pool moves over TCP only


def test_data_port_range_follows_the_workers_port_layout():
    assert data_ports_env(0) == {}
    first, last = map(int, data_ports_env(7002)["UCX_TCP_PORT_RANGE"].split("-"))
    assert (first, last - first + 1) == (7002, DATA_PORT_SPAN)
    # --kv-port P: side channel P, control P + 1, data P + 2 .. the last of KV_PORTS
    assert KV_PORTS == 2 + DATA_PORT_SPAN
