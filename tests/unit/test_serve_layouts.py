"""bench/serve_gpu.py's several-GPU layouts (what each --systems entry starts, the
commands and cluster specs built for it) and bench/pd_proxy.py, the proxy in front of
vLLM's NixlConnector P/D: its request rewriting, and its relay between real HTTP servers
that answer as vLLM's prefill and decode servers do."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path

import pytest

from tests.support.bench_scripts import load_bench_script

serve_gpu = load_bench_script("serve_gpu")
pd_proxy = load_bench_script("pd_proxy")


def args_for(*argv):
    return serve_gpu.parse_args(["--vllm-python", "/opt/py", *argv])


# ---- layouts -------------------------------------------------------------------------------
def test_systems_parse_to_layouts():
    L = serve_gpu.parse_system
    x = L("pdserve-xpyd:1p3d")
    assert (x.kind, x.prefill, x.decode, x.mode, x.gpus) == ("pdserve", 1, 3, "always", 4)
    r = L("pdserve-replicas:4")
    assert (r.kind, r.prefill, r.decode, r.mode, r.gpus) == ("pdserve", 0, 4, "never", 4)
    d = L("vllm-dp:2")
    assert (d.kind, d.data_parallel, d.gpus) == ("vllm", 2, 2)
    assert L("vllm-nixl-1p1d") == serve_gpu.Layout("vllm-nixl-1p1d", "vllm-nixl", 1, 1,
                                                    placed=True)
    n = L("vllm-nixl:3p1d")
    assert (n.prefill, n.decode, n.gpus) == (3, 1, 4)
    # the one-GPU systems keep their meaning and share one GPU
    assert (L("pdserve-1p1d").gpus, L("pdserve-1p1d").placed, L("vllm").gpus) == (1, False, 1)
    assert L("pdserve-colocated").mode == "never"


@pytest.mark.parametrize("bad", ["pdserve-xpyd", "pdserve-xpyd:0p2d", "pdserve-xpyd:2",
                                 "pdserve-replicas:0", "vllm-dp:x", "vllm-nixl:1p", "tgi:2"])
def test_bad_systems_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="system|unknown"):
        serve_gpu.parse_system(bad)
    with pytest.raises(SystemExit):
        serve_gpu.parse_args(["--systems", f"vllm,{bad}"])


def test_issue_systems_are_accepted_together():
    args = serve_gpu.parse_args(["--systems", "pdserve-xpyd:1p3d,pdserve-replicas:4,"
                                 "vllm-dp:2,vllm-nixl-1p1d"])
    assert len(args.system_list) == 4


def test_pdserve_layouts_place_one_worker_per_gpu_behind_a_least_loaded_router(tmp_path):
    import yaml

    from pdserve.services.placement import plan_workers
    from pdserve.services.router.config import RouterConfig

    args = args_for("--device", "cuda", "--pdserve-worker-args", "--max-num-seqs 64")
    for system, mode, gpus in (("pdserve-xpyd:1p3d", "always", (0, 1, 2, 3)),
                               ("pdserve-replicas:4", "never", (0, 1, 2, 3)),
                               ("pdserve-1p1d", "always", ())):
        layout = serve_gpu.parse_system(system)
        spec = serve_gpu.pdserve_spec(args, layout, tmp_path, 8123)
        assert (spec.num_prefill, spec.num_decode, spec.gpus) == \
            (layout.prefill, layout.decode, gpus)
        assert spec.http_port == 8123 and spec.worker_args == ("--max-num-seqs", "64")
        config = RouterConfig.model_validate(yaml.safe_load(Path(spec.config).read_text()))
        assert config.mode == mode
        assert config.decode.policy == config.prefill.policy == "least_loaded"
        if gpus:  # what the launcher will do with it: each worker alone on its GPU
            plan = plan_workers(num_prefill=spec.num_prefill, num_decode=spec.num_decode,
                                gpus=spec.gpus, device=spec.device, device_count=4)
            assert sorted(p.gpu for p in plan) == ["0", "1", "2", "3"]


def test_vllm_dp_is_one_server_with_data_parallel_size(tmp_path):
    args = args_for("--vllm-args", "--max-model-len 8192")
    [one] = serve_gpu.vllm_commands(args, serve_gpu.parse_system("vllm"), tmp_path, [9001])
    assert "--data-parallel-size" not in one.argv and one.url == "http://127.0.0.1:9001"
    [dp] = serve_gpu.vllm_commands(args, serve_gpu.parse_system("vllm-dp:4"), tmp_path, [9001])
    i = dp.argv.index("--data-parallel-size")
    assert dp.argv[i + 1] == "4" and dp.argv[0] == "/opt/py"
    assert dp.argv[dp.argv.index("--model") + 1] == str(tmp_path)
    assert "--load-format" in dp.argv and "--max-model-len" in dp.argv and not dp.env


def test_vllm_nixl_servers_one_gpu_each_behind_the_proxy(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # indices are relative to ours
    layout = serve_gpu.parse_system("vllm-nixl:1p2d")
    cmds = serve_gpu.vllm_commands(args_for(), layout, tmp_path, [9001, 9002, 9003, 9100])
    assert [c.name for c in cmds] == ["vllm-prefill-0", "vllm-decode-0", "vllm-decode-1",
                                      "pd-proxy"]
    envs = [dict(c.env) for c in cmds[:3]]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "5", "6"]
    assert len({e["VLLM_NIXL_SIDE_CHANNEL_PORT"] for e in envs}) == 3
    for c in cmds[:3]:
        kv = json.loads(c.argv[c.argv.index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "NixlConnector" and kv["kv_role"] == "kv_both"
    proxy = cmds[-1].argv
    assert proxy[1].endswith("pd_proxy.py") and cmds[-1].url == "http://127.0.0.1:9100"
    settings = pd_proxy.parse_args(list(proxy[2:]))  # the proxy accepts what we build
    assert settings.prefill == ("http://127.0.0.1:9001",)
    assert settings.decode == ("http://127.0.0.1:9002", "http://127.0.0.1:9003")
    assert settings.port == 9100
    shlex.join(proxy)  # all strings


def test_layout_needing_more_gpus_than_here_is_skipped_not_started(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    args = args_for("--log-dir", str(tmp_path))
    record = serve_gpu.run_system(args, "pdserve-xpyd:1p3d", [], serve_gpu.Budget(0), None)
    assert record["status"] == "skipped: needs 4 GPUs, 1 here" and not record["runs"]


# ---- the proxy -----------------------------------------------------------------------------
def test_prefill_and_decode_bodies():
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 64, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    pre = pd_proxy.prefill_body(body)
    assert pre["max_tokens"] == 1 and pre["stream"] is False and "stream_options" not in pre
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    assert pre["prompt"] == [1, 2, 3] and body["max_tokens"] == 64  # the original untouched
    dec = pd_proxy.decode_body(body, {"kv_transfer_params": {"remote_block_ids": [7]}})
    assert dec["kv_transfer_params"] == {"remote_block_ids": [7]} and dec["stream"] is True
    with pytest.raises(ValueError, match="no kv_transfer_params"):
        pd_proxy.decode_body(body, {"choices": []})


def test_proxy_bad_arguments_exit_2(capsys):
    for argv in ([], ["--prefill", "http://a:1"], ["--prefill", "a:1", "--decode", "http://b:2"]):
        with pytest.raises(SystemExit) as exc:
            pd_proxy.parse_args(argv)
        assert exc.value.code == 2


async def _upstreams_and_proxy():
    """Two aiohttp servers answering as vLLM's NixlConnector prefill/decode servers (the
    decode one refuses a request without the prefill's kv_transfer_params) and the proxy
    in front, all on free ports; returns (proxy URL, seen requests, runners)."""
    from aiohttp import web

    seen = {"prefill": [], "decode": []}

    async def prefill(request):
        body = await request.json()
        seen["prefill"].append(body)
        return web.json_response({"choices": [{"text": "x"}],
                                  "kv_transfer_params": {"remote_block_ids": [1, 2],
                                                         "remote_engine_id": "p0"}})

    async def decode(request):
        body = await request.json()
        seen["decode"].append(body)
        if body.get("kv_transfer_params", {}).get("remote_engine_id") != "p0":
            return web.json_response({"error": "no kv"}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            await resp.write(f"data: {json.dumps({'choices': [{'text': str(i)}]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(request):
        return web.json_response({"data": [{"id": "llama3-8b"}]})

    runners = []

    async def serve(app) -> int:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return site._server.sockets[0].getsockname()[1]

    up_p, up_d = web.Application(), web.Application()
    up_p.router.add_post("/v1/completions", prefill)
    up_d.router.add_post("/v1/completions", decode)
    up_d.router.add_get("/v1/models", models)
    pp, dp = await serve(up_p), await serve(up_d)
    proxy = pd_proxy.make_app(pd_proxy.ProxySettings((f"http://127.0.0.1:{pp}",),
                                                     (f"http://127.0.0.1:{dp}",)))
    port = await serve(proxy)
    return f"http://127.0.0.1:{port}", seen, runners


def test_proxy_relays_prefill_then_decode_between_real_servers():
    import aiohttp

    async def main():
        url, seen, runners = await _upstreams_and_proxy()
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": "llama3-8b", "prompt": [5, 6], "max_tokens": 3, "stream": True}
                async with s.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    text = await r.text()
                async with s.get(url + "/v1/models") as r:
                    models = await r.json()
                async with s.post(url + "/v1/completions", data=b"{not json") as r:
                    bad = (r.status, await r.json())
        finally:
            for runner in runners:
                await runner.cleanup()
        return text, models, bad, seen

    text, models, bad, seen = asyncio.run(main())
    chunks = [json.loads(line[6:])["choices"][0]["text"] for line in text.splitlines()
              if line.startswith("data: {")]
    assert chunks == ["0", "1", "2"] and text.rstrip().endswith("[DONE]")
    assert seen["prefill"][0]["max_tokens"] == 1 and seen["prefill"][0]["stream"] is False
    assert seen["decode"][0]["max_tokens"] == 3
    assert models["data"][0]["id"] == "llama3-8b"
    assert bad[0] == 400 and bad[1]["error"]["type"] == "invalid_request_error"


def test_issue_slos_are_added_to_each_runs_goodput_rows():
    from dataclasses import asdict

    from pdserve.bench.loadgen import RequestResult, summarize

    slos = serve_gpu.parse_slos("1000/25,500/50")
    # 2 requests in 2 s: TTFT 0.8 s with TPOT 20 ms meets (1000, 25); TTFT 1.5 s does not
    reqs = [RequestResult(0, ok=True, ttft_s=0.8, e2e_s=0.8 + 9 * 0.020, output_tokens=10),
            RequestResult(1, ok=True, ttft_s=1.5, e2e_s=1.5 + 9 * 0.020, output_tokens=10)]
    result = {"summary": summarize(reqs, 2.0),
              "requests": [{**asdict(r), "tpot_s": r.tpot_s, "prefix_index": 0} for r in reqs]}
    before = len(result["summary"]["slo_attainment"])
    serve_gpu.add_slo_rows(result, slos)
    rows = {(r["ttft_ms"], r["tpot_ms"]): r for r in result["summary"]["slo_attainment"]}
    assert len(rows) == before + 1  # (500, 50) is a default row already
    assert rows[(1000.0, 25.0)]["good_requests"] == 1 and rows[(1000.0, 25.0)]["goodput"] == 0.5
    assert "requests" not in result
    with pytest.raises(ValueError, match="TTFT_MS/TPOT_MS"):
        serve_gpu.parse_slos("1000-25")
    with pytest.raises(SystemExit):
        serve_gpu.parse_args(["--slos", "fast"])
