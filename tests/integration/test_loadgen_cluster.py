"""`pdserve bench` against a real system: router + 1 prefill + 1 decode processes (ucx)."""

import math

import pytest

from pdserve.bench import loadgen as lg
from pdserve.services.launcher import Cluster, ClusterSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def router():
    with Cluster(ClusterSpec(connector="ucx")) as cluster:
        yield cluster.start()


def test_bench_smoke(router, tmp_path):
    cfg = lg.BenchConfig(
        router=router,
        workload=lg.WorkloadSpec(num_requests=6, input_len=24, input_len_spread=0.25,
                                 output_len=6, shared_prefix_len=32, num_prefixes=2, seed=7),
        arrivals=lg.ArrivalSpec(rate=math.inf, concurrency=3),
        slo=lg.SLO(ttft_ms=600_000, tpot_ms=600_000), timeout_s=120, ready_timeout_s=120)
    result = lg.run_benchmark(cfg)
    s = result["summary"]
    assert s["errors"] == {} and s["completed"] == s["num_requests"] == 6
    assert s["output_len_mismatches"] == 0
    assert s["good_requests"] == 6 and s["goodput"] == pytest.approx(s["request_throughput"])
    prompts = lg.synthesize_prompts(cfg.workload)
    for rec, prompt in zip(result["requests"], prompts):
        assert rec["ok"] and rec["finish_reason"] == "length"
        assert rec["output_tokens"] == rec["requested_tokens"] == prompt.output_len
        assert rec["prompt_tokens"] == len(prompt.token_ids)
        assert 0 <= rec["cached_tokens"] < rec["prompt_tokens"]
        assert 0 < rec["ttft_s"] <= rec["e2e_s"]
        assert rec["sent_s"] + rec["e2e_s"] <= s["duration_s"] + 1e-3
        assert len(rec["itl_s"]) >= 1 and sum(rec["itl_s"]) <= rec["e2e_s"] - rec["ttft_s"] + 1e-6
        assert rec["prefill_worker"] and rec["decode_worker"]
    assert s["output_tokens"] == sum(p.output_len for p in prompts)
    assert s["prompt_tokens"] == sum(len(p.token_ids) for p in prompts)
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"] and s["ttft_ms"]["max"] <= s["e2e_ms"]["max"]
    assert s["request_throughput"] == pytest.approx(6 / s["duration_s"], rel=1e-3)
    assert result["environment"]["cpus"] and "git_commit" in result["environment"]

    path = tmp_path / "out.json"
    lg.write_json(path, result)
    assert path.stat().st_size > 0


def test_bench_cli_counts_errors(router, capsys):
    """A prompt over the context is refused (INVALID_ARGUMENT): counted, not fatal."""
    from pdserve.cli import main

    rc = main(["bench", "--router", router, "--num-requests", "2", "--input-len", "9000",
               "--output-len", "2", "--ready-timeout", "60"])
    out = capsys.readouterr().out
    assert rc == 1  # nothing completed
    assert "0/2 completed, 2 failed" in out and "INVALID_ARGUMENT" in out
