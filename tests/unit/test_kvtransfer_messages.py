"""Wire messages of the KV connectors: handshake, headers, descriptors, value framing."""

import pytest
import torch

from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec
from pdserve.kvtransfer.base import HandshakeError, KVDestination
from pdserve.kvtransfer.messages import (HandshakeInfo, check_handshake, chunk_header,
                                         decode_block_value, destination_from_proto,
                                         destination_to_proto, encode_block_value,
                                         handshake_mismatches, header_block_ids,
                                         header_problems)
from pdserve.wire import kv_pb2

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16, num_blocks=32)


def hello(role="prefill", **changes):
    spec = KVCacheSpec(**{**SPEC.__dict__, **{k: v for k, v in changes.items()
                                              if k in SPEC.__dict__}})
    info = HandshakeInfo.from_spec(spec, model_fingerprint=changes.get("fp", "model-a"),
                                   connector="ucx", role=role, worker_id=f"{role}-0")
    return info


def test_handshake_roundtrip_through_protobuf():
    info = hello()
    wire = info.to_proto().SerializeToString()
    assert HandshakeInfo.from_proto(kv_pb2.KVHandshake.FromString(wire)) == info


def test_identical_layouts_match_regardless_of_role():
    check_handshake(hello("prefill"), hello("decode"))


def test_block_size_mismatch_names_both_values():
    problems = handshake_mismatches(hello("prefill"), hello("decode", block_size=32))
    assert problems == ["block_size mismatch: prefill has 16, decode has 32"]


def test_every_mismatch_is_reported():
    with pytest.raises(HandshakeError) as err:
        check_handshake(hello("prefill"), hello("decode", dtype="float16", fp="model-b"))
    text = str(err.value)
    assert "model_fingerprint mismatch: prefill has 'model-a', decode has 'model-b'" in text
    assert "dtype mismatch: prefill has 'float32', decode has 'float16'" in text


def test_same_role_names_sides_local_and_remote():
    problems = handshake_mismatches(hello("decode"), hello("decode", head_dim=16))
    assert problems == ["head_dim mismatch: local decode has 8, remote decode has 16"]


def test_destination_roundtrip():
    dst = KVDestination(connector="redis", address="redis://h:1/0", transfer_id="t",
                        block_ids=(5, 6, 9), first_block_index=2,
                        block_keys=(b"a" * 16, b"b" * 16, b"c" * 16), num_tokens=70,
                        lease_expires_unix_ms=123, receiver_id="d0")
    wire = destination_to_proto(dst).SerializeToString()
    assert destination_from_proto(kv_pb2.KVDestination.FromString(wire)) == dst


def test_chunk_header_describes_runs_and_bytes():
    header = chunk_header(SPEC, transfer_id="t", chunk_index=1, last=True,
                          dst_runs=[(4, 3), (10, 1)], checksums=[1, 2])
    parsed = kv_pb2.KVTransferHeader.FromString(header.SerializeToString())
    assert header_block_ids(parsed) == [4, 5, 6, 10]
    assert parsed.payload_bytes == 4 * SPEC.bytes_per_block
    assert tuple(parsed.block_shape) == SPEC.block_shape
    assert parsed.checksum_kind == kv_pb2.CHECKSUM_CRC32
    assert header_problems(parsed, SPEC) == []


def test_header_problems_catch_shape_dtype_and_range():
    other = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16,
                        num_blocks=32, dtype="float16")
    header = chunk_header(other, transfer_id="t", chunk_index=0, last=True,
                          dst_runs=[(30, 5)])
    problems = " | ".join(header_problems(header, SPEC))
    assert "dtype 'float16', pool has 'float32'" in problems
    assert "block shape" in problems
    assert "outside the pool's 32 blocks" in problems


def test_block_value_framing_roundtrip():
    pool = KVCachePool(SPEC)
    pool.kv.copy_(torch.randn_like(pool.kv))
    header = kv_pb2.KVBlockHeader(version=1, dtype="float32", block_key=b"k" * 16)
    value = encode_block_value(header, pool.block_run_bytes(3, 1).numpy())
    parsed, payload = decode_block_value(value)
    assert parsed.block_key == b"k" * 16
    assert bytes(payload) == pool.block_run_bytes(3, 1).numpy().tobytes()
