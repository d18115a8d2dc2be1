"""Before a plan: what this peer tells the others about itself, and where a resumed run restarts.

Functions of the peer's state and the greetings it gathered (SPEC §3, steps 1–3).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from p2psl.errors import ConfigError, P2PSLError
from p2psl.net.network import Network
from p2psl.runtime.metrics import read_metrics
from p2psl.runtime.recovery import replicas_dir
from p2psl.runtime.roles.context import Topic
from p2psl.learning.data import owner_data
from p2psl.runtime.state import Actions, PeerState
from p2psl.topology import DATA_OWNER
from p2psl.wire import checkpoint
from p2psl.wire.messages import Greeting
from p2psl.units import plural


def prepare(state: PeerState, resume: bool) -> None:
    """This peer's data (an owner's) and the greeting that describes it."""
    cfg, topology = state.topology.training, state.topology
    facts: dict = {}
    if state.spec.role == DATA_OWNER:
        state.data, mine = owner_data(cfg, [o.name for o in topology.owners], state.me)
        state.shards = {state.me: mine}
        facts = {"input_shape": list(state.data.input_shape), "num_classes": state.data.num_classes,
                 "train": len(mine.train_idx), "test": len(mine.test_idx)}
    completed = checkpoint.rounds(state.out / "checkpoints")[-1:] if resume else []
    last = completed[0] if completed else 0
    if resume and (state.out / "metrics.jsonl").exists():
        # a round checkpointed but not recorded (stopped while it was evaluated) is trained again
        state.recorded = max((r["round"] for r in read_metrics(state.out / "metrics.jsonl")
                              if r.get("event") == "round"), default=0)
        last = min(last, state.recorded)
    state.greeting = dict(role=state.spec.role, completed_round=last, resume=resume, dataset=facts,
                          incarnation=state.life)


def clear_earlier_run(state: PeerState) -> None:
    """Once every peer agreed to start afresh (or this one rejoins with the others' state): the
    round checkpoints and replicas an earlier run left in this peer's folder go. Kept, they would
    outrank this run's rounds and be what a later --resume restores. Not before the agreement: a
    peer started without --resume among peers that resume is refused, its checkpoints intact."""
    folders = [state.out / "checkpoints", *(replicas_dir(state.out, p.name) for p in state.topology.compute_nodes)]
    cleared = sum(checkpoint.clear(folder) for folder in folders)
    if cleared:
        state.log.info("starting afresh: removed %s of an earlier run from %s",
                       plural(cleared, "round checkpoint"), state.out)


def resume_round(state: PeerState, greetings: dict[str, Greeting], resume: bool) -> int:
    """The last round every peer has completed (0: start afresh); all peers resume, or none."""
    flags = {g.resume for g in greetings.values()}
    if len(flags) > 1:
        fresh = sorted(n for n, g in greetings.items() if not g.resume)
        raise ConfigError(f"some peers resume and others start afresh ({', '.join(fresh)}): "
                          "start every peer with --resume, or none")
    if not resume:
        return 0
    start = min(g.completed_round for g in greetings.values())
    if start and start not in checkpoint.rounds(state.out / "checkpoints"):
        raise ConfigError(f"the peers can resume from round {start} but {state.me} has no checkpoint for it")
    return start


async def send_greetings(state: PeerState, actions: Actions) -> None:
    """A greeting to every peer, each sent as soon as its way is up (all at once, so a peer
    that is gone for good holds up nobody)."""
    state.told.append(Greeting(src=state.me, dst=state.me, **state.greeting))
    async def one(peer: str) -> None:
        try:
            await actions.send(Greeting(src=state.me, dst=peer, **state.greeting), state.topology.timeouts.connect)
        except P2PSLError as exc:
            state.log.warning("could not greet %s: %s", peer, exc)
    await asyncio.gather(*(one(p) for p in state.others()))


async def gather_greetings(state: PeerState, network: Network) -> dict[str, Greeting]:
    """Every neighbour connected, then every peer's greeting (this peer's own included)."""
    await network.wait_connected(status=lambda text: state.say("connecting", text))
    state.say("greeting", "greeting every peer")
    greetings = await state.collector.gather(Topic.GREETING, 0, set(state.others()), state.topology.timeouts.start,
                                             "every peer greets every other at start-up")
    greetings[state.me] = Greeting(src=state.me, dst=state.me, **state.greeting)
    return greetings


async def tell_again(state: PeerState, actions: Actions, name: str) -> None:
    """A neighbour restarted before the plan was agreed: its new life has none of what this peer
    told the old one (the link session forgot it, §9), so send it the greeting, profile and plan
    again, or it would wait for them until timeouts.start."""
    state.log.info("%s restarted while starting: greeting it again", name)
    for message in list(state.told):
        try:
            await actions.send(replace(message, dst=name), state.topology.timeouts.start)
        except P2PSLError as exc:
            state.log.warning("could not greet %s again: %s", name, exc)
