"""Pure parts of the load generator: workload synthesis, arrivals, statistics, goodput."""

import argparse
import math
import random
import statistics

import pytest

from pdserve.bench import loadgen as lg
from pdserve.bench.loadgen import SLO, RequestResult, WorkloadSpec


def done(i=0, ttft=0.1, e2e=1.0, out=10, prompt=100, cached=0, itl=None, ok=True):
    return RequestResult(i, ok=ok, error="" if ok else "grpc:UNAVAILABLE", prompt_tokens=prompt,
                         cached_tokens=cached, requested_tokens=out, output_tokens=out,
                         ttft_s=ttft, e2e_s=e2e, itl_s=list(itl or []))


# ---- percentiles and distributions -------------------------------------------------------
def test_percentile_matches_linear_interpolation():
    values = [random.Random(1).random() for _ in range(101)]
    ordered = sorted(values)
    assert lg.percentile(values, 50) == ordered[50]
    assert lg.percentile(values, 0) == ordered[0]
    assert lg.percentile(values, 100) == ordered[-1]
    assert lg.percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    assert lg.percentile([0.0, 10.0, 20.0, 30.0], 90) == pytest.approx(27.0)
    assert lg.percentile([5.0], 99) == 5.0


def test_percentile_agrees_with_statistics_quantiles():
    values = [random.Random(2).expovariate(1.0) for _ in range(57)]
    expected = statistics.quantiles(values, n=100, method="inclusive")
    for q in (10, 50, 90, 99):
        assert lg.percentile(values, q) == pytest.approx(expected[q - 1])


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        lg.percentile([], 50)
    with pytest.raises(ValueError):
        lg.percentile([1.0], 101)


def test_distribution_is_in_ms_and_ordered():
    d = lg.distribution([0.001 * i for i in range(1, 101)])
    assert d["n"] == 100
    assert d["mean"] == pytest.approx(50.5)
    assert d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"] == pytest.approx(100.0)
    assert lg.distribution([]) is None


# ---- per-request metrics, goodput ---------------------------------------------------------
def test_tpot_excludes_first_token():
    r = done(ttft=0.5, e2e=1.4, out=10)
    assert r.tpot_s == pytest.approx(0.1)
    assert done(out=1).tpot_s is None
    assert RequestResult(0).tpot_s is None


def test_meets_slo_checks_each_bound():
    r = done(ttft=0.25, e2e=1.25, out=9)  # tpot 125 ms (exact in binary)
    assert lg.meets_slo(r, SLO(ttft_ms=250, tpot_ms=125))
    assert not lg.meets_slo(r, SLO(ttft_ms=249, tpot_ms=125))
    assert not lg.meets_slo(r, SLO(ttft_ms=250, tpot_ms=124))
    assert lg.meets_slo(r, SLO(ttft_ms=500))
    assert lg.meets_slo(done(out=1, ttft=0.1, e2e=0.1), SLO(ttft_ms=100, tpot_ms=1))
    assert not lg.meets_slo(done(ok=False), SLO(ttft_ms=1e9))


def test_summarize_counts_throughput_cache_and_goodput():
    results = [
        done(0, ttft=0.1, e2e=1.0, out=10, prompt=100, cached=50, itl=[0.1] * 9),
        done(1, ttft=0.3, e2e=1.2, out=10, prompt=100, cached=0, itl=[0.1] * 9),
        done(2, ttft=2.0, e2e=2.9, out=10, prompt=200, cached=100, itl=[0.1] * 9),
        done(3, ok=False),
    ]
    s = lg.summarize(results, duration_s=4.0, slo=SLO(ttft_ms=500, tpot_ms=150))
    assert (s["num_requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == {"grpc:UNAVAILABLE": 1}
    assert s["output_tokens"] == 30
    assert s["request_throughput"] == pytest.approx(0.75)
    assert s["output_throughput"] == pytest.approx(7.5)
    assert s["total_token_throughput"] == pytest.approx((400 + 30) / 4)
    assert s["prefix_cache_hit_rate"] == pytest.approx(150 / 400)
    assert s["good_requests"] == 2
    assert s["goodput"] == pytest.approx(0.5)
    assert s["ttft_ms"]["n"] == 3 and s["ttft_ms"]["mean"] == pytest.approx(800.0)
    assert s["itl_ms"]["n"] == 27 and s["itl_ms"]["p50"] == pytest.approx(100.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["output_len_mismatches"] == 0


def test_summarize_without_slo_or_successes():
    s = lg.summarize([done(ok=False)], duration_s=0.0)
    assert "goodput" not in s
    assert s["completed"] == 0 and s["prefix_cache_hit_rate"] is None
    assert s["ttft_ms"] is None and s["request_throughput"] == 0.0


def test_summarize_flags_short_outputs():
    r = done(out=7)
    r.requested_tokens = 8
    assert lg.summarize([r], 1.0)["output_len_mismatches"] == 1


# ---- arrivals ------------------------------------------------------------------------------
def test_infinite_rate_sends_everything_at_once():
    assert lg.arrival_times(5, math.inf) == [0.0] * 5


def test_fixed_arrivals_are_evenly_spaced():
    assert lg.arrival_times(4, 2.0, "fixed") == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_poisson_arrivals_have_the_requested_rate_and_are_seeded():
    times = lg.arrival_times(4000, 5.0, "poisson", seed=3)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.1)  # exponential: sd = mean
    assert times == lg.arrival_times(4000, 5.0, "poisson", seed=3)
    assert times != lg.arrival_times(4000, 5.0, "poisson", seed=4)


def test_arrivals_reject_bad_settings():
    with pytest.raises(ValueError):
        lg.arrival_times(3, 0.0)
    with pytest.raises(ValueError):
        lg.arrival_times(3, 1.0, "gamma")


# ---- prompts -------------------------------------------------------------------------------
def test_fixed_lengths_without_prefix():
    spec = WorkloadSpec(num_requests=20, input_len=33, output_len=7, vocab_low=10, vocab_high=50)
    prompts = lg.synthesize_prompts(spec)
    assert len(prompts) == 20
    assert all(len(p.token_ids) == 33 and p.output_len == 7 for p in prompts)
    assert all(10 <= t < 50 for p in prompts for t in p.token_ids)
    assert all(p.prefix_index is None for p in prompts)
    assert len({p.token_ids for p in prompts}) == 20


def test_uniform_lengths_stay_within_spread():
    spec = WorkloadSpec(num_requests=500, input_len=100, input_len_spread=0.2,
                        output_len=50, output_len_spread=0.5)
    prompts = lg.synthesize_prompts(spec)
    ins = [len(p.token_ids) for p in prompts]
    outs = [p.output_len for p in prompts]
    assert min(ins) >= 80 and max(ins) <= 120 and len(set(ins)) > 20
    assert min(outs) >= 25 and max(outs) <= 75
    assert statistics.fmean(ins) == pytest.approx(100, rel=0.05)


def test_sample_length_is_at_least_one():
    rng = random.Random(0)
    assert all(lg.sample_length(rng, 1, 0.9) >= 1 for _ in range(100))
    assert lg.sample_length(rng, 0, 0.0) == 1


def test_shared_prefixes():
    spec = WorkloadSpec(num_requests=200, input_len=8, shared_prefix_len=32, num_prefixes=4)
    prompts = lg.synthesize_prompts(spec)
    heads = {}
    for p in prompts:
        assert len(p.token_ids) == 40
        heads.setdefault(p.prefix_index, set()).add(p.token_ids[:32])
    assert sorted(heads) == [0, 1, 2, 3]
    assert all(len(h) == 1 for h in heads.values())           # one prefix per index
    assert len({next(iter(h)) for h in heads.values()}) == 4  # distinct prefixes
    assert len({p.token_ids[32:] for p in prompts}) == 200    # unique suffixes


def test_prefix_choice_is_not_periodic():
    """Round-robin routing over 2 workers must not line up with the prefix choice."""
    spec = WorkloadSpec(num_requests=64, input_len=4, shared_prefix_len=16, num_prefixes=8)
    idx = [p.prefix_index for p in lg.synthesize_prompts(spec)]
    assert idx != [i % 8 for i in range(64)]
    by_parity = {(i % 2, k) for i, k in enumerate(idx)}
    assert any((0, k) in by_parity and (1, k) in by_parity for k in range(8))


def test_prompts_are_deterministic_in_seed():
    a = lg.synthesize_prompts(WorkloadSpec(num_requests=5, seed=1))
    assert a == lg.synthesize_prompts(WorkloadSpec(num_requests=5, seed=1))
    assert a != lg.synthesize_prompts(WorkloadSpec(num_requests=5, seed=2))


def test_bad_vocab_range():
    with pytest.raises(ValueError):
        lg.synthesize_prompts(WorkloadSpec(vocab_low=10, vocab_high=10))


# ---- command line --------------------------------------------------------------------------
def test_parse_slo_and_rate():
    assert lg.parse_slo("ttft=500,tpot=50") == SLO(500.0, 50.0)
    assert lg.parse_slo("tpot=20") == SLO(tpot_ms=20.0)
    for bad in ("ttft", "e2e=5", "ttft=fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            lg.parse_slo(bad)
    assert math.isinf(lg.parse_rate("inf"))
    assert lg.parse_rate("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError):
        lg.parse_rate("0")


def test_cli_arguments_build_the_config():
    from pdserve.cli import build_parser

    args = build_parser().parse_args([
        "bench", "--router", "h:1", "--num-requests", "7", "--rate", "3", "--arrival", "fixed",
        "--concurrency", "2", "--input-len", "64", "--input-len-spread", "0.2",
        "--output-len", "16", "--shared-prefix-len", "32", "--num-prefixes", "4",
        "--seed", "9", "--slo", "ttft=100,tpot=10", "--vocab-range", "5:500"])
    cfg = lg.config_from_args(args)
    assert cfg.router == "h:1"
    assert cfg.workload == WorkloadSpec(7, 64, 0.2, 16, 0.0, 32, 4, 5, 500, 9)
    assert cfg.arrivals == lg.ArrivalSpec(3.0, "fixed", 2, 9)
    assert cfg.slo == SLO(100.0, 10.0)
    assert lg.config_dict(cfg)["arrivals"]["rate"] == 3.0
    assert "api_key" not in lg.config_dict(cfg)


def test_build_request_sets_ignore_eos_and_length():
    from pdserve.wire import generate_pb2

    cfg = lg.BenchConfig(router="x", mode="never")
    req = lg.build_request(lg.Prompt((5, 6, 7), 12), cfg, 3)
    assert list(req.token_ids.ids) == [5, 6, 7]
    assert req.sampling.max_tokens == 12 and req.sampling.ignore_eos
    assert req.mode == generate_pb2.DISAGGREGATION_NEVER


def test_format_report_mentions_every_metric():
    s = lg.summarize([done(itl=[0.1] * 9)], 1.0, SLO(ttft_ms=1000))
    text = lg.format_report(s)
    for word in ("TTFT", "TPOT", "ITL", "E2E", "goodput", "prefix cache"):
        assert word in text
