"""Where an engine step's time goes on the GPU: host phases vs device time.

Wraps the engine's step phases with wall-clock timers and CUDA events (the engine itself
is unchanged) and runs, on a random-weight model of a real shape, bf16, Triton backend
with CUDA graphs:
  * decode at batch 1 and batch 64 (steady state, 64 steps each);
  * a 512-token and a 2048-token single-request prefill;
  * the 64 x 512 x 128 throughput run, split into prefill/mixed/decode steps.
For each it reports the mean per step of: schedule, build_batch, forward launch (graph
replay or eager model call, host side), sample (includes waiting for the device), the
post-processing of outputs, and the forward's device time from CUDA events. With
asynchronous scheduling (the default; --sync turns it off) a decode step shows as
launch_decode (queued, device time from events) and resolve (waiting for the previous
step's tokens, then its outputs).

    python bench/profile_steps.py --shape llama3-8b --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.synthetic import synthetic_model
from report import write_report  # bench/report.py (this script's folder)


class PhaseTimer:
    """Accumulates host seconds per phase and device seconds of the forward."""

    def __init__(self) -> None:
        self.host = collections.defaultdict(float)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.steps = 0

    def wrap(self, obj, name: str, phase: str, device: bool = False) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if device:
                start_ev, end_ev = torch.cuda.Event(True), torch.cuda.Event(True)
                start_ev.record()
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.host[phase] += time.perf_counter() - t0
            if device:
                end_ev.record()
                self.events.append((start_ev, end_ev))
            return out

        setattr(obj, name, timed)

    def reset(self) -> None:
        torch.cuda.synchronize()
        self.host.clear()
        self.events.clear()
        self.steps = 0

    def report(self) -> dict:
        torch.cuda.synchronize()
        n = max(self.steps, 1)
        out = {f"{k}_ms": 1000 * v / n for k, v in sorted(self.host.items())}
        if self.events:
            out["forward_device_ms"] = sum(a.elapsed_time(b) for a, b in self.events) / n
        out["steps"] = self.steps
        return out


def instrument(engine: LLMEngine) -> PhaseTimer:
    timer = PhaseTimer()
    runner = engine.runner
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(runner, "build_batch", "build_batch")
    timer.wrap(runner.model, "forward", "forward_launch", device=True)
    if runner.graphs is not None:
        timer.wrap(runner.graphs, "run", "forward_launch", device=True)
    timer.wrap(runner, "_sample", "sample")
    timer.wrap(runner, "launch_decode", "launch_decode", device=True)
    timer.wrap(engine, "_resolve", "resolve")
    timer.wrap(engine, "_on_token", "post")
    timer.wrap(engine.scheduler, "advance", "post")
    step = engine.step

    def counted_step():
        t0 = time.perf_counter()
        out = step()
        timer.host["step_total"] += time.perf_counter() - t0
        timer.steps += 1
        return out

    engine.step = counted_step
    return timer


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n,), generator=g).tolist()


def run_decode(engine, timer, batch: int, vocab: int, seed: int) -> dict:
    params = SamplingParams(max_tokens=72, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(prompt(512, vocab, seed + i), params)
    for _ in range(8):  # prefill steps and the first decode steps
        engine.step()
    timer.reset()
    for _ in range(60):
        engine.step()
    res = timer.report()
    while engine.has_unfinished():
        engine.step()
    return res


def run_prefill(engine, timer, n: int, vocab: int, seed: int) -> dict:
    results = []
    for r in range(3):
        engine.add_request(prompt(n, vocab, seed + r),
                           SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False))
        timer.reset()
        while engine.has_unfinished():
            engine.step()
        results.append(timer.report())
    return results[-1]


def run_throughput(engine, timer, vocab: int, seed: int) -> dict:
    kinds = collections.Counter()
    wall = collections.defaultdict(float)
    schedule = engine.scheduler.schedule

    def classify():
        plan = schedule()
        n_new = [s.num_new_tokens for s in plan.scheduled]
        kind = ("decode" if all(n == 1 for n in n_new) else
                "prefill" if all(n > 1 for n in n_new) else "mixed")
        kinds[kind] += 1
        classify.kind = kind
        return plan

    engine.scheduler.schedule = classify
    params = SamplingParams(max_tokens=128, ignore_eos=True, detokenize=False)
    for i in range(64):
        engine.add_request(prompt(512, vocab, seed + i), params)
    timer.reset()
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        wall[classify.kind] += time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    engine.scheduler.schedule = schedule
    return {"wall_s": total, "output_tok_s": 64 * 128 / total,
            "steps": dict(kinds), "wall_s_by_kind": dict(wall), "phases": timer.report()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--out")
    ap.add_argument("--sync", action="store_true", help="no asynchronous scheduling")
    args = ap.parse_args()
    model = synthetic_model(args.shape)
    vocab = model.config.vocab_size
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", attention_backend="triton",
                                    cuda_graphs=True, kv_cache_memory_gb=20,
                                    async_scheduling=False if args.sync else None,
                                    max_num_batched_tokens=8192, max_num_seqs=128), model)
    engine.generate([prompt(512, vocab, 1)] * 2,
                    SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
    # warm-up before instrumenting: compiles kernels and captures every decode graph
    warm = PhaseTimer()
    run_decode(engine, warm, 1, vocab, 5000)
    run_throughput(engine, warm, vocab, 6000)
    timer = instrument(engine)
    res = {"gpu": torch.cuda.get_device_name(), "shape": args.shape,
           "async_scheduling": engine.runner.async_scheduling}
    res["decode_b1"] = run_decode(engine, timer, 1, vocab, 100)
    res["decode_b64"] = run_decode(engine, timer, 64, vocab, 200)
    res["prefill_512"] = run_prefill(engine, timer, 512, vocab, 300)
    res["prefill_2048"] = run_prefill(engine, timer, 2048, vocab, 400)
    res["throughput"] = run_throughput(engine, timer, vocab, 900)
    write_report(res, args.out, indent=1)


if __name__ == "__main__":
    main()
