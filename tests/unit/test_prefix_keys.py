"""Chained prefix-block keys: key_i = H(key_{i-1}, tokens of block i, model fingerprint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pdserve.engine.kvcache.prefix import ROOT, block_key, prefix_block_keys

BS = 16
TOKENS = list(range(100, 100 + 5 * BS + 7))  # 5 full blocks and a partial one


def test_only_full_blocks_get_keys():
    assert len(prefix_block_keys(TOKENS, BS, "fp")) == 5
    assert prefix_block_keys(TOKENS[:BS - 1], BS, "fp") == []
    assert len(prefix_block_keys(TOKENS[:BS], BS, "fp")) == 1


def test_keys_chain_through_every_earlier_block():
    base = prefix_block_keys(TOKENS, BS, "fp")
    changed = list(TOKENS)
    changed[3] += 1  # a token of block 0
    other = prefix_block_keys(changed, BS, "fp")
    assert all(a != b for a, b in zip(base, other))  # every later key moves too
    changed = list(TOKENS)
    changed[2 * BS] += 1  # a token of block 2
    other = prefix_block_keys(changed, BS, "fp")
    assert other[:2] == base[:2]
    assert all(a != b for a, b in zip(base[2:], other[2:]))


def test_same_block_tokens_at_another_place_get_another_key():
    block = TOKENS[:BS]
    keys = prefix_block_keys(block + block, BS, "fp")
    assert keys[0] != keys[1]


def test_partial_tail_does_not_change_full_block_keys():
    assert prefix_block_keys(TOKENS, BS, "fp") == prefix_block_keys(TOKENS[:5 * BS], BS, "fp")


def test_keys_depend_on_the_model_fingerprint():
    a = prefix_block_keys(TOKENS, BS, "model-a")
    b = prefix_block_keys(TOKENS, BS, "model-b")
    assert all(x != y for x, y in zip(a, b))


def test_first_key_chains_from_root_and_matches_block_key():
    keys = prefix_block_keys(TOKENS, BS, "fp")
    assert keys[0] == block_key(ROOT, TOKENS[:BS], "fp")
    assert keys[1] == block_key(keys[0], TOKENS[BS:2 * BS], "fp")


def test_continuation_from_a_parent_equals_full_computation():
    full = prefix_block_keys(TOKENS, BS, "fp")
    for start in range(1, 5):
        rest = prefix_block_keys(TOKENS, BS, "fp", parent=full[start - 1], start_block=start)
        assert full[:start] + rest == full


def test_keys_are_stable_across_processes():
    """Another interpreter (its own hash salt) computes the same keys."""
    script = (
        "import json, sys\n"
        "from pdserve.engine.kvcache.prefix import prefix_block_keys\n"
        "tokens, bs = json.loads(sys.argv[1]), int(sys.argv[2])\n"
        "print(json.dumps([k.hex() for k in prefix_block_keys(tokens, bs, 'fp')]))\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script, json.dumps(TOKENS), str(BS)],
                         cwd=root, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)})
    theirs = json.loads(out.stdout)
    assert theirs == [k.hex() for k in prefix_block_keys(TOKENS, BS, "fp")]
