"""`pdserve up` and `pdserve demo`: a whole system on this machine.

ucx and redis: every worker and the router is its own process (plus a Valkey server for
redis); each is started, then awaited until it prints its READY line. local: the local
connector moves KV inside one process, so router, prefill and decode share this one.
Ctrl-C or SIGTERM stops everything, router first, then decode, then prefill.

Supervision (`pdserve up`): a child that exits is logged (role, pid, exit status) and
restarted on the same ports after a bounded exponential backoff, reset once it has
stayed up for a while. Children die with `up`, even on kill -9: each sets
PR_SET_PDEATHSIG (SIGTERM) through a small exec shim, and gets its own process group for
a clean stop.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Each child starts through this shim: it asks for SIGTERM when its parent dies
# (PR_SET_PDEATHSIG survives execve), exits if the parent is already gone, then execs the
# real command (same pid). Not a Popen preexec_fn: that forces fork() instead of vfork(),
# and gRPC's fork handlers then abort the child when the parent has gRPC threads running.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def die_with_parent(cmd: list[str]) -> list[str]:
    """cmd, run so that it gets SIGTERM when the thread that starts it dies (so start it
    from a thread that lives as long as the cluster)."""
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


@dataclass(frozen=True)
class Backoff:
    """Restart delays: first_s doubling to max_s; a child that stayed up stable_s
    starts over at first_s."""
    first_s: float = 0.5
    max_s: float = 10.0
    stable_s: float = 30.0

    def next(self, previous_s: float, uptime_s: float) -> float:
        if previous_s <= 0 or uptime_s >= self.stable_s:
            return self.first_s
        return min(self.max_s, previous_s * 2)


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
    backoff: Backoff = field(default_factory=Backoff)
    # the internal secret shared by router and workers: None = PDSERVE_INTERNAL_TOKEN,
    # else a fresh one (Cluster.internal_token)
    internal_token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)  # the router's client key
    # one GPU per worker (placement.py): round-robin over all workers, or per role
    gpus: tuple[int, ...] = ()
    prefill_gpus: tuple[int, ...] = ()
    decode_gpus: tuple[int, ...] = ()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    lines: "queue.Queue[str]"
    address: str = ""
    cmd: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    delay_s: float = 0.0             # the last restart delay (backoff state)
    restart_at: float | None = None  # set while a restart is pending
    ready_at: float | None = None    # time.monotonic() of its last READY line

    @property
    def role(self) -> str:
        return self.name.split("-")[0]


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Cluster:
    """Processes of one system. start() returns the router's gRPC address."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.procs: list[Proc] = []
        self.valkey = None
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="pdserve-logs-"))
        self.router_address = ""
        self.internal_token = cluster_token(spec)
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()  # procs: the supervisor restarts while tests kill
        self.placement = {p.name: p for p in worker_placement(spec)}

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
        if sized or self.placement or not resolve_device(self.spec.device).startswith("cuda"):
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
        """Valkey as one more child (same death and restart rules as the workers); kept
        out of self.procs, which lists pdserve's own processes."""
        from pdserve.kvtransfer.valkey_server import ValkeyServer

        from pdserve.kvtransfer.valkey_server import ValkeySettings
        from pdserve.services.auth import valkey_password

        server = ValkeyServer(ValkeySettings(password=valkey_password(self.internal_token),
                                             config_dir=str(self.log_dir)))
        proc = Proc("valkey", None, queue.Queue(), cmd=server.command(),  # type: ignore[arg-type]
                    env=dict(os.environ))
        proc.address = f"{server.settings.host}:{server.port}"
        self._launch(proc)
        self.valkey = ValkeyChild(proc, server.url)
        self._await_valkey(proc, server.settings.start_timeout_s)
        return server.url

    def _await_valkey(self, proc: Proc, timeout_s: float) -> None:
        host, port = proc.address.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.popen.poll() is None:
            try:
                with socket.create_connection((host, int(port)), 0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64)[:1] in (b"+", b"-"):  # PONG, or NOAUTH: it serves
                        return
            except OSError:
                time.sleep(0.02)
        tail = (self.log_dir / "valkey.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"valkey did not start (exit {proc.popen.poll()}):\n{tail}")

    def _secrets(self, role: str) -> dict:
        """Secrets travel in the environment: /proc/<pid>/cmdline is world-readable."""
        from pdserve.services.auth import TOKEN_ENV

        env = {TOKEN_ENV: self.internal_token}
        if role == "router" and self.spec.api_key:
            env["PDSERVE_API_KEY"] = self.spec.api_key
        return env

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
               **self.spec.env, **self._secrets(role)}
        place = self.placement.get(name)
        if place is not None:  # its own GPU: CUDA_VISIBLE_DEVICES, --device cuda:0, share
            env.update(place.env)
            extra = extra + list(place.args)
        proc = Proc(name, None, queue.Queue(), cmd=cmd + extra, env=env)  # type: ignore[arg-type]
        self._launch(proc)
        self.procs.append(proc)
        return proc

    def _launch(self, proc: Proc) -> None:
        """Start (or restart) proc's command: its own process group, dying with us."""
        mode = "ab" if proc.restarts else "wb"
        with open(self.log_dir / f"{proc.name}.log", mode) as log:
            valkey = proc.role == "valkey"
            proc.popen = subprocess.Popen(
                die_with_parent(proc.cmd), stdout=log if valkey else subprocess.PIPE,
                stderr=log, env=proc.env, start_new_session=True)
        proc.started = time.monotonic()
        proc.ready_at = None
        proc.lines = queue.Queue()
        if not valkey:
            threading.Thread(target=_pump, args=(proc.popen, proc.lines,
                                                 self.log_dir / f"{proc.name}.out", mode),
                             daemon=True).start()

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
                proc.ready_at = time.monotonic()
                _pin_port(proc)
                return proc.address
        tail = (self.log_dir / f"{proc.name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{proc.name} did not start (exit {proc.popen.poll()}):\n{tail}")

    def children(self) -> list[Proc]:
        """Every supervised process: pdserve's own and Valkey."""
        return self.procs + ([self.valkey.proc] if self.valkey is not None else [])

    def proc(self, name: str) -> Proc:
        return next(p for p in self.children() if p.name == name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.proc(name)
        with self._lock:
            popen = p.popen
        if popen.poll() is None:
            os.killpg(popen.pid, sig)
            popen.wait(timeout=30)

    # ---- supervision -------------------------------------------------------------------
    def supervise(self, tick_s: float = 0.1) -> None:
        """Restart children that exit, until stop(). Call on a thread that lives as long
        as the cluster (children die with the thread that forked them)."""
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise_loop, args=(tick_s,),
                                                name="pdserve-supervisor", daemon=True)
            self._supervisor.start()

    def _supervise_loop(self, tick_s: float) -> None:
        while not self._stopping.wait(tick_s):
            for p in self.children():
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._check(p)

    def _check(self, p: Proc) -> None:
        now = time.monotonic()
        if p.restart_at is None:
            code = p.popen.poll()  # reaps: no <defunct> children
            if code is None:
                return
            p.delay_s = self.spec.backoff.next(p.delay_s, now - p.started)
            p.restart_at = now + p.delay_s
            why = self._last_words(p) if code > 0 else ""
            say(f"{p.name} (pid {p.popen.pid}) died: {exit_description(code)}"
                f"{f' ({why})' if why else ''}; restarting in {p.delay_s:.1f} s on "
                f"{p.address or 'its ports'}")
        elif now >= p.restart_at:
            p.restart_at = None
            p.restarts += 1
            try:
                self._launch(p)
            except OSError as exc:
                say(f"{p.name}: restart failed: {exc}")
                p.started = time.monotonic()  # counts as a short life: backoff grows
                p.restart_at = now + p.delay_s
                return
            say(f"{p.name} restarted (pid {p.popen.pid}, restart {p.restarts})")
            if p.role != "valkey":
                threading.Thread(target=self._log_ready, args=(p, p.popen), daemon=True).start()

    def _last_words(self, p: Proc) -> str:
        """The last line a process that exited on its own wrote to its log (its error:
        a worker that keeps failing to start says why on every restart)."""
        try:
            tail = (self.log_dir / f"{p.name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""

    def _log_ready(self, p: Proc, popen: subprocess.Popen) -> None:
        started = time.monotonic()
        while popen.poll() is None and not self._stopping.is_set():
            try:
                line = p.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line.startswith("READY "):
                p.ready_at = time.monotonic()
                say(f"{p.name} (pid {popen.pid}) serving again at {line.split()[2]} after "
                    f"{time.monotonic() - started:.1f} s")
                return

    def stop(self, grace_s: float = 10.0) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=5)
        order = sorted(self.children(),
                       key=lambda p: ("router", "decode", "prefill", "valkey").index(p.role))
        for p in order:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in order:
            try:
                p.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        self.valkey = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ValkeyChild:
    """The cluster's Valkey server: its process and URL."""
    proc: Proc
    url: str

    def stop(self) -> None:
        if self.proc.popen.poll() is None:
            self.proc.popen.terminate()
            self.proc.popen.wait(10)


def say(message: str) -> None:
    print(f"pdserve up: {message}", file=sys.stderr, flush=True)


def _pin_port(proc: Proc) -> None:
    """A restart binds the port the first start got (the router and peers know it)."""
    port = proc.address.rsplit(":", 1)[1]
    if proc.role != "valkey" and proc.cmd[-2:] != ["--port", port]:
        proc.cmd = [*proc.cmd, "--port", port]  # argparse: the last --port wins


def _pump(popen: subprocess.Popen, lines: "queue.Queue[str]", log_path: Path,
          mode: str = "w") -> None:
    """Hand stdout lines to the READY watcher and keep them (UCX prints its protocol
    reports there) in <name>.out beside the stderr log."""
    with open(log_path, mode.replace("b", "")) as log:
        for raw in popen.stdout:
            line = raw.decode(errors="replace").rstrip()
            log.write(line + "\n")
            log.flush()
            lines.put(line.strip())


# ---- local connector: one process -------------------------------------------------------
async def start_in_process(spec: ClusterSpec):
    """Router + prefill + decode in this process (the local connector's home)."""
    from pdserve.engine.config import EngineConfig, resolve_device
    from pdserve.services.auth import InternalAuth
    from pdserve.services.router.service import RouterSettings
    from pdserve.services.serve import start_router, start_worker
    from pdserve.services.worker import WorkerSettings

    device = resolve_device(spec.device)
    gpu = device.startswith("cuda")
    # on a GPU: the fast path, and the card's memory split among the workers
    fast = dict(dtype="bfloat16", attention_backend="triton", cuda_graphs=True,
                kv_cache_memory_gb=0, gpu_memory_utilization=gpu_share(spec)) if gpu else {}
    auth = InternalAuth(token=cluster_token(spec))  # in-process peers still check it
    running = []
    for role, n in (("prefill", spec.num_prefill), ("decode", spec.num_decode)):
        for i in range(n):
            engine = EngineConfig(device=device, allocate_whole_prompt=role == "prefill",
                                  **fast)
            running.append(await start_worker(WorkerSettings(
                role=role, model=spec.model, connector="local", worker_id=f"{role}-{i}",
                engine=engine, internal_auth=auth)))
    router = await start_router(RouterSettings(
        model=spec.model, port=spec.router_port, http_port=spec.http_port,
        config_path=spec.config, api_key=spec.api_key, internal_auth=auth,
        prefill=tuple(r.address for r in running if r.role == "prefill"),
        decode=tuple(r.address for r in running if r.role == "decode")))
    return router, running


def cluster_token(spec: ClusterSpec) -> str:
    from pdserve.services.auth import TOKEN_ENV, check_token, new_token

    given = spec.internal_token or os.environ.get(TOKEN_ENV)
    return check_token(given, "the cluster spec") if given else new_token()


def gpu_share(spec: ClusterSpec) -> float:
    return 0.9 / max(1, spec.num_prefill + spec.num_decode)


def worker_placement(spec: ClusterSpec) -> list:
    """Each worker's GPU, env and arguments ([] without a GPU list); ValueError with a
    message for a list this machine cannot honour."""
    from pdserve.services.placement import plan_workers

    if not (spec.gpus or spec.prefill_gpus or spec.decode_gpus):
        return []
    if spec.connector == "local":
        raise ValueError("--gpus/--prefill-gpus/--decode-gpus place worker processes; the "
                         "local connector runs every worker in one process (use ucx or redis)")
    import torch

    return plan_workers(num_prefill=spec.num_prefill, num_decode=spec.num_decode,
                        gpus=spec.gpus, prefill_gpus=spec.prefill_gpus,
                        decode_gpus=spec.decode_gpus, device=spec.device,
                        worker_args=spec.worker_args,
                        parent_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                        device_count=torch.cuda.device_count())


# ---- commands ----------------------------------------------------------------------------
def spec_from_args(args) -> ClusterSpec:
    from pdserve.services.auth import read_token_file

    from pdserve.services.placement import parse_gpu_list

    token_file = getattr(args, "internal_token_file", None)
    gpus = {key: parse_gpu_list(getattr(args, key, None), "--" + key.replace("_", "-"))
            for key in ("gpus", "prefill_gpus", "decode_gpus")}
    return ClusterSpec(**gpus,connector=args.connector, num_prefill=args.prefill,
                       num_decode=args.decode, model=args.model, router_port=args.port,
                       http_port=args.http_port, config=args.config, device=args.device,
                       internal_token=read_token_file(token_file) if token_file else None,
                       api_key=os.environ.get("PDSERVE_API_KEY") or getattr(args, "api_key", None))


def run_up(args) -> int:
    spec = spec_from_args(args)
    if spec.connector == "local":
        worker_placement(spec)  # refuses GPU lists: one process
        return _run_up_in_process(spec)
    cluster = Cluster(spec)
    print(f"starting {spec.num_prefill} prefill + {spec.num_decode} decode workers "
          f"({spec.connector}); logs in {cluster.log_dir}", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        address = cluster.start()
        cluster.supervise()
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
