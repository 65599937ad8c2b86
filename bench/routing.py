"""Prefix-aware vs round-robin prefill routing, on real workers on this machine.

For each router policy, a fresh system is started (router + 2 prefill + 1 decode worker,
separate processes, ucx KV connector, bundled SmolLM2-135M, fp32 on the CPU) with a
router YAML `mode: always, prefill: {policy: <policy>}`, and the same shared-prefix
workload is sent through it with `pdserve bench`'s load generator: K random prefixes of
L tokens, each request one of them (chosen at random) plus a short unique suffix, few
output tokens. Restarting between runs gives each policy cold caches.

Measured per run: client TTFT (mean/p50/p90), E2E; the prefill workers' prefix-cache
hit rate from their Stats RPC (blocks hit / blocks looked up, delta over the run); the
decode worker's (usage.cached_tokens / prompt tokens: with mode `always` every request
goes through a prefill worker, and the decode worker's own prefix cache decides which
blocks it lacks and must receive); requests per prefill worker.

    .venv/bin/python bench/routing.py                       # 2 repeats, ~8 min on 2 cores
    .venv/bin/python bench/routing.py --repeats 1 --num-requests 24

Writes bench/results/routing-cpu.json (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pdserve.bench import loadgen as lg  # noqa: E402
from pdserve.services.launcher import Cluster, ClusterSpec  # noqa: E402

POLICIES = ("round_robin", "prefix_aware")


@dataclass(frozen=True)
class RoutingBench:
    num_prefill: int = 2
    num_decode: int = 1
    policies: tuple[str, ...] = POLICIES
    repeats: int = 2
    num_requests: int = 48
    num_prefixes: int = 8
    prefix_len: int = 256
    suffix_len: int = 24
    suffix_spread: float = 0.25
    output_len: int = 4
    rate: float = 1.0
    arrival: str = "poisson"
    concurrency: int = 4
    seed: int = 0


def policy_yaml(policy: str, mode: str = "always") -> str:
    return (f"version: 1\nmode: {mode}\nprefill:\n  policy: {policy}\n"
            f"decode:\n  policy: least_loaded\nhealth:\n  interval_seconds: 1\n")


def bench_config(router: str, s: RoutingBench) -> lg.BenchConfig:
    workload = lg.WorkloadSpec(
        num_requests=s.num_requests, input_len=s.suffix_len, input_len_spread=s.suffix_spread,
        output_len=s.output_len, shared_prefix_len=s.prefix_len, num_prefixes=s.num_prefixes,
        seed=s.seed)
    arrivals = lg.ArrivalSpec(rate=s.rate, arrival=s.arrival, concurrency=s.concurrency,
                              seed=s.seed)
    return lg.BenchConfig(router=router, workload=workload, arrivals=arrivals, timeout_s=300,
                          ready_timeout_s=180)


async def worker_stats(addresses: dict[str, tuple[str, str]], token: str) -> dict[str, dict]:
    """Stats RPC of each worker: name -> {queries, hits, ...}; addresses: name -> (role, addr)."""
    from pdserve.services.common import internal_channel
    from pdserve.wire import worker_pb2, worker_pb2_grpc

    out = {}
    for name, (role, address) in addresses.items():
        async with internal_channel(address, None, internal_token=token) as channel:
            stub = (worker_pb2_grpc.PrefillServiceStub if role == "prefill"
                    else worker_pb2_grpc.DecodeServiceStub)(channel)
            s = await stub.Stats(worker_pb2.StatsRequest(), timeout=10)
        out[name] = {"worker_id": s.worker_id, "address": address,
                     "prefix_cache_queries": s.prefix_cache_queries,
                     "prefix_cache_hits": s.prefix_cache_hits}
    return out


def stats_delta(before: dict, after: dict) -> dict:
    delta = {}
    for name, a in after.items():
        b = before[name]
        q = a["prefix_cache_queries"] - b["prefix_cache_queries"]
        h = a["prefix_cache_hits"] - b["prefix_cache_hits"]
        delta[name] = {"address": a["address"], "queries": q, "hits": h,
                       "hit_rate": round(h / q, 4) if q else None}
    return delta


def role_hit_rate(delta: dict, role: str) -> float | None:
    rows = [d for name, d in delta.items() if name.startswith(role)]
    q = sum(d["queries"] for d in rows)
    return round(sum(d["hits"] for d in rows) / q, 4) if q else None


def run_system(spec: ClusterSpec, cfg_for: "callable") -> dict:
    """Start a system, wait for it, run the load, collect worker Stats deltas, stop."""
    with Cluster(spec) as cluster:
        started = time.monotonic()
        router = cluster.start()
        cfg = cfg_for(router)
        addresses = {p.name: (p.name.split("-")[0], p.address)
                     for p in cluster.procs if p.name != "router"}

        async def go() -> dict:
            await lg.wait_ready(router, cfg.ready_timeout_s)
            before = await worker_stats(addresses, cluster.internal_token)
            result = await lg.run_benchmark_async(cfg)
            result["workers"] = stats_delta(before, await worker_stats(addresses, cluster.internal_token))
            return result

        result = asyncio.run(go())
        result["startup_s"] = round(time.monotonic() - started - result["summary"]["duration_s"], 1)
    return result


def run_policy(policy: str, s: RoutingBench, tmp: Path) -> dict:
    config = tmp / f"{policy}.yaml"
    config.write_text(policy_yaml(policy))
    spec = ClusterSpec(connector="ucx", num_prefill=s.num_prefill, num_decode=s.num_decode,
                       config=str(config))
    result = run_system(spec, lambda router: bench_config(router, s))
    result["policy"] = policy
    result["router_config"] = config.read_text()
    return result


def digest(result: dict) -> dict:
    """The numbers compared side by side."""
    s = result["summary"]
    per_worker = Counter(r["prefill_worker"] for r in result["requests"] if r["ok"])
    names = {d["address"]: n for n, d in result["workers"].items()}
    return {
        "policy": result["policy"], "repeat": result.get("repeat", 1),
        "completed": s["completed"], "failed": s["failed"],
        "prefill_hit_rate_stats": role_hit_rate(result["workers"], "prefill"),
        "decode_hit_rate_stats": role_hit_rate(result["workers"], "decode"),
        "usage_cached_rate": s["prefix_cache_hit_rate"],
        "ttft_mean_ms": s["ttft_ms"]["mean"], "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p90_ms": s["ttft_ms"]["p90"], "e2e_mean_ms": s["e2e_ms"]["mean"],
        "request_throughput": s["request_throughput"],
        "requests_per_prefill": {names.get(a, a): n for a, n in sorted(per_worker.items())},
        "loadavg": result["environment"]["loadavg_before"],
    }


def mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return round(statistics.fmean(vals), 4) if vals else None


def markdown(rows: list[dict]) -> str:
    head = ("| policy | run | prefill hit rate (Stats) | decode cached (usage) | "
            "TTFT mean ms | TTFT p50 ms | TTFT p90 ms | req/prefill worker | load avg |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['repeat']} | {r['prefill_hit_rate_stats']:.1%} | "
            f"{r['usage_cached_rate']:.1%} | {r['ttft_mean_ms']:.0f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p90_ms']:.0f} | {'/'.join(str(v) for v in r['requests_per_prefill'].values())} | "
            f"{r['loadavg'][0] if r['loadavg'] else '-'} |")
    return "\n".join(lines)


def settings_from_cli(cls, list_field: str, description: str, default_out: str,
                      argv: list[str] | None):
    """A frozen settings dataclass filled from --flags (list_field comma-separated)."""
    p = argparse.ArgumentParser(description=description)
    defaults = asdict(cls())
    for f, default in defaults.items():
        if f == list_field:
            p.add_argument("--" + f.replace("_", "-"), default=",".join(default))
        else:
            p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--out", default=str(REPO / default_out))
    args = p.parse_args(argv)
    values = {f: (tuple(getattr(args, f).split(",")) if f == list_field else getattr(args, f))
              for f in defaults}
    return cls(**values), args.out


def main(argv: list[str] | None = None) -> int:
    settings, out = settings_from_cli(RoutingBench, "policies", __doc__.split("\n\n")[0],
                                      "bench/results/routing-cpu.json", argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="pdserve-routing-") as tmp:
        for rep in range(settings.repeats):
            for policy in settings.policies:  # interleaved, so drifting load hits both
                print(f"[repeat {rep + 1}] {policy} ...", file=sys.stderr, flush=True)
                result = run_policy(policy, settings, Path(tmp))
                result["repeat"] = rep + 1
                runs.append(result)
                print(f"  {digest(result)}", file=sys.stderr, flush=True)
    rows = [digest(r) for r in runs]
    means = {pol: {k: mean_of([r for r in rows if r["policy"] == pol], k)
                   for k in ("prefill_hit_rate_stats", "decode_hit_rate_stats",
                             "usage_cached_rate", "ttft_mean_ms", "ttft_p50_ms",
                             "ttft_p90_ms", "e2e_mean_ms", "request_throughput")}
             for pol in settings.policies}
    payload = {"benchmark": "routing-cpu", "settings": asdict(settings),
               "environment": lg.environment(), "table": rows, "means": means, "runs": runs}
    lg.write_json(out, payload)
    print(markdown(rows))
    print("\nmeans:", means)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
