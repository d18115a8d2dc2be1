"""Going on without a compute node: re-plan, restore, train the round again ([Note: recovery]
in p2psl.runtime.recovery, which holds the pure parts: replicas, completed rounds, state by layer)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from p2psl.wire import checkpoint
from p2psl.errors import PlanMismatch, TrainingError
from p2psl.wire.messages import PlanProposal, StateTransfer
from p2psl.planning.planner import make_plan
from p2psl.runtime.recovery import completed_round, layers_in, provided_state, select_layers
from p2psl.topology import DATA_OWNER

if TYPE_CHECKING:
    from p2psl.runtime.peer import Peer

TRAINING_TOPICS = ("train_done", "cut", "part_share", "eval_report")


async def recover(peer: Peer) -> None:
    """[Note: recovery]: agree on a plan over the live compute nodes, restore, go on."""
    peer.role = None
    peer.say("recovering", f"re-planning without {', '.join(sorted(peer.gone))}")
    while True:
        peer.recovery_needed.clear()
        epoch = len(peer.gone & set(peer.first_plan.nodes))
        plan, completed = await _propose(peer, epoch)
        proposals = await _gather_proposals(peer, epoch)
        if proposals is None:
            continue  # more peers went while agreeing: plan again
        differ = sorted(n for n, p in proposals.items() if p.digest != plan.digest)
        if differ:
            raise PlanMismatch(f"after the failure of {', '.join(sorted(peer.gone))}, {', '.join(differ)} "
                               f"planned differently from {peer.me}")
        break
    restore = min([completed] + [p.completed for p in proposals.values()])
    peer.epoch, peer.plan = epoch, plan
    peer.collector.forget(TRAINING_TOPICS)
    peer.log.warning("epoch %d: plan %s over %s; training again from round %d", epoch, plan.digest[:12],
                     ", ".join(plan.nodes), restore + 1)
    state = await _restore_state(peer, restore)
    await peer.become(restore, state)

async def _propose(peer: Peer, epoch: int):
    survivors = peer.topology.without_peers(peer.gone & set(peer.first_plan.nodes))
    fixed = survivors.with_changes(first_cut=peer.first_plan.owner_first[1],
                                   last_cut=peer.first_plan.owner_last[0] - 1)
    plan = await peer.worker.run("plan", make_plan, fixed, peer.profiles, peer.samples)
    completed = completed_round(peer.out, peer.me, peer.plan)
    message = dict(digest=plan.digest, epoch=epoch, completed=completed, gone=sorted(peer.gone))
    peer.collector.put_nowait("plan", epoch, peer.me, PlanProposal(src=peer.me, dst=peer.me, **message))
    for other in sorted(peer.live_peers() - {peer.me}):
        await peer.send(PlanProposal(src=peer.me, dst=other, **message))
    return plan, completed

async def _gather_proposals(peer: Peer, epoch: int):
    gather = asyncio.ensure_future(peer.collector.gather("plan", epoch, peer.live_peers, peer.topology.timeouts.start,
                                                         "every live peer proposes the new plan"))
    changed = asyncio.ensure_future(peer.recovery_needed.wait())
    try:
        await asyncio.wait({gather, changed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        changed.cancel()
        if not gather.done():
            gather.cancel()
        await asyncio.gather(gather, changed, return_exceptions=True)
    if peer.recovery_needed.is_set() or gather.cancelled():
        return None
    return gather.result()

async def _restore_state(peer: Peer, round_: int) -> dict | None:
    """This peer's state at the end of `round_` under the new plan."""
    if peer.spec_peer.role == DATA_OWNER:
        if round_ == 0:
            return None
        return (await peer.worker.run("restore", checkpoint.load, peer.out / "checkpoints", round_)).state
    provided = await peer.worker.run("restore", provided_state, peer.out, peer.me, peer.gone, round_)
    mine: dict = {}
    for stage in peer.plan.chain:
        part = select_layers(provided, set(stage.layers))
        if stage.node == peer.me:
            mine.update(part)
        elif part:
            await peer.send(StateTransfer(src=peer.me, dst=stage.node, epoch=peer.epoch, round=round_,
                                          layers=[str(i) for i in sorted(layers_in(part))], state=part))
    if round_ == 0:
        return None
    sizes = peer.model.parameter_bytes()
    need = {i for i in peer.plan.part_layers(peer.plan.part_of(peer.me)) if sizes[i] > 0}
    try:
        async with asyncio.timeout(peer.topology.timeouts.request):
            while not need <= layers_in(mine):
                for transfer in peer.collector.get("state", peer.epoch).values():
                    mine.update(transfer.state)
                if need <= layers_in(mine):
                    break
                await peer.collector.wait_change()
    except TimeoutError:
        lost = sorted(i + 1 for i in need - layers_in(mine))
        raise TrainingError(f"the state of layers {lost} of round {round_} is lost (their node and the "
                            "node keeping its replica are both gone)") from None
    return mine
