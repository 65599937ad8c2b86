"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

The batch is flattened: input_ids/positions are [num_tokens] for all sequences of a step;
attention goes through an AttentionBackend (torch reference or Triton kernels).

Two ways through the elementwise ops (norms, rotary, SiLU, residual adds), same rounding:
- plain PyTorch ops (`forward`): the CPU path, and the reference on CUDA;
- Triton kernels (kernels/elementwise.py) when `fused_elementwise` is set (ModelRunner
  sets it on CUDA): each residual add is folded into the next RMSNorm, so the residual
  stream is carried between layers and updated in place.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.kvcache.pool import KVCachePool


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type != "llama3":
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotate-half (NeoX/HF) rotary embedding with a precomputed cos/sin table.

    rotate_half(x) * sin == swap_halves(x) * sin_signed, with sin_signed = [-sin1, sin2]:
    negation is exact, so this is bitwise HF's x*cos + rotate_half(x)*sin.
    """

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_pos, head_dim]
        half = config.head_dim // 2
        sin = emb.sin()
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("sin_signed", torch.cat([-sin[:, :half], sin[:, half:]], dim=-1),
                             persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_signed) rows for a step: [num_tokens, 1, head_dim], fp32; once per step."""
        return self.cos[positions][:, None, :], self.sin_signed[positions][:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [num_tokens, heads, head_dim]; computed in fp32 as HF does
        cos, sin_signed = tables
        t, h, d = x.shape
        xf = x.float()
        swapped = xf.reshape(t, h, 2, d // 2).flip(2).reshape(t, h, d)
        return (xf * cos).add_(swapped.mul_(sin_signed)).to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.tables(positions))


@functools.cache
def _fused_ops():
    """The Triton elementwise kernels, imported once on first use: CPU-only installs
    have no triton, and an import statement per call would sit on the step's hot path."""
    from pdserve.engine.kernels import elementwise

    return elementwise


class Linear(nn.Linear):
    """nn.Linear whose matmul may run on numpy's BLAS (fp32 on the CPU; see
    LlamaForCausalLM.use_cpu_blas). Same parameters and state-dict keys."""

    blas_weight = None  # numpy [in, out]: a view of the input-major weight, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blas_weight is None:
            return F.linear(x, self.weight, self.bias)
        # x: [rows, in] -> [rows, out] through OpenBLAS (numpy's), no copies of the weight
        y = torch.from_numpy(x.detach().numpy() @ self.blas_weight)
        return y if self.bias is None else y.add_(self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one ATen call; the same ops (pow, mean, add eps, rsqrt, mul, mul weight)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward_fused(self, update: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        """Triton path: residual += update in place, then the norm of the new residual;
        with no update (the first layer), only the norm."""
        ops = _fused_ops()
        if update is None:
            return ops.rms_norm(residual, self.weight, self.eps)
        return ops.fused_add_rms_norm(update, residual, self.weight, self.eps)[0]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = config.head_dim ** -0.5

    def forward(self, x, rope, backend: AttentionBackend, k_cache, v_cache,
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [num_tokens, hidden]; q and k are rotated together (adjacent in qkv) by
        # rope: [num_tokens, heads, head_dim] -> same (a new tensor, or rotated in place)
        qkv = self.qkv_proj(x)
        t, qk_size = qkv.shape[0], self.q_size + self.kv_size
        qk = rope(qkv[:, :qk_size].view(t, -1, self.head_dim))
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_fused_ops().silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, backend, k_cache, v_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, backend, k_cache, v_cache, meta)
        return x.add_(self.mlp(self.post_attention_layernorm(x)))

    def forward_fused(self, update, residual, rope, backend, k_cache, v_cache, meta):
        """Triton path. update: the previous layer's MLP output, not yet added to residual
        (None in the first layer); residual: [num_tokens, hidden], updated in place.
        Returns this layer's MLP output, for the next norm to add."""
        h = self.input_layernorm.forward_fused(update, residual)
        attn = self.self_attn(h, rope, backend, k_cache, v_cache, meta)
        return self.mlp.forward_fused(self.post_attention_layernorm.forward_fused(attn, residual))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config, max_positions)
        # Triton kernels for norms/rotary/SiLU/residual adds (needs triton; on CPU only
        # under its interpreter). ModelRunner turns it on for CUDA.
        self.fused_elementwise = False

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: KVCachePool,
                backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden]
        if self.fused_elementwise:
            return self._forward_fused(input_ids, positions, pool, backend, meta)
        x = self.embed_tokens(input_ids)
        # cos/sin rows once per step, shared by all layers
        rope = functools.partial(Rotary.apply, tables=self.rotary.tables(positions))
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = pool.layer_caches(i)
            x = layer(x, rope, backend, k_cache, v_cache, meta)
        return self.norm(x)

    def _forward_fused(self, input_ids, positions, pool, backend, meta) -> torch.Tensor:
        # the kernel gathers each token's cos/sin row from the full tables
        rope = functools.partial(_fused_ops().rotary_, positions=positions,
                                 cos=self.rotary.cos, sin_signed=self.rotary.sin_signed)
        residual = self.embed_tokens(input_ids)  # [num_tokens, hidden], updated in place
        update = None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = pool.layer_caches(i)
            update = layer.forward_fused(update, residual, rope, backend, k_cache, v_cache, meta)
        return self.norm.forward_fused(update, residual)

    def use_cpu_blas(self, numpy_blas: bool) -> None:
        """CPU layout of the Linear weights: each [out, in] weight becomes the transpose of
        an [in, out] contiguous tensor (same shape and values, other strides), which MKL's
        one-row x @ W_t streams ~1.3-1.7x faster than its matrix-vector path. With
        numpy_blas (fp32), matmuls run on numpy's OpenBLAS over that same memory, which
        streams weights ~1.8x faster again on the 2-core CI machine (docs/benchmarks.md)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.weight.data = module.weight.data.t().contiguous().t()
                if numpy_blas and module.weight.dtype == torch.float32:
                    module.blas_weight = module.weight.data.t().numpy()

    @torch.no_grad()
    def init_random_(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights in place (benchmarks of real shapes without a checkpoint)."""
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or param.dim() == 1:
                param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                param.normal_(0.0, std, generator=gen)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden] -> logits: [n, vocab] in fp32
        return self.lm_head(hidden).float()

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors; q/k/v and gate/up are fused here."""
        own = self.state_dict()
        loaded = set()
        for name, tensor in _fused_hf_weights(weights, self.config):
            if name not in own:
                raise KeyError(f"unexpected weight {name}")
            if own[name].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(own[name].shape)}")
            own[name].copy_(tensor)
            loaded.add(name)
        missing = set(own) - loaded
        if missing:
            raise KeyError(f"checkpoint lacks weights: {sorted(missing)[:5]}")


def _fused_hf_weights(weights: dict[str, torch.Tensor], config: ModelConfig):
    for name, tensor in weights.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".mlp.up_proj." in name or "rotary_emb" in name:
            continue
        if ".self_attn.q_proj." in name:
            k = weights[name.replace("q_proj", "k_proj")]
            v = weights[name.replace("q_proj", "v_proj")]
            yield name.replace("q_proj", "qkv_proj").replace("model.", "", 1), torch.cat([tensor, k, v])
        elif ".mlp.gate_proj." in name:
            up = weights[name.replace("gate_proj", "up_proj")]
            yield name.replace("gate_proj", "gate_up_proj").replace("model.", "", 1), torch.cat([tensor, up])
        else:
            yield name.replace("model.", "", 1), tensor
    if config.tie_embeddings or "lm_head.weight" not in weights:
        yield "lm_head.weight", weights["model.embed_tokens.weight"]
