"""Llama-family decoder over a paged KV cache: Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3,
Gemma 2 and Gemma 3 (text), SmolLM2. What differs between them is in ModelConfig: biases,
q/k norms, the MLP activation, Gemma's sandwich norms, embedding scale, soft caps, per-layer
sliding windows and rope bases.

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
import re

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.config import ModelConfig, RopeScaling
from pdserve.engine.kvcache.pool import KVCachePool


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], fp32, as transformers' rope init functions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling.freq_factors:
        return inv_freq / torch.tensor(scaling.freq_factors, dtype=torch.float32)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    # default; dynamic NTK only rescales past max_position, which the engine never reaches
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """YaRN: interpolated (/ factor) below a ramp over dims, extrapolated above it."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


class Rotary(nn.Module):
    """Rotate-half (NeoX/HF) rotary embedding with a precomputed cos/sin table.

    rotate_half(x) * sin == swap_halves(x) * sin_signed, with sin_signed = [-sin1, sin2]:
    negation is exact, so this is bitwise HF's x*cos + rotate_half(x)*sin.
    """

    def __init__(self, config: ModelConfig, max_positions: int, theta: float | None = None,
                 scaling: RopeScaling | None = None) -> None:
        """theta / scaling: other than the config's (Gemma 3's local layers)."""
        super().__init__()
        head_dim = config.head_dim
        scaling = config.rope_scaling if scaling is None else scaling
        inv_freq = rope_inv_freq(head_dim, theta or config.rope_theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_pos, head_dim]
        half = head_dim // 2
        cos, sin = emb.cos(), emb.sin()
        if scaling.attention_factor != 1.0:  # YaRN scales cos and sin (transformers does too)
            cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
        self.register_buffer("cos", cos, persistent=False)
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

    def norm_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Triton path, norm only (a new tensor)."""
        return _fused_ops().rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = config.softmax_scale
        # the backend's per-layer options, passed only when set (so backends without
        # them still serve every model that does not need them)
        self.backend_kwargs = {}
        if config.sliding_window(layer):
            self.backend_kwargs["sliding_window"] = config.sliding_window(layer)
        if config.attn_logit_softcap:
            self.backend_kwargs["logits_soft_cap"] = config.attn_logit_softcap

    def forward(self, x, rope, backend: AttentionBackend, k_cache, v_cache,
                meta: AttentionMetadata, fused: bool = False) -> torch.Tensor:
        # x: [num_tokens, hidden] -> [num_tokens, hidden]
        q, k, v = self.project(x, rope, fused)
        return self.o_proj(self.attend(q, k, v, backend, k_cache, v_cache, meta)
                           .reshape(x.shape[0], self.q_size))

    def project(self, x: torch.Tensor, rope, fused: bool = False):
        """q, k, v of x, q and k normed (if the model does) and rotated. q and k are
        rotated together (adjacent in qkv) by rope: [num_tokens, heads, head_dim] -> same
        (a new tensor, or rotated in place).
        x: [t, hidden] -> q: [t, num_heads, head_dim], k, v: [t, num_kv_heads, head_dim]"""
        qkv = self.qkv_proj(x)
        t, qk_size = qkv.shape[0], self.q_size + self.kv_size
        if self.q_norm is not None:
            self._norm_qk_(qkv, fused)
        qk = rope(qkv[:, :qk_size].view(t, -1, self.head_dim))
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        return qk[:, :self.num_heads], qk[:, self.num_heads:], v

    def attend(self, q, k, v, backend: AttentionBackend, k_cache, v_cache,
               meta: AttentionMetadata) -> torch.Tensor:
        """This layer's attention (K/V stored first): [t, num_heads, head_dim], before o_proj."""
        return backend.forward(q, k, v, k_cache, v_cache, meta, self.scale,
                               **self.backend_kwargs)

    def attend_stored(self, q, k, v, backend: AttentionBackend, k_cache, v_cache,
                      meta: AttentionMetadata, out: torch.Tensor) -> torch.Tensor:
        """attend() once k/v are in the cache (stored inside a piecewise graph), into out."""
        return backend.attend_stored(q, k, v, k_cache, v_cache, meta, self.scale,
                                     **self.backend_kwargs, out=out)

    def _norm_qk_(self, qkv: torch.Tensor, fused: bool) -> None:
        """Each q and k head RMS-normed before rope, written back into qkv (so q|k stay
        adjacent for the one rotation). qkv: [num_tokens, q_size + 2 * kv_size].
        fused: the Triton norm kernel (one launch per tensor) instead of torch's ops."""
        t = qkv.shape[0]
        q = qkv[:, :self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.num_kv_heads,
                                                                 self.head_dim)
        q_norm = self.q_norm.norm_fused if fused else self.q_norm
        k_norm = self.k_norm.norm_fused if fused else self.k_norm
        q.copy_(q_norm(q))
        k.copy_(k_norm(k))


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """transformers' ACT2FN[name], formula for formula (rounding included)."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu_new":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return 0.5 * x * (1.0 + torch.tanh(inner))
    raise ValueError(f"unsupported hidden_act {name!r}")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size,
                                   bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size,
                                bias=config.mlp_bias)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(_activation(self.act, gate).mul_(up))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        if self.act != "silu":  # the fused kernel is SiLU's; GELU variants take torch's ops
            return self.forward(x)
        return self.down_proj(_fused_ops().silu_and_mul(self.gate_up_proj(x)))


def _moe_block(config: ModelConfig) -> nn.Module:
    from pdserve.engine.model.moe import SparseMoeBlock

    return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                          config.num_experts_per_tok, config.norm_topk_prob)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config, layer)
        # Llama: the MLP's input norm. Gemma (sandwich): the attention output's norm.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = _moe_block(config) if config.num_experts else MLP(config)
        self.moe = bool(config.num_experts)
        self.local_rope = bool(config.rope_theta_local and config.sliding_window(layer))

    def forward(self, x, rope, backend, k_cache, v_cache, meta):
        attn = self.self_attn(self.input_layernorm(x), rope, backend, k_cache, v_cache, meta)
        if not self.sandwich:
            x = x + attn
            return x.add_(self.mlp(self.post_attention_layernorm(x)))
        x = x + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(x))
        return x.add_(self.post_feedforward_layernorm(mlp))

    def forward_fused(self, update, residual, rope, backend, k_cache, v_cache, meta):
        """Triton path. update: the previous layer's MLP output, not yet added to residual
        (None in the first layer); residual: [num_tokens, hidden], updated in place.
        Returns this layer's MLP output, for the next norm to add."""
        h = self.input_layernorm.forward_fused(update, residual)
        attn = self.self_attn(h, rope, backend, k_cache, v_cache, meta, fused=True)
        return self.after_attention_fused(attn, residual)

    def after_attention_fused(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Triton path from o_proj's output attn: [num_tokens, hidden] on (residual updated
        in place); returns this layer's MLP output, for the next norm to add."""
        if self.moe:  # its forward takes the fused kernels on CUDA
            return self.mlp(self.post_attention_layernorm.forward_fused(attn, residual))
        if not self.sandwich:
            h = self.post_attention_layernorm.forward_fused(attn, residual)
            return self.mlp.forward_fused(h)
        attn = self.post_attention_layernorm.norm_fused(attn)
        mlp = self.mlp.forward_fused(self.pre_feedforward_layernorm.forward_fused(attn, residual))
        return self.post_feedforward_layernorm.norm_fused(mlp)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config, max_positions)
        # Gemma 3's windowed layers: their own base, no scaling
        self.rotary_local = Rotary(config, max_positions, config.rope_theta_local,
                                   RopeScaling()) if config.rope_theta_local else None
        # Gemma multiplies embeddings by sqrt(hidden) rounded to the model's dtype (a
        # buffer, so no host-to-device copy is queued inside a CUDA graph)
        self.embedding_scale = config.embedding_scale
        self.register_buffer("embed_scale", torch.tensor(config.embedding_scale),
                             persistent=False)
        # Triton kernels for norms/rotary/SiLU/residual adds (needs triton; on CPU only
        # under its interpreter). ModelRunner turns it on for CUDA.
        self.fused_elementwise = False

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: KVCachePool,
                backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden]
        if self.fused_elementwise:
            return self._forward_fused(input_ids, positions, pool, backend, meta)
        x = self.embed(input_ids)
        # cos/sin rows once per step, shared by all layers of the same base
        ropes = [functools.partial(Rotary.apply, tables=r.tables(positions)) if r else None
                 for r in (self.rotary, self.rotary_local)]
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = pool.layer_caches(i)
            x = layer(x, ropes[layer.local_rope], backend, k_cache, v_cache, meta)
        return self.norm(x)

    def fused_ropes(self, positions: torch.Tensor) -> list:
        """The Triton path's rotations (global, local) for a step's positions [num_tokens]:
        the kernel gathers each token's cos/sin row from the full tables."""
        return [functools.partial(_fused_ops().rotary_, positions=positions, cos=r.cos,
                                  sin_signed=r.sin_signed) if r else None
                for r in (self.rotary, self.rotary_local)]

    def _forward_fused(self, input_ids, positions, pool, backend, meta) -> torch.Tensor:
        ropes = self.fused_ropes(positions)
        residual = self.embed(input_ids)  # [num_tokens, hidden], updated in place
        update = None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = pool.layer_caches(i)
            update = layer.forward_fused(update, residual, ropes[layer.local_rope], backend,
                                         k_cache, v_cache, meta)
        return self.norm.forward_fused(update, residual)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        return x if self.embedding_scale == 1.0 else x.mul_(self.embed_scale.to(x.dtype))

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
            if name.endswith("norm.weight") or param.dim() == 1:  # norms 1, biases 0
                param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                param.normal_(0.0, std, generator=gen)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden] -> logits: [n, vocab] in fp32
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        return logits if not cap else torch.tanh(logits / cap).mul_(cap)

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors (q/k/v and gate/up fused here). Every tensor must be one
        of the model's and every parameter must be given: a checkpoint with anything else
        (quantization scales, another architecture's tensors) is refused, never half-used."""
        own = self.state_dict()
        given = model_weights(weights, self.config)
        unexpected = sorted(set(given) - set(own))
        if unexpected:
            raise UnsupportedCheckpoint(
                f"checkpoint has {len(unexpected)} tensor(s) the {self.config.architecture} "
                f"model does not use: {', '.join(unexpected[:6])}")
        missing = sorted(set(own) - set(given))
        if missing:
            raise UnsupportedCheckpoint(f"checkpoint lacks weights: {', '.join(missing[:6])}")
        for name, tensor in given.items():
            if own[name].shape != tensor.shape:
                raise UnsupportedCheckpoint(
                    f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects "
                    f"{tuple(own[name].shape)}")
            own[name].copy_(tensor)


class UnsupportedCheckpoint(ValueError):
    """A checkpoint this model cannot compute exactly; the message names what."""


# tensors of quantized checkpoints (FP8 block scales, activation scales, ...)
_QUANT_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "weight_zero_point",
                   "qweight", "qzeros", "scales", "g_idx")
_FUSED_PARTS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_PART_ORDER = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_SPLIT_NAME = re.compile(r"(layers\.\d+\.(?:self_attn|mlp))\.(\w+)\.(weight|bias)")


def model_weights(weights: dict[str, torch.Tensor], config: ModelConfig
                  ) -> dict[str, torch.Tensor]:
    """HF checkpoint names and values -> this module's state-dict names and values:
    q/k/v and gate/up concatenated (Phi-3 checkpoints already are), the tied LM head,
    and Gemma's norms folded to the multiplier they apply, 1 + w (in fp32, as Gemma's
    RMSNorm computes it)."""
    quantized = [n for n in weights if n.rsplit(".", 1)[-1] in _QUANT_SUFFIXES]
    if quantized:
        raise UnsupportedCheckpoint(f"quantized checkpoint (tensor {quantized[0]}): only "
                                    f"unquantized fp32/fp16/bf16 weights are supported")
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    consumed: set[str] = set()
    if config.num_experts:
        out.update(_expert_weights(weights, config, consumed))
    for name, tensor in weights.items():
        if name in consumed:
            continue
        short = name.removeprefix("model.")
        m = _SPLIT_NAME.fullmatch(short)
        if m and m.group(2) in _FUSED_PARTS:
            key = (m.group(1), _FUSED_PARTS[m.group(2)], m.group(3))
            parts.setdefault(key, {})[m.group(2)] = tensor
        elif not short.endswith("rotary_emb.inv_freq"):  # a derived buffer old checkpoints kept
            out[short] = tensor
    for (prefix, fused, kind), got in parts.items():
        order = _PART_ORDER[fused]
        lacking = [p for p in order if p not in got]
        if lacking:
            raise UnsupportedCheckpoint(f"checkpoint has {prefix}.{next(iter(got))}.{kind} "
                                        f"but not {prefix}.{lacking[0]}.{kind}")
        out[f"{prefix}.{fused}.{kind}"] = torch.cat([got[p] for p in order])
    if (config.tie_embeddings or "lm_head.weight" not in out) and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    if config.architecture in ("gemma2", "gemma3"):
        out = {n: 1.0 + t.float() if n.endswith("norm.weight") else t for n, t in out.items()}
    return out


def _expert_weights(weights: dict[str, torch.Tensor], config: ModelConfig,
                    consumed: set[str]) -> dict[str, torch.Tensor]:
    """Every layer's router and stacked experts (moe.py reads both checkpoint layouts)."""
    from pdserve.engine.model.moe import load_hf_expert_weights

    style = "mixtral" if config.architecture == "mixtral" else "qwen3_moe"
    out = {}
    for i in range(config.num_layers):
        for name, t in load_hf_expert_weights(weights, f"model.layers.{i}.", style,
                                              consumed).items():
            out[f"layers.{i}.mlp.{name}"] = t
    return out
