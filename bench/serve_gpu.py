"""Serving under load through the OpenAI API: vLLM and pdserve, same client, same lease.

For each system, start its server, wait until it answers, then for each workload send
one warm-up burst and one Poisson run per rate (the client is `pdserve bench --openai`'s,
pdserve/bench/openai_load.py: streamed /v1/completions, token-id prompts, ignore_eos);
then stop the server and move on.

  vllm               python3 -m vllm.entrypoints.openai.api_server --model DIR
                     --load-format dummy (DIR: --shape's config.json, Llama-3-8B by default,
                     + a placeholder tokenizer of its vocabulary, as pdserve's synthetic
                     model has)
  pdserve-colocated  router + one decode worker (no prefill worker), router `mode: never`
                     (what `pdserve up --prefill 0 --config never.yaml` starts)
  pdserve-1p1d       router + prefill + decode sharing the GPU, `mode: always`

Several GPUs (one GPU per worker or server; a layout needing more GPUs than the machine
has is recorded as skipped):
  pdserve-xpyd:XpYd    X prefill + Y decode workers, one GPU each (`pdserve up --gpus`),
                       router `mode: always`, least_loaded
  pdserve-replicas:N   N decode workers prefilling locally, one GPU each, behind
                       pdserve's router, `mode: never`, least_loaded
  vllm-dp:N            one vLLM server, --data-parallel-size N
  vllm-nixl:XpYd       X + Y vLLM servers (one GPU each) with --kv-transfer-config
                       NixlConnector behind bench/pd_proxy.py (prefill with max_tokens=1,
                       then decode); vllm-nixl-1p1d is vllm-nixl:1p1d

Workloads: `INxOUT` (random prompts of IN tokens, OUT output tokens) or
`shared:INxOUT:PREFIX[:K]` (each prompt = one of K random PREFIX-token prefixes + IN-PREFIX
random tokens); `@R1/R2/...` after one overrides --rates for it. Every rate run uses its
own seed, so no run finds another's prompts in a prefix cache.

    python bench/serve_gpu.py --systems vllm,pdserve-colocated,pdserve-1p1d \\
        --workloads 1024x128,4096x256,shared:4096x256:3072 --rates 4,8,16,32,inf \\
        --num-requests 200 --budget-s 560 --out bench/results/serve-h200.json
    python bench/serve_gpu.py --merge a.json b.json --out bench/results/serve-h200.json
    # on the CPU, tiny:
    python bench/serve_gpu.py --systems pdserve-colocated,pdserve-1p1d --workloads 64x8 \\
        --rates 2,inf --num-requests 12 --out bench/results/serve-cpu.json

--budget-s bounds the whole script (it must fit one device call): a system is skipped
when too little is left to start it, a rate when the budget is spent, and a run still
going at the end is cut (its summary says `cut`). A system that fails to start is
recorded with its log's tail, not fatal. --step-profile runs pdserve workers with
PDSERVE_STEP_PROFILE=1 (DEBUG logs: slower) and summarizes their step timings;
--py-spy dumps every pdserve process' stacks once per workload, halfway through its
highest finite rate. Logs stay under --log-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pdserve.bench.loadgen import ArrivalSpec, WorkloadSpec, git_commit, parse_rate, write_json
from pdserve.bench.openai_load import OpenAIBenchConfig, run_benchmark_async

SYSTEMS = ("vllm", "pdserve-colocated", "pdserve-1p1d")
# systems with a size: NAME:SIZE (see the docstring); `vllm-nixl-1p1d` is vllm-nixl:1p1d
SIZED_SYSTEMS = ("pdserve-xpyd", "pdserve-replicas", "vllm-dp", "vllm-nixl")
STOP_RESERVE_S = 20.0     # kept back from the budget to stop a server
MIN_START_S = {"vllm": 150.0, "pdserve-colocated": 40.0, "pdserve-1p1d": 50.0}
MIN_START_S_BY_KIND = {"vllm": 150.0, "vllm-nixl": 170.0, "pdserve": 50.0}
NIXL_SIDE_CHANNEL_BASE = 5557  # vLLM's default VLLM_NIXL_SIDE_CHANNEL_PORT; + i per server


# ---- layouts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What one --systems entry starts. kind: vllm (one server, data_parallel replicas),
    vllm-nixl (prefill + decode vLLM servers behind bench/pd_proxy.py) or pdserve (a
    cluster: prefill/decode workers, router mode). placed: one GPU per worker/server."""
    system: str
    kind: str
    prefill: int = 0
    decode: int = 1
    mode: str = "never"
    data_parallel: int = 1
    placed: bool = False

    @property
    def gpus(self) -> int:
        """GPUs the layout needs (1 for the single-GPU systems, which share one)."""
        if self.kind == "vllm":
            return self.data_parallel
        return self.prefill + self.decode if self.placed else 1

    @property
    def min_start_s(self) -> float:
        return MIN_START_S.get(self.system, MIN_START_S_BY_KIND[self.kind])


def _split(text: str, system: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)p(\d+)d", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ValueError(f"system {system!r}: size must be XpYd with X, Y >= 1 (e.g. 1p3d)")
    return int(m[1]), int(m[2])


def _count(text: str, system: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"system {system!r}: size must be a count >= 1 (e.g. 4)")
    return int(text)


def parse_system(text: str) -> Layout:
    """'vllm', 'pdserve-colocated', 'pdserve-1p1d', 'pdserve-xpyd:1p3d',
    'pdserve-replicas:4', 'vllm-dp:2', 'vllm-nixl:2p2d' or 'vllm-nixl-1p1d'."""
    name = text.strip()
    if name == "vllm":
        return Layout(name, "vllm")
    if name == "pdserve-colocated":
        return Layout(name, "pdserve", prefill=0, decode=1, mode="never")
    if name == "pdserve-1p1d":
        return Layout(name, "pdserve", prefill=1, decode=1, mode="always")
    if name == "vllm-nixl-1p1d":
        return Layout(name, "vllm-nixl", prefill=1, decode=1, placed=True)
    base, _, size = name.partition(":")
    if base not in SIZED_SYSTEMS or not size:
        raise ValueError(f"unknown system {text!r}; choose from {', '.join(SYSTEMS)}, "
                         f"vllm-nixl-1p1d or {', '.join(s + ':SIZE' for s in SIZED_SYSTEMS)}")
    if base == "pdserve-xpyd":
        x, y = _split(size, name)
        return Layout(name, "pdserve", prefill=x, decode=y, mode="always", placed=True)
    if base == "pdserve-replicas":
        return Layout(name, "pdserve", prefill=0, decode=_count(size, name), mode="never",
                      placed=True)
    if base == "vllm-dp":
        return Layout(name, "vllm", data_parallel=_count(size, name), placed=True)
    x, y = _split(size, name)
    return Layout(name, "vllm-nixl", prefill=x, decode=y, placed=True)


def router_yaml(layout: Layout) -> str:
    """pdserve's router policy file for a layout: its mode, least_loaded both roles."""
    return (f"version: 1\nmode: {layout.mode}\nprefill:\n  policy: least_loaded\n"
            f"decode:\n  policy: least_loaded\n")


def pdserve_gpus(layout: Layout) -> tuple[int, ...]:
    """--gpus of a placed pdserve layout: prefill workers on 0..X-1, decode on X..X+Y-1."""
    return tuple(range(layout.prefill + layout.decode)) if layout.placed else ()


@dataclass(frozen=True)
class Command:
    """One process of a layout: its name, argv, extra environment and base URL."""
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    url: str = ""


def vllm_argv(args, folder: Path, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(folder), "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", args.shape, *shlex.split(args.vllm_args), *extra]


def vllm_commands(args, layout: Layout, folder: Path, ports: list[int]) -> list[Command]:
    """The vLLM processes of a layout, in start order: vllm / vllm-dp one server (ports[0]);
    vllm-nixl its prefill servers, decode servers (one GPU each: CUDA_VISIBLE_DEVICES, a
    NIXL side channel port each), then bench/pd_proxy.py on ports[-1]."""
    if layout.kind == "vllm":
        extra = ("--data-parallel-size", str(layout.data_parallel)) \
            if layout.data_parallel > 1 else ()
        return [Command("vllm", tuple(vllm_argv(args, folder, ports[0], extra)),
                        url=f"http://127.0.0.1:{ports[0]}")]
    kv_config = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
    out = []
    roles = ["prefill"] * layout.prefill + ["decode"] * layout.decode
    for gpu, role in enumerate(roles):
        index = sum(r == role for r in roles[:gpu])
        env = (("CUDA_VISIBLE_DEVICES", gpu_name_for(gpu)),
               ("VLLM_NIXL_SIDE_CHANNEL_PORT", str(NIXL_SIDE_CHANNEL_BASE + gpu)))
        argv = vllm_argv(args, folder, ports[gpu], ("--kv-transfer-config", kv_config))
        out.append(Command(f"vllm-{role}-{index}", tuple(argv), env,
                           f"http://127.0.0.1:{ports[gpu]}"))
    proxy = [sys.executable, str(Path(__file__).with_name("pd_proxy.py")), "--port",
             str(ports[len(roles)])]
    for c in out:
        proxy += ["--prefill" if "-prefill-" in c.name else "--decode", c.url]
    out.append(Command("pd-proxy", tuple(proxy), url=f"http://127.0.0.1:{ports[len(roles)]}"))
    return out


def gpu_name_for(index: int) -> str:
    """GPU `index` as CUDA_VISIBLE_DEVICES names it for a child: relative to ours."""
    ours = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    listed = [d.strip() for d in ours.split(",") if d.strip()] if ours else []
    return listed[index] if index < len(listed) else str(index)


def gpu_count() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES, else nvidia-smi -L); 0 without."""
    ours = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ours is not None and ours.strip() not in ("", "-1"):
        return len([d for d in ours.split(",") if d.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        return 0


# ---- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int            # whole prompt, prefix included
    output_len: int
    shared_prefix_len: int = 0
    num_prefixes: int = 1
    rates: tuple[float, ...] = ()  # empty: --rates

    def spec(self, num_requests: int, seed: int) -> WorkloadSpec:
        return WorkloadSpec(num_requests=num_requests,
                            input_len=self.input_len - self.shared_prefix_len,
                            output_len=self.output_len, shared_prefix_len=self.shared_prefix_len,
                            num_prefixes=self.num_prefixes, seed=seed)


def parse_workload(text: str, num_prefixes: int = 4) -> Workload:
    """'1024x128', 'shared:4096x256:3072[:K]', either with '@R1/R2' rates."""
    body, _, rates = text.strip().partition("@")
    m = re.fullmatch(r"(\d+)x(\d+)|shared:(\d+)x(\d+):(\d+)(?::(\d+))?", body)
    if not m:
        raise ValueError(f"bad workload {text!r}: use INxOUT or shared:INxOUT:PREFIX[:K]")
    if m[1]:
        workload = Workload(body, int(m[1]), int(m[2]))
    else:
        workload = Workload(body, int(m[3]), int(m[4]), int(m[5]),
                            int(m[6]) if m[6] else num_prefixes)
    if workload.input_len < 1 or workload.output_len < 1 or workload.num_prefixes < 1 \
            or workload.shared_prefix_len >= workload.input_len:
        raise ValueError(f"bad workload {text!r}: need IN, OUT, K >= 1 and PREFIX < IN")
    if rates:
        workload = replace(workload, rates=tuple(parse_rate(r) for r in rates.split("/")))
    return workload


def rate_label(rate: float) -> str | float:
    return "inf" if math.isinf(rate) else rate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- servers -------------------------------------------------------------------------------
class Server:
    """A running system: its OpenAI base URL, its process ids, a stop()."""

    base_url: str = ""
    log_dir: Path

    def pids(self) -> dict[str, int]:
        return {}

    def stop(self) -> None:
        pass


class VllmServer(Server):
    """vLLM: one server (vllm, vllm-dp:N), or prefill + decode servers and the proxy in
    front of them (vllm-nixl:XpYd); base_url is the last process' (server or proxy)."""

    def __init__(self, args, log_dir: Path, layout: Layout | None = None) -> None:
        layout = layout or Layout("vllm", "vllm")
        self.log_dir = log_dir
        folder = vllm_model_folder(log_dir, args.shape)
        nixl = layout.kind == "vllm-nixl"
        ports = [free_port() for _ in range(layout.prefill + layout.decode + 1 if nixl else 1)]
        self.commands = vllm_commands(args, layout, folder, ports)
        self.base_url = self.commands[-1].url + "/v1"
        self.popens: list[tuple[Command, subprocess.Popen, Path]] = []
        for c in self.commands:
            log = log_dir / f"{c.name}.log"
            (log_dir / f"{c.name}.cmd").write_text(
                " ".join(f"{k}={v}" for k, v in c.env) + (" " if c.env else "")
                + shlex.join(c.argv) + "\n")
            with open(log, "wb") as out:
                # cwd: nothing of this repository shadows vLLM's imports
                popen = subprocess.Popen(list(c.argv), stdout=out, stderr=subprocess.STDOUT,
                                         cwd=log_dir, start_new_session=True,
                                         env={**os.environ, **dict(c.env)})
            self.popens.append((c, popen, log))
        self.popen, self.log = self.popens[0][1], self.popens[0][2]

    def wait(self, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
        deadline = time.monotonic() + timeout_s
        for c, popen, log in self.popens:  # servers first, the proxy (if any) last
            while True:
                if popen.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with {popen.returncode}:\n{tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{c.name} not ready after {timeout_s:.0f} s:\n"
                                       f"{tail(log)}")
                try:
                    with opener.open(c.url + "/v1/models", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(1.0)

    def pids(self) -> dict[str, int]:
        return {c.name: popen.pid for c, popen, _ in self.popens}

    def stop(self) -> None:
        """SIGTERM to each process group (proxy first), then wait until every process in
        them (the engine cores too) is gone, so the next system finds the GPUs free."""
        for _, popen, _ in reversed(self.popens):
            _stop_group(popen)


def _stop_group(popen: subprocess.Popen) -> None:
    try:
        os.killpg(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _group_alive(popen):
        time.sleep(0.5)
    if _group_alive(popen):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


def _group_alive(popen: subprocess.Popen) -> bool:
    popen.poll()  # reap the leader, or it would count as alive
    try:
        os.killpg(popen.pid, 0)
        return True
    except ProcessLookupError:
        return False


def vllm_model_folder(log_dir: Path, shape: str) -> Path:
    """The shape's config.json (pdserve.engine.synthetic.hf_config) and a word-level
    tokenizer of its ids ("<tN>"), as pdserve's synthetic:SHAPE has: both servers
    detokenize the same way."""
    from tokenizers import Tokenizer, models

    from pdserve.engine.synthetic import hf_config

    config = hf_config(shape)
    folder = log_dir / f"{shape}-dummy"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {f"<t{i}>": i for i in range(config["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="<t0>")).save(str(folder / "tokenizer.json"))
    eos = config["eos_token_id"]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
        "bos_token": f"<t{config['bos_token_id']}>",
        "eos_token": f"<t{eos if isinstance(eos, int) else eos[0]}>"}))
    return folder


def pdserve_spec(args, layout: Layout, log_dir: Path, http_port: int):
    """The ClusterSpec of a pdserve layout (its router file written into log_dir)."""
    from pdserve.services.launcher import ClusterSpec

    config = log_dir / "router.yaml"
    config.write_text(router_yaml(layout))
    env = {"PDSERVE_STEP_PROFILE": "1", "PDSERVE_LOG_LEVEL": "DEBUG"} \
        if args.step_profile else {}
    return ClusterSpec(
        connector=args.connector, num_prefill=layout.prefill, num_decode=layout.decode,
        model=pdserve_model(args), http_port=http_port, config=str(config),
        device=args.device, worker_args=tuple(shlex.split(args.pdserve_worker_args)),
        prefill_args=tuple(shlex.split(args.pdserve_prefill_args)),
        log_dir=str(log_dir), env=env, gpus=pdserve_gpus(layout))


class PdserveServer(Server):
    def __init__(self, args, system: str, log_dir: Path) -> None:
        from pdserve.services.launcher import Cluster

        self.log_dir = log_dir
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.cluster = Cluster(pdserve_spec(args, parse_system(system), log_dir, port))

    def wait(self, timeout_s: float) -> None:
        self.cluster.start(timeout_s=timeout_s)

    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.cluster.procs
                if p.popen is not None and p.popen.poll() is None}

    def stop(self) -> None:
        self.cluster.stop()


def pdserve_model(args) -> str | None:
    if args.pdserve_model != "auto":
        return None if args.pdserve_model == "bundled" else args.pdserve_model
    from pdserve.engine.config import resolve_device

    return f"synthetic:{args.shape}" if resolve_device(args.device).startswith("cuda") else None


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---- profiling -----------------------------------------------------------------------------
def py_spy_path(arg: str | None) -> str | None:
    if not arg:
        return None
    if arg != "auto":
        return arg if Path(arg).exists() else None
    found = shutil.which("py-spy")
    if found:
        return found
    for entry in sys.path:  # pip install --target DIR puts the binary in DIR/bin
        candidate = Path(entry or ".") / "bin" / "py-spy"
        if candidate.exists():
            return str(candidate)
    return None


async def py_spy_dumps(exe: str, pids: dict[str, int], delay_s: float, out_dir: Path,
                       tag: str) -> list[str]:
    """After delay_s, `py-spy dump` each process once (it pauses each for a moment)."""
    await asyncio.sleep(delay_s)
    written = []
    for name, pid in pids.items():
        path = out_dir / f"py-spy-{tag}-{name}.txt"
        proc = await asyncio.create_subprocess_exec(
            exe, "dump", "--pid", str(pid), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        path.write_bytes(out)
        written.append(str(path))
    return written


STEP_RE = re.compile(r"step profile: (\d+) tokens, host queued the forward in ([\d.]+) ms, "
                     r"device reached its end at ([\d.]+) ms, step ([\d.]+) ms")


def step_profile_summary(log_dir: Path) -> dict:
    """Per worker log: steps profiled and the median host-queue / device / step ms, for
    decode-only steps (<= 256 tokens, one per sequence) and for steps with a prompt."""
    out = {}
    for log in sorted(log_dir.glob("*-[0-9].log")):
        rows = [(int(m[1]), float(m[2]), float(m[3]), float(m[4]))
                for m in STEP_RE.finditer(log.read_text(errors="replace"))]
        if not rows:
            continue
        entry = {}
        for kind, pick in (("small", lambda t: t <= 256), ("large", lambda t: t > 256)):
            sel = [r for r in rows if pick(r[0])]
            if sel:
                entry[kind] = {"steps": len(sel),
                               **{k: round(statistics.median(r[i] for r in sel), 3)
                                  for i, k in ((0, "tokens"), (1, "host_ms"),
                                               (2, "device_ms"), (3, "step_ms"))}}
        out[log.stem] = entry
    return out


# ---- the runs ------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start) if self.seconds > 0 else math.inf


def bench_config(args, server: Server, workload: Workload, rate: float, num_requests: int,
                 seed: int, deadline_s: float) -> OpenAIBenchConfig:
    return OpenAIBenchConfig(
        base_url=server.base_url, workload=workload.spec(num_requests, seed),
        arrivals=ArrivalSpec(rate=rate, seed=seed), timeout_s=args.request_timeout_s,
        ready_timeout_s=args.ready_timeout_s,
        deadline_s=0.0 if math.isinf(deadline_s) else max(1.0, deadline_s))


async def one_run(cfg: OpenAIBenchConfig, spy: tuple | None,
                  slos: tuple = ()) -> tuple[dict, list[str]]:
    keep = bool(slos)
    if spy is None:
        result, dumps = await run_benchmark_async(cfg, keep_requests=keep), []
    else:
        result, dumps = await asyncio.gather(run_benchmark_async(cfg, keep_requests=keep),
                                             py_spy_dumps(*spy))
    if slos:
        add_slo_rows(result, slos)
    return result, dumps


def parse_slos(text: str) -> tuple:
    """'1000/25,2000/50' -> SLO(TTFT ms, TPOT ms) bounds reported beside the defaults."""
    from pdserve.bench.loadgen import SLO

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", part)
        if not m:
            raise ValueError(f"bad SLO {part!r}: use TTFT_MS/TPOT_MS, e.g. 1000/25")
        out.append(SLO(float(m[1]), float(m[2])))
    return tuple(out)


def add_slo_rows(result: dict, slos: tuple) -> None:
    """Goodput rows for slos (those not there yet) from the run's requests, which are
    then dropped from the result (the JSON keeps summaries only)."""
    from dataclasses import fields

    from pdserve.bench.loadgen import RequestResult, slo_attainment

    names = {f.name for f in fields(RequestResult)}
    records = result.pop("requests", [])
    results = [RequestResult(**{k: v for k, v in r.items() if k in names}) for r in records]
    summary = result["summary"]
    have = {(row["ttft_ms"], row["tpot_ms"]) for row in summary["slo_attainment"]}
    todo = [s for s in slos if (s.ttft_ms, s.tpot_ms) not in have]
    summary["slo_attainment"] += slo_attainment(results, summary["duration_s"], todo)


def run_workload(args, server: Server, system: str, wi: int, workload: Workload,
                 budget: Budget, record: dict, spy_exe: str | None) -> None:
    rates = workload.rates or args.rates
    finite = [r for r in rates if not math.isinf(r)]
    spy_rate = max(finite) if finite else None
    if args.warmup_requests > 0 and budget.left() > STOP_RESERVE_S:
        cfg = bench_config(args, server, workload, math.inf, args.warmup_requests,
                           args.seed + 100_000 + wi, budget.left() - STOP_RESERVE_S)
        result, _ = asyncio.run(one_run(cfg, None))
        record["warmups"].append({"workload": workload.name,
                                  "completed": result["summary"]["completed"],
                                  "duration_s": result["summary"]["duration_s"]})
    for ri, rate in enumerate(rates):
        row = {"workload": workload.name, "input_len": workload.input_len,
               "output_len": workload.output_len,
               "shared_prefix_len": workload.shared_prefix_len, "rate": rate_label(rate)}
        left = budget.left() - STOP_RESERVE_S
        if left <= 5:
            record["runs"].append({**row, "skipped": "budget"})
            continue
        cfg = bench_config(args, server, workload, rate, args.num_requests,
                           args.seed + 1000 * wi + ri, left)
        spy = None
        if spy_exe and rate == spy_rate and isinstance(server, PdserveServer):
            spy = (spy_exe, server.pids(), args.num_requests / rate / 2, server.log_dir,
                   f"{workload.name.replace(':', '-')}-r{rate:g}")
        try:
            result, dumps = asyncio.run(one_run(cfg, spy, args.slo_list))
        except (TimeoutError, ConnectionError) as exc:  # the server stopped answering
            record["runs"].append({**row, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"{system} {workload.name} rate {rate_label(rate)}: {exc}", file=sys.stderr)
            continue
        s = result["summary"]
        env = result["environment"]
        row.update(summary=s, cut=any(k.startswith("cut") for k in s["errors"]),
                   client_cpu_frac=env["client_cpu_frac"], http_client=env["http_client"],
                   loadavg=[env["loadavg_before"], env["loadavg_after"]])
        if dumps:
            row["py_spy"] = dumps
        record["runs"].append(row)
        print(f"{system:18} {workload.name:22} rate {rate_label(rate)!s:>5}: "
              f"{s['completed']}/{s['num_requests']} ok, {s['request_throughput']:.2f} req/s, "
              f"TTFT p90 {fmt_ms(s['ttft_ms'], 'p90')}, TPOT p50 {fmt_ms(s['tpot_ms'], 'p50')}",
              flush=True)


def run_system(args, system: str, workloads: list[Workload], budget: Budget,
               spy_exe: str | None) -> dict:
    record = {"status": "ok", "error": None, "start_s": None, "warmups": [], "runs": []}
    layout = parse_system(system)
    if budget.left() < layout.min_start_s + STOP_RESERVE_S:
        record["status"] = "skipped: budget"
        return record
    if layout.placed and gpu_count() < layout.gpus:
        record["status"] = f"skipped: needs {layout.gpus} GPUs, {gpu_count()} here"
        return record
    log_dir = Path(args.log_dir) / system
    log_dir.mkdir(parents=True, exist_ok=True)
    record["log_dir"] = str(log_dir)
    began = time.monotonic()
    server = None
    try:
        server = VllmServer(args, log_dir, layout) if layout.kind != "pdserve" else \
            PdserveServer(args, system, log_dir)
        server.wait(min(args.start_timeout_s, budget.left() - STOP_RESERVE_S))
        record["start_s"] = round(time.monotonic() - began, 1)
        print(f"{system} ready in {record['start_s']} s", flush=True)
        for wi, workload in enumerate(workloads):
            run_workload(args, server, system, wi, workload, budget, record, spy_exe)
    except Exception as exc:  # recorded; the next system still runs
        record["status"] = "failed" if record["start_s"] is not None else "failed to start"
        record["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        print(f"{system}: {record['status']}: {record['error'][:400]}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    if args.step_profile and layout.kind == "pdserve":
        record["step_profile"] = step_profile_summary(log_dir)
    return record


# ---- report --------------------------------------------------------------------------------
def fmt_ms(dist: dict | None, key: str) -> str:
    if not dist:
        return "-"
    return f"{dist[key]:,.0f} ms" if dist[key] >= 100 else f"{dist[key]:.1f} ms"


def goodput_at(summary: dict, ttft_ms: float, tpot_ms: float) -> float | None:
    for row in summary.get("slo_attainment", ()):
        if row["ttft_ms"] == ttft_ms and row["tpot_ms"] == tpot_ms:
            return row["goodput"]
    return None


def cell(run: dict | None) -> str:
    if run is None:
        return "-"
    if "skipped" in run:
        return f"skipped ({run['skipped']})"
    if "error" in run:
        return "error (see JSON)"
    s = run["summary"]
    failed = f", {s['failed']} failed" if s["failed"] else ""
    good = goodput_at(s, 500.0, 50.0)
    return (f"{s['request_throughput']:.2f}, {fmt_ms(s['ttft_ms'], 'p90')}, "
            f"{fmt_ms(s['tpot_ms'], 'p50')}, {'-' if good is None else f'{good:.2f}'}"
            + failed + (" (cut)" if run.get("cut") else ""))


def markdown_table(result: dict) -> str:
    systems = list(result["systems"])
    keys: list[tuple[str, str]] = []
    for rec in result["systems"].values():
        for run in rec["runs"]:
            key = (run["workload"], str(run["rate"]))
            if key not in keys:
                keys.append(key)
    lines = ["req/s, TTFT p90, TPOT p50, goodput at (500 ms, 50 ms) in req/s", "",
             "| workload | rate (req/s) | " + " | ".join(systems) + " |",
             "|---|---|" + "---|" * len(systems)]
    for workload, rate in keys:
        cells = []
        for system in systems:
            rec = result["systems"][system]
            run = next((r for r in rec["runs"] if (r["workload"], str(r["rate"])) ==
                        (workload, rate)), None)
            cells.append(cell(run) if run or rec["status"] == "ok" else rec["status"])
        lines.append(f"| {workload} | {'burst' if rate == 'inf' else rate} | "
                     + " | ".join(cells) + " |")
    for system, rec in result["systems"].items():
        if rec["status"] != "ok":
            lines.append(f"\n{system}: {rec['status']}" + (f" ({rec['error'][:200]})"
                                                           if rec.get("error") else ""))
    return "\n".join(lines)


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return f"none (CPU: {os.cpu_count()} cores)"


def merge(paths: list[str]) -> dict:
    """Several runs' JSON (e.g. one device call per system) as one; later files win."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in parts[0].items() if k != "systems"}
    merged.update(merged_from=[{"path": p, "commit": d.get("commit"), "gpu": d.get("gpu"),
                                "command": d.get("command")} for p, d in zip(paths, parts)],
                  systems={})
    for d in parts:
        merged["systems"].update(d["systems"])
    return merged


# ---- command line --------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workloads", default="1024x128,4096x256,shared:4096x256:3072")
    p.add_argument("--rates", default="4,8,16,32,inf", help="requests/s; inf = one burst")
    p.add_argument("--num-requests", type=int, default=200, help="per rate")
    p.add_argument("--num-prefixes", type=int, default=4, help="shared workloads' default K")
    p.add_argument("--warmup-requests", type=int, default=8,
                   help="one burst of this many per workload before its rates (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=0.0, help="whole script; 0 = unbounded")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--ready-timeout-s", type=float, default=120.0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--device", default="auto", help="pdserve workers: cpu | cuda | auto")
    p.add_argument("--connector", default="ucx", choices=["ucx", "redis"])
    p.add_argument("--shape", default="llama3-8b",
                   help="random-weight model of this shape on both servers (GPU): a "
                        "pdserve.engine.synthetic shape (llama3-8b, qwen3-8b, qwen3-30b-a3b)")
    p.add_argument("--pdserve-model", default="auto",
                   help="auto: synthetic:SHAPE on CUDA, the bundled model on the CPU")
    p.add_argument("--pdserve-worker-args", default="", help="extra args for both workers")
    p.add_argument("--pdserve-prefill-args", default="", help="extra args for the prefill worker")
    p.add_argument("--vllm-python", default=sys.executable)
    p.add_argument("--vllm-args", default="--max-model-len 8192 --seed 0",
                   help="extra args for the vLLM server (one string)")
    p.add_argument("--step-profile", action="store_true",
                   help="PDSERVE_STEP_PROFILE=1 + DEBUG logs for pdserve workers")
    p.add_argument("--py-spy", nargs="?", const="auto", default=None, metavar="PATH",
                   help="dump pdserve processes' stacks at mid-load (py-spy on PATH by default)")
    p.add_argument("--log-dir", default=None, help="server logs (default: a temp folder)")
    p.add_argument("--slos", default="1000/25,2000/50,500/50",
                   help="TTFT_MS/TPOT_MS bounds to report goodput at, beside the defaults")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier results instead")
    p.add_argument("--out", default="bench/results/serve-h200.json")
    args = p.parse_args(argv)
    try:
        args.rates = tuple(parse_rate(r) for r in args.rates.split(","))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        p.error(f"--rates: {exc}")
    try:
        args.slo_list = parse_slos(args.slos)
    except ValueError as exc:
        p.error(f"--slos: {exc}")
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    try:
        for system in args.system_list:
            parse_system(system)
    except ValueError as exc:
        p.error(str(exc))
    try:
        args.workload_list = [parse_workload(w, args.num_prefixes)
                              for w in args.workloads.split(",") if w.strip()]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        p.error(str(exc))
    if args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        result = merge(args.merge)
    else:
        # absolute: the vLLM server runs in its own folder under it
        args.log_dir = str(Path(args.log_dir or tempfile.mkdtemp(prefix="serve-bench-")).resolve())
        budget = Budget(args.budget_s)
        spy_exe = py_spy_path(args.py_spy)
        if args.py_spy and not spy_exe:
            print("py-spy not found: no stack dumps", file=sys.stderr)
        result = {
            "gpu": gpu_name(), "commit": git_commit(),
            "command": shlex.join([Path(sys.argv[0]).name if argv is None else "serve_gpu.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
            "time_unix": round(time.time(), 1), "budget_s": args.budget_s,
            "client": "pdserve/bench/openai_load.py (httpx, streamed /v1/completions, "
                      "token-id prompts, ignore_eos, Poisson arrivals)",
            "settings": {"workloads": [w.name for w in args.workload_list],
                         "rates": [rate_label(r) for r in args.rates],
                         "num_requests": args.num_requests, "seed": args.seed,
                         "warmup_requests": args.warmup_requests,
                         "pdserve_model": pdserve_model(args), "device": args.device,
                         "connector": args.connector, "vllm_args": args.vllm_args,
                         "pdserve_worker_args": args.pdserve_worker_args,
                         "step_profile": args.step_profile},
            "log_dir": args.log_dir, "systems": {}}
        for system in args.system_list:
            result["systems"][system] = run_system(args, system, args.workload_list, budget,
                                                   spy_exe)
            write_json(args.out, result)  # what is done so far survives a later crash
        result["wall_s"] = round(time.monotonic() - budget.start, 1)
    write_json(args.out, result)
    print(markdown_table(result))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
