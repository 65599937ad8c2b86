"""Disaggregated serving on one GPU: KV computed by the prefill worker and moved by ucx
(cuda_ipc) must give the decode worker exactly the tokens it computes on its own."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampling import SamplingParams
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import generate_pb2
from tests.support.cluster import run_request, wait_pools_free

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

