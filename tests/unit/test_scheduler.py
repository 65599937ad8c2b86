"""Unified scheduler on fake requests: no model, no tensors; the engine loop is simulated
(schedule -> advance with a made-up sampled token -> finish at max_tokens)."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.kvcache.allocator import BlockAllocator
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler.request import FinishReason, Request, RequestState
from pdserve.engine.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 16
SAMPLED = 7  # the fake model always "samples" this token


def make(num_blocks=64, max_seqs=8, budget=64, caching=True):
    alloc = BlockAllocator(num_blocks)
    config = SchedulerConfig(block_size=BS, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             enable_prefix_caching=caching, fingerprint="test-model")
    return Scheduler(config, alloc), alloc


def req(rid: str, prompt_len: int, max_tokens: int = 4, first: int = 100, **kw) -> Request:
    return Request(rid, list(range(first, first + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kw)


def step(sched: Scheduler):
    """One engine step without a model; finishes requests that reached max_tokens."""
    out = sched.schedule()
    for s in out.scheduled:
        sched.advance(s, SAMPLED if s.samples else None)
    for s in out.scheduled:
        r = s.request
        if not r.is_finished and len(r.output_ids) >= r.params.max_tokens:
            sched.finish(r, FinishReason.LENGTH)
    return out


def plan(out) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def run_to_end(sched: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.num_unfinished:
        step(sched)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


# ---- token budget and chunked prefill --------------------------------------------------

def test_budget_goes_to_running_requests_first_then_waiting():
    sched, _ = make(budget=32)
    sched.add(req("a", 10))
    sched.add(req("b", 10))
    assert plan(step(sched)) == [("a", 10), ("b", 10)]
    sched.add(req("c", 100))
    # a and b decode one token each; c gets what is left of the budget
    assert plan(step(sched)) == [("a", 1), ("b", 1), ("c", 30)]
    assert plan(step(sched)) == [("a", 1), ("b", 1), ("c", 30)]


def test_chunked_prefill_progresses_and_samples_only_at_the_end():
    sched, _ = make(budget=16)
    r = req("a", 40)
    sched.add(r)
    seen = []
    for _ in range(3):
        out = step(sched)
        (s,) = out.scheduled
        seen.append((s.num_new_tokens, r.num_computed_tokens, len(r.output_ids)))
    assert seen == [(16, 16, 0), (16, 32, 0), (8, 40, 1)]
    assert plan(step(sched)) == [("a", 1)]  # now decoding
    assert r.num_computed_tokens == 41


def test_long_prompt_does_not_starve_when_budget_is_one_token():
    sched, _ = make(budget=1)
    r = req("a", 5, max_tokens=2)
    sched.add(r)
    assert run_to_end(sched) == 6  # 5 prompt tokens one by one, then one decode
    assert r.output_ids == [SAMPLED, SAMPLED]


def test_max_num_seqs_caps_the_running_batch():
    sched, _ = make(max_seqs=2)
    for name in "abc":
        sched.add(req(name, 4, max_tokens=2))
    assert [r for r, _ in plan(step(sched))] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]
    out = step(sched)  # a and b finish (2 tokens each) at the end of this step
    assert [r for r, _ in plan(out)] == ["a", "b"]
    assert [r for r, _ in plan(step(sched))] == ["c"]


# ---- prefix cache ----------------------------------------------------------------------

def test_prefix_cache_hit_skips_cached_blocks():
    sched, alloc = make()
    sched.add(req("first", 40, max_tokens=1))
    run_to_end(sched)
    assert alloc.num_free == alloc.num_blocks and alloc.num_cached == 2
    again = req("again", 40)
    sched.add(again)
    assert plan(step(sched)) == [("again", 40 - 32)]
    assert again.num_cached_tokens == 32


def test_prefix_cache_never_serves_the_last_prompt_token():
    sched, _ = make()
    sched.add(req("first", 32, max_tokens=1))  # exactly two full blocks
    run_to_end(sched)
    again = req("again", 32)
    sched.add(again)
    # both blocks are cached, but the last token must run to produce logits
    assert plan(step(sched)) == [("again", 16)]
    assert again.num_cached_tokens == 16


def test_prefix_cache_off_computes_everything():
    sched, alloc = make(caching=False)
    sched.add(req("first", 40, max_tokens=1))
    run_to_end(sched)
    assert alloc.num_cached == 0
    sched.add(req("again", 40))
    assert plan(step(sched)) == [("again", 40)]


def test_different_prompt_gets_no_hit():
    sched, _ = make()
    sched.add(req("first", 40, max_tokens=1))
    run_to_end(sched)
    other = req("other", 40, first=5000)
    sched.add(other)
    assert plan(step(sched)) == [("other", 40)] and other.num_cached_tokens == 0


def test_waiting_request_does_not_pin_cached_blocks():
    sched, alloc = make(num_blocks=4, budget=64)
    sched.add(req("first", 33, max_tokens=1))
    run_to_end(sched)
    assert alloc.num_cached == 2  # blocks 0-31 of the prompt
    sched.add(req("x", 20, max_tokens=50, first=9000))
    step(sched)  # x holds the two uncached free blocks
    assert alloc.num_free == 2
    w = req("w", 72)  # shares the cached 32 tokens, needs 5 blocks in all
    sched.add(w)
    out = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["x"]
    assert w.state is RequestState.WAITING and w.block_ids == []
    assert w.num_computed_tokens == 0 and w.num_cached_tokens == 0
    assert alloc.num_free == 2  # the cached blocks went back
    assert alloc.peek_prefix(sched._keys_up_to(w, 2)) == 2  # and stay findable


# ---- preemption ------------------------------------------------------------------------

def test_preemption_evicts_the_latest_admitted_and_requeues_it_first():
    sched, alloc = make(num_blocks=4, budget=64, caching=False)
    a, b, c = req("a", 31, max_tokens=20), req("b", 31, max_tokens=20), req("c", 10)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled: 2 blocks each, the pool is full
    step(sched)  # decode position 31: still inside block 2
    sched.add(c)
    out = step(sched)  # a needs a third block: b goes
    assert out.preempted == [b]
    assert plan(out) == [("a", 1)]  # and nothing is admitted in a step that preempted
    assert b.state is RequestState.PREEMPTED and b.block_ids == []
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert sched.running == [a] and sched.num_preemptions == 1
    assert len(a.block_ids) == 3 and alloc.num_free == 1


def test_preempted_request_recomputes_prompt_and_outputs():
    sched, _ = make(num_blocks=4, budget=64, caching=False)
    a, b = req("a", 31, max_tokens=20), req("b", 31, max_tokens=20)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        step(sched)
    assert b.state is RequestState.PREEMPTED
    made = len(b.output_ids)
    run_to_end(sched)
    assert b.output_ids == [SAMPLED] * 20 and made == 2  # nothing lost, nothing doubled
    assert a.output_ids == [SAMPLED] * 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_pool_never_deadlocks_and_frees_everything(seed):
    rng = random.Random(seed)
    sched, alloc = make(num_blocks=8, budget=48, max_seqs=6, caching=bool(seed % 2))
    reqs = [req(f"r{i}", rng.randint(5, 60), max_tokens=rng.randint(1, 60),
                first=rng.randrange(0, 50)) for i in range(12)]
    for r in reqs:  # every one fits the pool alone (<= 120 tokens = 8 blocks)
        assert r.num_tokens + r.params.max_tokens <= 8 * BS
        sched.add(r)
    run_to_end(sched)
    assert all(r.is_finished and r.finish_reason is FinishReason.LENGTH for r in reqs)
    assert all(len(r.output_ids) == r.params.max_tokens for r in reqs)
    assert sched.num_preemptions > 0
    assert alloc.num_free == alloc.num_blocks
    assert not sched.running and not sched.waiting and not sched.requests


# ---- finishing -------------------------------------------------------------------------

def _all_states():
    """One scheduler holding a request in every state: waiting, running, preempted, remote."""
    sched, alloc = make(num_blocks=8, budget=64, caching=False)
    running, preempted = req("running", 40, max_tokens=50), req("preempted", 40, max_tokens=50)
    sched.add(running)
    sched.add(preempted)
    step(sched)
    step(sched)
    while preempted.state is not RequestState.PREEMPTED:
        step(sched)
    waiting = req("waiting", 10)
    sched.add(waiting)
    remote = req("remote", 20)
    sched.add_remote(remote)
    return sched, alloc, {r.request_id: r for r in (waiting, running, preempted, remote)}


@pytest.mark.parametrize("name", ["waiting", "running", "preempted", "remote"])
def test_finish_from_each_state_frees_its_blocks(name):
    sched, alloc, reqs = _all_states()
    r = reqs[name]
    assert r.state is not RequestState.FINISHED
    held = len(r.block_ids)
    free = alloc.num_free
    sched.finish(r, FinishReason.ABORT)
    assert r.state is RequestState.FINISHED and r.finish_reason is FinishReason.ABORT
    assert alloc.num_free == free + held and r.block_ids == []
    assert sched.get(name) is None
    assert r not in sched.running and r not in sched.waiting and name not in sched.remote
    sched.finish(r, FinishReason.STOP)  # a second finish changes nothing
    assert r.finish_reason is FinishReason.ABORT and alloc.num_free == free + held
    for other in reqs.values():
        sched.finish(other, FinishReason.ABORT)
    assert alloc.num_free == alloc.num_blocks and sched.num_unfinished == 0


def test_hold_blocks_keeps_kv_until_released():
    sched, alloc = make()
    r = req("p", 40, max_tokens=1, hold_blocks=True)
    sched.add(r)
    run_to_end(sched)
    assert r.is_finished and sched.held == {"p": r}
    assert alloc.num_free == alloc.num_blocks - 3 and r.block_ids
    assert sched.get("p") is r
    sched.release_held("p")
    assert alloc.num_free == alloc.num_blocks and sched.get("p") is None
    sched.release_held("p")  # idempotent
    assert alloc.num_free == alloc.num_blocks


def test_aborting_a_held_request_frees_its_blocks():
    sched, alloc = make()
    r = req("p", 40, max_tokens=1, hold_blocks=True)
    sched.add(r)
    run_to_end(sched)
    sched.finish(r, FinishReason.STOP)  # finishing again keeps it held
    assert sched.held == {"p": r}
    sched.finish(r, FinishReason.ABORT)
    assert not sched.held and sched.get("p") is None
    assert alloc.num_free == alloc.num_blocks


def test_aborted_request_is_not_held():
    sched, alloc = make()
    r = req("p", 40, hold_blocks=True)
    sched.add(r)
    step(sched)
    sched.finish(r, FinishReason.ABORT)
    assert not sched.held and alloc.num_free == alloc.num_blocks


# ---- remote KV (decode side of disaggregation) -------------------------------------------

def test_add_remote_reserves_blocks_before_any_kv_arrives():
    sched, alloc = make()
    r = req("d", 40)
    blocks = sched.add_remote(r)
    assert len(blocks) == 3 and blocks == r.block_ids
    assert alloc.num_free == alloc.num_blocks - 3
    assert r.state is RequestState.WAITING_FOR_KV
    assert not step(sched).scheduled  # nothing to run until the KV is there
    assert sched.num_unfinished == 1


def test_remote_kv_arrived_joins_the_decode_batch():
    sched, _ = make()
    r = req("d", 40, max_tokens=3)
    sched.add_remote(r)
    sched.remote_kv_arrived("d", first_token=42)
    assert r.state is RequestState.RUNNING and r.num_computed_tokens == 40
    assert r.output_ids == [42]
    assert plan(step(sched)) == [("d", 1)]  # decodes right away, no prefill
    run_to_end(sched)
    assert r.output_ids == [42, SAMPLED, SAMPLED]


def test_remote_prompt_registers_its_blocks_for_later_hits():
    sched, alloc = make()
    sched.add_remote(req("d", 40, max_tokens=1))
    sched.remote_kv_arrived("d", first_token=42)
    run_to_end(sched)
    again = req("again", 40)
    sched.add(again)
    assert plan(step(sched)) == [("again", 8)] and again.num_cached_tokens == 32


def test_remote_kv_failure_recomputes_only_the_uncached_part():
    sched, alloc = make()
    sched.add(req("warm", 40, max_tokens=1))
    run_to_end(sched)  # 2 blocks of this prompt are cached
    r = req("d", 40)
    blocks = sched.add_remote(r)
    assert r.num_cached_tokens == 32  # those need not be sent
    sched.add(req("other", 5, first=7000))
    sched.remote_kv_failed("d")
    assert r.state is RequestState.WAITING and sched.waiting[0] is r  # ahead of "other"
    out = step(sched)
    assert plan(out)[0] == ("d", 8)
    assert r.block_ids[:3] == blocks  # the reserved blocks are kept


def test_remote_without_room_raises_and_leaves_nothing():
    sched, alloc = make(num_blocks=2)
    with pytest.raises(MemoryError):
        sched.add_remote(req("big", 40))
    assert alloc.num_free == 2 and sched.get("big") is None
    sched.add_remote(req("big", 20))  # the id is free again


def test_remote_with_a_full_pool_waits_in_line_and_is_granted_in_order():
    sched, alloc = make(num_blocks=6)
    first = req("first", 64)  # 4 of the 6 blocks
    assert len(sched.add_remote(first)) == 4
    big, small = req("big", 40, first=500), req("small", 10, first=900)
    assert sched.add_remote(big) is None and sched.add_remote(small) is None
    assert big.state is small.state is RequestState.RESERVING
    assert not big.block_ids and alloc.num_free == 2  # in line, holding nothing
    assert sched.num_unfinished == 3
    assert sched.grant_reservations() == []  # small fits, but must not overtake big
    sched.finish(first, FinishReason.ABORT)
    assert sched.grant_reservations() == [big, small]
    assert big.state is small.state is RequestState.WAITING_FOR_KV
    assert len(big.block_ids) == 3 and len(small.block_ids) == 1
    assert sched.grant_reservations() == []


def test_a_reservation_leaves_each_running_request_its_next_block():
    sched, alloc = make(num_blocks=8, budget=128)
    sched.add(req("running", 30, max_tokens=40))
    step(sched)  # 2 blocks in use, 6 free
    assert sched.add_remote(req("fits-tight", 96, first=500)) is None  # 6 + 1 > 6
    assert sched.add_remote(req("x", 1, first=900)) is None  # behind it in line
    assert len(sched.reserving) == 2


def test_an_aborted_reservation_in_line_leaves_the_line_and_frees_nothing():
    sched, alloc = make(num_blocks=4)
    sched.add_remote(req("occupant", 64))
    waiting = req("waiting", 16, first=500)
    assert sched.add_remote(waiting) is None
    sched.finish(waiting, FinishReason.ABORT)
    assert not sched.reserving and sched.get("waiting") is None
    sched.finish(sched.get("occupant"), FinishReason.ABORT)
    assert sched.grant_reservations() == [] and alloc.num_free == alloc.num_blocks


def test_a_reservation_in_line_pins_no_cached_block():
    sched, alloc = make(num_blocks=5)
    sched.add(req("warm", 40, max_tokens=1))
    run_to_end(sched)  # 2 blocks of this prompt are cached, all 5 free
    hog = req("hog", 64, first=5000)
    sched.add_remote(hog)  # takes 4: the cached blocks are evictable free blocks
    again = req("again", 40)
    assert sched.add_remote(again) is None
    assert again.block_ids == [] and again.num_cached_tokens == 0
    assert alloc.num_free == 1


def test_duplicate_request_id_is_rejected():
    sched, _ = make()
    sched.add(req("same", 4))
    with pytest.raises(ValueError, match="duplicate request id 'same'"):
        sched.add(req("same", 8))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_remote(req("same", 8))
    assert len(sched.waiting) == 1
