"""`pdserve bench --openai URL` against a real `pdserve up` (router + one decode worker,
router `mode: never`, the bundled model): every request completes, token counts match
the workload, and the report and JSON hold the latencies and SLO attainment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pdserve.bench import loadgen as lg
from pdserve.cli import main

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-openai")
    config = folder / "router.yaml"
    config.write_text("mode: never\n")
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--prefill", "0", "--decode", "1",
           "--config", str(config), "--port", "0", "--http-port", str(port), "--device", "cpu"]
    with open(folder / "up.log", "wb") as log:
        up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        for raw in up.stdout:  # blocks until a line; `pdserve up` prints READY when up
            if raw.startswith(b"READY ") or time.monotonic() > deadline:
                break
        assert up.poll() is None, (folder / "up.log").read_text()[-2000:]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        up.send_signal(signal.SIGTERM)  # `pdserve up` stops its router and worker
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_bench_openai_completions_all_complete(base_url, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--openai", base_url, "--num-requests", "4", "--concurrency", "2",
               "--input-len", "4", "--output-len", "3", "--shared-prefix-len", "16",
               "--num-prefixes", "2", "--seed", "4", "--slo", "ttft=600000,tpot=600000",
               "--ready-timeout", "60", "--json", str(out)])
    report = capsys.readouterr().out
    assert rc == 0, report
    assert "4/4 completed, 0 failed" in report and "slo 500/50 ms" in report
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["completed"] == 4 and s["errors"] == {} and s["output_len_mismatches"] == 0
    assert s["output_tokens"] == 12 and s["prompt_tokens"] == 4 * 20
    assert s["good_requests"] == 4
    assert [row["ttft_ms"] for row in s["slo_attainment"]] == [200, 500, 1000]
    assert result["config"]["model"] == "smollm2-135m-instruct"
    prompts = lg.synthesize_prompts(lg.WorkloadSpec(4, 4, 0.0, 3, 0.0, 16, 2, seed=4))
    for rec, prompt in zip(result["requests"], prompts):
        assert rec["ok"] and rec["finish_reason"] == "length"
        assert rec["prompt_tokens"] == len(prompt.token_ids)  # the server's usage agrees
        assert 0 < rec["ttft_s"] <= rec["e2e_s"]
        assert rec["tpot_s"] == pytest.approx((rec["e2e_s"] - rec["ttft_s"]) / 2)
        assert len(rec["itl_s"]) >= 1
    # prefixes 0, 0, 1, 0 (seed 4) of one 16-token block, two requests in flight at most:
    # the last request finds prefix 0's block cached
    assert [p.prefix_index for p in prompts] == [0, 0, 1, 0]
    assert s["cached_tokens"] >= 16


def test_bench_openai_chat_endpoint_over_httpx(base_url, capsys):
    """The chat endpoint, through the fallback HTTP client (httpx)."""
    rc = main(["bench", "--openai", base_url, "--endpoint", "chat", "--num-requests", "2",
               "--input-len", "8", "--output-len", "2", "--ready-timeout", "60",
               "--http-client", "httpx"])
    report = capsys.readouterr().out
    assert rc == 0 and "2/2 completed, 0 failed" in report


def test_bench_openai_counts_refused_requests(base_url, capsys):
    """A prompt over the model's context is refused with HTTP 400: counted, not fatal."""
    rc = main(["bench", "--openai", base_url, "--num-requests", "2", "--input-len", "9000",
               "--output-len", "2", "--ready-timeout", "60"])
    report = capsys.readouterr().out
    assert rc == 1 and "0/2 completed, 2 failed" in report and "http:400" in report
