"""Handshake refusals carry their wire code and the peer they concern, so that a peer can tell
the ones no retry can heal ([Note: refusals for good] in p2psl.net.dialling) from passing trouble."""

from __future__ import annotations

import asyncio

import cbor2
import pytest

from p2psl import PROTOCOL_VERSION
from p2psl.errors import AuthError
from p2psl.net.channel import open_as_dialler, open_as_listener
from p2psl.net.dialling import FOR_GOOD
from p2psl.net.transport import memory_pair

DIGEST = "d" * 64


async def handshake(dialler_secret: bytes, listener_secret: bytes, dialler_digest: str = DIGEST):
    """alice dials c1 over an in-memory link; returns (dialler's error, listener's error)."""
    near, far = memory_pair("alice", "c1")

    async def side(coro):
        try:
            await coro
        except AuthError as exc:
            return exc
        return None

    async with asyncio.timeout(10):
        return await asyncio.gather(
            side(open_as_dialler(near, "alice", "c1", dialler_secret, dialler_digest, 5)),
            side(open_as_listener(far, "c1", listener_secret, DIGEST, 5, lambda name: None)))


async def test_another_secret_is_refused_for_good_on_both_sides_naming_the_other():
    dialler, listener = await handshake(b"one secret", b"another secret")
    assert (dialler.code, dialler.peer, listener.code, listener.peer) == ("auth_failed", "c1", "auth_failed", "alice")
    assert "secret" in str(dialler) and "secret" in str(listener)
    assert {dialler.code, listener.code} <= FOR_GOOD


async def test_another_topology_file_is_refused_for_good_on_both_sides_naming_the_other():
    dialler, listener = await handshake(b"s", b"s", dialler_digest="e" * 64)
    assert (dialler.code, dialler.peer, listener.code, listener.peer) == ("topology", "c1", "topology", "alice")
    assert "different topology file" in str(listener)


async def test_another_protocol_version_is_refused_for_good_by_the_dialler():
    """The listener answers in a version the dialler does not speak."""
    near, far = memory_pair("alice", "c1")
    dialling = asyncio.ensure_future(open_as_dialler(near, "alice", "c1", b"s", DIGEST, 5))
    await far.recv()  # the hello
    header = cbor2.dumps({"v": PROTOCOL_VERSION + 1, "kind": "challenge", "name": "c1", "nonce": bytes(32), "proof": bytes(32)})
    await far.send(len(header).to_bytes(4, "big") + header)
    with pytest.raises(AuthError) as info:
        async with asyncio.timeout(10):
            await dialling
    assert (info.value.code, info.value.peer) == ("version", "c1")
    assert "another protocol version" in str(info.value)


async def test_a_hello_in_another_protocol_version_is_refused_for_good_by_the_listener_naming_its_sender():
    """A dialler of another version says hello: the listener reads the name from the header it
    cannot otherwise decode, tells the dialler why, and names the neighbour in its refusal."""
    near, far = memory_pair("alice", "c1")
    listening = asyncio.ensure_future(open_as_listener(far, "c1", b"s", DIGEST, 5, lambda name: None))
    header = cbor2.dumps({"v": PROTOCOL_VERSION + 1, "kind": "hello", "name": "alice", "topology": DIGEST, "nonce": bytes(32)})
    await near.send(len(header).to_bytes(4, "big") + header)
    with pytest.raises(AuthError) as info:
        async with asyncio.timeout(10):
            await listening
    assert (info.value.code, info.value.peer) == ("version", "alice")
    assert "alice" in str(info.value) and "another protocol version" in str(info.value)
    assert info.value.code in FOR_GOOD
    reply = cbor2.loads((await near.recv())[4:])
    assert (reply["kind"], reply["code"]) == ("error", "version")


async def test_a_nameless_frame_in_another_version_is_refused_without_a_name():
    near, far = memory_pair("alice", "c1")
    listening = asyncio.ensure_future(open_as_listener(far, "c1", b"s", DIGEST, 5, lambda name: None))
    header = cbor2.dumps({"v": 7, "kind": "hello", "name": 12})
    await near.send(len(header).to_bytes(4, "big") + header)
    with pytest.raises(AuthError) as info:
        async with asyncio.timeout(10):
            await listening
    assert (info.value.code, info.value.peer) == ("version", None)
