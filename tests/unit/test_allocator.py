"""BlockAllocator: reference counts, prefix cache, LRU eviction (pure CPU, no torch)."""

from __future__ import annotations

import pytest

from pdserve.engine.kvcache.allocator import BlockAllocator, OutOfBlocks


def key(i: int) -> bytes:
    return bytes([i]) * 16


def test_allocate_hands_out_distinct_blocks_and_usage_follows():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert alloc.num_free == 0 and alloc.usage == 1.0
    alloc.free(a)
    assert alloc.num_free == 3 and alloc.usage == pytest.approx(5 / 8)


def test_out_of_blocks_allocates_nothing():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(OutOfBlocks, match="need 2 blocks, 1 free"):
        alloc.allocate(2)
    assert alloc.num_free == 1  # the failed call took nothing


def test_double_free_raises():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="freed more often"):
        alloc.free(blocks[:1])


def test_shared_block_stays_in_use_until_last_reference_goes():
    alloc = BlockAllocator(4)
    (block,) = alloc.allocate(1)
    alloc.register(block, key(1))
    alloc.free([block])  # cached, free
    assert alloc.lookup_prefix([key(1)]) == [block]  # ref 1
    assert alloc.lookup_prefix([key(1)]) == [block]  # ref 2
    assert alloc.num_free == 3
    alloc.free([block])
    assert alloc.num_free == 3  # one reference left
    alloc.free([block])
    assert alloc.num_free == 4
    with pytest.raises(ValueError):
        alloc.free([block])


def test_lookup_takes_the_longest_cached_chain_only():
    alloc = BlockAllocator(6)
    blocks = alloc.allocate(3)
    for i, b in enumerate(blocks):
        alloc.register(b, key(i))
    alloc.free(blocks)
    # key(1) missing from the query: the chain stops at the first miss
    assert alloc.lookup_prefix([key(0), key(9), key(2)]) == [blocks[0]]
    assert alloc.prefix_queries == 3 and alloc.prefix_hits == 1
    assert alloc.lookup_prefix([key(7)]) == []


def test_peek_counts_without_taking_references():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.register(blocks[0], key(0))
    alloc.register(blocks[1], key(1))
    alloc.free(blocks)
    assert alloc.peek_prefix([key(0), key(1), key(2)]) == 2
    assert alloc.peek_prefix([key(1)]) == 1
    assert alloc.num_free == 4 and alloc.prefix_queries == 0


def test_register_keeps_the_first_block_for_a_key():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(2)
    alloc.register(a, key(5))
    alloc.register(b, key(5))  # same prefix computed twice: first one wins
    alloc.register(a, key(6))  # a block names one prefix only
    alloc.free([a, b])
    assert alloc.lookup_prefix([key(5)]) == [a]
    assert alloc.lookup_prefix([key(6)]) == []


def test_oldest_freed_block_is_reused_first():
    alloc = BlockAllocator(3)
    a, b, c = (alloc.allocate(1)[0] for _ in range(3))
    for i, blk in enumerate((a, b, c)):
        alloc.register(blk, key(i))
    alloc.free([b])
    alloc.free([a])
    alloc.free([c])
    assert alloc.allocate(1) == [b]  # freed first, evicted first
    assert alloc.allocate(1) == [a]


def test_reused_block_forgets_its_key():
    alloc = BlockAllocator(2)
    a, b = alloc.allocate(2)
    alloc.register(a, key(1))
    alloc.free([a])
    assert alloc.num_cached == 1
    assert alloc.allocate(1) == [a]  # evicted: now holds something else
    assert alloc.num_cached == 0
    assert alloc.peek_prefix([key(1)]) == 0
    assert alloc.lookup_prefix([key(1)]) == []
    alloc.register(a, key(2))  # the block may be named again
    assert alloc.peek_prefix([key(2)]) == 1


def test_free_releases_tail_blocks_first():
    alloc = BlockAllocator(4)
    seq = alloc.allocate(4)
    alloc.free(seq)
    # the tail of a sequence is the least likely to be shared: it goes first
    assert alloc.allocate(1) == [seq[-1]]
    assert alloc.allocate(2) == sorted(seq[1:3])


def test_allocation_hands_out_ascending_ids_so_runs_stay_contiguous():
    alloc = BlockAllocator(8)
    first = alloc.allocate(8)
    alloc.free(first)  # the free queue now holds them in descending order
    again = alloc.allocate(5)
    assert again == sorted(again) and again == list(range(again[0], again[0] + 5))


def test_cached_free_block_found_again_leaves_the_free_queue():
    alloc = BlockAllocator(2)
    a, b = alloc.allocate(2)
    alloc.register(a, key(1))
    alloc.free([a, b])
    assert alloc.lookup_prefix([key(1)]) == [a]
    assert alloc.allocate(1) == [b]  # a is in use again, so it is not handed out
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)


def test_reset_prefix_cache_forgets_every_key():
    alloc = BlockAllocator(2)
    a, _ = alloc.allocate(2)
    alloc.register(a, key(3))
    alloc.reset_prefix_cache()
    assert alloc.num_cached == 0 and alloc.peek_prefix([key(3)]) == 0
