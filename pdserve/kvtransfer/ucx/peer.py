"""The sender's state for one receiver (UcxSender keeps one per side-channel address):
its UCX endpoint and connection tag on the tag path, or its mapped pool, control
connection and sender thread on the in-place path. Both paths are handed the Peer;
neither keeps its own."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from pdserve.kvtransfer.control import ControlClient
from pdserve.kvtransfer.serial import SerialThread


@dataclass
class Peer:
    side_channel: str
    data_address: str  # informational (error messages)
    ucx_address: bytes = b""  # the receiver's UCX worker (tag path)
    tag: int = 0  # the tag path's connection tag (even; replies on tag ^ 1)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    endpoint: object = None
    remote_pool: object = None  # the receiver's pool mapped over CUDA IPC, if possible
    control: ControlClient | None = None  # in-place chunks: used by calls run on `direct`
    # in-place transfers admitted (id -> control session) and commits not yet answered
    # (chunk, bytes, start): both only touched by calls run on `direct`
    admitted: dict = field(default_factory=dict)
    unanswered: deque = field(default_factory=deque)
    # GPU pools: recorded after each in-place copy; its IPC handle rides with the commit
    copy_event: object = None
    copy_event_handle: bytes = b""
    # one sender thread per same-host peer: a receiver that stops answering stalls only
    # the chunks bound for it (each waits up to io_timeout_s), not every peer's
    direct: SerialThread | None = None


def run_on(peer: Peer, fn, *args) -> bool:
    """Queue fn on the peer's sender thread; False once that thread was shut down (the
    peer failed and was forgotten between lookup and submit)."""
    return peer.direct.submit(fn, *args)


def close_in_place(peer: Peer, wait: bool = False) -> None:
    """End a peer's in-place path on its sender thread, after the calls queued there:
    close its control connection, unmap its pool (whose memory a mapping keeps taken),
    stop the thread."""
    peer.direct.submit(peer.control.close)
    peer.direct.submit(peer.remote_pool.close)
    peer.direct.shutdown(wait=wait)
