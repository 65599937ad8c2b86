"""One mixed step (decode rows beside a prompt chunk, as under serving load) through the
model runner's three ways, same runner, same weights:
  piecewise  graphs between eager attentions, one pass over the weights (the default);
  parts      a decode graph for the decode rows plus a prefill graph for the chunk;
  eager      the model called directly (~10 launches per layer queued by the host).
Also the two parts alone (the decode rows' graph; the chunk's graph): what one weight pass
costs each. Random weights of a real shape, bf16, Triton backend, CUDA graphs. Wall time
per step (queued, run, sampled tokens read back), median of --repeats after warm-ups that
capture the graphs the step needs; and the time to capture every piecewise size (what a
worker's start-up adds).

    python bench/mixed_steps.py --shape llama3-8b --out bench/results/mixed-steps-h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from pdserve.bench.loadgen import git_commit
from pdserve.engine.config import EngineConfig
from pdserve.engine.model_runner import PIECEWISE_MIN_LAYER_BYTES, ModelRunner, layer_weight_bytes
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler.request import Request
from pdserve.engine.scheduler.scheduler import ScheduledRequest
from pdserve.engine.synthetic import SHAPES
from report import write_report

BLOCK = 16


def requests(num_decodes: int, context: int, chunk: int, vocab: int):
    """num_decodes sequences of `context` tokens decoding their next one, then one new
    prompt of `chunk` tokens; each owns its own blocks."""
    g = torch.Generator().manual_seed(0)
    out, next_block = [], 0
    for i in range(num_decodes + 1):
        decode = i < num_decodes
        length = context if decode else chunk
        r = Request(f"r{i}", torch.randint(10, vocab - 10, (length,), generator=g).tolist(),
                    SamplingParams(max_tokens=8, ignore_eos=True))
        total = length + 1 if decode else length
        blocks = -(-total // BLOCK)
        r.block_ids = list(range(next_block, next_block + blocks))
        next_block += blocks
        if decode:
            r.output_ids = [11]
            r.num_computed_tokens = length
        out.append(ScheduledRequest(r, 1 if decode else chunk))
    return out, next_block


def timed(runner: ModelRunner, scheduled, repeats: int) -> float:
    for _ in range(3):
        runner.execute(scheduled)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(scheduled)  # returns the sampled tokens: the step is done
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def modes(runner: ModelRunner, config: EngineConfig) -> dict:
    """mode -> a function that sets the runner up for it."""
    piecewise = runner.piecewise

    def set_mode(pieces, mixed):
        def apply():
            runner.piecewise = pieces
            runner.parts_first = mixed == "parts"
            runner.config = dataclasses.replace(config, mixed_step_graphs=mixed)
        return apply

    return {"piecewise": set_mode(piecewise, "piecewise"), "parts": set_mode(None, "parts"),
            "eager": set_mode(None, "eager")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--decodes", default="16,64")
    p.add_argument("--chunks", default="128,512,1024")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = SHAPES[args.shape]
    decodes = [int(x) for x in args.decodes.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    _, blocks = requests(max(decodes), args.context, max(chunks), model.vocab_size)
    config = EngineConfig(device="cuda", dtype="bfloat16", attention_backend="triton",
                          cuda_graphs=True, max_num_seqs=256, max_num_batched_tokens=8192,
                          mixed_step_graphs="piecewise")
    runner = ModelRunner(model, config, {}, num_blocks=blocks + 1, max_model_len=8192)
    set_modes = modes(runner, config)
    start = time.perf_counter()
    runner.piecewise.capture_all()  # what a worker's start-up adds for them
    torch.cuda.synchronize()
    capture = {"piecewise_capture_s": round(time.perf_counter() - start, 2),
               "piecewise_graphs": sum(map(len, runner.piecewise.pieces.values())),
               "piecewise_sizes": runner.piecewise.sizes,
               "layer_weight_mib": layer_weight_bytes(runner.model) // 2**20,
               "auto_picks": "parts" if layer_weight_bytes(runner.model) <
               PIECEWISE_MIN_LAYER_BYTES else "piecewise"}
    print(json.dumps(capture), flush=True)
    rows = []
    for d in decodes:
        for c in chunks:
            scheduled, _ = requests(d, args.context, c, model.vocab_size)
            row = {"decode_rows": d, "context": args.context, "chunk": c}
            for mode, apply in set_modes.items():
                apply()
                row[f"{mode}_ms"] = round(timed(runner, scheduled, args.repeats), 3)
            set_modes["parts"]()
            row["decode_graph_alone_ms"] = round(timed(runner, scheduled[:-1], args.repeats), 3)
            row["chunk_graph_alone_ms"] = round(timed(runner, scheduled[-1:], args.repeats), 3)
            row["piecewise_vs_parts"] = round(row["parts_ms"] / row["piecewise_ms"], 3)
            row["piecewise_vs_eager"] = round(row["eager_ms"] / row["piecewise_ms"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"gpu": torch.cuda.get_device_name(), "shape": args.shape,
              "commit": git_commit(), "command": "python bench/mixed_steps.py " +
              " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                       if v is not None and k != "out"),
              "note": "wall ms per step, median; x_vs_y = y_ms / x_ms", **capture, "rows": rows}
    write_report(report, args.out, indent=1)


if __name__ == "__main__":
    main()
