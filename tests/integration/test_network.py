"""Real WebSocket peers on loopback (port 0): handshake, routing, refusal, hostile frames, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import aiohttp
import cbor2
import pytest
import torch

from p2psl import PROTOCOL_VERSION
from p2psl.wire import codec
from p2psl.net.channel import open_as_dialler
from p2psl.errors import AuthError, PeerTimeout, TransportError
from p2psl.wire.messages import Activation, Error, Greeting, Hello, Routed
from p2psl.net.network import Network
from p2psl.net.transport import MAX_LINK_FRAME, PATH, dial
from tests.helpers import make_topology

SECRET = b"correct horse battery staple"
FAST = {"connect": "10s", "handshake": "5s", "heartbeat": "0.5s", "dead": "5s"}


class Peer:
    """A Network plus an inbox of what its handler received."""

    def __init__(self, topology, name, secret=SECRET):
        self.name = name
        self.inbox: asyncio.Queue[Routed] = asyncio.Queue()
        self.events: list[tuple[str, bool]] = []
        self.net = Network(topology, name, secret, self.inbox.put,
                           on_peer=lambda n, up, why: self.events.append((n, up)),
                           addresses={name: ("127.0.0.1", 0)})

    async def next(self, timeout=5.0) -> Routed:
        return await asyncio.wait_for(self.inbox.get(), timeout)


@contextlib.asynccontextmanager
async def running(topology, secrets: dict | None = None):
    peers = {n: Peer(topology, n, (secrets or {}).get(n, SECRET)) for n in topology.names}
    try:
        for p in peers.values():
            await p.net.listen()
        ports = {n: ("127.0.0.1", p.net.port) for n, p in peers.items()}
        for p in peers.values():
            p.net.connect(ports)
        yield peers
    finally:
        for p in peers.values():
            await p.net.stop()


def greeting(src, dst):
    return Greeting(src=src, dst=dst, role="data_owner", completed_round=0, resume=False, dataset={})


async def test_peers_connect_and_route_messages():
    topo = make_topology(["alice", "bob"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        for p in peers.values():
            await p.net.wait_connected(timeout=5)
        x = torch.randn(8, 4)
        await peers["alice"].net.send(Activation(src="alice", dst="c1", epoch=0, owner="alice", round=1, batch=1,
                                                 part=1, train=True, x=x))
        got = await peers["c1"].next()
        assert isinstance(got, Activation) and torch.equal(got.x, x)
        assert peers["alice"].net.bytes_sent > x.numel() * 4
        assert peers["c1"].net.bytes_received > x.numel() * 4


async def test_messages_to_non_neighbours_are_relayed():
    topo = make_topology(["alice", "bob"], ["c1"], links=[("alice", "c1"), ("bob", "c1")], timeouts=FAST)
    async with running(topo) as peers:
        for p in peers.values():
            await p.net.wait_connected(timeout=5)
        assert "bob" not in peers["alice"].net.neighbours
        await peers["alice"].net.send(greeting("alice", "bob"))
        got = await peers["bob"].next()
        assert got.src == "alice" and got.dst == "bob"


async def test_wrong_secret_is_refused_with_an_explanation():
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo, secrets={"c1": b"not the secret"}) as peers:
        with pytest.raises(PeerTimeout) as info:
            await peers["alice"].net.wait_connected(timeout=1.5)
        assert "secret" in str(info.value)
        assert not peers["c1"].net.is_up("alice")


async def test_missing_secret_or_stranger_is_refused():
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)
        # a stranger that knows nothing: sends a hello with a made-up name
        link = await dial("127.0.0.1", peers["c1"].net.port, 2)
        try:
            await link.send(codec.encode(Hello(name="mallory", topology=topo.digest, nonce=b"n" * 32))[0])
            reply = codec.decode(await link.recv())
            assert isinstance(reply, Error) and reply.code == "not_admitted"
        finally:
            await link.close()
        # a known name without the secret gets a challenge but cannot answer it
        link = await dial("127.0.0.1", peers["c1"].net.port, 2)
        try:
            with pytest.raises((AuthError, TransportError)):
                await open_as_dialler(link, "alice", "c1", b"guess", topo.digest, 2)
        finally:
            await link.close()
        assert peers["c1"].net.is_up("alice")  # the real alice is unaffected


async def _raw_ws(port):
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(f"ws://127.0.0.1:{port}{PATH}", max_msg_size=0)
    return session, ws


def junk_frames():
    def frame(header, payload=b""):
        head = cbor2.dumps(header)
        return struct.pack(">I", len(head)) + head + payload

    return {
        "not_cbor": b"\x00\x00\x00\x03\xff\xfe\xfd",
        "unknown_kind": frame({"v": PROTOCOL_VERSION, "kind": "teleport"}),
        "wrong_types": frame({"v": PROTOCOL_VERSION, "kind": "hello", "name": 5, "topology": [], "nonce": "x"}),
        "wrong_version": frame({"v": 99, "kind": "hello"}),
    }


@pytest.mark.parametrize("kind", sorted(junk_frames()))
async def test_junk_before_the_handshake_is_refused_and_the_peer_serves_on(kind):
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)
        session, ws = await _raw_ws(peers["c1"].net.port)
        try:
            await ws.send_bytes(junk_frames()[kind])
            reply = await ws.receive(timeout=3)
            if reply.type == aiohttp.WSMsgType.BINARY:
                assert isinstance(codec.decode(reply.data), Error)
                reply = await ws.receive(timeout=3)
            assert reply.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        finally:
            await session.close()
        await peers["alice"].net.send(greeting("alice", "c1"))
        assert (await peers["c1"].next()).src == "alice"


async def test_junk_after_the_handshake_gets_typed_errors_and_the_link_goes_on():
    """An authenticated neighbour that sends garbage is answered, logged, and still served."""
    topo = make_topology(["alice", "bob"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["c1"].net.wait_connected(["alice"], timeout=5)
        await peers["alice"].net.wait_connected(["c1"], timeout=5)
        channel = peers["alice"].net.neighbours["c1"].channel
        for name, frame in junk_frames().items():
            if name == "wrong_version":
                continue
            async with channel._send_lock:
                await channel.link.send(channel._sealer.seal(frame))
        # a routed message with a spoofed source, and a handshake message out of place
        spoofed = greeting("bob", "c1")
        await channel.send(spoofed, peers["alice"].net.neighbours["c1"].session.stamp(spoofed))
        await channel.send(Hello(name="alice", topology=topo.digest, nonce=b"n" * 32))
        # the real traffic still flows
        await peers["alice"].net.send(greeting("alice", "c1"))
        got = await peers["c1"].next()
        assert got.src == "alice"
        assert peers["c1"].inbox.empty()  # the spoofed greeting was not delivered
        assert peers["alice"].net.is_up("c1") and peers["c1"].net.is_up("alice")


async def test_oversized_frame_closes_only_that_connection():
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)
        session, ws = await _raw_ws(peers["c1"].net.port)
        try:
            try:
                await ws.send_bytes(b"\0" * (MAX_LINK_FRAME + 1))
            except ConnectionError:
                pass  # the peer may hang up before it has read the whole frame
            reply = await ws.receive(timeout=3)
            assert reply.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            assert ws.closed
        finally:
            await session.close()
        await peers["alice"].net.send(greeting("alice", "c1"))
        assert (await peers["c1"].next()).src == "alice"


async def test_replayed_frame_is_rejected_and_closes_the_link():
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)
        neighbour = peers["alice"].net.neighbours["c1"]
        channel, message = neighbour.channel, greeting("alice", "c1")
        frame = channel._sealer.seal(codec.encode(message, 1, neighbour.session.stamp(message))[0])
        await channel.link.send(frame)
        assert (await peers["c1"].next()).src == "alice"
        await channel.link.send(frame)  # the same sealed frame again
        # c1 drops the connection; alice redials and the link heals
        for _ in range(50):
            if ("c1", False) in peers["alice"].events:
                break
            await asyncio.sleep(0.05)
        assert ("c1", False) in peers["alice"].events
        await peers["alice"].net.wait_connected(timeout=5)
        await peers["alice"].net.send(greeting("alice", "c1"))
        assert (await peers["c1"].next()).src == "alice"
        assert peers["c1"].inbox.empty()  # the replayed frame was never delivered, the resent one once


async def test_a_routed_message_without_a_sequence_number_is_refused():
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)
        await peers["c1"].net.wait_connected(timeout=5)
        await peers["alice"].net.neighbours["c1"].channel.send(greeting("alice", "c1"))
        await peers["alice"].net.wait_connected(timeout=5)
        await peers["alice"].net.send(greeting("alice", "c1"))
        got = await peers["c1"].next()
        assert got.src == "alice" and peers["c1"].inbox.empty()


async def test_messages_survive_a_dropped_connection_exactly_once():
    """Messages sent around a reconnection arrive once each, in order ([Note: link sessions])."""
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)
        await peers["c1"].net.wait_connected(timeout=5)
        sent = []
        for i in range(1, 61):
            x = torch.full((4,), float(i))
            message = Activation(src="alice", dst="c1", epoch=0, owner="alice", round=1, batch=i, part=1, train=True, x=x)
            await peers["alice"].net.send(message)
            sent.append(i)
            if i in (20, 40):  # break the connection under the traffic, from either side
                side = "alice" if i == 20 else "c1"
                other = "c1" if side == "alice" else "alice"
                await peers[side].net.wait_connected(timeout=5)
                await peers[side].net.neighbours[other].channel.link.close()
        got = [(await peers["c1"].next()).batch for _ in sent]
        assert got == sent
        assert peers["c1"].inbox.empty()
        session = peers["alice"].net.neighbours["c1"].session
        async with asyncio.timeout(5):
            while session.unacked:  # every message is acknowledged in the end
                await asyncio.sleep(0.02)


async def test_a_message_the_wire_cannot_carry_fails_its_sender_and_the_link_goes_on():
    """A tensor of a dtype the wire format lacks is this side's error, raised to whoever sends
    it; its link-session number is not used up, so what follows is delivered in order."""
    from p2psl.errors import LocalProtocolError

    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)

        def activation(batch, x):
            return Activation(src="alice", dst="c1", epoch=0, owner="alice", round=1, batch=batch, part=1,
                              train=True, x=x)

        await peers["alice"].net.send(activation(1, torch.ones(2)))
        with pytest.raises(LocalProtocolError, match="torch.bool, which the wire format does not carry"):
            await peers["alice"].net.send(activation(2, torch.ones(2, dtype=torch.bool)))
        await peers["alice"].net.send(activation(3, torch.ones(2)))
        assert [(await peers["c1"].next()).batch for _ in range(2)] == [1, 3]
        assert peers["alice"].net.neighbours["c1"].session.next_seq == 3
        assert ("alice", False) not in peers["c1"].events  # the link never went down


async def test_broken_link_is_redialled():
    topo = make_topology(["alice"], ["c1"], timeouts=FAST)
    async with running(topo) as peers:
        await peers["alice"].net.wait_connected(timeout=5)
        await peers["c1"].net.neighbours["alice"].channel.close()
        await asyncio.sleep(0.2)
        await peers["alice"].net.wait_connected(timeout=5)
        await peers["c1"].net.wait_connected(timeout=5)
        await peers["alice"].net.send(greeting("alice", "c1"))
        assert (await peers["c1"].next()).src == "alice"
        assert peers["alice"].events.count(("c1", True)) == 2
