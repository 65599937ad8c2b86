"""KV transfer throughput per connector.

Moves a KV payload (default ~0.5 GB) from a prefill pool to a decode pool through each
connector and reports GB/s from begin() to the receiver reporting DONE (stamped by its
on_done callback), next to the baseline: one copy of the same payload between two buffers
of that device, measured in the same run (`fraction_of_copy`). The receiver
(decode) runs in a separate spawned process for ucx and redis (for local it must share
the process). Destination blocks are scattered as shuffled runs of --run-blocks blocks.

    python bench/kv_transfer.py                           # CPU, all connectors
    python bench/kv_transfer.py --payload-mb 64           # scaled down
    python bench/kv_transfer.py --device cuda --connectors ucx,local   # two procs, one GPU
    python bench/kv_transfer.py ... --begin-ahead-ms 5   # clock from the first chunk

With --begin-ahead-ms the transfer is registered (begin) that long before its first
chunk and the clock starts at the chunk, as in serving: the decode worker's destination
reaches the prefill worker while the prompt computes, so setting the transfer up (for
same-host GPU peers: the receiver admitting it) is off the path.

With --busy-ahead (CUDA) the device computes through that gap and the host syncs with it
before the first chunk, as a prefill worker's prompt computes and its sampled token is read
back before the last chunk goes out: the copy then starts on a busy device, as in serving,
not on one that sat idle (after 5 ms idle, the H100 copied 0.5 GB 1-20% slower than back to
back; the results also give the baseline copy after the same idle gap).

Both processes run with the workers' GIL switch interval (--switch-interval-s), as the
connectors do in serving.

With --trace (ucx) both processes log the transfer's hops at DEBUG on the host-wide
monotonic clock, and the hops of the last transfer are printed in time order to stderr.

Output: JSON (machine, commit, config, results) to stdout and --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pdserve.bench.loadgen import git_commit  # noqa: E402
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec  # noqa: E402
from pdserve.kvtransfer import TransferState, make_receiver, make_sender  # noqa: E402
from pdserve.kvtransfer.messages import (HandshakeInfo, destination_from_proto,  # noqa: E402
                                         destination_to_proto)
from pdserve.services.serve import WORKER_SWITCH_INTERVAL_S  # noqa: E402
from pdserve.wire import kv_pb2  # noqa: E402

FINGERPRINT = "bench-kv-transfer"
trace_log = logging.getLogger("bench.kv_transfer")


BLOCK_SHAPES = {
    "smollm2": dict(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16),
    "llama3-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16),
}


def bench_spec(payload_bytes: int, dtype: str, model: str = "smollm2") -> KVCacheSpec:
    """Blocks shaped like the named model's KV (16 tokens per block)."""
    shape = dict(BLOCK_SHAPES[model], dtype=dtype)
    per_block = KVCacheSpec(num_blocks=1, **shape).bytes_per_block
    return KVCacheSpec(num_blocks=max(2, payload_bytes // per_block), **shape)


def scattered_blocks(num_blocks: int, run_blocks: int, seed: int) -> list[int]:
    runs = [list(range(i, min(i + run_blocks, num_blocks)))
            for i in range(0, num_blocks, run_blocks)]
    random.Random(seed).shuffle(runs)
    return [b for run in runs for b in run]


def block_keys(transfer_id: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{transfer_id}:{i}".encode(), digest_size=16).digest()
            for i in range(n)]


def hello(spec: KVCacheSpec, connector: str, role: str, device: str) -> HandshakeInfo:
    return HandshakeInfo.from_spec(spec, model_fingerprint=FINGERPRINT, connector=connector,
                                   role=role, device_type=device)


def connector_settings(name: str, redis_url: str | None):
    if name == "ucx":
        from pdserve.kvtransfer.ucx import UcxSettings
        return UcxSettings(io_timeout_s=120, lease_s=600)
    if name == "redis":
        from pdserve.kvtransfer.redis_pool import RedisSettings
        return RedisSettings(url=redis_url, lease_s=600, ttl_s=600)
    from pdserve.kvtransfer.local import LocalSettings
    return LocalSettings(lease_s=600)


# -- receiver process -------------------------------------------------------------------
def receiver_main(conn, name, spec, device, redis_url, run_blocks, hops_file="",
                  switch_interval_s=WORKER_SWITCH_INTERVAL_S):
    """Decode side: for each transfer id received, expect it, send the destination back,
    report 'STATE seconds' once terminal. Like the decode worker, it learns the outcome
    from the connector's callbacks (on_done / on_release), not by polling."""
    sys.setswitchinterval(switch_interval_s)
    if hops_file:
        _log_hops_to(hops_file)
    if device == "cuda":
        torch.cuda.set_device(0)
    pool = KVCachePool(spec, device=device)
    receiver = make_receiver(name, pool, hello(spec, name, "decode", device),
                             connector_settings(name, redis_url))
    conn.send_bytes(b"ready")
    dst = scattered_blocks(spec.num_blocks, run_blocks, seed=1)
    while True:
        transfer_id = conn.recv_bytes().decode()
        if transfer_id == "exit":
            break
        done_at: list[float] = []  # stamped on the connector thread that saw DONE
        ended = threading.Event()
        destination = receiver.expect(
            transfer_id, dst, block_keys=block_keys(transfer_id, len(dst)),
            on_done=lambda _status: _done(done_at, transfer_id, ended),
            on_release=lambda _status, _blocks: ended.set())
        conn.send_bytes(destination_to_proto(destination).SerializeToString())
        ended.wait(600)
        status = receiver.poll()[transfer_id]
        finished = done_at[0] if done_at else time.time()
        conn.send_bytes(f"{status.state.name} {finished:.6f}".encode())
        receiver.release(transfer_id)
    receiver.close()


def _done(done_at: list[float], transfer_id: str, ended: threading.Event) -> None:
    done_at.append(time.time())
    _hop(transfer_id, "bench: receiver DONE")
    ended.set()


def _hop(transfer_id: str, event: str) -> None:
    """A hop in the connectors' trace format (kvtransfer/ucx/inplace.py _trace)."""
    if trace_log.isEnabledFor(logging.DEBUG):
        trace_log.debug("trace %s %s %.3f", transfer_id, event, time.monotonic() * 1000)


def _log_hops_to(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("pdserve.kvtransfer", "bench.kv_transfer"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False


def print_hops(paths: list[Path], transfer_id: str) -> None:
    """The traced hops of one transfer from every process, in time order."""
    hops = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith(f"trace {transfer_id} "):
                *event, stamp = line.split(" ")[2:]
                hops.append((float(stamp), " ".join(event)))
    hops.sort()
    for stamp, event in hops:
        print(f"{stamp - hops[0][0]:8.3f} ms  {event}", file=sys.stderr)


def run_connector(name: str, spec: KVCacheSpec, args, redis_url: str | None) -> dict:
    device = args.device
    src_pool = KVCachePool(spec, device=device)
    src_pool.kv.copy_(torch.randn(src_pool.kv.shape, device=device).to(src_pool.kv.dtype))
    src = list(range(spec.num_blocks))
    sender = make_sender(name, src_pool, hello(spec, name, "prefill", device),
                         connector_settings(name, redis_url))
    if name == "local":
        return _run_in_process(name, spec, args, sender, src)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    trace_dir = Path(args.trace_dir) if args.trace else None
    if trace_dir is not None:
        _log_hops_to(str(trace_dir / f"{name}-sender.log"))
    process = ctx.Process(target=receiver_main,
                          args=(child, name, spec, device, redis_url, args.run_blocks,
                                str(trace_dir / f"{name}-receiver.log") if trace_dir else "",
                                args.switch_interval_s))
    process.start()
    try:
        assert parent.poll(120) and parent.recv_bytes() == b"ready"
        seconds, sender_seconds = [], []
        for rep in range(args.warmup + args.repeats):
            transfer_id = f"{name}-{rep}"
            parent.send_bytes(transfer_id.encode())
            destination = destination_from_proto(
                kv_pb2.KVDestination.FromString(parent.recv_bytes()))
            started = _send_chunked(sender, destination, src, args, time.time)
            sent = sender.wait(transfer_id, 600)
            state, finished = parent.recv_bytes().decode().split()
            if sent.state is not TransferState.DONE or state != "DONE":
                raise RuntimeError(f"{name}: sender {sent.state.name} {sent.error}, "
                                   f"receiver {state}")
            if rep >= args.warmup:
                seconds.append(float(finished) - started)
                sender_seconds.append(sent.seconds)
            sender.release(transfer_id)
        parent.send_bytes(b"exit")
        process.join(30)
        if trace_dir is not None:
            print_hops(sorted(trace_dir.glob(f"{name}-*.log")), transfer_id)
    finally:
        sender.close()
        if process.is_alive():
            process.kill()
    return _result(name, spec, args, seconds, sender_seconds, sender.metrics)


def _run_in_process(name, spec, args, sender, src) -> dict:
    dst_pool = KVCachePool(spec, device=args.device)
    receiver = make_receiver(name, dst_pool, hello(spec, name, "decode", args.device),
                             connector_settings(name, None))
    dst = scattered_blocks(spec.num_blocks, args.run_blocks, seed=1)
    seconds, sender_seconds = [], []
    for rep in range(args.warmup + args.repeats):
        transfer_id = f"{name}-{rep}"
        destination = receiver.expect(transfer_id, dst)
        started = _send_chunked(sender, destination, src, args, time.perf_counter)
        status = receiver.wait(transfer_id, 600)
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        assert status.state is TransferState.DONE, status
        sent = sender.wait(transfer_id, 60)
        if rep >= args.warmup:
            seconds.append(elapsed)
            sender_seconds.append(sent.seconds)
        sender.release(transfer_id)
        receiver.release(transfer_id)
    assert torch.equal(dst_pool.read_blocks(dst), sender.pool.read_blocks(src))
    sender.close()
    receiver.close()
    return _result(name, spec, args, seconds, sender_seconds, sender.metrics)


def device_copy_seconds(spec: KVCacheSpec, device: str, repeats: int,
                        idle_ms: float = 0.0) -> list[float]:
    """The baseline: one copy of the whole payload between two buffers on the device, back
    to back (idle_ms > 0: each after the device sat idle that long)."""
    src = torch.empty(spec.num_blocks * spec.bytes_per_block, dtype=torch.uint8,
                      device=device)
    dst = torch.empty_like(src)
    seconds = []
    for rep in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        if idle_ms > 0:
            time.sleep(idle_ms / 1000)
        started = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        if rep:
            seconds.append(time.perf_counter() - started)
    return seconds


def _send_chunked(sender, destination, src, args, clock) -> float:
    """Send the payload in args.chunks chunks; returns when the clock started: at begin(),
    or with begin_ahead_ms > 0 at the first chunk, begin() having run that much earlier
    (as in serving, where the destination arrives while the prompt still computes)."""
    started = clock()
    _hop(destination.transfer_id, "bench: begin")
    sender.begin(destination)
    if args.begin_ahead_ms > 0:
        _wait_ahead(args.begin_ahead_ms / 1000, args.busy_ahead and args.device == "cuda")
        started = clock()
        _hop(destination.transfer_id, "bench: first chunk")
    per_chunk = -(-len(src) // args.chunks)
    for start in range(0, len(src), per_chunk):
        sender.send_chunk(destination.transfer_id, src[start:start + per_chunk], start=start,
                          last=start + per_chunk >= len(src))
    return started


def _wait_ahead(seconds: float, busy: bool) -> None:
    """The gap between begin() and the first chunk: idle, or (busy) the device computing
    until the chunk is sent and the host synced with it, as a prefill worker's prompt
    computes and its sampled token is read back before the last chunk goes out."""
    if not busy:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    x = torch.ones(4096, 4096, dtype=torch.bfloat16, device="cuda")  # ~0.1 ms a matmul
    while time.perf_counter() < end:
        torch.mm(x, x)
        torch.cuda.synchronize()


def _result(name, spec, args, seconds, sender_seconds, metrics) -> dict:
    payload = spec.num_blocks * spec.bytes_per_block
    return {
        "connector": name, "device": args.device, "dtype": spec.dtype,
        "payload_bytes": payload, "blocks": spec.num_blocks,
        "bytes_per_block": spec.bytes_per_block, "run_blocks": args.run_blocks,
        "chunks": args.chunks, "repeats": len(seconds),
        "clock_from": (f"first send_chunk, begin() {args.begin_ahead_ms:g} ms earlier"
                       + (", the device computing meanwhile" if args.busy_ahead else "")
                       if args.begin_ahead_ms > 0 else "begin()"),
        "seconds": [round(s, 5) for s in seconds],
        "gbps_median": round(payload / statistics.median(seconds) / 1e9, 3),
        "gbps_best": round(payload / min(seconds) / 1e9, 3),
        "sender_seconds_median": round(statistics.median(sender_seconds), 4),
        "receiver_process": "same" if name == "local" else "separate",
        "device_copy_gbps_median": round(payload / statistics.median(args.copy_seconds) / 1e9, 3),
        "device_copy_after_idle_gap_gbps_median": (
            round(payload / statistics.median(args.idle_copy_seconds) / 1e9, 3)
            if args.idle_copy_seconds else None),
        "fraction_of_copy": round(statistics.median(args.copy_seconds)
                                  / statistics.median(seconds), 3),
        "metrics": {k: v for k, v in vars(metrics).items() if not k.startswith("_")},
    }


def machine_info(device: str) -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from importlib.metadata import version
        info["ucxx"] = version("ucxx-cu12")
    except Exception:
        pass
    env = {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "UCXPY_"))}
    if env:
        info["ucx_env"] = env
    return info



def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connectors", default="local,ucx,redis")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--payload-mb", type=float, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model-shape", choices=sorted(BLOCK_SHAPES), default="smollm2")
    parser.add_argument("--chunks", type=int, default=8, help="send_chunk calls per transfer")
    parser.add_argument("--run-blocks", type=int, default=16,
                        help="destination blocks per contiguous run (scatter granularity)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--begin-ahead-ms", type=float, default=0.0,
                        help="call begin() this long before the first chunk and time from "
                             "the chunk (0: time from begin)")
    parser.add_argument("--busy-ahead", action="store_true",
                        help="keep the device computing in the begin-ahead gap and sync "
                             "before the first chunk (a prefill worker's prompt)")
    parser.add_argument("--trace", action="store_true",
                        help="print the traced hops of the last transfer (ucx)")
    parser.add_argument("--switch-interval-s", type=float, default=WORKER_SWITCH_INTERVAL_S,
                        help="both processes' GIL switch interval (default: the workers')")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    sys.setswitchinterval(args.switch_interval_s)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    spec = bench_spec(int(args.payload_mb * (1 << 20)), args.dtype, args.model_shape)
    args.trace_dir = tempfile.mkdtemp(prefix="kv-trace-") if args.trace else ""
    args.copy_seconds = device_copy_seconds(spec, args.device, max(args.repeats, 5))
    args.idle_copy_seconds = (device_copy_seconds(spec, args.device, max(args.repeats, 5),
                                                  idle_ms=args.begin_ahead_ms)
                              if args.begin_ahead_ms > 0 else [])
    results, server = [], None
    try:
        for name in [c.strip() for c in args.connectors.split(",") if c.strip()]:
            redis_url = None
            if name == "redis":
                from pdserve.kvtransfer.valkey_server import ValkeyServer, ValkeySettings
                budget_mb = int(2.5 * spec.num_blocks * spec.bytes_per_block / (1 << 20)) + 64
                server = ValkeyServer(ValkeySettings(maxmemory=f"{budget_mb}mb")).start()
                redis_url = server.url
            results.append(run_connector(name, spec, args, redis_url))
            print(json.dumps(results[-1]), file=sys.stderr)
            if server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
    report = {"benchmark": "kv_transfer", "commit": git_commit(),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(args.device), "config": vars(args), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
