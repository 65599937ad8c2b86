"""In-process settings of the engine: frozen dataclasses, validated on construction."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type "llama3"); factor 1 = none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str  # llama | mistral | qwen2
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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")

    def fingerprint(self) -> str:
        """Names the model's shapes; KV made by one model is only valid for the same one."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "torch"
    block_size: int = 16
    num_blocks: int = 0  # 0: size from kv_cache_memory_gb
    kv_cache_memory_gb: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget of one step (chunked prefill)
    max_model_len: int = 0  # 0: the model's own context length
    enable_prefix_caching: bool = True
    cuda_graphs: bool = False
    # with cuda_graphs, a step computing one chunk of one sequence of up to this many
    # tokens replays a captured prefill graph (0: always eager)
    prefill_graph_max_tokens: int = 1024
    # triton backend on CUDA: a whole prompt of this many tokens or more with nothing
    # cached runs cuDNN attention over its contiguous K/V (0: the paged kernel always)
    dense_prefill_min_tokens: int = 3072
    fused_kernels: bool = True  # Triton-fused norms/rotary/SiLU/residual adds; CUDA only
    allocate_whole_prompt: bool = False  # prefill role: see SchedulerConfig
    # queue decode step N+1 before reading step N's tokens (hides the host's work behind
    # the device's); None: on with CUDA graphs, where queuing a step never waits
    async_scheduling: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
