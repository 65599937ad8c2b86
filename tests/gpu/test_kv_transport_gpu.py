"""The transport the ucx connector reports on GPUs, end to end through `pdserve up`-style
clusters: one GPU (both workers on it) -> cuda_ipc, written in place; two GPUs placed
one worker each (ClusterSpec.gpus, as `pdserve up --gpus 0,1`) -> cuda_ipc with peer
access, and the tokens equal the colocated path's. Each reads the prefill worker's log
line and its /metrics gauge."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch

from pdserve.engine.sampling import SamplingParams
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import generate_pb2
from tests.support.cluster import run_request, wait_pools_free

pytestmark = pytest.mark.gpu
pytest.importorskip("ucxx")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

ARGS = ("--attention-backend", "triton", "--dtype", "float32", "--num-blocks", "2048",
        "--max-batch-tokens", "256", "--no-cuda-graphs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transports_reported(cluster: Cluster, metrics_port: int) -> tuple[list[str], list[str]]:
    """(log lines "KV to peer ..." of prefill-0, its kv_transfer_transport_info lines)"""
    log = (cluster.log_dir / "prefill-0.log").read_text(errors="replace")
    said = [line for line in log.splitlines() if "KV to peer" in line]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
                                  ).read().decode()
    gauge = [line for line in text.splitlines()
             if line.startswith("pdserve:kv_transfer_transport_info{")]
    return said, gauge


def run_and_compare(spec: Cluster, metrics_port: int):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 40000, (n,), generator=g).tolist() for n in (40, 700)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with Cluster(spec) as cluster:
        address = cluster.start(timeout_s=300)
        for prompt in prompts:
            disagg, last = run_request(address, prompt, params)
            assert last.prefill_worker
            local, _ = run_request(address, prompt, params,
                                   mode=generate_pb2.DISAGGREGATION_NEVER)
            assert disagg == local
        wait_pools_free(cluster)
        return transports_reported(cluster, metrics_port)


def test_one_gpu_same_device_reports_cuda_ipc():
    port = free_port()
    spec = ClusterSpec(connector="ucx", model="synthetic:smollm2-135m", device="cuda",
                       worker_args=ARGS, prefill_args=("--metrics-port", str(port)))
    said, gauge = run_and_compare(spec, port)
    assert len(said) == 1 and " over cuda_ipc " in said[0] and "WARNING" not in said[0], said
    assert len(gauge) == 1 and 'transport="cuda_ipc"' in gauge[0], gauge


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_one_worker_each_report_cuda_ipc_with_peer_access():
    port = free_port()
    spec = ClusterSpec(connector="ucx", model="synthetic:smollm2-135m", device="auto",
                       worker_args=ARGS, prefill_args=("--metrics-port", str(port)),
                       gpus=(0, 1))
    said, gauge = run_and_compare(spec, port)
    assert len(said) == 1 and " over cuda_ipc " in said[0], said
    assert 'transport="cuda_ipc"' in gauge[0], gauge


def test_gpu_list_places_workers_through_the_launcher():
    """`--gpus 0` (every worker on GPU 0, as `pdserve up --gpus 0`): each child runs on
    cuda:0 with CUDA_VISIBLE_DEVICES naming that GPU, and disaggregation still equals
    the colocated path."""
    port = free_port()
    spec = ClusterSpec(connector="ucx", model="synthetic:smollm2-135m", device="auto",
                       worker_args=ARGS, prefill_args=("--metrics-port", str(port)),
                       gpus=(0,))
    said, gauge = run_and_compare(spec, port)
    assert " over cuda_ipc " in said[0] and 'transport="cuda_ipc"' in gauge[0]
    cluster = Cluster(spec)
    envs = {p.name: dict(p.env) for p in cluster.placement.values()}
    assert all(e["CUDA_VISIBLE_DEVICES"].split(",")[0] == envs["prefill-0"][
        "CUDA_VISIBLE_DEVICES"].split(",")[0] for e in envs.values())
