"""Model families on the GPU: the CUDA path (Triton attention with windows and soft caps,
fused elementwise kernels, fused MoE, CUDA graphs) against transformers' tokens (fp32, on
the CPU) for tiny random checkpoints, and the real-shape synthetic Qwen3 models run."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.loader import load_model
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.synthetic import synthetic_model
from tests.integration.test_model_oracles import CASES, NEW_TOKENS, hf_greedy, prompts
from tests.support.tiny_models import hf_reference, write_hf_folder

pytestmark = pytest.mark.gpu


def cuda_engine(model, graphs: bool, dtype: str = "float32", **extra) -> LLMEngine:
    return LLMEngine(EngineConfig(device="cuda", dtype=dtype, attention_backend="triton",
                                  cuda_graphs=graphs, num_blocks=256,
                                  max_num_batched_tokens=16, **extra), model)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("case", ["gemma2", "gemma3", "qwen3", "phi3-window", "llama-gelu",
                                  "mistral-window", "qwen3-moe", "mixtral-window"])
def test_cuda_path_matches_transformers_fp32(case, graphs, tmp_path):
    # TF32 would round fp32 matmuls to 10-bit mantissas; the oracle is fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    arch, overrides, _ = CASES[case]
    folder = write_hf_folder(tmp_path / "hf", arch, random_vectors=True, **overrides)
    hf = hf_reference(arch, folder)
    want = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts()]
    engine = cuda_engine(load_model(str(folder)), graphs)
    got = engine.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [c.token_ids for c in got] == want
    assert engine.pool_is_idle()


@pytest.mark.parametrize("shape", ["qwen3-8b", "qwen3-30b-a3b"])
def test_synthetic_qwen3_shapes_generate_bf16(shape):
    """Real shapes, random weights: graphs and eager agree on greedy tokens for the first
    steps (bf16 sums may round apart later), and nothing is NaN."""
    model = synthetic_model(shape, max_position=4096)
    prompts_ = [torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                for n in (7, 300)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    eager = cuda_engine(model, graphs=False, dtype="bfloat16", max_num_seqs=8)
    want = [c.token_ids for c in eager.generate(prompts_, params)]
    del eager
    torch.cuda.empty_cache()
    graphed = cuda_engine(model, graphs=True, dtype="bfloat16", max_num_seqs=8)
    got = [c.token_ids for c in graphed.generate(prompts_, params)]
    assert [g[:1] for g in got] == [w[:1] for w in want]
    assert all(0 <= t < model.config.vocab_size for g in got for t in g)
