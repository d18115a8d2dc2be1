"""The wire part of a peer written from docs/protocol.md alone: frames, tensors, chunking, the
handshake, sealed frames, link sessions and routes (§2–§10).

It imports nothing from p2psl — only the standard library, aiohttp, cbor2, cryptography and numpy
— so that the tests built on it (test_protocol_doc.py, doc_owner.py) check the document, not
p2psl's code against itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import struct
import tomllib

import aiohttp
import cbor2
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 2                       # §4
CHUNK = 2 * 1024 * 1024           # §6: payload bytes per frame
MAX_HEADER = 4 * 1024 * 1024      # §4: the largest header
MAC_LEN = 16                      # §8
NONCE_LEN = 32                    # §7
MAX_FRAME = 4 + MAX_HEADER + CHUNK + MAC_LEN  # §3: the largest sealed frame, 6,291,476 bytes
MAX_WS_MESSAGE = MAX_FRAME + 1    # aiohttp takes messages shorter than its max_msg_size
TAGS = {"uint8": 64, "int8": 72, "int16": 77, "int32": 78, "int64": 79,
        "float16": 84, "float32": 85, "float64": 86}  # §5: RFC 8746 tags, little-endian
DTYPES = {tag: np.dtype(name).newbyteorder("<") for name, tag in TAGS.items()}


def topology_digest(toml_text: str) -> str:
    """§2: SHA-256 of the file's TOML data as sorted-key JSON."""
    raw = tomllib.loads(toml_text)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def plan_digest(num_layers, owner_first, owner_last, chain, owners, micro_batches=1) -> str:
    """§13 (plan): SHA-256 of the plan's decisions as sorted-key JSON (`micro_batches` only
    when it is not 1)."""
    decisions = {"num_layers": num_layers, "owner_first": list(owner_first), "owner_last": list(owner_last),
                 "chain": [list(stage) for stage in chain], "owners": list(owners)}
    if micro_batches != 1:
        decisions["micro_batches"] = micro_batches
    return hashlib.sha256(json.dumps(decisions, sort_keys=True).encode()).hexdigest()


def route(graph: dict[str, set[str]], src: str, dst: str) -> list[str]:
    """§2: the shortest path, the lexicographically smallest name list among equals."""
    paths, frontier = [], [[src]]
    while frontier and not paths:
        paths = [p for p in frontier if p[-1] == dst]
        frontier = [p + [n] for p in frontier for n in graph[p[-1]] if n not in p]
    return min(paths)


def pack(header: dict, payload: bytes = b"") -> bytes:
    """§4: u32 BE header length, CBOR header, payload."""
    head = cbor2.dumps(header)
    return struct.pack(">I", len(head)) + head + payload


def unpack(frame: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack(">I", frame[:4])
    return cbor2.loads(frame[4:4 + length]), frame[4 + length:]


def frames_of(kind: str, fields: dict, tensors=(), seq: int | None = None, message_id: int = 1) -> list[bytes]:
    """§4–§6: the frames of one message; `tensors` is a list of (wire name, numpy array)."""
    header = {"v": VERSION, "kind": kind, **fields}
    payload = b""
    if tensors:
        header["tensors"] = [[name, TAGS[a.dtype.name], list(a.shape)] for name, a in tensors]
        payload = b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for _, a in tensors)
    if seq is not None:
        header["seq"] = seq
    if len(payload) <= CHUNK:
        return [pack(header, payload)]
    count = math.ceil(len(payload) / CHUNK)
    header.update(chunks=count, id=message_id)
    return [pack(header, payload[:CHUNK])] + [
        pack({"v": VERSION, "kind": "chunk", "id": message_id, "index": i}, payload[i * CHUNK:(i + 1) * CHUNK])
        for i in range(1, count)]


class Reassembler:
    """Frames in, messages out: a message is its header dict plus "tensors" → {name: array}."""

    def __init__(self):
        self.open: dict[int, tuple[dict, list[bytes]]] = {}
        self.chunked = 0

    def feed(self, frame: bytes) -> dict | None:
        header, payload = unpack(frame)
        assert header["v"] == VERSION
        if header["kind"] == "chunk":
            first, parts = self.open[header["id"]]
            assert header["index"] == len(parts)
            parts.append(payload)
            if len(parts) < first["chunks"]:
                return None
            del self.open[header["id"]]
            self.chunked += 1
            return self._message(first, b"".join(parts))
        if header.get("chunks", 1) > 1:
            assert len(payload) == CHUNK
            self.open[header["id"]] = (header, [payload])
            return None
        return self._message(header, payload)

    @staticmethod
    def _message(header: dict, payload: bytes) -> dict:
        tensors, offset = {}, 0
        for name, tag, shape in header.get("tensors", []):
            dtype = DTYPES[tag]
            size = math.prod(shape) * dtype.itemsize
            array = np.frombuffer(payload[offset:offset + size], dtype=dtype)
            if name in header.get("channels_last", []):   # §5: the bytes of the N×H×W×C array
                n, c, h, w = shape
                array = array.reshape(n, h, w, c).transpose(0, 3, 1, 2)
            tensors[name] = array.reshape(shape)
            offset += size
        assert offset == len(payload)
        return {**header, "tensors": tensors}


def transcript(dialler: str, listener: str, digest: str, dialler_nonce: bytes, listener_nonce: bytes) -> bytes:
    """§7: every part with a u32 BE length in front."""
    parts = [str(VERSION).encode(), dialler.encode(), listener.encode(), digest.encode(), dialler_nonce,
             listener_nonce]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def gmac_nonce(i: int) -> bytes:
    """§8: four zero bytes, then the frame counter as u64 BE."""
    return b"\0\0\0\0" + struct.pack(">Q", i)


def gmac_tag(key: bytes, i: int, frame: bytes) -> bytes:
    """§8: AES-256-GCM under the 32-byte session key, empty plaintext, the frame as associated
    data: the output is the 16-byte tag alone."""
    return AESGCM(key).encrypt(gmac_nonce(i), b"", frame)


class Session:
    """§9: our side of the routed streams with one neighbour; it outlives connections."""

    def __init__(self):
        self.incarnation = secrets.token_bytes(8)
        self.remote = b""                 # the neighbour's incarnation, once heard
        self.next_seq = 1                 # our stream: the seq of the next routed message
        self.unacked: list[tuple[int, list[bytes]]] = []
        self.delivered = 0                # their stream: the last seq taken

    def resume(self) -> dict:
        return {"incarnation": self.incarnation, "peer_incarnation": self.remote, "received": self.delivered}

    def on_resume(self, theirs: dict) -> list[list[bytes]]:
        """Reconcile with the neighbour's Resume; the frames to send again."""
        if theirs["incarnation"] != self.remote:
            self.remote, self.delivered = theirs["incarnation"], 0
        if theirs["peer_incarnation"] != self.incarnation:
            self.next_seq, self.unacked = 1, []
            return []
        self.on_ack(theirs["received"])
        return [frames for _, frames in self.unacked]

    def on_ack(self, received: int) -> None:
        self.unacked = [(seq, frames) for seq, frames in self.unacked if seq > received]


class Link:
    """One authenticated connection: sealing, sequence numbers, acks, pongs, and an inbox."""

    def __init__(self, ws, me: str, peer: str, send_key: bytes, recv_key: bytes, session: Session):
        self.ws, self.me, self.peer = ws, me, peer
        self.send_key, self.recv_key = send_key, recv_key
        self.sent_frames = self.received_frames = 0     # MAC counters, one per direction
        self.session = session
        self.inbox: list[dict] = []
        self.arrived = asyncio.Event()
        self.acked = asyncio.Event()
        self.closed = asyncio.Event()
        self.reassembler = Reassembler()
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None

    # sending
    def seal(self, frame: bytes) -> bytes:
        tag = gmac_tag(self.send_key, self.sent_frames, frame)
        assert len(tag) == MAC_LEN
        self.sent_frames += 1
        return frame + tag

    async def send_frames(self, frames: list[bytes]) -> None:
        async with self._lock:
            for frame in frames:
                await self.ws.send_bytes(self.seal(frame))

    def number(self, frames_for_seq) -> tuple[int, list[bytes]]:
        """§9 rule 1: the next seq of our stream, and the frames built with it, kept until acked."""
        seq = self.session.next_seq
        self.session.next_seq += 1
        frames = frames_for_seq(seq)
        self.session.unacked.append((seq, frames))
        return seq, frames

    async def send(self, kind: str, tensors=(), **fields) -> None:
        """A link message, or a routed one (non-empty "dst"): the next seq of our stream."""
        message_id = secrets.randbelow(2**31)
        if fields.get("dst"):
            _, frames = self.number(lambda seq: frames_of(kind, fields, tensors, seq, message_id))
        else:
            frames = frames_of(kind, fields, tensors, None, message_id)
        await self.send_frames(frames)

    # receiving
    def open_(self, data: bytes) -> bytes:
        """§8: the AEAD decryption of (empty ciphertext ‖ tag) checks the tag."""
        assert len(data) >= MAC_LEN, f"frame {self.received_frames} from {self.peer} is too short for its MAC"
        body, tag = data[:-MAC_LEN], data[-MAC_LEN:]
        try:
            AESGCM(self.recv_key).decrypt(gmac_nonce(self.received_frames), tag, body)
        except InvalidTag:
            raise AssertionError(f"frame {self.received_frames} from {self.peer} fails its MAC") from None
        self.received_frames += 1
        return body

    async def recv_message(self, timeout: float = 5.0) -> dict:
        """The next complete message straight off the socket (before the reader runs)."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            assert msg.type == aiohttp.WSMsgType.BINARY, f"{self.peer} sent {msg.type!r}"
            message = self.reassembler.feed(self.open_(msg.data))
            if message is not None:
                return message

    async def resume(self) -> None:
        """§9: a resume each way first, then what the neighbour still lacks."""
        await self.send("resume", **self.session.resume())
        reply = await self.recv_message()
        assert reply["kind"] == "resume", reply
        for frames in self.session.on_resume(reply):
            await self.send_frames(frames)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return
                message = self.reassembler.feed(self.open_(msg.data))
                if message is None:
                    continue
                kind = message["kind"]
                if kind == "ping":
                    await self.send("pong", sent=message["sent"])
                    continue
                if kind == "ack":
                    self.session.on_ack(message["received"])
                    self.acked.set()
                    continue
                if "seq" in message:       # routed: exactly the next one of their stream
                    if message["seq"] <= self.session.delivered:
                        continue           # a duplicate sent again after a reconnection
                    assert message["seq"] == self.session.delivered + 1, (message, self.session.delivered)
                    self.session.delivered = message["seq"]
                    await self.send("ack", received=self.session.delivered)
                self.inbox.append(message)
                self.arrived.set()
        finally:
            self.closed.set()

    async def expect(self, kind: str, timeout: float = 10.0, **match) -> dict:
        """The first message of `kind` (with the given field values) in the inbox, waiting for it."""
        async with asyncio.timeout(timeout):
            while True:
                for message in self.inbox:
                    if message["kind"] == kind and all(message.get(k) == v for k, v in match.items()):
                        self.inbox.remove(message)
                        return message
                self.arrived.clear()
                if self.closed.is_set():
                    raise AssertionError(f"{self.peer} closed the link; inbox: {self.inbox}")
                await self.arrived.wait()

    async def all_acknowledged(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self.session.unacked:
                self.acked.clear()
                await self.acked.wait()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.ws.close()


async def dial(session: aiohttp.ClientSession, port: int, me: str, peer: str, secret: bytes, digest: str,
               state: Session) -> Link:
    """§7 as the dialler; returns the link with its session resumed and its reader running."""
    ws = await session.ws_connect(f"ws://127.0.0.1:{port}/p2psl", max_msg_size=MAX_WS_MESSAGE, compress=0)
    nonce = secrets.token_bytes(NONCE_LEN)
    await ws.send_bytes(pack({"v": VERSION, "kind": "hello", "name": me, "topology": digest, "nonce": nonce}))
    challenge, _ = unpack((await ws.receive(timeout=5)).data)
    assert challenge["kind"] == "challenge" and challenge["name"] == peer, challenge
    script = transcript(me, peer, digest, nonce, challenge["nonce"])
    assert hmac.compare_digest(challenge["proof"], hmac256(secret, b"p2psl-listener" + script))
    await ws.send_bytes(pack({"v": VERSION, "kind": "auth", "proof": hmac256(secret, b"p2psl-dialler" + script)}))
    welcome, _ = unpack((await ws.receive(timeout=5)).data)
    assert welcome["kind"] == "welcome", welcome
    link = Link(ws, me, peer, hmac256(secret, b"p2psl-key-d2l" + script), hmac256(secret, b"p2psl-key-l2d" + script),
                state)
    await link.resume()
    return link


async def accept(ws, me: str, expected, secret: bytes, digest: str, state) -> Link:
    """§7 as the listener, on a WebSocket a neighbour opened to us. `expected` is the dialler's
    name, or the names that may dial us; `state` its Session, or a Session per name."""
    hello, _ = unpack((await ws.receive(timeout=5)).data)
    allowed = {expected} if isinstance(expected, str) else set(expected)
    assert hello["kind"] == "hello" and hello["name"] in allowed and hello["topology"] == digest, hello
    if isinstance(state, dict):
        state = state[hello["name"]]
    assert len(hello["nonce"]) == NONCE_LEN
    nonce = secrets.token_bytes(NONCE_LEN)
    script = transcript(hello["name"], me, digest, hello["nonce"], nonce)
    await ws.send_bytes(pack({"v": VERSION, "kind": "challenge", "name": me, "nonce": nonce,
                              "proof": hmac256(secret, b"p2psl-listener" + script)}))
    auth, _ = unpack((await ws.receive(timeout=5)).data)
    assert auth["kind"] == "auth" and hmac.compare_digest(auth["proof"], hmac256(secret, b"p2psl-dialler" + script))
    await ws.send_bytes(pack({"v": VERSION, "kind": "welcome"}))
    link = Link(ws, me, hello["name"], hmac256(secret, b"p2psl-key-l2d" + script),
                hmac256(secret, b"p2psl-key-d2l" + script), state)
    await link.resume()
    return link


async def refused(port: int, hello: dict, proof: bytes | None = None) -> dict:
    """Open a connection, send `hello` (and an auth with `proof`), return the plain error frame."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{port}/p2psl", max_msg_size=MAX_WS_MESSAGE) as ws:
            await ws.send_bytes(pack({"v": VERSION, "kind": "hello", **hello}))
            reply, _ = unpack((await ws.receive(timeout=5)).data)
            if proof is not None:
                assert reply["kind"] == "challenge"
                await ws.send_bytes(pack({"v": VERSION, "kind": "auth", "proof": proof}))
                reply, _ = unpack((await ws.receive(timeout=5)).data)
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
            return reply
