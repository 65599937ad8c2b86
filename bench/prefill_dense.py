"""Single-sequence causal prefill attention: the paged Triton kernel against the dense
cuDNN path the triton backend takes for whole uncached prompts (TritonAttentionBackend,
dense_prefill_min_tokens; 3,072 tokens in the engine). Llama-3-8B heads (32 q / 8 KV,
d 128), bf16, 16-token pages; times from CUDA events (median of 20), TFLOP/s =
4 * heads * d * n^2 / 2 / time.

    python bench/prefill_dense.py --out bench/results/prefill-dense-h100.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from pdserve.engine.attention.triton_backend import dense_causal_attention
from pdserve.engine.kernels import paged_prefill_attention, store_kv


def timed(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(n: int, heads=32, kv_heads=8, d=128, bs=16) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(n, heads, d, device=dev, dtype=dt)
    k = torch.randn(n, kv_heads, d, device=dev, dtype=dt)
    v = torch.randn(n, kv_heads, d, device=dev, dtype=dt)
    blocks = -(-n // bs)
    perm = torch.randperm(blocks * 2, device=dev)[:blocks].to(torch.int32)  # scattered pages
    k_cache = torch.zeros(blocks * 2, bs, kv_heads, d, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    pos = torch.arange(n, device=dev)
    slots = perm[pos // bs].long() * bs + pos % bs
    store_kv(k, v, k_cache, v_cache, slots)
    qsl = torch.tensor([0, n], dtype=torch.int32, device=dev)
    seq = torch.tensor([n], dtype=torch.int32, device=dev)
    scale = d ** -0.5

    def paged():
        return paged_prefill_attention(q, k_cache, v_cache, perm[None], qsl, seq, n, scale)

    def dense():
        return dense_causal_attention(q, k, v, scale)

    err = ((paged().float() - dense().float()).norm() / paged().float().norm()).item()
    flops = 4 * heads * d * n * n / 2
    t_paged, t_dense = timed(paged), timed(dense)
    return {"tokens": n, "paged_ms": t_paged, "dense_ms": t_dense,
            "paged_tflops": flops / t_paged / 1e9, "dense_tflops": flops / t_dense / 1e9,
            "dense_speedup": t_paged / t_dense, "rel_err": err}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="512,1024,2048,4096,8000,16384")
    p.add_argument("--out")
    args = p.parse_args()
    rows = [measure(int(n)) for n in args.lengths.split(",")]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
              "command": "python bench/prefill_dense.py --lengths " + args.lengths,
              "rows": rows}
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
