"""What a role needs from its peer: identity, plan, model, network, worker, status and outputs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from p2psl.errors import PeerTimeout
from p2psl.runtime.faults import Faults
from p2psl.wire.messages import Routed
from p2psl.learning.models import ModelSpec, OptimConfig
from p2psl.planning.plan import Plan
from p2psl.topology import Topology
from p2psl.runtime.trace import Tracer
from p2psl.runtime.worker import Outbox, TorchWorker


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
    checkpoint_bytes: int = 0       # written to disk so far: this peer's checkpoints and the replicas it keeps
    round_seconds: float | None = None      # the last recorded round: measured
    predicted_seconds: float | None = None  # and as predicted before it ([Note: calibration])
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
    outbox: Outbox
    worker: TorchWorker
    tracer: Tracer
    log: logging.LoggerAdapter
    out: Path
    status: Status
    collector: Collector
    start_round: int = 0
    faults: Faults = field(default_factory=Faults)
    epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where its parts train

    @property
    def training(self):
        return self.topology.training

    @property
    def timeouts(self):
        return self.topology.timeouts

    def others(self) -> list[str]:
        return [n for n in self.topology.names if n != self.me]

    @property
    def keep_checkpoints(self) -> int | None:
        return self.topology.training.keep_checkpoints

    @property
    def checkpoint_tag(self) -> str:
        return checkpoint_tag(self.plan, self.topology.training)

    async def send(self, msg: Routed) -> None:
        """The one way a role sends: queued in order per destination, with backpressure
        (`Outbox`); a failure is logged by the peer, and a peer gone is not waited for."""
        await self.outbox.post(msg)


class Topic(StrEnum):
    """What a `Collector` collects: one value per sender for each (topic, round)."""

    GREETING = "greeting"
    PROFILE = "profile"
    PLAN = "plan"
    DONE = "done"
    JOIN_INFO = "join_info"
    ADOPT = "adopt"
    STATE = "state"
    TRAIN_DONE = "train_done"
    CUT = "cut"
    REDUCE_PART = "reduce_part"
    REDUCED_PART = "reduced_part"
    REDUCE_STATUS = "reduce_status"
    CHAIN_PART = "chain_part"
    EVAL_REPORT = "eval_report"
    TIMINGS = "timings"


#: the topics of a round's training, forgotten when a plan changes
TRAINING_TOPICS = (Topic.TRAIN_DONE, Topic.CUT, Topic.REDUCE_PART, Topic.REDUCED_PART, Topic.REDUCE_STATUS,
                   Topic.CHAIN_PART, Topic.EVAL_REPORT, Topic.TIMINGS)


Expected = set[str] | Callable[[], set[str]]


class Collector:
    """Values that several peers send about a (topic, round), e.g. every owner's eval report.

    `gather` waits until every expected sender has put its value, with a deadline that names the
    peers still missing. The expected set may be a function: it is asked again whenever `poke` is
    called (a peer was declared gone), so nobody waits for the dead."""

    def __init__(self) -> None:
        self._values: dict[tuple[Topic, int], dict[str, Any]] = defaultdict(dict)
        self._changed = asyncio.Event()

    def put_nowait(self, topic: Topic, round_: int, sender: str, value: Any) -> None:
        self._values[(topic, round_)][sender] = value
        self.poke()

    def poke(self) -> None:
        """Wake every waiter to look again."""
        self._changed.set()

    def get(self, topic: Topic, round_: int) -> dict[str, Any]:
        return dict(self._values.get((topic, round_), {}))

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    async def gather(self, topic: Topic, round_: int, senders: Expected, timeout: float,
                     why: str = "") -> dict[str, Any]:
        expected = senders if callable(senders) else (lambda: senders)
        key = (topic, round_)
        try:
            async with asyncio.timeout(timeout):
                await self._until(lambda: expected() <= set(self._values[key]))
        except TimeoutError:
            missing = sorted(expected() - set(self._values[key]))
            raise PeerTimeout(f"no {topic} for round {round_} from {', '.join(missing)} within {timeout:g} s"
                              + (f" ({why})" if why else "")) from None
        values = self._values[key]
        return {s: values[s] for s in sorted(expected())}

    async def wait_change(self) -> None:
        """Until the next `put_nowait` or `poke`."""
        self._changed.clear()
        await self._changed.wait()

    async def wait_any(self, topic: Topic, round_: int, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._until(lambda: bool(self._values[(topic, round_)]))
        except TimeoutError:
            raise PeerTimeout(f"no {topic} for round {round_} from anyone within {timeout:g} s") from None

    def forget(self, topics: tuple[Topic, ...] | None = None, before: int | None = None) -> None:
        """Drop values of some topics (all if None), or of rounds before `before`."""
        for key in list(self._values):
            if (topics is None or key[0] in topics) and (before is None or key[1] < before):
                del self._values[key]


def checkpoint_tag(plan: Plan, training) -> str:
    """What a checkpoint belongs to: the plan, and the mode where it is not the split, whose
    owners hold other layers ([Note: the federated-averaging baseline]): resuming in the other
    mode is then refused as another plan's checkpoint, not misread."""
    if training.mode == "split":
        return plan.digest
    return hashlib.sha256(f"{training.mode}:{plan.digest}".encode()).hexdigest()
