"""In-process settings of the engine: frozen dataclasses, validated on construction."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
HIDDEN_ACTS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh")  # as transformers names them


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, as transformers' rope_type of the same name computes it.

    default: none; linear: every frequency / factor; dynamic (NTK): transformers rescales
    only past max_position, which the engine never reaches, so it equals default there;
    llama3: low/high_freq_factor band; yarn: beta_fast/beta_slow ramp and attention_factor
    (cos and sin scaled by it). freq_factors (a GGUF's rope_freqs tensor, how llama.cpp
    stores Llama 3 scaling): each inverse frequency is divided by its factor.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r} "
                             f"(supported: {', '.join(ROPE_TYPES)})")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    # llama | mistral | qwen2 | qwen3 | gemma2 | gemma3 | phi3 | qwen3_moe | mixtral
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Per layer: how many most recent positions (itself included) a query attends to; 0 = all.
    # Empty = no layer is windowed. A query at position p sees keys j with p - w < j <= p.
    layer_sliding_windows: tuple[int, ...] = ()
    # Gemma 2 style tanh soft cap on attention scores (0 = none): s -> cap * tanh(s / cap)
    attn_logit_softcap: float = 0.0
    hidden_act: str = "silu"  # MLP gate activation, one of HIDDEN_ACTS
    o_bias: bool = False  # o_proj has a bias (HF attention_bias: true)
    mlp_bias: bool = False  # gate/up/down projections have biases
    qk_norm: bool = False  # RMSNorm over each q and k head before rope (Qwen3, Gemma 3)
    # Gemma 2/3: the attention and MLP outputs are normed before their residual adds,
    # and the MLP input norm is pre_feedforward_layernorm
    sandwich_norms: bool = False
    embedding_scale: float = 1.0  # embeddings are multiplied by it (Gemma: sqrt(hidden))
    attention_scale: float = 0.0  # softmax scale of q.k; 0 = head_dim ** -0.5
    final_logit_softcap: float = 0.0  # logits -> cap * tanh(logits / cap); 0 = none
    rope_theta_local: float = 0.0  # Gemma 3: rope base of windowed layers (unscaled); 0 = same
    # sparse MoE feed-forward in every layer (model/moe.py) when num_experts > 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's width
    norm_topk_prob: bool = False  # the kept top-k routing weights renormalized to sum 1

    def __post_init__(self) -> None:
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} "
                             f"(supported: {', '.join(HIDDEN_ACTS)})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.layer_sliding_windows and len(self.layer_sliding_windows) != self.num_layers:
            raise ValueError(f"layer_sliding_windows has {len(self.layer_sliding_windows)} "
                             f"entries for {self.num_layers} layers")

    def sliding_window(self, layer: int) -> int:
        """Layer's attention window in positions; 0 = full attention."""
        return self.layer_sliding_windows[layer] if self.layer_sliding_windows else 0

    @property
    def droppable_window(self) -> int:
        """A window every layer shares (blocks wholly before it are never read again), or 0."""
        windows = self.layer_sliding_windows
        return max(windows) if windows and all(w > 0 for w in windows) else 0

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale or self.head_dim ** -0.5

    def layer_rope_theta(self, layer: int) -> float:
        """Rope base of a layer: Gemma 3's windowed layers have their own."""
        return self.rope_theta_local if self.rope_theta_local and self.sliding_window(layer) \
            else self.rope_theta

    def num_parameters(self) -> int:
        """Parameters the model allocates (embeddings, layers, norms, LM head)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        norms = (4 if self.sandwich_norms else 2) * self.hidden_size + \
            (2 * self.head_dim if self.qk_norm else 0)
        ffn = 3 * self.hidden_size * self.intermediate_size + \
            (2 * self.intermediate_size + self.hidden_size if self.mlp_bias else 0)
        if self.num_experts:
            ffn = self.num_experts * (3 * self.hidden_size * self.moe_intermediate_size
                                      + self.hidden_size)
        layer = (self.hidden_size * (q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0)
                 + q * self.hidden_size + (self.hidden_size if self.o_bias else 0) + ffn + norms)
        # the runner keeps a separate LM head even when the checkpoint ties it
        return 2 * self.vocab_size * self.hidden_size + self.num_layers * layer \
            + self.hidden_size

    def fingerprint(self) -> str:
        """Names the model's shapes; KV made by one model is only valid for the same one."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


MIXED_STEP_GRAPHS = ("auto", "piecewise", "parts", "eager")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "torch"
    block_size: int = 16
    num_blocks: int = 0  # 0: size from kv_cache_memory_gb
    kv_cache_memory_gb: float = 0.5  # 0: on CUDA, what gpu_memory_utilization leaves
    gpu_memory_utilization: float = 0.9  # this engine's share of its GPU (kv_cache_memory_gb 0)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget of one step (chunked prefill)
    max_model_len: int = 0  # 0: the model's own context length
    enable_prefix_caching: bool = True
    cuda_graphs: bool = False
    # with cuda_graphs, a step computing one chunk of one sequence of up to this many
    # tokens replays a captured prefill graph (0: always eager)
    prefill_graph_max_tokens: int = 2048
    # with cuda_graphs, other steps of up to prefill_graph_max_tokens tokens (decode rows
    # beside prompt chunks): "piecewise" (one pass: graphs between eager attentions,
    # pdserve/engine/piecewise.py), "parts" (a decode graph plus a prefill graph per
    # chunk, up to 4 chunks), "eager", or "auto": parts for models whose layers are
    # small enough that reading them again costs less than an eager attention per layer
    # (model_runner.PIECEWISE_MIN_LAYER_BYTES), piecewise otherwise and where parts
    # cannot serve the step (bench/results/mixed-steps-*-h100.json)
    mixed_step_graphs: str = "auto"
    # triton backend on CUDA: a whole prompt of this many tokens or more with nothing
    # cached runs cuDNN attention over its contiguous K/V (0: the paged kernel always)
    dense_prefill_min_tokens: int = 3072
    fused_kernels: bool = True  # Triton-fused norms/rotary/SiLU/residual adds; CUDA only
    allocate_whole_prompt: bool = False  # prefill role: see SchedulerConfig
    # CPU fp32 matmuls: "numpy" (numpy's OpenBLAS; torch's own ops on one thread) | "torch"
    cpu_blas: str = "numpy"
    # queue decode step N+1 before reading step N's tokens (hides the host's work behind
    # the device's); None: on with CUDA graphs, where queuing a step never waits
    async_scheduling: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.cpu_blas not in ("numpy", "torch"):
            raise ValueError(f"cpu_blas must be 'numpy' or 'torch', got {self.cpu_blas!r}")
        if self.mixed_step_graphs not in MIXED_STEP_GRAPHS:
            raise ValueError(f"mixed_step_graphs must be one of {', '.join(MIXED_STEP_GRAPHS)}, "
                             f"got {self.mixed_step_graphs!r}")
        if self.kv_cache_memory_gb < 0:
            raise ValueError(f"kv_cache_memory_gb must be >= 0, got {self.kv_cache_memory_gb}")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pin_device(device: str, environ=None) -> str:
    """A worker told to run on "cuda:N" runs there on every thread: before CUDA starts,
    CUDA_VISIBLE_DEVICES is reordered to put GPU N first (the others stay visible, for
    CUDA IPC with same-host peers) and the device becomes cuda:0, so streams, graphs and
    Triton launches that use the current device (0 on each new thread) land on it.
    ValueError for a malformed or absent device; "cpu", "cuda" unchanged."""
    import os
    import re

    environ = os.environ if environ is None else environ
    if device in ("cpu", "cuda"):
        return device
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        raise ValueError(f"device {device!r}: expected cpu, cuda, cuda:N or auto")
    index = int(match.group(1))
    import torch

    if index == 0 or torch.cuda.is_initialized():
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {device}: this process sees {count} GPU(s)")
        return device
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    listed = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    if listed is None:
        listed = [str(i) for i in range(_nvml_count())]
    if index >= len(listed):
        raise ValueError(f"device {device}: this process sees {len(listed)} GPU(s)")
    environ["CUDA_VISIBLE_DEVICES"] = ",".join([listed[index]] + listed[:index] +
                                                listed[index + 1:])
    return "cuda:0"


def _nvml_count() -> int:
    """GPUs on the machine without starting CUDA (which would fix CUDA_VISIBLE_DEVICES)."""
    import torch

    try:
        return torch.cuda._raw_device_count_nvml()
    except Exception:
        return 0


def gpu_kv_budget_bytes(*, total: int, free: int, utilization: float, weight_bytes: int,
                        activation_bytes: int) -> int:
    """Bytes the KV pool may take on a GPU: this engine's share (utilization x total,
    as vLLM's gpu_memory_utilization) but never more than is free now, less the weights
    and the activations it still has to allocate."""
    return int(min(utilization * total, free) - weight_bytes - activation_bytes)


def activation_bytes(model: ModelConfig, config: EngineConfig, dtype_bytes: int) -> int:
    """A generous bound on the step's transient memory: the widest per-token tensors of
    the largest step (gate/up, qkv, residual stream, twice for the allocator's slack),
    fp32 logits and sampling buffers of a full batch, and 1 GiB for cuBLAS workspaces,
    CUDA graph pools and fragmentation."""
    per_token = 2 * model.intermediate_size + 4 * model.hidden_size + \
        (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    step = 2 * config.max_num_batched_tokens * per_token * dtype_bytes
    logits = 3 * config.max_num_seqs * model.vocab_size * 4
    return step + logits + 2**30
