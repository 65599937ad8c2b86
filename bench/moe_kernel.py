"""Fused-MoE kernel benchmark (issue 16, part 5), one invocation on a GPU.

    GIT_COMMIT=$(git rev-parse HEAD) python3 bench/moe_kernel.py [--out DIR] [--quick]
        [--skip-tests] [--no-sweep]

1. correctness: tests/gpu/test_fused_moe_gpu.py through pytest;
2. ceilings, same run: device-to-device copy bandwidth (bytes read + written) and bf16
   matmul TFLOP/s (torch.matmul, 8192^3);
3. one MoE layer of Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, width 768) and of
   Mixtral-8x7B (hidden 4096, 8 experts, top-2, width 14336), bf16, random weights with a
   realistic router spread, at batch 1 and 64 (decode) and 512 and 4096 (prefill; not
   with --quick). Each timed as a CUDA-graph replay (how decode runs) and eagerly:
   - fused: kernels/fused_moe.fused_moe_block (router matmul, routing, alignment, the
     two grouped GEMMs, the sum over k);
   - torch grouped: torch routing, sort by expert, torch's grouped_mm for both
     projections (what transformers 5 runs with experts_implementation="grouped_mm");
   - torch loop: SparseMoeBlock.forward_torch (a matmul pair per chosen expert; syncs
     the host, so eager only).
   Bytes: weights of the experts the batch actually routes to + the router weight + x
   read + output written (the minimum traffic). FLOPs: 2*T*k*3*I*H + 2*T*E*H.
   Reported: GB/s and share of copy bandwidth, TFLOP/s and share of matmul peak.
4. sweep (not with --no-sweep / --quick): MoeKernelConfig candidates per batch (graph
   replay), best first, next to the default the heuristic picks.
Timer: triton.testing.do_bench (median; flushes L2 before every run).
Writes DIR/moe_kernel.json (DIR: --out, else $OUT, else bench/results) after every step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pdserve.engine.kernels import fused_moe as fm  # noqa: E402
from pdserve.engine.model.moe import SparseMoeBlock  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
WARMUP_MS, REP_MS = 20, 100
# name: (hidden, inter, experts, top_k, norm_topk_prob)
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8, True), "mixtral-8x7b": (4096, 14336, 8, 2, True)}
SWEEP = [fm.MoeKernelConfig(*c) for c in [
    (16, 32, 64, 128, 4, 4), (16, 16, 32, 128, 4, 4), (16, 64, 64, 128, 4, 4),
    (16, 32, 64, 256, 4, 3), (16, 32, 128, 64, 4, 5), (32, 64, 64, 64, 4, 4),
    (64, 64, 128, 64, 4, 3), (64, 128, 128, 64, 8, 3), (128, 64, 128, 64, 8, 3),
    (64, 64, 64, 64, 4, 4),
    # wider tiles for hundreds of rows an expert (Mixtral prefill, where cuBLAS' grouped
    # matmuls led the 2e424ef sweep by 1.45x at 4,096 tokens)
    (128, 128, 128, 64, 8, 3), (128, 128, 256, 64, 8, 3), (128, 64, 256, 64, 8, 4),
    (128, 128, 128, 64, 8, 4), (64, 128, 256, 64, 8, 3)]]


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def graphed(fn):
    """fn captured in a CUDA graph; returns its replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ---- ceilings -----------------------------------------------------------------------------

def copy_bandwidth() -> dict:
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return {"bytes": 2 * n, "ms": ms, "GBps": 2 * n / ms / 1e6}


def matmul_peak() -> dict:
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=DT)
    b = torch.randn(n, n, device=DEV, dtype=DT)
    ms = bench_ms(lambda: a @ b)
    return {"n": n, "ms": ms, "TFLOPs": 2 * n ** 3 / ms / 1e9}


# ---- the layer and its baselines ------------------------------------------------------------

@functools.cache
def make_block(shape: str, seed: int = 0) -> SparseMoeBlock:
    hidden, inter, experts, top_k, norm = SHAPES[shape]
    with torch.device(DEV):  # Mixtral's experts: 2.8 GB in bf16, built on the device
        block = SparseMoeBlock(hidden, inter, experts, top_k, norm)
    g = torch.Generator(DEV).manual_seed(seed)
    with torch.no_grad():
        block.gate.weight.normal_(0, 1.5 / hidden ** 0.5, generator=g)
        block.w13.normal_(0, 1 / hidden ** 0.5, generator=g)
        block.w2.normal_(0, 1 / inter ** 0.5, generator=g)
    return block.to(DT).eval()


def _grouped_mm():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError("this torch has no grouped_mm")
    return fn


def torch_grouped(block: SparseMoeBlock):
    """Routing, sort by expert, grouped_mm for w13 and w2, scale, unsort, sum over k."""
    gmm = _grouped_mm()
    w13_t, w2_t = block.w13.transpose(1, 2), block.w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]
    num_experts, top_k = block.num_experts, block.top_k

    def fn(x):
        weights, ids = block.route(x)
        flat = ids.flatten()
        sorted_ids, order = torch.sort(flat)
        rows = x[order // top_k]  # [T*k, H] grouped by expert
        # histc, not bincount: no host sync (CUDA takes ints, the CPU only floats)
        hist_in = sorted_ids.int() if x.is_cuda else sorted_ids.float()
        counts = torch.histc(hist_in, bins=num_experts, min=0, max=num_experts - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gate, up = gmm(rows, w13_t, offs=offs).chunk(2, dim=-1)
        y = gmm(F.silu(gate) * up, w2_t, offs=offs)  # [T*k, H]
        y = y * weights.flatten()[order, None].to(y.dtype)
        out = torch.empty_like(y)
        out[order] = y
        return out.view(x.shape[0], top_k, -1).sum(dim=1)
    return fn


def layer_cost(block: SparseMoeBlock, x: torch.Tensor) -> tuple[int, int, int]:
    """(minimum bytes, FLOPs, experts touched) of one forward over x."""
    with torch.no_grad():
        _, ids = block.route(x)
    touched = int(ids.unique().numel())
    t, h, i, e, k = x.shape[0], block.hidden_size, block.inter, block.num_experts, block.top_k
    elt = x.element_size()
    weight_bytes = touched * 3 * i * h * elt + e * h * elt
    nbytes = weight_bytes + 2 * t * h * elt
    flops = 2 * t * k * 3 * i * h + 2 * t * e * h
    return nbytes, flops, touched


def rates(ms: float, nbytes: int, flops: int, ceil: dict) -> dict:
    gbps = nbytes / ms / 1e6
    tflops = flops / ms / 1e9
    return {"ms": ms, "GBps": gbps, "bw_share": gbps / ceil["copy"], "TFLOPs": tflops,
            "flop_share": tflops / ceil["matmul"]}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_layer(shape: str, t: int, ceil: dict) -> dict:
    block = make_block(shape)
    x = torch.randn(t, block.hidden_size, device=DEV, dtype=DT)
    nbytes, flops, touched = layer_cost(block, x)
    res = {"tokens": t, "bytes": nbytes, "flops": flops, "experts_touched": touched,
           "config": vars(fm.default_moe_config(t, block.top_k, block.num_experts))}
    with torch.no_grad():
        ref = block.forward_torch(x)
        fused = lambda: block.forward_fused(x)  # noqa: E731
        res["fused_rel_err_vs_torch"] = rel_err(fused(), ref)
        res["fused_graph"] = rates(bench_ms(graphed(fused)), nbytes, flops, ceil)
        res["fused_eager"] = rates(bench_ms(fused), nbytes, flops, ceil)
        try:
            grouped = torch_grouped(block)
            res["grouped_rel_err_vs_torch"] = rel_err(grouped(x), ref)
            res["torch_grouped_eager"] = rates(bench_ms(lambda: grouped(x)), nbytes, flops, ceil)
            res["torch_grouped_graph"] = rates(bench_ms(graphed(lambda: grouped(x))), nbytes,
                                               flops, ceil)
        except Exception as exc:  # an older torch, or a capture it refuses
            res["torch_grouped_error"] = f"{type(exc).__name__}: {exc}"[:300]
        res["torch_loop_eager"] = rates(bench_ms(lambda: block.forward_torch(x)), nbytes, flops,
                                        ceil)
    return res


def sweep_layer(shape: str, t: int) -> list[dict]:
    block = make_block(shape)
    x = torch.randn(t, block.hidden_size, device=DEV, dtype=DT)
    rows = []
    with torch.no_grad():
        for cfg in SWEEP:
            fn = lambda: fm.fused_moe_block(x, block.gate.weight, block.w13, block.w2,  # noqa: E731
                                            block.top_k, True, config=cfg)
            try:
                rows.append({"config": vars(cfg), "ms": bench_ms(graphed(fn))})
            except Exception as exc:  # e.g. a tile too large for shared memory
                rows.append({"config": vars(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]})
    return sorted(rows, key=lambda r: r.get("ms", float("inf")))


def run_tests() -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/gpu/test_fused_moe_gpu.py"], cwd=ROOT, capture_output=True,
                          text=True)
    tail = (proc.stdout + proc.stderr)[-3000:]
    log(tail)
    return {"returncode": proc.returncode, "seconds": time.time() - t0,
            "summary": tail.strip().splitlines()[-1] if tail.strip() else ""}


# ---- report -------------------------------------------------------------------------------

def print_tables(res: dict) -> None:
    log(f"\n== {res['gpu']} | torch {res['torch']} | triton {res['triton']} | commit {res['commit']}")
    ceil = res.get("ceilings", {})
    log(f"copy {ceil.get('copy', float('nan')):.0f} GB/s, bf16 matmul "
        f"{ceil.get('matmul', float('nan')):.0f} TFLOP/s")
    log(f"{'layer':>15} {'T':>5} {'exp':>4} | {'fused graph ms':>14} {'GB/s':>6} {'bw%':>5} "
        f"{'TF/s':>6} {'fl%':>5} | {'fused eager':>11} | {'grouped graph':>13} "
        f"{'grouped eager':>13} | {'loop eager':>10} | {'x grouped':>9}")
    for shape, per_t in res.get("layers", {}).items():
        for row in per_t:
            f, fe = row["fused_graph"], row["fused_eager"]
            gg = row.get("torch_grouped_graph", {}).get("ms", float("nan"))
            ge = row.get("torch_grouped_eager", {}).get("ms", float("nan"))
            loop = row["torch_loop_eager"]["ms"]
            log(f"{shape:>15} {row['tokens']:>5} {row['experts_touched']:>4} | "
                f"{f['ms']:>14.4f} {f['GBps']:>6.0f} {100 * f['bw_share']:>4.0f}% "
                f"{f['TFLOPs']:>6.1f} {100 * f['flop_share']:>4.1f}% | {fe['ms']:>11.4f} | "
                f"{gg:>13.4f} {ge:>13.4f} | {loop:>10.4f} | {gg / f['ms']:>8.2f}x")
    for key, rows in res.get("sweep", {}).items():
        best = next((r for r in rows if "ms" in r), None)
        if best:
            log(f"sweep {key}: best {best['ms']:.4f} ms {best['config']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench", "results")))
    ap.add_argument("--quick", action="store_true", help="batch 1 and 64 only, no sweep")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "moe_kernel.json")
    batches = [1, 64] if args.quick else [1, 64, 512, 4096]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "commit": os.environ.get("GIT_COMMIT", "unknown"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "timer": "triton.testing.do_bench median, L2 flushed", "shapes": SHAPES}
    ceil: dict = {}
    steps = []
    if not args.skip_tests:
        steps.append(("tests", lambda: res.__setitem__("tests", run_tests())))

    def ceilings():
        res["copy"], res["matmul_peak"] = copy_bandwidth(), matmul_peak()
        ceil.update(copy=res["copy"]["GBps"], matmul=res["matmul_peak"]["TFLOPs"])
        res["ceilings"] = dict(ceil)
    steps.append(("ceilings", ceilings))
    for shape in SHAPES:
        for t in batches:
            steps.append((f"{shape}/{t}", lambda s=shape, t=t: res.setdefault("layers", {})
                          .setdefault(s, []).append(bench_layer(s, t, ceil))))
    if not (args.quick or args.no_sweep):
        for shape in SHAPES:
            for t in batches:
                steps.append((f"sweep {shape}/{t}", lambda s=shape, t=t: res.setdefault(
                    "sweep", {}).__setitem__(f"{s}/{t}", sweep_layer(s, t))))
    for name, step in steps:
        t0 = time.time()
        try:
            step()
        except Exception:
            res.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            log(f"step {name} failed:\n{res['errors'][name]}")
        res.setdefault("step_seconds", {})[name] = round(time.time() - t0, 1)
        log(f"step {name}: {res['step_seconds'][name]} s")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    print_tables(res)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
