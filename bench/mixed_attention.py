"""One mixed step's attention (decode rows + a prompt chunk, as under load): the whole
batch through the paged prefill kernel (before 2026-12-05) against the split the triton
backend now makes (AttentionMetadata.split_decodes: decode rows through the decode
kernel, the chunk through the prefill kernel, or cuDNN for a whole uncached prompt).
Llama-3-8B heads (32 q / 8 KV, d 128), bf16, 16-token pages scattered over the pool;
per layer, CUDA events, median of 20; the step's attention is 32 layers of it.

    python bench/mixed_attention.py --out bench/results/mixed-attention-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import torch

from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.triton_backend import TritonAttentionBackend
from prefill_dense import timed  # bench/prefill_dense.py (this script's folder)

HEADS, KV_HEADS, D, BS = 32, 8, 128, 16


def mixed_meta(num_decodes: int, context: int, chunk: int, cached: int, dev) -> AttentionMetadata:
    """num_decodes rows of `context` tokens (1 query each), then one chunk of `chunk`
    queries after `cached` tokens already in the cache; pages scattered."""
    lens = [(context - 1, 1)] * num_decodes + [(cached, chunk)]
    seq_lens = [c + q for c, q in lens]
    need = [-(-s // BS) for s in seq_lens]
    perm = torch.randperm(sum(need) * 2)[:sum(need)].to(torch.int32)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    slots, used = [], 0
    for i, ((ctx, q), n) in enumerate(zip(lens, need)):
        tables[i, :n] = perm[used:used + n]
        used += n
        pos = torch.arange(ctx, ctx + q)
        slots.append(tables[i, pos // BS].long() * BS + pos % BS)
    starts = [0]
    for _, q in lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.cat(slots).to(dev),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=tables.to(dev), max_query_len=max(q for _, q in lens),
        max_seq_len=max(seq_lens), query_lens_cpu=[q for _, q in lens], seq_lens_cpu=seq_lens)


def measure(num_decodes: int, context: int, chunk: int, cached: int) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    meta = mixed_meta(num_decodes, context, chunk, cached, dev)
    blocks = int(meta.block_tables.max()) + 1
    k_cache = torch.randn(blocks, BS, KV_HEADS, D, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    n = num_decodes + chunk
    q = torch.randn(n, HEADS, D, device=dev, dtype=dt)
    k = torch.randn(n, KV_HEADS, D, device=dev, dtype=dt)
    v = torch.randn(n, KV_HEADS, D, device=dev, dtype=dt)
    backend = TritonAttentionBackend(dense_prefill_min_tokens=3072)
    scale = D ** -0.5

    def whole():  # the previous path: one prefill-kernel launch for every row
        return backend._attend(q, k, v, k_cache, v_cache, meta, scale, 0, 0.0)

    def split():
        return backend.forward(q, k, v, k_cache, v_cache, meta, scale)

    b = split().float()  # forward() writes the step's K/V into the cache first
    a = whole().float()  # _attend reads them from there
    err = ((a - b).norm() / a.norm()).item()
    t_whole, t_split = timed(whole), timed(split)
    return {"decode_rows": num_decodes, "decode_context": context, "chunk": chunk,
            "chunk_cached": cached, "whole_prefill_kernel_ms": round(t_whole, 4),
            "split_ms": round(t_split, 4), "speedup": round(t_whole / t_split, 3),
            "step_ms_saved_32_layers": round(32 * (t_whole - t_split), 2),
            "rel_diff": err}


CASES = [(30, 4200, 4096, 0), (60, 4200, 4096, 0), (60, 4200, 2048, 2048),
         (30, 1100, 1024, 0), (100, 1100, 2048, 0), (8, 8000, 512, 0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [measure(*c) for c in CASES]
    commit = os.environ.get("PDSERVE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"gpu": torch.cuda.get_device_name(), "commit": commit,
              "command": "python bench/mixed_attention.py", "dtype": "bfloat16",
              "heads": [HEADS, KV_HEADS, D], "block_size": BS, "rows": rows}
    for r in rows:
        print(f"{r['decode_rows']:>4} x {r['decode_context']:>5} + chunk {r['chunk']:>5} "
              f"(cached {r['chunk_cached']:>5}): whole {r['whole_prefill_kernel_ms']:.3f} ms, "
              f"split {r['split_ms']:.3f} ms, {r['speedup']:.2f}x, "
              f"{r['step_ms_saved_32_layers']:.1f} ms/step saved, diff {r['rel_diff']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
