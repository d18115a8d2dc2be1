"""An authenticated message stream to one neighbour: handshake, MACs and the codec over a Link.

`open_as_dialler` / `open_as_listener` run the handshake of docs/protocol.md and return a
`Channel`, or raise `AuthError` after telling the other side why (a typed `Error` frame). After the
handshake every frame is sealed with a per-direction MAC (p2psl.net.auth), so nobody without the
secret can inject, replay or reorder frames.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from p2psl.wire import codec
from p2psl.net.auth import (NONCE_BYTES, Opener, Sealer, check_proof, new_nonce, proof, session_keys,
                        transcript)
from p2psl.errors import AuthError, P2PSLError, RemoteProtocolError
from p2psl.wire.messages import Auth, Challenge, Error, Hello, Message, Welcome
from p2psl.net.transport import Link


class Channel:
    """Messages to and from neighbour `peer` over an authenticated link."""

    def __init__(self, link: Link, me: str, peer: str, sealer: Sealer, opener: Opener,
                 max_message_bytes: int = codec.MAX_MESSAGE_BYTES):
        self.link, self.me, self.peer = link, me, peer
        self._sealer, self._opener = sealer, opener
        self._decoder = codec.Decoder(max_message_bytes)
        self._send_lock = asyncio.Lock()
        self._next_id = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_received = self.last_sent = time.monotonic()

    async def send(self, message: Message, seq: int | None = None) -> None:
        """Encode, seal and send; chunks of concurrent messages may interleave (they carry ids)."""
        self._next_id += 1
        for frame in codec.iter_frames(message, self._next_id, seq):
            async with self._send_lock:  # sealing order must equal sending order
                sealed = self._sealer.seal(frame)
                await self.link.send(sealed)
            self.bytes_sent += len(sealed)
            self.last_sent = time.monotonic()

    async def recv(self) -> Message:
        """The next complete message (see `recv_numbered`)."""
        return (await self.recv_numbered())[0]

    async def recv_numbered(self) -> tuple[Message, int | None]:
        """The next complete message with its link-session number, for the session layer. A
        `RemoteProtocolError` with code "bad_mac" means the stream can no longer be trusted; any
        other code concerns one message and the stream goes on."""
        while True:
            frame = await self.link.recv()
            self.bytes_received += len(frame)
            self.last_received = time.monotonic()
            numbered = self._decoder.feed_numbered(self._opener.open(frame))
            if numbered is not None:
                return numbered

    async def close(self) -> None:
        await self.link.close()


async def _recv_plain(link: Link, timeout: float, waiting_for: str) -> Message:
    return codec.decode(await _recv_frame(link, timeout, waiting_for))


async def _recv_frame(link: Link, timeout: float, waiting_for: str) -> bytes:
    try:
        async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
            return await link.recv()
    except TimeoutError:
        raise AuthError(f"no {waiting_for} within {timeout:g} s") from None


async def _refuse(link: Link, code: str, message: str, peer: str | None = None) -> None:
    """Tell the other side why, best effort, then fail the handshake."""
    try:
        async with asyncio.timeout(2.0):
            await link.send(codec.encode(Error(code=code, message=message))[0])
    except (P2PSLError, TimeoutError, OSError):
        pass
    raise AuthError(message, code, peer)


async def open_as_dialler(link: Link, me: str, peer: str, secret: bytes, digest: str,
                          timeout: float) -> Channel:
    """Authenticate to the listener `peer` at the other end of `link`."""
    nonce = new_nonce()
    await link.send(codec.encode(Hello(name=me, topology=digest, nonce=nonce))[0])
    try:
        reply = await _recv_plain(link, timeout, "challenge")
    except RemoteProtocolError as exc:
        if exc.code == "version":
            raise AuthError(f"{peer} speaks another protocol version ({exc})", "version", peer) from None
        raise AuthError(f"{peer} answered the hello with a malformed frame: {exc}", exc.code, peer) from None
    if isinstance(reply, Error):
        raise AuthError(f"{peer} refused the connection: {reply.message} ({reply.code})", reply.code, peer)
    if not isinstance(reply, Challenge) or len(reply.nonce) != NONCE_BYTES:
        await _refuse(link, "handshake", f"expected a challenge, got {reply.KIND}")
    if reply.name != peer:
        await _refuse(link, "wrong_peer", f"expected peer {peer} at {link.description}, found {reply.name}")
    script = transcript(me, peer, digest, nonce, reply.nonce)
    if not check_proof(secret, "listener", script, reply.proof):
        await _refuse(link, "auth_failed", f"{peer} does not prove the deployment secret (wrong secret?)", peer)
    await link.send(codec.encode(Auth(proof=proof(secret, "dialler", script)))[0])
    try:
        final = await _recv_plain(link, timeout, "welcome")
    except RemoteProtocolError as exc:
        raise AuthError(f"{peer} answered the proof with a malformed frame: {exc}", exc.code, peer) from None
    if isinstance(final, Error):
        raise AuthError(f"{peer} refused the connection: {final.message} ({final.code})", final.code, peer)
    if not isinstance(final, Welcome):
        await _refuse(link, "handshake", f"expected welcome, got {final.KIND}")
    to_listener, to_dialler = session_keys(secret, script)
    return Channel(link, me, peer, Sealer(to_listener), Opener(to_dialler))


async def open_as_listener(link: Link, me: str, secret: bytes, digest: str, timeout: float,
                           admit: Callable[[str], str | None]) -> Channel:
    """Authenticate the dialler at the other end of `link`; `admit(name)` returns a reason to
    refuse that name (unknown peer, not a neighbour) or None."""
    frame = await _recv_frame(link, timeout, "hello")
    try:
        hello = codec.decode(frame)
    except RemoteProtocolError as exc:
        sender = codec.peek_name(frame) if exc.code == "version" else None
        if sender is not None:  # named, so the runtime can stop waiting for a neighbour that never fits
            await _refuse(link, exc.code, f"{sender} at {link.description} speaks another protocol version "
                                          f"({exc})", sender)
        await _refuse(link, exc.code, f"bad hello from {link.description}: {exc}")
    if not isinstance(hello, Hello) or len(hello.nonce) != NONCE_BYTES:
        await _refuse(link, "handshake", f"expected a hello from {link.description}, got {hello.KIND}")
    reason = admit(hello.name)
    if reason is not None:
        await _refuse(link, "not_admitted", reason)
    if hello.topology != digest:
        await _refuse(link, "topology", f"{hello.name} runs a different topology file "
                                        f"(digest {hello.topology[:12]}…, mine {digest[:12]}…)", hello.name)
    nonce = new_nonce()
    script = transcript(hello.name, me, digest, hello.nonce, nonce)
    await link.send(codec.encode(Challenge(name=me, nonce=nonce, proof=proof(secret, "listener", script)))[0])
    try:
        auth = await _recv_plain(link, timeout, "proof")
    except RemoteProtocolError as exc:
        await _refuse(link, exc.code, f"bad proof frame from {hello.name}: {exc}")
    if isinstance(auth, Error):
        raise AuthError(f"{hello.name} gave up the handshake: {auth.message} ({auth.code})", auth.code, hello.name)
    if not isinstance(auth, Auth) or not check_proof(secret, "dialler", script, auth.proof):
        await _refuse(link, "auth_failed", f"{hello.name} at {link.description} does not prove the deployment "
                                           "secret (wrong secret?)", hello.name)
    await link.send(codec.encode(Welcome())[0])
    to_listener, to_dialler = session_keys(secret, script)
    return Channel(link, me, hello.name, Sealer(to_dialler), Opener(to_listener))
