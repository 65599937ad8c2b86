"""Micro-benchmark: the batched sampler against the per-row one it replaced.

    .venv/bin/python bench/sampling.py [--rows 64] [--vocab 49152] [--repeats 5] [--device cuda]

Prints the median milliseconds of one `sample` call per batch mix (on CUDA each call
ends with its host sync, so the time is the step's real cost). Every non-greedy row
owns a seeded generator, as in the engine (ModelRunner.generator_for).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdserve.engine.sampling import SamplingParams, make_generator, sample


def _old_filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # logits: [vocab]
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def old_sample(logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
    """The per-row sampler (one filter, softmax, multinomial and host sync per row)."""
    greedy_ids = logits.argmax(-1)
    if all(p.greedy for p in params):
        return greedy_ids.tolist()
    out = greedy_ids.tolist()
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        row = _old_filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=gen))
    return out


MIXES = {
    "all greedy": lambda i: SamplingParams(),
    "temperature 0.8": lambda i: SamplingParams(temperature=0.8, seed=i),
    "top_k 50": lambda i: SamplingParams(temperature=0.8, top_k=50, seed=i),
    "top_p 0.95": lambda i: SamplingParams(temperature=0.8, top_p=0.95, seed=i),
    "top_k 50 + top_p 0.9": lambda i: SamplingParams(temperature=0.8, top_k=50, top_p=0.9,
                                                     seed=i),
    "half greedy, half top_p 0.95": lambda i: (SamplingParams() if i % 2 else
                                               SamplingParams(temperature=0.8, top_p=0.95, seed=i)),
}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu = torch.device(args.device)  # the device sampled on (named cpu for the mixes)
    logits = (torch.randn(args.rows, args.vocab) * 3).to(cpu)  # [rows, vocab]
    name = torch.cuda.get_device_name() if cpu.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"rows={args.rows} vocab={args.vocab} on {name}")
    print(f"{'mix':32} {'per-row ms':>11} {'batched ms':>11} {'speed-up':>9}")
    for name, make in MIXES.items():
        params = [make(i) for i in range(args.rows)]
        gens = [None if p.greedy else make_generator(i, cpu) for i, p in enumerate(params)]
        old = _median_ms(lambda: old_sample(logits, params, gens), args.repeats)
        new = _median_ms(lambda: sample(logits, params, gens), args.repeats)
        print(f"{name:32} {old:11.2f} {new:11.2f} {old / new:8.1f}x")


if __name__ == "__main__":
    main()
