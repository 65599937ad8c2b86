"""CPU decode benchmark: pdserve's engine vs transformers `generate`, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_cpu.py [--new-tokens 64] [--repeats 3]

Same bundled model (SmolLM2-135M-Instruct GGUF, dequantized to fp32), same chat prompt,
greedy, a fixed number of new tokens (EOS ignored). Decode rate excludes prefill: the
time from the first generated token to the last, over the tokens made in between.

- transformers: `model.generate(...)` at batch 1; a logits processor timestamps every
  step (it runs right after each forward, before the token is chosen).
- pdserve batch 1: one request through LLMEngine.step(); token timestamps of the engine.
- pdserve batch 16: 16 concurrent requests (distinct prompts); the window starts when
  the last of them has its first token (all prefills done) and ends at the last token;
  rate = tokens made in that window / its length (aggregate over the batch).

The engine runs with its default CPU matmuls (numpy's OpenBLAS, torch's own ops on one
thread) and, as the in-run comparison, with `cpu_blas="torch"` (MKL through torch, torch
threads as transformers has them). transformers always runs with the process's torch
thread count (restored before each of its runs: the numpy engine sets torch to one
thread while it steps).

Runs are interleaved (hf, engines b1 and b16, repeat) so load from other processes
hits all of them alike; each figure is the median of the repeats. Writes
bench/results/engine-cpu.json and prints a Markdown table.

Targets (the issue): engine batch 1 >= 1.5x transformers batch 1;
engine with 16 concurrent requests >= 5x transformers batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdserve.bench.loadgen import git_commit  # noqa: E402
from pdserve.engine.config import EngineConfig  # noqa: E402
from pdserve.engine.engine import LLMEngine  # noqa: E402
from pdserve.engine.loader import load_model, resolve_model  # noqa: E402
from pdserve.engine.sampling import SamplingParams  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence."
BATCH_QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colors.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What does a compiler do?",
    "Give me a tip for learning to cook.",
    "Explain photosynthesis to a child.",
    "What is 12 times 13?",
    "Describe the ocean in two sentences.",
    "What is a prime number?",
    "Suggest a name for a pet turtle.",
    "How do airplanes stay in the air?",
    "What is the tallest mountain on Earth?",
    "Translate 'good morning' into Spanish.",
    "List two benefits of exercise.",
    "What is the boiling point of water?",
]
TARGET_B1, TARGET_B16 = 1.5, 5.0


# ---- environment ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"



def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def decode_rate(times: list[float]) -> float:
    """Tokens per second between the first and the last timestamp."""
    return (len(times) - 1) / (times[-1] - times[0])


# ---- transformers -----------------------------------------------------------------------

def load_hf():
    import transformers

    path = resolve_model(None).path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model


class _StepTimer:
    """A logits processor that only records when each generation step's forward ended."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_run(model, prompt_ids: list[int], n: int) -> tuple[float, list[int]]:
    from transformers import LogitsProcessorList

    timer = _StepTimer()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                             logits_processor=LogitsProcessorList([timer]))
    assert len(timer.times) == n, f"transformers made {len(timer.times)} steps, wanted {n}"
    return decode_rate(timer.times), out[0, len(prompt_ids):].tolist()


# ---- pdserve ------------------------------------------------------------------------------

def engine_run(engine: LLMEngine, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    times: dict[str, list[float]] = {i: [] for i in ids}
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            times[out.request_id].append(now)
            tokens[out.request_id] += out.new_token_ids
    assert all(len(t) == n for t in tokens.values()), "a request stopped early"
    start = max(t[0] for t in times.values())  # every prefill is done
    end = max(t[-1] for t in times.values())
    made = sum(1 for ts in times.values() for t in ts if t > start)
    return made / (end - start), [tokens[i] for i in ids]


# ---- main ------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/engine-cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    n = args.new_tokens
    load_before = loadavg()

    loaded = load_model(None)
    tok = loaded.tokenizer
    engines = {blas: LLMEngine(EngineConfig(dtype="float32", max_num_seqs=max(args.batch, 16),
                                            cpu_blas=blas), loaded)
               for blas in ("numpy", "torch")}
    hf = load_hf()
    prompt = tok.encode_chat([{"role": "user", "content": QUESTION}])
    batch = [tok.encode_chat([{"role": "user", "content": q}])
             for q in (BATCH_QUESTIONS * (args.batch // len(BATCH_QUESTIONS) + 1))[:args.batch]]

    # warm-up (first calls allocate and pick kernels), not timed
    torch.set_num_threads(threads)
    hf_run(hf, prompt, 4)
    for engine in engines.values():
        torch.set_num_threads(threads)
        engine_run(engine, [prompt], 4)
        engine_run(engine, batch, 4)

    eos = set(loaded.config.eos_token_ids)
    hf_rates, loads = [], []
    rates = {blas: ([], []) for blas in engines}  # (b1, batch) per engine
    same_tokens = True
    for r in range(args.repeats):
        torch.set_num_threads(threads)
        hf_rate, hf_tokens = hf_run(hf, prompt, n)
        hf_rates.append(hf_rate)
        for blas, engine in engines.items():
            torch.set_num_threads(threads)
            e1_rate, (e1_tokens,) = engine_run(engine, [prompt], n)
            eb_rate, _ = engine_run(engine, batch, n)
            # transformers' min_new_tokens masks EOS, the engine's ignore_eos does not:
            # compare up to the engine's first EOS
            k = next((i for i, t in enumerate(e1_tokens) if t in eos), n)
            same_tokens &= hf_tokens[:k] == e1_tokens[:k]
            rates[blas][0].append(e1_rate), rates[blas][1].append(eb_rate)
        loads.append(loadavg())
        print(f"repeat {r}: transformers {hf_rate:.2f} tok/s, " + ", ".join(
            f"pdserve ({blas}) b1 {b1[-1]:.2f} / b{args.batch} {bb[-1]:.2f} tok/s"
            for blas, (b1, bb) in rates.items()) + f", load {loads[-1]}", flush=True)

    hf_med = statistics.median(hf_rates)
    e1_med, eb_med = (statistics.median(x) for x in rates["numpy"])
    t1_med, tb_med = (statistics.median(x) for x in rates["torch"])
    result = {
        "benchmark": "engine-cpu decode",
        "model": f"{loaded.source.name} ({loaded.source.path.name}, dequantized to fp32)",
        "dtype": "float32",
        "prompt_tokens": len(prompt),
        "batch_prompt_tokens": [len(p) for p in batch],
        "new_tokens": n,
        "repeats": args.repeats,
        "metric": "decode tokens/s excluding prefill, median of repeats",
        "transformers_b1_tok_s": round(hf_med, 2),
        "pdserve_b1_tok_s": round(e1_med, 2),
        f"pdserve_b{args.batch}_tok_s": round(eb_med, 2),
        "speedup_b1": round(e1_med / hf_med, 2),
        f"speedup_b{args.batch}": round(eb_med / hf_med, 2),
        "targets": {"b1": TARGET_B1, f"b{args.batch}": TARGET_B16},
        "meets_targets": e1_med >= TARGET_B1 * hf_med and eb_med >= TARGET_B16 * hf_med,
        "cpu_blas": "numpy (default)",
        "pdserve_torch_blas_b1_tok_s": round(t1_med, 2),
        f"pdserve_torch_blas_b{args.batch}_tok_s": round(tb_med, 2),
        "greedy_tokens_equal_transformers_until_eos": same_tokens,
        "runs": {"transformers_b1": [round(x, 2) for x in hf_rates],
                 "pdserve_b1": [round(x, 2) for x in rates["numpy"][0]],
                 f"pdserve_b{args.batch}": [round(x, 2) for x in rates["numpy"][1]],
                 "pdserve_torch_blas_b1": [round(x, 2) for x in rates["torch"][0]],
                 f"pdserve_torch_blas_b{args.batch}": [round(x, 2) for x in rates["torch"][1]]},
        "env": {
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": f"{threads} (transformers, cpu_blas=torch); 1 (cpu_blas=numpy)",
            "numpy": __import__("numpy").__version__,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version(), "git_commit": git_commit(),
            "loadavg_before": load_before, "loadavg_per_repeat": loads,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result, args.batch))
    print(f"wrote {args.out}")


def markdown_table(r: dict, b: int) -> str:
    hf = r["transformers_b1_tok_s"]
    rows = [("transformers `generate`, batch 1", hf, 1.0, "—"),
            ("pdserve engine, batch 1", r["pdserve_b1_tok_s"], r["speedup_b1"], f">= {TARGET_B1}x"),
            (f"pdserve engine, {b} concurrent", r[f"pdserve_b{b}_tok_s"], r[f"speedup_b{b}"],
             f">= {TARGET_B16}x"),
            ("same run, `cpu_blas=torch` (MKL), batch 1", r["pdserve_torch_blas_b1_tok_s"],
             r["pdserve_torch_blas_b1_tok_s"] / hf, "—"),
            (f"same run, `cpu_blas=torch`, {b} concurrent", r[f"pdserve_torch_blas_b{b}_tok_s"],
             r[f"pdserve_torch_blas_b{b}_tok_s"] / hf, "—")]
    lines = ["| run | decode tok/s | vs transformers b1 | target |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {rate:.1f} | {x:.2f}x | {t} |" for name, rate, x, t in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
