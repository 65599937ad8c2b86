"""The ucx connector reports the transport it actually uses to each peer: logged once
at handshake and exposed as pdserve:kv_transfer_transport_info. On host memory with the
connector's defaults (UCX_TLS=tcp) that is ucx-tcp, read from UCX's own endpoint lanes."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

from pdserve.kvtransfer import TransferState, make_receiver, make_sender
from pdserve.kvtransfer.transport_report import classify, endpoint_transports
from pdserve.metrics import kv_transfer_metrics, kv_transports, new_registry, render
from tests.integration.test_connectors import DST, SPEC, SRC, hello, random_pool

pytest.importorskip("ucxx")


@pytest.fixture
def ucx_pair():
    from pdserve.engine.kvcache.pool import KVCachePool
    from pdserve.kvtransfer.ucx import UcxSettings

    settings = UcxSettings(io_timeout_s=5.0)
    dst_pool = KVCachePool(SPEC)
    receiver = make_receiver("ucx", dst_pool, hello("ucx", "decode"), settings)
    sender = make_sender("ucx", random_pool(seed=3), hello("ucx", "prefill"), settings)
    yield sender, receiver, dst_pool
    sender.close()
    receiver.close()


def test_host_memory_transport_is_reported_once_from_the_endpoints_lanes(ucx_pair, caplog):
    sender, receiver, dst_pool = ucx_pair
    registry = new_registry()
    kv_transfer_metrics(registry, "ucx", "prefill")
    with caplog.at_level(logging.INFO, logger="pdserve.kvtransfer.ucx"):
        sender.connect(receiver.address)
        peer = sender._peer(receiver.address)
        lanes = sender.runtime.call(sender._lanes(peer), 5)
        # what UCX says it uses, not what was configured: every lane is a tcp one here
        assert lanes and {t for t, _ in lanes} == {"tcp"}, lanes
        destination = receiver.expect("t1", DST)
        sender.begin(destination)
        sender.send_chunk("t1", SRC, start=0, last=True)
        assert sender.wait("t1", 10).state is TransferState.DONE
        assert torch.equal(dst_pool.read_blocks(DST), sender.pool.read_blocks(SRC))
        sender.connect(receiver.address)  # known peer: no second report
    said = [r for r in caplog.records if f"KV to peer {receiver.address}" in r.getMessage()]
    assert len(said) == 1 and " over ucx-tcp " in said[0].getMessage()
    assert said[0].levelno == logging.INFO  # host memory over TCP is expected, not a warning
    assert kv_transports()[receiver.address] == "ucx-tcp"
    text = render(registry).decode()
    line = next(l for l in text.splitlines()
                if l.startswith("pdserve:kv_transfer_transport_info{")
                and f'peer="{receiver.address}"' in l)
    assert 'transport="ucx-tcp"' in line and line.endswith(" 1.0")


@pytest.mark.parametrize("lanes, label", [
    ([("rc_mlx5", "mlx5_0:1"), ("cuda_copy", "cuda"), ("tcp", "eth0")], "ucx-rc"),
    ([("cuda_ipc", "cuda"), ("cuda_copy", "cuda"), ("tcp", "lo")], "ucx-cuda_ipc"),
    ([("tcp", "lo"), ("cuda_copy", "cuda")], "ucx-tcp"),
    ([("posix", "memory"), ("tcp", "lo")], "ucx-sm"),
    ([("dc_mlx5", "mlx5_0:1")], "ucx-rc"),
    ([], "ucx"),
])
def test_lane_classification(lanes, label):
    assert classify(lanes) == label


def test_gpu_kv_over_tcp_is_a_warning(caplog):
    from pdserve.kvtransfer.transport_report import report

    tcp, rc = f"10.0.0.9:{uuid.uuid4().hex[:6]}", f"10.0.0.8:{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.INFO, logger="pdserve.kvtransfer.ucx"):
        report(tcp, "ucx-tcp", gpu_pool=True, detail="lanes tcp/eth0")
        report(tcp, "ucx-tcp", gpu_pool=True)  # once per peer
        report(rc, "ucx-rc", gpu_pool=True)
    said = [(r.getMessage().split(" over ")[0], r.levelno) for r in caplog.records]
    assert said == [(f"KV to peer {tcp}", logging.WARNING), (f"KV to peer {rc}", logging.INFO)]


def test_unqueryable_endpoint_reports_nothing_known():
    assert endpoint_transports(object()) == []


def test_peer_pool_of_another_size_maps_as_whole_blocks_of_ours():
    from pdserve.kvtransfer.cuda_ipc import remote_num_blocks

    pool = random_pool()
    block = pool.kv[0].numel() * pool.kv.element_size()
    assert remote_num_blocks(block * 100, pool) == 100  # a bigger peer pool still maps
    assert remote_num_blocks(block * 100 + 2, pool) is None


def test_in_place_copy_with_remote_pool_on_host_is_byte_exact():
    from pdserve.kvtransfer.cuda_ipc import RemotePool

    source, target = random_pool(seed=5), random_pool(seed=6)
    remote = RemotePool(target.kv, None)
    assert remote.copy_device is None  # a host pool: copies run on return
    remote.queue_copy_runs(source.kv, [(3, 10, 3), (20, 40, 4)], None)
    assert torch.equal(target.read_blocks([10, 11, 12, 40, 41, 42, 43]),
                       source.read_blocks([3, 4, 5, 20, 21, 22, 23]))
