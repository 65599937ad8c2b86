"""ChannelPool.discard_if_failed: a channel waiting out its reconnect backoff is dropped
when its peer is back, so the first request after a worker restart gets a fresh
connection instead of failing fast on the old channel (issue 17, item 5)."""

from __future__ import annotations

import asyncio
import socket

import grpc

from pdserve.services.common import ChannelPool


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_state(channel, wanted, timeout_s: float = 10.0) -> None:
    async def loop():
        state = channel.get_state(try_to_connect=True)
        while state is not wanted:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)
    await asyncio.wait_for(loop(), timeout_s)


def test_failed_channel_is_discarded_and_replaced():
    async def scenario():
        address = f"127.0.0.1:{unused_port()}"  # nothing listens: connecting fails
        pool = ChannelPool(None)
        first = pool.get(address)
        await _wait_state(first, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
        stale = pool.discard_if_failed(address)
        assert stale is first
        await stale.close()
        second = pool.get(address)
        assert second is not first
        await pool.close()
    asyncio.run(scenario())


def test_connected_channel_is_kept():
    async def scenario():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
        pool = ChannelPool(None)
        channel = pool.get(address)
        await _wait_state(channel, grpc.ChannelConnectivity.READY)
        assert pool.discard_if_failed(address) is None
        assert pool.discard_if_failed("127.0.0.1:1") is None  # never asked for: nothing
        assert pool.get(address) is channel
        await pool.close()
        await server.stop(None)
    asyncio.run(scenario())
