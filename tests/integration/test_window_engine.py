"""Sliding-window attention end to end on a tiny random Mistral (window 8, 16-token
blocks): the colocated engine, with blocks outside the window freed while it runs, the
prefix cache, and the disaggregated path through the local connector all produce
transformers' greedy tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pdserve.engine.loader import load_model
from pdserve.engine.sampling import SamplingParams
from pdserve.services.launcher import ClusterSpec
from pdserve.wire import generate_pb2
from tests.support.cluster import run_request
from tests.support.engines import engine_on
from tests.support.tiny_models import hf_model_class, write_hf_folder

transformers = pytest.importorskip("transformers")

WINDOW = 8
NEW_TOKENS = 24
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("mistral-window"), "mistral", seed=3,
                           sliding_window=WINDOW)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(2, 258, (n,), generator=gen).tolist() for n in (40, 57, 23)]


@pytest.fixture(scope="module")
def expected(folder, prompts):
    """transformers' greedy continuations (its own forward and cache)."""
    model = hf_model_class("mistral").from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids, past, tokens = torch.tensor([prompt]), None, []
            for _ in range(NEW_TOKENS):
                res = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = res.past_key_values
                tokens.append(int(res.logits[0, -1].argmax()))
                ids = torch.tensor([[tokens[-1]]])
            out.append(tokens)
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    model = load_model(str(folder))
    assert model.config.droppable_window == WINDOW
    return model


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_colocated_frees_blocks_outside_the_window_and_matches_transformers(
        loaded, prompts, expected, async_scheduling):
    # 3 prompts of up to 81 tokens would need 14 blocks together; with a window of 8,
    # 9 blocks serve them all without preemption (decode steps queued ahead included)
    engine = engine_on(loaded, num_blocks=9, max_num_batched_tokens=48,
                       async_scheduling=async_scheduling)
    got = [c.token_ids for c in engine.generate(prompts, PARAMS)]
    assert got == expected
    assert engine.scheduler.num_preemptions == 0
    assert engine.pool_is_idle()


def test_prefix_hit_on_a_prompt_whose_blocks_were_dropped(loaded, prompts, expected):
    engine = engine_on(loaded, num_blocks=32)
    first = engine.generate([prompts[1]], PARAMS)[0]
    again = engine.generate([prompts[1]], PARAMS)[0]
    assert again.num_cached_tokens == 48  # 3 full blocks, the first ones dropped before
    assert first.token_ids == again.token_ids == expected[1]
    assert engine.pool_is_idle()


@pytest.mark.slow
def test_triton_backend_under_the_interpreter_matches_transformers(loaded, prompts, expected):
    pytest.importorskip("triton")
    # 16-token chunks: every chunk after the first starts past the window
    engine = engine_on(loaded, num_blocks=16, attention_backend="triton",
                       max_num_batched_tokens=16)
    got = engine.generate([prompts[0]], SamplingParams(max_tokens=12, ignore_eos=True))
    assert got[0].token_ids == expected[0][:12]
    assert engine.pool_is_idle()


@pytest.mark.slow
def test_triton_mixed_steps_run_decode_rows_apart_and_match_transformers(loaded, prompts,
                                                                        expected, monkeypatch):
    """The 57-token prompt is still chunked while the 23-token one decodes behind it in
    the running order: those steps go decode rows first, the decode rows through the
    decode kernel, and both continuations stay transformers'."""
    pytest.importorskip("triton")
    from pdserve.engine import model_runner

    reordered = []
    original = model_runner._decode_rows_first

    def spy(scheduled):
        rows = original(scheduled)
        reordered.append(rows is not None)
        return rows

    monkeypatch.setattr(model_runner, "_decode_rows_first", spy)
    engine = engine_on(loaded, num_blocks=24, attention_backend="triton",
                       max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = engine.generate([prompts[1], prompts[2]], params)
    assert [c.token_ids for c in got] == [expected[1][:8], expected[2][:8]]
    assert any(reordered)
    assert engine.pool_is_idle()


@pytest.mark.slow
def test_disaggregated_local_connector_matches_colocated(folder, prompts, expected):
    from pdserve.services.launcher import start_in_process

    async def scenario():
        router, workers = await start_in_process(ClusterSpec(connector="local",
                                                             model=str(folder)))
        try:
            results = []
            for prompt in prompts:
                results.append(await asyncio.to_thread(
                    run_request, router.address, prompt, PARAMS,
                    mode=generate_pb2.DISAGGREGATION_ALWAYS))
            return results
        finally:
            await router.stop()
            for w in workers:
                await w.stop()
                assert w.servicer.core.engine.pool_is_idle()

    results = asyncio.run(scenario())
    assert [tokens for tokens, _ in results] == expected
    assert all(last.prefill_worker and last.decode_worker for _, last in results)
