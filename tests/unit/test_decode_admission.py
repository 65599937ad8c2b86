"""The decode admission's pure state machine (services/decode/admission.py): every
transition, both sources of the first token in either order, failures racing a KV that
already landed, cancellation. A fake engine applies the effects. CPU only, no torch."""

from __future__ import annotations

import itertools

import pytest

from pdserve.services.decode.admission import (AbortRequest, Admission, AdmissionState,
                                               JoinBatch, Recompute)


class FakeEngine:
    """Applies effects the way the service does, and refuses what a real engine would
    (joining twice, recomputing a request that decodes)."""

    def __init__(self) -> None:
        self.state = "reserved"
        self.stream: list[int] = []

    def apply(self, effects) -> None:
        for effect in effects:
            assert self.state == "reserved", f"{effect} on a request that is {self.state}"
            if isinstance(effect, JoinBatch):
                self.state = "running"
                self.stream.append(effect.first_token)
            elif isinstance(effect, Recompute):
                self.state = "recomputing"
            else:
                assert isinstance(effect, AbortRequest)
                self.state = "aborted"


def waiting(fallback: str = "recompute") -> Admission:
    admission = Admission("r", "t-1", fallback)
    admission.prefill_called()
    assert admission.state is AdmissionState.WAITING_FOR_KV
    return admission


def test_reserved_until_the_prefill_call_is_out():
    admission = Admission("r", "t-1")
    assert admission.state is AdmissionState.RESERVED and admission.state.awaiting_kv
    admission.prefill_called()
    with pytest.raises(AssertionError):
        admission.prefill_called()


def test_first_token_with_the_kv_joins_the_batch():
    admission = waiting()
    assert admission.kv_arrived(42) == [JoinBatch(42)]
    assert (admission.state, admission.first_token) == (AdmissionState.JOINED, 42)


def test_the_first_token_joins_once():
    admission, engine = waiting(), FakeEngine()
    for _ in range(2):  # a second DONE for the transfer finds JOINED
        engine.apply(admission.kv_arrived(42))
    assert engine.stream == [42] and engine.state == "running"


def test_failure_recomputes_by_default():
    admission, engine = waiting(), FakeEngine()
    engine.apply(admission.kv_failed("transfer EXPIRED"))
    assert engine.state == "recomputing"
    assert (admission.state, admission.error) == (AdmissionState.RECOMPUTE, "transfer EXPIRED")


def test_failure_with_fallback_fail_aborts():
    admission = waiting("fail")
    assert admission.kv_failed("refused") == [AbortRequest("refused")]
    assert admission.state is AdmissionState.FAILED


@pytest.mark.parametrize("fallback", ["recompute", "fail"])
def test_a_failure_after_the_kv_joined_leaves_it_decoding(fallback):
    # the Prefill call timed out just as the KV landed with its token
    admission, engine = waiting(fallback), FakeEngine()
    engine.apply(admission.kv_arrived(42))
    engine.apply(admission.kv_failed("prefill call failed: DEADLINE_EXCEEDED"))
    assert engine.state == "running" and admission.state is AdmissionState.JOINED


def test_a_kv_landing_after_the_failure_was_decided_does_not_join():
    admission, engine = waiting(), FakeEngine()
    engine.apply(admission.kv_failed("receiver saw FAILED"))
    engine.apply(admission.kv_arrived(42))
    assert engine.state == "recomputing" and engine.stream == []


def test_a_kv_landing_after_the_call_was_cancelled_does_not_join():
    admission, engine = waiting(), FakeEngine()
    assert admission.cancelled() == []
    engine.apply(admission.kv_arrived(42))
    assert engine.state == "reserved" and admission.state is AdmissionState.FAILED


def test_cancel_after_join_changes_nothing():
    admission = waiting()
    admission.kv_arrived(42)
    assert admission.cancelled() == [] and admission.state is AdmissionState.JOINED


EVENTS = {
    "arrived": lambda a: a.kv_arrived(7),
    "arrived without token": lambda a: a.kv_arrived(None),
    "failed": lambda a: a.kv_failed("x"),
    "cancelled": lambda a: a.cancelled(),
}


@pytest.mark.parametrize("fallback", ["recompute", "fail"])
@pytest.mark.parametrize("sequence", list(itertools.product(EVENTS, repeat=3)))
def test_every_sequence_of_events_leaves_one_consistent_outcome(sequence, fallback):
    admission, engine = waiting(fallback), FakeEngine()
    for event in sequence:
        engine.apply(EVENTS[event](admission))  # the fake refuses a second decision
    outcome = {AdmissionState.JOINED: "running", AdmissionState.RECOMPUTE: "recomputing",
               AdmissionState.WAITING_FOR_KV: "reserved"}
    if admission.state is AdmissionState.FAILED:
        assert engine.state in ("aborted", "reserved")  # cancelled: the call's end aborts
    else:
        assert engine.state == outcome[admission.state]
    assert len(engine.stream) <= 1
