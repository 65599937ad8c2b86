"""One routing rule for a request's DisaggregationMode and the config's `mode`: a mode
set on the request decides exactly as the same mode in the config would, so ALWAYS with
no healthy prefill worker fails with UNAVAILABLE either way (docs/router.md)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.services.router.config import RouterConfig
from pdserve.services.router.policies import (NoWorkersError, Route, build_policies,
                                              make_request_view)
from pdserve.services.router.service import RouterCore, RouterError, RouterSettings
from pdserve.wire import generate_pb2

THRESHOLD = 8
PER_REQUEST = {"always": generate_pb2.DISAGGREGATION_ALWAYS,
               "never": generate_pb2.DISAGGREGATION_NEVER,
               "auto": generate_pb2.DISAGGREGATION_AUTO}


@pytest.fixture(scope="module")
def core():
    return RouterCore(RouterSettings())


def _policies(mode: str):
    return build_policies(RouterConfig.model_validate(
        {"version": 1, "mode": mode, "auto_threshold_tokens": THRESHOLD}))


def _decision(core, request_mode: int, config_mode: str, prompt_len: int, prefill: bool):
    view = make_request_view("r", list(range(prompt_len)), block_size=None, fingerprint="f")
    try:
        return core._route(request_mode, _policies(config_mode), view, prefill)
    except NoWorkersError:
        return "UNAVAILABLE"


@pytest.mark.parametrize("mode", sorted(PER_REQUEST))
@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("prompt_len", [THRESHOLD - 1, THRESHOLD])
def test_a_request_mode_decides_as_the_configured_mode(core, mode, prefill, prompt_len):
    # the config under the request says something else: the request's mode wins
    other = "never" if mode != "never" else "always"
    by_request = _decision(core, PER_REQUEST[mode], other, prompt_len, prefill)
    by_config = _decision(core, generate_pb2.DISAGGREGATION_MODE_UNSPECIFIED, mode,
                          prompt_len, prefill)
    assert by_request == by_config


def test_the_rule_itself(core):
    unspecified = generate_pb2.DISAGGREGATION_MODE_UNSPECIFIED
    assert _decision(core, unspecified, "always", 1, False) == "UNAVAILABLE"
    assert _decision(core, unspecified, "always", 1, True) is Route.DISAGGREGATED
    assert _decision(core, unspecified, "never", 99, True) is Route.DECODE_ONLY
    assert _decision(core, unspecified, "auto", THRESHOLD - 1, True) is Route.DECODE_ONLY
    assert _decision(core, unspecified, "auto", THRESHOLD, True) is Route.DISAGGREGATED
    assert _decision(core, unspecified, "auto", THRESHOLD, False) is Route.DECODE_ONLY


async def _first(core, request):
    gen = core.generate(request)
    try:
        return await gen.__anext__()
    finally:
        await gen.aclose()


def _refusal(core, mode: int) -> RouterError:
    request = generate_pb2.GenerateRequest(text="hi", mode=mode,
                                           sampling=generate_pb2.SamplingParams(max_tokens=2))
    with pytest.raises(RouterError) as info:
        asyncio.run(_first(core, request))
    return info.value


def test_always_without_a_prefill_worker_is_unavailable_end_to_end(core):
    # no workers at all: ALWAYS names the missing prefill worker (it used to fall
    # through to decode-only and report the decode pool), NEVER the decode pool
    err = _refusal(core, generate_pb2.DISAGGREGATION_ALWAYS)
    assert err.code == grpc.StatusCode.UNAVAILABLE and "prefill" in str(err)
    err = _refusal(core, generate_pb2.DISAGGREGATION_NEVER)
    assert err.code == grpc.StatusCode.UNAVAILABLE and "no healthy decode worker" in str(err)
