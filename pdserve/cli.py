"""The `pdserve` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pdserve.engine.config import MIXED_STEP_GRAPHS  # torch-free


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in name, .gguf file or HF folder")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: "
                   "cuda when a GPU is visible)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 | float16")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto (default): triton on CUDA, the torch reference on the CPU")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=0)
    p.add_argument("--kv-cache-gb", type=float, default=0.0,
                   help="KV pool size in GiB; 0 (default): 0.5 on the CPU, on CUDA what "
                        "--gpu-memory-utilization leaves after weights and activations")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory this worker may use (default 0.9)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests decoding together (default: 256 on CUDA, 64 on the CPU)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one step, i.e. the prefill chunk (default: 8192 on "
                        "CUDA, 512 on the CPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps and short prefills as CUDA graphs (default: on "
                        "with the triton backend on CUDA)")
    p.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                   help="on CUDA, run norms/rotary/SiLU as plain PyTorch ops instead of the "
                        "fused Triton kernels")
    p.add_argument("--prefill-graph-tokens", type=int, default=2048,
                   help="with --cuda-graphs, replay a captured graph for a step that computes "
                        "one chunk of one prompt of up to this many tokens (0: eager)")
    p.add_argument("--mixed-step-graphs", default="auto", choices=MIXED_STEP_GRAPHS,
                   help="with --cuda-graphs, steps that mix decode rows and prompt chunks: "
                        "piecewise graphs around eager attention (one pass over the "
                        "weights); a decode graph plus a prefill graph per chunk (parts); "
                        "eager; or auto (the default): parts for models of small layers "
                        "(under 128 MiB), piecewise otherwise")
    p.add_argument("--cpu-blas", default="numpy", choices=["numpy", "torch"],
                   help="CPU fp32 matmuls: numpy's OpenBLAS (default; torch's own ops then "
                        "run on one thread) or torch's MKL")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_const",
                   const=False, default=None,
                   help="read each decode step's tokens before scheduling the next (by "
                        "default, with --cuda-graphs, the next step is queued first)")


def _engine_config(args, **extra):
    from pdserve.engine.config import EngineConfig

    from pdserve.engine.config import pin_device, resolve_device

    device = pin_device(resolve_device(args.device))
    on_gpu = device.startswith("cuda")
    backend = args.attention_backend if args.attention_backend != "auto" else \
        ("triton" if on_gpu else "torch")
    graphs = args.cuda_graphs if args.cuda_graphs is not None else \
        (on_gpu and backend == "triton")
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    return EngineConfig(device=device, dtype=dtype, attention_backend=backend,
                        block_size=args.block_size, num_blocks=args.num_blocks,
                        kv_cache_memory_gb=args.kv_cache_gb,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        max_num_seqs=args.max_num_seqs or (256 if on_gpu else 64),
                        max_num_batched_tokens=args.max_batch_tokens or (8192 if on_gpu else 512),
                        cuda_graphs=graphs, fused_kernels=args.fused_kernels,
                        async_scheduling=args.async_scheduling,
                        prefill_graph_max_tokens=args.prefill_graph_tokens,
                        mixed_step_graphs=args.mixed_step_graphs,
                        cpu_blas=args.cpu_blas, **extra)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="plain text prompt")
    src.add_argument("--chat", help="one user message, formatted by the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=0, desc="loading model", unit="tensor", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def cmd_models(args) -> int:
    if args.architectures:
        return _print_architectures()
    from pdserve.engine.loader import list_models

    models = list_models()
    for m in models:
        print(f"{m.name}\t{m.format}\t{m.path}")
    if not models:
        print("no models found (make setup installs the bundled one)", file=sys.stderr)
    return 0


def _print_architectures() -> int:
    """Model families pdserve computes exactly (safetensors folders; GGUF where named)."""
    from pdserve.engine.loader.hf_loader import SUPPORTED

    print("architecture\tgguf\tvariants")
    for hf_class, gguf_arch, variants in SUPPORTED:
        print(f"{hf_class}\t{gguf_arch or '-'}\t{variants}")
    return 0


def cmd_generate(args) -> int:
    from pdserve.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    if args.router:
        from pdserve.client import generate_remote

        return generate_remote(args, params)
    return _generate_local(args, params)


def _generate_local(args, params) -> int:
    from pdserve.engine.engine import LLMEngine

    engine = LLMEngine(_engine_config(args), args.model,
                       progress=_progress_bar(not args.json and sys.stderr.isatty()))
    if args.chat is not None:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.chat}])
    else:
        ids = engine.tokenizer.encode(args.prompt)
    request_id = engine.add_request(ids, params)
    text, tokens, last = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            text.append(out.text_delta)
            if not args.json:
                print(out.text_delta, end="", flush=True)
            last = out
    return _report(args, request_id, "".join(text), tokens, last.finish_reason, last.ttft_s,
                   last.itl_s, len(ids), last.num_cached_tokens)


def _report(args, request_id, text, tokens, finish_reason, ttft_s, itl_s, prompt_tokens,
            cached_tokens) -> int:
    if not args.json:
        print()
        return 0
    itl_ms = [round(x * 1000, 3) for x in itl_s]
    print(json.dumps({
        "request_id": request_id, "text": text, "token_ids": tokens,
        "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens, "ttft_ms": round((ttft_s or 0) * 1000, 3),
        "itl_ms": itl_ms,
        "itl_ms_mean": round(sum(itl_ms) / len(itl_ms), 3) if itl_ms else None,
    }))
    return 0


def _internal_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--internal-tls-cert", default=None,
                   help="PEM certificate for traffic between pdserve services")
    p.add_argument("--internal-tls-key", default=None, help="PEM key of --internal-tls-cert")
    p.add_argument("--internal-tls-ca", default=None,
                   help="PEM CA for services' certificates: peers must present one (mTLS)")
    p.add_argument("--internal-tls-server-name", default=None,
                   help="name to check peers' certificates against (peers dialed by IP)")
    _internal_token_arg(p)


def _internal_token_arg(p: argparse.ArgumentParser,
                        default: str = "env PDSERVE_INTERNAL_TOKEN") -> None:
    p.add_argument("--internal-token-file", default=None, metavar="PATH",
                   help="file holding the cluster's shared internal secret: workers accept "
                        f"only callers that have it (default: {default})")


def _internal_auth(args):
    from pdserve.services.auth import InternalAuth

    return InternalAuth.from_env(args.internal_token_file)


def _internal_tls(args):
    from pdserve.services.common import InternalTls

    return InternalTls(args.internal_tls_cert, args.internal_tls_key, args.internal_tls_ca,
                       args.internal_tls_server_name)


def _worker_settings(args, role: str):
    from pdserve.services.worker import WorkerSettings

    extra = {"allocate_whole_prompt": True} if role == "prefill" else {}
    kw = dict(role=role, model=args.model, host=args.host, port=args.port,
              metrics_port=args.metrics_port, connector=args.connector, kv_host=args.kv_host,
              kv_port=args.kv_port, redis_url=args.redis_url, kv_lease_s=args.kv_lease_s,
              fallback=args.fallback, engine=_engine_config(args, **extra),
              tls=_internal_tls(args), health_port=args.health_port,
              internal_auth=_internal_auth(args))
    if args.worker_id:
        kw["worker_id"] = args.worker_id
    return WorkerSettings(**kw)


def cmd_worker(args) -> int:
    from pdserve.services.serve import run, serve_until_signal, start_worker

    settings = _worker_settings(args, args.command)
    return run(serve_until_signal(lambda: start_worker(settings)))


def _router_settings(args):
    from pdserve.services.router.service import RouterSettings

    return RouterSettings(
        model=args.model, host=args.host, port=args.port, http_port=args.http_port,
        config_path=args.config, prefill=tuple(args.prefill), decode=tuple(args.decode),
        block_size=args.block_size, api_key=os.environ.get("PDSERVE_API_KEY") or args.api_key,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        health_port=args.health_port, discovery=args.discovery, namespace=args.namespace,
        selector=args.selector, worker_tls=_internal_tls(args),
        internal_auth=_internal_auth(args),
        early_prefill_start=args.early_prefill_start)


def cmd_router(args) -> int:
    from pdserve.services.serve import run, serve_until_signal, start_router

    settings = _router_settings(args)
    return run(serve_until_signal(lambda: start_router(settings)))


def cmd_up(args) -> int:
    from pdserve.services.launcher import run_up

    return run_up(args)


def cmd_demo(args) -> int:
    from pdserve.services.launcher import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    from pdserve.bench.loadgen import run_cli

    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list available models")
    m.add_argument("--architectures", action="store_true",
                   help="list the supported model architectures and variants instead")
    m.set_defaults(func=cmd_models)

    g = sub.add_parser("generate", help="generate text locally or through a router")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the engine in this process")
    where.add_argument("--router", metavar="ADDR", help="host:port of a pdserve router")
    g.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"))
    g.add_argument("--tls-ca", default=None, help="PEM CA that signed the router's certificate "
                   "(connect over TLS)")
    g.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    for role in ("prefill", "decode"):
        w = sub.add_parser(role, help=f"run a {role} worker")
        _engine_args(w)
        w.add_argument("--host", default="127.0.0.1")
        w.add_argument("--port", type=int, default=0)
        w.add_argument("--metrics-port", type=int, default=0)
        w.add_argument("--connector", default="ucx", choices=["ucx", "redis", "local"])
        w.add_argument("--kv-host", default="127.0.0.1", help="address the KV receiver binds")
        w.add_argument("--kv-port", type=int, default=0,
                       help="ucx: KV side channel (handshake) port; in-place chunk control "
                            "uses PORT+1, UCX's data transport one of PORT+2..PORT+17 "
                            "(0 = any free)")
        w.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
        w.add_argument("--kv-lease-s", type=float, default=30.0)
        w.add_argument("--fallback", default="recompute", choices=["recompute", "fail"])
        w.add_argument("--worker-id", default=None)
        w.add_argument("--health-port", type=int, default=0,
                       help="plaintext gRPC health on this port (probes, with internal TLS)")
        _internal_tls_args(w)
        w.set_defaults(func=cmd_worker)

    r = sub.add_parser("router", help="run the router (public gRPC + OpenAI HTTP)")
    r.add_argument("--model", default=None)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=50051)
    r.add_argument("--http-port", type=int, default=0)
    r.add_argument("--config", default=None, help="router policy YAML (hot-reloaded)")
    r.add_argument("--prefill", action="append", default=[], metavar="ADDR")
    r.add_argument("--decode", action="append", default=[], metavar="ADDR")
    r.add_argument("--discovery", default=None, choices=["static", "k8s", "kubernetes"],
                   help="worker discovery backend (default: the config file's discovery; "
                        "--prefill/--decode mean static)")
    r.add_argument("--namespace", default=None,
                   help="k8s discovery: namespace to watch (default: the config file's, else "
                        "the router pod's own)")
    r.add_argument("--selector", default=None,
                   help="k8s discovery: label selector shared by both roles (overrides the "
                        "config file's)")
    r.add_argument("--block-size", type=int, default=16)
    r.add_argument("--early-prefill-start", action=argparse.BooleanOptionalAction,
                   default=True, help="start the prefill worker's compute alongside the "
                   "decode worker's block reservation (the decode worker then attaches "
                   "its KV destination)")
    r.add_argument("--api-key", default=None, help="clients must send it (env PDSERVE_API_KEY wins)")
    r.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC and HTTP over TLS")
    r.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    r.add_argument("--tls-ca", default=None, help="PEM CA: require client certificates (mTLS)")
    r.add_argument("--health-port", type=int, default=0,
                   help="also serve plaintext gRPC health checks on this port (0 = off)")
    _internal_tls_args(r)
    r.set_defaults(func=cmd_router)

    u = sub.add_parser("up", help="router + prefill + decode (+ Valkey) on this machine")
    _up_args(u)
    u.set_defaults(func=cmd_up)

    d = sub.add_parser("demo", help="bring the system up, stream one chat answer, stop")
    _up_args(d)
    d.add_argument("--chat", default="What is the capital of France? Answer in one sentence.")
    d.add_argument("--max-tokens", type=int, default=64)
    d.set_defaults(func=cmd_demo)

    from pdserve.bench.loadgen import add_arguments as _bench_args  # stdlib-only import

    b = sub.add_parser("bench", help="load-test a router (gRPC) or any OpenAI-compatible server "
                       "(--openai URL): TTFT/TPOT/ITL/E2E, throughput, goodput")
    _bench_args(b)
    b.set_defaults(func=cmd_bench)
    return p


def _up_args(u: argparse.ArgumentParser) -> None:
    u.add_argument("--connector", default="ucx", choices=["ucx", "redis", "local"])
    u.add_argument("--prefill", type=int, default=1)
    u.add_argument("--decode", type=int, default=1)
    u.add_argument("--model", default=None)
    u.add_argument("--port", type=int, default=50051)
    u.add_argument("--http-port", type=int, default=8000)
    u.add_argument("--config", default=None)
    u.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda when "
                   "a GPU is visible; every worker shares its memory equally)")
    u.add_argument("--api-key", default=None,
                   help="clients of the router must send it (env PDSERVE_API_KEY wins)")
    u.add_argument("--gpus", default=None, metavar="LIST",
                   help="one GPU per worker, round-robin over prefill then decode workers "
                   "(e.g. 0,1,2,3; relative to CUDA_VISIBLE_DEVICES); workers that share a "
                   "GPU split its memory")
    u.add_argument("--prefill-gpus", default=None, metavar="LIST",
                   help="GPUs of the prefill workers (round-robin; overrides --gpus for them)")
    u.add_argument("--decode-gpus", default=None, metavar="LIST",
                   help="GPUs of the decode workers (round-robin; overrides --gpus for them)")
    _internal_token_arg(u, "env PDSERVE_INTERNAL_TOKEN, else a fresh one")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear message for expected failures, no traceback
        from pdserve.engine.loader import ModelNotFound
        from pdserve.engine.sampling import InvalidRequest

        if isinstance(exc, (InvalidRequest, ModelNotFound, ValueError)):
            print(f"pdserve: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
