"""Scattered blocks travel as one packed message per chunk over ucx, byte-exact."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec
from pdserve.kvtransfer import TransferState, make_receiver, make_sender
from pdserve.kvtransfer.messages import HandshakeInfo

ucx = pytest.importorskip("pdserve.kvtransfer.ucx")


def test_fragmented_runs_are_packed_into_one_message(monkeypatch):
    packed_runs = []
    original = ucx.UcxReceiver._receive_packed

    async def spy(self, ep, header):
        packed_runs.append(len(header.runs))
        await original(self, ep, header)

    monkeypatch.setattr(ucx.UcxReceiver, "_receive_packed", spy)
    spec = KVCacheSpec(2, 2, 16, 16, 64, dtype="bfloat16")
    src_pool, dst_pool = KVCachePool(spec), KVCachePool(spec)
    src_pool.kv.copy_(torch.randn(src_pool.kv.shape).to(torch.bfloat16))

    def hello(role):
        return HandshakeInfo.from_spec(spec, model_fingerprint="f", connector="ucx", role=role)

    with make_receiver("ucx", dst_pool, hello("decode")) as rx, \
            make_sender("ucx", src_pool, hello("prefill")) as tx:
        src = random.Random(1).sample(range(64), 20)
        dst = random.Random(2).sample(range(64), 20)
        tx.send(rx.expect("t", dst, lease_s=10), src)
        assert tx.wait("t", 10).state is TransferState.DONE
        assert rx.wait("t", 10).state is TransferState.DONE
    assert packed_runs and packed_runs[0] > 4  # many runs, one message
    assert torch.equal(dst_pool.kv[dst], src_pool.kv[src])
    untouched = sorted(set(range(64)) - set(dst))
    assert not dst_pool.kv[untouched].any()
