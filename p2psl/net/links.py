"""A peer's links: its server, one authenticated channel per neighbour, and their liveness.

* Of two linked peers the one whose name sorts first dials; the other listens. The dialler keeps
  redialling with exponential backoff whenever the link is down, so a dropped connection heals by
  itself; the listener accepts a fresh connection from the same neighbour in place of the old one.
* Heartbeats run on their own task per channel: a `Ping` whenever nothing was sent for
  `timeouts.heartbeat`, and a neighbour silent for `timeouts.dead` is declared down.
* Routed messages travel in a per-neighbour session that survives reconnections, so none is lost
  or delivered twice when a link drops and comes back ([Note: link sessions] in p2psl.net.session).
* A bad frame from an authenticated neighbour is answered with a typed `Error` and logged once per
  (neighbour, code); the connection and the peer go on. Only a MAC failure or a broken session
  closes the connection.

What arrives routed goes to `on_routed`: the router (p2psl.net.network) owns the routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from p2psl.errors import (BrokenError, ClosedError, ConfigError, LocalProtocolError, P2PSLError, PeerTimeout,
                          RemoteProtocolError, TransportError)
from p2psl.net.channel import Channel
from p2psl.net.dialling import Connecting
from p2psl.net.neighbour import Neighbour, Roster, acknowledge, heartbeat, is_routed
from p2psl.net.session import Session, new_incarnation
from p2psl.net.transport import Server
from p2psl.topology import Topology
from p2psl.wire import codec
from p2psl.wire.messages import HANDSHAKE_KINDS, Ack, Bye, Error, Message, Ping, Pong, Resume, Routed

OnRouted = Callable[[Channel, Routed | Error], Awaitable[None]]
PeerEvent = Callable[[str, bool, str], None]


class Links(Connecting, Roster):
    """Serve, dial, authenticate, keep alive. The router adds routes on top (`Network`)."""

    def __init__(self, topology: Topology, me: str, secret: bytes, on_routed: OnRouted, *,
                 on_peer: PeerEvent | None = None, log: logging.LoggerAdapter | None = None,
                 addresses: dict[str, tuple[str, int]] | None = None, status: Callable[[], dict] | None = None,
                 on_refused: Callable[[str, str], None] | None = None):
        self.topology, self.me, self._secret = topology, me, secret
        self._on_routed = on_routed
        self._on_peer = on_peer or (lambda name, up, reason: None)
        self._on_refused = on_refused or (lambda name, why: None)
        self.log = log or logging.LoggerAdapter(logging.getLogger("p2psl.net.links"), {"peer": me})
        self.timeouts = topology.timeouts
        spec = topology.peer(me)
        self.incarnation = new_incarnation()
        known = {p.name: (p.host, p.port) for p in topology.peers} | (addresses or {})
        super().__init__(me, {n: Neighbour(n, dials=me < n, session=Session(self.incarnation))
                              for n in topology.neighbours(me)}, known, spec.port, topology.timeouts)
        self._server = Server(self._accept, status)
        self._bind = self.addresses[me]
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._news = asyncio.Event()
        self._logged: set[tuple[str, str]] = set()
        self._farewells = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def listen(self) -> None:
        """Bind the server; returns once connections are accepted."""
        host, port = self._bind
        try:
            await self._server.start(host, port)
        except OSError as exc:
            # our own address: a local problem (exit status 2), like a port another program holds
            raise ConfigError(f"{self.me} cannot listen on {host}:{port}: {exc.strerror or exc}") from None
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
            channel = neighbour.channel  # the link's own task may let go of it while we say bye
            if channel is not None:
                try:
                    async with asyncio.timeout(self.timeouts.closing):
                        await channel.send(Bye(reason="finished"))
                except (P2PSLError, TimeoutError, OSError):
                    pass
                await channel.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeouts.closing)
        await self._server.stop()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- sending ---------------------------------------------------------------------------------
    async def send_routed(self, hop: str, message: Routed | Error, timeout: float,
                          abandon: Callable[[], bool] | None = None) -> None:
        """Number `message` in `hop`'s session and send it, waiting up to `timeout` for a link
        that is down; a message numbered while the link drops is sent again on reconnection.
        While the link is down, `abandon()` is asked again at every `news()`: once it is true
        (the runtime declared the destination or the hop gone) the wait fails at once, since
        nothing would come of it."""
        neighbour = self.neighbours[hop]
        if neighbour.up.is_set() and not neighbour.sending.locked():
            await neighbour.sending.acquire()  # free: no wait, so no timer (most messages)
        else:
            try:
                async with asyncio.timeout(timeout):
                    await self._until_up(neighbour, message, abandon)
                    await neighbour.sending.acquire()  # numbering order must be sending order ([Note: link sessions])
            except TimeoutError:
                raise PeerTimeout(f"no link to {hop} (on the way to {message.dst}) for {timeout:g} s: "
                                  f"{neighbour.last_error}") from None
        try:
            if neighbour.channel is None:  # else it would fail only when resent, and block the session
                codec.check_encodable(message, neighbour.session.next_seq)
            seq = neighbour.session.stamp(message)
            try:
                if neighbour.channel is not None:
                    await neighbour.channel.send(message, seq)
            except LocalProtocolError:  # raised before any of its frames went out
                neighbour.session.unstamp(seq)
                raise
        except TransportError:
            pass  # the session resends it after the reconnection
        finally:
            neighbour.sending.release()

    def news(self) -> None:
        """Something `send_routed`'s `abandon` looks at changed: waits for a link ask again."""
        self._news.set()
        self._news = asyncio.Event()

    async def _until_up(self, neighbour: Neighbour, message: Routed | Error, abandon) -> None:
        while not neighbour.up.is_set():
            if abandon is not None and abandon():
                raise PeerTimeout(f"{message.dst} or the way to it ({neighbour.name}) is gone")
            waits = [asyncio.ensure_future(neighbour.up.wait()), asyncio.ensure_future(self._news.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    async def acknowledged(self, timeout: float) -> None:
        """Until every connected neighbour has acknowledged every routed message sent to it, or
        `timeout` passes (deliberate faults: the moment after which nothing sent is lost). Acks
        come as link messages that set no event of their own, so this looks every 10 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(n.session.unacked for n in self.neighbours.values()
                                                  if n.up.is_set()):
            await asyncio.sleep(0.01)

    # -- connections (dialling, accepting: p2psl.net.dialling) ------------------------------------
    async def _serve(self, channel: Channel) -> None:
        """Run one authenticated channel until it breaks: resume the session, then read,
        heartbeat, acknowledge and dispatch."""
        neighbour = self.neighbours[channel.peer]
        old = neighbour.channel
        try:
            if old is not None:  # a fresh connection from a neighbour replaces a stale one
                await old.close()
            restarted = await self._resume(channel, neighbour.session)
        except (P2PSLError, OSError, TimeoutError) as exc:
            self._log_once(channel.peer, "resume", "could not resume the session with %s: %s", channel.peer, exc)
            await channel.close()
            return
        except asyncio.CancelledError:  # stopping mid-resume: close the link and its client session
            await asyncio.shield(channel.close())
            raise
        neighbour.channel, neighbour.said_bye = channel, False
        neighbour.up.set()
        first = not neighbour.connected_once
        neighbour.connected_once = True
        self.log.info("%s %s", "connected to" if first else "reconnected to", channel.peer)
        self._on_peer(channel.peer, True, "restarted" if restarted else "connected")
        helpers = [self._spawn(heartbeat(channel, self.timeouts, self.log)),
                   self._spawn(acknowledge(channel, neighbour))]
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
                self.closed_bytes[0] += channel.bytes_sent
                self.closed_bytes[1] += channel.bytes_received
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
                message, seq = await channel.recv_numbered()
                if is_routed(message):
                    if seq is None:
                        raise RemoteProtocolError(f"routed {message.KIND} without a sequence number", "bad_sequence")
                    if not neighbour.session.accept(seq):
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

    # -- link messages ---------------------------------------------------------------------------
    async def _dispatch(self, channel: Channel, message: Message) -> None:
        if isinstance(message, Routed):  # nearly every message: asked first
            await self._on_routed(channel, message)
        elif isinstance(message, Ping):
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
        elif isinstance(message, Error) and not is_routed(message):
            self._log_once(channel.peer, "error:" + message.code, "%s reports %s: %s",
                           channel.peer, message.code, message.message)
        elif message.KIND in HANDSHAKE_KINDS and not isinstance(message, Error):
            await self._reply_error(channel, "unexpected", f"{message.KIND} after the handshake", message.KIND)
        elif isinstance(message, Error):  # an error routed back to a peer
            await self._on_routed(channel, message)

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
