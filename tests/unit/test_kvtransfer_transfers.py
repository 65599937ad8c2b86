"""Transfer bookkeeping: run pairing, state machine, leases, deferred release."""

import random
import time

import pytest

from pdserve.engine.kvcache.allocator import BlockAllocator
from pdserve.engine.kvcache.pool import contiguous_runs
from pdserve.kvtransfer import get_connector
from pdserve.kvtransfer.base import ConnectorMetrics, KVDestination, TransferState
from pdserve.kvtransfer.transfers import (InvalidTransition, TransferTable, chunk_destination,
                                          chunk_run_starts, paired_runs, run_starts,
                                          split_runs)


def dest(tid="t", blocks=(1, 2, 3, 7)):
    return KVDestination(connector="local", address="local://x", transfer_id=tid,
                         block_ids=tuple(blocks))


def table(lease_s=10.0):
    return TransferTable(ConnectorMetrics("test"), lease_s)


def test_paired_runs_coalesce_only_where_both_sides_are_consecutive():
    assert paired_runs([3, 4, 5, 9, 20, 21], [10, 11, 40, 41, 42, 1]) == [
        (3, 10, 2), (5, 40, 1), (9, 41, 1), (20, 42, 1), (21, 1, 1)]
    assert paired_runs(list(range(8)), list(range(100, 108))) == [(0, 100, 8)]
    with pytest.raises(ValueError):
        paired_runs([1, 2], [3])


def _runs_by_definition(src, dst):
    """One run per block, merged into the previous run while both sides count up by one."""
    runs = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def test_paired_runs_match_their_definition_on_shuffled_block_lists():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randrange(0, 60)
        src = rng.sample(range(200), n) if rng.random() < 0.3 else \
            list(range(rng.randrange(50), 200))[:n]
        pieces = [list(range(i, i + rng.randrange(1, 6))) for i in range(0, 400, 6)]
        rng.shuffle(pieces)
        whole = [b for piece in pieces for b in piece]
        start = rng.randrange(0, len(whole) - len(src) + 1)
        dst = whole[start:start + len(src)]
        expected = _runs_by_definition(src, dst)
        assert paired_runs(src, dst) == expected
        assert paired_runs(tuple(src), tuple(dst)) == expected
        # a chunk's destination runs cut from the whole destination's, as senders do
        assert paired_runs(src, dst, chunk_run_starts(run_starts(whole), start,
                                                      len(src))) == expected


def test_paired_runs_agree_with_pool_run_coalescing():
    ids = [4, 5, 6, 9, 10, 2]
    assert [(d, n) for _, d, n in paired_runs(ids, ids)] == contiguous_runs(ids)


def test_split_runs_bounds_message_size():
    assert split_runs([(0, 10, 5)], 2) == [(0, 10, 2), (2, 12, 2), (4, 14, 1)]


def test_chunk_destination_checks_positions():
    assert chunk_destination(dest(), [8, 9], 2) == [3, 7]
    with pytest.raises(ValueError):
        chunk_destination(dest(), [8, 9], 3)


def test_state_machine_pending_inflight_done():
    t = table()
    t.add(dest(), (), lease_s=None, on_release=None)
    assert t.statuses()["t"].state is TransferState.PENDING
    t.record_chunk("t", blocks=[1, 2], nbytes=10, seconds=0.1, sent=True)
    assert t.statuses()["t"].state is TransferState.IN_FLIGHT
    assert t.finish("t", TransferState.DONE)
    status = t.statuses()["t"]
    assert (status.state, status.blocks_done, status.bytes_moved) == (TransferState.DONE, 2, 10)
    assert not t.finish("t", TransferState.FAILED)       # terminal is final
    assert t.metrics.transfers_done == 1 and t.metrics.bytes_sent == 10


def test_terminal_transfer_refuses_more_chunks():
    t = table()
    t.add(dest(), (), lease_s=None, on_release=None)
    t.mark_queued("t", last=True)
    with pytest.raises(InvalidTransition):
        t.mark_queued("t", last=False)
    t.finish("t", TransferState.CANCELLED, "bye")
    with pytest.raises(InvalidTransition, match="CANCELLED: bye"):
        t.active("t")


def test_lease_expiry_frees_held_blocks_once():
    allocator = BlockAllocator(16)
    blocks = allocator.allocate(4)
    released = []

    def on_release(status, held):
        released.append(status.state)
        allocator.free(list(held))

    t = table()
    t.add(dest(blocks=blocks), blocks, lease_s=0.01, on_release=on_release)
    assert allocator.num_free == 12
    time.sleep(0.02)
    assert t.statuses()["t"].state is TransferState.EXPIRED
    t.statuses()
    assert released == [TransferState.EXPIRED] and allocator.num_free == 16
    assert t.metrics.transfers_expired == 1


def test_release_waits_for_bytes_in_motion():
    released = []
    t = table()
    t.add(dest(), (1, 2), lease_s=None, on_release=lambda s, held: released.append(held))
    t.hold("t")
    t.finish("t", TransferState.CANCELLED)
    assert released == []                   # blocks still being written
    t.unhold("t")
    assert released == [(1, 2)]


def test_receiver_keeps_done_blocks_and_returns_cancelled_ones():
    import torch  # noqa: F401
    from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec
    from pdserve.kvtransfer.messages import HandshakeInfo
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=16, num_blocks=8)
    hello = HandshakeInfo.from_spec(spec, model_fingerprint="m", connector="local",
                                    role="decode")
    returned = []
    with get_connector("local", "decode", KVCachePool(spec), hello) as receiver:
        receiver.expect("a", [1, 2], on_release=lambda s, b: returned.append(b))
        receiver.cancel("a")
        assert receiver.poll()["a"].state is TransferState.CANCELLED
        assert returned == [(1, 2)]
        receiver.release("a")
        assert "a" not in receiver.poll()


def test_registry_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown KV connector 'nccl'"):
        get_connector("nccl", "decode", None, None)
