"""vLLM on the same GPU, same shapes, same measurements as bench/engine_gpu.py.

Random weights of a pdserve synthetic shape (--shape: llama3-8b by default, qwen3-8b,
qwen3-30b-a3b; its config.json from pdserve.engine.synthetic.hf_config, vLLM's
load_format="dummy"), bf16, token-id prompts
(skip_tokenizer_init), prefix caching on with distinct prompts, offline `LLM`:
  * TTFT: one request, max_tokens=1, at 512 / 2k / 8k prompt tokens (median of 3);
  * decode ms/token at batch 1: (time for 128 tokens - time for 1) / 127, 512-token prompt;
  * throughput: 64 requests x 512 prompt x 128 output tokens submitted at once, after a
    warm-up of the same shape on other prompts.
vLLM is not a dependency of pdserve: this runs where `../shared/tools/vllm-peer` was
unpacked (see its header).

    python bench/vllm_peer.py --out bench/results/vllm-h200.json
    python bench/vllm_peer.py --shape qwen3-30b-a3b --out bench/results/vllm-qwen3-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from pdserve.engine.synthetic import SHAPES, hf_config
from report import write_report  # bench/report.py (this script's folder)

def random_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 120000, (n,), generator=g).tolist()


def timed(llm, prompts, params) -> float:
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    from vllm import LLM, SamplingParams
    import vllm

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b",
                   choices=[s for s in sorted(SHAPES) if SHAPES[s].vocab_size > 120000])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = hf_config(args.shape)
    # room for the 8k prompt plus its output (the shape's own limit may be 8192)
    config["max_position_embeddings"] = max(config["max_position_embeddings"], 8192 + 256)
    folder = tempfile.mkdtemp(prefix=f"{args.shape}-dummy-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=8192 + 256, enable_prefix_caching=True, seed=0)

    def params(n: int):
        return SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, temperature=0)

    res = {"gpu": torch.cuda.get_device_name(), "vllm": vllm.__version__,
           "torch": torch.__version__, "shape": args.shape, "dtype": "bfloat16",
           "commit": os.environ.get("PDSERVE_COMMIT", "unknown"),
           "command": f"python bench/vllm_peer.py --shape {args.shape}"}
    for n in (512, 2048, 8000):  # warm every shape once
        timed(llm, [random_prompt(n, 7 * n)], params(4))
    for n in (512, 2048, 8000):
        res[f"ttft_ms_{n}"] = 1000 * statistics.median(
            timed(llm, [random_prompt(n, 100 * n + r)], params(1)) for r in range(3))
    per_token = []
    for r in range(3):
        one = timed(llm, [random_prompt(512, 300 + r)], params(1))
        full = timed(llm, [random_prompt(512, 400 + r)], params(128))
        per_token.append((full - one) / 127)
    res["decode_ms_per_token_batch1"] = 1000 * statistics.median(per_token)
    timed(llm, [random_prompt(512, 700 + i) for i in range(64)], params(8))
    wall = timed(llm, [random_prompt(512, 900 + i) for i in range(64)], params(128))
    res.update(throughput_requests=64, throughput_wall_s=wall,
               throughput_output_tok_s=64 * 128 / wall)
    write_report(res, args.out)


if __name__ == "__main__":
    main()
