"""The prefill job's pure state machine (services/prefill/job.py): every transition,
every failure, and the races the real-process tests hit, driven with a fake engine
(prompt progress) and a fake connector (transfer ends). CPU only, no torch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pdserve.kvtransfer.base import KVDestination, TransferState
from pdserve.services.prefill.job import (ENGINE_DROPPED, NOT_CLAIMED, AbortTransfer, Answer,
                                          AnswerCall, AnswerStart, CountEarlyStart,
                                          EndEngineRequest, JobBook, JobState, PrefillJob,
                                          RecordFailed, RecordSent, ReleaseTransfer, Route,
                                          SendChunk, TransferEnd)

BS = 16
CALL, START = object(), object()  # the calls' handles (opaque to the job)


@dataclass
class FakeEngine:
    """The engine's view of one prompt: blocks allocated up front, tokens computed."""

    num_blocks: int
    num_computed_tokens: int = 0
    dropped: bool = False

    def progress(self):
        return None if self.dropped else self


def destination(num_blocks: int, first: int = 0, tid: str = "t-1") -> KVDestination:
    return KVDestination("ucx", "host:1", tid, tuple(range(100, 100 + num_blocks - first)),
                         first_block_index=first)


def done(**kw) -> TransferEnd:
    return TransferEnd(TransferState.DONE, blocks_done=5, bytes_moved=500, seconds=0.1, **kw)


def ended(state: TransferState, error: str = "boom") -> TransferEnd:
    return TransferEnd(state, error)


def early(tokens: int = 70, expires: float = 10.0) -> PrefillJob:
    return PrefillJob.early("r", tokens, "key", expires=expires, start_call=START)


def claimed(tokens: int = 70, first: int = 0) -> PrefillJob:
    job = early(tokens)
    job.claim(CALL, destination(-(-tokens // BS), first))
    return job


def sampled(job: PrefillJob, token: int = 7) -> PrefillJob:
    job.first_token_sampled(token, "length", queue_s=0.01, compute_s=0.2)
    return job


def sending(tokens: int = 70) -> PrefillJob:
    job = sampled(claimed(tokens))
    job.tick(FakeEngine(5, tokens), now=1.0, block_size=BS)
    assert job.state is JobState.SENDING
    return job


def kinds(effects) -> list[type]:
    return [type(e) for e in effects]


def finished(effects, state: JobState, error: str = "", computed: bool = True,
             start_reason: str | None = None) -> None:
    """The effects of a job ending: engine request ended, transfer released, both
    calls answered."""
    answer = next(e.answer for e in effects if isinstance(e, AnswerCall))
    assert (answer.state, answer.error) == (state, error)
    assert EndEngineRequest(computed) in effects and ReleaseTransfer() in effects
    reason = start_reason or (f"{state.value}: {error}" if error else state.value)
    assert AnswerStart(True, reason) in effects


# ---- early starts --------------------------------------------------------------------
def test_unclaimed_early_start_waits_then_is_dropped_after_its_lease():
    job, engine = early(expires=10.0), FakeEngine(5, 70)
    assert job.tick(engine.progress(), now=9.9, block_size=BS) == []
    sampled(job)  # its first token is computed: still waiting, blocks held
    assert job.tick(engine.progress(), now=9.99, block_size=BS) == []
    effects = job.tick(engine.progress(), now=10.1, block_size=BS)
    assert job.state is JobState.FAILED
    assert effects == [CountEarlyStart("dropped"), EndEngineRequest(computed=True),
                       AnswerStart(True, f"failed: {NOT_CLAIMED}")]


def test_unclaimed_early_start_dropped_by_the_engine_fails():
    job = early()
    effects = job.tick(None, now=1.0, block_size=BS)
    assert job.state is JobState.FAILED
    assert effects == [EndEngineRequest(False), AnswerStart(True, f"failed: {ENGINE_DROPPED}")]


def test_claim_takes_the_call_and_destination_and_counts():
    job = early()
    effects = job.claim(CALL, destination(5))
    assert effects == [CountEarlyStart("claimed")]
    assert (job.state, job.call, job.transfer_id) == (JobState.COMPUTING, CALL, "t-1")
    assert job.started_early and job.renews_lease


def test_claim_only_from_awaiting_claim():
    job = claimed()
    with pytest.raises(AssertionError):
        job.claim(CALL, destination(5))


@pytest.mark.parametrize("event, counted, reason", [
    (lambda job: job.claim_refused("too small"), "claimed",
     "failed: claimed, then aborted: too small"),  # the claiming call is refused
    (lambda job: job.abort("router retries"), "dropped", "failed: aborted: router retries"),
])
def test_an_early_job_ended_before_it_is_claimed_answers_the_start_only(event, counted,
                                                                         reason):
    job = early()
    effects = event(job)
    assert job.state is JobState.FAILED
    assert effects == [CountEarlyStart(counted), EndEngineRequest(False),
                       AnswerStart(True, reason)]


def test_compute_only_claim_is_done_at_its_first_token():
    job = early()
    job.claim(CALL, None)
    assert job.tick(FakeEngine(5, 32), now=1.0, block_size=BS) == []
    effects = sampled(job).tick(FakeEngine(5, 70), now=1.0, block_size=BS)
    assert job.state is JobState.DONE
    assert effects == [EndEngineRequest(True), AnswerCall(Answer(JobState.DONE)),
                       AnswerStart(True, "done")]


def test_compute_only_call_without_early_start_is_done_even_if_not_held():
    job = PrefillJob.for_call("r", 70, "", CALL, None)
    effects = sampled(job).tick(None, now=1.0, block_size=BS)  # not held: engine forgot it
    assert job.state is JobState.DONE and AnswerCall(Answer(JobState.DONE)) in effects


# ---- chunks --------------------------------------------------------------------------
def test_full_blocks_go_out_per_tick_and_the_rest_with_the_first_token():
    job, engine = claimed(tokens=70, first=1), FakeEngine(5)  # block 0 cached at decode
    engine.num_computed_tokens = 20  # one full block: the decode worker already has it
    assert job.tick(engine, now=1.0, block_size=BS) == []
    engine.num_computed_tokens = 40
    assert job.tick(engine, now=1.5, block_size=BS) == [SendChunk(1, 2, 0, False, None)]
    assert job.send_started == 1.5 and job.state is JobState.COMPUTING
    assert job.tick(engine, now=1.7, block_size=BS) == []  # nothing new
    engine.num_computed_tokens = 64
    assert job.tick(engine, now=2.0, block_size=BS) == [SendChunk(2, 4, 1, False, None)]
    engine.num_computed_tokens = 70
    sampled(job, token=42)
    assert job.tick(engine, now=2.5, block_size=BS) == [SendChunk(4, 5, 3, True, 42)]
    assert (job.state, job.chunks, job.send_started) == (JobState.SENDING, 3, 1.5)
    assert not job.renews_lease and not job.watches_engine


def test_a_prompt_computed_in_one_step_goes_as_one_last_chunk():
    job = sampled(claimed(tokens=64))
    assert job.tick(FakeEngine(4, 64), now=1.0, block_size=BS) == [SendChunk(0, 4, 0, True, 7)]


def test_ticks_while_sending_or_aborting_do_nothing():
    job = sending()
    assert job.tick(FakeEngine(5, 70), now=2.0, block_size=BS) == []
    job.abort("x")
    assert job.tick(None, now=2.0, block_size=BS) == []


def test_engine_dropping_a_computing_job_fails_it_and_releases_the_transfer():
    job = claimed()
    effects = job.tick(None, now=1.0, block_size=BS)
    assert job.state is JobState.FAILED
    finished(effects, JobState.FAILED, ENGINE_DROPPED, computed=False)


# ---- the connector's verdict ---------------------------------------------------------
def test_transfer_done_finishes_the_job():
    job = sending()
    effects = job.transfer_ended(done(), now=1.25)
    assert job.state is JobState.DONE
    assert effects[0] == RecordSent(0.25, done())
    finished(effects, JobState.DONE)
    assert next(e for e in effects if isinstance(e, AnswerCall)).answer.transfer == done()


@pytest.mark.parametrize("state", [TransferState.FAILED, TransferState.EXPIRED,
                                   TransferState.CANCELLED])
@pytest.mark.parametrize("when", ["computing", "sending"])
def test_transfer_failing_fails_the_job(state, when):
    job = claimed() if when == "computing" else sending()
    effects = job.transfer_ended(ended(state), now=2.0)
    assert job.state is JobState.FAILED and effects[0] == RecordFailed(state.name.lower())
    finished(effects, JobState.FAILED, "boom", computed=when == "sending")


def test_connector_done_after_the_first_token_answers_from_the_connector_thread():
    job = sending()
    assert job.answer_at_release(done()) == Answer(JobState.DONE, "", done())
    assert job.state is JobState.SENDING  # a query: the tick still finishes the job
    assert job.transfer_ended(done(), now=2.0)  # whose answer then finds the call answered


def test_connector_end_before_the_first_token_is_left_to_the_tick():
    job = claimed()
    assert job.answer_at_release(ended(TransferState.FAILED)) is None
    assert job.answer_at_release(done()) is None  # not possible, and not trusted


def test_transfer_end_after_the_job_ended_is_ignored():
    job = sending()
    job.transfer_ended(done(), now=2.0)
    assert job.transfer_ended(ended(TransferState.CANCELLED), now=3.0) == []
    assert job.abort("late") == [] and job.tick(None, now=3.0, block_size=BS) == []


# ---- aborts and cancelled calls ------------------------------------------------------
def test_abort_of_a_compute_only_job_ends_it_at_once():
    job = early()
    job.claim(CALL, None)
    effects = job.abort("caller cancelled")
    assert job.state is JobState.FAILED
    assert AnswerCall(Answer(JobState.FAILED, "aborted: caller cancelled")) in effects


@pytest.mark.parametrize("when", ["computing", "sending"])
def test_abort_mid_transfer_waits_for_the_connector_before_freeing(when):
    job = claimed() if when == "computing" else sending()
    assert job.abort("decode gave up") == [AbortTransfer("decode gave up")]
    assert job.state is JobState.ABORTING and not job.renews_lease
    assert job.answer_at_release(done()) is None  # DONE racing the abort is not success
    assert job.abort("again") == []
    effects = job.transfer_ended(TransferEnd(TransferState.CANCELLED), now=2.0)
    assert job.state is JobState.FAILED and effects[0] == RecordFailed("cancelled")
    finished(effects, JobState.FAILED, "decode gave up", computed=when == "sending")


def test_transfer_done_racing_an_abort_still_fails_the_job():
    job = sending()
    job.abort("caller cancelled")
    effects = job.transfer_ended(done(), now=2.0)
    assert job.state is JobState.FAILED and effects[0] == RecordFailed("done")
    finished(effects, JobState.FAILED, "caller cancelled")


# ---- every state absorbs what cannot happen to it ------------------------------------
EVENTS = {
    "tick": lambda job: job.tick(FakeEngine(5, 70), now=1.0, block_size=BS),
    "dropped": lambda job: job.tick(None, now=1.0, block_size=BS),
    "done": lambda job: job.transfer_ended(done(), now=1.0),
    "failed": lambda job: job.transfer_ended(ended(TransferState.FAILED), now=1.0),
    "abort": lambda job: job.abort("x"),
}


def _job_in(state: JobState) -> PrefillJob:
    job = {JobState.AWAITING_CLAIM: early, JobState.COMPUTING: claimed,
           JobState.SENDING: sending}.get(state, sending)()
    if state is JobState.ABORTING:
        job.abort("x")
    elif state.ended:
        job.transfer_ended(done() if state is JobState.DONE else ended(TransferState.FAILED), 1.0)
    assert job.state is state
    return job


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("state", list(JobState))
def test_every_event_in_every_state(state, event):
    job = _job_in(state)
    effects = EVENTS[event](job)
    answers = [e for e in effects if isinstance(e, AnswerCall)]
    if state.ended:
        assert effects == [] and job.state is state
    assert len(answers) <= 1
    if answers:  # an answer is given exactly when the job ends, and only once
        assert job.state.ended and answers[0].answer.state is job.state
        assert EVENTS[event](job) == []


def test_destination_must_cover_the_prompt():
    job = early(tokens=70)
    assert job.destination_mismatch(destination(5, first=2), BS) == ""
    assert job.destination_mismatch(destination(4), BS) == \
        "destination covers blocks 0..4 but the prompt has 5 blocks of 16 tokens"


# ---- the book: which call gets which job ---------------------------------------------
def test_early_start_then_prefill_claims_it():
    book = JobBook()
    assert book.route_start("r", "key") is Route.START
    book.add(early())
    assert book.route_call("r", "key", 70) is Route.CLAIM


@pytest.mark.parametrize("key, tokens", [("other", 70), ("", 70), ("key", 69)])
def test_a_call_that_does_not_match_the_early_job_is_refused(key, tokens):
    book = JobBook()
    book.add(early())
    assert book.route_call("r", key, tokens) is Route.IN_FLIGHT
    assert book.route_start("r", "other") is Route.IN_FLIGHT


def test_a_claimed_job_is_not_claimed_twice():
    book = JobBook()
    book.add(claimed())
    assert book.route_call("r", "key", 70) is Route.IN_FLIGHT
    assert book.route_start("r", "key") is Route.IN_FLIGHT


def test_prefill_first_makes_its_start_late_even_after_the_job_ended():
    book = JobBook()
    assert book.route_call("r", "key", 70) is Route.START
    job = PrefillJob.for_call("r", 70, "key", CALL, destination(5))
    book.add(job)
    assert book.route_start("r", "key") is Route.LATE
    job.abort("x")
    job.transfer_ended(TransferEnd(TransferState.CANCELLED), 1.0)
    book.forget_ended(job)
    assert "r" not in book.jobs
    assert book.route_start("r", "key") is Route.LATE
    assert book.route_start("r", "fresh") is Route.START
    assert book.counts == {"claimed": 0, "dropped": 0, "late": 2}


def test_only_a_bounded_number_of_keys_is_remembered():
    book = JobBook(remembered=2)
    for i in range(3):
        book.add(PrefillJob.for_call(f"r{i}", 10, f"k{i}", CALL, None))
    assert book.route_start("x", "k0") is Route.START
    assert book.route_start("x", "k2") is Route.LATE


def test_an_early_start_key_is_not_remembered_as_started_by_prefill():
    book = JobBook()
    job = early()
    book.add(job)
    job.abort("x")
    book.forget_ended(job)
    assert book.route_start("r", "key") is Route.START


def test_forget_ended_keeps_live_jobs_and_others_with_the_id():
    book, job = JobBook(), claimed()
    book.add(job)
    book.forget_ended(job)
    assert book.jobs == {"r": job}
    stale = sending()
    stale.transfer_ended(done(), 1.0)
    book.forget_ended(stale)  # not the job the book holds under "r"
    assert book.jobs == {"r": job}
