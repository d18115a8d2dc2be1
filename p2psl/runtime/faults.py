"""Deliberate faults, for tests and chaos drills (never set in normal runs).

``P2PSL_FAULTS`` holds ``;``-separated faults of the form ``KIND:round=R:batch=B``:

* ``crash`` — the process dies on the spot (``os._exit(137)``, as after SIGKILL: no clean-up,
  no goodbye) when it reaches batch B of round R;
* ``freeze`` — the process stops answering anything (its event loop blocks for ``seconds=S``,
  default 3600) at that point: a hung peer, which only heartbeats can detect;
* ``cut`` — the link to neighbour ``peer=NAME`` drops and stays unusable for ``seconds=S`` (this
  side refuses to dial or accept it meanwhile): a network cut, without root or iptables;
* ``slow`` — from that point on the process's torch tasks take ``factor=F`` times as long (it
  sleeps the difference, as an emulated slow peer does: [Note: emulated speed]): a device that
  slowed down, e.g. ``slow:round=2:factor=4``; with ``peer=NAME`` only the peer of that name
  acts on it, so one setting can be handed to every peer.

Where: by default at batch B of round R — a data owner checks at the start of each training
batch, a compute node before each task. With ``at=aggregate`` (no ``batch``), as this peer starts
averaging round R (the cut is known, the parts or copies are not averaged yet). With ``at=end``,
at the end of round R: right after this peer's checkpoint of the round (a compute node: and its
replica, which it sends first), before it serves or runs anything of the round's evaluation —
the moment after which the round is safe on disk but not yet reported. Both wait first until
what this peer sent has reached its neighbours, so the point is the same in every run.
With ``at=reduce`` a data owner's fault strikes in the owners' all-reduce of round R instead, at
step B: 1 once its chunks are on their way to the other owners, 2 once its averaged chunk went
to the first of them (p2psl.runtime.roles.allreduce). Only an owner that reduces a chunk reaches
step 2 ([Note: fewer reducers for small parts]); on another, ``batch=2`` strikes at the next
point it reaches, step 1 of round R + 1.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable

from p2psl.errors import ConfigError

ENV = "P2PSL_FAULTS"
KINDS = ("crash", "freeze", "cut", "slow")
PLACES = ("batch", "aggregate", "end", "reduce")


@dataclass(frozen=True)
class Fault:
    kind: str
    round: int
    batch: int = 1
    seconds: float = 3600.0
    peer: str = ""
    at: str = "batch"
    factor: float = 1.0


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, *fields = item.split(":")
        try:
            values = dict(field.split("=", 1) for field in fields)
            fault = Fault(kind, int(values.pop("round")), int(values.pop("batch", 1)),
                          float(values.pop("seconds", 3600.0)), values.pop("peer", ""), values.pop("at", "batch"),
                          float(values.pop("factor", 1.0)))
        except (KeyError, ValueError):
            raise ConfigError(f"{ENV}: cannot read {item!r} (expected e.g. 'crash:round=2:batch=3')") from None
        if kind == "slow" and not fault.factor >= 1:
            raise ConfigError(f"{ENV}: {item!r}: a slow fault needs factor=F with F ≥ 1")
        if (kind not in KINDS or values or (kind == "cut" and not fault.peer)
                or (kind in ("crash", "freeze") and fault.peer) or fault.at not in PLACES):
            raise ConfigError(f"{ENV}: unknown fault or field in {item!r} (faults: {', '.join(KINDS)}; "
                              f"at: {', '.join(PLACES)})")
        faults.append(fault)
    return faults


class Faults:
    """The faults this process was asked to suffer."""

    def __init__(self, text: str | None = None, cut: Callable[[str, float], None] | None = None,
                 settle: Callable[[], Awaitable[None]] | None = None, slow: Callable[[float], None] | None = None,
                 me: str = ""):
        faults = parse(os.environ.get(ENV, "") if text is None else text)
        self.pending = [f for f in faults if f.kind != "slow" or not f.peer or f.peer == me]
        self.cut = cut or (lambda peer, seconds: None)
        self.settle = settle or (lambda: asyncio.sleep(0))  # until what was sent has arrived
        self.slow = slow or (lambda factor: None)

    def reached(self, round_: int, batch: int, at: str = "batch") -> None:
        """At batch `batch` of round `round_` (a compute node: a task of it), or at step `batch`
        of the point `at` (the owners' all-reduce: ``reduce``)."""
        for fault in list(self.pending):
            if fault.at == at and (round_, batch) >= (fault.round, fault.batch):
                self._fire(fault)

    def due_at_end(self, round_: int) -> bool:
        return any(f.at == "end" and f.round == round_ for f in self.pending)

    async def at_end(self, round_: int) -> None:
        """At the end of round `round_`, once what this peer sent has reached its neighbours."""
        await self._at("end", round_)

    async def at_aggregate(self, round_: int) -> None:
        """As the averaging of round `round_` starts, once what this peer sent has arrived."""
        await self._at("aggregate", round_)

    async def _at(self, place: str, round_: int) -> None:
        due = [f for f in self.pending if f.at == place and f.round == round_]
        if due:
            await self.settle()
            for fault in due:
                self._fire(fault)

    def _fire(self, fault: Fault) -> None:
        self.pending.remove(fault)
        if fault.kind == "crash":
            os._exit(137)
        elif fault.kind == "cut":
            self.cut(fault.peer, fault.seconds)
        elif fault.kind == "slow":
            self.slow(fault.factor)
        else:
            time.sleep(fault.seconds)  # freeze: block the event loop itself
