"""Chaos benchmark: steady load through the OpenAI API while the prefill worker, the
decode workers and Valkey are killed (SIGKILL) and restarted by the supervisor.

    python bench/chaos.py --device cpu --duration-s 600 --json bench/results/chaos-cpu.json
    python bench/chaos.py --device cuda --duration-s 600 --rate 8 --input-len 1024 \\
        --json bench/results/chaos-h200.json

A `pdserve up`-style cluster (Cluster + its supervisor, --connector redis by default so
Valkey is in the KV path) serves streamed /v1/completions at a fixed rate. Every
--fault-min-s..--fault-max-s seconds (uniform, seeded) the next target in rotation
(prefill-0, decode-0, valkey, decode-1, ...) gets SIGKILL; the supervisor restarts it on
its ports. Reported:
  requests   ok / failed / hung (no answer within --hung-s); failures by error and by
             the fault window they fell in;
  faults     per fault: kill -> restarted process serving (READY; Valkey: PONG) and
             kill -> first probe request that succeeded on the restarted process (a
             worker: the router routed a request there; Valkey: a disaggregated request
             whose KV travelled through Valkey, not recomputed);
  leaks      after the load stops: KV blocks still held on each worker (pool not free);
  growth     per process: RSS, open fds and threads at the start of its span, each
             quarter and the end (a leak still rises in the last quarter).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdserve.bench.loadgen import (RequestResult, WorkloadSpec, environment, summarize,  # noqa: E402
                                   synthesize_prompts)
from pdserve.bench.openai_load import (OpenAIBenchConfig, make_transport, request_body,  # noqa: E402
                                       send_one)
from pdserve.services.launcher import Backoff, Cluster, ClusterSpec  # noqa: E402

PROBES_IN_FLIGHT = 4


@dataclass(frozen=True)
class ChaosConfig:
    device: str = "cpu"
    connector: str = "redis"
    num_prefill: int = 1
    num_decode: int = 2
    duration_s: float = 600.0
    warmup_s: float = 20.0          # load before the first fault
    settle_s: float = 60.0          # after the last fault: restarts finish, pools drain
    fault_min_s: float = 30.0
    fault_max_s: float = 60.0
    rate: float = 1.0               # requests per second
    input_len: int = 64
    output_len: int = 16
    hung_s: float = 120.0           # a request unanswered this long counts as hung
    probe_timeout_s: float = 120.0  # give up measuring a fault's recovery after this
    seed: int = 0
    model: str | None = None


@dataclass
class Fault:
    target: str
    killed_at_s: float
    old_pid: int
    new_pid: int = 0
    serving_after_s: float | None = None   # kill -> restarted process serving
    routed_sent_after_s: float | None = None  # kill -> send of the first probe it served
    routed_after_s: float | None = None    # kill -> that probe's success
    probes: int = 0


@dataclass
class ProcSample:
    name: str
    pid: int
    rss_mb: float
    fds: int
    threads: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(name: str, pid: int) -> ProcSample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exiting (a zombie has no memory)
        return None
    return ProcSample(name, pid, int(fields["VmRSS"].split()[0]) / 1024, fds,
                      int(fields["Threads"]))


# ---- load ---------------------------------------------------------------------------------
async def steady_load(cfg: ChaosConfig, base_url: str, model: str, stop_at: float,
                      t0: float) -> list[RequestResult]:
    """One request every 1/rate s until stop_at (perf_counter); waits for them all."""
    spec = WorkloadSpec(num_requests=int(cfg.duration_s * cfg.rate) + 1,
                        input_len=cfg.input_len, output_len=cfg.output_len, seed=cfg.seed)
    prompts = synthesize_prompts(spec)
    ocfg = OpenAIBenchConfig(base_url=base_url, model=model, workload=spec, timeout_s=cfg.hung_s)
    transport = make_transport()
    url, results, tasks = base_url + "/completions", [], []
    try:
        for i, prompt in enumerate(prompts):
            at = t0 + i / cfg.rate
            if at >= stop_at:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            result = RequestResult(i, scheduled_s=at - t0, prompt_tokens=len(prompt.token_ids))
            results.append(result)
            tasks.append(asyncio.ensure_future(send_one(
                transport, url, request_body(prompt, ocfg, model, i), {}, result, t0,
                cfg.hung_s)))
        await asyncio.gather(*tasks)
    finally:
        await transport.close()
    return results


# ---- faults -------------------------------------------------------------------------------
def probe(cluster: Cluster, fault: Fault, timeout_s: float) -> bool:
    """One small disaggregated request through the router: True if it succeeded on the
    restarted process (a worker: it served it; Valkey: its KV came through Valkey)."""
    from pdserve.client import make_request, stream
    from pdserve.engine.sampling import SamplingParams
    from pdserve.wire import generate_pb2

    ids = [random.randrange(100, 30000) for _ in range(48)]  # never cached
    request = make_request(token_ids=ids, params=SamplingParams(max_tokens=2, ignore_eos=True),
                           mode=generate_pb2.DISAGGREGATION_ALWAYS)
    try:
        last = list(stream(cluster.router_address, request, timeout=timeout_s))[-1]
    except Exception:
        return False
    if fault.target == "valkey":
        return bool(last.prefill_worker) and last.timing.kv_transfer_seconds > 0
    address = cluster.proc(fault.target).address
    return address in (last.prefill_worker, last.decode_worker)


async def measure_recovery(cluster: Cluster, fault: Fault, cfg: ChaosConfig,
                           t0: float) -> None:
    """Wait until the restarted process serves, then send a probe every 0.5 s (at most
    PROBES_IN_FLIGHT open: on a busy host one takes seconds) until one succeeds on it."""
    proc = cluster.proc(fault.target)
    deadline = time.perf_counter() + cfg.probe_timeout_s
    since_kill = lambda: time.perf_counter() - t0 - fault.killed_at_s  # noqa: E731
    while time.perf_counter() < deadline:
        serving = proc.ready_at is not None if fault.target != "valkey" else \
            await asyncio.to_thread(_valkey_pong, proc.address)
        if proc.popen.pid != fault.old_pid and proc.popen.poll() is None and serving:
            fault.new_pid, fault.serving_after_s = proc.popen.pid, since_kill()
            break
        await asyncio.sleep(0.1)
    in_flight: set[asyncio.Future] = set()
    try:
        while fault.serving_after_s is not None and time.perf_counter() < deadline:
            if len(in_flight) < PROBES_IN_FLIGHT:
                fault.probes += 1
                in_flight.add(asyncio.ensure_future(_probe_sent_at(cluster, fault, since_kill())))
            done, in_flight = await asyncio.wait(in_flight, timeout=0.5,
                                                 return_when=asyncio.FIRST_COMPLETED)
            hits = [t.result() for t in done if t.result() is not None]
            if hits:
                fault.routed_sent_after_s, fault.routed_after_s = min(hits), since_kill()
                return
    finally:
        for task in in_flight:
            task.cancel()


async def _probe_sent_at(cluster: Cluster, fault: Fault, sent_s: float) -> float | None:
    """sent_s if the probe succeeded on the restarted process, else None."""
    return sent_s if await asyncio.to_thread(probe, cluster, fault, 60.0) else None


def _valkey_pong(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), 0.3) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64)[:1] in (b"+", b"-")  # PONG, or NOAUTH: it serves
    except OSError:
        return False


async def inject_faults(cluster: Cluster, cfg: ChaosConfig, t0: float,
                        stop_at: float) -> list[Fault]:
    rng = random.Random(cfg.seed)
    targets = ["prefill-0", "decode-0"] + (["valkey"] if cluster.valkey else []) + \
        [f"decode-{i}" for i in range(1, cfg.num_decode)] + \
        [f"prefill-{i}" for i in range(1, cfg.num_prefill)]
    faults: list[Fault] = []
    next_at = t0 + cfg.warmup_s
    while True:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if time.perf_counter() >= stop_at:
            return faults
        target = targets[len(faults) % len(targets)]
        proc = cluster.proc(target)
        fault = Fault(target, time.perf_counter() - t0, proc.popen.pid)
        print(f"[{fault.killed_at_s:7.1f} s] SIGKILL {target} (pid {fault.old_pid})",
              file=sys.stderr, flush=True)
        await asyncio.to_thread(cluster.kill, target)
        faults.append(fault)
        await measure_recovery(cluster, fault, cfg, t0)
        print(f"[{time.perf_counter() - t0:7.1f} s] {target}: serving after "
              f"{_s(fault.serving_after_s)}, first probe it served sent after "
              f"{_s(fault.routed_sent_after_s)} (done {_s(fault.routed_after_s)})",
              file=sys.stderr, flush=True)
        next_at = t0 + fault.killed_at_s + rng.uniform(cfg.fault_min_s, cfg.fault_max_s)


async def sample_processes(cluster: Cluster, stop: asyncio.Event,
                           samples: dict[int, list[ProcSample]]) -> None:
    while not stop.is_set():
        for p in [*cluster.children()]:
            s = sample(p.name, p.popen.pid)
            if s is not None:
                samples.setdefault(s.pid, []).append(s)
        own = sample("chaos-client", os.getpid())
        if own is not None:
            samples.setdefault(own.pid, []).append(own)
        try:
            await asyncio.wait_for(stop.wait(), 5.0)
        except asyncio.TimeoutError:
            pass


# ---- end state ----------------------------------------------------------------------------
async def pools_after(cluster: Cluster, timeout_s: float = 60.0) -> dict:
    """Each worker's pool once transfers and aborts settle (up to timeout_s)."""
    from pdserve.services.common import internal_channel
    from pdserve.wire import worker_pb2, worker_pb2_grpc

    token = getattr(cluster, "internal_token", None)
    deadline = time.monotonic() + timeout_s
    while True:
        pools = {}
        for p in cluster.procs:
            if p.role == "router":
                continue
            stub_cls = (worker_pb2_grpc.PrefillServiceStub if p.role == "prefill"
                        else worker_pb2_grpc.DecodeServiceStub)
            channel = internal_channel(p.address, None, internal_token=token)
            try:
                s = await stub_cls(channel).Stats(worker_pb2.StatsRequest(), timeout=10)
                pools[p.name] = {"free": s.num_free_blocks, "total": s.num_total_blocks,
                                 "held": s.num_total_blocks - s.num_free_blocks,
                                 "running": s.num_requests_running,
                                 "waiting": s.num_requests_waiting}
            except Exception as exc:
                pools[p.name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            finally:
                await channel.close()
        busy = any(v.get("held", 1) or v.get("running") or v.get("waiting")
                   for v in pools.values())
        if not busy or time.monotonic() > deadline:
            return pools
        await asyncio.sleep(1.0)


def growth(samples: dict[int, list[ProcSample]], min_span: int = 3) -> list[dict]:
    """Per process: RSS, fds and threads at the start of its span (after the start-up
    sample), at each quarter and at the end; a leak keeps rising in the last quarters
    where a pool that grew to its bound (gRPC channels, thread pools) levels off."""
    out = []
    for pid, seq in samples.items():
        if len(seq) < min_span:
            continue
        span = seq[1:] if len(seq) > 2 else seq  # skip the start-up sample
        points = [span[round(q * (len(span) - 1) / 4)] for q in range(5)]
        out.append({"name": span[0].name, "pid": pid, "samples": len(seq),
                    "rss_mb": [round(p.rss_mb, 1) for p in points],
                    "fds": [p.fds for p in points], "threads": [p.threads for p in points]})
    return sorted(out, key=lambda g: (g["name"], g["pid"]))


def classify(results: list[RequestResult], faults: list[Fault], hung_s: float) -> dict:
    """Counts, and each failure's error and the fault (if any) it followed within 10 s."""
    failures = []
    for r in results:
        if r.ok:
            continue
        end = r.sent_s + (r.e2e_s or 0.0)
        near = [f for f in faults if f.killed_at_s - 1.0 <= end <= f.killed_at_s + 10.0 or
                f.killed_at_s - 1.0 <= r.sent_s <= f.killed_at_s + 10.0]
        failures.append({"index": r.index, "sent_s": round(r.sent_s, 2), "error": r.error[:200],
                         "near_fault": near[0].target if near else None,
                         "tokens_before": r.output_tokens})
    hung = sum(1 for r in results if r.error == "client:timeout")
    return {"sent": len(results), "ok": sum(r.ok for r in results),
            "failed": len(failures) - hung, "hung": hung, "failures": failures}


async def run(cfg: ChaosConfig) -> dict:
    http_port = free_port()
    spec = ClusterSpec(connector=cfg.connector, num_prefill=cfg.num_prefill,
                       num_decode=cfg.num_decode, model=cfg.model, device=cfg.device,
                       http_port=http_port, backoff=Backoff(first_s=0.5, max_s=10.0))
    with Cluster(spec) as cluster:
        started = time.perf_counter()
        await asyncio.to_thread(cluster.start, 600.0)
        cluster.supervise()
        print(f"cluster up in {time.perf_counter() - started:.0f} s (logs {cluster.log_dir})",
              file=sys.stderr, flush=True)
        from pdserve.engine.loader import load_model_meta

        model = load_model_meta(cfg.model)[0].name
        base_url = f"http://127.0.0.1:{http_port}/v1"
        samples: dict[int, list[ProcSample]] = {}
        stop_sampling = asyncio.Event()
        sampler = asyncio.ensure_future(sample_processes(cluster, stop_sampling, samples))
        t0 = time.perf_counter()
        stop_at = t0 + cfg.duration_s
        load = asyncio.ensure_future(steady_load(cfg, base_url, model, stop_at, t0))
        faults = await inject_faults(cluster, cfg, t0, stop_at - cfg.fault_min_s / 2)
        results = await load
        duration = time.perf_counter() - t0
        pools = await pools_after(cluster, cfg.settle_s)
        stop_sampling.set()
        await sampler
        restarts = {p.name: p.restarts for p in cluster.children()}
    return {"config": asdict(cfg), "environment": environment(), "duration_s": duration,
            "requests": classify(results, faults, cfg.hung_s),
            "latency": summarize(results, duration),
            "faults": [asdict(f) for f in faults], "restarts": restarts,
            "pools_after": pools, "leaked_blocks": sum(v.get("held", 0) for v in pools.values()),
            "processes": growth(samples)}


def _series(values: list) -> str:
    return "->".join(str(v) for v in values)


def report(result: dict) -> str:
    req = result["requests"]
    lines = [f"requests: {req['sent']} sent, {req['ok']} ok, {req['failed']} failed, "
             f"{req['hung']} hung over {result['duration_s']:.0f} s"]
    for f in result["faults"]:
        lines.append(f"  {f['target']:10s} killed at {f['killed_at_s']:6.1f} s: serving after "
                     f"{_s(f['serving_after_s'])}, routed (probe sent) after "
                     f"{_s(f['routed_sent_after_s'])}, served after {_s(f['routed_after_s'])}")
    lines.append(f"leaked blocks: {result['leaked_blocks']}  pools: {result['pools_after']}")
    for g in result["processes"]:
        lines.append(f"  {g['name']:12s} pid {g['pid']:7d}: RSS {_series(g['rss_mb'])} MB, "
                     f"fds {_series(g['fds'])}, threads {_series(g['threads'])}")
    for fl in req["failures"][:20]:
        lines.append(f"  failed #{fl['index']} at {fl['sent_s']} s near {fl['near_fault']}: "
                     f"{fl['error']}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def main(argv: list[str] | None = None) -> int:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: where a stuck run waits
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = ChaosConfig()
    p.add_argument("--device", default=d.device)
    p.add_argument("--connector", default=d.connector, choices=["redis", "ucx"])
    p.add_argument("--prefill", type=int, default=d.num_prefill)
    p.add_argument("--decode", type=int, default=d.num_decode)
    p.add_argument("--duration-s", type=float, default=d.duration_s)
    p.add_argument("--warmup-s", type=float, default=d.warmup_s)
    p.add_argument("--fault-min-s", type=float, default=d.fault_min_s)
    p.add_argument("--fault-max-s", type=float, default=d.fault_max_s)
    p.add_argument("--rate", type=float, default=d.rate)
    p.add_argument("--input-len", type=int, default=d.input_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--hung-s", type=float, default=d.hung_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if not 0 < args.fault_min_s <= args.fault_max_s:
        print("chaos: error: need 0 < --fault-min-s <= --fault-max-s", file=sys.stderr)
        return 2
    cfg = ChaosConfig(device=args.device, connector=args.connector, num_prefill=args.prefill,
                      num_decode=args.decode, duration_s=args.duration_s,
                      warmup_s=args.warmup_s, fault_min_s=args.fault_min_s,
                      fault_max_s=args.fault_max_s, rate=args.rate, input_len=args.input_len,
                      output_len=args.output_len, hung_s=args.hung_s, seed=args.seed,
                      model=args.model)
    result = asyncio.run(run(cfg))
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
