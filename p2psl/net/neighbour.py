"""One neighbour of a peer: its connection state, and the tasks that keep a live link honest.

[Note: link sessions] in p2psl.net.session says why each neighbour keeps a `Session`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from collections.abc import Callable

from p2psl.errors import PeerTimeout, TransportError
from p2psl.net.channel import Channel
from p2psl.net.session import Session
from p2psl.topology import Timeouts
from p2psl.wire.messages import Ack, Error, Message, Ping, Routed

#: acknowledgements are coalesced: at most one per this many seconds while messages keep coming
ACK_DELAY = 0.02


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



class Roster:
    """Who this peer's neighbours are, which links are up, and waiting for the missing ones."""

    def __init__(self, me: str, neighbours: dict[str, Neighbour], addresses: dict[str, tuple[str, int]],
                 port: int, timeouts: Timeouts):
        self.me, self.neighbours, self.addresses, self.port, self.timeouts = me, neighbours, addresses, port, timeouts
        self.closed_bytes = [0, 0]  # sent and received over connections already closed

    @property
    def bytes_sent(self) -> int:
        return self.closed_bytes[0] + sum(n.channel.bytes_sent for n in self.neighbours.values() if n.channel)

    @property
    def bytes_received(self) -> int:
        return self.closed_bytes[1] + sum(n.channel.bytes_received for n in self.neighbours.values() if n.channel)

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


async def acknowledge(channel: Channel, neighbour: Neighbour) -> None:
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


#: how late this event loop may wake before the lateness counts as time it could not listen
LATE = 0.25


async def heartbeat(channel: Channel, timeouts: Timeouts, log: logging.LoggerAdapter) -> None:
    """A `Ping` whenever nothing was sent for `heartbeat`; the link closed after `dead` of silence.

    [Note: a busy loop is not a silent peer] Silence is counted only while this peer's event
    loop could have heard: the time it woke late (busy with other work, or with the other peers
    of its process, `p2psl run --in-process`) is not held against the neighbour. A hundred peers
    in one process encode and decode the owners' all-reduce on one loop for seconds at a time;
    counting that as silence declared live links dead and made the peers recover from nothing.
    """
    interval, dead = timeouts.heartbeat, timeouts.dead
    heard, blind = channel.last_received, 0.0
    try:
        while True:
            woke = time.monotonic() + interval / 2
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            if channel.last_received != heard:
                heard, blind = channel.last_received, 0.0
            blind += max(0.0, now - woke - LATE)  # [Note: a busy loop is not a silent peer]
            if now - heard - blind > dead:
                log.warning("%s silent for %.1f s: declaring the link dead", channel.peer, now - heard)
                await channel.close()
                return
            if now - channel.last_sent >= interval:
                await channel.send(Ping(sent=time.time()))
    except (TransportError, OSError):
        return


def is_routed(message: Message) -> bool:
    """Routed messages (and errors routed back to a peer) travel in the link session."""
    return isinstance(message, Routed) or (isinstance(message, Error) and bool(message.dst))


def why(exc: BaseException) -> str:
    """A short human reason for a failed dial."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in text or "Cannot connect" in text:
        return "connection refused: not started yet?"
    return text[:200]
