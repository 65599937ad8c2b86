"""Sliding-window block freeing in the scheduler, on fake requests (no model, no tensors):
blocks wholly before the window of a request's next query go back to the allocator while
it decodes or prefills in chunks; the rest of the block bookkeeping stays exact."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.kvcache.allocator import BlockAllocator
from pdserve.engine.scheduler.request import FinishReason, RequestState
from pdserve.engine.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.unit.test_scheduler import BS, SAMPLED, req, run_to_end, step


def make(window, num_blocks=64, max_seqs=8, budget=64, caching=True, whole_prompt=False):
    alloc = BlockAllocator(num_blocks)
    config = SchedulerConfig(block_size=BS, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             enable_prefix_caching=caching, fingerprint="test-model",
                             sliding_window=window, allocate_whole_prompt=whole_prompt)
    return Scheduler(config, alloc), alloc


def live_blocks(request) -> list[int]:
    return request.block_ids[request.num_dropped_blocks:]


def holders(sched):
    return [*sched.running, *sched.waiting, *sched.remote.values(), *sched.held.values()]


def check_accounting(sched, alloc):
    """Distinct prompts (no sharing): referenced blocks are exactly the live ones."""
    live = [b for r in holders(sched) for b in live_blocks(r)]
    assert len(live) == len(set(live)), "a block is live twice"
    assert alloc.num_blocks - alloc.num_free == len(live)


def test_decode_keeps_only_the_blocks_its_next_query_sees():
    window = 20
    sched, alloc = make(window)
    r = req("a", 40, max_tokens=80)
    sched.add(r)
    most_dropped = 0
    while not r.is_finished:
        out = step(sched)
        if out.scheduled and not r.is_finished:
            # the step just run had its first query at position p: keys from p - w + 1,
            # and one more for the step before it (it may still run on the device)
            p = r.num_computed_tokens - out.scheduled[0].num_new_tokens
            assert r.num_dropped_blocks == max(0, p - window) // BS
            check_accounting(sched, alloc)
            most_dropped = r.num_dropped_blocks
    assert most_dropped == (40 + 79 - 1 - window) // BS
    assert alloc.num_free == alloc.num_blocks


def test_long_generation_fits_a_pool_smaller_than_its_context():
    # 40 + 200 tokens need 15 blocks without a window; a 20-token window needs <= 3 (+1 spare)
    sched, alloc = make(20, num_blocks=4)
    r = req("a", 40, max_tokens=200)
    sched.add(r)
    run_to_end(sched)
    assert len(r.output_ids) == 200 and r.num_preemptions == 0
    assert alloc.num_free == alloc.num_blocks


def test_without_a_window_the_same_request_is_refused_blocks():
    sched, _ = make(0, num_blocks=4)
    r = req("a", 40, max_tokens=200)
    sched.add(r)
    for _ in range(40):
        step(sched)
    assert r.num_dropped_blocks == 0 and r.num_preemptions > 0


def test_chunked_prefill_drops_blocks_between_chunks():
    # a 200-token prompt in 32-token chunks through a 5-block pool
    sched, alloc = make(24, num_blocks=5, budget=32)
    r = req("a", 200, max_tokens=3)
    sched.add(r)
    chunks = []
    while not r.is_finished:
        chunks.append(step(sched).scheduled[0].num_new_tokens)
    assert chunks[:6] == [32] * 6 and r.num_preemptions == 0
    assert alloc.num_free == alloc.num_blocks


def test_held_request_keeps_every_block_for_its_transfer():
    sched, alloc = make(16, budget=32, whole_prompt=True)
    r = req("a", 100, max_tokens=1, hold_blocks=True)
    sched.add(r)
    run_to_end(sched)
    assert r.state is RequestState.FINISHED and r.num_dropped_blocks == 0
    assert len(r.block_ids) == -(-100 // BS) == alloc.num_blocks - alloc.num_free
    sched.release_held("a")
    assert alloc.num_free == alloc.num_blocks


def test_preempting_a_request_with_dropped_blocks_frees_only_live_ones():
    sched, alloc = make(20, num_blocks=7, budget=64)
    a, b = req("a", 60, max_tokens=40, first=100), req("b", 60, max_tokens=40, first=500)
    sched.add(a)
    sched.add(b)
    preempted = 0
    while sched.num_unfinished:
        out = step(sched)
        preempted += len(out.preempted)
        check_accounting(sched, alloc)
    assert len(a.output_ids) == len(b.output_ids) == 40
    assert alloc.num_free == alloc.num_blocks


@pytest.mark.parametrize("seed", range(4))
def test_random_mix_never_deadlocks_and_frees_everything(seed):
    rng = random.Random(seed)
    window = rng.choice([1, 16, 17, 40])
    sched, alloc = make(window, num_blocks=rng.randint(6, 12), budget=rng.choice([8, 32, 64]),
                        max_seqs=4, caching=False)
    for i in range(10):
        sched.add(req(f"r{i}", rng.randint(1, 90), max_tokens=rng.randint(1, 50),
                      first=1000 * i))
    steps = 0
    while sched.num_unfinished:
        step(sched)
        check_accounting(sched, alloc)
        steps += 1
        assert steps < 5000
    assert alloc.num_free == alloc.num_blocks


@pytest.mark.parametrize("where", ["running", "waiting_for_kv", "held"])
def test_finish_frees_every_live_block_once(where):
    sched, alloc = make(16, budget=128)
    r = req("a", 70, max_tokens=30, hold_blocks=where == "held")
    if where == "waiting_for_kv":
        sched.add_remote(r)
    else:
        sched.add(r)
        for _ in range(20 if where == "running" else 40):
            step(sched)
    sched.finish(r, FinishReason.ABORT)
    assert alloc.num_free == alloc.num_blocks


def test_remote_prompt_drops_blocks_once_it_decodes():
    sched, alloc = make(20)
    r = req("a", 70, max_tokens=10)
    blocks = sched.add_remote(r)
    assert len(blocks) == -(-70 // BS) and r.num_dropped_blocks == 0  # all of it arrives
    sched.remote_kv_arrived("a", SAMPLED)
    step(sched)
    assert r.num_dropped_blocks == (70 - 20) // BS
    check_accounting(sched, alloc)
    run_to_end(sched)
    assert alloc.num_free == alloc.num_blocks


# ---- prefix cache ------------------------------------------------------------------------

def test_dropped_block_still_serves_a_prefix_hit_while_unused():
    # a dropped block's content is intact until the allocator hands it out again
    sched, alloc = make(20)
    a = req("a", 64, max_tokens=30)
    sched.add(a)
    for _ in range(10):
        step(sched)
    dropped = a.block_ids[:a.num_dropped_blocks]
    assert dropped
    b = req("b", 64, max_tokens=2)
    sched.add(b)
    step(sched)
    assert b.num_cached_tokens == 48 and b.block_ids[:len(dropped)] == dropped


def test_reused_dropped_block_is_no_longer_a_prefix_hit():
    sched, alloc = make(20, num_blocks=8, budget=256)
    a = req("a", 64, max_tokens=30)
    sched.add(a)
    for _ in range(10):
        step(sched)
    first_dropped = a.block_ids[0]
    assert a.num_dropped_blocks >= 1
    # another prompt takes every free block, the dropped ones included
    filler = req("f", BS * alloc.num_free - 1, max_tokens=5, first=9000)
    sched.add(filler)
    step(sched)
    assert first_dropped in filler.block_ids
    assert alloc.peek_prefix(a.block_keys[:3]) == 0  # the chain starts at the reused block
    sched.finish(filler, FinishReason.ABORT)
    b = req("b", 64, max_tokens=2)
    sched.add(b)
    step(sched)
    assert b.num_cached_tokens == 0


def test_prefix_hit_outside_the_new_requests_window_is_dropped_at_admission():
    sched, alloc = make(20)
    a = req("a", 96, max_tokens=1)
    sched.add(a)
    run_to_end(sched)  # a's 6 full blocks stay cached
    b = req("b", 100, max_tokens=5)
    sched.add(b)
    step(sched)
    # b's first query at 96 (6 cached blocks) sees keys from 77: blocks 0..3 go back
    assert b.num_cached_tokens == 96 and b.num_dropped_blocks == (96 - 20) // BS == 4
    check_accounting(sched, alloc)
