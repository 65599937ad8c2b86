"""Engine benchmark on one GPU: random-weight models of real shapes, bf16.

Measured in one process, same run:
  * TTFT (one request, max_tokens=1) at 512 / 2k / 8k prompt tokens;
  * decode time per token at batch 1 (512-token prompt, 128 new tokens);
  * throughput: 64 requests x 512 prompt x 128 output tokens, all submitted at once
    (median of three runs on fresh prompts);
for the torch reference backend (eager), the Triton backend (eager) and the Triton
backend with CUDA graphs for decode (token ids in, token ids out: detokenize=False, as
vLLM's skip_tokenizer_init in the reference figures); and the baseline transformers `generate_batch`
(paged sdpa) and `generate` (batch 1) on the same shapes with their own random weights.
Configs are backend[+graphs][+unfused][+sync][+eagerprefill]: fused Triton elementwise
kernels are on unless `+unfused`; with graphs, decode steps are scheduled asynchronously
unless `+sync`, and single-prompt prefills of up to 1,024 tokens replay graphs unless
`+eagerprefill` (e.g. --configs triton+graphs,triton+graphs+sync).

    python bench/engine_gpu.py --shape llama3-8b --out bench/results/engine-h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import torch

from pdserve.bench.loadgen import git_commit
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.synthetic import SHAPES, synthetic_model
from report import write_report  # bench/report.py (this script's folder)


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n,), generator=g).tolist()


def timed_generate(engine: LLMEngine, prompts, params):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure_engine(shape: str, backend: str, graphs: bool, fused: bool, quick: bool,
                   sync: bool = False, eager_prefill: bool = False) -> dict:
    model = synthetic_model(shape)
    vocab = model.config.vocab_size
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", attention_backend=backend,
                                    cuda_graphs=graphs, fused_kernels=fused,
                                    async_scheduling=False if sync else None,
                                    prefill_graph_max_tokens=0 if eager_prefill else 1024,
                                    kv_cache_memory_gb=20, max_num_batched_tokens=8192,
                                    max_num_seqs=128), model)
    res = {"backend": backend, "cuda_graphs": graphs, "fused_kernels": fused,
           "async_scheduling": engine.runner.async_scheduling,
           "prefill_graphs": engine.runner.prefill_graphs is not None}
    warm = SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False)
    engine.generate([random_prompt(512, vocab, 0)] * 2, warm)  # compile kernels
    engine.generate([random_prompt(512, vocab, 1)], warm)  # a lone 512-token prefill
    one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    for n in (512, 2048, 8000):
        # seeds differ per length: equal seeds would make the shorter prompt a cached prefix
        times = [timed_generate(engine, [random_prompt(n, vocab, 100 * n + r)], one)[0]
                 for r in range(3)]
        res[f"ttft_ms_{n}"] = 1000 * statistics.median(times)
    decode = SamplingParams(max_tokens=32 if quick else 128, ignore_eos=True, detokenize=False)
    itls = []
    for r in range(3):
        _, [c] = timed_generate(engine, [random_prompt(512, vocab, 200 + r)], decode)
        itls.append(statistics.median(c.itl_s))
    res["decode_ms_per_token_batch1"] = 1000 * statistics.median(itls)
    n_req = 16 if quick else 64
    # warm-up of the same shape (full 8192-token prefill steps, every decode batch size)
    # on other prompts, so the measured run neither compiles nor hits the prefix cache
    warm_prompts = [random_prompt(512, vocab, 700 + i) for i in range(n_req)]
    timed_generate(engine, warm_prompts, SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False))
    rates, walls = [], []
    for r in range(3):  # run-to-run spread is a few percent: report the median of three
        batch = [random_prompt(512, vocab, 1000 * (r + 1) + i) for i in range(n_req)]
        wall, outs = timed_generate(engine, batch, SamplingParams(max_tokens=128,
                                                                  ignore_eos=True,
                                                                  detokenize=False))
        walls.append(wall)
        rates.append(sum(len(c.token_ids) for c in outs) / wall)
    res.update(throughput_requests=n_req, throughput_wall_s=statistics.median(walls),
               throughput_output_tok_s=statistics.median(rates),
               throughput_output_tok_s_runs=rates)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def measure_transformers(shape: str, quick: bool) -> dict:
    import transformers
    from transformers.generation import GenerationConfig

    cfg = SHAPES[shape]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings)
    res = {"transformers": transformers.__version__}
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    vocab = cfg.vocab_size
    n_req = 16 if quick else 64
    prompts = [random_prompt(512, vocab, 300 + i) for i in range(n_req)]
    gen = GenerationConfig(max_new_tokens=128, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    for impl in ("paged|sdpa", "sdpa_paged"):
        try:
            model.set_attn_implementation(impl)
            model.generate_batch(inputs=prompts[:4], generation_config=gen, progress_bar=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            outs = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            tokens = sum(len(o.generated_tokens) for o in outs.values())
            res.update(generate_batch_impl=impl, generate_batch_wall_s=wall,
                       generate_batch_output_tok_s=tokens / wall)
            break
        except Exception as exc:  # record, keep measuring the rest
            res[f"generate_batch_error_{impl}"] = repr(exc)[:300]
    try:
        model.set_attn_implementation("sdpa")
        ids = torch.tensor([prompts[0]], device="cuda")
        new = 32 if quick else 128
        model.generate(ids, max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        res["generate_batch1_ms_per_token"] = 1000 * (time.perf_counter() - start) / new
    except Exception as exc:
        res["generate_error"] = repr(exc)[:300]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--configs", default="torch,triton,triton+graphs")
    p.add_argument("--baseline", action="store_true", help="also run transformers")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "python": platform.python_version(),
        "commit": git_commit(), "shape": args.shape, "dtype": "bfloat16",
        "command": "python bench/engine_gpu.py " + " ".join(
            f"--{k}={v}" if not isinstance(v, bool) else f"--{k}" for k, v in vars(args).items()
            if v not in (None, False)),
        "engine": [],
    }
    for name in args.configs.split(","):
        backend, *extras = name.split("+")
        r = measure_engine(args.shape, backend, "graphs" in extras, "unfused" not in extras,
                           args.quick, sync="sync" in extras,
                           eager_prefill="eagerprefill" in extras)
        print(json.dumps(r), flush=True)
        result["engine"].append(r)
    if args.baseline:
        result["transformers"] = measure_transformers(args.shape, args.quick)
        print(json.dumps(result["transformers"]), flush=True)
    write_report(result, args.out)


if __name__ == "__main__":
    main()
