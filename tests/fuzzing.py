"""Hostile-input drivers shared by the fuzz tests (CI) and tools/fuzz.py (long runs).

Each driver feeds arbitrary bytes to one entry point and reports how it ended. What must never
happen: any exception other than the typed refusals, a handshake that succeeds without the
secret, or a decoder left unusable.
"""

from __future__ import annotations

import asyncio

from p2psl.wire import codec
from p2psl.net.channel import open_as_dialler, open_as_listener
from p2psl.errors import AuthError, BrokenError, ClosedError, RemoteProtocolError
from p2psl.wire.messages import Ping
from p2psl.net.transport import _CLOSE, memory_pair

SECRET = b"fuzzing secret"
DIGEST = "d" * 64


def decode_outcome(frames: list[bytes]) -> str:
    """Feed frames to one decoder: "ok", or the code of the typed refusal of the last frame."""
    decoder, outcome = codec.Decoder(max_message_bytes=1 << 24), "ok"
    for frame in frames:
        try:
            decoder.feed(frame)
            outcome = "ok"
        except RemoteProtocolError as exc:
            outcome = exc.code
    ping = decoder.feed(codec.encode(Ping(sent=1.0))[0])  # still usable afterwards
    assert isinstance(ping, Ping)
    return outcome


async def _say_then_stop(mallory, victim, frames: list[bytes]) -> None:
    """Queue `frames` for the victim, then end of stream — while its own sends still succeed,
    so every frame is read and answered as it would be on a real connection."""
    for frame in frames:
        await mallory.send(frame)
    victim._inbox.put_nowait(_CLOSE)


def listener_outcome(frames: list[bytes]) -> str:
    """Hostile dialler: send `frames`, hang up; the listener must refuse or see the link break."""
    def start():
        mallory, listener = memory_pair("mallory", "c1")
        return mallory, listener, open_as_listener(
            listener, "c1", SECRET, DIGEST, 0.5, lambda name: None if name == "alice" else f"{name} is not a peer")
    return _outcome(frames, start)


def dialler_outcome(frames: list[bytes]) -> str:
    """Hostile listener: answer a dialler with `frames`; it must refuse or see the link break."""
    def start():
        dialler, mallory = memory_pair("alice", "mallory")
        return mallory, dialler, open_as_dialler(dialler, "alice", "c1", SECRET, DIGEST, 0.5)
    return _outcome(frames, start)


def _outcome(frames: list[bytes], start) -> str:
    """"refused", "broken" or "accepted": how the victim's handshake ends after `frames`.
    `start()`, called inside the event loop, gives (mallory, victim, the handshake coroutine)."""
    async def run() -> str:
        mallory, victim, handshake = start()
        await _say_then_stop(mallory, victim, frames)
        try:
            await handshake
        except AuthError:
            return "refused"
        except (BrokenError, ClosedError):
            return "broken"
        return "accepted"
    return asyncio.run(run())


def hostile_frames():
    """A hypothesis strategy: raw junk, or frames whose CBOR header looks more or less like ours.
    (hypothesis is a test dependency, imported only when this is called.)"""
    import struct

    import cbor2
    from hypothesis import strategies as st

    from p2psl import PROTOCOL_VERSION
    from p2psl.wire.messages import KINDS

    values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
                  st.binary(max_size=40)),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
        max_leaves=10,
    )
    field_names = st.sampled_from(["v", "kind", "name", "topology", "nonce", "proof", "src", "dst", "seq", "tensors",
                                   "chunks", "id", "index", "owner", "round", "batch", "part", "x", "g", "state"])

    @st.composite
    def _frames(draw):
        """Raw junk, or a frame with a CBOR header that looks more or less like ours."""
        if draw(st.booleans()):
            return draw(st.binary(max_size=300))
        header = draw(st.dictionaries(field_names, values, max_size=10))
        if draw(st.booleans()):
            header["v"] = PROTOCOL_VERSION
        if draw(st.booleans()):
            header["kind"] = draw(st.sampled_from(sorted(KINDS) + ["chunk", "nope"]))
        if header.get("kind") in ("hello", "auth", "challenge") and draw(st.booleans()):
            header.update(name=draw(st.sampled_from(["alice", "c1", "mallory"])), topology=DIGEST,
                          nonce=draw(st.binary(min_size=32, max_size=32)),
                          proof=draw(st.binary(min_size=32, max_size=32)))
        try:
            head = cbor2.dumps(header)
        except Exception:
            head = b"\xa0"
        return struct.pack(">I", len(head)) + head + draw(st.binary(max_size=64))

    return _frames()
