"""EngineLoop's hand-off of step outputs to the asyncio side, with a fake engine."""

from __future__ import annotations

import asyncio

from pdserve.engine.engine import RequestOutput
from pdserve.services.engine_loop import EngineLoop, next_output


class StepsOfThree:
    """An engine whose every step emits one token for each of three requests."""

    def __init__(self, steps: int) -> None:
        self.left = steps
        self.ids = ["a", "b", "c"]

    def has_runnable(self) -> bool:
        return self.left > 0

    def step(self) -> list[RequestOutput]:
        self.left -= 1
        return [RequestOutput(rid, [self.left], str(self.left), finished=self.left == 0)
                for rid in self.ids]

    def request_ids(self) -> list[str]:
        return list(self.ids)


def test_one_event_loop_callback_per_step_not_per_request():
    aio = asyncio.new_event_loop()
    wakeups = []
    real = aio.call_soon_threadsafe

    def counting(callback, *args):
        wakeups.append(callback)
        return real(callback, *args)

    aio.call_soon_threadsafe = counting
    engine = StepsOfThree(steps=4)
    loop = EngineLoop(engine, aio)  # type: ignore[arg-type]
    streams = {rid: loop.open_stream(rid) for rid in ("a", "b")}  # "c" has no reader

    async def read_all(stream) -> list[int]:
        tokens, out = [], None
        while out is None or not out.finished:
            out = await asyncio.wait_for(stream.get(), 10)
            tokens += out.new_token_ids
        return tokens

    async def read_both() -> list[list[int]]:
        return list(await asyncio.gather(*(read_all(s) for s in streams.values())))

    loop.start()
    try:
        got = aio.run_until_complete(read_both())
    finally:
        loop.stop()
        aio.close()
    assert got == [[3, 2, 1, 0], [3, 2, 1, 0]]
    assert len(wakeups) == 4  # one per step, for both streams


def test_next_output_merges_what_a_slow_reader_left_queued():
    async def scenario():
        stream: asyncio.Queue = asyncio.Queue()
        for i, done in ((1, False), (2, False), (3, True)):
            stream.put_nowait(RequestOutput("r", [i], f"t{i}", finished=done,
                                            num_output_tokens=i, itl_s=[0.1] * (i - 1)))
        stream.put_nowait(RequestOutput("r", [99], "late"))  # never read past the end
        merged = await next_output(stream)
        return merged, stream.qsize()

    merged, left = asyncio.run(scenario())
    assert merged.new_token_ids == [1, 2, 3] and merged.text_delta == "t1t2t3"
    assert merged.finished and merged.num_output_tokens == 3 and merged.itl_s == [0.1, 0.1]
    assert left == 1


def test_next_output_returns_a_lone_output_unchanged():
    async def scenario():
        stream: asyncio.Queue = asyncio.Queue()
        only = RequestOutput("r", [7], "x")
        stream.put_nowait(only)
        return only, await next_output(stream)

    only, got = asyncio.run(scenario())
    assert got is only
