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


async def test_a_connection_accepted_as_the_server_stops_is_closed_with_it():
    """A dialler whose connection the kernel accepted just before the server stops: the server
    must close that connection too, not leave an open socket behind (a ResourceWarning, and a
    dialler that waits for an answer)."""
    import gc
    import socket
    import warnings

    from p2psl.net.transport import Server

    async def serve(link) -> None:
        await link.recv()

    server = Server(serve)
    await server.start("127.0.0.1", 0)
    with socket.create_connection(("127.0.0.1", server.port)) as dialler:
        # turn 1: the listener accepts and queues its accept task; turn 2: this test resumes
        # before that task's first step, so the server stops with the connection half taken in
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await server.stop()
            for _ in range(5):
                await asyncio.sleep(0)
            gc.collect()
        dialler.settimeout(10)
        try:
            ended = dialler.recv(1) == b""  # closed, or reset: either way the dialler learns it
        except ConnectionResetError:
            ended = True
        assert ended, "the server left the accepted connection open"
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


async def test_stopping_closes_a_channel_that_its_link_let_go_of_while_bye_was_sent():
    """The link's own task drops a neighbour's channel when the other side closes first, which
    may happen while `Links.stop` awaits its bye: stop still closes that channel, and no
    AttributeError escapes (it did, as an internal error at the end of a run)."""
    from p2psl.net.links import Links
    from tests.helpers import make_topology

    links = Links(make_topology(["alice"], ["c1"]), "c1", b"secret", lambda message: None)
    neighbour = links.neighbours["alice"]
    closed = []

    class Channel:
        async def send(self, message):
            neighbour.channel = None  # the other side closed: the link's task let go of it

        async def close(self):
            closed.append(True)

    neighbour.channel = Channel()
    await links.stop()
    assert closed == [True]
