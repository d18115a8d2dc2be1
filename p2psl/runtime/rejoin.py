"""Owners that come back while the others train.

[Note: rejoining] An owner that comes back (a fresh process: its state died with the old one)
greets everyone; the running peers answer with `JoinInfo` — the plan in force and what it was made
from — and at the start of each round the first live owner (by name) hands it the aggregated parts
of the round before (`Adopt`). The newcomer then announces `Joining` with the round it trains
from, two rounds after the first hand-over, and waits for the parts of the round before it. From
its announcement on it hears every round message (it is in each peer's `audience`); each peer
counts it as a participant from the first round that peer *starts* after the announcement. A peer
that starts the announced round before the announcement reaches it leaves the newcomer out of
that round's cut, which every peer then agrees on ([Note: the cut]); from the next round on,
everyone counts it in.

The plan may change while it waits (re-planning on measured times, or a compute node lost): the
hand-over comes at the start of a round, after any change decided at the end of the one before,
and carries the epoch it trains under; an owner handing over parts of another epoch than it last
told the newcomer sends it a fresh `JoinInfo` first, and the newcomer trains under the plan of
the `JoinInfo` of the epoch it adopts. Its peers keep counting it gone until they count it in:
the `plan` messages of a change leave it out of their `gone` (a peer that counts it in late would
otherwise make the others drop it), and one that names it forgets nothing. News of another data
owner gone reaches it as a `Gone` from each peer that answered it (it would wait for that owner's
round messages otherwise); news of a compute node comes with the plan it changes.

A restart is seen first by the neighbours, which declare the owner gone and tell everyone while
its greeting travels: that `Gone` may reach a peer after the greeting, and is news of the life
before. Every greeting carries its sender's incarnation, and every `Gone` the life it declares
gone, so a `Gone` forgets an owner rejoining only if it is about the life that asked to rejoin
here. From a sender that does not know that life (an owner that rejoined itself learns no
greetings), it counts only once the owner has announced its round here: by then the news of its
restart is long past. A greeting of a life this peer knows to be gone (declared here, or named
by news received, whatever that news changed) is dropped: relayed late behind the next life's,
it is no owner coming back.

A compute node cannot come back into a running deployment (its layers have moved on): its
greeting is refused with `not_admitted` and it stops alone, without disturbing the others.
"""

from __future__ import annotations

import asyncio

from p2psl.runtime import startup
from p2psl.runtime.roles.context import Topic, checkpoint_tag
from p2psl.wire import checkpoint
from p2psl.errors import PeerTimeout, RemoteProtocolError, TrainingError
from p2psl.wire.messages import Adopt, Gone, Greeting, JoinInfo, Joining, Routed
from p2psl.learning.models import model_spec
from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile
from p2psl.runtime.roles.owner import DataOwner
from p2psl.runtime.state import Actions, PeerState
from p2psl.topology import DATA_OWNER



# -- the running peers ----------------------------------------------------------------------------

async def welcome(state: PeerState, actions: Actions, greeting: Greeting) -> None:
    """A greeting while we train: an owner coming back gets `JoinInfo`; a compute node is refused."""
    name = greeting.src
    if state.topology.peer(name).role != DATA_OWNER:
        raise RemoteProtocolError(f"{name} is a compute node: it can join only at start-up", "not_admitted")
    if greeting.incarnation and greeting.incarnation in state.ended_lives.get(name, ()):
        state.log.debug("dropped a late greeting of a life of %s already gone", name)
        return
    actions.declare_gone(name, "it started again and lost its state")  # the life before this one
    state.lives[name] = greeting.incarnation
    state.joiners[name] = None  # a fresh life: whatever an earlier one announced is void
    state.log.info("%s asks to rejoin", name)
    await _tell_plan(state, actions, name)


async def _tell_plan(state: PeerState, actions: Actions, name: str) -> None:
    """A `JoinInfo` to the joiner `name`: the plan in force, and what plans are made from."""
    info = JoinInfo(src=state.me, dst=name, epoch=state.epoch, round=state.next_round, plan=state.plan.to_json(),
                    first_plan=state.first_plan.to_json(), gone=sorted(state.gone - {name}),
                    profiles={n: p.to_json() for n, p in state.profiles.items()},
                    samples=dict(state.samples))
    await actions.send_anyway(info, state.topology.timeouts.gone)  # to a peer still counted gone
    state.told_epoch[name] = info.epoch


async def hand_over(state: PeerState, actions: Actions, round_: int) -> None:
    """The aggregated parts of `round_` to owners waiting to rejoin (from the first live owner),
    as the next round starts under the plan it trains under (see the note)."""
    waiting = [n for n, joined_at in state.joiners.items() if joined_at is None or joined_at > round_]
    live_owners = sorted(state.live_participants())
    if not waiting or not isinstance(state.role, DataOwner) or not live_owners or live_owners[0] != state.me:
        return
    parts = {f"model/{k}": v for k, v in (await state.worker.run("state", state.role.model.state)).items()}
    for name in waiting:
        try:
            if state.told_epoch.get(name) != state.epoch:  # the plan changed since it was told
                await _tell_plan(state, actions, name)
            await actions.send_anyway(Adopt(src=state.me, dst=name, epoch=state.epoch, round=round_, state=parts),
                                      state.topology.timeouts.gone)
        except PeerTimeout as exc:
            state.log.warning("could not hand %s the parts of round %d: %s", name, round_, exc)


def about_joiner(state: PeerState, gone: Gone) -> bool:
    """Whether `gone` is news of the life of `gone.peer` that asked this peer to rejoin (see the note)."""
    life = state.lives.get(gone.peer, b"")
    if gone.incarnation and life:
        return gone.incarnation == life
    return state.joiners.get(gone.peer) is not None


def admit_joiners(state: PeerState) -> None:
    """At the start of a round: count in the owners that announced it (or an earlier one)."""
    for name, joined_at in list(state.joiners.items()):
        if joined_at is not None and joined_at > state.topology.training.rounds:
            del state.joiners[name]  # came back after the last round: nothing to train together
            state.told_epoch.pop(name, None)
        elif joined_at is not None and joined_at <= state.next_round:
            del state.joiners[name]
            state.told_epoch.pop(name, None)
            state.gone.discard(name)
            state.cancel_gone_timer(name)
            state.log.info("%s trains with us again from round %d", name, state.next_round)
            state.collector.poke()


def receive(state: PeerState, msg: Routed) -> None:
    """`JoinInfo` and `Adopt` for a peer joining; `Joining` for the running ones — each only
    from whom may send it."""
    owners = {o.name for o in state.topology.owners}
    if isinstance(msg, Joining):
        if msg.src not in owners or msg.src not in state.joiners:
            raise RemoteProtocolError(f"joining from {msg.src} refused: it did not ask to rejoin", "wrong_role")
        state.joiners[msg.src] = msg.round
    elif state.plan is not None and state.status.state != "joining":
        state.log.debug("dropped a late %s from %s: already joined", msg.KIND, msg.src)
    elif isinstance(msg, Adopt):
        if msg.src not in owners:
            raise RemoteProtocolError(f"adopt from {msg.src} refused: only owners hand over parts", "wrong_role")
        state.collector.put_nowait(Topic.ADOPT, 0, f"{msg.src}/{msg.round}", msg)  # the joiner picks the round
    else:
        state.join_marks[msg.src] = len(state.heard_gone)  # the news of owners gone it is older than
        state.collector.put_nowait(Topic.JOIN_INFO, 0, msg.src, msg)


# -- the peer coming back -------------------------------------------------------------------------

async def join(state: PeerState, actions: Actions) -> None:
    """Rejoin a deployment that trains already: adopt its plan, wait for the aggregated parts
    of a round, and train from the next one ([Note: rejoining])."""
    info = next(iter(state.collector.get(Topic.JOIN_INFO, 0).values()))
    _take_plan(state, info)
    state.model = model_spec(state.topology.training.model, state.data.input_shape, state.data.num_classes)
    rounds = state.topology.training.rounds
    state.say("joining", f"rejoining a deployment in round {info.round} (plan {state.plan.digest[:12]}, "
                        f"epoch {state.epoch})")
    # the first hand-over is of round info.round - 1 at the earliest, so one asked in the last
    # round could start no sooner than rounds + 1: nothing to wait for
    first = await _adopted(state, 0) if info.round < rounds else None
    start = first.round + 2 if first is not None else rounds + 1  # a round's notice: see the note
    if start > rounds:
        _too_late(state)
        return
    _plan_of(state, first)
    for other in sorted(state.live_peers() - {state.me}):
        await actions.send(Joining(src=state.me, dst=other, round=start))
    adopt = await _adopted(state, start - 1)
    if adopt is None:
        _too_late(state)
        return
    _plan_of(state, adopt)
    state.recorded = adopt.round  # the rounds before are the others' to record
    await actions.become(adopt.round, adopt.state)
    if not state.greeting.get("resume"):
        startup.clear_earlier_run(state)
    path = await state.worker.run("checkpoint", checkpoint.save, state.out / "checkpoints", state.me, adopt.round,
                                  checkpoint_tag(state.plan, state.topology.training), adopt.state,
                                  state.topology.training.keep_checkpoints)
    state.status.checkpoint_bytes += path.stat().st_size
    state.collector.forget((Topic.ADOPT, Topic.JOIN_INFO))
    state.log.info("adopted the aggregated parts of round %d from %s; training from round %d",
                  adopt.round, adopt.src, adopt.round + 1)


def _take_plan(state: PeerState, info: JoinInfo) -> None:
    state.epoch, state.next_round = info.epoch, info.round
    state.plan, state.first_plan = Plan.from_json(info.plan), Plan.from_json(info.first_plan)
    # its gone set, and the owners this peer heard of gone since it arrived (from its sender after
    # it, or from others faster); news heard before it is in it, or the sender counted that owner in since
    state.gone = (set(info.gone) | set(state.heard_gone[state.join_marks.get(info.src, 0):])) - {state.me}
    state.rebalances = state.epoch - len(state.gone_nodes())
    state.profiles = {name: Profile.from_json(p) for name, p in info.profiles.items()}
    state.samples = {name: int(n) for name, n in info.samples.items()}


def _plan_of(state: PeerState, adopt: Adopt) -> None:
    """Train under the plan of the parts adopted: of another epoch than the one taken so far, it
    is the one of the `JoinInfo` their sender sent before them (see the note)."""
    if adopt.epoch == state.epoch:
        return
    info = state.collector.get(Topic.JOIN_INFO, 0).get(adopt.src)
    if info is None or info.epoch != adopt.epoch:
        raise TrainingError(f"{adopt.src} handed {state.me} the parts of round {adopt.round} under epoch "
                            f"{adopt.epoch} without telling it that epoch's plan (join_info)")
    _take_plan(state, info)
    state.log.info("the plan changed while rejoining: plan %s (epoch %d)", state.plan.digest[:12], state.epoch)


def _too_late(state: PeerState) -> None:
    state.too_late = True
    state.log.warning("the others finish their last round before %s could join: nothing left to train", state.me)


async def _adopted(state: PeerState, round_: int) -> Adopt | None:
    """The aggregated parts of `round_` or later, once an owner hands them over; None once every
    peer that answered this one's greeting has left saying bye (the deployment finished)."""
    def latest() -> Adopt | None:
        shares = [a for a in state.collector.get(Topic.ADOPT, 0).values() if a.round >= round_]
        return max(shares, key=lambda a: (a.epoch, a.round)) if shares else None  # a recovery may go back

    answered = set(state.collector.get(Topic.JOIN_INFO, 0))
    try:
        async with asyncio.timeout(state.topology.timeouts.round):
            while latest() is None:
                if answered <= state.farewells:
                    return None
                await state.collector.wait_change()
    except TimeoutError:
        raise PeerTimeout(f"no owner handed {state.me} the aggregated parts of round {round_} within "
                          f"{state.topology.timeouts.round:g} s") from None
    return latest()
