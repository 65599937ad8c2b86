"""Helpers shared by the paged-attention kernels' launchers (host side)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = 1.4426950408889634


def score_scales(scale: float, logits_soft_cap: float) -> tuple[float, float]:
    """(qk_scale, cap_scale) for the kernels, which work in base 2 (exp2).

    Without a cap: s2 = dot * qk_scale with qk_scale = scale * log2(e).
    With cap c: s2 = tanh(dot * scale / c) * c * log2(e), i.e. qk_scale = scale / c and
    cap_scale = c * log2(e) (one extra multiply and a tanh per score)."""
    if logits_soft_cap > 0:
        return scale / logits_soft_cap, logits_soft_cap * LOG2E
    return scale * LOG2E, 1.0


@triton.jit
def soft_cap_tanh(x):
    """tanh from exp2 (portable to the interpreter; no libdevice): saturates to +-1 for
    large |x| (exp2 overflows to inf -> 1 - 0), absolute error ~1e-7 near 0."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2.885... = 2 * log2(e)


@triton.jit
def exp_maybe_libdevice(x, LIBDEVICE: tl.constexpr):
    """exp through libdevice (torch's rounding) on the GPU, tl.exp where libdevice does
    not run (the CPU interpreter)."""
    if LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


def interpreting() -> bool:
    """True under Triton's CPU interpreter: kernels then upcast every load to fp32
    (the interpreter's bf16 arithmetic is wrong, docs/kernels.md) and tiles stay small."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 caches get exact fp32 dots on the GPU instead of the tf32 default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_block(head_dim: int) -> int:
    # tl.dot wants every dimension >= 16
    return max(16, triton.next_power_of_2(head_dim))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: any small number works
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Kernels index pages by strides but assume unit stride along head_dim (16 B loads)."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [num_blocks, block_size, kv_heads, d]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need stride 1 along head_dim")
    block_size = k_cache.shape[1]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
