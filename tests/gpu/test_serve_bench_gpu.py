"""bench/serve_gpu.py on the GPU at small scale: pdserve colocated and 1P1D (ucx, one
GPU) serve Poisson and burst loads through the OpenAI API with no failed request, and the
results JSON and table hold every run."""

from __future__ import annotations

import json

import pytest

from tests.support.bench_scripts import load_bench_script

pytestmark = pytest.mark.gpu
pytest.importorskip("ucxx")
pytest.importorskip("fastapi")


def test_pdserve_systems_complete_every_request(tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = load_bench_script("serve_gpu").main([
        "--systems", "pdserve-colocated,pdserve-1p1d", "--workloads", "512x16,shared:1024x16:768",
        "--rates", "16,inf", "--num-requests", "24", "--warmup-requests", "2",
        "--device", "cuda", "--pdserve-model", "synthetic:smollm2-135m",
        "--pdserve-worker-args", "--num-blocks 4096", "--budget-s", "400",
        "--log-dir", str(tmp_path / "logs"), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for system in ("pdserve-colocated", "pdserve-1p1d"):
        record = result["systems"][system]
        assert record["status"] == "ok", record["error"]
        assert len(record["runs"]) == 4
        for run in record["runs"]:
            s = run["summary"]
            assert s["completed"] == 24 and s["failed"] == 0, (system, run["workload"], s["errors"])
            assert s["output_len_mismatches"] == 0
        # Poisson arrivals (not the burst, whose prompts may all prefill in one step):
        # later requests find their shared prefix's blocks cached
        paced = [r for r in record["runs"] if r["workload"].startswith("shared")
                 and r["rate"] != "inf"]
        assert paced and all(r["summary"]["cached_tokens"] > 0 for r in paced)
    table = capsys.readouterr().out
    assert "| 512x16 | burst |" in table and "| shared:1024x16:768 | 16.0 |" in table
