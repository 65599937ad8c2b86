"""Asynchronous scheduling (decode step N+1 queued before step N's tokens are read) gives
exactly the synchronous engine's results: tokens, stops, seeded draws, aborts, requests
joining from a KV transfer mid-flight, and every block back in the pool.

On the CPU a queued step runs to completion at once, so these tests check the
bookkeeping (placeholders, carried input tokens, dropped rows), not the overlap; the GPU
tier runs the same path with CUDA graphs."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.sampling import SamplingParams
from tests.support.engines import abort_one, bundled_model, engine_on, run_to_end
from tests.support.tiny_models import tiny_loaded_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded_model(bundled_model().tokenizer, seed=5)


@pytest.fixture(scope="module")
def bundled():
    return bundled_model()  # real text: greedy runs do not repeat one token


def pair(model, **config):
    """(synchronous, asynchronous) engines of the same configuration."""
    return (engine_on(model, async_scheduling=False, **config),
            engine_on(model, async_scheduling=True, **config))


def prompts_for(model, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(1, 70))]
            for _ in range(n)]


def run_counting_ahead(engine, prompts, params):
    """generate(), also counting the steps after which a step was still in flight."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
    tokens = {i: [] for i in ids}
    reasons = {}
    ahead = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        ahead += engine.num_rows_in_flight > 0
    return [tokens[i] for i in ids], [reasons[i] for i in ids], ahead


def test_greedy_tokens_and_early_stops_equal_the_synchronous_engine(bundled):
    sync, ahead = pair(bundled, num_blocks=256, max_num_batched_tokens=64)
    prompts = prompts_for(bundled, 6, seed=1)
    free_run = sync.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    # each request stops on a token it meets mid-way, so rows stop at different steps
    params = [SamplingParams(max_tokens=24, ignore_eos=True,
                             stop_token_ids=(c.token_ids[3 + 3 * i],))
              for i, c in enumerate(free_run)]
    want = run_counting_ahead(sync, prompts, params)
    got = run_counting_ahead(ahead, prompts, params)
    assert got[:2] == want[:2]
    # ran ahead in most decode steps (prompt chunks share steps with decodes since the
    # scheduler caps a chunk at half the budget, so fewer steps are decode-only: 10 here)
    assert "stop" in got[1] and want[2] == 0 and got[2] >= 8
    assert sync.pool_is_idle() and ahead.pool_is_idle()


def test_seeded_sampling_and_stop_strings_equal_the_synchronous_engine(bundled):
    sync, ahead = pair(bundled, num_blocks=256)
    prompts = prompts_for(bundled, 5, seed=2)
    probe = sync.generate(prompts[:1], SamplingParams(max_tokens=20, temperature=0.9, seed=0))
    stop = probe[0].text[8:10]  # a string the first request is sure to produce
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=i,
                             stop=(stop,) if i == 0 else ())
              for i in range(len(prompts))]
    want = sync.generate(prompts, params)
    got = ahead.generate(prompts, params)
    assert [(c.token_ids, c.text, c.finish_reason) for c in got] == \
        [(c.token_ids, c.text, c.finish_reason) for c in want]
    assert got[0].finish_reason == "stop" and stop not in got[0].text
    assert ahead.pool_is_idle()


def test_a_request_joining_from_a_kv_transfer_while_a_step_is_in_flight(tiny):
    """Its first input token is known on the host, the others' are on the device."""
    results = []
    for engine in pair(tiny, num_blocks=256):
        params = SamplingParams(max_tokens=16, ignore_eos=True)
        local = [engine.add_request(p, params) for p in prompts_for(tiny, 3, seed=3)]
        outs = [o for _ in range(4) for o in engine.step()]
        in_flight = engine.num_rows_in_flight
        # the KV "arrives" as the zeros both pools start with: same state in both engines
        engine.reserve_remote([7, 8, 9] * 11, params, "remote")
        outs.append(engine.remote_kv_arrived("remote", 42))
        while engine.has_unfinished():
            outs += engine.step()
        tokens = {r: [t for o in outs if o.request_id == r for t in o.new_token_ids]
                  for r in local + ["remote"]}
        results.append((tokens, in_flight))
        assert engine.pool_is_idle()
    (want, sync_in_flight), (got, async_in_flight) = results
    assert sync_in_flight == 0 and async_in_flight == 3
    assert got == want and all(len(t) == 16 for t in got.values())


def test_random_load_with_stops_and_aborts_leaks_no_block(tiny):
    engine = engine_on(tiny, async_scheduling=True, num_blocks=96,
                       max_num_batched_tokens=96, max_num_seqs=24)
    rng = random.Random(9)
    live, finished, aborted, dropped = set(), 0, 0, 0
    for n in range(150):
        params = SamplingParams(max_tokens=rng.randint(1, 24),
                                temperature=rng.choice([0.0, 0.8]), seed=n,
                                stop_token_ids=(rng.randrange(3, tiny.config.vocab_size),))
        live.add(engine.add_request(prompts_for(tiny, 1, seed=100 + n)[0], params))
        for _ in range(rng.randint(1, 3)):
            for out in engine.step():
                assert out.request_id in live  # nothing arrives for an aborted request
                if out.finished:
                    live.discard(out.request_id)
                    finished += 1
        if live and rng.random() < 0.2:
            dropped += engine.num_rows_in_flight > 0
            abort_one(engine, live, rng)
            aborted += 1
    finished += run_to_end(engine, live)
    assert not live and finished + aborted == 150 and dropped > 3
    assert engine.pool_is_idle() and engine.num_rows_in_flight == 0


def test_preemption_pressure_reads_tokens_before_scheduling(tiny):
    """With too few blocks the step cannot run ahead (a preempted request would be
    recomputed from a placeholder): results still equal a roomy pool's."""
    roomy = engine_on(tiny, num_blocks=512)
    tight = engine_on(tiny, async_scheduling=True, num_blocks=12, max_num_batched_tokens=64)
    prompts = prompts_for(tiny, 10, seed=4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [c.token_ids for c in roomy.generate(prompts, params)]
    assert [c.token_ids for c in tight.generate(prompts, params)] == want
    assert tight.scheduler.num_preemptions > 0 and tight.pool_is_idle()
