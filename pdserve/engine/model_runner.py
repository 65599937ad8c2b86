"""Runs one scheduled step on the model: builds the flattened batch, runs, samples.

execute() runs a step and returns its tokens; launch_decode() only queues a decode step
and hands back PendingTokens, so the host can prepare the next step while the device
works (the engine's asynchronous scheduling).
"""

from __future__ import annotations

import torch

from pdserve.engine.attention import get_attention_backend
from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec, torch_dtype
from pdserve.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from pdserve.engine.model.llama import LlamaForCausalLM
from pdserve.engine.sampling import make_generator, sample, sample_tokens
from pdserve.engine.scheduler.scheduler import ScheduledRequest


def build_model(config: ModelConfig, max_model_len: int, device: torch.device,
                dtype: torch.dtype) -> LlamaForCausalLM:
    """Allocate the model directly on its device in its dtype (no fp32 host copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config, max_positions=max_model_len)
    finally:
        torch.set_default_dtype(previous)
    # rotary tables stay fp32 (HF computes them in fp32)
    model.rotary.to(dtype=torch.float32)
    return model.eval()


class PendingTokens:
    """The sampled token ids of a queued step; copied to the host as the device gets there."""

    def __init__(self, tokens: torch.Tensor) -> None:
        # tokens: [rows] int64 on the model's device
        self.device_tokens = tokens
        self._event = None
        self._host = tokens
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()  # the GIL is released while the device finishes
        return self._host.tolist()


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig,
                 weights: dict[str, torch.Tensor], num_blocks: int, max_model_len: int) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype)
        self.model = build_model(model_config, max_model_len, self.device, self.dtype)
        if weights:
            self.model.load_hf_weights(weights)
        else:  # a synthetic model of real shapes (pdserve.engine.synthetic)
            self.model.init_random_(config.seed)
        # numpy's BLAS on the CPU: torch's own ops then run on one thread (two spinning
        # thread pools on the same cores slow each other down ~10x)
        self.numpy_blas = self.device.type == "cpu" and config.cpu_blas == "numpy"
        if self.device.type == "cpu":
            self.model.use_cpu_blas(self.numpy_blas)
        self.model.fused_elementwise = config.fused_kernels and self.device.type == "cuda"
        self.pool = KVCachePool(KVCacheSpec(
            num_layers=model_config.num_layers, num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim, block_size=config.block_size,
            num_blocks=num_blocks, dtype=config.dtype), self.device)
        self.graphs = self.prefill_graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            self._make_graphs(config, max_model_len)
        else:
            self.backend = get_attention_backend(config.attention_backend,
                                                 **self._backend_options(config))
        self._generators: dict[str, torch.Generator] = {}
        # auto: where a decode step is queued without a host sync (CUDA graphs)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.graphs is not None)
        self._seed_rng = torch.Generator().manual_seed(config.seed)

    def _make_graphs(self, config: EngineConfig, max_model_len: int) -> None:
        if config.attention_backend != "triton":
            raise ValueError("cuda_graphs needs attention_backend='triton'")
        # decode launch shapes then depend on the batch size alone (graph-safe)
        self.backend = get_attention_backend("triton", graph_max_seq_len=max_model_len,
                                             **self._backend_options(config))
        self.graphs = DecodeGraphs(self.model, self.pool, self.backend, config.max_num_seqs,
                                   max_model_len, config.block_size, self.device)
        if config.prefill_graph_max_tokens > 1:
            self.prefill_graphs = PrefillGraphs(
                self.model, self.pool, self.backend,
                min(config.prefill_graph_max_tokens, config.max_num_batched_tokens),
                max_model_len, config.block_size, self.device, self.graphs.memory_pool)

    def capture_graphs(self) -> int:
        """Capture every CUDA graph now (compiling the kernels they use); returns how
        many exist. Without it each size is captured the first time a step needs it."""
        for graphs in (self.graphs, self.prefill_graphs):
            if graphs is not None:
                graphs.capture_all()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sum(len(g.graphs) for g in (self.graphs, self.prefill_graphs) if g is not None)

    def _backend_options(self, config: EngineConfig) -> dict:
        if config.attention_backend == "triton" and self.device.type == "cuda":
            return {"dense_prefill_min_tokens": config.dense_prefill_min_tokens}
        return {}

    def generator_for(self, request) -> torch.Generator | None:
        if request.params.greedy:
            return None
        gen = self._generators.get(request.request_id)
        if gen is None:
            seed = request.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
            gen = self._generators[request.request_id] = make_generator(seed, self.device)
        return gen

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def build_batch(self, scheduled: list[ScheduledRequest], device: torch.device | None = None):
        """Flattened step inputs; tensors on `device` (default: the model's)."""
        bs = self.config.block_size
        input_ids, positions, slots, starts = [], [], [], [0]
        seq_lens, query_lens, tables = [], [], []
        for s in scheduled:
            r = s.request
            begin, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            if s.num_new_tokens == 1:  # decode: skip slicing the whole token list
                n_prompt = len(r.prompt_ids)
                input_ids.append(r.prompt_ids[begin] if begin < n_prompt
                                 else r.output_ids[begin - n_prompt])
                positions.append(begin)
                slots.append(r.block_ids[begin // bs] * bs + begin % bs)
            else:
                input_ids += r.all_token_ids[begin:end]
                positions += range(begin, end)
                slots += [r.block_ids[p // bs] * bs + p % bs for p in range(begin, end)]
            starts.append(starts[-1] + s.num_new_tokens)
            seq_lens.append(end)
            query_lens.append(s.num_new_tokens)
            tables.append(r.block_ids)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]
        dev = device or self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta, starts

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> list[int | None]:
        """Run the step; returns the sampled token per scheduled request (None mid-prompt)."""
        self._own_threads()
        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        if self._graphable(scheduled, len(sampling)):
            # host tensors: the graph's static device buffers take them in one copy each
            ids, pos, meta, _ = self.build_batch(scheduled, torch.device("cpu"))
            logits = self.graphs.run(ids, pos, meta.slot_mapping, meta.seq_lens, meta.block_tables)
            return self._sample(scheduled, sampling, logits)
        if self._prefill_graphable(scheduled):
            ids, pos, meta, _ = self.build_batch(scheduled, torch.device("cpu"))
            logits = self.prefill_graphs.run(ids, pos, meta.slot_mapping, meta.seq_lens_cpu[0],
                                             meta.block_tables)
            return self._sample(scheduled, sampling, logits) if sampling else [None]
        ids, pos, meta, starts = self.build_batch(scheduled)
        hidden = self.model(ids, pos, self.pool, self.backend, meta)
        if not sampling:
            return [None] * len(scheduled)
        if len(sampling) == len(scheduled) and meta.is_decode_only:
            last = hidden  # one row per request, all of them sample
        else:
            last = hidden[torch.tensor([starts[i + 1] - 1 for i in sampling], device=self.device)]
        return self._sample(scheduled, sampling, self.model.compute_logits(last))

    @torch.inference_mode()
    def launch_decode(self, scheduled: list[ScheduledRequest], carried: list[tuple[int, int]],
                      previous: PendingTokens | None) -> PendingTokens:
        """Queue a decode step (one new token per request, every one sampling); returns
        without waiting for the device. carried: (row, row of `previous`) pairs whose input
        token is the one `previous` sampled, which the host has not read yet."""
        self._own_threads()
        reqs = [s.request for s in scheduled]
        carry = self._carry(carried, previous)
        if self._graphable(scheduled, len(scheduled)):
            ids, pos, meta, _ = self.build_batch(scheduled, torch.device("cpu"))
            logits = self.graphs.run(ids, pos, meta.slot_mapping, meta.seq_lens,
                                     meta.block_tables, carry)
        else:
            ids, pos, meta, _ = self.build_batch(scheduled)
            if carry is not None:
                ids.index_copy_(0, *carry)
            logits = self.model.compute_logits(self.model(ids, pos, self.pool, self.backend, meta))
        return PendingTokens(sample_tokens(logits, [r.params for r in reqs],
                                           [self.generator_for(r) for r in reqs]))

    def _own_threads(self) -> None:
        """With numpy's BLAS, torch runs single-threaded (set again if the process changed
        it meanwhile, e.g. a baseline run between steps)."""
        if self.numpy_blas and torch.get_num_threads() != 1:
            torch.set_num_threads(1)

    def _carry(self, carried: list[tuple[int, int]], previous: PendingTokens | None):
        """(rows, token ids) on the device for the input tokens still on the device."""
        if not carried:
            return None
        rows, sources = zip(*carried)
        tokens = previous.device_tokens
        if list(sources) == list(range(len(sources))):
            values = tokens[:len(sources)]
        else:
            values = tokens.index_select(0, _index(sources, self.device))
        return _index(rows, self.device), values

    def _graphable(self, scheduled: list[ScheduledRequest], num_sampling: int) -> bool:
        """Pure decode steps (one token per request, all sampling) replay a CUDA graph."""
        return (self.graphs is not None and num_sampling == len(scheduled)
                and all(s.num_new_tokens == 1 for s in scheduled)
                and self.graphs.padded_size(len(scheduled)) is not None)

    def _prefill_graphable(self, scheduled: list[ScheduledRequest]) -> bool:
        """One chunk of one sequence that fits a captured prefill graph."""
        return (self.prefill_graphs is not None and len(scheduled) == 1
                and scheduled[0].num_new_tokens > 1
                and self.prefill_graphs.padded_size(scheduled[0].num_new_tokens) is not None)

    def _sample(self, scheduled, sampling: list[int], logits: torch.Tensor) -> list[int | None]:
        # logits: [len(sampling), vocab] fp32
        result: list[int | None] = [None] * len(scheduled)
        reqs = [scheduled[i].request for i in sampling]
        tokens = sample(logits, [r.params for r in reqs], [self.generator_for(r) for r in reqs])
        for i, t in zip(sampling, tokens):
            result[i] = t
        return result

    def ready_event(self) -> torch.cuda.Event | None:
        """An event marking the device work queued so far (None on the CPU, where a
        step's results are written when it returns)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


def _index(values, device: torch.device) -> torch.Tensor:
    # a small index list on the device, copied without waiting for queued work
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
