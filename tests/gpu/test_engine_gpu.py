"""The engine on a GPU: the Triton backend and CUDA graphs against the torch backend.

Random-weight models of real shapes (no weights travel to the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.synthetic import synthetic_model

pytestmark = pytest.mark.gpu


def prompts(vocab: int, lengths=(1, 17, 100, 333, 40)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in lengths]


def engine(backend: str, dtype: str, graphs: bool = False, shape: str = "smollm2-135m",
           async_scheduling: bool | None = False, **extra):
    return LLMEngine(EngineConfig(device="cuda", dtype=dtype, attention_backend=backend,
                                  cuda_graphs=graphs, num_blocks=2048,
                                  max_num_batched_tokens=256,
                                  async_scheduling=async_scheduling, **extra),
                     synthetic_model(shape))


def test_triton_backend_greedy_equals_torch_backend_fp32():
    ref, fast = engine("torch", "float32"), engine("triton", "float32")
    ps = prompts(ref.model_config.vocab_size)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = [c.token_ids for c in ref.generate(ps, params)]
    assert [c.token_ids for c in fast.generate(ps, params)] == want
    assert fast.pool_is_idle()


def test_cuda_graph_decode_equals_eager_decode():
    eager, graphed = engine("triton", "float32"), engine("triton", "float32", graphs=True)
    ps = prompts(eager.model_config.vocab_size, lengths=(5, 70, 300))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want = [c.token_ids for c in eager.generate(ps, params)]
    # batch sizes 3, then 2, then 1 as requests finish: several captured graphs replay
    got = graphed.generate(ps, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 30, 20)])
    assert [c.token_ids for c in got] == [w[:n] for w, n in zip(want, (40, 30, 20))]
    assert graphed.runner.graphs is not None and len(graphed.runner.graphs.graphs) >= 2


def test_async_scheduling_with_cuda_graphs_equals_synchronous_steps():
    sync = engine("triton", "float32", graphs=True)
    ahead = engine("triton", "float32", graphs=True, async_scheduling=None)  # the default
    assert ahead.runner.async_scheduling
    ps = prompts(sync.model_config.vocab_size, lengths=(5, 70, 300, 17))
    free = [SamplingParams(max_tokens=40, temperature=0.8, seed=i) for i in range(len(ps))]
    free_run = sync.generate(ps, free)
    # seeded draws, and stops at different steps on tokens met mid-way
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=i,
                             stop_token_ids=(c.token_ids[5 + 6 * i],))
              for i, c in enumerate(free_run)]
    want = sync.generate(ps, params)
    ids = [ahead.add_request(p, sp) for p, sp in zip(ps, params)]
    got, reasons, ran_ahead = {i: [] for i in ids}, {}, 0
    while ahead.has_unfinished():
        for out in ahead.step():
            got[out.request_id] += out.new_token_ids
            reasons[out.request_id] = out.finish_reason
        ran_ahead += ahead.num_rows_in_flight > 0
    assert [got[i] for i in ids] == [c.token_ids for c in want]
    assert [reasons[i] for i in ids] == [c.finish_reason for c in want]
    assert ran_ahead > 10 and ahead.pool_is_idle()


def test_single_sequence_prefill_graphs_equal_eager_prefill():
    """Lone prompts (and each 256-token chunk of a longer one, over the context before
    it, and a prefix-cache hit) replay padded prefill graphs: same tokens as eager."""
    eager = engine("triton", "float32", graphs=True, prefill_graph_max_tokens=0)
    graphed = engine("triton", "float32", graphs=True)
    assert eager.runner.prefill_graphs is None
    ps = prompts(eager.model_config.vocab_size, lengths=(2, 17, 100, 333, 700))
    ps.append(ps[-1][:650] + ps[0])  # shares 40 full blocks with the 700-token prompt
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for p in ps:  # one at a time: every prefill step holds a single sequence
        want = eager.generate([p], params)[0]
        got = graphed.generate([p], params)[0]
        assert got.token_ids == want.token_ids
        assert got.num_cached_tokens == want.num_cached_tokens
    assert got.num_cached_tokens == 640
    assert {16, 128, 256, 192} <= set(graphed.runner.prefill_graphs.graphs)
    assert graphed.pool_is_idle()


def test_prefill_graph_logits_close_to_eager_in_bf16():
    eager = engine("triton", "bfloat16", graphs=True, prefill_graph_max_tokens=0)
    graphed = engine("triton", "bfloat16", graphs=True)
    p = prompts(eager.model_config.vocab_size, lengths=(201,))[0]
    outs = []
    for e in (eager, graphed):
        e.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True), "r")
        plan = e.scheduler.schedule()
        if e is graphed:
            assert e.runner._prefill_graphable(plan.scheduled)
            ids, pos, meta, _ = e.runner.build_batch(plan.scheduled, torch.device("cpu"))
            outs.append(e.runner.prefill_graphs.run(ids, pos, meta.slot_mapping, 201,
                                                    meta.block_tables))
        else:
            ids, pos, meta, _ = e.runner.build_batch(plan.scheduled)
            hidden = e.runner.model(ids, pos, e.runner.pool, e.runner.backend, meta)
            outs.append(e.runner.model.compute_logits(hidden[-1:]))
        e.abort("r")
    err = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert torch.isfinite(outs[1]).all() and err < 2e-2


def test_dense_prefill_of_whole_prompts_matches_the_paged_kernel_in_bf16():
    """A whole uncached prompt takes the cuDNN path; its KV still lands in the cache
    (the decode steps after it and a later prefix hit read it)."""
    paged = engine("triton", "bfloat16", dense_prefill_min_tokens=0)
    dense = engine("triton", "bfloat16", dense_prefill_min_tokens=64)
    p = prompts(paged.model_config.vocab_size, lengths=(240,))[0]
    outs = []
    for e in (paged, dense):
        e.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True), "r")
        plan = e.scheduler.schedule()
        ids, pos, meta, _ = e.runner.build_batch(plan.scheduled)
        assert e.runner.backend._dense(meta) == (e is dense)
        hidden = e.runner.model(ids, pos, e.runner.pool, e.runner.backend, meta)
        # layer 0's K/V do not depend on attention: stored bit for bit alike
        outs.append((e.runner.model.compute_logits(hidden[-1:]), e.runner.pool.kv[:, 0].clone()))
        e.abort("r")
    err = (outs[0][0] - outs[1][0]).norm() / outs[0][0].norm()
    assert err < 2e-2 and torch.equal(outs[0][1], outs[1][1]) and outs[1][1].any()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    dense.generate([p], params)  # dense prefill, then decode steps reading its KV
    hit = dense.generate([p[:200] + p[:50]], params)[0]  # prefix hit: the paged kernel
    assert hit.num_cached_tokens == 192 and len(hit.token_ids) == 6
    assert dense.pool_is_idle()


def test_warm_up_captures_every_graph_and_changes_no_result():
    cold, warm = engine("triton", "float32", graphs=True), engine("triton", "float32", graphs=True)
    count = warm.warm_up()
    runner = warm.runner
    assert set(runner.graphs.graphs) == set(runner.graphs.sizes)
    assert set(runner.prefill_graphs.graphs) == set(runner.prefill_graphs.sizes)
    assert count == len(runner.graphs.sizes) + len(runner.prefill_graphs.sizes)
    assert warm.pool_is_idle() and not runner.pool.kv.any()  # the captures stored nothing
    ps = prompts(cold.model_config.vocab_size, lengths=(3, 90, 200))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for p in ps:  # lone prompts: prefill graphs, then decode graphs
        assert warm.generate([p], params)[0].token_ids == cold.generate([p], params)[0].token_ids


def test_kv_pool_sized_from_gpu_memory_utilization():
    import pdserve.cli as cli

    cfg = cli._worker_settings(cli.build_parser().parse_args(
        ["decode", "--gpu-memory-utilization", "0.3", "--max-batch-tokens", "2048"]),
        "decode").engine
    assert (cfg.device, cfg.attention_backend, cfg.cuda_graphs) == ("cuda", "triton", True)
    free, total = torch.cuda.mem_get_info()
    e = LLMEngine(cfg, synthetic_model("smollm2-135m"))
    pool_bytes = e.runner.pool.kv.numel() * e.runner.pool.kv.element_size()
    # the share, less weights (~0.5 GB) and the activation bound (~1.2 GB)
    assert 0.3 * total - 3 * 2**30 < pool_bytes < min(0.3 * total, free)
    out = e.generate([[5, 6, 7] * 30], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and e.pool_is_idle()


def test_bf16_logits_close_between_backends():
    ref, fast = engine("torch", "bfloat16"), engine("triton", "bfloat16")
    p = prompts(ref.model_config.vocab_size, lengths=(257,))
    outs = []
    for e in (ref, fast):
        e.add_request(p[0], SamplingParams(max_tokens=1, ignore_eos=True), "r")
        plan = e.scheduler.schedule()
        ids, pos, meta, starts = e.runner.build_batch(plan.scheduled)
        hidden = e.runner.model(ids, pos, e.runner.pool, e.runner.backend, meta)
        outs.append(e.runner.model.compute_logits(hidden[-1:]))
        e.abort("r")
    err = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert err < 2e-2
