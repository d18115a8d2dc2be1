"""What a role needs from its peer: identity, plan, model, network, worker, status and outputs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from p2psl.errors import PeerTimeout
from p2psl.faults import Faults
from p2psl.messages import Routed
from p2psl.models import ModelSpec, OptimConfig
from p2psl.plan import Plan
from p2psl.topology import Topology
from p2psl.trace import Tracer
from p2psl.worker import Outbox, TorchWorker


@dataclass
class Status:
    """Live numbers of one peer (served as JSON at /status and shown by `p2psl run`)."""

    name: str
    role: str
    state: str = "starting"
    detail: str = ""
    round: int = 0
    rounds: int = 0
    batch: int = 0
    batches: int = 0
    loss: float | None = None
    accuracy: float | None = None
    started: float = field(default_factory=time.time)

    def to_json(self, **extra: Any) -> dict:
        return {**self.__dict__, **extra}


@dataclass
class Context:
    """Everything a role uses; built by the peer after the plan is agreed."""

    topology: Topology
    me: str
    plan: Plan
    spec: ModelSpec
    optim: OptimConfig
    send: Callable[[Routed], Awaitable[None]]
    outbox: Outbox
    worker: TorchWorker
    tracer: Tracer
    log: logging.LoggerAdapter
    out: Path
    status: Status
    collector: Collector
    start_round: int = 0
    faults: Faults = field(default_factory=Faults)

    @property
    def training(self):
        return self.topology.training

    @property
    def timeouts(self):
        return self.topology.timeouts

    def others(self) -> list[str]:
        return [n for n in self.topology.names if n != self.me]


class Collector:
    """Values that several peers send about a (topic, round), e.g. every owner's eval report.

    `gather` waits until all expected senders have put theirs, with a deadline that names the
    peers still missing."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
        self._events: dict[tuple[str, int], asyncio.Event] = {}

    def put_nowait(self, topic: str, round_: int, sender: str, value: Any) -> None:
        self._values[(topic, round_)][sender] = value
        event = self._events.get((topic, round_))
        if event is not None:
            event.set()

    def get(self, topic: str, round_: int) -> dict[str, Any]:
        return dict(self._values.get((topic, round_), {}))

    def has(self, topic: str, round_: int, sender: str) -> bool:
        return sender in self._values.get((topic, round_), {})

    async def gather(self, topic: str, round_: int, senders: set[str], timeout: float,
                     why: str = "") -> dict[str, Any]:
        key = (topic, round_)
        try:
            async with asyncio.timeout(timeout):
                while not senders <= set(self._values[key]):
                    event = self._events.setdefault(key, asyncio.Event())
                    event.clear()
                    await event.wait()
        except TimeoutError:
            missing = sorted(senders - set(self._values[(topic, round_)]))
            raise PeerTimeout(f"no {topic} for round {round_} from {', '.join(missing)} within {timeout:g} s"
                              + (f" ({why})" if why else "")) from None
        values = self._values[(topic, round_)]
        return {s: values[s] for s in sorted(senders)}

    def forget_before(self, round_: int) -> None:
        for key in [k for k in self._values if k[1] < round_]:
            del self._values[key]
            self._events.pop(key, None)
