"""SerialThread: calls never overlap, keep submission order, and a caller runs one
itself only while the thread has nothing queued or running."""

import threading
import time

import pytest

from pdserve.kvtransfer.serial import SerialThread


@pytest.fixture
def worker():
    w = SerialThread("test-serial")
    yield w
    w.shutdown(wait=True)


def test_submitted_calls_run_in_order_on_the_thread(worker):
    ran, done = [], threading.Event()
    for i in range(50):
        worker.submit(lambda i=i: ran.append((i, threading.current_thread().name)))
    worker.submit(done.set)
    assert done.wait(5)
    assert [i for i, _ in ran] == list(range(50))
    assert {name for _, name in ran} == {"test-serial"}


def test_idle_thread_lets_the_caller_run_the_call(worker):
    ran_on = []
    assert worker.run_if_idle(lambda: ran_on.append(threading.current_thread()))
    assert ran_on == [threading.current_thread()]


def test_caller_does_not_overtake_queued_or_running_calls(worker):
    release, started = threading.Event(), threading.Event()
    order = []

    def blocker():
        started.set()
        release.wait(5)
        order.append("first")

    worker.submit(blocker)
    assert started.wait(5)
    assert not worker.run_if_idle(order.append, "inline while running")
    worker.submit(order.append, "second")
    release.set()
    while worker.run_if_idle(lambda: None) is False:  # idle again once both ran
        time.sleep(0.001)
    assert order == ["first", "second"]


def test_calls_submitted_during_an_inline_call_wait_for_it(worker):
    order, inner_done = [], threading.Event()

    def inline():
        worker.submit(lambda: (order.append("queued"), inner_done.set()))
        time.sleep(0.05)  # the thread must not start the queued call meanwhile
        order.append("inline")

    assert worker.run_if_idle(inline)
    assert inner_done.wait(5)
    assert order == ["inline", "queued"]


def test_inline_call_raises_to_the_caller_and_frees_the_thread(worker):
    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        worker.run_if_idle(fail)
    assert worker.run_if_idle(lambda: None)


def test_shutdown_runs_what_was_queued_and_refuses_more():
    worker = SerialThread("test-serial-stop")
    ran = []
    worker.submit(time.sleep, 0.05)
    worker.submit(ran.append, 1)
    worker.shutdown(wait=True)
    assert ran == [1]
    assert not worker.submit(ran.append, 2)
    assert not worker.run_if_idle(ran.append, 3)
    assert ran == [1]
