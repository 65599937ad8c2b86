"""What the tag and in-place paths share: the connector's logger, the side copy stream,
the setup both sides do alike, and the table bookkeeping both paths do the same way."""

from __future__ import annotations

import logging

import torch

from pdserve.engine.kvcache.pool import KVCachePool
from pdserve.kvtransfer.base import TransferState
from pdserve.kvtransfer.messages import HandshakeInfo
from pdserve.kvtransfer.sending import Chunk
from pdserve.kvtransfer.transfers import TransferTable, UnknownTransfer
from pdserve.kvtransfer.ucx.runtime import UcxRuntime, UcxSettings

# one name for the whole package: the connector's log lines and trace hops (and
# transport_report.py's) are filtered and captured by it
log = logging.getLogger("pdserve.kvtransfer.ucx")


class CopyStream:
    """A side CUDA stream for packing/unpacking, so the connector never waits behind
    (or stalls) the engine's kernels on the default stream; on the CPU a no-op."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.stream is not None:
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self._ctx.__exit__(*exc)
            self.stream.synchronize()  # done before the wire or the engine touches it


class UcxSide:
    """Set up alike by UcxSender and UcxReceiver (listed first among their bases): the
    settings, the process's UCX runtime and a copy stream on the pool's device; the
    rest of the bases get (pool, hello, lease_s)."""

    def __init__(self, pool: KVCachePool, hello: HandshakeInfo,
                 settings: UcxSettings = UcxSettings()) -> None:
        super().__init__(pool, hello, lease_s=settings.lease_s)
        self.settings = settings
        self.runtime = UcxRuntime.get(pool.device.type, settings.tune_transport_env,
                                      settings.host, settings.data_port)
        self.copy_stream = CopyStream(pool.device)


def rejection_reason(exc: Exception) -> str:
    if isinstance(exc, UnknownTransfer):
        return f"unknown transfer {exc.args[0]!r}"
    return str(exc)


def known_transfer(table: TransferTable, transfer_id: str) -> bool:
    try:
        table.get(transfer_id)
    except UnknownTransfer:
        return False
    return True


def record_sent_chunk(table: TransferTable, chunk: Chunk, nbytes: int,
                      seconds: float) -> None:
    """Sender side: the receiver stored the chunk; the last one ends the transfer DONE."""
    table.record_chunk(chunk.transfer_id, blocks=chunk.dst_block_ids,
                       nbytes=nbytes, seconds=seconds, sent=True)
    if chunk.last:
        table.finish(chunk.transfer_id, TransferState.DONE)
