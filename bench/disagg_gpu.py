"""TTFT cost of disaggregation on one GPU: router + prefill + decode processes sharing
one GPU, Llama-3-8B-shaped random weights (bf16), ucx KV connector (cuda_ipc).

For each prompt length, the same router sends the request either through a prefill
worker (mode ALWAYS: prefill computes, KV moves to decode, decode streams) or straight
to the decode worker (mode NEVER: decode prefills locally, i.e. colocated). TTFT is
measured at the client, over one gRPC channel kept open for all requests (as a serving
client does; a channel per request adds its connection setup to every TTFT). The
disaggregation overhead is disaggregated minus colocated TTFT: the KV transfer's exposed
time (the kv_transfer stage: from the end of the prompt's compute until its KV is in
place on the decode worker) plus the extra control hops (decode reserves blocks, calls
the prefill worker, which answers once the KV is in place).

    python bench/disagg_gpu.py --out bench/results/disagg-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time

import torch

from pdserve.client import make_request, open_channel, stream
from pdserve.engine.sampling import SamplingParams
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import generate_pb2
from report import write_report  # bench/report.py (this script's folder)


def ttft(channel, ids: list[int], mode: int) -> tuple[float, object]:
    req = make_request(token_ids=ids, params=SamplingParams(max_tokens=2, ignore_eos=True),
                       mode=mode)
    start = time.perf_counter()
    first, last = None, None
    for chunk in stream("", req, timeout=300, channel=channel):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
        last = chunk
    return first, last


def stage_medians(timings) -> dict:
    """Median per stage (last-chunk Timing): where the TTFT went, in ms."""
    fields = ("ttft_seconds", "queue_seconds", "prefill_seconds", "kv_transfer_seconds")
    return {f.removesuffix("_seconds"): round(1000 * statistics.median(getattr(t, f) for t in timings), 2)
            for f in fields}


def print_traces(cluster, n: int) -> None:
    """The last n hop traces of every process, in time order (one host-wide clock)."""
    lines = []
    for name in ("router", "prefill-0", "decode-0"):
        for line in (cluster.log_dir / f"{name}.log").read_text().splitlines():
            if " trace " in line:
                _, rest = line.split(" trace ", 1)
                request_id, *event, stamp = rest.split(" ")
                lines.append((float(stamp), request_id[-12:], " ".join(event)))
            elif "step profile: " in line:  # PDSERVE_STEP_PROFILE=1
                event = line.split("step profile: ", 1)[1]
                stamp = float(event.rsplit("began at ", 1)[1].rstrip(")"))
                lines.append((stamp, name, event.split(" (began")[0]))
    lines.sort(key=lambda x: x[0])
    start = lines[-n][0] if len(lines) >= n else 0.0
    for stamp, request_id, event in lines[-n:]:
        print(f"{stamp - start:9.3f} ms  {request_id}  {event}")


def step_profiles(cluster) -> dict:
    """PDSERVE_STEP_PROFILE=1: per process, the median (host queued, device end, step) ms
    of its steps by token count (a prompt's compute on each worker, side by side)."""
    result = {}
    for name in ("prefill-0", "decode-0"):
        by_tokens: dict[int, list[tuple[float, float, float]]] = {}
        for line in (cluster.log_dir / f"{name}.log").read_text().splitlines():
            if "step profile: " not in line:
                continue
            tokens, *times = re.findall(r"[\d.]+", line.split("step profile: ", 1)[1])
            by_tokens.setdefault(int(tokens), []).append(tuple(map(float, times[:3])))
        result[name] = {n: [round(statistics.median(v[i] for v in rows), 3) for i in range(3)]
                        for n, rows in sorted(by_tokens.items()) if len(rows) > 2}
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--lengths", default="512,2048,8000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--router-arg", action="append", default=None,
                   help="passed to the router, e.g. --router-arg=--no-early-prefill-start")
    p.add_argument("--worker-arg", action="append", default=None,
                   help="passed to both workers, e.g. --worker-arg=--prefill-graph-tokens=2048")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    worker_args = ("--attention-backend", "triton", "--cuda-graphs", "--kv-cache-gb", "6",
                   "--max-batch-tokens", "8192", "--max-num-seqs", "64", "--kv-lease-s", "120",
                   *(args.worker_arg or ()))
    spec = ClusterSpec(connector="ucx", model=f"synthetic:{args.shape}", device="cuda",
                       worker_args=worker_args,
                       # the prefill worker computes long prompts in chunks so chunk i's
                       # KV is on the wire while chunk i+1 computes
                       prefill_args=("--max-batch-tokens", str(args.prefill_chunk)),
                       router_args=tuple(args.router_arg or ()),
                       env={"PDSERVE_LOG_LEVEL": os.environ.get("PDSERVE_LOG_LEVEL", "INFO")})
    results = {"gpu": torch.cuda.get_device_name(), "shape": args.shape, "connector": "ucx",
               "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
               "command": "python bench/disagg_gpu.py " + " ".join(
                   f"--{k}={v}" for k, v in vars(args).items() if v is not None),
               "rows": []}
    g = torch.Generator().manual_seed(0)
    with Cluster(spec) as cluster, open_channel(cluster.start(timeout_s=400)) as channel:
        lengths = list(map(int, args.lengths.split(",")))
        for n in [600, 600] + lengths:  # kernels compile and the allocator grows here
            ids = torch.randint(10, 120000, (n,), generator=g).tolist()
            ttft(channel, ids, generate_pb2.DISAGGREGATION_ALWAYS)
            ttft(channel, ids[::-1], generate_pb2.DISAGGREGATION_NEVER)
        for n in lengths:
            dis, col, stages = [], [], {"disagg": [], "colocated": []}
            for r in range(args.repeats):
                ids = torch.randint(10, 120000, (n,), generator=g).tolist()
                t, last = ttft(channel, ids, generate_pb2.DISAGGREGATION_ALWAYS)
                assert last.prefill_worker, "request did not go through a prefill worker"
                dis.append(t)
                stages["disagg"].append(last.timing)
                ids = torch.randint(10, 120000, (n,), generator=g).tolist()
                t, last = ttft(channel, ids, generate_pb2.DISAGGREGATION_NEVER)
                col.append(t)
                stages["colocated"].append(last.timing)
            row = {"prompt_tokens": n, "ttft_disagg_ms": 1000 * statistics.median(dis),
                   "ttft_colocated_ms": 1000 * statistics.median(col)}
            for route, timings in stages.items():
                row[f"stages_{route}_ms"] = stage_medians(timings)
            row["exposed_ms"] = row["ttft_disagg_ms"] - row["ttft_colocated_ms"]
            row["exposed_frac_of_ttft"] = row["exposed_ms"] / row["ttft_disagg_ms"]
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
        if os.environ.get("PDSERVE_LOG_LEVEL", "").upper() == "DEBUG":
            print_traces(cluster, n=40)
            if os.environ.get("PDSERVE_STEP_PROFILE") == "1":
                results["step_profiles"] = step_profiles(cluster)
                print("step profiles (host queued, device end, step ms):",
                      json.dumps(results["step_profiles"]))
    write_report(results, args.out)


if __name__ == "__main__":
    main()
