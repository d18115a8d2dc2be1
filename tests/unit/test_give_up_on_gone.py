"""A routed send waiting for a link that is down gives up as soon as the runtime counts its
destination or its next hop gone (docs/protocol.md §11, `gone`; §16 "Gone"), instead of waiting
out its timeout; one still wanted keeps waiting. No sockets: the link never comes up."""

from __future__ import annotations

import asyncio

import pytest

from p2psl.errors import PeerTimeout
from p2psl.net.network import Network
from p2psl.wire.messages import Done
from tests.helpers import make_topology


async def nothing(message) -> None:
    pass


def network() -> Network:
    # a line alice – c1 – bob: alice reaches bob through c1
    topology = make_topology(["alice", "bob"], ["c1"], links=[("alice", "c1"), ("c1", "bob")])
    return Network(topology, "alice", b"secret", nothing)


async def waiting(task: asyncio.Task) -> None:
    """Let the send start and park on the down link (a few turns of the loop, no clock)."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()


@pytest.mark.parametrize("declared", ["bob", "c1"])  # the destination, or the hop on the way to it
async def test_a_send_to_a_peer_declared_gone_while_waiting_fails_at_once(declared):
    net, gone = network(), set()
    task = asyncio.ensure_future(net.send(Done(src="alice", dst="bob", round=1), timeout=3600,
                                          abandon=gone.__contains__))
    await waiting(task)
    net.news()                     # news that changes nothing: it keeps waiting
    await waiting(task)
    gone.add(declared)
    net.news()
    with pytest.raises(PeerTimeout, match="gone"):
        async with asyncio.timeout(5):
            await task


async def test_a_send_to_a_peer_already_gone_does_not_wait():
    net = network()
    with pytest.raises(PeerTimeout, match="gone"):
        async with asyncio.timeout(5):
            await net.send(Done(src="alice", dst="c1", round=1), timeout=3600, abandon=lambda name: True)


async def test_without_abandon_the_send_waits_for_its_link():
    net = network()
    task = asyncio.ensure_future(net.send(Done(src="alice", dst="bob", round=1), timeout=3600))
    await waiting(task)
    net.news()
    await waiting(task)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
