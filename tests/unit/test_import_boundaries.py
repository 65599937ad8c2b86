"""CPU-only modules import neither torch nor triton (so the router, the client and the
bookkeeping run, and are tested, on hosts without them). Each module is imported in a
fresh interpreter: within this test process torch is already loaded."""

import subprocess
import sys

import pytest

CPU_ONLY = [
    "pdserve.engine.params",
    "pdserve.engine.scheduler.scheduler",
    "pdserve.engine.scheduler.request",
    "pdserve.engine.kvcache.allocator",
    "pdserve.engine.kvcache.prefix",
    "pdserve.engine.kvcache.spec",
    "pdserve.services.router.service",
    "pdserve.services.router.http",
    "pdserve.services.router.policies",
    "pdserve.services.router.config",
    "pdserve.services.router.discovery",
    "pdserve.services.router.health",
    "pdserve.services.prefill.job",
    "pdserve.services.decode.admission",
    "pdserve.client",
    "pdserve.kvtransfer.transfers",
    "pdserve.kvtransfer.messages",
    "pdserve.kvtransfer.base",
    "pdserve.kvtransfer.handshake",
    "pdserve.bench.loadgen",
]

_PROBE = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
          "print(','.join(m for m in ('torch', 'triton') if m in sys.modules))")


def _heavy_imports(module: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, module],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"importing {module} failed:\n{proc.stderr}"
    return [m for m in proc.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", CPU_ONLY)
def test_cpu_only_module_imports_no_torch(module):
    assert _heavy_imports(module) == [], f"{module} pulls in torch/triton"


def test_probe_sees_torch_when_it_is_imported():
    # the probe itself can fail: a module that does import torch is reported
    assert "torch" in _heavy_imports("pdserve.engine.sampling")


def test_old_import_paths_still_work():
    from pdserve.engine.kvcache.pool import KVCacheSpec, contiguous_runs
    from pdserve.engine.kvcache import spec
    from pdserve.engine import params, sampling

    assert sampling.SamplingParams is params.SamplingParams
    assert sampling.InvalidRequest is params.InvalidRequest
    assert KVCacheSpec is spec.KVCacheSpec and contiguous_runs is spec.contiguous_runs


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_free_block_bytes_match_the_pool(dtype):
    # spec.py sizes blocks without torch; the pool's tensor must agree
    from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec

    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=16,
                       num_blocks=3, dtype=dtype)
    pool = KVCachePool(spec)
    assert pool.block_run_bytes(0, 2).numel() == 2 * spec.bytes_per_block
