"""Links without sockets: the in-memory pair and the emulated (shaped) link."""

from __future__ import annotations

import asyncio

import pytest

from p2psl.errors import BrokenError, ClosedError
from p2psl.net.transport import ShapedLink, memory_pair


async def test_memory_pair_carries_frames_both_ways_and_reports_who_closed():
    a, b = memory_pair("a", "b")
    await a.send(b"ping")
    assert await b.recv() == b"ping"
    await b.send(b"pong")
    assert await a.recv() == b"pong"
    await a.close()
    with pytest.raises(BrokenError):
        await b.recv()
    with pytest.raises(ClosedError):
        await a.send(b"late")


async def test_shaped_link_holds_each_frame_for_its_bytes_over_the_bandwidth():
    a, b = memory_pair()
    link = ShapedLink(a, bandwidth=100_000.0, latency=0.0)  # 100 kB/s
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(4):
        await link.send(b"x" * 5_000)  # 4 × 50 ms on the wire, one after the other
    assert loop.time() - start >= 0.19
    assert [len(await b.recv()) for _ in range(4)] == [5_000] * 4


async def test_shaped_link_delays_delivery_keeps_order_and_delivers_before_closing():
    a, b = memory_pair()
    link = ShapedLink(a, bandwidth=None, latency=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(5):
        await link.send(bytes([i]))  # the sender does not wait for the latency
    assert loop.time() - start < 0.05
    await link.close()  # the frames still on the wire arrive, then the end of the stream
    assert [await b.recv() for _ in range(5)] == [bytes([i]) for i in range(5)]
    assert loop.time() - start >= 0.05
    with pytest.raises(BrokenError):
        await b.recv()
