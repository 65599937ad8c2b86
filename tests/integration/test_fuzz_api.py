"""Property-based fuzzing of the public APIs (issue 17) against ONE real system started
once for the module (router + prefill + decode processes on the bundled model):

  HTTP   chat and completions bodies mixing right and wrong JSON types, huge and
         negative numbers, Infinity/NaN, unicode, nested junk and unknown fields; raw
         byte bodies;
  gRPC   GenerateRequests with random SamplingParams and inputs; random request bytes.

Every answer must come within a deadline and be a success or a client error (no 5xx,
no UNKNOWN / INTERNAL / UNAVAILABLE / DEADLINE_EXCEEDED); afterwards the system still
serves normal requests, every KV pool is free and the router logged no traceback.

Generation stays short: a valid request can ask for at most a few tokens (max_tokens is
always sent, small or invalid), so the examples cost ~0.1-0.5 s each. derandomize=True
makes every run draw the same examples. The same system also checks min_tokens end to
end (HTTP, and gRPC on both routes)."""

from __future__ import annotations

import json
import math
import time

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pdserve.wire import generate_pb2, generate_pb2_grpc
from tests.support.cluster import http_cluster, wait_pools_free, worker_channel, worker_stats

pytestmark = pytest.mark.slow

VOCAB, CONTEXT, EOS = 49152, 8192, 2  # the bundled model's
DEADLINE_S = 60.0
HTTP_OK = {200, 400, 404, 413}
GRPC_OK = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE}


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with http_cluster(str(tmp_path_factory.mktemp("fuzz-logs"))) as (cluster, router, base):
        yield cluster, router, base


@pytest.fixture(scope="module")
def http(system):
    with httpx.Client(base_url=system[2], timeout=DEADLINE_S) as client:
        yield client


@pytest.fixture(scope="module")
def channel(system):
    with grpc.insecure_channel(system[1]) as ch:
        yield ch


# ---- JSON strategies ---------------------------------------------------------------------
huge_ints = st.one_of(st.integers(-(2**70), -1), st.integers(2**31 - 2, 2**70))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), huge_ints,
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
junk = st.recursive(json_scalars,
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=8), inner,
                                                            max_size=4)),
                    max_leaves=12)
token_ids = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1),
                      st.integers(VOCAB, 2**31 - 1), st.integers(-(2**31), -1), huge_ints)
# a valid max_tokens asks for very few tokens; the rest cannot generate at all
# (0, negative, past the context, wrong types); never absent (defaults are long)
max_tokens = st.one_of(st.integers(1, 3), st.integers(1, 3), st.just(0), huge_ints,
                       st.integers(CONTEXT + 1, 2**32 - 1),
                       st.floats(1, 3), st.text(max_size=3), st.booleans(),
                       st.lists(st.integers(1, 3), max_size=2))


def maybe(value_strategy):
    """Sometimes the right kind of value, sometimes junk."""
    return st.one_of(value_strategy, value_strategy, junk)


sampling_fields = {
    "temperature": maybe(st.floats(0, 2)), "top_p": maybe(st.floats(0.01, 1)),
    "top_k": maybe(st.integers(-1, 100)), "seed": maybe(st.integers(-(2**63), 2**64 - 1)),
    "min_tokens": maybe(st.integers(0, 3)),
    "stop": maybe(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3))),
    "stop_token_ids": maybe(st.lists(token_ids, max_size=3)),
    "ignore_eos": maybe(st.booleans()), "n": maybe(st.just(1)), "stream": st.booleans(),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "model": maybe(st.sampled_from(["", "smollm2-135m-instruct", "gpt-4"])),
    "logprobs": junk, "logit_bias": junk, "presence_penalty": junk, "best_of": junk,
    "user": junk, "session_id": maybe(st.text(max_size=10)),
}
extra_fields = st.dictionaries(st.text(max_size=10).filter(
    lambda k: k not in sampling_fields and k not in ("max_tokens", "max_completion_tokens",
                                                     "messages", "prompt")), junk, max_size=3)
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "user", "assistant", "developer", "tool"])),
     "content": maybe(st.one_of(
         st.text(max_size=40),
         st.lists(st.fixed_dictionaries({"type": maybe(st.just("text")),
                                         "text": maybe(st.text(max_size=20))}), max_size=2)))},
    optional={"name": junk})
chat_body = st.fixed_dictionaries(
    {"messages": maybe(st.lists(message, min_size=1, max_size=3)), "max_tokens": max_tokens},
    optional={"max_completion_tokens": max_tokens, **sampling_fields})
completion_body = st.fixed_dictionaries(
    {"prompt": maybe(st.one_of(st.text(max_size=60), st.lists(token_ids, max_size=12),
                               st.lists(st.lists(token_ids, max_size=8), max_size=2),
                               st.lists(st.text(max_size=10), max_size=2))),
     "max_tokens": max_tokens},
    optional=sampling_fields)


# one known field of an otherwise valid body replaced by a nasty value: the likeliest
# way to reach the code behind validation with a value validation should have stopped
INT_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens", "top_k", "seed", "n")
FLOAT_FIELDS = ("temperature", "top_p")
BOOL_FIELDS = ("stream", "ignore_eos")
nasty = st.one_of(junk.filter(lambda v: v is not None), huge_ints,
                  st.sampled_from([math.inf, -math.inf, math.nan, 1e300, -0.0, 2**31, 2**32,
                                   2**63, 2**64, -1, "5", "yes", "true", True, [], {}, [1]]),
                  st.lists(token_ids, min_size=1, max_size=3))
valid_chat = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user"]), "content": st.text(max_size=30)}),
        min_size=1, max_size=2),
     "max_tokens": st.integers(1, 3)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
              "top_k": st.integers(-1, 50), "seed": st.integers(0, 2**63),
              "min_tokens": st.integers(0, 1), "stop": st.lists(st.text(min_size=1, max_size=4),
                                                                max_size=2),
              "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2),
              "ignore_eos": st.booleans(), "n": st.just(1), "stream": st.booleans()})
mutated_chat = st.tuples(valid_chat, st.sampled_from(
    [*INT_FIELDS, *FLOAT_FIELDS, *BOOL_FIELDS, "stop_token_ids", "stop", "messages",
     "stream_options", "model", "logit_bias", "logprobs"]), nasty)


def must_refuse(field: str, value) -> bool:
    """A value of the wrong JSON type (or out of range where the rule is plain)."""
    if field in INT_FIELDS:
        return not isinstance(value, int) or isinstance(value, bool)
    if field in FLOAT_FIELDS:
        return (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value))
    if field in BOOL_FIELDS:
        return not isinstance(value, bool)
    if field == "stop_token_ids":
        return not (isinstance(value, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < VOCAB for t in value))
    return False


def check_http(response: httpx.Response, stream: bool) -> None:
    assert response.status_code in HTTP_OK, (response.status_code, response.text[:500])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"], error
        return
    if stream:
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
        assert '"error"' not in response.text, response.text[:500]
    else:
        assert response.json()["choices"], response.text[:500]


def post(http: httpx.Client, path: str, body) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode() if not isinstance(body, bytes) else body
    started = time.monotonic()
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert time.monotonic() - started < DEADLINE_S
    check_http(response, isinstance(body, dict) and body.get("stream") is True)
    return response


# ---- HTTP --------------------------------------------------------------------------------
@fuzz(60)
@given(body=chat_body, extra=extra_fields)
def test_fuzz_chat_completions(http, body, extra):
    post(http, "/v1/chat/completions", {**extra, **body})


@fuzz(60)
@given(body=completion_body, extra=extra_fields)
def test_fuzz_completions(http, body, extra):
    post(http, "/v1/completions", {**extra, **body})


@fuzz(60)
@given(case=mutated_chat, chat=st.booleans())
def test_fuzz_one_nasty_field(http, case, chat):
    body, field, value = case
    # a plain count the model would really generate: minutes, not a finding
    assume(not (field in ("max_tokens", "max_completion_tokens") and isinstance(value, int)
                and not isinstance(value, bool) and 3 < value <= CONTEXT))
    if not chat:
        body = {**body, "prompt": body.pop("messages")[0]["content"]}
        field = {"messages": "prompt", "max_completion_tokens": "max_tokens"}.get(field, field)
    body[field] = value
    response = post(http, "/v1/chat/completions" if chat else "/v1/completions", body)
    if must_refuse(field, value):
        assert response.status_code == 400, (field, value, response.text[:300])


@fuzz(30)
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                     junk.map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzz_raw_http_bodies(http, raw, path):
    post(http, path, raw)


# ---- gRPC --------------------------------------------------------------------------------
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
uint32, int32 = st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1)
grpc_sampling = st.fixed_dictionaries(
    {"max_tokens": st.one_of(st.integers(1, 3), st.integers(1, 3), st.just(0),
                             st.integers(CONTEXT + 1, 2**32 - 1))},
    optional={"temperature": st.one_of(st.floats(0, 2, width=32), float32),
              "top_p": st.one_of(st.floats(0.25, 1, width=32), float32),
              "top_k": st.one_of(st.integers(0, 50), int32), "seed": st.integers(0, 2**64 - 1),
              "stop": st.lists(st.text(max_size=5), max_size=3),
              "stop_token_ids": st.lists(st.one_of(st.integers(0, VOCAB - 1), int32), max_size=3),
              "ignore_eos": st.booleans(), "min_tokens": st.one_of(st.integers(0, 3), uint32)})
grpc_input = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(max_size=60)),
    st.builds(lambda ids: {"token_ids": generate_pb2.TokenIds(ids=ids)},
              st.lists(st.one_of(st.integers(0, VOCAB - 1), int32), max_size=12)),
    st.builds(lambda ms: {"chat": generate_pb2.ChatMessages(
        messages=[generate_pb2.ChatMessage(role=r, content=c) for r, c in ms])},
        st.lists(st.tuples(st.one_of(st.sampled_from(["system", "user", "assistant"]),
                                     st.text(max_size=8)), st.text(max_size=30)), max_size=3)),
    st.just({}))
grpc_request = st.builds(
    lambda inp, sampling, rid, model, mode: generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(**sampling), model=model, mode=mode,
        **({"request_id": rid} if rid is not None else {}), **inp),
    grpc_input, grpc_sampling, st.one_of(st.none(), st.text(max_size=12)),
    st.sampled_from(["", "", "smollm2-135m-instruct", "nope"]), st.integers(0, 5))


def check_grpc(call) -> None:
    started = time.monotonic()
    try:
        chunks = list(call)
    except grpc.RpcError as exc:
        assert exc.code() in GRPC_OK, (exc.code(), exc.details())
        assert exc.details(), exc.code()
    else:
        finished = (generate_pb2.FINISH_REASON_STOP, generate_pb2.FINISH_REASON_LENGTH)
        assert chunks and chunks[-1].finish_reason in finished, chunks[-1:]
    assert time.monotonic() - started < DEADLINE_S


@fuzz(70)
@given(request=grpc_request)
def test_fuzz_grpc_generate(channel, request):
    check_grpc(generate_pb2_grpc.RouterStub(channel).Generate(request, timeout=DEADLINE_S))


# bytes that do decode get a suffix setting max_tokens (the last value wins), so a
# random valid request is short
SHORT = generate_pb2.GenerateRequest(
    sampling=generate_pb2.SamplingParams(max_tokens=2)).SerializeToString()


@fuzz(40)
@given(raw=st.binary(max_size=80), method=st.sampled_from(["Generate", "GenerateUnary",
                                                           "ListModels"]))
def test_fuzz_grpc_request_bytes(channel, raw, method):
    path = f"/pdserve.v1.Router/{method}"
    if method == "Generate":
        check_grpc(channel.unary_stream(path)(raw + SHORT, timeout=DEADLINE_S))
        return
    try:
        channel.unary_unary(path)(raw + SHORT, timeout=DEADLINE_S)
    except grpc.RpcError as exc:
        assert exc.code() in GRPC_OK, (exc.code(), exc.details())


def test_malformed_request_bytes_are_invalid_argument(channel):
    with pytest.raises(grpc.RpcError) as info:
        list(channel.unary_stream("/pdserve.v1.Router/Generate")(b"\xff\xff\xff", timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed pdserve.v1.GenerateRequest" in info.value.details()


WORKER_METHODS = [("prefill-0", "PrefillService", m, False)
                  for m in ("Prefill", "StartPrefill", "Abort", "Stats", "Describe")] + \
                 [("decode-0", "DecodeService", m, m == "Generate")
                  for m in ("Generate", "Abort", "Stats", "Describe")]


@pytest.mark.parametrize("worker,service,method,streaming", WORKER_METHODS)
def test_malformed_bytes_sent_to_a_worker_are_invalid_argument(system, worker, service,
                                                              method, streaming):
    """Straight to a worker (past the router, with the internal token): still a clear
    INVALID_ARGUMENT naming the message type, and the worker keeps serving."""
    cluster = system[0]
    address = cluster.proc(worker).address
    with worker_channel(address, cluster.internal_token) as ch:
        path = f"/pdserve.v1.{service}/{method}"
        with pytest.raises(grpc.RpcError) as info:
            if streaming:
                list(ch.unary_stream(path)(b"\xff\xff\xff", timeout=10))
            else:
                ch.unary_unary(path)(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "malformed pdserve.v1." in info.value.details()
    assert worker_stats(address, worker.split("-")[0], cluster.internal_token).num_total_blocks


# ---- min_tokens end to end ---------------------------------------------------------------
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_min_tokens_over_http_outlasts_eos(http):
    """Greedy, the bundled model answers in about ten tokens and stops on EOS; with
    min_tokens it cannot stop before."""
    def completion_tokens(max_tokens: int, min_tokens: int = 0) -> int:
        response = http.post("/v1/chat/completions", json={
            "messages": QUESTION, "max_tokens": max_tokens, "min_tokens": min_tokens,
            "temperature": 0})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["completion_tokens"]

    free = completion_tokens(24)
    assert free < 16, "the test needs an answer that stops early"
    assert completion_tokens(free + 3, min_tokens=free + 3) == free + 3


@pytest.mark.parametrize("mode", [generate_pb2.DISAGGREGATION_ALWAYS,
                                  generate_pb2.DISAGGREGATION_NEVER])
def test_min_tokens_over_grpc_both_routes(channel, mode):
    """Disaggregated, the prefill worker samples the first token: the ban travels."""
    def tokens(max_tokens: int, min_tokens: int = 0) -> list[int]:
        request = generate_pb2.GenerateRequest(
            chat=generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(**QUESTION[0])],
                                           add_generation_prompt=True),
            sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                 min_tokens=min_tokens), mode=mode)
        stub = generate_pb2_grpc.RouterStub(channel)
        return [t for c in stub.Generate(request, timeout=DEADLINE_S) for t in c.token_ids]

    free = tokens(24)
    assert len(free) < 16, "the test needs an answer that stops early"
    eos = free[-1]  # the stop token is streamed with the last chunk
    assert eos == EOS, free
    kept = tokens(len(free) + 3, min_tokens=len(free) + 3)
    assert len(kept) == len(free) + 3 and eos not in kept, kept


# ---- afterwards (runs last in this module) -----------------------------------------------
def test_zz_still_serving_pools_free_and_no_traceback(system, http, channel):
    cluster, _, _ = system
    response = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    chunks = list(generate_pb2_grpc.RouterStub(channel).Generate(generate_pb2.GenerateRequest(
        text="Hello", sampling=generate_pb2.SamplingParams(max_tokens=3, ignore_eos=True)),
        timeout=DEADLINE_S))
    assert sum(len(c.token_ids) for c in chunks) == 3
    wait_pools_free(cluster)
    log = (cluster.log_dir / "router.log").read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
