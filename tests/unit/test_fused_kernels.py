"""Fused elementwise Triton kernels (kernels/elementwise.py) vs the model's PyTorch code.

Runs on the CPU under TRITON_INTERPRET=1 (conftest sets it): tiny shapes, fp32 and fp16
(the interpreter's bf16 arithmetic is unusable). The references are the model's own
modules (RMSNorm, Rotary.apply, MLP's silu-and-mul). Outputs must be bitwise equal except
where the CPU's libraries differ from numpy's, which the interpreter computes with: the
order of the fp32 sum of squares in RMSNorm and fp32 exp in SiLU (there, fp32 is compared
with a tight tolerance, and SiLU also bitwise against the same formula over numpy's exp).
Widths are not powers of two and inputs are strided views, as the model passes them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from pdserve.engine.attention.base import AttentionMetadata  # noqa: E402
from pdserve.engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from pdserve.engine.config import ModelConfig  # noqa: E402
from pdserve.engine.kernels import (fused_add_rms_norm, rms_norm, rotary_,  # noqa: E402
                                    silu_and_mul)
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec  # noqa: E402
from pdserve.engine.model.llama import LlamaForCausalLM, RMSNorm, Rotary  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16}
EPS = 1e-5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def strided_rows(rows: int, width: int, dtype: torch.dtype, g: torch.Generator,
                 scale: float = 1.0) -> torch.Tensor:
    """[rows, width] column slice of a wider tensor: row stride width + 7, offset 3."""
    wide = torch.randn(rows, width + 7, generator=g) * scale
    return wide.to(dtype)[:, 3:3 + width]


def norm_module(hidden: int, dtype: torch.dtype, g: torch.Generator) -> RMSNorm:
    norm = RMSNorm(hidden, EPS)
    norm.weight.data = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    return norm


def assert_matches(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if exact:
        assert torch.equal(out, ref), (out - ref).abs().max()
    else:  # fp32 sums in another order: a few ulp
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-7)


# ---- RMSNorm ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 24), (5, 40), (7, 24)])
def test_rms_norm_matches_module(dtype, rows, hidden):
    dt, g = DTYPES[dtype], gen(rows * hidden)
    norm = norm_module(hidden, dt, g)
    x = strided_rows(rows, hidden, dt, g, scale=3.0)
    assert x.stride(0) == hidden + 7
    out = rms_norm(x, norm.weight, EPS)
    assert_matches(out, norm(x), exact=dt == torch.float16)


def test_rms_norm_keeps_leading_dims_and_empty_batch():
    g = gen(1)
    norm = norm_module(24, torch.float16, g)
    x = torch.randn(2, 3, 24, generator=g).half()
    assert torch.equal(rms_norm(x, norm.weight, EPS), norm(x))
    empty = torch.empty(0, 24, dtype=torch.float16)
    assert rms_norm(empty, norm.weight, EPS).shape == (0, 24)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 40), (5, 24)])
def test_fused_add_rms_norm_updates_residual(dtype, rows, hidden):
    dt, g = DTYPES[dtype], gen(100 + rows)
    norm = norm_module(hidden, dt, g)
    x = strided_rows(rows, hidden, dt, g)  # a sublayer's output
    residual = (torch.randn(rows, hidden, generator=g) * 4).to(dt)
    want_residual = x + residual  # the model's `x = x + attn(...)`: rounded to dt
    want_out = norm(want_residual)
    ptr = residual.data_ptr()
    out, res = fused_add_rms_norm(x, residual, norm.weight, EPS)
    assert res.data_ptr() == ptr and torch.equal(residual, want_residual)
    assert_matches(out, want_out, exact=dt == torch.float16)


def test_fused_add_rms_norm_rejects_strided_residual():
    g = gen(2)
    norm = norm_module(24, torch.float32, g)
    residual = strided_rows(3, 24, torch.float32, g).t().contiguous().t()
    with pytest.raises(ValueError):
        fused_add_rms_norm(torch.zeros(3, 24), residual, norm.weight, EPS)


# ---- rotary -----------------------------------------------------------------------------

def rope_config(head_dim: int) -> ModelConfig:
    return ModelConfig(name="t", architecture="llama", vocab_size=64, hidden_size=32,
                       intermediate_size=40, num_layers=1, num_heads=3, num_kv_heads=1,
                       head_dim=head_dim, max_position=1024, rope_theta=10000.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 12])  # 12: a half of 6, masked in the kernel
def test_rotary_in_place_on_qkv_view(dtype, head_dim):
    """q|k heads of a [T, (q + 2 kv heads) * d] projection, rotated in place at scattered
    positions; v stays as it was."""
    dt, g = DTYPES[dtype], gen(head_dim)
    rotary = Rotary(rope_config(head_dim), max_positions=1024)
    q_heads, kv_heads = 3, 2
    positions = torch.tensor([0, 1023, 5, 200, 37], dtype=torch.int64)
    t = positions.numel()
    qkv = (torch.randn(t, (q_heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(dt)
    qk_size = (q_heads + kv_heads) * head_dim
    qk = qkv[:, :qk_size].view(t, -1, head_dim)  # 5 heads: the last program is partial
    before = qk.clone()
    want = Rotary.apply(before, rotary.tables(positions))
    v_before = qkv[:, qk_size:].clone()
    out = rotary_(qk, positions, rotary.cos, rotary.sin_signed)
    assert out.data_ptr() == qk.data_ptr()
    assert torch.equal(qk, want), (qk.float() - want.float()).abs().max()
    assert torch.equal(qkv[:, qk_size:], v_before)
    assert not torch.equal(want, before)


def test_rotary_int32_positions_and_empty():
    rotary = Rotary(rope_config(16), max_positions=1024)
    x = torch.randn(2, 4, 16, generator=gen(3))
    want = Rotary.apply(x.clone(), rotary.tables(torch.tensor([9, 700])))
    rotary_(x, torch.tensor([9, 700], dtype=torch.int32), rotary.cos, rotary.sin_signed)
    assert torch.equal(x, want)
    empty = torch.empty(0, 4, 16)
    assert rotary_(empty, torch.empty(0, dtype=torch.int64), rotary.cos,
                   rotary.sin_signed) is empty


# ---- SiLU and mul -----------------------------------------------------------------------

def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # as MLP.forward
    return F.silu(gate).mul_(up)


def silu_mul_numpy(gate_up: torch.Tensor) -> torch.Tensor:
    """The contract's formula over numpy's fp32 exp (what the interpreter's exp is)."""
    gate, up = (c.float().numpy() for c in gate_up.chunk(2, dim=-1))
    act = torch.from_numpy(gate / (np.float32(1) + np.exp(-gate))).to(gate_up.dtype)
    return (act.float() * torch.from_numpy(up)).to(gate_up.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 20), (3, 40), (5, 7)])
def test_silu_and_mul(dtype, rows, inter):
    dt, g = DTYPES[dtype], gen(inter + rows)
    gate_up = strided_rows(rows, 2 * inter, dt, g, scale=4.0)
    out = silu_and_mul(gate_up)
    assert torch.equal(out, silu_mul_numpy(gate_up))
    assert_matches(out, silu_mul_reference(gate_up), exact=dt == torch.float16)


# ---- the model's fused path -------------------------------------------------------------

TINY = ModelConfig(name="tiny", architecture="llama", vocab_size=96, hidden_size=40,
                   intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=10, max_position=64, rope_theta=10000.0, rms_eps=EPS)


def tiny_model(dtype: torch.dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM(TINY, max_positions=64)
    model.init_random_(seed=0, std=0.2)
    with torch.no_grad():  # init_random_ leaves norms at 1: make the weight multiply count
        g = gen(4)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def step_meta(ctx_q_lens, block_size=16) -> AttentionMetadata:
    """Sequence i owns blocks 4i..4i+3 and gets q new tokens after ctx cached ones."""
    seq_lens = [c + q for c, q in ctx_q_lens]
    tables = torch.arange(4 * len(seq_lens), dtype=torch.int32).view(len(seq_lens), 4)
    slots = [int(tables[i, p // block_size]) * block_size + p % block_size
             for i, (c, q) in enumerate(ctx_q_lens) for p in range(c, c + q)]
    q_lens = [q for _, q in ctx_q_lens]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor([0, *np.cumsum(q_lens)],
                                                                        dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens)


def run_steps(model: LlamaForCausalLM, dtype: torch.dtype) -> list[torch.Tensor]:
    """A prefill of two prompts (5 and 3 tokens), then one decode step for both."""
    pool = KVCachePool(KVCacheSpec(TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, 16, 8,
                                   str(dtype).split(".")[-1]))
    backend, g = TorchAttentionBackend(), gen(5)
    ids = torch.randint(0, TINY.vocab_size, (10,), generator=g)
    steps = [(ids[:8], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), step_meta([(0, 5), (0, 3)])),
             (ids[8:], torch.tensor([5, 3]), step_meta([(5, 1), (3, 1)]))]
    return [model(i, p, pool, backend, m) for i, p, m in steps]


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_fused_path_matches_torch_path(dtype):
    """Same weights, fused_elementwise off and on: hidden states of a prefill and a decode
    step. Only RMSNorm's fp32 sums (and fp32 exp) differ, so the tolerance is that of a
    rounding flip or two carried through 2 layers; a misplaced residual add is O(1)."""
    dt = DTYPES[dtype]
    model = tiny_model(dt)
    want = run_steps(model, dt)
    model.fused_elementwise = True
    got = run_steps(model, dt)
    tol = 1e-5 if dt == torch.float32 else 4e-3
    for w, o in zip(want, got):
        assert o.dtype == dt and o.shape == w.shape
        torch.testing.assert_close(o, w, rtol=tol, atol=tol)
