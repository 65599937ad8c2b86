"""Engine invariants on real models: batching, chunking, prefix cache, leaks, preemption."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.sampling import InvalidRequest, SamplingParams
from tests.support.engines import abort_one, bundled_engine, bundled_model, engine_on, run_to_end
from tests.support.tiny_models import tiny_loaded_model

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return bundled_engine(max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def prompts(engine):
    texts = ["Hi", "The quick brown fox jumps over the lazy dog because",
             "Write a haiku about the ocean and the moon at night, please.",
             "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21"]
    return [engine.tokenizer.encode(t) for t in texts]


def test_mixed_batch_equals_each_alone(engine, prompts):
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    together = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    assert together == alone
    assert engine.pool_is_idle()


def test_chunked_prefill_equals_unchunked(engine, prompts):
    chunked = bundled_engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    steps_before = engine.num_steps
    want = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    got = [c.token_ids for c in chunked.generate(prompts, GREEDY)]
    assert got == want
    assert chunked.num_steps > engine.num_steps - steps_before  # prompts really were split


def test_prefix_cache_hit_equals_miss(engine):
    shared = engine.tokenizer.encode("You are a careful assistant. " * 8)
    a = shared + engine.tokenizer.encode(" Tell me about cats.")
    b = shared + engine.tokenizer.encode(" Tell me about dogs.")
    miss = bundled_engine(enable_prefix_caching=False).generate([b], GREEDY)[0]
    engine.generate([a], GREEDY)
    hit = engine.generate([b], GREEDY)[0]
    assert hit.num_cached_tokens >= (len(shared) // 16) * 16 > 0
    assert miss.num_cached_tokens == 0
    assert hit.token_ids == miss.token_ids
    assert engine.pool_is_idle()


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine, prompts):
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    first = engine.generate([prompts[1]], seeded)[0].token_ids
    # same seed inside a different batch draws the same tokens
    batch = engine.generate([prompts[0], prompts[1], prompts[2]],
                            [GREEDY, seeded, SamplingParams(max_tokens=5, temperature=1.0, seed=9)])
    assert batch[1].token_ids == first
    other = engine.generate([prompts[1]], SamplingParams(
        max_tokens=10, temperature=0.9, top_p=0.95, seed=4321, ignore_eos=True))[0].token_ids
    assert other != first
    top1 = SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True)
    assert engine.generate([prompts[2]], top1)[0].token_ids == \
        engine.generate([prompts[2]], GREEDY)[0].token_ids


def test_stop_strings_and_stop_tokens(engine):
    prompt = engine.tokenizer.encode("Count: 1, 2, 3, 4, 5, 6,")
    full = engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = engine.generate([prompt], SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text)
    tok = full.token_ids[4]
    by_id = engine.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=(tok,)))[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(tok) + 1]


@pytest.mark.parametrize("bad", [
    dict(prompt=[]),
    dict(prompt=list(range(9000))),
    dict(prompt=[10**9]),
])
def test_bad_prompts_are_refused_and_leave_nothing(engine, bad):
    with pytest.raises(InvalidRequest):
        engine.add_request(bad["prompt"], GREEDY)
    assert not engine.has_unfinished() and engine.pool_is_idle()


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded_model(bundled_model().tokenizer, seed=3)


def test_random_load_with_stops_and_aborts_leaks_no_block(tiny):
    engine = engine_on(tiny, num_blocks=96, max_num_batched_tokens=96, max_num_seqs=24)
    rng = random.Random(7)
    vocab = tiny.config.vocab_size
    live, finished, aborted = set(), 0, 0
    for n in range(200):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 120))]
        params = SamplingParams(max_tokens=rng.randint(1, 24),
                                temperature=rng.choice([0.0, 0.8]), seed=n,
                                stop_token_ids=(rng.randrange(3, vocab),))
        live.add(engine.add_request(prompt, params))
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        if live and rng.random() < 0.15:
            abort_one(engine, live, rng)
            aborted += 1
    finished += run_to_end(engine, live)
    assert not live and finished + aborted == 200 and aborted > 10
    assert engine.pool_is_idle()
    assert engine.allocator.num_cached > 0  # freed blocks stay findable by prefix


def test_preemption_under_a_tiny_pool_completes_every_request(tiny):
    roomy = engine_on(tiny, num_blocks=512)
    tight = engine_on(tiny, num_blocks=12, max_num_batched_tokens=64)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, tiny.config.vocab_size) for _ in range(rng.randint(20, 60))]
               for _ in range(10)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [c.token_ids for c in roomy.generate(prompts, params)]
    got = tight.generate(prompts, params)
    assert [c.token_ids for c in got] == want
    assert tight.scheduler.num_preemptions > 0
    assert tight.pool_is_idle()


def test_engine_loop_sleeps_while_a_request_waits_for_remote_kv(tiny):
    """A decode worker's request waiting for its KV gives the engine thread nothing to
    compute: the loop must sleep, not spin (it held the GIL ~35% of the time and slowed
    the KV side channel next to it)."""
    import asyncio
    import time

    from pdserve.services.engine_loop import EngineLoop

    engine = engine_on(tiny)
    engine.reserve_remote([5, 6, 7, 8] * 5, GREEDY, "remote-1")
    ticks = []
    loop = EngineLoop(engine, asyncio.new_event_loop(), tick=lambda e, outs: ticks.append(1))
    loop.start()
    try:
        time.sleep(0.5)
    finally:
        loop.stop()
    assert engine.has_unfinished() and not engine.has_runnable()
    assert len(ticks) <= 25, f"{len(ticks)} ticks in 0.5 s: the loop spins"


def test_cpu_matmuls_on_numpy_blas_equal_the_torch_path(prompts):
    """The default CPU path (numpy's OpenBLAS over the same weight memory, torch on one
    thread) gives the greedy tokens of torch's own matmuls, alone and batched."""
    import torch

    numpy_blas = bundled_engine(cpu_blas="numpy")
    torch_blas = bundled_engine(cpu_blas="torch")
    linear = numpy_blas.runner.model.lm_head
    assert linear.blas_weight is not None and torch_blas.runner.model.lm_head.blas_weight is None
    assert linear.blas_weight.ctypes.data == linear.weight.data_ptr()  # no copy
    want = [c.token_ids for c in torch_blas.generate(prompts, GREEDY)]
    assert [c.token_ids for c in numpy_blas.generate(prompts, GREEDY)] == want
    assert torch.get_num_threads() == 1


def test_inline_engine_commands_run_on_the_caller_only_when_the_engine_is_idle(tiny):
    """inline=True saves the hand-off to the engine thread only when that thread is idle
    and nothing is queued; a request added inline is still stepped (the loop is woken)."""
    import asyncio
    import threading

    from pdserve.services.engine_loop import EngineLoop

    engine = engine_on(tiny)
    aio = asyncio.new_event_loop()
    loop = EngineLoop(engine, aio)
    loop.start()

    def where() -> str:
        return threading.current_thread().name

    try:
        assert aio.run_until_complete(loop.call(where, inline=True)) == "MainThread"
        assert aio.run_until_complete(loop.call(where)) == "engine-loop"
        gate = threading.Event()
        loop.submit(gate.wait, 5.0)  # the engine thread is busy until the gate opens
        threading.Timer(0.2, gate.set).start()
        assert aio.run_until_complete(loop.call(where, inline=True)) == "engine-loop"
        stream = loop.open_stream("inline-1")
        aio.run_until_complete(loop.call(engine.add_request, [5, 6, 7, 8] * 3, GREEDY,
                                         "inline-1", inline=True))

        async def tokens() -> list[int]:
            out, ids = None, []
            while out is None or not out.finished:
                out = await asyncio.wait_for(stream.get(), 30)
                ids += out.new_token_ids
            return ids

        assert aio.run_until_complete(tokens()) == engine_on(tiny).generate(
            [[5, 6, 7, 8] * 3], GREEDY)[0].token_ids
    finally:
        loop.stop()
        aio.close()
    assert engine.pool_is_idle()
