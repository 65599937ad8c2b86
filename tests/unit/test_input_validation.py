"""Input hardening (issue 17): every client-supplied number range-checked with a message
naming its field, strict JSON types on the OpenAI API, request size limits, prompts that
cannot fit refused before any work, lenient gRPC decoding, constant-time API keys and
min_tokens from the sampler to the engine.

The HTTP checks run the real ASGI app over a RouterCore with no workers: a request the
router refuses is 400 (or 413), one it accepts gets as far as routing and is 503."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import httpx
import pytest
import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import load_model_meta
from pdserve.engine.sampling import InvalidRequest, SamplingParams, sample, suppress
from pdserve.services.common import sampling_from_proto, sampling_to_proto
from pdserve.services.router.http import create_app
from pdserve.services.lenient import Malformed, lenient_parser
from pdserve.services.router.service import RouterCore, RouterError, RouterSettings
from pdserve.wire import generate_pb2
from tests.support.tiny_models import tiny_loaded_model

NEG_INF = float("-inf")


# ---- SamplingParams and the sampler ------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(min_tokens=-1), r"min_tokens must be in \[0, max_tokens=64\]"),
    (dict(max_tokens=4, min_tokens=5), r"min_tokens must be in \[0, max_tokens=4\]"),
    (dict(temperature=math.inf), "temperature must be finite"),
    (dict(stop_token_ids=(5, -1)), "stop_token_ids: token id -1"),
    (dict(stop_token_ids=(2**40,)), "stop_token_ids: token id 1099511627776"),
])
def test_sampling_params_refuse_out_of_range_values(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**kwargs)


def test_suppressed_ids_until_min_tokens():
    p = SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(7,))
    assert set(p.suppressed_ids(0, (2,))) == {2, 7}
    assert set(p.suppressed_ids(2, (2,))) == {2, 7}
    assert p.suppressed_ids(3, (2,)) == ()
    ignoring = SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(7,), ignore_eos=True)
    assert ignoring.suppressed_ids(0, (2,)) == (7,)  # EOS is no stop then: no need to mask it


def test_suppress_masks_only_the_banned_ids_of_each_row():
    logits = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # [rows, vocab]
    out = suppress(logits, [(5, 99), ()])  # 99: outside the vocabulary, ignored
    assert out[0].tolist() == [0, 1, 2, 3, 4, NEG_INF]
    assert torch.equal(out[1], logits[1]) and logits[0, 5] == 5  # the input is not changed
    assert suppress(logits, [(), ()]) is logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_never_draws_a_banned_token(temperature):
    logits = torch.tensor([[0.0, 9.0, 8.5, 0.0]] * 64)  # [rows, vocab]: 1 is the favourite
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(64)]
    drawn = sample(logits, params, [None] * 64, [(1,)] * 64)
    assert 1 not in drawn and 2 in drawn
    assert sample(logits[:1], params[:1], [None], None) != [2] or temperature > 0


# ---- proto conversions -------------------------------------------------------------------
def test_min_tokens_survives_the_proto_round_trip():
    p = SamplingParams(max_tokens=9, min_tokens=4, stop_token_ids=(3,))
    assert sampling_from_proto(sampling_to_proto(p)).min_tokens == 4


@pytest.mark.parametrize("field,value", [("temperature", math.inf), ("temperature", 1e39),
                                         ("top_p", math.nan)])
def test_non_finite_floats_are_refused(field, value):
    msg = generate_pb2.SamplingParams(**{field: value})  # 1e39 becomes inf in a float field
    with pytest.raises(InvalidRequest, match="finite"):
        sampling_from_proto(msg)


def test_lenient_deserializer_turns_junk_into_malformed():
    parse = lenient_parser(generate_pb2.GenerateRequest)
    good = generate_pb2.GenerateRequest(text="hi").SerializeToString()
    assert parse(good).text == "hi"
    bad = parse(b"\xff\xff\xff\xff\x0f")
    assert isinstance(bad, Malformed) and bad.type_name == "pdserve.v1.GenerateRequest"


# ---- the router core ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def core():
    return RouterCore(RouterSettings(max_request_bytes=4 << 20))


def run(coro):
    return asyncio.run(coro)


async def _first(core, req):
    gen = core.generate(req)
    try:
        return await gen.__anext__()
    finally:
        await gen.aclose()


def _refusal(core, **fields) -> RouterError:
    with pytest.raises(RouterError) as info:
        run(_first(core, generate_pb2.GenerateRequest(**fields)))
    return info.value


def test_stop_token_ids_outside_the_vocabulary_are_refused(core):
    err = _refusal(core, text="hi", sampling=generate_pb2.SamplingParams(stop_token_ids=[5, 49152]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop_token_ids" in str(err) and "49152" in str(err)


def test_prompt_token_ids_outside_the_vocabulary_are_refused(core):
    err = _refusal(core, token_ids=generate_pb2.TokenIds(ids=[1, -3]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt: token id -3" in str(err)


def test_min_tokens_above_max_tokens_is_refused(core):
    err = _refusal(core, text="hi",
                   sampling=generate_pb2.SamplingParams(max_tokens=2, min_tokens=3))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "min_tokens" in str(err)


def test_context_overflow_message_is_vllms(core):
    context = core.model_config.max_position
    err = _refusal(core, token_ids=generate_pb2.TokenIds(ids=[1] * 100),
                   sampling=generate_pb2.SamplingParams(max_tokens=context))
    assert f"This model's maximum context length is {context} tokens. However, you requested " \
           f"{context + 100} tokens (100 in the prompt, {context} in the completion)" in str(err)
    err = _refusal(core, token_ids=generate_pb2.TokenIds(ids=[1] * context))
    assert f"maximum context length is {context} tokens" in str(err)


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(core, monkeypatch):
    def never(*_):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(core, "prompt_ids", never)
    err = _refusal(core, text="x" * (core.max_prompt_chars + 1))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length" in str(err)


def test_a_request_id_in_flight_is_refused_and_left_alone(core):
    async def scenario():
        core._active.add("taken")  # as a call in flight holds it
        try:
            with pytest.raises(RouterError) as info:
                await _first(core, generate_pb2.GenerateRequest(text="hi", request_id="taken"))
            assert "taken" in core._active  # the refused call did not release the owner's id
            return info.value
        finally:
            core._active.discard("taken")

    err = run(scenario())
    assert err.code == grpc.StatusCode.ALREADY_EXISTS and "taken" in str(err)


def test_a_finished_request_releases_its_id(core):
    _refusal(core, text="hi", request_id="mine")  # no workers: UNAVAILABLE
    assert "mine" not in core._active


def test_an_empty_request_id_names_no_request(core):
    core._active.add("")
    try:
        err = _refusal(core, text="hi", request_id="")
    finally:
        core._active.discard("")
    assert err.code == grpc.StatusCode.UNAVAILABLE  # routed (no workers here), not refused


def test_grpc_request_over_the_size_limit_is_refused(core):
    err = _refusal(core, text="x" * (core.settings.max_request_bytes + 1))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in str(err)

# ---- the OpenAI HTTP API -----------------------------------------------------------------
def post(core, path: str, body, headers=None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=create_app(core))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            content = body if isinstance(body, (bytes, str)) else json.dumps(body)
            return await client.post(path, content=content, headers=headers)

    return run(go())


def _openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("field,value", [
    ("stop_token_ids", [-1, 1099511627776]),
    ("stop_token_ids", [1, 2**31]),
    ("stop_token_ids", ["3"]),
    ("max_tokens", "5"), ("max_tokens", 5.0), ("max_tokens", True), ("max_tokens", 0),
    ("max_tokens", 2**32), ("min_tokens", -1), ("min_tokens", "1"),
    ("temperature", "0.5"), ("top_p", "1"), ("top_k", 2**31), ("top_k", 1.5),
    ("seed", 2**64), ("seed", "7"), ("n", "1"), ("n", 2),
    ("stream", "yes"), ("stream", 1), ("ignore_eos", "true"),
    ("stream_options", {"include_usage": "yes"}),
    ("stop", [""]), ("stop", [1]), ("model", 5), ("logit_bias", {"5": 10}), ("logprobs", True),
])
def test_wrong_types_and_ranges_are_400_naming_the_field(core, field, value):
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "hi"})):
        error = _openai_error(post(core, path, {**base, field: value}), 400)
        assert error["param"] == field and field in error["message"], error


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_non_finite_temperature_is_400(core, literal):
    raw = '{"prompt": "hi", "max_tokens": 2, "temperature": %s}' % literal
    error = _openai_error(post(core, "/v1/completions", raw), 400)
    assert "temperature" in error["message"]


def test_huge_finite_temperature_is_400(core):
    response = post(core, "/v1/completions", {"prompt": "hi", "temperature": 1e300})
    error = _openai_error(response, 400)
    assert "temperature" in error["message"]


def test_min_tokens_above_max_tokens_is_400(core):
    error = _openai_error(post(core, "/v1/chat/completions", {**CHAT, "min_tokens": 9}), 400)
    assert "min_tokens" in error["message"]


@pytest.mark.parametrize("prompt", [[-1], [2**31], [[1, 2**40]], [1.0], ["a", 3]])
def test_prompt_token_ids_are_range_checked(core, prompt):
    error = _openai_error(post(core, "/v1/completions", {"prompt": prompt}), 400)
    assert error["param"] == "prompt"


def test_prompt_token_id_beyond_the_vocabulary_is_400(core):
    error = _openai_error(post(core, "/v1/completions", {"prompt": [1, 60000]}), 400)
    assert "60000" in error["message"]


def test_valid_json_types_are_accepted(core):
    """Right types pass validation and reach routing (503: this core has no workers)."""
    body = {**CHAT, "temperature": 1, "top_p": 0.5, "top_k": -1, "seed": -5, "n": None,
            "stream": None, "min_tokens": 2, "stop_token_ids": [0, 49151], "ignore_eos": True}
    _openai_error(post(core, "/v1/chat/completions", body), 503)
    _openai_error(post(core, "/v1/completions", {"prompt": [[1, 2, 3]], "max_tokens": 3}), 503)


def test_body_over_the_limit_is_413(core):
    prompt = "x" * (core.settings.max_request_bytes + 1)
    error = _openai_error(post(core, "/v1/completions", {"prompt": prompt}), 413)
    assert error["code"] == "request_too_large"

    async def chunked():  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(core.settings.max_request_bytes // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    async def go():
        transport = httpx.ASGITransport(app=create_app(core))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/completions", content=chunked())

    _openai_error(run(go()), 413)


# ---- min_tokens in the engine ------------------------------------------------------------
PROMPT = [1, 504, 3458, 28]


@pytest.fixture(scope="module")
def tokenizer():
    return load_model_meta(None)[2]


@pytest.fixture(params=[False, True], ids=["sync", "async-scheduling"])
def engine(request, tokenizer):
    return LLMEngine(EngineConfig(num_blocks=64, async_scheduling=request.param),
                     tiny_loaded_model(tokenizer, seed=3))


def _run(engine, **params):
    return engine.generate([PROMPT], SamplingParams(**params))[0]


def test_min_tokens_keeps_a_request_that_would_stop_on_a_stop_token(engine):
    free = _run(engine, max_tokens=8, ignore_eos=True).token_ids
    stop = free[1]
    early = _run(engine, max_tokens=8, stop_token_ids=(stop,), ignore_eos=True).token_ids
    assert early == free[:free.index(stop) + 1]
    kept = _run(engine, max_tokens=8, min_tokens=5, stop_token_ids=(stop,), ignore_eos=True)
    assert len(kept.token_ids) >= 5 and stop not in kept.token_ids[:5], kept.token_ids


def test_min_tokens_masks_eos(engine, monkeypatch):
    """A model steered to EOS stops at once; with min_tokens it cannot pick EOS until
    min_tokens tokens are out, and it stops on EOS right after."""
    eos = engine.model_config.eos_token_ids[0]
    model = engine.runner.model
    plain = model.compute_logits

    def steered(hidden):
        logits = plain(hidden)  # [rows, vocab]
        logits[:, eos] += 1000.0
        return logits

    monkeypatch.setattr(model, "compute_logits", steered)
    assert _run(engine, max_tokens=6).token_ids == [eos]
    out = _run(engine, max_tokens=6, min_tokens=4)
    assert len(out.token_ids) == 5 and eos not in out.token_ids[:4], out.token_ids
    assert out.token_ids[4] == eos and out.finish_reason == "stop"


def test_stop_strings_do_not_apply_before_min_tokens(engine):
    free = _run(engine, max_tokens=8, ignore_eos=True)
    stop = free.text[:1]
    assert stop, "the test needs text to stop on"
    early = _run(engine, max_tokens=8, ignore_eos=True, stop=(stop,))
    assert len(early.token_ids) < 8 and early.finish_reason == "stop"
    kept = _run(engine, max_tokens=8, ignore_eos=True, stop=(stop,), min_tokens=6)
    assert len(kept.token_ids) >= 6

