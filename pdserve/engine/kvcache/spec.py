"""The KV cache's shape (KVCacheSpec) and block-run arithmetic, torch-free.

Kept apart from `pool.py` (the torch tensor) so transfer bookkeeping and other CPU-only
code can describe blocks without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# bytes per element of each supported KV dtype; pool.torch_dtype maps the same names
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def check_dtype(name: str) -> None:
    if name not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {name!r}; choose from {sorted(DTYPE_BYTES)}")


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        check_dtype(self.dtype)

    @property
    def block_shape(self) -> tuple[int, ...]:
        # one block, all layers: [num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        n = 1
        for s in self.block_shape:
            n *= s
        return n * DTYPE_BYTES[self.dtype]


def contiguous_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Coalesce block ids into (first, count) runs of consecutive ids, order kept."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
