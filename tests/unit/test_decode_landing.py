"""The decode call's wait for a transfer's last data after the Prefill call answered
DONE: event-driven (the receiver's on_done / on_release), not a thread polling it."""

import asyncio
import threading
import time
from types import SimpleNamespace

from pdserve.services.decode.service import _first_end


def _handoff(loop):
    return SimpleNamespace(landed=loop.create_future(), released=asyncio.Event())


def test_the_wait_ends_when_the_kv_lands_or_the_transfer_ends_otherwise():
    async def run(end: str) -> float:
        loop = asyncio.get_running_loop()
        handoff = _handoff(loop)
        threads = threading.active_count()
        if end == "landed":
            loop.call_later(0.05, handoff.landed.set_result, "status")
        elif end == "released":
            loop.call_later(0.05, handoff.released.set)
        start = time.monotonic()
        await _first_end(handoff, timeout_s=0.5)
        assert threading.active_count() == threads  # no executor thread was taken
        assert not handoff.landed.cancelled()  # the hand-off stays usable after a timeout
        return time.monotonic() - start

    assert asyncio.run(run("landed")) < 0.4
    assert asyncio.run(run("released")) < 0.4
    assert asyncio.run(run("neither")) >= 0.5
