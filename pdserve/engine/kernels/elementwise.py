"""Fused elementwise kernels of the Llama decoder (one launch where torch runs 3-10).

- rms_norm:           RMSNorm of each row.
- fused_add_rms_norm: residual <- x + residual (in place), then RMSNorm of the new residual;
                      the model carries the residual stream between layers and folds each
                      sublayer's residual add into the next norm.
- rotary_:            rotate-half (NeoX/HF) rotary on q/k heads in place, gathering the
                      cos/sin rows of each token's position from the full fp32 tables.
- silu_and_mul:       silu(gate) * up over a [T, 2*I] gate_up projection.

Rounding contract. Each kernel reproduces the unfused PyTorch code of
pdserve/engine/model/llama.py (bf16/fp16/fp32), rounding at the same places; only the
order of the fp32 sum of squares in RMSNorm differs:
  rms_norm:           y = to_x(xf * rsqrt(sum(xf^2) / n + eps));  out = to_out(w * y)
  fused_add_rms_norm: r = to_res(x + residual), then rms_norm(r)
  rotary_:            x <- to_x(xf * cos + swap_halves(xf) * sin_signed)
  silu_and_mul:       out = to_x(to_x(g / (1 + exp(-g))) * u)
(every product and sum in fp32 from upcast operands; to_* rounds to nearest even). Torch
runs each op as its own kernel, so each fp32 op rounds on its own; here that needs:
kernels launched with enable_fp_fusion=False (no mul+add contracted into an FMA), division
by div_rn (Triton's `/` is approximate), and exp/rsqrt from libdevice, the CUDA math
library torch's kernels call (tl.exp is ex2.approx). Under the CPU interpreter libdevice
does not exist and numpy's exp and 1/sqrt stand in (what torch's CPU kernels compute).

Launch shapes depend only on tensor shapes and nothing syncs the host, so every wrapper
can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pdserve.engine.kernels._common import exp_maybe_libdevice as _exp, interpreting

# ---- device helpers ---------------------------------------------------------------------


@triton.jit
def _rsqrt(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        y = libdevice.rsqrt(x)
    else:
        y = tl.math.rsqrt(x)
    return y


@triton.jit
def _normalize(xf, w_ptr, offs, mask, eps, N: tl.constexpr, X_DTYPE: tl.constexpr,
               LIBDEVICE: tl.constexpr):
    # xf: [BLOCK] fp32 row (0 past N) -> w * to_x(xf * rsqrt(mean(xf^2) + eps)), fp32
    n = tl.full((), N, tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(xf * xf, axis=0), n)
    y = (xf * _rsqrt(mean_sq + eps, LIBDEVICE)).to(X_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return w * y


# ---- kernels ----------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    xf = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    out = _normalize(xf, w_ptr, offs, mask, eps, N, x_ptr.dtype.element_ty, LIBDEVICE)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_res,
                               stride_out, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                               LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    xf = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rf = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
    # the sum is rounded before it is stored and before it is normalized, as torch's add
    res = (xf + rf).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + row * stride_res + offs, res, mask=mask)
    out = _normalize(res.to(tl.float32), w_ptr, offs, mask, eps, N, res_ptr.dtype.element_ty,
                     LIBDEVICE)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_cos,
                   stride_sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    pos = tl.load(pos_ptr + token).to(tl.int64)
    # table rows of this position, each half: [BLOCK_HALF] fp32, broadcast over heads
    cos_row = cos_ptr + pos * stride_cos
    sin_row = sin_ptr + pos * stride_sin
    cos1 = tl.load(cos_row + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    # x halves: [BLOCK_H, BLOCK_HALF]
    mask = (heads[:, None] < NUM_HEADS) & d_mask[None, :]
    first = x_ptr + token * stride_xt + heads[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + swap_halves(x) * sin_signed, half by half
    out1 = x1 * cos1 + x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, N: tl.constexpr,
                         BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate_ptr = gu_ptr + row * stride_gu + cols
    g = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptr + N, mask=mask, other=0.0).to(tl.float32)
    act = tl.math.div_rn(g, 1.0 + _exp(-g, LIBDEVICE)).to(out_ptr.dtype.element_ty)
    out = act.to(tl.float32) * u
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers --------------------------------------------------------------------------


def _launch_options(block_elems: int) -> dict:
    # ~8 elements (16 B of bf16) per thread; exact fp32 rounding needs no FMA contraction
    warps = min(16, max(1, block_elems // 256))
    return {"num_warps": warps, "enable_fp_fusion": False}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with unit stride along the last dim (a view where possible)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_norm(hidden: int, weight: torch.Tensor) -> None:
    if weight.shape != (hidden,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous [{hidden}], got {tuple(weight.shape)}")


def _norm_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # dtype as torch's `weight * y` promotes it
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                       device=x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim: x [..., hidden] -> new tensor of the same shape."""
    hidden = x.shape[-1]
    _check_norm(hidden, weight)
    rows = _rows(x)  # [num_tokens, hidden]
    out = _norm_out(rows, weight)
    if rows.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), eps,
            N=hidden, BLOCK=block, LIBDEVICE=not interpreting(), **_launch_options(block))
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual in place; returns (rms_norm(residual), residual).

    x: [num_tokens, hidden] (any row stride); residual: [num_tokens, hidden] with unit
    stride along hidden."""
    hidden = x.shape[-1]
    _check_norm(hidden, weight)
    if residual.dim() != 2 or residual.stride(-1) != 1 or x.shape != residual.shape:
        raise ValueError(f"residual must be [num_tokens, hidden] with unit last stride and "
                         f"x's shape; got {tuple(residual.shape)} for x {tuple(x.shape)}")
    rows = _rows(x)
    out = _norm_out(residual, weight)
    if rows.shape[0]:
        block = triton.next_power_of_2(hidden)
        _fused_add_rms_norm_kernel[(rows.shape[0],)](
            rows, residual, weight, out, rows.stride(0), residual.stride(0), out.stride(0), eps,
            N=hidden, BLOCK=block, LIBDEVICE=not interpreting(), **_launch_options(block))
    return out, residual


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in place on x [num_tokens, heads, head_dim] (any token and head
    strides, unit stride along head_dim, e.g. the q|k slice of a qkv projection).

    positions: [num_tokens] ints; cos, sin_signed: [max_positions, head_dim] fp32, the
    full tables of model.llama.Rotary (rows gathered in the kernel). Returns x."""
    num_tokens, num_heads, head_dim = x.shape
    if x.stride(-1) != 1 or head_dim % 2:
        raise ValueError("x needs unit stride along an even head_dim")
    if cos.shape[-1] != head_dim or sin_signed.shape != cos.shape:
        raise ValueError(f"tables {tuple(cos.shape)} do not match head_dim {head_dim}")
    if cos.stride(-1) != 1 or sin_signed.stride(-1) != 1:
        raise ValueError("cos/sin tables need unit stride along head_dim")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions {tuple(positions.shape)} for {num_tokens} tokens")
    if num_tokens == 0:
        return x
    positions = positions.contiguous()  # a no-op for the runner's (and graphs') buffers
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # heads per program: ~512 elements per half on the GPU; 2 under the interpreter so a
    # small test still spans several programs and a partial last one
    per_program = 2 if interpreting() else max(1, 512 // block_half)
    block_h = min(triton.next_power_of_2(num_heads), per_program)
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _rotary_kernel[grid](
        x, positions, cos, sin_signed, x.stride(0), x.stride(1), cos.stride(0),
        sin_signed.stride(0), NUM_HEADS=num_heads, HALF=half, BLOCK_H=block_h,
        BLOCK_HALF=block_half, **_launch_options(block_h * block_half))
    return x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [num_tokens, 2 * I] (gate first) -> silu(gate) * up: [num_tokens, I]."""
    rows = _rows(gate_up)
    num_tokens, width = rows.shape
    if width % 2:
        raise ValueError(f"gate_up width {width} is odd")
    inter = width // 2
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        # 16 columns under the interpreter: small tests still cover a masked last block
        block = min(16 if interpreting() else 1024, triton.next_power_of_2(inter))
        grid = (num_tokens, triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](
            rows, out, rows.stride(0), out.stride(0), N=inter, BLOCK=block,
            LIBDEVICE=not interpreting(), **_launch_options(block))
    return out.view(*gate_up.shape[:-1], inter)
