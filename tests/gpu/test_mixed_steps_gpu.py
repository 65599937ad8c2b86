"""Mixed steps (decode rows plus prompt chunks) replayed as graphs: piecewise (graphs
between eager attentions, one pass) and in parts (one decode graph for the decode rows,
one prefill graph per prompt chunk). Same tokens as the eager step, fp32, random-weight
model of a real shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.synthetic import synthetic_model

pytestmark = pytest.mark.gpu


def small_moe():
    """Qwen3-30B-A3B's layer shapes (128 experts, top 8, q/k norms), 3 layers, small vocab."""
    loaded = synthetic_model("qwen3-30b-a3b")
    return dataclasses.replace(loaded, config=dataclasses.replace(
        loaded.config, num_layers=3, vocab_size=4096, bos_token_id=1, eos_token_ids=(2,)))


def engine(shape: str = "smollm2-135m", **extra) -> LLMEngine:
    model = small_moe() if shape == "small-moe" else synthetic_model(shape)
    return LLMEngine(EngineConfig(device="cuda", dtype="float32", attention_backend="triton",
                                  cuda_graphs=True, num_blocks=2048, max_num_batched_tokens=256,
                                  async_scheduling=False, **extra), model)


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


def prompts_of(e: LLMEngine, lengths=(30, 120, 7, 300, 64, 1)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    vocab = e.model_config.vocab_size
    return [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in lengths]


def test_mixed_steps_replayed_in_parts_equal_eager_steps(monkeypatch):
    eager = engine(prefill_graph_max_tokens=0)
    parted = engine(mixed_step_graphs="parts")
    prompts = prompts_of(eager)
    calls = []
    original = parted.runner._execute_in_parts
    monkeypatch.setattr(parted.runner, "_execute_in_parts",
                        lambda scheduled, sampling: calls.append(len(scheduled))
                        or original(scheduled, sampling))
    want = staggered_run(eager, prompts)
    assert staggered_run(parted, prompts) == want
    assert any(n > 1 for n in calls), "no mixed step was replayed in parts"
    assert parted.pool_is_idle() and eager.pool_is_idle()


@pytest.mark.parametrize("shape", ["smollm2-135m", "small-moe"])
def test_piecewise_mixed_steps_equal_eager_steps(monkeypatch, shape):
    """Decode rows and chunks of several prompts in one piecewise pass: the tokens of the
    eager engine."""
    eager = engine(prefill_graph_max_tokens=0, shape=shape)
    piecewise = engine(shape=shape, mixed_step_graphs="piecewise")
    sizes = []
    original = piecewise.runner.piecewise.run
    monkeypatch.setattr(piecewise.runner.piecewise, "run",
                        lambda ids, *rest: sizes.append(ids.shape[0]) or original(ids, *rest))
    prompts = prompts_of(eager, (30, 120, 7, 300, 64, 1, 200, 45))
    assert staggered_run(piecewise, prompts) == staggered_run(eager, prompts)
    assert len(sizes) > 3 and max(sizes) > 100, sizes
    assert piecewise.pool_is_idle() and eager.pool_is_idle()
