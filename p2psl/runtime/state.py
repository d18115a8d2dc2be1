"""A peer's state in one place, and the few actions the parts of its life may take.

The peer's life (p2psl.runtime.peer), agreeing on a plan (agreement), going on without a compute
node (replan) and owners coming back (rejoin) all read and change the same facts: the plan in
force, who is gone, who is rejoining, the round to train next. They live in `PeerState`, and
those modules are functions of it. What they may *do* besides changing it — send, declare a peer
gone, build the role for a plan — is the narrow `Actions` interface the peer implements, so none
of them imports the peer (not even to name its type).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2psl.errors import TrainingError
from p2psl.learning.data import Dataset, OwnerShard
from p2psl.learning.models import ModelSpec
from p2psl.planning.calibrate import NO_CALIBRATION, Calibration
from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile
from p2psl.runtime.roles.compute import ComputeNode
from p2psl.runtime.roles.fedavg import Bystander
from p2psl.runtime.roles.context import Collector, Status
from p2psl.runtime.roles.owner import DataOwner
from p2psl.runtime.worker import TorchWorker
from p2psl.topology import PeerSpec, Topology
from p2psl.wire.messages import Routed


@dataclass(eq=False)
class PeerState:
    """What one peer knows and has decided; every field is declared here, none appears later."""

    topology: Topology
    me: str
    out: Path
    log: logging.LoggerAdapter
    status: Status
    collector: Collector
    worker: TorchWorker
    # this peer's data (an owner's) and the greeting that describes it
    data: Dataset | None = None
    shards: dict[str, OwnerShard] = field(default_factory=dict)
    greeting: dict[str, Any] = field(default_factory=dict)
    told: list[Routed] = field(default_factory=list)  # start-up messages sent to every other peer (dst: me)
    life: bytes = b""           # this process's incarnation, which its greetings carry
    lives: dict[str, bytes] = field(default_factory=dict)  # each peer's life, as its last greeting told
    ended_lives: dict[str, set[bytes]] = field(default_factory=dict)  # the lives of each peer declared gone
    # the agreed plan and what it was made from
    model: ModelSpec | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    plan: Plan | None = None
    first_plan: Plan | None = None
    epoch: int = 0
    rebalances: int = 0         # plans changed on measured times: epoch = rebalances + compute nodes gone
    next_round: int = 1
    recorded: int = 0           # the last round this peer recorded (or, rejoining, adopted)
    role: DataOwner | ComputeNode | Bystander | None = None
    # liveness: peers declared gone, owners rejoining (→ the round they train from; None: not yet)
    gone: set[str] = field(default_factory=set)
    gone_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    joiners: dict[str, int | None] = field(default_factory=dict)
    told_epoch: dict[str, int] = field(default_factory=dict)  # joiner → the epoch of the last join_info sent it
    # every news of a data owner gone this peer had (declared here or received, whatever it
    # changed), in order, and for each join_info sender how much of it had come when that
    # join_info arrived: rejoining, the news newer than the plan it takes
    heard_gone: list[str] = field(default_factory=list)
    join_marks: dict[str, int] = field(default_factory=dict)
    recovery_needed: asyncio.Event = field(default_factory=asyncio.Event)
    too_late: bool = False      # came back after the others' last round
    farewells: set[str] = field(default_factory=set)  # neighbours whose link closed with a bye
    frozen: float = 0.0         # seconds of the last stall long enough for the others to count us gone
    # [Note: calibration]: the model refitted after the last round, and each round's prediction
    calibration: Calibration = NO_CALIBRATION
    predicted: dict[int, float] = field(default_factory=dict)
    better: Plan | None = None  # the plan measured times favour, to change to at the round's end
    idle_rss: int = 0           # [Note: idle baseline]
    startup_peak: int = 0       # peak RSS once the first plan's parts were built: start-up's, profiling included

    @property
    def spec(self) -> PeerSpec:
        return self.topology.peer(self.me)

    def others(self) -> list[str]:
        return [n for n in self.topology.names if n != self.me]

    def live_peers(self) -> set[str]:
        return set(self.topology.names) - self.gone

    def audience(self) -> set[str]:
        """Whom round messages go to: the live peers, and owners that announced their rejoining
        ([Note: rejoining]), who listen to a round before they are counted in it."""
        return self.live_peers() | {name for name, start in self.joiners.items() if start is not None}

    def live_participants(self) -> set[str]:
        return set(self.plan.owners) - self.gone if self.plan else set()

    def gone_nodes(self) -> set[str]:
        """The compute nodes gone: of the first plan, and any left out of it ([Note: the cost
        objective]), which no later plan may use. Their count is the recovery epoch."""
        return self.gone & {p.name for p in self.topology.compute_nodes}

    def ended(self, name: str, life: bytes) -> None:
        """Remember that the life `life` of `name` (if named) was declared gone."""
        if life:
            self.ended_lives.setdefault(name, set()).add(life)

    def cannot_train(self) -> str | None:
        """Why the live peers can train no more — no compute node or no data owner left — or None."""
        if self.plan is None or self.first_plan is None:
            return None
        nodes = {p.name for p in self.topology.compute_nodes}  # a node the plan leaves out can take over
        if not nodes - self.gone and self.topology.training.mode == "split":
            return f"no compute node is left ({', '.join(sorted(nodes))} gone)"
        if not self.live_participants():
            return f"no data owner is left ({', '.join(sorted(self.plan.owners))} gone)"
        return None

    def stop_error(self, why: str) -> TrainingError:
        """The error this peer stops with when it cannot train. After a stall that outlasted the
        others' patience ([Note: left behind] in p2psl.runtime.behind) the stall is the cause:
        the others went on without us, whatever it looks like from here now."""
        if self.frozen:
            t = self.topology.timeouts
            return TrainingError(f"{self.me} was frozen for {self.frozen:.0f} s, longer than the others wait for a "
                                 f"silent peer (timeouts.dead + timeouts.gone = {t.dead + t.gone:g} s): the "
                                 f"deployment went on without {self.me} ({why})")
        return TrainingError(f"{why}: the deployment cannot train any more")

    def left_behind(self, by: str, reason: str) -> TrainingError:
        """The error for being told that another peer counts this one gone."""
        if self.frozen:
            return self.stop_error(f"{by} counts it gone")
        return TrainingError(f"the deployment went on without {self.me}: {by} counts it gone ({reason})")

    def say(self, state: str, detail: str = "") -> None:
        self.status.state, self.status.detail = state, detail
        if detail:
            self.log.info("%s", detail)

    def link_event(self, name: str, up: bool, reason: str) -> None:
        """Remember which neighbours left saying bye (a peer waiting to rejoin stops once every
        peer that answered it has), and wake whoever waits to look."""
        if up:
            self.farewells.discard(name)
        elif reason == "said bye":
            self.farewells.add(name)
            self.collector.poke()

    def cancel_gone_timer(self, name: str) -> None:
        timer = self.gone_timers.pop(name, None)
        if timer is not None:
            timer.cancel()


class Actions(Protocol):
    """What agreement, re-planning and rejoining may ask of the peer beyond changing its state."""

    async def send(self, msg: Routed, timeout: float | None = None) -> None:
        """Send to a live peer (one gone meanwhile is simply not told)."""

    async def send_anyway(self, msg: Routed, timeout: float) -> None:
        """Send even to a peer counted gone (an owner coming back), waiting up to `timeout`."""

    def declare_gone(self, name: str, reason: str, life: bytes | None = None) -> None:
        """Count `name` out and tell every live peer (and, of a data owner, the owners rejoining);
        `life`: the life of it the news passed on names (None: the life its last greeting told)."""

    async def become(self, start: int, state: dict | None) -> None:
        """Build this peer's role for `PeerState.plan`, restored to the end of round `start`."""
