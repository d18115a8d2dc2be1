"""Heartbeats: a silent neighbour's link is closed, but time this peer's own loop spent busy
elsewhere is not silence ([Note: a busy loop is not a silent peer])."""

from __future__ import annotations

import asyncio
import logging
import time


from p2psl.net.neighbour import heartbeat
from p2psl.topology import Timeouts


class QuietChannel:
    """A link whose neighbour never says anything: what `heartbeat` reads and calls."""

    peer = "c1"

    def __init__(self):
        self.last_received = self.last_sent = time.monotonic()
        self.closed = asyncio.Event()
        self.pings = 0

    async def send(self, message) -> None:
        self.pings += 1
        self.last_sent = time.monotonic()

    async def close(self) -> None:
        self.closed.set()


LOG = logging.LoggerAdapter(logging.getLogger("test"), {})


async def test_a_silent_neighbour_is_declared_dead_and_pinged_meanwhile():
    channel = QuietChannel()
    watch = asyncio.ensure_future(heartbeat(channel, Timeouts(heartbeat=0.1, dead=0.5), LOG))
    await asyncio.wait_for(channel.closed.wait(), 30)
    await watch
    assert time.monotonic() - channel.last_received > 0.5
    assert channel.pings >= 2


async def test_time_the_loop_was_blocked_is_not_held_against_the_neighbour():
    channel = QuietChannel()
    watch = asyncio.ensure_future(heartbeat(channel, Timeouts(heartbeat=0.2, dead=1.0), LOG))
    await asyncio.sleep(0.15)
    time.sleep(3.0)  # the whole loop is busy: neither peer could have been heard
    await asyncio.sleep(0.25)  # the heartbeat wakes, late, and looks
    assert not channel.closed.is_set()
    await asyncio.wait_for(channel.closed.wait(), 30)  # real silence afterwards still counts
    await watch
