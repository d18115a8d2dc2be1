"""Where each routed message for this peer goes: one table by message kind.

[Note: one dispatch table] The network hands every routed message for this peer to
`Inbox.deliver`, which looks its type up in `Inbox.table`. Messages about the deployment itself
(an abort, a peer gone, start-up, rejoining, re-planning) are handled whatever the plan; the work
of a plan (`EPOCH_BOUND`) is checked against the plan in force: an older epoch's is dropped, and
one that arrives before this peer is ready for it (a fast owner's first batch while this node
still builds its copies, or the next epoch's during a recovery) waits in a bounded buffer and is
replayed once the role exists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from p2psl.errors import NotAdmitted, P2PSLError, RemoteProtocolError, TrainingError
from p2psl.runtime import rejoin
from p2psl.runtime.recovery import is_copy_key
from p2psl.runtime.roles.context import Topic
from p2psl.runtime.state import Actions, PeerState
from p2psl.wire.messages import (Abort, Activation, Adopt, ChainPart, Cut, Done, Error, EvalReport, Gone, Gradient, Greeting,
                                 JoinInfo, Joining, PlanProposal, ProfileShare, ReducedPart, ReducePart, ReduceStatus,
                                 Replica, Routed, StateTransfer, Timings, TrainDone)

#: messages held until this peer is ready for them (bounded: a flood is refused, not buffered)
HELD_LIMIT = 10_000
Handler = Callable[[Routed], Awaitable[None]]


class Inbox:
    def __init__(self, state: PeerState, actions: Actions, abort: Callable[[P2PSLError], None]):
        self.state, self.actions, self.abort = state, actions, abort
        self.held: list[Routed] = []
        self.table: dict[type, Handler] = {
            Abort: self._abort, Gone: self._gone, Greeting: self._greeting, Done: self._done,
            ProfileShare: self._profile, PlanProposal: self._plan, StateTransfer: self._state_transfer,
            JoinInfo: self._rejoining, Adopt: self._rejoining, Joining: self._rejoining, Error: self._error,
            TrainDone: self._current(self._owner_report), EvalReport: self._current(self._owner_report),
            Cut: self._current(self._cut), Timings: self._current(self._timings),
            **{kind: self._current(self._role)
               for kind in (Activation, Gradient, ReducePart, ReducedPart, ReduceStatus, Replica, ChainPart)},
        }

    async def deliver(self, msg: Routed) -> None:
        handler = self.table.get(type(msg))
        if handler is None:
            raise RemoteProtocolError(f"{msg.KIND} is not for a peer's runtime", "unexpected")
        await handler(msg)

    async def replay_held(self) -> None:
        """Hand over what waited for the role; a refusal is only logged here, since its sender
        is past waiting for an answer."""
        held, self.held = self.held, []
        for msg in held:
            try:
                await self.deliver(msg)
            except P2PSLError as exc:
                self.state.log.warning("refused held %s from %s: %s", msg.KIND, msg.src, exc)

    # -- the deployment ------------------------------------------------------------------------
    async def _abort(self, msg: Abort) -> None:
        if msg.src in self.state.gone:  # a peer we already go on without cannot stop us
            self.state.log.warning("ignored an abort from %s, which is gone: %s", msg.src, msg.reason)
        else:
            self.abort(TrainingError(f"{msg.src} stopped the deployment: {msg.reason}"))

    async def _gone(self, msg: Gone) -> None:
        if msg.peer == self.state.me:  # [Note: left behind] in p2psl.runtime.behind
            if self.state.plan is not None and self.state.status.state != "joining":  # not a newcomer
                self.abort(self.state.left_behind(msg.src, msg.reason))
        elif msg.peer in self.state.joiners and not rejoin.about_joiner(self.state, msg):
            self.state.ended(msg.peer, msg.incarnation)  # that earlier life's greeting may still come
            self.state.log.debug("kept %s rejoining: %s's gone is about an earlier life", msg.peer, msg.src)
        elif msg.peer in self.state.topology.names:
            self.actions.declare_gone(msg.peer, f"{msg.reason}, says {msg.src}", life=msg.incarnation)

    async def _error(self, msg: Error) -> None:
        if self.state.plan is None and msg.code == "not_admitted":
            self.abort(NotAdmitted(f"{msg.src} will not take {self.state.me} in: {msg.message}"))
        else:
            await self._current(self._role)(msg)

    # -- start-up, rejoining, re-planning ------------------------------------------------------------
    async def _greeting(self, msg: Greeting) -> None:
        if self.state.plan is not None:  # the deployment trains already: an owner coming back
            await rejoin.welcome(self.state, self.actions, msg)
        else:
            if msg.incarnation:  # the life that greeted last, which news of it gone will name
                self.state.lives[msg.src] = msg.incarnation
            self.state.collector.put_nowait(Topic.GREETING, 0, msg.src, msg)

    async def _done(self, msg: Done) -> None:
        self.state.collector.put_nowait(Topic.DONE, msg.round, msg.src, msg)

    async def _profile(self, msg: ProfileShare) -> None:
        self.state.collector.put_nowait(Topic.PROFILE, 0, msg.src, msg)

    async def _rejoining(self, msg: JoinInfo | Adopt | Joining) -> None:
        rejoin.receive(self.state, msg)

    async def _plan(self, msg: PlanProposal) -> None:
        # news only of the peers not counted gone here yet: a plan names every owner still
        # rejoining as gone, and that is no news of its new life ([Note: rejoining])
        for name in msg.gone:
            if name in self.state.topology.names and name not in self.state.gone:
                self.actions.declare_gone(name, f"gone according to {msg.src}")
        self.state.collector.put_nowait(Topic.PLAN, msg.epoch, msg.src, msg)

    async def _state_transfer(self, msg: StateTransfer) -> None:
        """Needed while recovering, when no role exists yet."""
        if msg.src not in {p.name for p in self.state.topology.compute_nodes}:
            raise RemoteProtocolError(f"state_transfer from {msg.src} refused: not a compute node", "wrong_role")
        owners = {o.name for o in self.state.topology.owners}
        bad = next((key for key in msg.state if not is_copy_key(key, owners)), None)
        if bad is not None:
            raise RemoteProtocolError(f"state_transfer from {msg.src} refused: {bad!r} is no owner's copy of a layer",
                                      "bad_value")
        self.state.collector.put_nowait(Topic.STATE, msg.epoch, msg.src, msg)

    # -- the work of the plan in force -----------------------------------------------------------------
    def _current(self, handler: Handler) -> Handler:
        """`handler` for messages of the current epoch once the role exists (see the note)."""
        async def current(msg: Routed) -> None:
            epoch = getattr(msg, "epoch", None)
            if epoch is not None and epoch < self.state.epoch:
                return  # work of a plan that no longer holds
            if self.state.role is None or (epoch is not None and epoch > self.state.epoch):
                if len(self.held) >= HELD_LIMIT:
                    raise RemoteProtocolError("too many messages before this peer was ready", "not_ready")
                self.held.append(msg)
                return
            await handler(msg)
        return current

    async def _owner_report(self, msg: TrainDone | EvalReport) -> None:
        owners = {o.name for o in self.state.topology.owners}
        if msg.src != msg.owner or msg.src not in owners:
            raise RemoteProtocolError(f"{msg.KIND} from {msg.src} about {msg.owner} refused", "wrong_role")
        self.state.collector.put_nowait(Topic(msg.KIND), msg.round, msg.src, msg)

    async def _cut(self, msg: Cut) -> None:
        self.state.collector.put_nowait(Topic.CUT, msg.round, msg.src, msg)

    async def _timings(self, msg: Timings) -> None:
        self.state.collector.put_nowait(Topic.TIMINGS, msg.round, msg.src, msg)

    async def _role(self, msg: Routed) -> None:
        await self.state.role.handle(msg)
