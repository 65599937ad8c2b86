"""The paged KV pool: one tensor, block-major.

kv: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

Block-major keeps every byte of a block (all layers, K and V) contiguous, so a run of
consecutive block ids is one contiguous byte range: KV connectors move runs in bulk
without packing. Per-layer views k_cache/v_cache: [num_blocks, block_size, kv_heads, d]
are strided views into it (kernels take strides).
"""

from __future__ import annotations

import torch

# re-exported: their home is kvcache.spec (torch-free)
from pdserve.engine.kvcache.spec import KVCacheSpec, check_dtype, contiguous_runs  # noqa: F401

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    check_dtype(name)
    return _DTYPES[name]


class KVCachePool:
    def __init__(self, spec: KVCacheSpec, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.kv = torch.zeros((spec.num_blocks, *spec.block_shape),
                              dtype=torch_dtype(spec.dtype), device=self.device)

    def layer_caches(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer: [num_blocks, block_size, kv_heads, d] views."""
        return self.kv[:, layer, 0], self.kv[:, layer, 1]

    def block_run_bytes(self, first_block: int, count: int) -> torch.Tensor:
        """Blocks first..first+count-1 as one flat uint8 view (zero copy)."""
        return self.kv[first_block:first_block + count].reshape(-1).view(torch.uint8)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of the given blocks: [len(block_ids), *block_shape]."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv.index_select(0, index)

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Inverse of read_blocks; data: [len(block_ids), *block_shape]."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv.index_copy_(0, index, data.to(self.kv.dtype))

