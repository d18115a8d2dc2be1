"""A peer's view of the network: its links (p2psl.net.links) and the routes over them.

Routed messages go to the next hop of the topology's shortest path; a message relayed to us must
arrive from the neighbour that lies on the route from its claimed source (a neighbour cannot
speak for a peer behind someone else). What is for this peer goes to the runtime's handler,
whose typed refusals travel back to the sender as routed `Error`s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from p2psl.errors import P2PSLError, RemoteProtocolError
from p2psl.net.channel import Channel
from p2psl.net.links import Links, PeerEvent
from p2psl.topology import Topology
from p2psl.wire.messages import Error, Routed

Handler = Callable[[Routed], Awaitable[None]]


class Network(Links):
    """A peer's links (dial, accept, resume, heartbeat: `Links`) plus the routes over them.
    Use as ``async with Network(...) as net:``."""

    def __init__(self, topology: Topology, me: str, secret: bytes, handler: Handler, *,
                 on_peer: PeerEvent | None = None, log: logging.LoggerAdapter | None = None,
                 addresses: dict[str, tuple[str, int]] | None = None, status: Callable[[], dict] | None = None,
                 on_refused: Callable[[str, str], None] | None = None):
        super().__init__(topology, me, secret, self._route_in, on_peer=on_peer, log=log, addresses=addresses,
                         status=status, on_refused=on_refused)
        self._handler = handler

    async def __aenter__(self) -> Network:
        await self.listen()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def send(self, message: Routed, timeout: float | None = None,
                   abandon: Callable[[str], bool] | None = None) -> None:
        """Deliver `message` to `message.dst`, relayed if it is not a neighbour. Waits for a link
        that is down to come back, up to `timeout` (default `timeouts.dead`), unless `abandon`
        says of the destination or the next hop that it is no use (see `send_routed`)."""
        if message.dst == self.me:
            await self._deliver(message)
            return
        hop = self.topology.next_hop(self.me, message.dst)
        give_up = None if abandon is None else (lambda: abandon(message.dst) or abandon(hop))
        await self.send_routed(hop, message, self.timeouts.dead if timeout is None else timeout, give_up)

    async def _route_in(self, channel: Channel, message: Routed | Error) -> None:
        """A routed message from neighbour `channel.peer`: for us, or to pass on."""
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
            await self.send(error, timeout=self.timeouts.closing)
        except (P2PSLError, OSError):
            pass
