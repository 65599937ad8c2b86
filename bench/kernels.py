"""Kernel benchmark for the Triton paged-attention kernels, one invocation on a GPU.

    GIT_COMMIT=$(git rev-parse HEAD) python3 bench/kernels.py [--out DIR] [--quick]

1. correctness: runs tests/gpu/test_kernels_gpu.py through pytest;
2. ceilings: device-to-device copy bandwidth (bytes read + written);
3. decode: KV bytes read / time over batch x context, vs gather-then-SDPA over the same
   pages and SDPA over contiguous KV, plus a small config / split sweep;
4. prefill: causal TFLOP/s at 1k/4k/16k tokens vs torch SDPA (flash backend and the
   default, cuDNN), and with half the context already cached (prefix hit), plus a
   config sweep.
5. window: sliding-window decode and prefill (window 4096, Mistral style) next to the
   same calls without a window: time, and GB/s / TFLOP/s over what the window reads.
6. --elementwise (only this, with copy bandwidth and tests/gpu/test_fused_gpu.py): the
   fused Triton norms/rotary/SiLU vs the model's unfused torch ops at 1/64/512/8000
   tokens, eager and CUDA-graph replay (the decode step runs as a graph).
Timer: triton.testing.do_bench (median; it flushes L2 before every run). Prints a table
and writes DIR/kernels.json, or DIR/kernels_elementwise.json with --elementwise (DIR
defaults to $OUT, else bench/out).

FLOPs: causal attention of a sequence with n queries at the end of a seq_len context
counts 4 * heads * d * (visible query-key pairs), pairs = n*(seq_len-n) + n^2/2; with no
prefix that is the usual 4 * seqlen^2 * heads * d / 2.
"""

from __future__ import annotations

import argparse
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

from pdserve.engine.kernels import (choose_num_splits, paged_decode_attention,  # noqa: E402
                                    paged_prefill_attention, store_kv)
from pdserve.engine.kernels._common import device_sms  # noqa: E402
from pdserve.engine.kernels.decode import default_decode_config  # noqa: E402
from pdserve.engine.kernels.prefill import default_prefill_config  # noqa: E402
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec  # noqa: E402
from pdserve.engine.synthetic import SHAPES  # noqa: E402

H, KVH, D, BS = 32, 8, 128, 16  # Llama-3-8B attention, 16-token pages
DT = torch.bfloat16
DEV = "cuda"
WARMUP_MS, REP_MS = 20, 80


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- setup ------------------------------------------------------------------------------

def make_paged(batch: int, ctx: int, block_size: int = BS, seed: int = 0):
    """One-layer block-major pool with random KV; every sequence holds ctx tokens in
    randomly scattered blocks. Returns (pool, k_cache, v_cache, block_tables)."""
    per_seq = triton.cdiv(ctx, block_size)
    num_blocks = batch * per_seq + 1
    spec = KVCacheSpec(1, KVH, D, block_size, num_blocks, str(DT).split(".")[-1])
    pool = KVCachePool(spec, device=DEV)
    pool.kv.normal_(generator=torch.Generator(DEV).manual_seed(seed))
    perm = torch.randperm(num_blocks, device=DEV)[:batch * per_seq]
    tables = perm.view(batch, per_seq).to(torch.int32)
    k_cache, v_cache = pool.layer_caches(0)
    return pool, k_cache, v_cache, tables


def copy_bandwidth() -> dict:
    n = 1 << 30  # 1 GiB each way
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return {"bytes": 2 * n, "ms": ms, "GBps": 2 * n / ms / 1e6}


# ---- decode -----------------------------------------------------------------------------

def decode_inputs(batch: int, ctx: int):
    pool, k_cache, v_cache, tables = make_paged(batch, ctx)
    q = torch.randn(batch, H, D, device=DEV, dtype=DT)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    return pool, k_cache, v_cache, tables, q, seq_lens, starts


def run_decode(inp, ctx, num_splits=None, config=None):
    _, k_cache, v_cache, tables, q, seq_lens, starts = inp
    return lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, starts,
                                          D ** -0.5, ctx, num_splits=num_splits, config=config)


def gather_then_sdpa(inp, ctx):
    """Baseline: gather each sequence's pages into contiguous K/V, then SDPA (GQA as
    [B, kv_heads, group queries] x [B, kv_heads, ctx keys])."""
    _, k_cache, v_cache, tables, q, _, _ = inp
    batch = q.shape[0]
    idx = tables.long()

    def fn():
        k = k_cache[idx].view(batch, -1, KVH, D)[:, :ctx].transpose(1, 2)  # [B, kvh, L, d]
        v = v_cache[idx].view(batch, -1, KVH, D)[:, :ctx].transpose(1, 2)
        return F.scaled_dot_product_attention(q.view(batch, KVH, H // KVH, D), k, v)
    return fn


def sdpa_contiguous(batch, ctx):
    """Baseline: SDPA over K/V already contiguous [B, kv_heads, ctx, d]."""
    k = torch.randn(batch, KVH, ctx, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    q = torch.randn(batch, KVH, H // KVH, D, device=DEV, dtype=DT)
    return lambda: F.scaled_dot_product_attention(q, k, v)


def decode_bytes(batch, ctx) -> int:
    return batch * ctx * KVH * D * 2 * DT.itemsize  # K and V, each read once


def check_decode(inp, ctx, fn) -> float:
    """Relative error of our decode vs gather-then-SDPA in fp32 (same pages)."""
    out = fn().float()
    _, k_cache, v_cache, tables, q, _, _ = inp
    batch = q.shape[0]
    idx = tables.long()
    k = k_cache[idx].view(batch, -1, KVH, D)[:, :ctx].transpose(1, 2).float()
    v = v_cache[idx].view(batch, -1, KVH, D)[:, :ctx].transpose(1, 2).float()
    ref = F.scaled_dot_product_attention(q.view(batch, KVH, H // KVH, D).float(), k, v,
                                         scale=D ** -0.5).reshape(batch, H, D)
    return ((out - ref).norm() / ref.norm()).item()


def graphed(fn):
    """fn captured in a CUDA graph (as the engine runs decode); returns its replay.
    Timed with do_bench, which flushes L2 before each replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


DECODE_CONFIGS = [
    {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
]
DECODE_SWEEP_SHAPES = [(1, 32768), (1, 8192), (16, 2048), (16, 8192), (64, 512), (64, 2048),
                       (256, 1024)]
SPLIT_CHOICES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def decode_sweep(results: dict) -> None:
    """Every config x split count, timed as CUDA-graph replays; best per shape vs policy."""
    sms = device_sms(torch.device(DEV))
    shapes = []
    for b, L in DECODE_SWEEP_SHAPES:
        inp = decode_inputs(b, L)
        policy = choose_num_splits(b, KVH, L, sms)
        row = {"shape": f"{b}x{L}", "policy_splits": policy, "grid": {}}
        for ci, cfg in enumerate(DECODE_CONFIGS):
            for s in SPLIT_CHOICES:
                if s > 1 and (s - 1) * cfg["BLOCK_N"] >= L:  # some split would be empty
                    continue
                if b * KVH * s > 16 * sms:  # far past filling the GPU
                    continue
                try:
                    ms = bench_ms(graphed(run_decode(inp, L, num_splits=s, config=cfg)))
                except Exception as e:
                    row["grid"][f"c{ci}/s{s}"] = repr(e)[:200]
                    continue
                row["grid"][f"c{ci}/s{s}"] = decode_bytes(b, L) / ms / 1e6
        ok = {k: v for k, v in row["grid"].items() if isinstance(v, float)}
        row["best"] = max(ok, key=ok.get)
        row["best_GBps"] = ok[row["best"]]
        row["policy_default_cfg_GBps"] = ok.get(f"c0/s{policy}")
        shapes.append(row)
        log(f"decode sweep {row['shape']}: best {row['best']} {row['best_GBps']:.0f} GB/s; "
            f"policy s{policy} c0 {row['policy_default_cfg_GBps']}; "
            + " ".join(f"{k}={v:.0f}" for k, v in ok.items()))
        del inp
        torch.cuda.empty_cache()
    results["decode_sweep"] = {"configs": DECODE_CONFIGS, "shapes": shapes}


DECODE_BATCHES = [1, 16, 64, 256]
DECODE_CTXS = [512, 2048, 8192, 32768]
MAX_KV_BYTES = 20e9  # pool + baselines must fit in 80 GB
MAX_BASELINE_BYTES = 10e9


def decode_table(results: dict, copy_gbps: float) -> None:
    """Defaults (config and split policy) as the backend runs them, eager and graphed."""
    rows = []
    sms = device_sms(torch.device(DEV))
    shapes = [(b, L) for b in DECODE_BATCHES for L in DECODE_CTXS] + [(256, 1024)]
    for b, L in shapes:
        nbytes = decode_bytes(b, L)
        row = {"batch": b, "ctx": L, "kv_bytes": nbytes}
        if nbytes > MAX_KV_BYTES:
            row["skipped"] = "does not fit with baselines"
            rows.append(row)
            continue
        inp = decode_inputs(b, L)
        ours = run_decode(inp, L)
        row["splits"] = choose_num_splits(b, KVH, L, sms)
        row["rel_err"] = check_decode(inp, L, ours)
        row["ours_eager_ms"] = bench_ms(ours)
        row["ours_ms"] = bench_ms(graphed(ours))
        if nbytes <= MAX_BASELINE_BYTES:
            row["gather_sdpa_eager_ms"] = bench_ms(gather_then_sdpa(inp, L))
            row["gather_sdpa_ms"] = bench_ms(graphed(gather_then_sdpa(inp, L)))
        del inp
        torch.cuda.empty_cache()
        if nbytes <= MAX_BASELINE_BYTES:
            row["sdpa_contig_ms"] = bench_ms(graphed(sdpa_contiguous(b, L)))
            torch.cuda.empty_cache()
        for key in ("ours_eager", "ours", "gather_sdpa_eager", "gather_sdpa", "sdpa_contig"):
            if f"{key}_ms" in row:
                row[f"{key}_GBps"] = nbytes / row[f"{key}_ms"] / 1e6
        row["ours_frac_copy"] = row["ours_GBps"] / copy_gbps
        if "gather_sdpa_ms" in row:
            row["speedup_vs_gather"] = row["gather_sdpa_ms"] / row["ours_ms"]
            row["speedup_vs_gather_eager"] = row["gather_sdpa_eager_ms"] / row["ours_eager_ms"]
        rows.append(row)
        log(f"decode {b}x{L}: " + ", ".join(
            f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)))
    results["decode"] = rows


# ---- prefill ----------------------------------------------------------------------------

def prefill_inputs(seq_len: int, q_len: int):
    """One sequence of seq_len tokens, the last q_len of them new (already stored)."""
    pool, k_cache, v_cache, tables = make_paged(1, seq_len)
    q = torch.randn(q_len, H, D, device=DEV, dtype=DT)
    starts = torch.tensor([0, q_len], dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=DEV)
    return pool, k_cache, v_cache, tables, q, starts, seq_lens


def run_prefill(inp, q_len, config=None):
    _, k_cache, v_cache, tables, q, starts, seq_lens = inp
    return lambda: paged_prefill_attention(q, k_cache, v_cache, tables, starts, seq_lens,
                                           q_len, D ** -0.5, config=config)


def causal_flops(seq_len: int, q_len: int) -> float:
    pairs = q_len * (seq_len - q_len) + q_len * q_len / 2
    return 4.0 * H * D * pairs


def check_prefill(inp, seq_len, q_len, fn) -> float:
    out = fn().float()
    _, k_cache, v_cache, tables, q, _, _ = inp
    idx = tables[0].long()
    k = k_cache[idx].reshape(-1, KVH, D)[:seq_len].transpose(0, 1).float()
    v = v_cache[idx].reshape(-1, KVH, D)[:seq_len].transpose(0, 1).float()
    k, v = k.repeat_interleave(H // KVH, 0), v.repeat_interleave(H // KVH, 0)
    qpos = torch.arange(seq_len - q_len, seq_len, device=DEV)
    mask = torch.arange(seq_len, device=DEV)[None, :] <= qpos[:, None]
    ref = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k, v, attn_mask=mask,
                                         scale=D ** -0.5).transpose(0, 1)
    return ((out - ref).norm() / ref.norm()).item()


def sdpa_prefill(n: int, backend):
    """torch SDPA causal over contiguous [1, H, n, d] (K/V expanded to H heads)."""
    from torch.nn.attention import sdpa_kernel
    q = torch.randn(1, H, n, D, device=DEV, dtype=DT)
    k = torch.randn(1, KVH, n, D, device=DEV, dtype=DT).repeat_interleave(H // KVH, 1)
    v = torch.randn_like(k)

    def fn():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn


PREFILL_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
]
PREFILL_SIZES = [1024, 4096, 16384]


def prefill_sweep(results: dict) -> None:
    rows, best, best_score = [], None, -1.0
    inputs = {n: prefill_inputs(n, n) for n in PREFILL_SIZES}
    for cfg in PREFILL_CONFIGS:
        row, score = {"config": cfg}, 1.0
        for n, inp in inputs.items():
            try:
                ms = bench_ms(run_prefill(inp, n, cfg))
                row[str(n)] = causal_flops(n, n) / ms / 1e9
                score *= row[str(n)]
            except Exception as e:
                row[str(n)] = repr(e)[:200]
                score = 0.0
        rows.append(row)
        log(f"prefill cfg {cfg}: " + ", ".join(
            f"{k}={v:.0f}" if isinstance(v, float) else f"{k}=ERR" for k, v in row.items()
            if k != "config"))
        if score > best_score:
            best, best_score = cfg, score
    results["prefill_sweep"] = {"configs": rows, "best": best}


def prefill_table(results: dict) -> None:
    """Defaults as the backend runs them (config=None)."""
    cfg = None
    from torch.nn.attention import SDPBackend
    rows = []
    for n in PREFILL_SIZES:
        row = {"tokens": n, "flops": causal_flops(n, n)}
        inp = prefill_inputs(n, n)
        ours = run_prefill(inp, n, cfg)
        row["rel_err"] = check_prefill(inp, n, n, ours)
        row["ours_ms"] = bench_ms(ours)
        del inp
        half = n // 2
        inp = prefill_inputs(n, half)
        ours_prefix = run_prefill(inp, half, cfg)
        row["prefix_rel_err"] = check_prefill(inp, n, half, ours_prefix)
        row["prefix_flops"] = causal_flops(n, half)
        row["prefix_ms"] = bench_ms(ours_prefix)
        del inp
        row["flash_ms"] = bench_ms(sdpa_prefill(n, SDPBackend.FLASH_ATTENTION))
        row["default_ms"] = bench_ms(sdpa_prefill(n, None))
        for key in ("ours", "flash", "default"):
            row[f"{key}_TFLOPs"] = row["flops"] / row[f"{key}_ms"] / 1e9
        row["prefix_TFLOPs"] = row["prefix_flops"] / row["prefix_ms"] / 1e9
        row["ours_vs_flash"] = row["ours_TFLOPs"] / row["flash_TFLOPs"]
        torch.cuda.empty_cache()
        rows.append(row)
        log(f"prefill {n}: " + ", ".join(
            f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float)))
    results["prefill"] = rows


def store_bench(results: dict) -> None:
    """KV store of a 16k-token prefill: bytes read + written / time."""
    n = 16384
    pool, k_cache, v_cache, tables = make_paged(1, n)
    k = torch.randn(n, KVH, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    pos = torch.arange(n, device=DEV)
    slots = tables[0].long()[pos // BS] * BS + pos % BS
    ms = bench_ms(lambda: store_kv(k, v, k_cache, v_cache, slots))
    nbytes = 2 * 2 * k.numel() * DT.itemsize
    results["store"] = {"tokens": n, "ms": ms, "GBps": nbytes / ms / 1e6}
    log(f"store 16k tokens: {ms * 1e3:.1f} us, {nbytes / ms / 1e6:.0f} GB/s")


def compiled_kernels(results: dict) -> None:
    """Registers, spills and shared memory of every compiled variant (from Triton's cache)."""
    from pdserve.engine.kernels import decode, prefill
    out = []
    for fn in (prefill._prefill_kernel, decode._decode_split_kernel, decode._decode_merge_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for key, k in kernels.items():
                meta = getattr(k, "metadata", None)
                out.append({"kernel": fn.__name__, "key": str(key)[-300:],
                            "n_regs": getattr(k, "n_regs", None),
                            "n_spills": getattr(k, "n_spills", None),
                            "shared": getattr(meta, "shared", None),
                            "num_warps": getattr(meta, "num_warps", None),
                            "num_stages": getattr(meta, "num_stages", None)})
    results["compiled"] = out


# ---- fused elementwise ------------------------------------------------------------------

ELEMENTWISE_TOKENS = [1, 64, 512, 8000]


def elementwise_ops(t: int) -> dict:
    """(unfused, fused, bytes moved by the fused kernel) per op of one decoder layer at
    Llama-3-8B shapes over t tokens. Unfused = the model's torch code (llama.py)."""
    from pdserve.engine.kernels import fused_add_rms_norm, rms_norm, rotary_, silu_and_mul
    from pdserve.engine.model.llama import RMSNorm, Rotary
    cfg = SHAPES["llama3-8b"]
    hid, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    norm = RMSNorm(hid, cfg.rms_eps).to(DEV, DT)
    rotary = Rotary(cfg, cfg.max_position).to(DEV)
    x = torch.randn(t, hid, device=DEV, dtype=DT)
    res = torch.randn(t, hid, device=DEV, dtype=DT)
    qkv = torch.randn(t, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, device=DEV, dtype=DT)
    qk = qkv[:, :(cfg.num_heads + cfg.num_kv_heads) * d].view(t, -1, d)
    pos = torch.randint(0, cfg.max_position, (t,), device=DEV)
    tables = rotary.tables(pos)  # per step in the model, not per layer: left out
    gate_up = torch.randn(t, 2 * inter, device=DEV, dtype=DT)
    w, eps, b = norm.weight, norm.eps, DT.itemsize
    return {
        "rms_norm": (lambda: norm(x), lambda: rms_norm(x, w, eps), 2 * t * hid * b),
        "add_rms_norm": (lambda: norm(x + res), lambda: fused_add_rms_norm(x, res, w, eps),
                         4 * t * hid * b),
        "rotary": (lambda: Rotary.apply(qk, tables),
                   lambda: rotary_(qk, pos, rotary.cos, rotary.sin_signed), 2 * qk.numel() * b),
        "silu_and_mul": (lambda: F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:]),
                         lambda: silu_and_mul(gate_up), 3 * t * inter * b),
    }


def elementwise_bench(results: dict) -> None:
    """Per op and per layer (2 add+norms, rotary, silu: what one decoder layer runs; the
    first layer's plain norm is left out), milliseconds eager and graphed."""
    rows = []
    for t in ELEMENTWISE_TOKENS:
        ops = elementwise_ops(t)
        row = {"tokens": t}
        for name, (unfused, fused, nbytes) in ops.items():
            for tag, fn in (("unfused", unfused), ("fused", fused)):
                row[f"{name}_{tag}_eager_ms"] = bench_ms(fn)
                row[f"{name}_{tag}_ms"] = bench_ms(graphed(fn))
            row[f"{name}_fused_GBps"] = nbytes / row[f"{name}_fused_ms"] / 1e6
            row[f"{name}_speedup"] = row[f"{name}_unfused_ms"] / row[f"{name}_fused_ms"]
        for tag in ("unfused", "fused"):
            layer = [ops["add_rms_norm"][tag == "fused"]] * 2 + [
                ops["rotary"][tag == "fused"], ops["silu_and_mul"][tag == "fused"]]
            row[f"layer_{tag}_ms"] = bench_ms(graphed(lambda fns=layer: [f() for f in fns]))
        row["layer_speedup"] = row["layer_unfused_ms"] / row["layer_fused_ms"]
        rows.append(row)
        log(f"elementwise {t} tokens: layer unfused {row['layer_unfused_ms'] * 1e3:.1f} us, "
            f"fused {row['layer_fused_ms'] * 1e3:.1f} us (x{row['layer_speedup']:.2f}); "
            + ", ".join(f"{k}={v:.3g}" for k, v in row.items()
                        if k.endswith(("_speedup", "_GBps"))))
        del ops
        torch.cuda.empty_cache()
    results["elementwise"] = rows


# ---- sliding window ----------------------------------------------------------------------

WINDOW = 4096
WINDOW_DECODE_SHAPES = [(1, 32768), (16, 16384), (64, 8192)]
WINDOW_PREFILL_SHAPES = [(8192, 8192), (32768, 4096), (16384, 2048)]  # (context, new tokens)


def windowed_pairs(seq_len: int, q_len: int, window: int) -> int:
    """Query-key pairs a windowed causal attention computes: min(p + 1, window) each."""
    p = torch.arange(seq_len - q_len, seq_len, dtype=torch.float64)
    return int(torch.clamp(p + 1, max=window).sum())


def window_table(results: dict) -> None:
    """Windowed kernels vs the same call without a window (graphed decode, eager prefill)."""
    rows = []
    for b, L in WINDOW_DECODE_SHAPES:
        inp = decode_inputs(b, L)
        _, k_cache, v_cache, tables, q, seq_lens, starts = inp

        def call(window):
            return lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, starts,
                                                  D ** -0.5, L, sliding_window=window)
        full_ms, win_ms = bench_ms(graphed(call(0))), bench_ms(graphed(call(WINDOW)))
        row = {"kind": "decode", "shape": f"{b}x{L}", "window": WINDOW, "full_ms": full_ms,
               "window_ms": win_ms, "speedup": full_ms / win_ms,
               "window_GBps": decode_bytes(b, min(L, WINDOW)) / win_ms / 1e6}
        rows.append(row)
        log(f"window decode {row['shape']}: full {full_ms:.3f} ms, window {win_ms:.3f} ms "
            f"(x{row['speedup']:.1f}), {row['window_GBps']:.0f} GB/s over the window")
        del inp
        torch.cuda.empty_cache()
    for L, n in WINDOW_PREFILL_SHAPES:
        inp = prefill_inputs(L, n)
        _, k_cache, v_cache, tables, q, starts, seq_lens = inp

        def call(window):
            return lambda: paged_prefill_attention(q, k_cache, v_cache, tables, starts,
                                                   seq_lens, n, D ** -0.5, sliding_window=window)
        full_ms, win_ms = bench_ms(call(0)), bench_ms(call(WINDOW))
        flops = 4 * H * D * windowed_pairs(L, n, WINDOW)
        row = {"kind": "prefill", "shape": f"{n} new of {L}", "window": WINDOW,
               "full_ms": full_ms, "window_ms": win_ms, "speedup": full_ms / win_ms,
               "window_TFLOPs": flops / win_ms / 1e9,
               "full_TFLOPs": causal_flops(L, n) / full_ms / 1e9}
        rows.append(row)
        log(f"window prefill {row['shape']}: full {full_ms:.3f} ms "
            f"({row['full_TFLOPs']:.0f} TFLOP/s), window {win_ms:.3f} ms (x{row['speedup']:.1f}, "
            f"{row['window_TFLOPs']:.0f} TFLOP/s over visible pairs)")
        del inp
        torch.cuda.empty_cache()
    results["window"] = rows


# ---- driver -----------------------------------------------------------------------------

def run_tests(path: str = "tests/gpu/test_kernels_gpu.py") -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           path], cwd=ROOT,
                          capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-3000:]
    log(tail)
    return {"returncode": proc.returncode, "seconds": time.time() - t0,
            "summary": tail.strip().splitlines()[-1] if tail.strip() else ""}


def print_tables(res: dict) -> None:
    copy = res.get("copy", {}).get("GBps", float("nan"))
    log(f"\n== {res['gpu']} | torch {res['torch']} | triton {res['triton']} | "
        f"commit {res['commit']}")
    log(f"copy bandwidth (read+write): {copy:.0f} GB/s; store 16k tokens: "
        f"{res.get('store', {}).get('GBps', 0):.0f} GB/s")
    log("decode, KV GB/s read (block_size 16, Llama-3-8B heads, bf16); graph = CUDA-graph "
        "replay, eager = plain calls")
    log(f"{'batch x ctx':>12} {'splits':>6} {'graph':>6} {'%copy':>6} {'eager':>6} "
        f"{'gath.g':>6} {'x gath':>6} {'gath.e':>6} {'x g.e':>5} {'sdpa.g':>6} {'err':>8}")
    for r in res.get("decode", []):
        if "skipped" in r:
            log(f"{r['batch']:>5} x {r['ctx']:<5} skipped ({r['skipped']})")
            continue
        log(f"{r['batch']:>5} x {r['ctx']:<5} {r['splits']:>6} {r['ours_GBps']:>6.0f} "
            f"{100 * r['ours_frac_copy']:>5.0f}% {r['ours_eager_GBps']:>6.0f} "
            f"{r.get('gather_sdpa_GBps', 0):>6.0f} {r.get('speedup_vs_gather', 0):>6.2f} "
            f"{r.get('gather_sdpa_eager_GBps', 0):>6.0f} "
            f"{r.get('speedup_vs_gather_eager', 0):>5.2f} {r.get('sdpa_contig_GBps', 0):>6.0f} "
            f"{r['rel_err']:>8.1e}")
    log("prefill causal TFLOP/s (single sequence; prefix = half the context cached)")
    log(f"{'tokens':>6} {'ours':>6} {'flash':>6} {'cudnn':>6} {'ours/fa':>7} {'prefix':>6} "
        f"{'err':>8}")
    for r in res.get("prefill", []):
        log(f"{r['tokens']:>6} {r['ours_TFLOPs']:>6.0f} {r['flash_TFLOPs']:>6.0f} "
            f"{r['default_TFLOPs']:>6.0f} {r['ours_vs_flash']:>7.2f} {r['prefix_TFLOPs']:>6.0f} "
            f"{r['rel_err']:>8.1e}")
    if res.get("elementwise"):
        log("elementwise ops of one Llama-3-8B layer, graphed us: unfused / fused (speedup)")
        for r in res["elementwise"]:
            log(f"{r['tokens']:>6} tokens: " + ", ".join(
                f"{op} {r[f'{op}_unfused_ms'] * 1e3:.1f}/{r[f'{op}_fused_ms'] * 1e3:.1f} "
                f"(x{r[f'{op}_unfused_ms'] / r[f'{op}_fused_ms']:.2f})"
                for op in ("rms_norm", "add_rms_norm", "rotary", "silu_and_mul", "layer")))
    for r in res.get("decode_sweep", {}).get("shapes", []):
        log(f"decode sweep {r['shape']:>9}: best {r['best']:>7} {r['best_GBps']:>5.0f} GB/s, "
            f"default c0/s{r['policy_splits']} {r['policy_default_cfg_GBps'] or 0:>5.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "bench", "out")))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--elementwise", action="store_true",
                    help="only the fused elementwise kernels (and their tests)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels_elementwise.json" if args.elementwise
                        else "kernels.json")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "commit": os.environ.get("GIT_COMMIT", "unknown"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "timer": "triton.testing.do_bench median, L2 flushed",
           "default_prefill_config": default_prefill_config(D, DT),
           "default_decode_config": default_decode_config(D, DT)}
    steps = []
    tests = "tests/gpu/test_fused_gpu.py" if args.elementwise else "tests/gpu/test_kernels_gpu.py"
    if not args.skip_tests:
        steps.append(("tests", lambda: res.__setitem__("tests", run_tests(tests))))
    steps.append(("copy", lambda: res.__setitem__("copy", copy_bandwidth())))
    if args.elementwise:
        steps.append(("elementwise", lambda: elementwise_bench(res)))
    else:
        steps.append(("store", lambda: store_bench(res)))
        steps.append(("decode", lambda: decode_table(res, res["copy"]["GBps"])))
        steps.append(("prefill", lambda: prefill_table(res)))
        steps.append(("window", lambda: window_table(res)))
        if not args.no_sweep:
            steps.append(("decode_sweep", lambda: decode_sweep(res)))
            steps.append(("prefill_sweep", lambda: prefill_sweep(res)))
        steps.append(("compiled", lambda: compiled_kernels(res)))
    for name, step in steps:
        t0 = time.time()
        try:
            step()
        except Exception:
            res.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            log(f"step {name} failed:\n{res['errors'][name]}")
        res.setdefault("step_seconds", {})[name] = round(time.time() - t0, 1)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    print_tables(res)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
