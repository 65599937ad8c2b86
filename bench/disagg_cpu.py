"""Disaggregated vs colocated serving on this CPU machine.

The same system (router + 1 prefill + 1 decode worker, separate processes, ucx KV
connector, bundled SmolLM2-135M in fp32) runs the same workload twice per repeat, with
the router YAML's disaggregation mode as the only difference:
  always  every prompt is prefilled on the prefill worker and its KV shipped to decode;
  never   the decode worker prefills locally (the prefill worker stays idle).
Workload: unique random prompts (no shared prefix) of ~--input-len tokens, --output-len
generated tokens (ignore_eos), Poisson arrivals. Reports client TTFT, TPOT, ITL, E2E.

On 2 shared cores both workers compete for the same CPUs, so this measures the cost of
the disaggregated path (extra RPC hops + KV transfer) and its effect on decode
interference; it says nothing about GPU-scale gains.

    .venv/bin/python bench/disagg_cpu.py                    # 2 repeats, ~8 min on 2 cores

Writes bench/results/disagg-cpu.json (--out) and prints a markdown table.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pdserve.bench import loadgen as lg  # noqa: E402
from pdserve.services.launcher import ClusterSpec  # noqa: E402
from routing import policy_yaml, run_system, settings_from_cli  # noqa: E402

MODES = ("always", "never")


@dataclass(frozen=True)
class DisaggBench:
    modes: tuple[str, ...] = MODES
    repeats: int = 2
    num_requests: int = 24
    input_len: int = 192
    input_spread: float = 0.25
    output_len: int = 24
    rate: float = 0.3
    arrival: str = "poisson"
    concurrency: int = 0
    seed: int = 1


def bench_config(router: str, s: DisaggBench) -> lg.BenchConfig:
    workload = lg.WorkloadSpec(num_requests=s.num_requests, input_len=s.input_len,
                               input_len_spread=s.input_spread, output_len=s.output_len,
                               seed=s.seed)
    arrivals = lg.ArrivalSpec(rate=s.rate, arrival=s.arrival, concurrency=s.concurrency,
                              seed=s.seed)
    return lg.BenchConfig(router=router, workload=workload, arrivals=arrivals, timeout_s=300,
                          ready_timeout_s=180)


def run_mode(mode: str, s: DisaggBench, tmp: Path) -> dict:
    config = tmp / f"{mode}.yaml"
    config.write_text(policy_yaml("round_robin", mode=mode))
    spec = ClusterSpec(connector="ucx", num_prefill=1, num_decode=1, config=str(config))
    result = run_system(spec, lambda router: bench_config(router, s))
    result["mode"] = mode
    result["router_config"] = config.read_text()
    return result


def digest(result: dict) -> dict:
    s = result["summary"]
    row = {"mode": result["mode"], "repeat": result.get("repeat", 1),
           "completed": s["completed"], "failed": s["failed"],
           "request_throughput": s["request_throughput"],
           "output_throughput": s["output_throughput"],
           "prefilled_remotely": sum(1 for r in result["requests"] if r["prefill_worker"]),
           "loadavg": result["environment"]["loadavg_before"]}
    for metric in ("ttft", "tpot", "itl", "e2e"):
        d = s[f"{metric}_ms"] or {}
        for k in ("mean", "p50", "p90"):
            row[f"{metric}_{k}_ms"] = d.get(k)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | run | TTFT mean ms | TTFT p50 ms | TPOT mean ms | TPOT p90 ms | "
             "ITL p50 ms | E2E mean ms | output tok/s | load avg |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['repeat']} | {r['ttft_mean_ms']:.0f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['tpot_mean_ms']:.0f} | {r['tpot_p90_ms']:.0f} | {r['itl_p50_ms']:.0f} | "
            f"{r['e2e_mean_ms']:.0f} | {r['output_throughput']:.2f} | "
            f"{r['loadavg'][0] if r['loadavg'] else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings, out = settings_from_cli(DisaggBench, "modes", __doc__.split("\n\n")[0],
                                      "bench/results/disagg-cpu.json", argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="pdserve-disagg-") as tmp:
        for rep in range(settings.repeats):
            for mode in settings.modes:
                print(f"[repeat {rep + 1}] mode {mode} ...", file=sys.stderr, flush=True)
                result = run_mode(mode, settings, Path(tmp))
                result["repeat"] = rep + 1
                runs.append(result)
                print(f"  {digest(result)}", file=sys.stderr, flush=True)
    rows = [digest(r) for r in runs]
    keys = [k for k in rows[0] if k.endswith("_ms") or k.endswith("throughput")]
    means = {m: {k: round(statistics.fmean(r[k] for r in rows if r["mode"] == m
                                           and r[k] is not None), 3) for k in keys}
             for m in settings.modes}
    payload = {"benchmark": "disagg-cpu", "settings": asdict(settings),
               "environment": lg.environment(), "table": rows, "means": means, "runs": runs}
    lg.write_json(out, payload)
    print(markdown(rows))
    print("\nmeans:", means)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
