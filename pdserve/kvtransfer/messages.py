"""Protobuf messages of kv.proto <-> Python values: handshake, destination descriptor,
chunk headers and the Redis block-value framing. Nothing here unpickles anything."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

from pdserve.engine.kvcache.spec import KVCacheSpec
from pdserve.kvtransfer.base import (POOL_LAYOUT, PROTOCOL_VERSION, ConnectorError,
                                     HandshakeError, KVDestination)
from pdserve.wire import kv_pb2

if TYPE_CHECKING:  # torch only for the annotation: this module stays CPU-only
    import torch

# Fields two workers must agree on, in the order mismatches are reported.
MUST_MATCH = ("protocol_version", "model_fingerprint", "dtype", "block_size", "num_layers",
              "num_kv_heads", "head_dim", "layout", "connector")


@dataclass(frozen=True)
class HandshakeInfo:
    """What a worker says about itself at first contact (kv.proto KVHandshake)."""
    model_fingerprint: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    connector: str
    role: str = ""
    worker_id: str = ""
    device_type: str = "cpu"
    layout: str = POOL_LAYOUT
    protocol_version: int = PROTOCOL_VERSION

    @classmethod
    def from_spec(cls, spec: KVCacheSpec, *, model_fingerprint: str, connector: str,
                  role: str = "", worker_id: str = "", device_type: str = "cpu"
                  ) -> "HandshakeInfo":
        return cls(model_fingerprint=model_fingerprint, dtype=spec.dtype,
                   block_size=spec.block_size, num_layers=spec.num_layers,
                   num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                   connector=connector, role=role, worker_id=worker_id,
                   device_type=device_type)

    def to_proto(self) -> kv_pb2.KVHandshake:
        return kv_pb2.KVHandshake(**{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_proto(cls, msg: kv_pb2.KVHandshake) -> "HandshakeInfo":
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


def handshake_mismatches(local: HandshakeInfo, remote: HandshakeInfo) -> list[str]:
    """One line per disagreeing field, naming both sides by role, e.g.
    'block_size mismatch: prefill has 16, decode has 32'."""
    local_name = local.role or "local"
    remote_name = remote.role or "remote"
    if local_name == remote_name:
        local_name, remote_name = f"local {local_name}", f"remote {remote_name}"
    problems = []
    for name in MUST_MATCH:
        mine, theirs = getattr(local, name), getattr(remote, name)
        if mine != theirs:
            problems.append(f"{name} mismatch: {local_name} has {mine!r}, "
                            f"{remote_name} has {theirs!r}" if isinstance(mine, str) else
                            f"{name} mismatch: {local_name} has {mine}, {remote_name} has {theirs}")
    return problems


def check_handshake(local: HandshakeInfo, remote: HandshakeInfo) -> None:
    problems = handshake_mismatches(local, remote)
    if problems:
        raise HandshakeError("KV handshake refused: " + "; ".join(problems))


# -- destination ------------------------------------------------------------------
def destination_to_proto(dst: KVDestination) -> kv_pb2.KVDestination:
    return kv_pb2.KVDestination(
        connector=dst.connector, address=dst.address, transfer_id=dst.transfer_id,
        block_ids=list(dst.block_ids), first_block_index=dst.first_block_index,
        block_keys=list(dst.block_keys), num_tokens=dst.num_tokens,
        lease_expires_unix_ms=dst.lease_expires_unix_ms, receiver_id=dst.receiver_id)


def destination_from_proto(msg: kv_pb2.KVDestination) -> KVDestination:
    return KVDestination(
        connector=msg.connector, address=msg.address, transfer_id=msg.transfer_id,
        block_ids=tuple(msg.block_ids), first_block_index=msg.first_block_index,
        block_keys=tuple(msg.block_keys), num_tokens=msg.num_tokens,
        lease_expires_unix_ms=msg.lease_expires_unix_ms, receiver_id=msg.receiver_id)


# -- chunk header -----------------------------------------------------------------
def run_checksum(run_bytes: "torch.Tensor") -> int:
    """crc32 of a run's bytes (copied to host when on a GPU)."""
    return zlib.crc32(run_bytes.cpu().numpy()) & 0xFFFFFFFF


def chunk_header(spec: KVCacheSpec, *, transfer_id: str, chunk_index: int, last: bool,
                 dst_runs: Sequence[tuple[int, int]],
                 checksums: Sequence[int] | None = None,
                 first_token: int | None = None) -> kv_pb2.KVTransferHeader:
    bpb = spec.bytes_per_block
    header = kv_pb2.KVTransferHeader(
        version=PROTOCOL_VERSION, transfer_id=transfer_id, chunk_index=chunk_index,
        last_chunk=last, dtype=spec.dtype, block_shape=list(spec.block_shape),
        bytes_per_block=bpb,
        runs=[kv_pb2.BlockRun(first=f, count=n) for f, n in dst_runs],
        payload_bytes=sum(n for _, n in dst_runs) * bpb,
        checksum_kind=kv_pb2.CHECKSUM_CRC32 if checksums is not None else kv_pb2.CHECKSUM_NONE,
        run_checksums=list(checksums or ()))
    if last and first_token is not None:
        header.first_token_id = first_token
    return header


def abort_header(transfer_id: str, chunk_index: int, reason: str) -> kv_pb2.KVTransferHeader:
    return kv_pb2.KVTransferHeader(version=PROTOCOL_VERSION, transfer_id=transfer_id,
                                   chunk_index=chunk_index, abort_reason=reason or "aborted")


def header_problems(header: kv_pb2.KVTransferHeader, spec: KVCacheSpec) -> list[str]:
    """Why a received header cannot be applied to this pool (empty = fine)."""
    problems = []
    if header.version != PROTOCOL_VERSION:
        problems.append(f"protocol version {header.version}, expected {PROTOCOL_VERSION}")
    if header.dtype != spec.dtype:
        problems.append(f"dtype {header.dtype!r}, pool has {spec.dtype!r}")
    if tuple(header.block_shape) != spec.block_shape:
        problems.append(f"block shape {tuple(header.block_shape)}, pool has {spec.block_shape}")
    if header.bytes_per_block != spec.bytes_per_block:
        problems.append(f"bytes per block {header.bytes_per_block}, pool has "
                        f"{spec.bytes_per_block}")
    for run in header.runs:
        if run.count == 0 or run.first + run.count > spec.num_blocks:
            problems.append(f"run {run.first}+{run.count} outside the pool's "
                            f"{spec.num_blocks} blocks")
    if header.checksum_kind != kv_pb2.CHECKSUM_NONE and \
            len(header.run_checksums) != len(header.runs):
        problems.append("checksum count differs from run count")
    return problems


def header_block_ids(header: kv_pb2.KVTransferHeader) -> list[int]:
    return [b for run in header.runs for b in range(run.first, run.first + run.count)]


# -- redis block values -------------------------------------------------------------
_LEN = struct.Struct("<I")


def encode_block_value(header: kv_pb2.KVBlockHeader, payload) -> bytes:
    """'<u32 header length><KVBlockHeader><raw bytes>' (payload: bytes-like)."""
    head = header.SerializeToString()
    return b"".join((_LEN.pack(len(head)), head, memoryview(payload).cast("B")))


def decode_block_value(value: bytes) -> tuple[kv_pb2.KVBlockHeader, memoryview]:
    if len(value) < _LEN.size:
        raise ConnectorError(f"KV block value too short ({len(value)} bytes)")
    (head_len,) = _LEN.unpack_from(value)
    if _LEN.size + head_len > len(value):
        raise ConnectorError("KV block value header length exceeds the value")
    header = kv_pb2.KVBlockHeader.FromString(value[_LEN.size:_LEN.size + head_len])
    return header, memoryview(value)[_LEN.size + head_len:]
