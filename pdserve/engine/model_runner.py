"""Runs one scheduled step on the model: builds the flattened batch, runs, samples.

execute() runs a step and returns its tokens; launch_decode() only queues a decode step
and hands back PendingTokens, so the host can prepare the next step while the device
works (the engine's asynchronous scheduling).

PDSERVE_STEP_PROFILE=1 logs (DEBUG) where each synchronous step's time went on a GPU:
the host's time to queue the forward, the device's time from the step's start to the
forward's end, and the whole step (its tokens read back).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from pdserve.engine.attention import get_attention_backend
from pdserve.engine.attention.base import AttentionMetadata, table_width
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.kvcache.pool import KVCachePool, KVCacheSpec, torch_dtype
from pdserve.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from pdserve.engine.piecewise import PiecewiseGraphs
from pdserve.engine.model.llama import LlamaForCausalLM
from pdserve.engine.sampling import make_generator, sample, sample_tokens
from pdserve.engine.scheduler.scheduler import ScheduledRequest

log = logging.getLogger(__name__)


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


class StepProfile:
    """Host and device timings of one step (PDSERVE_STEP_PROFILE=1, CUDA only)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.begin = time.perf_counter()
        self.begin_monotonic = time.monotonic()  # the hop traces' clock
        self.launched = 0.0
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        self.events[0].record()

    def mark_launched(self) -> None:
        self.launched = time.perf_counter()
        self.events[1].record()

    def report(self) -> None:
        """After the step's tokens were read back (so both events have completed)."""
        done = time.perf_counter()
        log.debug("step profile: %d tokens, host queued the forward in %.3f ms, device "
                  "reached its end at %.3f ms, step %.3f ms (began at %.3f)", self.tokens,
                  1000 * (self.launched - self.begin),
                  self.events[0].elapsed_time(self.events[1]), 1000 * (done - self.begin),
                  1000 * self.begin_monotonic)


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
        self.graphs = self.prefill_graphs = self.piecewise = None
        self.parts_first = False
        if config.cuda_graphs and self.device.type == "cuda":
            self._make_graphs(config, max_model_len)
        else:
            self.backend = get_attention_backend(config.attention_backend,
                                                 **self._backend_options(config))
        self._generators: dict[str, torch.Generator] = {}
        self.eos_ids = tuple(model_config.eos_token_ids)  # masked before min_tokens
        # auto: where a decode step is queued without a host sync (CUDA graphs)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.graphs is not None)
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self.profile_steps = (self.device.type == "cuda"
                              and os.environ.get("PDSERVE_STEP_PROFILE") == "1")
        self._profile: StepProfile | None = None

    def _make_graphs(self, config: EngineConfig, max_model_len: int) -> None:
        if config.attention_backend != "triton":
            raise ValueError("cuda_graphs needs attention_backend='triton'")
        # decode launch shapes then depend on the batch size alone (graph-safe)
        self.backend = get_attention_backend("triton", graph_max_seq_len=max_model_len,
                                             **self._backend_options(config))
        self.graphs = DecodeGraphs(self.model, self.pool, self.backend, config.max_num_seqs,
                                   max_model_len, config.block_size, self.device)
        graph_tokens = min(config.prefill_graph_max_tokens, config.max_num_batched_tokens)
        if config.prefill_graph_max_tokens > 1:
            self.prefill_graphs = PrefillGraphs(
                self.model, self.pool, self.backend, graph_tokens,
                max_model_len, config.block_size, self.device, self.graphs.memory_pool)
        mode = config.mixed_step_graphs
        self.parts_first = mode == "parts" or (
            mode == "auto" and layer_weight_bytes(self.model) < PIECEWISE_MIN_LAYER_BYTES)
        if mode in ("auto", "piecewise") and self.model.fused_elementwise:
            self.piecewise = PiecewiseGraphs(self.model, self.pool, self.backend, graph_tokens,
                                             self.device, self.graphs.memory_pool)

    def capture_graphs(self) -> int:
        """Capture every CUDA graph now (compiling the kernels they use); returns how
        many exist. Without it each size is captured the first time a step needs it."""
        for graphs in (self.graphs, self.prefill_graphs, self.piecewise):
            if graphs is not None:
                graphs.capture_all()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        count = sum(len(g.graphs) for g in (self.graphs, self.prefill_graphs) if g is not None)
        return count + (sum(map(len, self.piecewise.pieces.values())) if self.piecewise else 0)

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
        return step_inputs(scheduled, self.config.block_size, device or self.device)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> list[int | None]:
        """Run the step; returns the sampled token per scheduled request (None mid-prompt)."""
        if not self.profile_steps:
            return self._execute(scheduled)
        self._profile = StepProfile(sum(s.num_new_tokens for s in scheduled))
        tokens = self._execute(scheduled)
        torch.cuda.current_stream(self.device).synchronize()  # mid-prompt chunks read nothing
        self._profile.report()
        self._profile = None
        return tokens

    def _execute(self, scheduled: list[ScheduledRequest]) -> list[int | None]:
        self._own_threads()
        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        if self._graphable(scheduled, len(sampling)):
            # host tensors: the graph's static device buffers take them in one copy each
            ids, pos, meta, _ = self.build_batch(scheduled, torch.device("cpu"))
            logits = self.graphs.run(ids, pos, meta.slot_mapping, meta.seq_lens, meta.block_tables)
            self._mark_launched()
            return self._sample(scheduled, sampling, logits)
        if self._prefill_graphable(scheduled):
            ids, pos, meta, _ = self.build_batch(scheduled, torch.device("cpu"))
            logits = self.prefill_graphs.run(ids, pos, meta.slot_mapping, meta.seq_lens_cpu[0],
                                             meta.block_tables)
            self._mark_launched()
            return self._sample(scheduled, sampling, logits) if sampling else [None]
        parts = self._replayable_in_parts(scheduled)
        if parts and self.parts_first:
            return self._execute_in_parts(scheduled, sampling)
        if self._piecewise_fits(scheduled):
            return self._execute_piecewise(scheduled, sampling)
        if parts:
            return self._execute_in_parts(scheduled, sampling)
        rows = _decode_rows_first(scheduled) if self.backend.splits_mixed_batches else None
        if rows is not None:  # the backend runs a mixed step's decode rows apart
            tokens = self._execute_eager([scheduled[i] for i in rows])
            result: list[int | None] = [None] * len(scheduled)
            for token, i in zip(tokens, rows):
                result[i] = token
            return result
        return self._execute_eager(scheduled)

    def _execute_eager(self, scheduled: list[ScheduledRequest]) -> list[int | None]:
        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        ids, pos, meta, starts = self.build_batch(scheduled)
        hidden = self.model(ids, pos, self.pool, self.backend, meta)
        self._mark_launched()
        if not sampling:
            return [None] * len(scheduled)
        if len(sampling) == len(scheduled) and meta.is_decode_only:
            last = hidden  # one row per request, all of them sample
        else:
            # a non-blocking index: the host queues the logits and sampling behind the
            # forward instead of waiting for it here
            last = hidden[_index([starts[i + 1] - 1 for i in sampling], self.device)]
        return self._sample(scheduled, sampling, self.model.compute_logits(last))

    def _mark_launched(self) -> None:
        if self._profile is not None:
            self._profile.mark_launched()

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
                                           [self.generator_for(r) for r in reqs],
                                           [r.suppressed_ids(self.eos_ids) for r in reqs]))

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

    def _piecewise_fits(self, scheduled: list[ScheduledRequest]) -> bool:
        """Any other step of up to the largest piecewise size: one pass over the weights."""
        return (self.piecewise is not None and self.piecewise.padded_size(
            sum(s.num_new_tokens for s in scheduled)) is not None)

    def _execute_piecewise(self, scheduled: list[ScheduledRequest],
                           sampling: list[int]) -> list[int | None]:
        # the backend attends a mixed step's decode rows apart when they come first
        order = _decode_rows_first(scheduled) or list(range(len(scheduled)))
        ids, pos, meta, starts = self.build_batch([scheduled[i] for i in order])
        place = {original: j for j, original in enumerate(order)}
        rows = _index([starts[place[i] + 1] - 1 for i in sampling], self.device)
        logits = self.piecewise.run(ids, pos, meta, rows)
        self._mark_launched()
        return self._sample(scheduled, sampling, logits) if sampling else [None] * len(scheduled)

    def _replayable_in_parts(self, scheduled: list[ScheduledRequest]) -> bool:
        """A mixed step small enough that queueing it eagerly would leave the device waiting
        on the host: its decode rows replay one decode graph and each prompt chunk a prefill
        graph (H200, Llama-3-8B shapes: eager 1k-token mixed steps took the host ~25 ms to
        queue, for ~25 ms of device work). Each replay reads the weights once, so steps with
        many chunks or many prompt tokens (device-bound anyway) stay eager."""
        if self.prefill_graphs is None or self.config.mixed_step_graphs == "eager":
            return False
        chunks = [s.num_new_tokens for s in scheduled if not _is_decode_row(s)]
        decode_rows = len(scheduled) - len(chunks)
        return (0 < len(chunks) <= MAX_REPLAYED_CHUNKS
                and sum(chunks) <= self.prefill_graphs.sizes[-1]
                and (decode_rows == 0 or self.graphs.padded_size(decode_rows) is not None))

    def _execute_in_parts(self, scheduled: list[ScheduledRequest],
                          sampling: list[int]) -> list[int | None]:
        cpu = torch.device("cpu")
        logits_of: dict[int, torch.Tensor] = {}  # scheduled row -> [1, vocab] fp32
        decode = [i for i, s in enumerate(scheduled) if _is_decode_row(s)]
        if decode:
            ids, pos, meta, _ = self.build_batch([scheduled[i] for i in decode], cpu)
            # the graphs share one memory pool: a later replay may reuse this output's memory
            out = self.graphs.run(ids, pos, meta.slot_mapping, meta.seq_lens,
                                  meta.block_tables).clone()
            logits_of.update((i, out[j:j + 1]) for j, i in enumerate(decode))
        for i, s in enumerate(scheduled):
            if not _is_decode_row(s):
                ids, pos, meta, _ = self.build_batch([s], cpu)
                out = self.prefill_graphs.run(ids, pos, meta.slot_mapping, meta.seq_lens_cpu[0],
                                              meta.block_tables)
                if s.samples:
                    logits_of[i] = out.clone()
        self._mark_launched()
        if not sampling:
            return [None] * len(scheduled)
        return self._sample(scheduled, sampling, torch.cat([logits_of[i] for i in sampling]))

    def _sample(self, scheduled, sampling: list[int], logits: torch.Tensor) -> list[int | None]:
        # logits: [len(sampling), vocab] fp32
        result: list[int | None] = [None] * len(scheduled)
        reqs = [scheduled[i].request for i in sampling]
        tokens = sample(logits, [r.params for r in reqs], [self.generator_for(r) for r in reqs],
                        [r.suppressed_ids(self.eos_ids) for r in reqs])
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


# a prompt chunk this long builds its positions and slots with tensor ops (~50 us on the
# host) instead of Python lists (~250 us at 2k tokens): the step's host time is what a
# lone prompt's TTFT waits on, and what other threads' GIL use stretches
TENSOR_CHUNK_MIN_TOKENS = 256


# Prompt chunks of one mixed step replayed as separate prefill graphs, at most
MAX_REPLAYED_CHUNKS = 4

# mixed_step_graphs="auto": a piecewise step queues one eager attention per layer (host
# time: 0.3-0.5 ms a layer measured on an H100, store_kv, the decode and prefill kernels
# and a replay), replaying in parts reads every weight once more per part (a layer of L
# bytes: L / 3.3-4.8 TB/s). bench/results/mixed-steps-*-h100.json: SmolLM2 (6 MiB
# layers) runs a 16-64 decode-row + 128-1,024-token step in 2.6-4.7 ms in parts and
# 8.4-16 ms piecewise; Llama-3-8B (416 MiB) in 9.8-21 ms piecewise, 1.07-1.48x faster
# than parts up to 512 tokens.
PIECEWISE_MIN_LAYER_BYTES = 128 * 2**20


def layer_weight_bytes(model) -> int:
    """Bytes of one decoder layer's parameters (the first; all are alike)."""
    return sum(p.numel() * p.element_size() for p in model.layers[0].parameters())


def _decode_rows_first(scheduled: list[ScheduledRequest]) -> list[int] | None:
    """The rows of a mixed step reordered decode rows first (stable), or None when they
    already are (attention backends split a mixed batch at its last leading decode row)."""
    decode = [i for i, s in enumerate(scheduled) if _is_decode_row(s)]
    if not decode or len(decode) == len(scheduled) or decode[-1] == len(decode) - 1:
        return None
    return decode + [i for i, s in enumerate(scheduled) if not _is_decode_row(s)]


def _is_decode_row(s: ScheduledRequest) -> bool:
    """One new token that samples: a decode graph row (a prompt's last token included)."""
    return s.num_new_tokens == 1 and s.samples


def step_inputs(scheduled: list[ScheduledRequest], block_size: int, device: torch.device):
    """A step's flattened inputs (input ids, positions, attention metadata, query starts)
    as tensors on `device`."""
    bs = block_size
    input_ids, positions, slots = _Column(), _Column(), _Column()
    starts, seq_lens, query_lens, tables = [0], [], [], []
    for s in scheduled:
        r = s.request
        begin, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
        if s.num_new_tokens == 1:  # decode: skip slicing the whole token list
            n_prompt = len(r.prompt_ids)
            input_ids.add(r.prompt_ids[begin] if begin < n_prompt
                          else r.output_ids[begin - n_prompt])
            positions.add(begin)
            slots.add(r.block_ids[begin // bs] * bs + begin % bs)
        elif s.num_new_tokens >= TENSOR_CHUNK_MIN_TOKENS:
            for column, values in zip((input_ids, positions, slots),
                                      _chunk_tensors(r, begin, end, bs)):
                column.add_tensor(values)
        else:
            input_ids.extend(r.all_token_ids[begin:end])
            positions.extend(range(begin, end))
            slots.extend([r.block_ids[p // bs] * bs + p % bs for p in range(begin, end)])
        starts.append(starts[-1] + s.num_new_tokens)
        seq_lens.append(end)
        query_lens.append(s.num_new_tokens)
        tables.append(r.block_ids)
    width = table_width(max(len(t) for t in tables))
    table = [t + [0] * (width - len(t)) for t in tables]
    meta = AttentionMetadata(
        slot_mapping=slots.tensor(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(table, dtype=torch.int32, device=device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
    return input_ids.tensor(device), positions.tensor(device), meta, starts


class _Column:
    """One flattened int64 step input, from single values and list runs (decode rows,
    short chunks) and from whole tensors (long chunks), in order."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.values: list[int] = []

    def add(self, value: int) -> None:
        self.values.append(value)

    def extend(self, values) -> None:
        self.values.extend(values)

    def add_tensor(self, values: torch.Tensor) -> None:
        self._flush()
        self.pieces.append(values)

    def tensor(self, device: torch.device) -> torch.Tensor:
        if not self.pieces:
            return torch.tensor(self.values, dtype=torch.int64, device=device)
        self._flush()
        flat = self.pieces[0] if len(self.pieces) == 1 else torch.cat(self.pieces)
        return flat.to(device)

    def _flush(self) -> None:
        if self.values:
            self.pieces.append(torch.tensor(self.values, dtype=torch.int64))
            self.values = []


def _chunk_tensors(request, begin: int, end: int, block_size: int):
    """(input ids, positions, slots) of tokens begin..end of one request, on the host."""
    # positions, slots: [end - begin] int64
    positions = torch.arange(begin, end, dtype=torch.int64)
    first_block = begin // block_size
    blocks = torch.tensor(request.block_ids[first_block:(end - 1) // block_size + 1],
                          dtype=torch.int64)
    slots = blocks[positions // block_size - first_block] * block_size + positions % block_size
    n_prompt = len(request.prompt_ids)
    ids = request.prompt_ids[begin:end] if end <= n_prompt else request.all_token_ids[begin:end]
    return torch.tensor(ids, dtype=torch.int64), positions, slots


def _index(values, device: torch.device) -> torch.Tensor:
    # a small index list on the device, copied without waiting for queued work
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
