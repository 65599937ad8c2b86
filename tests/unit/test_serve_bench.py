"""The serving benchmark's pure parts: SSE stream folding, TPOT, goodput and SLO
attainment, percentiles, shared-prefix prompts, seeded Poisson schedules, the OpenAI
request body, and bench/serve_gpu.py's workload grammar and Markdown table."""

import argparse
import importlib.util
import json
import math
import sys

import pytest

from pdserve.bench import loadgen as lg
from pdserve.bench import openai_load as ol
from pdserve.bench.loadgen import SLO, RequestResult, WorkloadSpec
from tests.support.bench_scripts import load_bench_script

serve_gpu = load_bench_script("serve_gpu")


def done(i=0, ttft=0.1, e2e=1.0, out=10, ok=True):
    return RequestResult(i, ok=ok, error="" if ok else "http:503 busy", prompt_tokens=10,
                         requested_tokens=out, output_tokens=out, ttft_s=ttft, e2e_s=e2e)


def event(text=None, finish=None, usage=None, chat=False):
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text if text is not None else ""
    return json.dumps({"choices": [choice] if usage is None else [], "usage": usage})


# ---- one stream ----------------------------------------------------------------------------
def test_stream_parser_times_tokens_and_takes_counts_from_usage():
    r = RequestResult(0, prompt_tokens=5, requested_tokens=4)
    p = ol.StreamParser(r, sent=10.0)
    # a pdserve-style stream: tokens, an empty finish chunk, then usage
    assert not p.feed(event("a"), 10.25)
    assert not p.feed(event(" b"), 10.5)
    assert not p.feed(event(""), 10.55)           # empty text: not a token
    assert not p.feed(event(" c d"), 11.0)        # one event may carry several tokens
    assert not p.feed(event("", finish="length"), 11.01)
    assert not p.feed(event(usage={"prompt_tokens": 7, "completion_tokens": 4,
                                   "prompt_tokens_details": {"cached_tokens": 3}}), 11.02)
    assert p.feed("[DONE]", 11.25)
    p.finish(11.5)  # the connection's close comes later: E2E ends at [DONE]
    assert r.ok and r.error == "" and r.finish_reason == "length"
    assert r.ttft_s == pytest.approx(0.25)
    assert r.itl_s == pytest.approx([0.25, 0.5])
    assert r.e2e_s == pytest.approx(1.25)
    assert (r.output_tokens, r.prompt_tokens, r.cached_tokens) == (4, 7, 3)
    assert r.tpot_s == pytest.approx((1.25 - 0.25) / 3)


def test_stream_parser_chat_role_chunk_is_not_the_first_token():
    r = RequestResult(0)
    p = ol.StreamParser(r, sent=0.0)
    p.feed(json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
           0.01)
    p.feed(event("Hi", chat=True), 0.3)
    p.feed(event(" there", chat=True, finish="length"), 0.4)
    p.feed("[DONE]", 0.41)
    p.finish(0.5)
    assert r.ok and r.ttft_s == pytest.approx(0.3)
    assert r.output_tokens == 2  # no usage event: the text-bearing events are counted


def test_stream_parser_failures():
    r = RequestResult(0)
    p = ol.StreamParser(r, 0.0)
    p.feed(event("x"), 0.1)
    assert p.feed(json.dumps({"error": {"message": "decode worker lost", "code": 503}}), 0.2)
    p.finish(0.3)
    assert not r.ok and r.error == "stream: decode worker lost"

    vllm_style = RequestResult(3)
    v = ol.StreamParser(vllm_style, 0.0)
    assert v.feed(json.dumps({"object": "error", "message": "out of KV", "code": 500}), 0.1)
    assert v.finish(0.2).error == "stream: out of KV"

    cut = RequestResult(1)
    ol.StreamParser(cut, 0.0).finish(0.5)          # closed before [DONE] or a finish
    assert not cut.ok and cut.error == "stream ended early"

    empty = RequestResult(2)
    q = ol.StreamParser(empty, 0.0)
    q.feed(event("", finish="length"), 0.1)
    q.feed("[DONE]", 0.2)
    q.finish(0.2)
    assert not empty.ok and empty.error == "no tokens"


def test_probe_errors_that_waiting_cannot_fix():
    assert ol._fatal("http:401 missing or wrong API key")
    assert ol._fatal("http:400 prompt too long")
    assert not ol._fatal("http:404 Not Found")
    assert not ol._fatal("http:503 no healthy decode worker")
    assert not ol._fatal("client:ConnectError")


# ---- summary math --------------------------------------------------------------------------
def test_tpot_excludes_the_first_token():
    assert done(ttft=0.2, e2e=2.2, out=11).tpot_s == pytest.approx(0.2)
    assert done(ttft=0.2, e2e=0.2, out=1).tpot_s is None


def test_slo_attainment_goodput_and_share_of_all_requests():
    results = [
        done(0, ttft=0.15, e2e=0.15 + 9 * 0.025, out=10),   # TPOT 25 ms: meets all three
        done(1, ttft=0.40, e2e=0.40 + 9 * 0.045, out=10),   # meets (500, 50) and (1000, 100)
        done(2, ttft=0.90, e2e=0.90 + 9 * 0.060, out=10),   # meets (1000, 100) only
        done(3, ttft=0.10, e2e=0.10 + 9 * 0.200, out=10),   # TPOT too slow for all
        done(4, ok=False),                                  # a failure misses every SLO
    ]
    rows = lg.slo_attainment(results, duration_s=2.0)
    assert [(r["ttft_ms"], r["tpot_ms"]) for r in rows] == [(200, 30), (500, 50), (1000, 100)]
    assert [r["good_requests"] for r in rows] == [1, 2, 3]
    assert [r["goodput"] for r in rows] == pytest.approx([0.5, 1.0, 1.5])
    assert [r["attainment"] for r in rows] == pytest.approx([0.2, 0.4, 0.6])
    s = lg.summarize(results, 2.0, SLO(ttft_ms=500, tpot_ms=50))
    assert s["slo_attainment"] == rows
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)
    assert lg.slo_attainment([], 0.0)[0] == {"ttft_ms": 200.0, "tpot_ms": 30.0,
                                              "good_requests": 0, "goodput": 0.0,
                                              "attainment": None}


def test_percentiles_interpolate_like_numpy():
    values = [0.010, 0.020, 0.030, 0.040, 0.100]
    d = lg.distribution(values)
    assert d["p50"] == pytest.approx(30.0)
    assert d["p90"] == pytest.approx(40 + 0.6 * 60)      # rank 3.6
    assert d["p99"] == pytest.approx(40 + 0.96 * 60)     # rank 3.96
    assert d["mean"] == pytest.approx(40.0) and d["n"] == 5


# ---- workload ------------------------------------------------------------------------------
def test_shared_prefix_prompts_are_one_of_k_prefixes_plus_a_unique_suffix():
    w = serve_gpu.parse_workload("shared:96x8:64:3")
    spec = w.spec(num_requests=60, seed=5)
    assert (spec.shared_prefix_len, spec.input_len, spec.num_prefixes) == (64, 32, 3)
    prompts = lg.synthesize_prompts(spec)
    assert all(len(p.token_ids) == 96 and p.output_len == 8 for p in prompts)
    heads = {p.prefix_index: p.token_ids[:64] for p in prompts}
    assert sorted(heads) == [0, 1, 2] and len(set(heads.values())) == 3
    assert all(p.token_ids[:64] == heads[p.prefix_index] for p in prompts)
    assert len({p.token_ids[64:] for p in prompts}) == 60


def test_poisson_schedule_is_reproducible_by_seed_and_has_the_rate():
    a = lg.arrival_times(2000, 8.0, "poisson", seed=11)
    assert a == lg.arrival_times(2000, 8.0, "poisson", seed=11)
    assert a != lg.arrival_times(2000, 8.0, "poisson", seed=12)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    assert a[-1] / (len(a) - 1) == pytest.approx(1 / 8.0, rel=0.06)
    assert lg.arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


def test_request_body_sends_token_ids_or_chat_text():
    prompt = lg.Prompt((101, 102, 103), 16)
    cfg = ol.OpenAIBenchConfig(base_url="http://h:1/v1")
    body = ol.request_body(prompt, cfg, "m", 0)
    assert body["prompt"] == [101, 102, 103] and body["model"] == "m"
    assert body["max_tokens"] == 16 and body["ignore_eos"] and body["stream"]
    assert body["stream_options"] == {"include_usage": True} and "seed" not in body
    chat = ol.request_body(prompt, ol.OpenAIBenchConfig("http://h:1/v1", endpoint="chat",
                                                        temperature=0.7), "m", 2)
    assert "prompt" not in chat and len(chat["messages"][0]["content"].split()) == 3
    assert chat["seed"] == 2


def test_base_url_normalization_and_errors():
    assert ol.normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert ol.normalize_base_url("https://h/v1/") == "https://h/v1"
    for bad in ("127.0.0.1:8000", "ftp://h/v1", "http://"):
        with pytest.raises(ValueError):
            ol.normalize_base_url(bad)


def test_cli_builds_an_openai_config_and_refuses_grpc_only_flags():
    from pdserve.cli import build_parser, main

    args = build_parser().parse_args([
        "bench", "--openai", "http://h:9/v1", "--model", "x", "--endpoint", "chat",
        "--num-requests", "5", "--rate", "2", "--input-len", "16", "--output-len", "4",
        "--shared-prefix-len", "8", "--num-prefixes", "2", "--seed", "3"])
    cfg = ol.config_from_args(args)
    assert (cfg.base_url, cfg.model, cfg.endpoint) == ("http://h:9/v1", "x", "chat")
    assert cfg.workload == WorkloadSpec(5, 16, 0.0, 4, 0.0, 8, 2, 100, 32000, 3)
    assert cfg.arrivals.rate == 2.0 and cfg.arrivals.seed == 3
    assert main(["bench", "--openai", "http://h:9", "--mode", "never"]) == 2
    assert main(["bench", "--openai", "h:9"]) == 2
    with pytest.raises(SystemExit):  # exactly one of --router / --openai
        build_parser().parse_args(["bench", "--router", "a:1", "--openai", "http://h:9"])


def test_unreachable_server_is_reported_not_raised(capsys):
    from pdserve.cli import main

    port = serve_gpu.free_port()  # nothing listens there
    assert main(["bench", "--openai", f"http://127.0.0.1:{port}/v1", "--num-requests", "1",
                 "--ready-timeout", "1"]) == 1
    assert "not ready" in capsys.readouterr().err


# ---- bench/serve_gpu.py --------------------------------------------------------------------
def test_workload_grammar():
    w = serve_gpu.parse_workload("1024x128")
    assert (w.input_len, w.output_len, w.shared_prefix_len, w.rates) == (1024, 128, 0, ())
    w = serve_gpu.parse_workload("shared:4096x256:3072@2/4/inf", num_prefixes=5)
    assert (w.shared_prefix_len, w.num_prefixes, w.spec(1, 0).input_len) == (3072, 5, 1024)
    assert w.rates[:2] == (2.0, 4.0) and math.isinf(w.rates[2])
    for bad in ("1024", "shared:64x8", "shared:64x8:64", "0x8", "64x8@0"):
        with pytest.raises((ValueError, argparse.ArgumentTypeError)):
            serve_gpu.parse_workload(bad)


def test_arguments_are_checked():
    for argv in (["--systems", "tgi"], ["--rates", "4,fast"], ["--workloads", "12"]):
        with pytest.raises(SystemExit):
            serve_gpu.parse_args(argv)
    args = serve_gpu.parse_args(["--rates", "1,inf", "--workloads", "8x2"])
    assert args.rates[0] == 1.0 and math.isinf(args.rates[1])
    assert args.system_list == list(serve_gpu.SYSTEMS)


def _run(workload, rate, completed, rps, ttft_p90, tpot_p50, good):
    s = lg.summarize([], 1.0)
    s.update(num_requests=completed, completed=completed, failed=0, request_throughput=rps,
             ttft_ms={"p90": ttft_p90}, tpot_ms={"p50": tpot_p50},
             slo_attainment=[{"ttft_ms": 500.0, "tpot_ms": 50.0, "goodput": good}])
    return {"workload": workload, "rate": rate, "summary": s, "cut": False}


def test_markdown_table_has_a_row_per_workload_rate_and_a_column_per_system():
    result = {"systems": {
        "vllm": {"status": "ok", "runs": [_run("1024x128", 16.0, 10, 14.3, 190.0, 8.3, 13.1),
                                          _run("1024x128", "inf", 10, 19.8, 2500.0, 20.0, 1.0)]},
        "pdserve-colocated": {"status": "ok", "runs": [
            _run("1024x128", 16.0, 10, 14.2, 275.0, 9.6, 12.0),
            {"workload": "1024x128", "rate": "inf", "skipped": "budget"}]},
        "sglang-like": {"status": "ok", "runs": [
            {"workload": "1024x128", "rate": 16.0, "error": "TimeoutError: not ready"}]},
        "pdserve-1p1d": {"status": "failed to start", "error": "RuntimeError: boom", "runs": []},
    }}
    table = serve_gpu.markdown_table(result)
    rows = [line for line in table.splitlines() if line.startswith("| 1024x128")]
    assert len(rows) == 2
    assert "14.30, 190 ms, 8.3 ms, 13.10" in rows[0] and "14.20, 275 ms, 9.6 ms, 12.00" in rows[0]
    assert rows[0].endswith("| error (see JSON) | failed to start |")
    assert rows[1].endswith("| - | failed to start |")
    assert "| burst |" in rows[1] and "skipped (budget)" in rows[1]
    assert "boom" in table


def test_merge_combines_systems(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"gpu": "G", "commit": "c1", "systems": {"vllm": {"runs": [1]}}}))
    b.write_text(json.dumps({"gpu": "G", "commit": "c2", "systems": {"pdserve-1p1d": {"runs": []},
                                                                      "vllm": {"runs": [2]}}}))
    merged = serve_gpu.merge([str(a), str(b)])
    assert merged["systems"] == {"vllm": {"runs": [2]}, "pdserve-1p1d": {"runs": []}}
    assert [m["commit"] for m in merged["merged_from"]] == ["c1", "c2"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM would start")
def test_a_system_that_fails_to_start_is_recorded(tmp_path, capsys):
    """vLLM is not installed here: its server exits at once; the run records that, goes
    on, and still writes the JSON and the table."""
    out = tmp_path / "serve.json"
    rc = serve_gpu.main(["--systems", "vllm", "--workloads", "8x2", "--rates", "inf",
                         "--num-requests", "1", "--vllm-python", sys.executable,
                         "--start-timeout-s", "60", "--log-dir", str(tmp_path / "logs"),
                         "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    record = result["systems"]["vllm"]
    assert record["status"] == "failed to start" and "vllm" in record["error"]
    assert record["runs"] == []
    assert "vllm: failed to start" in capsys.readouterr().out
    folder = tmp_path / "logs" / "vllm" / "llama3-8b-dummy"
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 128256 and config["num_key_value_heads"] == 8
    assert (folder / "tokenizer.json").stat().st_size > 0
