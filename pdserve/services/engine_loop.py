"""Runs an LLMEngine on its own thread so gRPC I/O and model steps never block each other.

Everything that touches the engine (adding, aborting, stepping, KV bookkeeping) runs on
the engine thread; asyncio code submits work with `call()` and awaits the result. A short
command on a latency-critical path may pass inline=True: when the engine thread is idle
and nothing is queued it runs at once on the caller's thread (under the lock the engine
thread holds while it works), saving two thread hand-offs; otherwise it is queued. Step
outputs are handed to per-request asyncio queues with one event-loop callback per step
(not one per request: each wakes the loop and takes the GIL), so a slow client only grows
its own queue and never stalls the step loop or other streams; `next_output` merges what
such a client left queued into one output.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import replace
from typing import Any, Callable

from pdserve.engine.engine import LLMEngine, RequestOutput

log = logging.getLogger(__name__)

Tick = Callable[[LLMEngine, list[RequestOutput]], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop,
                 tick: Tick | None = None, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._loop = loop
        self._tick = tick
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._stop = threading.Event()
        self._busy = threading.Lock()  # held while a thread touches the engine
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Run a tick now even if the engine is idle (e.g. a transfer ended); any thread."""
        self._commands.put((_noop, (), None))

    # ---- asyncio side ----------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any, inline: bool = False) -> Any:
        """Run fn(*args) on the engine thread; its result or exception comes back here."""
        if inline and self._idle_lock():
            return self._run_inline(fn, args)
        future = self._loop.create_future()
        self._commands.put((fn, args, future))
        return await future

    def submit(self, fn: Callable[..., Any], *args: Any, inline: bool = False) -> None:
        """Fire-and-forget variant of call(); safe from any thread."""
        if inline and self._idle_lock():
            self._run_inline(self._execute, (fn, args, None))  # logs what fn raises
            return
        self._commands.put((fn, args, None))

    def _idle_lock(self) -> bool:
        """Take the engine if its thread is idle and no queued command would be overtaken."""
        if not self._commands.empty() or not self._busy.acquire(blocking=False):
            return False
        if self._commands.empty():
            return True
        self._busy.release()
        return False

    def _run_inline(self, fn, args):
        try:
            return fn(*args)
        finally:
            self._busy.release()
            self.wake()  # the engine thread steps whatever became runnable

    def open_stream(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    # ---- engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        runnable = False
        while not self._stop.is_set():
            # nothing to compute (requests waiting for their KV included): sleep until a
            # command or wake(), ticking every idle_wait_s (leases); never spin on the GIL
            item = self._next_command(0.0 if runnable else self._idle_wait_s)
            with self._busy:
                runnable = self._iterate(item)

    def _iterate(self, item) -> bool:
        """Queued commands, one step if anything can run, the commands queued meanwhile,
        the tick; True if more can run."""
        self._drain_commands(item)
        outputs: list[RequestOutput] = []
        if self.engine.has_runnable():
            try:
                outputs = self.engine.step()
            except Exception:  # pragma: no cover - a bug; fail loudly, keep serving
                log.exception("engine step failed")
                self._fail_all("internal error in the engine step")
            # what arrived during the step (e.g. a call claiming the prompt just computed)
            # is seen by this step's tick, not one loop round later
            self._drain_commands(self._next_command(0.0))
        self._deliver(outputs)
        if self._tick is not None:
            try:
                self._tick(self.engine, outputs)
            except Exception:  # pragma: no cover - a bug; keep the loop serving
                log.exception("engine tick failed")
        return self.engine.has_runnable()

    def _next_command(self, wait_s: float):
        """The first queued command, waiting up to wait_s for one (None: nothing came)."""
        try:
            return self._commands.get(timeout=wait_s) if wait_s > 0 else \
                self._commands.get_nowait()
        except queue.Empty:
            return None

    def _drain_commands(self, item) -> None:
        while item is not None:
            self._execute(*item)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, fn, args, future) -> None:
        try:
            result = fn(*args)
        except Exception as exc:  # handed to the awaiting coroutine
            if future is not None:
                self._loop.call_soon_threadsafe(set_exception_if_pending, future, exc)
            else:
                log.exception("engine command failed")
            return
        if future is not None:
            self._loop.call_soon_threadsafe(set_result_if_pending, future, result)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        routed = [(q, out) for out in outputs
                  if (q := self._streams.get(out.request_id)) is not None]
        if routed:
            self._loop.call_soon_threadsafe(_put_all, routed)

    def deliver(self, out: RequestOutput) -> None:
        q = self._streams.get(out.request_id)
        if q is not None:
            self._loop.call_soon_threadsafe(q.put_nowait, out)

    def _fail_all(self, message: str) -> None:
        for request_id in self.engine.request_ids():
            self.engine.abort(request_id)
            self.deliver(RequestOutput(request_id, [], "", finished=True,
                                       finish_reason=f"error: {message}"))


def _noop() -> None:
    pass


def _put_all(routed: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in routed:
        q.put_nowait(out)


async def next_output(stream: asyncio.Queue) -> RequestOutput:
    """The next output of a stream, merged with the ones queued behind it (the reader fell
    behind the engine): their tokens and text in order, the last one's state."""
    parts = [await stream.get()]
    while not parts[-1].finished and not stream.empty():
        parts.append(stream.get_nowait())
    if len(parts) == 1:
        return parts[0]
    return replace(parts[-1], new_token_ids=[t for p in parts for t in p.new_token_ids],
                   text_delta="".join(p.text_delta for p in parts))


def set_result_if_pending(future: asyncio.Future, result: Any) -> None:
    """For loop.call_soon_threadsafe from another thread: the future may have been
    cancelled (its caller gave up) by the time this runs."""
    if not future.done():
        future.set_result(result)


def set_exception_if_pending(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
