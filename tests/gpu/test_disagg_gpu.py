"""Disaggregated serving on one GPU: KV computed by the prefill worker and moved by ucx
(cuda_ipc) must give the decode worker exactly the tokens it computes on its own."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch

from pdserve.client import make_request, open_channel
from pdserve.engine.sampling import SamplingParams
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import generate_pb2, generate_pb2_grpc
from tests.support.cluster import run_request, wait_pools_free, worker_stats

pytestmark = pytest.mark.gpu
pytest.importorskip("ucxx")


def test_ucx_on_gpu_equals_colocated():
    # fp32 and the same chunk budget on both workers: identical arithmetic on both paths
    args = ("--attention-backend", "triton", "--cuda-graphs", "--dtype", "float32",
            "--num-blocks", "2048", "--max-batch-tokens", "256")
    spec = ClusterSpec(connector="ucx", model="synthetic:smollm2-135m", device="cuda",
                       worker_args=args)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 40000, (n,), generator=g).tolist() for n in (7, 300, 1000)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    with Cluster(spec) as cluster:
        address = cluster.start(timeout_s=300)
        for prompt in prompts:
            disagg, last = run_request(address, prompt, params)
            assert last.prefill_worker
            local, _ = run_request(address, prompt, params, mode=generate_pb2.DISAGGREGATION_NEVER)
            assert disagg == local
        wait_pools_free(cluster)



def _wait_for_prefill_work(cluster, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = worker_stats(cluster.proc("prefill-0").address, "prefill", cluster.internal_token)
        if s.num_requests_running or s.num_transfers_in_flight:
            return
        time.sleep(0.005)
    raise AssertionError("the prefill worker never picked the request up")


def test_in_place_transfers_cancelled_or_cut_off_free_every_block():
    """KV written in place over CUDA IPC, the prompt chunked so its transfer is in the
    air: a client leaving, then a prefill worker killed mid-transfer, each leave every
    pool free well before the io timeout that frees a silent sender's hold."""
    args = ("--attention-backend", "triton", "--num-blocks", "2048")
    spec = ClusterSpec(connector="ucx", model="synthetic:smollm2-135m", device="cuda",
                       worker_args=args, prefill_args=("--max-batch-tokens", "64"))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 40000, (3000,), generator=g).tolist()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    with Cluster(spec) as cluster:
        address = cluster.start(timeout_s=300)
        assert run_request(address, prompt[:500], params)[1].prefill_worker
        with open_channel(address) as channel:
            call = generate_pb2_grpc.RouterStub(channel).Generate(
                make_request(token_ids=prompt, params=params), timeout=120)
            _wait_for_prefill_work(cluster)
            call.cancel()
        wait_pools_free(cluster, timeout_s=15)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(run_request, address, prompt[::-1], params)
            _wait_for_prefill_work(cluster)
            cluster.kill("prefill-0")
            tokens, _ = future.result(timeout=120)
        assert len(tokens) == params.max_tokens   # the decode worker recomputed it
        wait_pools_free(cluster, timeout_s=15)
