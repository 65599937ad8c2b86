"""Triton kernels: paged attention (KV store, paged prefill, paged split-KV decode) and the
decoder's fused elementwise ops (RMSNorm with the residual add, rotary, SiLU-and-mul).

Import needs triton; under TRITON_INTERPRET=1 (set before import) they run on the CPU.
Nothing outside this package imports it eagerly (the attention backend and the model's
fused path import it when chosen), so CPU-only installs without triton still work.
"""

from pdserve.engine.kernels.decode import choose_num_splits, paged_decode_attention
from pdserve.engine.kernels.elementwise import (fused_add_rms_norm, rms_norm, rotary_,
                                                silu_and_mul)
from pdserve.engine.kernels.prefill import paged_prefill_attention
from pdserve.engine.kernels.store_kv import store_kv

__all__ = ["choose_num_splits", "fused_add_rms_norm", "paged_decode_attention",
           "paged_prefill_attention", "rms_norm", "rotary_", "silu_and_mul", "store_kv"]
