"""Mixed steps (decode rows plus prompt chunks) replayed as graphs in parts: one decode
graph for the decode rows, one prefill graph per prompt chunk. Same tokens as the eager
step, fp32, random-weight model of a real shape."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.synthetic import synthetic_model

pytestmark = pytest.mark.gpu


def engine(**extra) -> LLMEngine:
    return LLMEngine(EngineConfig(device="cuda", dtype="float32", attention_backend="triton",
                                  cuda_graphs=True, num_blocks=2048, max_num_batched_tokens=256,
                                  async_scheduling=False, **extra),
                     synthetic_model("smollm2-135m"))


def staggered_run(e: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Admit one prompt every third step, so prompts chunk in beside running decodes."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ids, got, pending, steps = [], {}, list(prompts), 0
    while pending or e.has_unfinished():
        if pending and steps % 3 == 0:
            ids.append(e.add_request(pending.pop(0), params))
            got[ids[-1]] = []
        for out in e.step():
            got[out.request_id] += out.new_token_ids
        steps += 1
    return [got[i] for i in ids]


def test_mixed_steps_replayed_in_parts_equal_eager_steps(monkeypatch):
    g = torch.Generator().manual_seed(1)
    eager = engine(prefill_graph_max_tokens=0)
    parted = engine()
    vocab = eager.model_config.vocab_size
    prompts = [torch.randint(10, vocab - 10, (n,), generator=g).tolist()
               for n in (30, 120, 7, 300, 64, 1)]
    calls = []
    original = parted.runner._execute_in_parts
    monkeypatch.setattr(parted.runner, "_execute_in_parts",
                        lambda scheduled, sampling: calls.append(len(scheduled))
                        or original(scheduled, sampling))
    want = staggered_run(eager, prompts)
    assert staggered_run(parted, prompts) == want
    assert any(n > 1 for n in calls), "no mixed step was replayed in parts"
    assert parted.pool_is_idle() and eager.pool_is_idle()
