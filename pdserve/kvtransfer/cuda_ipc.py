"""Same-host GPU peers: the receiver exports its pool as a CUDA IPC handle in the
handshake reply; a sender on the same machine maps it once and writes chunks straight
into the destination blocks with a device copy (admitted and committed on the receiver's
control channel, control.py; no ucx endpoint at all). Falls back silently to the wire
when anything is missing: a host-memory pool, another machine, no CuPy, or a handle that
will not open."""

from __future__ import annotations

import functools
import logging
import socket
from pathlib import Path

import torch

from pdserve.engine.kvcache.pool import KVCachePool

log = logging.getLogger(__name__)


def host_id() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def export_pool(pool: KVCachePool) -> dict:
    """HandshakeReply fields that let a same-host peer map this pool; {} if not a GPU pool."""
    if pool.device.type != "cuda":
        return {}
    try:
        # (device, handle, storage bytes, storage offset, ...): handle names the allocation
        share = pool.kv.untyped_storage()._share_cuda_()
    except Exception as exc:  # not exportable (e.g. expandable segments)
        log.info("KV pool not exported over CUDA IPC: %s", exc)
        return {}
    offset = share[3] + pool.kv.storage_offset() * pool.kv.element_size()
    return dict(pool_ipc_handle=bytes(share[1]), pool_ipc_offset=offset,
                pool_bytes=pool.kv.numel() * pool.kv.element_size(), host_id=host_id())


CUDA_IPC_HANDLE_BYTES = 64


def _cuda_ipc_handle(shared: bytes) -> bytes:
    """torch >= 2.5 prefixes the cudaIpcMemHandle_t with a version and a type byte."""
    if len(shared) < CUDA_IPC_HANDLE_BYTES:
        raise ValueError(f"IPC handle of {len(shared)} bytes")
    return shared[-CUDA_IPC_HANDLE_BYTES:]


class RemotePool:
    """A peer's pool mapped into this process: [num_blocks, *block_shape] like ours."""

    def __init__(self, tensor: torch.Tensor, keepalive) -> None:
        self.kv = tensor
        self._keepalive = keepalive
        self._block_bytes = tensor[0].numel() * tensor.element_size() if len(tensor) else 0

    def queue_copy_runs(self, source: torch.Tensor, runs, stream: torch.cuda.Stream | None
                        ) -> None:
        """Copy runs (src_first, dst_first, count) of whole blocks from `source` (a pool
        of our block shape) into this pool: queued on `stream` on a GPU, done on return
        on the host. On a GPU each run is one cudaMemcpyAsync issued straight to the
        runtime: a sliced tensor copy_ costs ~25 us of Python and dispatch per run on a
        virtual machine's CPU, the runtime call a few."""
        if self.kv.device.type != "cuda":
            for s, d, n in runs:
                self.kv[d:d + n].copy_(source[s:s + n])
            return
        runtime = _cuda_runtime()
        device = self.kv.device.index or 0
        if runtime.getDevice() != device:  # a thread's current device starts at 0
            runtime.setDevice(device)
        bpb, dst, src = self._block_bytes, self.kv.data_ptr(), source.data_ptr()
        for s, d, n in runs:
            runtime.memcpyAsync(dst + d * bpb, src + s * bpb, n * bpb, runtime.memcpyDefault,
                                stream.cuda_stream)


@functools.cache
def _cuda_runtime():
    from cupy.cuda import runtime  # imported on first use: CuPy is optional on the CPU
    return runtime


def open_pool(reply, local: KVCachePool) -> RemotePool | None:
    if local.device.type != "cuda" or not reply.pool_ipc_handle or reply.host_id != host_id():
        return None
    if reply.pool_bytes != local.kv.numel() * local.kv.element_size():
        return None  # a different pool size: block ids would not line up with our view
    try:
        import cupy

        with cupy.cuda.Device(local.device.index or 0):
            base = cupy.cuda.runtime.ipcOpenMemHandle(_cuda_ipc_handle(reply.pool_ipc_handle))
            memory = cupy.cuda.UnownedMemory(base + reply.pool_ipc_offset, reply.pool_bytes,
                                             owner=None)
            array = cupy.ndarray((reply.pool_bytes,), dtype=cupy.uint8,
                                 memptr=cupy.cuda.MemoryPointer(memory, 0))
        flat = torch.as_tensor(array, device=local.device)
        return RemotePool(flat.view(local.kv.dtype).view(local.kv.shape), array)
    except Exception as exc:
        log.info("peer pool not mapped over CUDA IPC (%s); KV goes over the wire", exc)
        return None
