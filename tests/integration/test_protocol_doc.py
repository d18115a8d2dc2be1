"""docs/protocol.md is enough to write a compatible peer: a minimal one, written from the
document alone, talks to real p2psl peers over real WebSockets on loopback — the handshake,
sealed frames, link sessions (a refused message uses up its number), chunking, relaying,
routed errors both ways, a deployment's rounds with a real compute node, and an owner that
restarts and rejoins (join_info, adopt, joining).

Everything under "The independent peer" uses only the document, cbor2, hmac/hashlib,
cryptography (AES-GCM), struct, aiohttp and numpy — nothing from p2psl. p2psl is imported only to *start* the peers under test
(a `Network` with a recording handler, or a full `Peer`) and to build their topology; the
assertions compare what the p2psl side received (decoded by p2psl) with what the independent
peer encoded by hand, and vice versa.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import struct
from pathlib import Path

import aiohttp
import numpy as np
import torch
from aiohttp import web

# p2psl only *starts* the peers under test and builds their topology; the independent peer
# below uses none of it.
from p2psl.errors import RemoteProtocolError
from p2psl.wire.messages import Error, Gradient, Greeting, ReducePart
from p2psl.net.network import Network
from p2psl.runtime.peer import Peer, PeerOptions
from p2psl.topology import parse_topology
from tests.helpers import free_ports, topology_toml

# The independent peer's wire part (docs/protocol.md only) lives in doc_peer.py.
from tests.integration.doc_peer import (  # noqa: F401
    CHUNK, DTYPES, MAC_LEN, MAX_FRAME, MAX_HEADER, MAX_WS_MESSAGE, NONCE_LEN, TAGS, VERSION, Link,
    Reassembler, Session, accept, dial, frames_of, gmac_nonce, gmac_tag, hmac256, pack, plan_digest,
    refused, route, topology_digest, transcript, unpack)


#: docs/protocol.md §19, the channels-last `activation`
CHANNELS_LAST_ACTIVATION = (
    "0000007cad617602646b696e646a61637469766174696f6e6373726365616c696365636473746263316565706f636800656f776e"
    "657265616c69636565726f756e64016562617463680164706172740165747261696ef56774656e736f72738183617818558401020102"
    "6d6368616e6e656c735f6c617374816178637365710100000000000020410000803f00003041")


def test_the_documented_test_vectors():
    """docs/protocol.md §19, reproduced by the independent implementation."""
    secret, digest = b"correct horse battery staple", hashlib.sha256(b"example topology").hexdigest()
    script = transcript("alice", "c1", digest, bytes(range(32)), bytes(range(32, 64)))
    assert len(script) == 160
    assert hmac256(secret, b"p2psl-listener" + script).hex() == \
        "c9d269a2fbba4132323c4410c89f0faa83635b3412989404e8e03cf4a34bdb30"
    assert hmac256(secret, b"p2psl-dialler" + script).hex() == \
        "b03085f9af66a2b4d63728580718891ffbac64d0f5efc02dfc415927ba9a8e2e"
    d2l = hmac256(secret, b"p2psl-key-d2l" + script)
    assert d2l.hex() == "2b9e2ae772cefb7154c067ee542721aaa048f77d84b052524f756873f0fa92d0"
    assert hmac256(secret, b"p2psl-key-l2d" + script).hex() == \
        "591b0e0aed580f3464d83ef9ee838b6cd883817377d0daf8b867efa95b6e5f2b"
    ping = frames_of("ping", {"sent": 1.5})[0]
    assert ping.hex() == "0000001ca3617602646b696e646470696e676473656e74fb3ff8000000000000"
    assert gmac_nonce(1).hex() == "000000000000000000000001"
    link = Link(None, "alice", "c1", d2l, b"", Session())
    first, second = link.seal(ping), link.seal(ping)
    assert first[:-MAC_LEN] == second[:-MAC_LEN] == ping
    assert first[-MAC_LEN:].hex() == "084e5001c364e8ee16a724f04a38d62d"
    assert second[-MAC_LEN:].hex() == "e75c75c883a8a77e8541e4f7818e63bc"
    listener = Link(None, "c1", "alice", b"", d2l, Session())   # the other end opens both, in order
    assert listener.open_(first) == ping and listener.open_(second) == ping
    activation = frames_of("activation", {"src": "alice", "dst": "c1", "epoch": 0, "owner": "alice", "round": 1,
                                          "batch": 1, "part": 1, "train": True},
                           [("x", np.array([[1.0, -2.0]], np.float32))], seq=1)[0]
    assert activation.hex() == (
        "00000069ac617602646b696e646a61637469766174696f6e6373726365616c696365636473746263316565706f636800656f776e"
        "657265616c69636565726f756e64016562617463680164706172740165747261696ef56774656e736f727381836178185582010263"
        "736571010000803f000000c0")
    # the channels-last activation: the bytes are the [N, H, W, C] array (§5)
    cl = bytes.fromhex(CHANNELS_LAST_ACTIVATION)
    message = Reassembler().feed(cl)
    assert message["channels_last"] == ["x"] and message["tensors"]["x"].tolist() == [[[[0.0, 1.0]], [[10.0, 11.0]]]]
    adopt = frames_of("adopt", {"src": "alice", "dst": "bob", "epoch": 0, "round": 1},
                      [("state/model/2.bias", np.array([0.5, -1.0], np.float32))], seq=4)[0]
    assert adopt.hex() == (
        "00000055a8617602646b696e646561646f70746373726365616c6963656364737463626f626565706f63680065726f756e6401"
        "6774656e736f727381837273746174652f6d6f64656c2f322e626961731855810263736571040000003f000080bf")
    decisions = {"chain": [["c1", 2, 2]], "num_layers": 3, "owner_first": [1, 1], "owner_last": [3, 3],
                 "owners": ["alice"]}
    plan = frames_of("plan", {"src": "alice", "dst": "bob", "digest": plan_digest(3, [1, 1], [3, 3], [["c1", 2, 2]],
                                                                             ["alice"]),
                              "epoch": 0, "completed": 0, "gone": [], "decisions": decisions}, seq=2)[0]
    assert plan.hex() == (
        "000000d5aa617602646b696e6464706c616e6373726365616c6963656364737463626f62666469676573747840"
        + b"cdaa2e81919b9ab3876c7b78322d8817efa8a40d7be8746ea96ce3021cb2c06b".hex()
        + "6565706f63680069636f6d706c657465640064676f6e6580696465636973696f6e73a565636861696e8183626331"
          "02026a6e756d5f6c6179657273036b6f776e65725f66697273748201016a6f776e65725f6c617374820303666f77"
          "6e6572738165616c6963656373657102")
    # the owners' all-reduce (§16): the reducers, the chunks, the average, bob's chunk for alice
    weights = {"alice": 1, "bob": 3, "carol": 4}
    states = {"alice": {"0.bias": [1, 2, 3], "2.weight": [[4, 5], [6, 7]]},
              "bob": {"0.bias": [3, 2, 1], "2.weight": [[0, 1], [2, 3]]},
              "carol": {"0.bias": [1, 1, 1], "2.weight": [[1, 1], [1, 1]]}}
    flat = {o: np.concatenate([np.asarray(v[k], np.float32).reshape(-1) for k in sorted(v)]) for o, v in states.items()}
    n, members = 7, sorted(weights)
    assert n * 4 // 65536 == 0   # B = 28 bytes: R = 1, alice reduces the whole state
    bounds = [n * j // 3 for j in range(4)]
    assert bounds == [0, 2, 4, 7]   # the chunks R = 3 would give
    total = sum(weights.values())
    reduced = []
    for lo, hi in ((0, n), *zip(bounds, bounds[1:])):   # one chunk, or three: the same bits
        acc = np.zeros(hi - lo, np.float64)
        for owner in members:   # by name, float64, cast back once
            acc += flat[owner][lo:hi].astype(np.float64) * (weights[owner] / total)
        reduced.append(acc.astype(np.float32))
    assert reduced[0].tolist() == np.concatenate(reduced[1:]).tolist() == [1.75, 1.5, 1.25, 1.0, 1.5, 2.0, 2.5]
    chunk = frames_of("reduce_part", {"src": "bob", "dst": "alice", "epoch": 0, "round": 1, "members": members,
                                      "samples": 3},
                      [("state/0.bias", flat["bob"][0:3]), ("state/2.weight", flat["bob"][3:7])], seq=5)[0]
    assert chunk.hex() == (
        "0000008baa617602646b696e646b7265647563655f706172746373726363626f626364737465616c6963656565706f6368006572"
        "6f756e6401676d656d626572738365616c69636563626f62656361726f6c6773616d706c6573036774656e736f727382836c7374"
        "6174652f302e6269617318558103836e73746174652f322e776569676874185581046373657105"
        "00004040000000400000803f000000000000803f0000004000004040")
    timings = frames_of("timings", {"src": "alice", "dst": "c1", "epoch": 0, "round": 1, "batches": 30,
                                    "seconds": 0.25}, seq=5)[0]
    assert timings.hex() == (
        "00000050a9617602646b696e646774696d696e67736373726365616c696365636473746263316565706f63680065726f756e6401"
        "6762617463686573181e677365636f6e6473fb3fd00000000000006373657105")


# -- The peers under test (p2psl, only started here) ---------------------------------------------

SECRET = b"the deployment secret"
TIMEOUTS = {"connect": "10s", "handshake": "3s", "heartbeat": "0.3s", "dead": "4s"}


class RealPeer:
    """A p2psl `Network` that records what its handler gets and answers as `reply` says."""

    def __init__(self, topology, name: str, reply=None):
        self.name, self.received = name, asyncio.Queue()
        self._reply = reply
        self.net = Network(topology, name, SECRET, self._handle, addresses={name: ("127.0.0.1", 0)})

    async def _handle(self, message) -> None:
        await self.received.put(message)
        if self._reply is not None:
            await self._reply(self, message)

    async def next(self, kind: str, timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            while True:
                message = await self.received.get()
                if message.KIND == kind:
                    return message


async def compute_replies(peer: RealPeer, message) -> None:
    """zc answers an activation with a gradient of twice its tensor and refuses gradients."""
    if message.KIND == "activation":
        await peer.net.send(Gradient(src=peer.name, dst=message.src, epoch=message.epoch, owner=message.owner,
                                     round=message.round, batch=message.batch, part=message.part - 1,
                                     g=message.x * 2))
    elif message.KIND == "gradient":
        raise RemoteProtocolError("this test's compute node takes no gradients", "wrong_role")


async def owner_replies(peer: RealPeer, message) -> None:
    """ovid greets back whoever greets it."""
    if message.KIND == "greeting" and message.role == "data_owner":
        await peer.net.send(Greeting(src=peer.name, dst=message.src, role="data_owner", completed_round=0,
                                     resume=False, dataset={"from": peer.name}))


def greeting_fields(src: str, dst: str, **dataset) -> dict:
    return {"src": src, "dst": dst, "role": "data_owner", "completed_round": 0, "resume": False,
            "dataset": dataset}


async def test_an_independent_peer_speaks_the_documented_protocol():
    """pat, written from docs/protocol.md, joins real p2psl peers ann, ovid and zc.

    Links: ann–zc, ovid–zc, pat–zc, ann–pat. pat dials zc (its name sorts first) and is dialled
    by ann; it reaches ovid through zc."""
    graph = {"ann": {"zc", "pat"}, "ovid": {"zc"}, "pat": {"zc", "ann"}, "zc": {"ann", "ovid", "pat"}}
    links = sorted({tuple(sorted((a, b))) for a, ns in graph.items() for b in ns})
    pat_state = {"ann": Session(), "zc": Session()}
    from_ann: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_websocket(request):   # pat's listening endpoint
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, compress=False)
        await ws.prepare(request)
        link = await accept(ws, "pat", "ann", SECRET, digest, pat_state["ann"])
        from_ann.set_result(link)
        await link.closed.wait()
        return ws

    app = web.Application()
    app.router.add_get("/p2psl", on_websocket)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    pat_port = site._server.sockets[0].getsockname()[1]

    names = ["ann", "ovid", "pat", "zc"]
    ports = dict(zip(names, free_ports(4)))
    ports["pat"] = pat_port
    text = topology_toml(["ann", "ovid", "pat"], ["zc"], links=links, ports=[ports[n] for n in names],
                         timeouts=TIMEOUTS)
    digest = topology_digest(text)
    topology = parse_topology(text)
    real = {"ann": RealPeer(topology, "ann"), "ovid": RealPeer(topology, "ovid", owner_replies),
            "zc": RealPeer(topology, "zc", compute_replies)}
    session = aiohttp.ClientSession()
    to_zc = ann = None
    try:
        for peer in real.values():
            await peer.net.listen()
        addresses = {n: ("127.0.0.1", p.net.port) for n, p in real.items()} | {"pat": ("127.0.0.1", pat_port)}
        for peer in real.values():
            peer.net.connect(addresses)
        zc_port = real["zc"].net.port

        # refusals during the handshake: plain error frames, then the connection closes
        hello = {"name": "pat", "topology": digest, "nonce": bytes(32)}
        assert (await refused(zc_port, {**hello, "topology": "0" * 64}))["code"] == "topology"
        assert (await refused(zc_port, {**hello, "name": "mallory"}))["code"] == "not_admitted"
        ovid_port = real["ovid"].net.port
        assert (await refused(ovid_port, hello))["code"] == "not_admitted"                 # not a neighbour
        assert (await refused(ovid_port, {**hello, "name": "zc"}))["code"] == "not_admitted"  # ovid dials zc
        reply = await refused(zc_port, hello, proof=bytes(32))
        assert reply["kind"] == "error" and reply["code"] == "auth_failed"

        # pat dials zc; ann dials pat
        to_zc = await dial(session, zc_port, "pat", "zc", SECRET, digest, pat_state["zc"])
        async with asyncio.timeout(10):
            ann = await from_ann

        # a ping is answered with a pong carrying the same time
        await to_zc.send("ping", sent=12345.5)
        assert (await to_zc.expect("pong", sent=12345.5))["sent"] == 12345.5

        # a text message is refused (`bad_frame`, connection kept) and is no sealed frame: it
        # advances neither counter, so the next ping, sealed with the same i, still verifies
        sent_before = to_zc.sent_frames
        await to_zc.ws.send_str("not a frame")
        assert not (await to_zc.expect("error", code="bad_frame")).get("dst")
        assert to_zc.sent_frames == sent_before
        await to_zc.send("ping", sent=7.25)
        assert (await to_zc.expect("pong", sent=7.25))["sent"] == 7.25

        # a routed greeting arrives intact, and is acknowledged
        await to_zc.send("greeting", **greeting_fields("pat", "zc", input_shape=[1, 8, 8], note="hi"))
        got = await real["zc"].next("greeting")
        assert (got.src, got.dst, got.role, got.dataset) == ("pat", "zc", "data_owner",
                                                            {"input_shape": [1, 8, 8], "note": "hi"})
        await to_zc.all_acknowledged()

        # an activation's tensor arrives bit for bit; zc's gradient (2x) comes back decoded by hand
        x = np.arange(24, dtype=np.float32).reshape(4, 6) / 7
        await to_zc.send("activation", [("x", x)], src="pat", dst="zc", epoch=0, owner="pat", round=1, batch=1, part=1,
                         train=True)
        got = await real["zc"].next("activation")
        assert got.x.dtype == torch.float32 and torch.equal(got.x, torch.from_numpy(x))
        back = await to_zc.expect("gradient", batch=1)
        assert (back["src"], back["owner"], back["part"]) == ("zc", "pat", 0)
        assert np.array_equal(back["tensors"]["g"], x * 2)

        # a chunked activation (2 frames, a ping between them) both ways
        big = np.random.default_rng(0).standard_normal((3, 200_000)).astype(np.float32)   # 2.4 MB
        _, frames = to_zc.number(lambda seq: frames_of(
            "activation", {"src": "pat", "dst": "zc", "epoch": 0, "owner": "pat", "round": 1, "batch": 2, "part": 1,
                           "train": True}, [("x", big)], seq=seq, message_id=77))
        assert len(frames) == 2 and unpack(frames[1])[0] == {"v": VERSION, "kind": "chunk", "id": 77, "index": 1}
        await to_zc.send_frames(frames[:1])
        await to_zc.send("ping", sent=1.0)
        await to_zc.send_frames(frames[1:])
        got = await real["zc"].next("activation")
        assert got.batch == 2 and torch.equal(got.x, torch.from_numpy(big))
        back = await to_zc.expect("gradient", batch=2)
        assert to_zc.reassembler.chunked >= 1 and np.array_equal(back["tensors"]["g"], big * 2)
        await to_zc.expect("pong", sent=1.0)

        # chunks cut the payload as one byte stream (§6): pieces that end inside a tensor and
        # carry the start of the next, tensors of several types at offsets their element size
        # does not always divide (no padding, §5) — both ways
        rng = np.random.default_rng(5)
        mixed = {"a": np.arange(64, dtype=np.uint8), "b": rng.standard_normal(700_001).astype(np.float32),
                 "c": rng.integers(-2**40, 2**40, (3, 100_003)).astype(np.int64),
                 "d": rng.standard_normal((5, 11)).astype(np.float16)}   # 5,200,250 bytes: 3 frames
        assert sum(v.nbytes for v in mixed.values()) == 5_200_250
        share = {"src": "pat", "dst": "zc", "epoch": 0, "round": 1, "members": ["pat", "zc"], "samples": 3}
        _, frames = to_zc.number(lambda seq: frames_of("reduce_part", share, [(f"state/{k}", v) for k, v in
                                                                            sorted(mixed.items())], seq, 78))
        assert len(frames) == 3
        await to_zc.send_frames(frames)
        got = await real["zc"].next("reduce_part")
        assert got.state.keys() == mixed.keys()
        assert all(np.array_equal(got.state[k].numpy(), v) for k, v in mixed.items())
        await real["zc"].net.send(ReducePart(src="zc", dst="pat", epoch=0, round=1, members=["pat", "zc"], samples=3,
                                             state={k: torch.from_numpy(v) for k, v in mixed.items()}))
        back = await to_zc.expect("reduce_part", src="zc")
        assert back["tensors"].keys() == {f"state/{k}" for k in mixed}
        assert all(np.array_equal(back["tensors"][f"state/{k}"], v) for k, v in mixed.items())

        # the largest frame (§3, §4): a header of exactly 4 MiB and a 2 MiB payload in one frame
        filler = np.arange(CHUNK // 4, dtype=np.float32)

        def largest(seq: int) -> list[bytes]:
            def frames(key: str) -> list[bytes]:
                return frames_of("reduce_part", share, [(f"state/{key}", filler)], seq)
            short = frames("k" * 70_000)[0]          # a text of 70,000 bytes or more has a 5-byte head
            (head,) = struct.unpack(">I", short[:4])
            return frames("k" * (70_000 + MAX_HEADER - head))

        _, frames = to_zc.number(largest)
        assert len(frames) == 1 and len(frames[0]) + MAC_LEN == MAX_FRAME == 6_291_476
        assert struct.unpack(">I", frames[0][:4]) == (MAX_HEADER,)
        await to_zc.send_frames(frames)
        got = await real["zc"].next("reduce_part")
        assert [len(k) for k in got.state] == [len(unpack(frames[0])[0]["tensors"][0][0]) - len("state/")]
        assert torch.equal(next(iter(got.state.values())), torch.from_numpy(filler))
        # a header of one byte more is refused (`bad_frame`, before its seq is read: none used up)
        await to_zc.send_frames([struct.pack(">I", MAX_HEADER + 1) + bytes(MAX_HEADER + 1)])
        assert not (await to_zc.expect("error", code="bad_frame")).get("dst")
        await to_zc.all_acknowledged()

        # invalid input gets typed errors; the link goes on
        await to_zc.send_frames([pack({"v": VERSION, "kind": "teleport"})])
        assert not (await to_zc.expect("error", code="unknown_kind")).get("dst")
        _, bad = to_zc.number(lambda seq: [pack({
            "v": VERSION, "kind": "activation", "src": "pat", "dst": "zc", "epoch": 0, "owner": "pat", "round": 1,
            "batch": 3, "part": 1, "train": True, "tensors": [["x", 99, [1]]], "seq": seq}, b"\0" * 4)])
        await to_zc.send_frames(bad)            # refused while decoding, after its seq: the number is used up
        error = await to_zc.expect("error", code="bad_tensor")
        assert not error.get("ref") and not error.get("dst")
        await to_zc.all_acknowledged()          # ... and acknowledged like any other (§9 rule 3)
        await to_zc.send_frames(bad)            # a duplicate of it (seq ≤ delivered): dropped silently
        await to_zc.send("ping", sent=2.5)
        await to_zc.expect("pong", sent=2.5)
        assert not [m for m in to_zc.inbox if m["kind"] == "error"], to_zc.inbox
        await to_zc.send("greeting", **greeting_fields("ovid", "zc"))        # pat cannot speak for ovid
        error = await to_zc.expect("error", code="spoofed")
        assert error["ref"] == "greeting" and not error.get("dst")
        await to_zc.send("gradient", [("g", x)], src="pat", dst="zc", epoch=0, owner="pat", round=1, batch=1, part=1)
        error = await to_zc.expect("error", code="wrong_role")       # refused by zc's runtime: routed back
        assert (error["src"], error["dst"], error["ref"]) == ("zc", "pat", "gradient") and "seq" in error
        await to_zc.send("welcome")
        assert (await to_zc.expect("error", code="unexpected"))["ref"] == "welcome"
        await to_zc.all_acknowledged()          # the refused activation's seq included: no gap, no resend

        # relaying: pat → zc → ovid, and ovid's answer comes back through zc
        await to_zc.send("greeting", **greeting_fields("pat", "ovid", via="zc"))
        got = await real["ovid"].next("greeting")
        assert (got.src, got.dataset) == ("pat", {"via": "zc"})
        answer = await to_zc.expect("greeting", src="ovid")
        assert answer["dataset"] == {"from": "ovid"} and route(graph, "ovid", "pat")[-2] == "zc"

        # routed errors are routed messages: delivered to zc, relayed to ovid, and from ovid back to pat
        await to_zc.send("error", src="pat", dst="zc", code="unexpected", message="no such batch", ref="activation")
        got = await real["zc"].next("error")
        assert (got.src, got.dst, got.code, got.ref, got.message) == ("pat", "zc", "unexpected", "activation",
                                                                      "no such batch")
        await to_zc.send("error", src="pat", dst="ovid", code="wrong_role", message="relayed", ref="gradient")
        got = await real["ovid"].next("error")
        assert (got.src, got.dst, got.code, got.ref) == ("pat", "ovid", "wrong_role", "gradient")
        await real["ovid"].net.send(Error(src="ovid", dst="pat", code="stale_round", message="from ovid",
                                          ref="activation"))
        error = await to_zc.expect("error", src="ovid")
        assert (error["dst"], error["code"], error["ref"]) == ("pat", "stale_round", "activation") and "seq" in error
        await to_zc.send("ping", sent=3.0)      # zc answers in order: nothing came back for the errors
        await to_zc.expect("pong", sent=3.0)
        assert not [m for m in to_zc.inbox if m["kind"] == "error"], to_zc.inbox

        # the link pat was dialled on works the same
        await ann.send("greeting", **greeting_fields("pat", "ann"))
        assert (await real["ann"].next("greeting")).src == "pat"
        await real["ann"].net.send(Greeting(src="ann", dst="pat", role="data_owner", completed_round=0,
                                            resume=False, dataset={}))
        assert (await ann.expect("greeting"))["src"] == "ann"

        # a frame with a bad MAC closes the connection; a new one resumes the same session
        await to_zc.ws.send_bytes(frames_of("ping", {"sent": 2.0})[0] + bytes(MAC_LEN))
        async with asyncio.timeout(10):
            await to_zc.closed.wait()
        await to_zc.close()
        queued = asyncio.ensure_future(real["zc"].net.send(Greeting(src="zc", dst="pat", role="compute",
                                                                    completed_round=0, resume=False, dataset={})))
        delivered_before = pat_state["zc"].delivered
        to_zc = await dial(session, zc_port, "pat", "zc", SECRET, digest, pat_state["zc"])
        greeting = await to_zc.expect("greeting", src="zc")
        assert greeting["seq"] == delivered_before + 1
        await queued
        await to_zc.send("greeting", **greeting_fields("pat", "zc", after="reconnection"))
        assert (await real["zc"].next("greeting")).dataset == {"after": "reconnection"}
    finally:
        for link in (to_zc, ann):
            if link is not None:
                await link.close()
        await session.close()
        for peer in real.values():
            await peer.net.stop()
        await runner.cleanup()


def tiny_model(input_shape, num_classes):
    """The deployment's model for the full-peer test: c1 gets the bare Linear(4, 3) in the middle,
    so the independent owner can read c1's weights off a forward pass and predict its SGD step."""
    from torch import nn

    return [nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 4)), nn.Linear(4, 3),
            nn.Linear(3, num_classes)]


def read_checkpoint(path: Path) -> dict:
    """§17: the frames of one replica message, each after its u64 BE length."""
    data, offset, reassembler, message = path.read_bytes(), 0, Reassembler(), None
    while offset < len(data):
        (size,) = struct.unpack(">Q", data[offset:offset + 8])
        message = reassembler.feed(data[offset + 8:offset + 8 + size])
        offset += 8 + size
    return message


async def connect_when_listening(session, port: int, me: str, digest: str) -> Link:
    async with asyncio.timeout(10):   # c1 listens once it has started
        while True:
            try:
                return await dial(session, port, me, "c1", SECRET, digest, Session())
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)


async def train_batch(link: Link, owner: str, round_: int, batch: int, x: np.ndarray, g: np.ndarray):
    """§16, one training batch over a chain of one node: c1's output for `x`, then part 0's
    gradient for `g` (the gradient w.r.t. c1's output)."""
    step = {"src": owner, "dst": "c1", "epoch": 0, "owner": owner, "round": round_, "batch": batch}
    await link.send("activation", [("x", x)], **step, part=1, train=True)
    del step["src"], step["dst"]
    out = await link.expect("activation", timeout=20, part=2, train=True, **step)
    await link.send("gradient", [("g", g)], src=owner, dst="c1", **step, part=1)
    back = await link.expect("gradient", timeout=20, part=0, **step)
    return out["tensors"]["x"].astype(np.float64), back["tensors"]["g"].astype(np.float64)


async def evaluate(link: Link, owner: str, round_: int, probe: np.ndarray) -> np.ndarray:
    """§16 round step 5: test batch 1 through the chain; c1 runs it once it has aggregated the round."""
    step = {"epoch": 0, "owner": owner, "round": round_, "batch": 1}
    await link.send("activation", [("x", probe)], src=owner, dst="c1", **step, part=1, train=False)
    return (await link.expect("activation", timeout=20, part=2, train=False, **step))["tensors"]["x"]


def report(owner: str, round_: int, included: list[str], correct: int = 3) -> dict:
    """An eval_report's fields (§13); every owner of a round reports the same `included` and digest."""
    return {"src": owner, "dst": "c1", "epoch": 0, "owner": owner, "round": round_, "correct": correct, "total": 5,
            "loss_sum": 4.0, "train_loss": 2.5, "samples": 5, "seconds": 0.5, "included": included,
            "digest": str(round_) * 64}


async def test_independent_data_owners_train_with_a_real_compute_node_and_one_rejoins(tmp_path, monkeypatch):
    """alice and bob, written from docs/protocol.md, are the data owners of a deployment whose
    compute node c1 is a full p2psl `Peer`, for three rounds.

    Round 1: start-up, training batches, and what c1 must refuse (routed errors both ways). bob
    restarts mid-round: c1 declares him gone, answers his late greeting with `join_info` and cuts
    the round without him; meanwhile it refuses a `joining` from alice, drops a `join_info` and an
    `adopt` sent to it while it runs, and ignores an `abort` from bob, whom it counts as gone. alice, the first live owner, hands him the aggregate of rounds 1 and 2
    (`adopt`, relayed by c1); bob announces `joining` round 3, and c1 counts him in again: round 3
    aggregates both. Then `done`, the farewell, and c1's metrics and checkpoints read back."""
    monkeypatch.setenv("P2PSL_CACHE_DIR", str(tmp_path / "cache"))
    lr, momentum, batch = 0.1, 0.9, 5
    ports = free_ports(3)
    text = topology_toml(["alice", "bob"], ["c1"], ports=ports, links=[("alice", "c1"), ("bob", "c1")], training={
        "model": "tests.integration.test_protocol_doc:tiny_model", "rounds": 3, "batch_size": batch,
        "eval_batch_size": batch, "learning_rate": lr, "momentum": momentum, "first_cut": 1, "last_cut": 2,
        "micro_batches": 2},
        timeouts={"connect": "20s", "handshake": "3s", "heartbeat": "0.5s", "dead": "5s", "request": "20s",
                  "start": "30s", "round": "30s"})
    digest = topology_digest(text)
    c1 = Peer(parse_topology(text), "c1", SECRET, PeerOptions(tmp_path / "c1", trace=False))
    threads = torch.get_num_threads()
    running = asyncio.ensure_future(c1.run())
    session = aiohttp.ClientSession()
    status_url = f"http://127.0.0.1:{ports[2]}/status"
    links: dict[str, Link] = {}
    try:
        for name in ("alice", "bob"):
            links[name] = await connect_when_listening(session, ports[2], name, digest)
        alice, bob = links["alice"], links["bob"]
        ids = {"src": "alice", "dst": "c1"}

        # start-up: greetings, profiles, plan digests
        profile = {"device": "cpu", "batch_size": batch, "fwd": [1e-4] * 3, "bwd": [1e-4] * 3, "opt": [1e-5] * 3,
                   "act_bytes": [80, 60, 200], "param_bytes": [1040, 60, 160]}
        dataset = {"input_shape": [1, 8, 8], "num_classes": 10, "train": batch, "test": batch}
        mine = plan_digest(3, (1, 1), (3, 3), [("c1", 2, 2)], ["alice", "bob"], micro_batches=2)
        for name, link in links.items():
            await link.send("greeting", src=name, dst="c1", role="data_owner", completed_round=0, resume=False,
                            dataset=dataset)
        for name, link in links.items():
            greeting = await link.expect("greeting", timeout=20)
            assert (greeting["src"], greeting["role"], greeting["dataset"]) == ("c1", "compute", {})
            theirs = (await link.expect("profile", timeout=20))["profile"]
            assert len(theirs["fwd"]) == 3 and theirs["batch_size"] == batch
            await link.send("profile", src=name, dst="c1", profile=profile)
        for name, link in links.items():
            proposal = await link.expect("plan", timeout=20)
            assert (proposal["digest"], proposal["epoch"], proposal["completed"], proposal["gone"]) == (mine, 0, 0, [])
            await link.send("plan", src=name, dst="c1", digest=mine, epoch=0)

        # round 1, alice's batch 1: c1's weights are read off its output for [0; I]
        x = np.vstack([np.zeros((1, 4)), np.eye(4)]).astype(np.float32)
        step = {"epoch": 0, "owner": "alice", "round": 1, "batch": 1}
        await alice.send("activation", [("x", x)], **ids, **step, part=1, train=True)
        out = await alice.expect("activation", timeout=20, part=2, train=True, **step)
        y = out["tensors"]["x"].astype(np.float64)
        b0, w0 = y[0], (y[1:] - y[0]).T

        async with aiohttp.ClientSession() as http:    # /status, while it trains
            async with http.get(status_url) as response:
                status = await response.json()
        assert (status["name"], status["role"], status["plan"]["digest"], status["epoch"]) == ("c1", "compute", mine, 0)

        # what c1 must refuse, answered with routed typed errors
        await alice.send("activation", [("x", x)], **ids, **step, part=1, train=True)    # the same batch again
        assert (await alice.expect("error", code="duplicate"))["ref"] == "activation"
        await alice.send("activation", [("x", x)], **ids, **step, part=2, train=True)
        assert (await alice.expect("error", code="wrong_role"))["ref"] == "activation"
        await alice.send("activation", [("x", np.zeros((5, 7), np.float32))], **ids, **step, part=1, train=True)
        assert (await alice.expect("error", code="bad_tensor"))["src"] == "c1"
        await alice.send("activation", [("x", x)], **ids, **(step | {"round": 2}), part=1, train=True)
        await alice.expect("error", code="stale_round")
        await bob.send("train_done", src="bob", dst="c1", epoch=0, owner="alice", round=1, samples=1, batches=1,
                       loss_sum=0.0)                                       # bob cannot report for alice
        assert (await bob.expect("error", code="wrong_role"))["ref"] == "train_done"
        g = np.random.default_rng(1).standard_normal((batch, 3)).astype(np.float32)
        await alice.send("gradient", [("g", g)], **ids, **(step | {"batch": 9}), part=1)   # no forward pass for it
        assert (await alice.expect("error", code="unexpected"))["ref"] == "gradient"

        await alice.send("gradient", [("g", g)], **ids, **step, part=1)
        back = await alice.expect("gradient", timeout=20, part=0, **step)
        np.testing.assert_allclose(back["tensors"]["g"], g @ w0, rtol=1e-5, atol=1e-6)
        await alice.send("gradient", [("g", g)], **ids, **step, part=1)    # its backward pass is done
        assert (await alice.expect("error", code="unexpected"))["dst"] == "alice"

        # batch 2 meets the weights after batch 1's SGD step; a gradient of another batch size then
        # fails inside the layer: training_error, and c1 goes on
        grad_w, grad_b = g.astype(np.float64).T @ x, g.astype(np.float64).sum(0)
        w1, b1 = w0 - lr * grad_w, b0 - lr * grad_b
        await alice.send("activation", [("x", x)], **ids, **(step | {"batch": 2}), part=1, train=True)
        out = await alice.expect("activation", timeout=20, part=2, train=True, **(step | {"batch": 2}))
        np.testing.assert_allclose(out["tensors"]["x"], x @ w1.T + b1, rtol=1e-5, atol=1e-5)
        await alice.send("gradient", [("g", g[:4])], **ids, **(step | {"batch": 2}), part=1)
        error = await alice.expect("error", timeout=20, code="training_error")
        assert (error["src"], error["dst"], error["ref"]) == ("c1", "alice", "gradient") and "seq" in error

        # micro-batches (§13): at most micro_batches of them, `micros` the same for the whole batch;
        # c1 answers with the same fields, `micro` left out at its default 0. The batch never ends
        # (micro-batch 1 never comes), so c1 never steps it: the round's averaging forgets it
        five = step | {"batch": 5}
        await alice.send("activation", [("x", x)], **ids, **five, part=1, train=True, micro=0, micros=3)
        assert (await alice.expect("error", code="unexpected"))["ref"] == "activation"
        await alice.send("activation", [("x", x[:2])], **ids, **five, part=1, train=True, micro=0, micros=2)
        out = await alice.expect("activation", timeout=20, part=2, train=True, micros=2, **five)
        assert "micro" not in out and out["tensors"]["x"].shape == (2, 3)
        await alice.send("gradient", [("g", g[:2])], **ids, **five, part=1, micro=0, micros=1)
        assert (await alice.expect("error", code="unexpected"))["ref"] == "gradient"
        await alice.send("gradient", [("g", g[:2])], **ids, **five, part=1, micro=0, micros=2)
        back = await alice.expect("gradient", timeout=20, part=0, micros=2, **five)
        np.testing.assert_allclose(back["tensors"]["g"], g[:2] @ w1, rtol=1e-5, atol=1e-6)

        # a routed error for c1 is delivered to its runtime, which answers nothing
        await alice.send("error", **ids, code="unexpected", message="no batch 7 here", ref="activation")
        await alice.send("ping", sent=4.0)
        await alice.expect("pong", sent=4.0)
        assert not [m for m in alice.inbox if m["kind"] == "error"], alice.inbox

        # round end: alice's train_done, then her chunk of the parts for bob to reduce reaches him
        # through c1 (a tensor map, relayed)
        for dst in ("c1", "bob"):
            await alice.send("train_done", src="alice", dst=dst, epoch=0, owner="alice", round=1, samples=batch,
                             batches=1, loss_sum=2.5)
        assert (await bob.expect("train_done", src="alice"))["loss_sum"] == 2.5
        parts = {"0.1.weight": np.full((4, 64), 0.5, np.float32), "2.bias": np.arange(10, dtype=np.float32)}
        await alice.send("reduce_part", [(f"state/{k}", v) for k, v in sorted(parts.items())], src="alice",
                         dst="bob", epoch=0, round=1, members=["alice", "bob"], samples=batch)
        share = await bob.expect("reduce_part", src="alice")
        assert share["tensors"].keys() == {f"state/{k}" for k in parts}
        assert all(np.array_equal(share["tensors"][f"state/{k}"], v) for k, v in parts.items())

        # bob restarts: a new process, a new incarnation (§9). c1 declares him gone and floods it,
        # and answers his late greeting with join_info
        await bob.close()
        bob = links["bob"] = await dial(session, ports[2], "bob", "c1", SECRET, digest, Session())
        assert (await alice.expect("gone", timeout=20, peer="bob"))["src"] == "c1"
        await bob.send("greeting", src="bob", dst="c1", role="data_owner", completed_round=0, resume=False,
                       dataset=dataset)
        info = await bob.expect("join_info", timeout=20)
        assert (info["src"], info["epoch"], info["round"], info["gone"]) == ("c1", 0, 1, [])
        for plan in (info["plan"], info["first_plan"]):
            chain = [(node, *plan["assignments"][node]) for node in plan["chain"]]
            layers = plan["owner_layers"]
            assert plan_digest(plan["num_layers"], layers["first"], layers["last"], chain, plan["owners"],
                               plan.get("micro_batches", 1)) == \
                plan["digest"] == mine
        assert info["samples"] == {"alice": batch, "bob": batch} and info["profiles"].keys() == {"alice", "bob", "c1"}
        assert all(info["profiles"]["bob"][key] == value for key, value in profile.items())

        # what c1 takes while bob rejoins (§15): a joining only from an owner it answered with
        # join_info (alice is not one: wrong_role); join_info and adopt only while it starts or
        # rejoins itself (it runs: dropped); an abort only from a peer it does not count as gone
        # (bob's is ignored, and c1 trains on)
        await alice.send("joining", **ids, round=3)
        assert (await alice.expect("error", code="wrong_role"))["ref"] == "joining"
        await alice.send("join_info", **ids, **{key: info[key] for key in
                                                ("epoch", "round", "plan", "first_plan", "gone", "profiles", "samples")})
        await alice.send("adopt", [("state/model/2.bias", np.ones(10, np.float32))], **ids, epoch=0, round=1)
        await bob.send("abort", src="bob", dst="c1", code="TrainingError", reason="gone at c1: not heard")
        await alice.send("ping", sent=5.0)
        await alice.expect("pong", sent=5.0)
        assert not [m for m in alice.inbox if m["kind"] == "error"], alice.inbox

        # so c1 cuts round 1 without him, averages the included copies and evaluates the result
        cut = await alice.expect("cut", timeout=20, round=1)
        assert (cut["src"], cut["epoch"], cut["owners"]) == ("c1", 0, ["alice"])
        await alice.send("cut", **ids, epoch=0, round=1, owners=["alice"])
        probe = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
        np.testing.assert_allclose(await evaluate(alice, "alice", 1, probe), probe @ w1.T + b1, rtol=1e-5, atol=1e-5)
        await alice.send("eval_report", **report("alice", 1, ["alice"]))
        await alice.send("timings", **ids, epoch=0, round=1, batches=1, seconds=0.01)
        assert (await alice.expect("timings", timeout=20, round=1))["src"] == "c1"

        # alice, the first live owner, hands bob the aggregate of round 1 (relayed by c1, though bob
        # is gone there); bob announces that he trains from round 3 (A + 2)
        head = {"model/0.1.weight": np.full((4, 64), 0.25, np.float32), "model/2.bias": np.ones(10, np.float32)}
        await alice.send("adopt", [(f"state/{k}", v) for k, v in sorted(head.items())], src="alice", dst="bob",
                         epoch=0, round=1)
        adopt = await bob.expect("adopt", timeout=20, round=1)
        assert all(np.array_equal(adopt["tensors"][f"state/{k}"], v) for k, v in head.items())
        for dst in ("c1", "alice"):
            await bob.send("joining", src="bob", dst=dst, round=3)
        assert (await alice.expect("joining", timeout=20))["src"] == "bob"
        await bob.all_acknowledged()       # c1 has it, long before it begins round 3

        # round 2: alice alone; c1 keeps each copy's momentum across the averaging
        g2 = np.random.default_rng(3).standard_normal((batch, 3)).astype(np.float32)
        out, back = await train_batch(alice, "alice", 2, 1, x, g2)
        np.testing.assert_allclose(out, x @ w1.T + b1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(back, g2 @ w1, rtol=1e-5, atol=1e-5)
        buf_w = momentum * grad_w + g2.astype(np.float64).T @ x
        buf_b = momentum * grad_b + g2.astype(np.float64).sum(0)
        w2, b2 = w1 - lr * buf_w, b1 - lr * buf_b
        await alice.send("train_done", **ids, epoch=0, owner="alice", round=2, samples=batch, batches=1, loss_sum=2.0)
        assert (await alice.expect("cut", timeout=20, round=2))["owners"] == ["alice"]
        await alice.send("cut", **ids, epoch=0, round=2, owners=["alice"])
        np.testing.assert_allclose(await evaluate(alice, "alice", 2, probe), probe @ w2.T + b2, rtol=1e-5, atol=1e-5)
        await alice.send("eval_report", **report("alice", 2, ["alice"]))
        await alice.send("timings", **ids, epoch=0, round=2, batches=1, seconds=0.01)
        await alice.send("adopt", [(f"state/{k}", v) for k, v in sorted(head.items())], src="alice", dst="bob",
                         epoch=0, round=2)
        await bob.expect("adopt", timeout=20, round=2)

        # c1 counts bob in as it begins round 3: its /status no longer lists him as gone
        async with asyncio.timeout(20), aiohttp.ClientSession() as http:
            while True:
                async with http.get(status_url) as response:
                    status = await response.json()
                if "bob" not in status["gone"]:
                    break
                await asyncio.sleep(0.02)      # polling /status, the only window on c1's gone set
        assert status["round"] == 3

        # round 3: both train on copies averaged in round 2, are both in the cut, exchange chunks
        g3 = np.random.default_rng(4).standard_normal((batch, 3)).astype(np.float32)
        for name, link in links.items():
            out, _ = await train_batch(link, name, 3, 1, x, g3)
            np.testing.assert_allclose(out, x @ w2.T + b2, rtol=1e-5, atol=1e-5)
        for name, link in links.items():
            other = "bob" if name == "alice" else "alice"
            for dst in (other, "c1"):
                await link.send("train_done", src=name, dst=dst, epoch=0, owner=name, round=3, samples=batch,
                                batches=1, loss_sum=1.0)
        for name, link in links.items():
            other = "bob" if name == "alice" else "alice"
            assert (await link.expect("train_done", src=other))["round"] == 3
            cut = await link.expect("cut", timeout=20, round=3)
            assert (cut["src"], cut["owners"]) == ("c1", ["alice", "bob"])
            await link.send("cut", src=name, dst="c1", epoch=0, round=3, owners=["alice", "bob"])
            await link.send("reduce_part", [(f"state/{k}", v) for k, v in sorted(parts.items())], src=name,
                            dst=other, epoch=0, round=3, members=["alice", "bob"], samples=batch)
        for name, link in links.items():
            other = "bob" if name == "alice" else "alice"
            assert (await link.expect("reduce_part", src=other))["round"] == 3
        evaluated = [await evaluate(link, name, 3, probe) for name, link in links.items()]
        assert np.array_equal(evaluated[0], evaluated[1])      # one average in both owners' copies
        for name, link in links.items():
            await link.send("eval_report", **report(name, 3, ["alice", "bob"], correct=4))
            await link.send("timings", src=name, dst="c1", epoch=0, round=3, batches=1, seconds=0.01)

        # finish: done both ways with every live peer, then the farewell: c1 says bye and leaves
        # once both neighbours said bye too
        for name, link in links.items():
            assert (await link.expect("done", timeout=20))["round"] == 3
            await link.send("done", src=name, dst="c1", round=3)
        for link in links.values():
            assert (await link.expect("bye", timeout=20))["reason"]
            await link.send("bye", reason="finished")
        async with asyncio.timeout(20):
            await running
        # in c1's audience from his joining on (a joiner that has not announced hears no round
        # messages: c1's cut of round 1 did not come to him), bob heard round 2 before c1 counted
        # him in (round 3): c1's cut came to him
        assert [(m["round"], m["owners"]) for m in bob.inbox if m["kind"] == "cut"] == [(2, ["alice"])]
    finally:
        if not running.done():
            running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        for link in links.values():
            await link.close()
        await session.close()
        torch.set_num_threads(threads)

    rounds = [json.loads(line) for line in (tmp_path / "c1" / "metrics.jsonl").read_text().splitlines()]
    both = ["alice", "bob"]
    assert [(r["round"], r["test_accuracy"], r["owners"], r["aggregated"]) for r in rounds if r["event"] == "round"] \
        == [(1, 0.6, ["alice"], ["alice"]), (2, 0.6, ["alice"], ["alice"]), (3, 0.8, both, both)]
    checkpoints = tmp_path / "c1" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["round-000002.ckpt", "round-000003.ckpt"]
    replica = read_checkpoint(checkpoints / "round-000002.ckpt")
    assert (replica["kind"], replica["node"], replica["round"], replica["plan"]) == ("replica", "c1", 2, mine)
    state = replica["tensors"]
    for owner in ("alice", "bob"):   # bob's copy gets the average of the included owners' too
        np.testing.assert_allclose(state[f"state/{owner}/model/1.weight"], w2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state[f"state/{owner}/model/1.bias"], b2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["state/alice/optim/1.weight.momentum_buffer"], buf_w, rtol=1e-5, atol=1e-6)
    last = read_checkpoint(checkpoints / "round-000003.ckpt")["tensors"]
    assert np.array_equal(last["state/alice/model/1.weight"], last["state/bob/model/1.weight"])
