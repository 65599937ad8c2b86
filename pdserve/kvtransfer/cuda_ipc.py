"""Same-host GPU peers: the receiver exports its pool as a CUDA IPC handle in the
handshake reply; a sender on the same machine maps it once and writes chunks straight
into the destination blocks with a device copy (admitted and committed on the receiver's
control channel, control.py; no ucx endpoint at all). Falls back to the wire when
anything is missing: a host-memory pool, another machine, no CuPy, a handle that will not
open (the owner's GPU not visible here: workers placed by `pdserve up --gpus` see the
cluster's other GPUs for this reason), or two GPUs without peer access. The transport
used is reported by the connector (transport_report.py).

Two GPUs of one host: the handle is opened on our pool's device with lazy peer access
(cudaIpcMemLazyEnablePeerAccess), so the mapped memory stays on the peer's device (the
tensor says so) and our copies write into it over NVLink/PCIe peer-to-peer. Copies are
issued on our device with cudaMemcpyDefault (unified addressing picks the path)."""

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

    def __init__(self, tensor: torch.Tensor, keepalive, copy_device: int | None = None,
                 ipc_base: int | None = None) -> None:
        self.kv: torch.Tensor | None = tensor  # on the peer's device (another GPU: peer memory)
        self._keepalive = keepalive
        self._ipc_base = ipc_base  # what cudaIpcOpenMemHandle returned; closed by close()
        self._block_bytes = tensor[0].numel() * tensor.element_size() if len(tensor) else 0
        # the device our copies are issued on: our own pool's, not the peer's
        self.copy_device = copy_device if copy_device is not None else (
            tensor.device.index or 0 if tensor.device.type == "cuda" else None)

    @property
    def closed(self) -> bool:
        return self.kv is None

    def close(self) -> None:
        """Unmap the peer's pool, once, after every copy queued into it. A mapping keeps
        the peer's memory allocated even after the peer exited: a receiver restarting on
        that GPU would not find the memory its pool needs until this process lets go."""
        kv, self.kv = self.kv, None  # a later copy fails loudly instead of writing freed memory
        if kv is None or kv.device.type != "cuda":
            return
        torch.cuda.synchronize(self.copy_device)
        base, self._ipc_base, self._keepalive = self._ipc_base, None, None
        if base is not None:
            import cupy

            with cupy.cuda.Device(self.copy_device):
                _cuda_runtime().ipcCloseMemHandle(base)

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
        device = self.copy_device
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


def remote_num_blocks(pool_bytes: int, local: KVCachePool) -> int | None:
    """Blocks in a peer pool of pool_bytes with our block shape (its size may differ:
    each worker sizes its pool from its own GPU's free memory); None if not whole."""
    block_bytes = local.kv[0].numel() * local.kv.element_size() if len(local.kv) else 0
    if block_bytes == 0 or pool_bytes % block_bytes:
        return None
    return pool_bytes // block_bytes


def open_pool(reply, local: KVCachePool) -> RemotePool | None:
    if local.device.type != "cuda" or not reply.pool_ipc_handle or reply.host_id != host_id():
        return None
    num_blocks = remote_num_blocks(reply.pool_bytes, local)
    if num_blocks is None:
        log.warning("peer pool of %d bytes is not whole blocks of ours; KV goes over the "
                    "wire", reply.pool_bytes)
        return None
    device = local.device.index if local.device.index is not None else \
        torch.cuda.current_device()
    try:
        import cupy

        runtime = cupy.cuda.runtime
        with cupy.cuda.Device(device):
            base = runtime.ipcOpenMemHandle(_cuda_ipc_handle(reply.pool_ipc_handle),
                                            runtime.cudaIpcMemLazyEnablePeerAccess)
            # device_id=None: cupy asks the driver which GPU owns the memory (the peer's)
            memory = cupy.cuda.UnownedMemory(base + reply.pool_ipc_offset, reply.pool_bytes,
                                             owner=None)
            array = cupy.ndarray((reply.pool_bytes,), dtype=cupy.uint8,
                                 memptr=cupy.cuda.MemoryPointer(memory, 0))
        # no device= here: a different device would make as_tensor copy, not map
        flat = torch.as_tensor(array)
        if flat.device.index != device and \
                not torch.cuda.can_device_access_peer(device, flat.device.index):
            runtime.ipcCloseMemHandle(base)
            log.warning("GPU %d cannot reach the peer's GPU %d peer-to-peer; KV goes over "
                        "the wire", device, flat.device.index)
            return None
        # flat: [pool_bytes] uint8 -> [num_blocks, *block_shape] in the pool's dtype
        kv = flat.view(local.kv.dtype).view(num_blocks, *local.kv.shape[1:])
        return RemotePool(kv, array, copy_device=device, ipc_base=base)
    except Exception as exc:
        log.warning("peer pool not mapped over CUDA IPC (%s); KV goes over the wire", exc)
        return None
