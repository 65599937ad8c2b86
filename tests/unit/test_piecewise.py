"""Piecewise steps (pdserve/engine/piecewise.py) against the model's own forward: the pieces
run eagerly here (graphs=False: the same static buffers, split points and padding as the
CUDA graphs replay), on the Triton path under the interpreter, fp32, tiny shapes. The GPU
test (tests/gpu/test_mixed_steps_gpu.py) replays the captured graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from pdserve.engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec  # noqa: E402
from pdserve.engine.model.llama import LlamaForCausalLM  # noqa: E402
from pdserve.engine.piecewise import PiecewiseGraphs  # noqa: E402
from test_fused_kernels import TINY, step_meta  # noqa: E402

MOE = dataclasses.replace(TINY, name="tiny-moe", architecture="qwen3_moe", qk_norm=True,
                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                          norm_topk_prob=True)


def model_of(config) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, max_positions=64)
    model.init_random_(seed=0, std=0.2)
    with torch.no_grad():  # norms away from 1, so a skipped or doubled norm shows
        g = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    model.fused_elementwise = True
    return model.eval()


def new_pool(config) -> KVCachePool:
    return KVCachePool(KVCacheSpec(config.num_layers, config.num_kv_heads, config.head_dim,
                                   16, 16, "float32"))


# (cached tokens, new tokens) per sequence: a prefill of three prompts, then a mixed step
# of two decode rows, a later chunk of the third prompt and a new prompt (11 tokens: the
# piecewise step pads to 16)
PREFILL = [(0, 5), (0, 3), (0, 4)]
MIXED = [(5, 1), (3, 1), (4, 6), (0, 3)]


def step(model, pool, layout, ids, positions, piecewise=None):
    """Logits of each sequence's last new token."""
    meta = step_meta(layout)
    last = meta.query_start_loc[1:].long() - 1
    if piecewise is not None:
        return piecewise.run(ids, positions, meta, last)
    hidden = model(ids, positions, pool, TorchAttentionBackend(), meta)
    return model.compute_logits(hidden[last])


def layout_inputs(layout, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = sum(q for _, q in layout)
    positions = torch.tensor([p for c, q in layout for p in range(c, c + q)])
    return torch.randint(0, vocab, (n,), generator=g), positions


@pytest.mark.parametrize("config", [TINY, MOE], ids=["llama", "qwen3-moe"])
def test_piecewise_step_equals_the_model_forward(config):
    model = model_of(config)
    eager_pool, piece_pool = new_pool(config), new_pool(config)
    piecewise = PiecewiseGraphs(model, piece_pool, TorchAttentionBackend(), max_tokens=32,
                                device=torch.device("cpu"), graphs=False)
    for seed, layout in enumerate([PREFILL, MIXED]):
        ids, positions = layout_inputs(layout, config.vocab_size, seed)
        want = step(model, eager_pool, layout, ids, positions)
        got = step(model, piece_pool, layout, ids, positions, piecewise)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(piecewise.pieces) == [16]  # 12 and 11 tokens: both padded to 16
    assert len(piecewise.pieces[16]) == config.num_layers + 1
    # the cache holds the same K/V; padded rows stored nothing (slot -1 is never made)
    for i in range(config.num_layers):
        for want_cache, got_cache in zip(eager_pool.layer_caches(i), piece_pool.layer_caches(i)):
            torch.testing.assert_close(got_cache, want_cache, rtol=1e-5, atol=1e-5)


def test_capturing_a_new_size_after_a_step_leaves_the_cache_alone():
    """A capture runs each piece once on whatever the buffers hold (the last step's rows):
    the K/V stores inside the pieces must write nowhere then."""
    model = model_of(TINY)
    piecewise = PiecewiseGraphs(model, new_pool(TINY), TorchAttentionBackend(), 32,
                                torch.device("cpu"), graphs=False)
    step(model, piecewise.pool, PREFILL, *layout_inputs(PREFILL, TINY.vocab_size, 0), piecewise)
    before = piecewise.pool.kv.clone()
    with torch.inference_mode():  # as run() and capture_all() are
        for piece in piecewise._pieces(32):  # what capture() does to a new size
            piece()
    assert torch.equal(piecewise.pool.kv, before)


def test_piecewise_padded_rows_do_not_leak_into_the_next_step():
    """Stale buffer rows from a longer step sit past a shorter step's tokens: its logits
    are those of a fresh PiecewiseGraphs."""
    model = model_of(TINY)
    long_layout, short_layout = [(0, 14)], [(0, 9)]
    used = PiecewiseGraphs(model, new_pool(TINY), TorchAttentionBackend(), 32,
                           torch.device("cpu"), graphs=False)
    fresh = PiecewiseGraphs(model, new_pool(TINY), TorchAttentionBackend(), 32,
                            torch.device("cpu"), graphs=False)
    step(model, used.pool, long_layout, *layout_inputs(long_layout, TINY.vocab_size, 7), used)
    ids, positions = layout_inputs(short_layout, TINY.vocab_size, 8)
    used.pool.kv.zero_()  # a new sequence over the same blocks
    got = step(model, used.pool, short_layout, ids, positions, used)
    want = step(model, fresh.pool, short_layout, ids, positions, fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_padded_sizes_end_at_the_token_budget_and_pad_little_past_512():
    model = model_of(TINY)
    piecewise = PiecewiseGraphs(model, new_pool(TINY), TorchAttentionBackend(), 100,
                                torch.device("cpu"), graphs=False)
    assert piecewise.sizes[-3:] == [80, 96, 100]  # a step of the whole budget fits
    assert [piecewise.padded_size(n) for n in (1, 16, 17, 65, 97, 100, 101)] == \
        [16, 16, 32, 80, 100, 100, None]
    # past 512 tokens (compute-bound) at most 64 padding rows
    sizes = PiecewiseGraphs(model, new_pool(TINY), TorchAttentionBackend(), 2048,
                            torch.device("cpu"), graphs=False)
    assert sizes.padded_size(1040) == 1088 and sizes.padded_size(513) == 576
    assert all(b - a == 64 for a, b in zip(sizes.sizes, sizes.sizes[1:]) if a >= 512)


def test_mixed_step_graphs_is_validated_and_reaches_the_engine_config():
    from pdserve.cli import _engine_config, build_parser
    from pdserve.engine.config import EngineConfig

    with pytest.raises(ValueError, match="mixed_step_graphs must be one of"):
        EngineConfig(mixed_step_graphs="whole")
    args = build_parser().parse_args(["decode", "--mixed-step-graphs", "auto"])
    assert _engine_config(args).mixed_step_graphs == "auto"
    assert _engine_config(build_parser().parse_args(["decode"])).mixed_step_graphs == \
        EngineConfig().mixed_step_graphs


def test_auto_prefers_parts_only_for_models_of_small_layers():
    from pdserve.engine.model_runner import PIECEWISE_MIN_LAYER_BYTES, layer_weight_bytes
    from pdserve.engine.synthetic import SHAPES

    def bf16_layer_bytes(config) -> int:
        with torch.device("meta"):
            return layer_weight_bytes(LlamaForCausalLM(config, max_positions=16)) // 2

    assert bf16_layer_bytes(SHAPES["smollm2-135m"]) < PIECEWISE_MIN_LAYER_BYTES
    assert bf16_layer_bytes(SHAPES["llama3-8b"]) > 3 * PIECEWISE_MIN_LAYER_BYTES
    assert bf16_layer_bytes(SHAPES["qwen3-30b-a3b"]) > PIECEWISE_MIN_LAYER_BYTES


def tiny_engine(config, piecewise: bool):
    """A CPU engine on the Triton path whose every step goes through PiecewiseGraphs
    (pieces run eagerly) when asked: the runner's row order and sampled-row mapping."""
    from pathlib import Path

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.loader import LoadedModel, ModelSource
    from pdserve.engine.synthetic import placeholder_tokenizer

    loaded = LoadedModel(ModelSource(config.name, Path("/dev/null"), "synthetic"), config,
                         placeholder_tokenizer(config.vocab_size), weights={})
    engine = LLMEngine(EngineConfig(dtype="float32", num_blocks=64, max_num_batched_tokens=24,
                                    max_num_seqs=8), loaded)
    engine.runner.model.fused_elementwise = True
    if piecewise:
        runner = engine.runner
        runner.piecewise = PiecewiseGraphs(runner.model, runner.pool, runner.backend,
                                           max_tokens=32, device=torch.device("cpu"),
                                           graphs=False)
    return engine


def staggered(engine, prompts):
    """One prompt admitted every other step, so chunks and decode rows share steps; every
    request samples (temperature, seeded) so a row mix-up changes the tokens."""
    from pdserve.engine.sampling import SamplingParams

    got, pending, steps, ids = {}, list(prompts), 0, []
    while pending or engine.has_unfinished():
        if pending and steps % 2 == 0:
            params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8,
                                    seed=len(ids))
            ids.append(engine.add_request(pending.pop(0), params))
            got[ids[-1]] = []
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        steps += 1
    return [got[i] for i in ids]


def test_engine_steps_through_piecewise_give_the_eager_tokens():
    config = dataclasses.replace(TINY, max_position=128)
    g = torch.Generator().manual_seed(3)
    # the 70-token prompt chunks over several steps while the short ones after it
    # decode: steps with a chunk before decode rows, which the runner reorders
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist()
               for n in (9, 70, 2, 17, 5)]
    want = staggered(tiny_engine(config, piecewise=False), prompts)
    engine = tiny_engine(config, piecewise=True)
    sampled_rows = []
    run = engine.runner.piecewise.run
    engine.runner.piecewise.run = lambda ids, pos, meta, rows: (
        sampled_rows.append(rows.tolist()) or run(ids, pos, meta, rows))
    assert staggered(engine, prompts) == want
    # some step put its decode rows before a chunk that came first
    assert any(rows != sorted(rows) for rows in sampled_rows), sampled_rows
    assert engine.pool_is_idle()
