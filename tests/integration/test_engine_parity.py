"""Correctness oracle: greedy decoding equals Hugging Face transformers on the same weights."""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.engine.loader import load_model, resolve_model
from pdserve.engine.sampling import SamplingParams
from tests.support.engines import bundled_engine, engine_on
from tests.support.tiny_models import write_hf_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three colors: 1.",
    "Question: What is 17 plus 25? Answer:",
]
NEW_TOKENS = 32


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation with transformers' own forward and cache, no EOS stop."""
    ids = torch.tensor([prompt_ids])
    out, past = [], None
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


@pytest.fixture(scope="module")
def hf_bundled():
    path = resolve_model(None).path
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def engine():
    return bundled_engine()


def test_tokenizer_and_chat_template_match_transformers(hf_bundled, engine):
    hf_tok, _ = hf_bundled
    texts = PROMPTS + ["Hello 12345 world's  café 🙂 ñ 中文", "  tabs\tand\nnewlines  "]
    for text in texts:
        assert engine.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a prime number."}]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert engine.tokenizer.encode_chat(messages) == list(expected)


def test_bundled_model_greedy_matches_transformers(hf_bundled, engine):
    hf_tok, hf_model = hf_bundled
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    # all five in one batch: continuous batching must not change any of them
    ours = engine.generate(prompts, params)
    for prompt, completion in zip(prompts, ours):
        assert len(completion.token_ids) == NEW_TOKENS
        assert completion.token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS)
    assert engine.pool_is_idle()


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", {}),  # qkv bias, untied embeddings
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "rope_theta": 500000.0}),
    ("mistral", {}),
])
def test_safetensors_folder_greedy_matches_transformers(tmp_path, arch, overrides):
    folder = write_hf_folder(tmp_path / arch, arch, **overrides)
    hf_model = getattr(transformers, {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                      "mistral": "MistralForCausalLM"}[arch]).from_pretrained(
        folder, dtype=torch.float32).eval()
    loaded = load_model(str(folder))
    assert loaded.config.qkv_bias == (arch == "qwen2")
    engine = engine_on(loaded, max_num_batched_tokens=64)
    prompts = [engine.tokenizer.encode(t) for t in ("hello world", "a" * 90, "x")]
    got = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, completion in zip(prompts, got):
        assert completion.token_ids == hf_greedy(hf_model, prompt, 24)
