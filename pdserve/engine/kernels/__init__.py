"""Triton kernels for paged attention: KV store, paged prefill, paged (split-KV) decode.

Import needs triton; under TRITON_INTERPRET=1 (set before import) they run on the CPU.
"""

from pdserve.engine.kernels.decode import choose_num_splits, paged_decode_attention
from pdserve.engine.kernels.prefill import paged_prefill_attention
from pdserve.engine.kernels.store_kv import store_kv

__all__ = ["choose_num_splits", "paged_decode_attention", "paged_prefill_attention", "store_kv"]
