"""`pdserve up` and `pdserve demo`: a whole system on this machine.

ucx and redis: every worker and the router is its own process (plus a Valkey server for
redis); each is started, then awaited until it prints its READY line. local: the local
connector moves KV inside one process, so router, prefill and decode share this one.
Ctrl-C or SIGTERM stops everything, router first, then decode, then prefill.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ClusterSpec:
    connector: str = "ucx"
    num_prefill: int = 1
    num_decode: int = 1
    model: str | None = None
    router_port: int = 0
    http_port: int = 0
    config: str | None = None
    device: str = "cpu"
    worker_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    log_dir: str | None = None
    env: dict = field(default_factory=dict)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    lines: "queue.Queue[str]"
    address: str = ""


class Cluster:
    """Processes of one system. start() returns the router's gRPC address."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.procs: list[Proc] = []
        self.valkey = None
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="pdserve-logs-"))
        self.router_address = ""

    def _blas_threads(self, role: str) -> dict:
        """CPU workers on one host split its cores among their BLAS thread pools (each
        pool spins on every core it has, and two spinning pools on one core stall
        each other); an OPENBLAS_NUM_THREADS already set wins."""
        from pdserve.engine.config import resolve_device

        if role == "router" or "OPENBLAS_NUM_THREADS" in os.environ or \
                resolve_device(self.spec.device) != "cpu":
            return {}
        workers = self.spec.num_prefill + self.spec.num_decode
        return {"OPENBLAS_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}

    def _gpu_share_args(self) -> list[str]:
        """Workers on this host share its (first) GPU: each gets an equal part of the
        memory unless the worker arguments size the KV pool themselves."""
        from pdserve.engine.config import resolve_device

        sized = {a.split("=")[0] for a in self.spec.worker_args} & {
            "--kv-cache-gb", "--gpu-memory-utilization", "--num-blocks"}
        if sized or not resolve_device(self.spec.device).startswith("cuda"):
            return []
        return ["--gpu-memory-utilization", f"{gpu_share(self.spec):.3f}"]

    def start(self, timeout_s: float = 240.0) -> str:
        try:
            worker_args = list(self.spec.worker_args) + self._gpu_share_args()
            if self.spec.connector == "redis":
                worker_args += ["--redis-url", self._start_valkey()]
            prefill = [self._spawn(f"prefill-{i}", "prefill", worker_args + list(self.spec.prefill_args))
                       for i in range(self.spec.num_prefill)]
            decode = [self._spawn(f"decode-{i}", "decode", worker_args + list(self.spec.decode_args))
                      for i in range(self.spec.num_decode)]
            for p in prefill + decode:
                self._await_ready(p, timeout_s)
            router_args = list(self.spec.router_args)
            for p in prefill:
                router_args += ["--prefill", p.address]
            for p in decode:
                router_args += ["--decode", p.address]
            router = self._spawn("router", "router", router_args)
            self.router_address = self._await_ready(router, timeout_s)
            return self.router_address
        except BaseException:
            self.stop()
            raise

    def _start_valkey(self) -> str:
        from pdserve.kvtransfer.valkey_server import ValkeyServer

        self.valkey = ValkeyServer().start()
        return self.valkey.url

    def _spawn(self, name: str, role: str, extra: list[str]) -> Proc:
        cmd = [sys.executable, "-m", "pdserve.cli", role, "--port", "0"]
        if role == "router":
            cmd += ["--port", str(self.spec.router_port)]
            if self.spec.http_port:
                cmd += ["--http-port", str(self.spec.http_port)]
            if self.spec.config:
                cmd += ["--config", self.spec.config]
        else:
            cmd += ["--connector", self.spec.connector, "--worker-id", name,
                    "--device", self.spec.device]
        if self.spec.model:
            cmd += ["--model", self.spec.model]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self._blas_threads(role),
               **self.spec.env}
        log = open(self.log_dir / f"{name}.log", "wb")
        popen = subprocess.Popen(cmd + extra, stdout=subprocess.PIPE, stderr=log, env=env,
                                 start_new_session=True)
        proc = Proc(name, popen, queue.Queue())
        threading.Thread(target=_pump, args=(popen, proc.lines, self.log_dir / f"{name}.out"),
                         daemon=True).start()
        self.procs.append(proc)
        return proc

    def _await_ready(self, proc: Proc, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = proc.lines.get(timeout=0.2)
            except queue.Empty:
                if proc.popen.poll() is not None:
                    break
                continue
            if line.startswith("READY "):
                proc.address = line.split()[2]
                return proc.address
        tail = (self.log_dir / f"{proc.name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{proc.name} did not start (exit {proc.popen.poll()}):\n{tail}")

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.proc(name)
        if p.popen.poll() is None:
            os.killpg(p.popen.pid, sig)
            p.popen.wait(timeout=30)

    def stop(self, grace_s: float = 10.0) -> None:
        order = sorted(self.procs, key=lambda p: ("router", "decode", "prefill").index(p.name.split("-")[0]))
        for p in order:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in order:
            try:
                p.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pump(popen: subprocess.Popen, lines: "queue.Queue[str]", log_path: Path) -> None:
    """Hand stdout lines to the READY watcher and keep them (UCX prints its protocol
    reports there) in <name>.out beside the stderr log."""
    with open(log_path, "w") as log:
        for raw in popen.stdout:
            line = raw.decode(errors="replace").rstrip()
            log.write(line + "\n")
            log.flush()
            lines.put(line.strip())


# ---- local connector: one process -------------------------------------------------------
async def start_in_process(spec: ClusterSpec):
    """Router + prefill + decode in this process (the local connector's home)."""
    from pdserve.engine.config import EngineConfig, resolve_device
    from pdserve.services.router.service import RouterSettings
    from pdserve.services.serve import start_router, start_worker
    from pdserve.services.worker import WorkerSettings

    device = resolve_device(spec.device)
    gpu = device.startswith("cuda")
    # on a GPU: the fast path, and the card's memory split among the workers
    fast = dict(dtype="bfloat16", attention_backend="triton", cuda_graphs=True,
                kv_cache_memory_gb=0, gpu_memory_utilization=gpu_share(spec)) if gpu else {}
    running = []
    for role, n in (("prefill", spec.num_prefill), ("decode", spec.num_decode)):
        for i in range(n):
            engine = EngineConfig(device=device, allocate_whole_prompt=role == "prefill",
                                  **fast)
            running.append(await start_worker(WorkerSettings(
                role=role, model=spec.model, connector="local", worker_id=f"{role}-{i}",
                engine=engine)))
    router = await start_router(RouterSettings(
        model=spec.model, port=spec.router_port, http_port=spec.http_port,
        config_path=spec.config,
        prefill=tuple(r.address for r in running if r.role == "prefill"),
        decode=tuple(r.address for r in running if r.role == "decode")))
    return router, running


def gpu_share(spec: ClusterSpec) -> float:
    return 0.9 / max(1, spec.num_prefill + spec.num_decode)


# ---- commands ----------------------------------------------------------------------------
def spec_from_args(args) -> ClusterSpec:
    return ClusterSpec(connector=args.connector, num_prefill=args.prefill,
                       num_decode=args.decode, model=args.model, router_port=args.port,
                       http_port=args.http_port, config=args.config, device=args.device)


def run_up(args) -> int:
    spec = spec_from_args(args)
    if spec.connector == "local":
        return _run_up_in_process(spec)
    cluster = Cluster(spec)
    print(f"starting {spec.num_prefill} prefill + {spec.num_decode} decode workers "
          f"({spec.connector}); logs in {cluster.log_dir}", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        address = cluster.start()
        print(f"pdserve is up: router {address}"
              + (f", OpenAI HTTP http://127.0.0.1:{spec.http_port}/v1" if spec.http_port else ""),
              flush=True)
        print("READY up " + address, flush=True)
        stop.wait()
    finally:
        print("stopping...", file=sys.stderr)
        cluster.stop()
    return 0


def _run_up_in_process(spec: ClusterSpec) -> int:
    from pdserve.services.serve import run, wait_for_signal

    async def main() -> None:
        router, workers = await start_in_process(spec)
        print(f"pdserve is up: router {router.address}", flush=True)
        print("READY up " + router.address, flush=True)
        try:
            await wait_for_signal()
        finally:
            await router.stop()
            for w in reversed(workers):
                await w.stop()

    return run(main())


def run_demo(args) -> int:
    """make run: bring the system up, stream one chat answer through it, stop."""
    from pdserve.client import make_request, stream
    from pdserve.engine.sampling import SamplingParams

    spec = spec_from_args(args)
    cluster = Cluster(spec)
    print(f"starting router + {spec.num_prefill} prefill + {spec.num_decode} decode "
          f"({spec.connector} KV connector); logs in {cluster.log_dir}", file=sys.stderr)
    with cluster:
        address = cluster.start()
        print(f"router at {address}; asking: {args.chat}\n", file=sys.stderr)
        request = make_request(chat=[{"role": "user", "content": args.chat}],
                               params=SamplingParams(max_tokens=args.max_tokens))
        last = None
        for chunk in stream(address, request, timeout=300):
            print(chunk.text_delta, end="", flush=True)
            last = chunk
        print()
        if last is not None:
            print(f"\n[{last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} "
                  f"generated tokens; TTFT {last.timing.ttft_seconds * 1000:.0f} ms; "
                  f"prefill {last.prefill_worker or '-'} -> decode {last.decode_worker}]",
                  file=sys.stderr)
    return 0
