"""Block allocator with reference counts and a prefix cache.

A block is either in use (refcount > 0) or free. Free blocks sit in one LRU queue; a free
block that still holds a full, hashed block of some earlier prompt stays findable by its
prefix key until the allocator hands it out again (eviction = reuse of the oldest free
block). Pure CPU logic: no torch.

Blocks a running request frees early (outside a sliding window, scheduler.py) follow the
same rule: their KV is intact until allocate() hands them out again, and allocate()
forgets their key first, so a prefix hit never names a block that was rewritten.
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._ref[block] = 1
            blocks.append(block)
        # which blocks are taken is LRU; their order within the request is free, and
        # ascending ids make contiguous runs (one bulk message per run on the KV wire)
        blocks.sort()
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; tail blocks first so they are evicted first."""
        for block in reversed(blocks):
            if self._ref[block] <= 0:
                raise ValueError(f"block {block} freed more often than allocated")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None

    def lookup_prefix(self, keys: list[bytes]) -> list[int]:
        """Take a reference on the longest cached chain of keys; returns its blocks."""
        hits = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        for block in hits:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
        self.prefix_queries += len(keys)
        self.prefix_hits += len(hits)
        return hits

    def peek_prefix(self, keys: list[bytes]) -> int:
        """How many leading keys are cached, without taking references."""
        n = 0
        for key in keys:
            if key not in self._block_of:
                break
            n += 1
        return n

    def register(self, block: int, key: bytes) -> None:
        """Mark a full, computed block as holding the prefix named by key."""
        if key in self._block_of or block in self._key_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def reset_prefix_cache(self) -> None:
        self._key_of.clear()
        self._block_of.clear()

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
