"""The router's OpenAI-compatible HTTP API against one real system (router + prefill +
decode processes, ucx connector): the official `openai` client, raw SSE framing, the
error shape and status codes, usage parity with the gRPC API, and a client disconnect
mid-stream that must give the decode worker's KV blocks back."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import openai
import pytest

from pdserve.client import stream as grpc_stream
from pdserve.services.launcher import Cluster, ClusterSpec
from pdserve.wire import generate_pb2, worker_pb2, worker_pb2_grpc
from tests.support.cluster import worker_channel

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class System:
    cluster: Cluster
    router: str  # gRPC address
    base: str    # http://host:port

    @property
    def decode_address(self) -> str:
        return self.cluster.proc("decode-0").address


def wait_until(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    port = free_port()
    spec = ClusterSpec(connector="ucx", http_port=port,
                       log_dir=str(tmp_path_factory.mktemp("openai-http-logs")))
    with Cluster(spec) as cluster:
        router = cluster.start()
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(base), 60, "/health to report a healthy decode worker")
        yield System(cluster, router, base)


@pytest.fixture(scope="module")
def client(system):
    return openai.OpenAI(base_url=f"{system.base}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def http(system):
    with httpx.Client(base_url=system.base, timeout=120) as c:
        yield c


def sse_events(response: httpx.Response) -> list[str]:
    """Raw SSE payloads; asserts the `data: ...\\n\\n` framing of every event."""
    raw = response.read().decode()
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def decode_stats(system: System) -> worker_pb2.WorkerStats:
    with worker_channel(system.decode_address, system.cluster.internal_token) as ch:
        return worker_pb2_grpc.DecodeServiceStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)


def kv_all_free(system: System) -> bool:
    s = decode_stats(system)
    return (s.num_requests_running == 0 and s.num_requests_waiting == 0
            and s.num_free_blocks == s.num_total_blocks and s.kv_cache_usage_perc == 0)


# ---- the official client ----------------------------------------------------------------
def test_models_list(client, system):
    models = client.models.list().data
    assert len(models) == 1 and models[0].owned_by == "pdserve"
    assert models[0].id and models[0].object == "model"


def test_chat_stream_matches_non_stream(client):
    args = dict(model="", messages=QUESTION, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**args)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finishes == [choice.finish_reason]
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == \
        (full.usage.prompt_tokens, full.usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_completions_with_text_and_token_prompts(client):
    out = client.completions.create(model="", prompt="The capital of France is", max_tokens=6,
                                    temperature=0, stop=["\n\n"])
    assert out.object == "text_completion" and out.choices[0].text
    assert out.usage.completion_tokens <= 6 and out.usage.prompt_tokens > 0
    ids = [504, 3575, 282, 4649, 314]
    by_ids = client.completions.create(model="", prompt=ids, max_tokens=4, temperature=0,
                                       extra_body={"top_k": 1, "ignore_eos": True})
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.usage.completion_tokens == 4
    assert by_ids.choices[0].finish_reason == "length"


def test_usage_matches_grpc(client, system):
    http_out = client.chat.completions.create(model="", messages=QUESTION, max_tokens=10,
                                              temperature=0, seed=7)
    request = generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(max_tokens=10, temperature=0, seed=7))
    request.chat.messages.extend(generate_pb2.ChatMessage(**m) for m in QUESTION)
    request.chat.add_generation_prompt = True
    chunks = list(grpc_stream(system.router, request, timeout=120))
    last = chunks[-1]
    assert "".join(c.text_delta for c in chunks) == http_out.choices[0].message.content
    assert http_out.usage.prompt_tokens == last.usage.prompt_tokens
    assert http_out.usage.completion_tokens == last.usage.completion_tokens


# ---- raw HTTP ----------------------------------------------------------------------------
def test_sse_framing_and_done(http):
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert all(o["object"] == "text_completion" for o in objs)
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] >= 1
    assert [o["choices"][0]["finish_reason"] for o in objs[:-1]][-1] in ("stop", "length")


def test_health_and_metrics(http):
    assert http.get("/health").json() == {"status": "ok"}
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "time_to_first_token_seconds" in metrics.text


CHAT = "/v1/chat/completions"
MSG = {"messages": QUESTION, "max_tokens": 4}
BAD_REQUESTS = {
    "bad json": (CHAT, b'{"messages": [', 400, None),
    "missing messages": (CHAT, {"max_tokens": 4}, 400, "messages"),
    "temperature -1": (CHAT, {**MSG, "temperature": -1}, 400, "temperature"),
    "top_p 0": (CHAT, {**MSG, "top_p": 0}, 400, "top_p"),
    "max_tokens 0": (CHAT, {**MSG, "max_tokens": 0}, 400, "max_tokens"),
    "n 2": (CHAT, {**MSG, "n": 2}, 400, "n"),
    "unknown model": (CHAT, {**MSG, "model": "no-such-model"}, 404, "model"),
    "prompt too long": ("/v1/completions", {"prompt": [42] * 9000, "max_tokens": 1}, 400, None),
    "unknown route": ("/v1/embeddings", {"input": "x"}, 404, None),
}


def post(http: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, json=body)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_error_shape(http, case):
    path, body, status, param = BAD_REQUESTS[case]
    r = post(http, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    assert err["type"] in ("invalid_request_error", "not_found_error")
    if param:
        assert err["param"] == param
    if case == "unknown model":
        assert err["code"] == "model_not_found"


def test_bad_requests_do_not_disturb_a_good_one(http, client):
    args = dict(model="", messages=QUESTION, max_tokens=16, temperature=0)
    expected = client.chat.completions.create(**args).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        good = pool.submit(lambda: list(client.chat.completions.create(**args, stream=True)))
        bad = [pool.submit(post, http, path, body) for path, body, _, _ in BAD_REQUESTS.values()]
        statuses = [f.result().status_code for f in bad]
        chunks = good.result(timeout=120)
    assert all(s >= 400 for s in statuses)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_disconnect_mid_stream_frees_kv(http, client, system):
    wait_until(lambda: kv_all_free(system), 10, "an idle decode worker")
    body = {"messages": QUESTION, "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        contents = 0
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                contents += 1
                if contents == 3:
                    break
        assert decode_stats(system).num_requests_running == 1
    # the response is closed: the connection is gone, the generation must be cancelled
    # long before 4000 tokens could have been produced
    wait_until(lambda: kv_all_free(system), 15, "the decode worker to free the KV blocks")
    out = client.chat.completions.create(model="", messages=QUESTION, max_tokens=3)
    assert out.usage.completion_tokens >= 1
