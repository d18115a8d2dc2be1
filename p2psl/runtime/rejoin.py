"""Owners that come back while the others train.

[Note: rejoining] An owner that comes back (a fresh process: its state died with the old one)
greets everyone; the running peers answer with `JoinInfo` — the plan in force and what it was made
from — and after each round the first live owner (by name) hands it the aggregated parts (`Adopt`).
The newcomer then announces `Joining` with the round it trains from, two rounds after the first
hand-over, and waits for the parts of the round before it. From its announcement on it hears
every round message (it is in each peer's `audience`); each peer counts it as a participant from
the first round that peer *starts* after the announcement. A peer that starts the announced round
before the announcement reaches it leaves the newcomer out of that round's cut, which every peer
then agrees on ([Note: the cut]); from the next round on, everyone counts it in.

A compute node cannot come back into a running deployment (its layers have moved on): its
greeting is refused with `not_admitted` and it stops alone, without disturbing the others.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from p2psl.wire import checkpoint
from p2psl.errors import PeerTimeout, RemoteProtocolError
from p2psl.wire.messages import Adopt, Greeting, JoinInfo, Joining, Routed
from p2psl.learning.models import model_spec
from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile
from p2psl.runtime.roles.owner import DataOwner
from p2psl.topology import DATA_OWNER

if TYPE_CHECKING:
    from p2psl.runtime.peer import Peer


# -- the running peers ----------------------------------------------------------------------------

async def welcome(peer: Peer, greeting: Greeting) -> None:
    """A greeting while we train: an owner coming back gets `JoinInfo`; a compute node is refused."""
    name = greeting.src
    if peer.topology.peer(name).role != DATA_OWNER:
        raise RemoteProtocolError(f"{name} is a compute node: it can join only at start-up", "not_admitted")
    peer.declare_gone(name, "it started again and lost its state")
    peer.joiners[name] = None  # a fresh life: whatever an earlier one announced is void
    peer.log.info("%s asks to rejoin", name)
    info = JoinInfo(src=peer.me, dst=name, epoch=peer.epoch, round=peer.next_round, plan=peer.plan.to_json(),
                    first_plan=peer.first_plan.to_json(), gone=sorted(peer.gone - {name}),
                    profiles={n: p.to_json() for n, p in peer.profiles.items()},
                    samples=dict(peer.samples))
    await peer.network.send(info, timeout=peer.topology.timeouts.gone)  # to a peer still counted gone


async def hand_over(peer: Peer, round_: int) -> None:
    """The aggregated parts of `round_` to owners waiting to rejoin (from the first live owner)."""
    waiting = [n for n, joined_at in peer.joiners.items() if joined_at is None or joined_at > round_]
    live_owners = sorted(peer.live_participants())
    if not waiting or not isinstance(peer.role, DataOwner) or not live_owners or live_owners[0] != peer.me:
        return
    state = {f"model/{k}": v for k, v in (await peer.worker.run("state", peer.role.model.state)).items()}
    for name in waiting:
        try:
            await peer.network.send(Adopt(src=peer.me, dst=name, epoch=peer.epoch, round=round_, state=state),
                                    timeout=peer.topology.timeouts.gone)
        except PeerTimeout as exc:
            peer.log.warning("could not hand %s the parts of round %d: %s", name, round_, exc)


def admit_joiners(peer: Peer) -> None:
    """At the start of a round: count in the owners that announced it (or an earlier one)."""
    for name, joined_at in list(peer.joiners.items()):
        if joined_at is not None and joined_at > peer.topology.training.rounds:
            del peer.joiners[name]  # came back after the last round: nothing to train together
        elif joined_at is not None and joined_at <= peer.next_round:
            del peer.joiners[name]
            peer.gone.discard(name)
            timer = peer.gone_timers.pop(name, None)
            if timer is not None:
                timer.cancel()
            peer.log.info("%s trains with us again from round %d", name, peer.next_round)
            peer.collector.poke()


def receive(peer: Peer, msg: Routed) -> None:
    """`JoinInfo` and `Adopt` for a peer joining; `Joining` for the running ones — each only
    from whom may send it."""
    owners = {o.name for o in peer.topology.owners}
    if isinstance(msg, Joining):
        if msg.src not in owners or msg.src not in peer.joiners:
            raise RemoteProtocolError(f"joining from {msg.src} refused: it did not ask to rejoin", "wrong_role")
        peer.joiners[msg.src] = msg.round
    elif peer.plan is not None and peer.status.state != "joining":
        peer.log.debug("dropped a late %s from %s: already joined", msg.KIND, msg.src)
    elif isinstance(msg, Adopt):
        if msg.src not in owners:
            raise RemoteProtocolError(f"adopt from {msg.src} refused: only owners hand over parts", "wrong_role")
        peer.collector.put_nowait("adopt", 0, f"{msg.src}/{msg.round}", msg)  # the joiner picks the round
    else:
        peer.collector.put_nowait("join_info", 0, msg.src, msg)


# -- the peer coming back -------------------------------------------------------------------------

async def join(peer: Peer) -> None:
    """Rejoin a deployment that trains already: adopt its plan, wait for the aggregated parts
    of a round, and train from the next one ([Note: rejoining])."""
    info = next(iter(peer.collector.get("join_info", 0).values()))
    peer.epoch, peer.next_round = info.epoch, info.round
    peer.plan, peer.first_plan = Plan.from_json(info.plan), Plan.from_json(info.first_plan)
    peer.gone = set(info.gone) - {peer.me}
    peer.profiles = {name: Profile.from_json(p) for name, p in info.profiles.items()}
    peer.samples = {name: int(n) for name, n in info.samples.items()}
    peer.model = model_spec(peer.topology.training.model, peer.data.input_shape, peer.data.num_classes)
    rounds = peer.topology.training.rounds
    peer.say("joining", f"rejoining a deployment in round {info.round} (plan {peer.plan.digest[:12]}, "
                        f"epoch {peer.epoch})")
    first = await _adopted(peer, 0) if info.round <= rounds else None
    start = first.round + 2 if first is not None else rounds + 1  # a round's notice: see the note
    if start > rounds:
        peer.too_late = True
        peer.log.warning("the others finish their last round before %s could join: nothing left to train", peer.me)
        return
    for other in sorted(peer.live_peers() - {peer.me}):
        await peer.send(Joining(src=peer.me, dst=other, round=start))
    adopt = await _adopted(peer, start - 1)
    await peer.become(adopt.round, adopt.state)
    await peer.worker.run("checkpoint", checkpoint.save, peer.out / "checkpoints", peer.me, adopt.round,
                          peer.plan.digest, adopt.state)
    peer.collector.forget(("adopt", "join_info"))
    peer.log.info("adopted the aggregated parts of round %d from %s; training from round %d",
                  adopt.round, adopt.src, adopt.round + 1)


async def _adopted(peer: Peer, round_: int) -> Adopt:
    """The aggregated parts of `round_` or later, once an owner hands them over."""
    def latest() -> Adopt | None:
        shares = [a for a in peer.collector.get("adopt", 0).values() if a.round >= round_]
        return max(shares, key=lambda a: a.round) if shares else None

    try:
        async with asyncio.timeout(peer.topology.timeouts.round):
            while latest() is None:
                await peer.collector.wait_change()
    except TimeoutError:
        raise PeerTimeout(f"no owner handed {peer.me} the aggregated parts of round {round_} within "
                          f"{peer.topology.timeouts.round:g} s") from None
    return latest()
