"""A synthetic shape's HF config.json (what a peer server loads with dummy weights) is
the same model pdserve benchmarks: read back through the HF loader it gives the shape."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pdserve.engine.loader.hf_loader import read_config
from pdserve.engine.synthetic import SHAPES, hf_config


@pytest.mark.parametrize("shape", ["llama3-8b", "qwen3-8b", "qwen3-30b-a3b", "smollm2-135m"])
def test_hf_config_reads_back_as_the_shape(shape, tmp_path):
    folder = tmp_path / shape
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(shape)))
    read = read_config(folder)
    assert dataclasses.replace(read, name=SHAPES[shape].name) == SHAPES[shape]


def test_moe_shape_names_its_experts():
    cfg = hf_config("qwen3-30b-a3b")
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) \
        == (128, 8, 768)
