"""Links: ordered, reliable streams of binary frames between two processes.

`WebSocketLink` is the real thing (aiohttp, endpoint ``ws://HOST:PORT/p2psl``); `MemoryLink` has the
same interface over in-process queues so the layers above can be unit-tested without sockets.
A link knows nothing about messages, authentication or peers — `channel.py` builds those on top.

`max_msg_size` is set deliberately on both ends to `MAX_LINK_FRAME` (aiohttp's default of 4 MiB
rejects a frame of exactly 4 MiB, SPEC §10); the codec never produces anything larger. A larger
frame from a remote makes aiohttp close that connection with code 1009, and only that one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from p2psl.net.auth import MAC_BYTES
from p2psl.wire.codec import MAX_FRAME_BYTES
from p2psl.errors import BrokenError, ClosedError, RemoteProtocolError

PATH = "/p2psl"
STATUS_PATH = "/status"
MAX_LINK_FRAME = MAX_FRAME_BYTES + MAC_BYTES

log = logging.getLogger("p2psl.net.transport")


class Link(Protocol):
    """What a channel needs from a connection."""

    description: str

    async def send(self, frame: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...


# -- WebSocket ----------------------------------------------------------------------------------

class WebSocketLink:
    """One WebSocket connection (either end). `recv` raises BrokenError when the remote goes away
    and ClosedError once we closed it ourselves."""

    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, description: str,
                 session: aiohttp.ClientSession | None = None):
        self._ws = ws
        self._session = session
        self._closing = False
        self.description = description

    async def send(self, frame: bytes) -> None:
        if self._closing:
            raise ClosedError(f"link to {self.description} is closed")
        try:
            await self._ws.send_bytes(frame)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise BrokenError(f"link to {self.description} broke while sending: {exc}") from None

    async def recv(self) -> bytes:
        msg = await self._ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return msg.data
        if self._closing:
            raise ClosedError(f"link to {self.description} is closed")
        if msg.type == aiohttp.WSMsgType.TEXT:
            raise RemoteProtocolError("text frame on a binary protocol", "bad_frame")
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise BrokenError(f"link to {self.description} failed: {self._ws.exception()}")
        code = self._ws.close_code
        raise BrokenError(f"link to {self.description} closed by the remote (code {code})")

    async def close(self) -> None:
        self._closing = True
        try:
            async with asyncio.timeout(2.0):
                await self._ws.close()
        except (TimeoutError, ConnectionError, aiohttp.ClientError, RuntimeError):
            pass
        finally:
            if self._session is not None:
                await self._session.close()


async def dial(host: str, port: int, timeout: float) -> WebSocketLink:
    """Open one WebSocket connection (one attempt). Raises OSError/aiohttp errors on failure."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout))
    try:
        ws = await session.ws_connect(f"ws://{_url_host(host)}:{port}{PATH}", max_msg_size=MAX_LINK_FRAME,
                                      autoping=True, heartbeat=None, compress=0)
    except BaseException:
        await asyncio.shield(session.close())
        raise
    return WebSocketLink(ws, f"{host}:{port}", session)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Server:
    """Accepts WebSocket connections at `PATH` and hands each to `on_link` for its lifetime."""

    def __init__(self, on_link: Callable[[WebSocketLink], Awaitable[None]],
                 status: Callable[[], dict] | None = None):
        self._on_link = on_link
        self._status = status
        self._runner: web.AppRunner | None = None
        self._links: set[WebSocketLink] = set()
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        """Bind and listen; returns once connections are accepted. Port 0 picks a free port."""
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        if self._status is not None:
            app.router.add_get(STATUS_PATH, self._handle_status)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockets = site._server.sockets if site._server else []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def _handle_status(self, request: web.Request) -> web.StreamResponse:
        """Read-only JSON numbers of this peer (progress, memory, bytes): no secret, no state."""
        # no Access-Control-Allow-Origin: a web page the user has open elsewhere must not read it
        return web.json_response(self._status(), headers={"Cache-Control": "no-store"})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_LINK_FRAME, autoping=True, heartbeat=None, compress=False)
        try:
            await ws.prepare(request)
        except ConnectionError:
            # the dialler gave up before we answered (e.g. it dialled while this process was
            # frozen, or is closing): nothing to serve, nothing to report — aiohttp's answer to
            # this exception finds the connection closed and ends quietly
            raise web.HTTPServiceUnavailable() from None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        link = WebSocketLink(ws, f"{peer[0]}:{peer[1]}" if peer else "unknown")
        self._links.add(link)
        try:
            await self._on_link(link)
        finally:
            self._links.discard(link)
            await link.close()
        return ws

    async def stop(self) -> None:
        """Stop accepting, close every link, then every connection aiohttp still holds."""
        if self._runner is not None:
            await self._stop_accepting()
        for link in list(self._links):
            await link.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _stop_accepting(self) -> None:
        """Stop taking connections before closing the listening sockets.

        A connection the kernel accepted just before is still being set up by an asyncio task,
        which fails without closing its socket if the listening server closes first (Python
        3.11). So: no new accepts (the sockets' readers removed), two turns of the loop for the
        task to make its transport and for aiohttp to register it, then close; aiohttp's
        cleanup closes what it registered."""
        loop = asyncio.get_running_loop()
        for site in self._runner.sites:
            listening = getattr(site, "_server", None)
            for sock in (listening.sockets if listening is not None else ()):
                loop.remove_reader(sock.fileno())
        for _ in range(2):
            await asyncio.sleep(0)
        for site in list(self._runner.sites):
            await site.stop()


# -- emulated links ------------------------------------------------------------------------------

class ShapedLink:
    """A link whose sending side behaves like a slower, longer wire: each frame occupies it for
    len / bandwidth seconds (frames queue behind each other) and arrives `latency` later, in order.

    For experiments on one machine (``[emulation] links = true``); the kernel here has no netem,
    so the transport emulates latency and rate itself (SPEC §10). Each peer shapes what it sends,
    so the two directions of a link are independent resources, as in the cost model."""

    def __init__(self, inner: Link, bandwidth: float | None, latency: float):
        self._inner, self._bandwidth, self._latency = inner, bandwidth, latency
        self.description = inner.description
        self._free_at = 0.0
        self._lock = asyncio.Lock()
        # Unbounded on purpose: `send` waits for the emulated wire before it queues a frame, so
        # what is here has left the sender by the bandwidth's pace and waits out its latency.
        self._in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._carrier: asyncio.Task | None = None
        self._failure: BaseException | None = None

    async def send(self, frame: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._bandwidth:
                start = max(loop.time(), self._free_at)
                self._free_at = start + len(frame) / self._bandwidth
                await asyncio.sleep(self._free_at - loop.time())
        if not self._latency:
            await self._inner.send(frame)
            return
        if self._carrier is None:
            self._carrier = loop.create_task(self._carry())
        self._in_flight.put_nowait((loop.time() + self._latency, frame))

    async def _carry(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, frame = await self._in_flight.get()
            try:
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._inner.send(frame)
            except (BrokenError, ClosedError) as exc:
                self._failure = exc
                return
            finally:
                self._in_flight.task_done()

    async def recv(self) -> bytes:
        return await self._inner.recv()

    async def close(self) -> None:
        """Deliver what is still on the wire (at most `latency` away), then close."""
        if self._carrier is not None and not self._carrier.done():
            try:
                async with asyncio.timeout(self._latency + 1.0):
                    await self._in_flight.join()  # every frame handed to us has been sent
            except TimeoutError:
                pass
            self._carrier.cancel()
            await asyncio.gather(self._carrier, return_exceptions=True)
        await self._inner.close()


# -- in memory ----------------------------------------------------------------------------------

_CLOSE = object()


class MemoryLink:
    """One end of an in-process link; build both ends with `memory_pair`."""

    def __init__(self, inbox: asyncio.Queue, description: str):
        self._inbox = inbox
        self._peer: MemoryLink | None = None
        self._closing = False
        self.description = description

    async def send(self, frame: bytes) -> None:
        if self._closing:
            raise ClosedError(f"link to {self.description} is closed")
        if self._peer is None or self._peer._closing:
            raise BrokenError(f"link to {self.description} closed by the remote")
        await self._peer._inbox.put(bytes(frame))

    async def recv(self) -> bytes:
        if self._closing:
            raise ClosedError(f"link to {self.description} is closed")
        item = await self._inbox.get()
        if item is _CLOSE:
            if self._closing:
                raise ClosedError(f"link to {self.description} is closed")
            raise BrokenError(f"link to {self.description} closed by the remote")
        return item

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._inbox.put_nowait(_CLOSE)
        if self._peer is not None and not self._peer._closing:
            self._peer._inbox.put_nowait(_CLOSE)


def memory_pair(a: str = "a", b: str = "b", maxsize: int = 0) -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-memory link ends (`a`'s end first)."""
    end_a, end_b = MemoryLink(asyncio.Queue(maxsize), b), MemoryLink(asyncio.Queue(maxsize), a)
    end_a._peer, end_b._peer = end_b, end_a
    return end_a, end_b
