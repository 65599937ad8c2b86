"""Issue 17 on the GPU: a decode worker killed with SIGKILL under supervision comes back
on its fixed KV ports (UCX listener reuse with the device transports), the prefill
worker handshakes it anew (no stale cuda_ipc mapping or endpoint), and the next
disaggregated request moves its KV by transfer again, routed within 2 s of READY."""

from __future__ import annotations

import time

import pytest

from pdserve.engine.sampling import SamplingParams
from pdserve.services.launcher import Backoff, Cluster, ClusterSpec
from pdserve.wire import generate_pb2
from tests.integration.test_restart_recovery import free_ports, wait_for
from tests.support.cluster import run_request, wait_pools_free

pytestmark = pytest.mark.gpu
pytest.importorskip("ucxx")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

ALWAYS = generate_pb2.DISAGGREGATION_ALWAYS
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def test_decode_restart_on_fixed_kv_port_on_gpu():
    kv = free_ports(3)  # the KV side channel, data and control ports
    spec = ClusterSpec(connector="ucx", model="synthetic:smollm2-135m", device="cuda",
                       worker_args=("--num-blocks", "2048"),
                       decode_args=("--kv-port", str(kv)), backoff=Backoff(first_s=0.1))
    prompt = list(range(100, 700))
    with Cluster(spec) as cluster:
        address = cluster.start(timeout_s=300)
        cluster.supervise()
        before, last = run_request(address, prompt, PARAMS, mode=ALWAYS)
        assert last.timing.kv_transfer_seconds > 0
        decode = cluster.proc("decode-0")
        old = decode.popen.pid
        cluster.kill("decode-0")
        wait_for(lambda: decode.popen.pid != old and decode.ready_at, 300, "decode READY")
        ready_at = decode.ready_at
        deadline = time.monotonic() + 30
        while True:
            try:
                after, last = run_request(address, prompt, PARAMS, mode=ALWAYS)
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert time.monotonic() - ready_at - last.timing.e2e_seconds < 2.0
        assert decode.restarts == 1
        assert after == before and last.timing.kv_transfer_seconds > 0  # by transfer
        wait_pools_free(cluster)


def test_a_killed_decode_workers_pool_is_unmapped_and_its_memory_freed():
    """The prefill worker maps a decode worker's pool over CUDA IPC; that mapping keeps
    the pool's memory allocated after the decode worker died. The prefill worker lets go
    within a second without another transfer, so the GPU gets the whole pool back (a
    decode worker restarting on a shared GPU sizes its pool from what is free)."""
    pool_gb = 4
    spec = ClusterSpec(connector="ucx", model="synthetic:smollm2-135m", device="cuda",
                       prefill_args=("--num-blocks", "512"),
                       decode_args=("--kv-cache-gb", str(pool_gb)))
    with Cluster(spec) as cluster:
        address = cluster.start(timeout_s=300)
        _, last = run_request(address, list(range(100, 700)), PARAMS, mode=ALWAYS)
        assert last.timing.kv_transfer_seconds > 0  # the prefill worker mapped the pool
        free_before, _ = torch.cuda.mem_get_info()
        cluster.kill("decode-0")
        deadline, gained = time.monotonic() + 10, 0
        while time.monotonic() < deadline and gained < pool_gb * 2**30:
            time.sleep(0.2)
            gained = torch.cuda.mem_get_info()[0] - free_before
        assert gained >= pool_gb * 2**30  # the pool, besides its weights and workspaces
