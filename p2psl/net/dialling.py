"""Making a peer's connections: dialling the neighbours it dials, accepting the others.

A mixin of `Links` (p2psl.net.links), which owns the state these methods use — `neighbours`,
`addresses`, `timeouts`, `topology`, the secret, `_closing` — and serves each authenticated
channel (`_serve`). Of two linked peers the one whose name sorts first dials, again and again
with backoff while the link is down; the other accepts.

[Note: refusals for good] A neighbour that has never connected and is refused for a reason no
retry can heal (`FOR_GOOD`: another secret, topology file or protocol version, on either side of
the handshake) will never connect: waiting out `timeouts.connect` helps nobody, so the runtime
is told at once (`on_refused`). Once a neighbour has connected, such a refusal is only logged:
whoever dials with another secret then is not the neighbour we trained with, and must not be
able to stop us.
"""

from __future__ import annotations

import asyncio
import time

from p2psl.errors import AuthError, RemoteProtocolError, TransportError
from p2psl.net.channel import Channel, open_as_dialler, open_as_listener
from p2psl.net.neighbour import Neighbour, why
from p2psl.net.transport import ShapedLink, WebSocketLink, dial

#: handshake refusals that no retry can heal: another secret, topology file or protocol version
FOR_GOOD = frozenset({"auth_failed", "topology", "version"})


class Connecting:
    """Dial, accept, cut on purpose, admit; mixed into `Links`."""

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
                neighbour.last_error = why(exc)
            else:
                try:
                    channel = await open_as_dialler(link, self.me, neighbour.name, self._secret,
                                                    self.topology.digest, self.timeouts.handshake)
                    self._shape(channel)
                except asyncio.CancelledError:  # stopping mid-handshake: close the link and its client session
                    await asyncio.shield(link.close())
                    raise
                except (AuthError, TransportError, RemoteProtocolError) as exc:
                    neighbour.last_error = str(exc)
                    self._log_once(neighbour.name, "auth", "cannot connect to %s: %s", neighbour.name, exc)
                    await link.close()
                    if isinstance(exc, AuthError):
                        self._refused_for_good(neighbour.name, exc)
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
            if exc.peer in self.neighbours:
                self._refused_for_good(exc.peer, exc)
            return
        except (TransportError, OSError):
            return
        await self._serve(channel)

    def _refused_for_good(self, name: str, exc: AuthError) -> None:
        """[Note: refusals for good]: tell the runtime of a neighbour that can never connect."""
        if exc.code in FOR_GOOD and not self.neighbours[name].connected_once and not self._closing:
            self._on_refused(name, str(exc))

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
