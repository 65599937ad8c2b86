"""Chained prefix-block keys (docs/architecture.md): key_i = H(key_{i-1}, tokens of block i, model).

Only full blocks get keys. Keys are stable across processes and machines (blake2b, not
Python's salted hash), so they name chunks in the Redis pool and drive prefix routing.
"""

from __future__ import annotations

import hashlib
import struct

KEY_BYTES = 16
ROOT = b"\x00" * KEY_BYTES


def block_key(parent: bytes, tokens: list[int] | tuple[int, ...], fingerprint: str) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(parent)
    h.update(fingerprint.encode())
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def prefix_block_keys(token_ids: list[int], block_size: int, fingerprint: str,
                      parent: bytes = ROOT, start_block: int = 0) -> list[bytes]:
    """Keys of every full block of token_ids, from start_block on (parent = key before it)."""
    keys = []
    for b in range(start_block, len(token_ids) // block_size):
        parent = block_key(parent, token_ids[b * block_size:(b + 1) * block_size], fingerprint)
        keys.append(parent)
    return keys
