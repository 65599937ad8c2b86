"""min_tokens on the GPU: the sampler's banned ids on CUDA logits (greedy and sampled
rows in one batch), and an engine with CUDA graphs and asynchronous scheduling (tokens
sampled before the host reads the previous step's) that keeps going past a stop token
until min_tokens. Random-weight model of real shapes."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling import SamplingParams, sample
from pdserve.engine.synthetic import synthetic_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def test_banned_ids_are_never_drawn_on_cuda():
    vocab = 4096
    logits = torch.zeros(64, vocab, device="cuda")  # [rows, vocab]
    logits[:, 7] = 50.0  # every row's favourite
    logits[:, 9] = 49.0
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i) for i in range(64)]
    banned = [(7,) if i < 48 else () for i in range(64)]
    drawn = sample(logits, params, [None] * 64, banned)
    assert all(t != 7 for t in drawn[:48]) and all(t == 9 for t in drawn[1:48:2])
    assert drawn[49::2] == [7] * 8  # greedy rows without a ban keep their favourite


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_min_tokens_outlasts_a_stop_token_with_cuda_graphs(async_scheduling):
    engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", attention_backend="triton",
                                    cuda_graphs=True, num_blocks=1024,
                                    async_scheduling=async_scheduling),
                       synthetic_model("smollm2-135m"))
    prompt = list(range(100, 140))
    free = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    stop = free[1]
    early = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True,
                                                     stop_token_ids=(stop,)))[0].token_ids
    assert early == free[:free.index(stop) + 1]
    kept = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, min_tokens=8,
                                                    stop_token_ids=(stop,)))[0].token_ids
    assert len(kept) >= 8 and stop not in kept[:8], kept
    assert engine.pool_is_idle()
