"""Sizing the KV pool from GPU memory (pure arithmetic, checked on the CPU)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import (EngineConfig, activation_bytes, gpu_kv_budget_bytes,
                                   resolve_device)
from pdserve.engine.model.llama import LlamaForCausalLM
from pdserve.engine.synthetic import SHAPES

GiB = 2**30


@pytest.mark.parametrize("shape", ["smollm2-135m", "llama3-8b"])
def test_parameter_count_matches_the_model_the_runner_builds(shape):
    config = SHAPES[shape]
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions=16)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_budget_is_the_share_less_weights_and_activations():
    budget = gpu_kv_budget_bytes(total=80 * GiB, free=79 * GiB, utilization=0.9,
                                 weight_bytes=16 * GiB, activation_bytes=3 * GiB)
    assert budget == int(0.9 * 80 * GiB) - 19 * GiB


def test_budget_never_exceeds_free_memory():
    """A second worker on a card the first one already filled gets what is left."""
    budget = gpu_kv_budget_bytes(total=80 * GiB, free=30 * GiB, utilization=0.45,
                                 weight_bytes=16 * GiB, activation_bytes=3 * GiB)
    assert budget == 11 * GiB


def test_activation_bound_grows_with_the_step_and_batch():
    model = SHAPES["llama3-8b"]
    small = activation_bytes(model, EngineConfig(max_num_batched_tokens=512), 2)
    big = activation_bytes(model, EngineConfig(max_num_batched_tokens=8192, max_num_seqs=256), 2)
    assert GiB < small < big < 6 * GiB


def test_bad_memory_settings_are_refused():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kv_cache_memory_gb"):
        EngineConfig(kv_cache_memory_gb=-1)


def test_auto_device_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
