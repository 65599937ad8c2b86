"""A step's flattened inputs: long prompt chunks take the tensor path, decode rows and
short chunks the list path; both must give what the per-token definition gives."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.model_runner import TENSOR_CHUNK_MIN_TOKENS, step_inputs
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler.request import Request
from pdserve.engine.scheduler.scheduler import ScheduledRequest

BS = 16


def request(rid: str, prompt_len: int, outputs: int, computed: int, rng) -> Request:
    r = Request(rid, [rng.randrange(50_000) for _ in range(prompt_len)],
                SamplingParams(max_tokens=64, ignore_eos=True))
    r.output_ids = [rng.randrange(50_000) for _ in range(outputs)]
    r.block_ids = rng.sample(range(10_000), -(-(prompt_len + outputs) // BS))
    r.num_computed_tokens = computed
    return r


def by_definition(scheduled):
    """Token by token: id, position and slot (block_ids[p // BS] * BS + p % BS)."""
    ids, positions, slots = [], [], []
    for s in scheduled:
        r = s.request
        for p in range(r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens):
            ids.append(r.all_token_ids[p])
            positions.append(p)
            slots.append(r.block_ids[p // BS] * BS + p % BS)
    return ids, positions, slots


@pytest.mark.parametrize("seed", range(4))
def test_mixed_step_inputs_match_the_per_token_definition(seed):
    rng = random.Random(seed)
    long = TENSOR_CHUNK_MIN_TOKENS
    scheduled = [
        ScheduledRequest(request("whole", 2 * long + 5, 0, 0, rng), 2 * long + 5),
        ScheduledRequest(request("decode", 40, 3, 42, rng), 1),
        # a long chunk starting mid-block, mid-prompt
        ScheduledRequest(request("middle", 3 * long, 0, long + 7, rng), long + 3),
        ScheduledRequest(request("short", 100, 0, 20, rng), 50),
        # recomputed after preemption: the chunk runs into the sampled tokens
        ScheduledRequest(request("recompute", long, 30, long - 9, rng), 39),
        ScheduledRequest(request("long-recompute", long, long, 3, rng), 2 * long - 3),
    ]
    rng.shuffle(scheduled)
    ids, positions, meta, starts = step_inputs(scheduled, BS, "cpu")
    assert (ids.tolist(), positions.tolist(), meta.slot_mapping.tolist()) == \
        by_definition(scheduled)
    assert starts[-1] == ids.shape[0] and meta.seq_lens.tolist() == [
        s.request.num_computed_tokens + s.num_new_tokens for s in scheduled]


@pytest.mark.parametrize("blocks", [1, 5, 16, 17, 40])
def test_block_tables_are_padded_to_a_multiple_of_16_columns(blocks):
    """A step's table row stride is always divisible by 16 (one Triton specialization of
    each kernel, as the CUDA graphs' tables have), whatever its longest sequence."""
    rng = random.Random(blocks)
    scheduled = [ScheduledRequest(request("a", blocks * BS - 3, 0, blocks * BS - 4, rng), 1),
                 ScheduledRequest(request("b", 20, 0, 0, rng), 20)]
    _, _, meta, _ = step_inputs(scheduled, BS, "cpu")
    width = meta.block_tables.shape[1]
    assert width % 16 == 0 and width - 16 < blocks <= width
    assert meta.block_tables[0, :blocks].tolist() == scheduled[0].request.block_ids
    assert meta.block_tables[1, :2].tolist() == scheduled[1].request.block_ids
