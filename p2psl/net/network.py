"""A peer's view of the network: its server, one channel per neighbour, routing and liveness.

* Of two linked peers the one whose name sorts first dials; the other listens. The dialler keeps
  redialling with exponential backoff whenever the link is down, so a dropped connection heals by
  itself; the listener accepts a fresh connection from the same neighbour in place of the old one.
* Heartbeats run on their own task per channel: a `Ping` whenever nothing was sent for
  `timeouts.heartbeat`, and a neighbour silent for `timeouts.dead` is declared down.
* Routed messages go to the next hop of the topology's shortest path; a message relayed to us
  must arrive from the neighbour that lies on the route from its claimed source (a neighbour
  cannot speak for a peer behind someone else).
* Routed messages travel in a per-neighbour session that survives reconnections, so none is lost
  or delivered twice when a link drops and comes back ([Note: link sessions] in p2psl.net.session).
* A bad frame from an authenticated neighbour is answered with a typed `Error` and logged once per
  (neighbour, code); the connection and the peer go on. Only a MAC failure or a broken session
  closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable

from p2psl.net.channel import Channel, open_as_dialler, open_as_listener
from p2psl.errors import (AuthError, BrokenError, ClosedError, P2PSLError, PeerTimeout,
                          RemoteProtocolError, TransportError)
from p2psl.wire.messages import HANDSHAKE_KINDS, Ack, Bye, Error, Message, Ping, Pong, Resume, Routed
from p2psl.net.session import Session, new_incarnation
from p2psl.topology import Topology
from p2psl.net.transport import Server, ShapedLink, WebSocketLink, dial

Handler = Callable[[Routed], Awaitable[None]]
ACK_DELAY = 0.02
PeerEvent = Callable[[str, bool, str], None]


@dataclass
class Neighbour:
    """Connection state of one neighbour."""

    name: str
    dials: bool
    channel: Channel | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: str = "not connected yet"
    connected_once: bool = False
    said_bye: bool = False
    blocked_until: float = 0.0       # a deliberate cut (p2psl.runtime.faults): no dialling or accepting before
    session: Session | None = None
    delivered: asyncio.Event = field(default_factory=asyncio.Event)
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)  # one routed message at a time


class Network:
    """Serve, dial, authenticate, route. Use as ``async with Network(...) as net:``."""

    def __init__(self, topology: Topology, me: str, secret: bytes, handler: Handler, *,
                 on_peer: PeerEvent | None = None, log: logging.LoggerAdapter | None = None,
                 addresses: dict[str, tuple[str, int]] | None = None, status: Callable[[], dict] | None = None):
        self.topology, self.me, self._secret = topology, me, secret
        self._handler = handler
        self._on_peer = on_peer or (lambda name, up, reason: None)
        self.log = log or logging.LoggerAdapter(logging.getLogger("p2psl.net.network"), {"peer": me})
        self.timeouts = topology.timeouts
        spec = topology.peer(me)
        self.addresses = {p.name: (p.host, p.port) for p in topology.peers}
        self.addresses.update(addresses or {})
        self.incarnation = new_incarnation()
        self.neighbours = {n: Neighbour(n, dials=me < n, session=Session(self.incarnation))
                           for n in topology.neighbours(me)}
        self._server = Server(self._accept, status)
        self._bind = self.addresses[me]
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._logged: set[tuple[str, str]] = set()
        self._closed_bytes = [0, 0]
        self._farewells = asyncio.Event()
        self.port: int = spec.port

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Network:
        await self.listen()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def listen(self) -> None:
        """Bind the server; returns once connections are accepted."""
        host, port = self._bind
        try:
            await self._server.start(host, port)
        except OSError as exc:
            raise TransportError(f"{self.me} cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = self._server.port
        self.log.info("listening on ws://%s:%d/p2psl", host, self.port)

    def connect(self, addresses: dict[str, tuple[str, int]] | None = None) -> None:
        """Start dialling the neighbours this peer dials (those whose names sort after ours)."""
        self.addresses.update(addresses or {})
        for neighbour in self.neighbours.values():
            if neighbour.dials:
                self._spawn(self._keep_dialling(neighbour))

    async def farewell(self, timeout: float) -> None:
        """Say bye to every neighbour and wait until each has said bye too (or its link is down):
        a peer that leaves early would drop the messages it relays for the others."""
        for neighbour in self.neighbours.values():
            if neighbour.channel is not None:
                await self._try_send(neighbour.channel, Bye(reason="finished"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = [n for n in self.neighbours.values() if n.channel is not None and not n.said_bye]
            if not waiting:
                return
            self._farewells.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._farewells.wait()
            except TimeoutError:
                return

    async def stop(self) -> None:
        """Say bye, close every link, cancel every task, stop the server. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for neighbour in self.neighbours.values():
            if neighbour.channel is not None:
                try:
                    async with asyncio.timeout(1.0):
                        await neighbour.channel.send(Bye(reason="finished"))
                except (P2PSLError, TimeoutError, OSError):
                    pass
                await neighbour.channel.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self._server.stop()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- status ----------------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self._closed_bytes[0] + sum(n.channel.bytes_sent for n in self.neighbours.values() if n.channel)

    @property
    def bytes_received(self) -> int:
        return self._closed_bytes[1] + sum(n.channel.bytes_received for n in self.neighbours.values() if n.channel)

    def is_up(self, name: str) -> bool:
        neighbour = self.neighbours.get(name)
        return neighbour is not None and neighbour.up.is_set()

    def missing(self) -> list[str]:
        return sorted(n.name for n in self.neighbours.values() if not n.up.is_set())

    def describe_missing(self) -> str:
        """One line per neighbour not connected, saying what we are doing about it."""
        lines = []
        for name in self.missing():
            n = self.neighbours[name]
            host, port = self.addresses[name]
            how = f"dialling {host}:{port}" if n.dials else f"waiting for it to dial us on port {self.port}"
            lines.append(f"{name}: {how} ({n.last_error})")
        return "; ".join(lines)

    async def wait_connected(self, names: list[str] | None = None, timeout: float | None = None,
                             status: Callable[[str], None] | None = None, every: float = 5.0) -> None:
        """Wait until the given neighbours (default all) are connected, reporting who is missing."""
        names = sorted(self.neighbours) if names is None else names
        deadline = time.monotonic() + (self.timeouts.connect if timeout is None else timeout)
        pause = 1.0  # the first report comes quickly, later ones every `every` seconds
        while True:
            missing = [n for n in names if not self.is_up(n)]
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"{self.me} gave up waiting for neighbours after "
                                  f"{self.timeouts.connect if timeout is None else timeout:g} s: "
                                  f"{self.describe_missing()}")
            waits = [asyncio.ensure_future(self.neighbours[n].up.wait()) for n in missing]
            try:
                await asyncio.wait(waits, timeout=min(pause, left), return_when=asyncio.ALL_COMPLETED)
                pause = every
            finally:
                for w in waits:
                    w.cancel()
            if status is not None and any(not self.is_up(n) for n in missing):
                status(f"waiting for {', '.join(n for n in missing if not self.is_up(n))}: "
                       f"{self.describe_missing()} — {max(0.0, deadline - time.monotonic()):.0f} s left")

    # -- sending ---------------------------------------------------------------------------------
    async def send(self, message: Routed, timeout: float | None = None) -> None:
        """Deliver `message` to `message.dst`, relayed if it is not a neighbour. Waits for a link
        that is down to come back, up to `timeout` (default `timeouts.dead`)."""
        if message.dst == self.me:
            await self._deliver(message)
            return
        hop = self.topology.next_hop(self.me, message.dst)
        neighbour = self.neighbours[hop]
        wait = self.timeouts.dead if timeout is None else timeout
        if not neighbour.up.is_set():
            try:
                async with asyncio.timeout(wait):
                    await neighbour.up.wait()
            except TimeoutError:
                raise PeerTimeout(f"no link to {hop} (on the way to {message.dst}) for {wait:g} s: "
                                  f"{neighbour.last_error}") from None
        async with neighbour.sending:  # numbering order must be sending order ([Note: link sessions])
            seq = neighbour.session.stamp(message)
            channel = neighbour.channel
            if channel is None:
                return  # queued in the session: sent again when the link is back
            try:
                await channel.send(message, seq)
            except TransportError:
                pass  # the session resends it after the reconnection

    async def send_link(self, peer: str, message: Message) -> None:
        """Send a link-level message (no routing) to a connected neighbour."""
        channel = self.neighbours[peer].channel
        if channel is None:
            raise BrokenError(f"no link to {peer}")
        await channel.send(message)

    # -- connections -----------------------------------------------------------------------------
    async def _keep_dialling(self, neighbour: Neighbour) -> None:
        delay = 0.05
        while not self._closing:
            blocked = neighbour.blocked_until - time.monotonic()
            if blocked > 0:
                await asyncio.sleep(blocked)
            host, port = self.addresses[neighbour.name]
            try:
                link = await dial(host, port, self.timeouts.handshake)
            except Exception as exc:  # refusals arrive as OSError, aiohttp errors or timeouts
                neighbour.last_error = _why(exc)
            else:
                try:
                    channel = await open_as_dialler(link, self.me, neighbour.name, self._secret,
                                                    self.topology.digest, self.timeouts.handshake)
                    self._shape(channel)
                except (AuthError, TransportError, RemoteProtocolError) as exc:
                    neighbour.last_error = str(exc)
                    self._log_once(neighbour.name, "auth", "cannot connect to %s: %s", neighbour.name, exc)
                    await link.close()
                else:
                    delay = 0.05
                    await self._serve(channel)
                    continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _accept(self, link: WebSocketLink) -> None:
        """aiohttp calls this for each incoming connection and keeps it open while it runs."""
        if self._closing:
            return
        try:
            channel = await open_as_listener(link, self.me, self._secret, self.topology.digest,
                                             self.timeouts.handshake, self._admit)
            self._shape(channel)
        except AuthError as exc:  # logged once per remote host, so strangers cannot flood the log
            host = link.description.rpartition(":")[0] or link.description
            self._log_once(host, "refused", "refused a connection from %s: %s (further refusals of %s are not logged)",
                           link.description, exc, host)
            return
        except (TransportError, OSError):
            return
        await self._serve(channel)

    def _shape(self, channel: Channel) -> None:
        """With ``[emulation] links = true``, what we send takes the link's bandwidth and latency."""
        if not self.topology.emulate_links:
            return
        spec = self.topology.link(self.me, channel.peer)
        if spec.bandwidth or spec.latency:
            channel.link = ShapedLink(channel.link, spec.bandwidth, spec.latency)

    def cut(self, name: str, seconds: float) -> None:
        """Drop the link to neighbour `name` and keep it down for `seconds` (fault injection)."""
        neighbour = self.neighbours[name]
        neighbour.blocked_until = time.monotonic() + seconds
        self.log.warning("cutting the link to %s for %g s", name, seconds)
        if neighbour.channel is not None:
            self._spawn(neighbour.channel.link.close())

    def _admit(self, name: str) -> str | None:
        if name in self.neighbours and time.monotonic() < self.neighbours[name].blocked_until:
            return f"the link to {name} is cut"
        if name not in self.topology.names:
            return f"{name} is not a peer of this deployment"
        if name not in self.neighbours:
            return f"{name} is not linked to {self.me} in the topology"
        if self.neighbours[name].dials:
            return f"{self.me} dials {name}, not the other way round"
        return None

    async def _serve(self, channel: Channel) -> None:
        """Run one authenticated channel until it breaks: resume the session, then read,
        heartbeat, acknowledge and dispatch."""
        neighbour = self.neighbours[channel.peer]
        old = neighbour.channel
        if old is not None:  # a fresh connection from a neighbour replaces a stale one
            await old.close()
        try:
            restarted = await self._resume(channel, neighbour.session)
        except (P2PSLError, OSError, TimeoutError) as exc:
            self._log_once(channel.peer, "resume", "could not resume the session with %s: %s", channel.peer, exc)
            await channel.close()
            return
        neighbour.channel, neighbour.said_bye = channel, False
        neighbour.up.set()
        first = not neighbour.connected_once
        neighbour.connected_once = True
        self.log.info("%s %s", "connected to" if first else "reconnected to", channel.peer)
        self._on_peer(channel.peer, True, "restarted" if restarted else "connected")
        helpers = [self._spawn(self._heartbeat(channel)), self._spawn(self._acknowledge(channel, neighbour))]
        reason = "closed"
        try:
            reason = await self._read(channel)
        finally:
            for helper in helpers:
                helper.cancel()
            if neighbour.channel is channel:
                neighbour.channel = None
                neighbour.up.clear()
                neighbour.last_error = reason
                self._closed_bytes[0] += channel.bytes_sent
                self._closed_bytes[1] += channel.bytes_received
                if not self._closing:
                    self.log.log(logging.INFO if neighbour.said_bye else logging.WARNING,
                                 "link to %s down: %s", channel.peer, reason)
                    self._on_peer(channel.peer, False, reason)
                self._farewells.set()
            await channel.close()

    async def _resume(self, channel: Channel, session: Session) -> bool:
        """Exchange `Resume`s and resend what the neighbour has not got; True if it restarted."""
        await channel.send(session.resume())
        async with asyncio.timeout(self.timeouts.handshake):
            reply = await channel.recv()
        if not isinstance(reply, Resume):
            raise RemoteProtocolError(f"expected resume, got {reply.KIND}", "handshake")
        async with self.neighbours[channel.peer].sending:
            resend, restarted = session.on_resume(reply)
            for seq, message in resend:
                await channel.send(message, seq)
        return restarted

    async def _read(self, channel: Channel) -> str:
        neighbour = self.neighbours[channel.peer]
        while True:
            try:
                message = await channel.recv()
                if _routed(message):
                    if channel.last_seq is None:
                        raise RemoteProtocolError(f"routed {message.KIND} without a sequence number", "bad_sequence")
                    if not neighbour.session.accept(channel.last_seq):
                        continue  # a duplicate resent after a reconnection
                    neighbour.delivered.set()
            except RemoteProtocolError as exc:
                self._log_once(channel.peer, exc.code, "bad frame from %s: %s", channel.peer, exc)
                if exc.code in ("bad_mac", "bad_sequence"):
                    return f"closed: {exc}"
                if exc.seq is not None:  # refused, but its number is used up: the stream goes on
                    try:
                        if not neighbour.session.accept(exc.seq):
                            continue  # a resent duplicate of a message already refused
                    except RemoteProtocolError as gap:
                        return f"closed: {gap}"
                    neighbour.delivered.set()  # acknowledged like any other
                await self._reply_error(channel, exc.code, str(exc))
                continue
            except (BrokenError, ClosedError) as exc:
                return "said bye" if neighbour.said_bye else str(exc)
            await self._dispatch(channel, message)

    async def _acknowledge(self, channel: Channel, neighbour: Neighbour) -> None:
        """Cumulative acks, coalesced: at most one per ACK_DELAY while messages keep coming."""
        try:
            while True:
                await neighbour.delivered.wait()
                await asyncio.sleep(ACK_DELAY)
                neighbour.delivered.clear()
                received = neighbour.session.ack_due()
                if received is not None:
                    await channel.send(Ack(received=received))
        except (TransportError, OSError):
            return

    async def _heartbeat(self, channel: Channel) -> None:
        interval, dead = self.timeouts.heartbeat, self.timeouts.dead
        try:
            while True:
                await asyncio.sleep(interval / 2)
                now = time.monotonic()
                if now - channel.last_received > dead:
                    self.log.warning("%s silent for %.1f s: declaring the link dead", channel.peer,
                                     now - channel.last_received)
                    await channel.close()
                    return
                if now - channel.last_sent >= interval:
                    await channel.send(Ping(sent=time.time()))
        except (TransportError, OSError):
            return

    # -- receiving -------------------------------------------------------------------------------
    async def _dispatch(self, channel: Channel, message: Message) -> None:
        if isinstance(message, Ping):
            await self._try_send(channel, Pong(sent=message.sent))
        elif isinstance(message, Pong):
            return
        elif isinstance(message, Ack):
            self.neighbours[channel.peer].session.on_ack(message.received)
        elif isinstance(message, Resume):
            await self._reply_error(channel, "unexpected", "resume after the session was resumed", message.KIND)
        elif isinstance(message, Bye):
            self.neighbours[channel.peer].said_bye = True
            self._farewells.set()
        elif isinstance(message, Error) and not _routed(message):
            self._log_once(channel.peer, "error:" + message.code, "%s reports %s: %s",
                           channel.peer, message.code, message.message)
        elif message.KIND in HANDSHAKE_KINDS and not isinstance(message, Error):
            await self._reply_error(channel, "unexpected", f"{message.KIND} after the handshake", message.KIND)
        elif isinstance(message, (Routed, Error)):
            await self._route_in(channel, message)

    async def _route_in(self, channel: Channel, message: Routed | Error) -> None:
        src = message.src
        if src not in self.topology.names or message.dst not in self.topology.names:
            await self._reply_error(channel, "bad_route", f"unknown peer in {src!r} → {message.dst!r}", message.KIND)
            return
        if src == self.me or self.topology.route(src, self.me)[-2] != channel.peer:
            await self._reply_error(channel, "spoofed", f"{channel.peer} cannot carry a message from {src}",
                                    message.KIND)
            return
        if message.dst != self.me:
            self._spawn(self._relay(message))
        else:
            await self._deliver(message)

    async def _relay(self, message: Routed) -> None:
        try:  # the next hop may still be starting: wait as long as for a first connection
            await self.send(message, timeout=self.timeouts.connect)
        except (P2PSLError, OSError) as exc:
            self._log_once(message.dst, "relay", "cannot relay %s to %s: %s", message.KIND, message.dst, exc)

    async def _deliver(self, message: Routed) -> None:
        """Hand a message for us to the runtime; its typed refusals go back to the sender."""
        try:
            await self._handler(message)
        except RemoteProtocolError as exc:
            self._log_once(message.src, exc.code, "refused %s from %s: %s", message.KIND, message.src, exc)
            if not isinstance(message, Error):
                await self._route_error(message, exc.code, str(exc))
        except P2PSLError as exc:
            self.log.error("%s from %s failed: %s", message.KIND, message.src, exc)
            if not isinstance(message, Error):
                await self._route_error(message, type(exc).__name__, str(exc))
        except Exception as exc:  # a bug on our side must not let a remote take the peer down
            self.log.exception("internal error handling %s from %s", message.KIND, message.src)
            if not isinstance(message, Error):
                await self._route_error(message, "internal", f"{type(exc).__name__}: {exc}")

    async def _route_error(self, message: Routed, code: str, text: str) -> None:
        error = Error(code=code, message=text, ref=message.KIND, src=self.me, dst=message.src)
        try:
            await self.send(error, timeout=1.0)
        except (P2PSLError, OSError):
            pass

    async def _reply_error(self, channel: Channel, code: str, text: str, ref: str = "") -> None:
        await self._try_send(channel, Error(code=code, message=text[:500], ref=ref))

    async def _try_send(self, channel: Channel, message: Message) -> None:
        try:
            await channel.send(message)
        except (TransportError, OSError):
            pass

    def _log_once(self, who: str, code: str, fmt: str, *args) -> None:
        key = (who, code)
        if key in self._logged:
            return
        self._logged.add(key)
        self.log.warning(fmt, *args)


def _routed(message: Message) -> bool:
    """Routed messages (and errors routed back to a peer) travel in the link session."""
    return isinstance(message, Routed) or (isinstance(message, Error) and bool(message.dst))


def _why(exc: BaseException) -> str:
    """A short human reason for a failed dial."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in text or "Cannot connect" in text:
        return "connection refused: not started yet?"
    return text[:200]

