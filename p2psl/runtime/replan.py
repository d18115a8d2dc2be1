"""Going on without a compute node: re-plan, restore, train the round again ([Note: recovery]
in p2psl.runtime.recovery, which holds the pure parts: replicas, completed rounds, state by layer)."""

from __future__ import annotations

import asyncio

from p2psl.runtime.roles.context import TRAINING_TOPICS, Topic
from p2psl.wire import checkpoint
from p2psl.errors import PlanMismatch, TrainingError
from p2psl.wire.messages import PlanProposal, StateTransfer
from p2psl.planning.plan import Plan
from p2psl.planning.chains import chains_left
from p2psl.planning.planner import make_plan
from p2psl.runtime.recovery import completed_round, layers_in, owner_layers_in, owner_of, provided_state, select_layers
from p2psl.runtime.state import Actions, PeerState
from p2psl.topology import DATA_OWNER





async def recover(state: PeerState, actions: Actions) -> None:
    """[Note: recovery]: agree on a plan over the live compute nodes, restore, go on."""
    state.role = None
    state.say("recovering", f"re-planning without {', '.join(sorted(state.gone))}")
    while True:
        state.recovery_needed.clear()
        why = state.cannot_train()
        if why is not None:
            raise state.stop_error(why)
        epoch = state.rebalances + len(state.gone_nodes())
        plan, completed = await _propose(state, actions, epoch)
        proposals = await _gather_proposals(state, actions, epoch)
        if proposals is None:
            continue  # more peers went while agreeing: plan again
        differ = sorted(n for n, p in proposals.items() if p.digest != plan.digest)
        if differ:
            raise PlanMismatch(f"after the failure of {', '.join(sorted(state.gone))}, {', '.join(differ)} "
                               f"planned differently from {state.me}")
        break
    restore = min([completed] + [p.completed for p in proposals.values()])
    state.epoch, state.plan = epoch, plan
    state.collector.forget(TRAINING_TOPICS)
    state.log.warning("epoch %d: plan %s over %s; training again from round %d", epoch, plan.digest[:12],
                     ", ".join(plan.nodes), restore + 1)
    state = await _restore_state(state, actions, restore)
    await actions.become(restore, state)

async def rebalance(state: PeerState, actions: Actions, plan: Plan, round_: int) -> bool:
    """[Note: calibration]: change to `plan`, which every peer chose from the same measured
    times at the end of `round_`: compare digests, move the state of round `round_` to the new
    holders of its layers, build the parts and train on. False if a compute node went meanwhile
    (the caller recovers instead)."""
    state.role = None
    epoch = state.epoch + 1
    state.say("re-planning", f"measured times favour plan {plan.digest[:12]} over {', '.join(plan.nodes)}")
    message = dict(digest=plan.digest, epoch=epoch, completed=round_, gone=_gone_news(state))
    state.collector.put_nowait(Topic.PLAN, epoch, state.me, PlanProposal(src=state.me, dst=state.me, **message))
    for other in sorted(state.live_peers() - {state.me}):
        await actions.send(PlanProposal(src=state.me, dst=other, **message))
    proposals = await _gather_proposals(state, actions, epoch)
    if proposals is None:
        return False
    differ = sorted(n for n, p in proposals.items() if p.digest != plan.digest)
    if differ:
        raise PlanMismatch(f"re-planning after round {round_}, {', '.join(differ)} planned differently from {state.me}")
    state.epoch, state.plan, state.rebalances = epoch, plan, state.rebalances + 1
    state.collector.forget(TRAINING_TOPICS)
    state.log.warning("epoch %d: plan %s over %s from round %d, chosen on measured times", epoch, plan.digest[:12],
                      ", ".join(plan.nodes), round_ + 1)
    await actions.become(round_, await _restore_state(state, actions, round_))
    return True


def _gone_news(state: PeerState) -> list[str]:
    """The peers a `plan` names gone: not the owners rejoining, which a peer that counted one in
    already would take for news of it ([Note: rejoining] in p2psl.runtime.rejoin)."""
    return sorted(state.gone - set(state.joiners))


async def _propose(state: PeerState, actions: Actions, epoch: int):
    survivors = state.topology.without_peers(state.gone_nodes())
    fixed = survivors.with_changes(first_cut=state.first_plan.owner_first[1],
                                   last_cut=state.first_plan.owner_last[0] - 1,
                                   chains=chains_left(survivors.training.chains))
    plan = await state.worker.run("plan", make_plan, fixed, state.profiles, state.samples)
    # a round is complete once restorable *and* recorded: one checkpointed but not evaluated yet
    # is trained again, or it would never get its record
    completed = min(completed_round(state.out, state.me, state.plan), state.recorded)
    message = dict(digest=plan.digest, epoch=epoch, completed=completed, gone=_gone_news(state),
                   decisions=plan.decisions)
    state.collector.put_nowait(Topic.PLAN, epoch, state.me, PlanProposal(src=state.me, dst=state.me, **message))
    for other in sorted(state.live_peers() - {state.me}):
        await actions.send(PlanProposal(src=state.me, dst=other, **message))
    return plan, completed

async def _gather_proposals(state: PeerState, actions: Actions, epoch: int):
    gather = asyncio.ensure_future(state.collector.gather(Topic.PLAN, epoch, state.live_peers, state.topology.timeouts.start,
                                                         "every live peer proposes the new plan"))
    changed = asyncio.ensure_future(state.recovery_needed.wait())
    try:
        await asyncio.wait({gather, changed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        changed.cancel()
        if not gather.done():
            gather.cancel()
        await asyncio.gather(gather, changed, return_exceptions=True)
    if state.recovery_needed.is_set() or gather.cancelled():
        return None
    return gather.result()

async def _restore_state(state: PeerState, actions: Actions, round_: int) -> dict | None:
    """This peer's state at the end of `round_` under the new plan."""
    if state.spec.role == DATA_OWNER:
        if round_ == 0:
            return None
        return (await state.worker.run("restore", checkpoint.load, state.out / "checkpoints", round_)).state
    provided = await state.worker.run("restore", provided_state, state.out, state.me, state.gone, round_)
    mine: dict = {}
    for stage in state.plan.chain:
        owners = set(state.plan.owners_of(stage.node))  # its chain's ([Note: several chains])
        part = {k: v for k, v in select_layers(provided, set(stage.layers)).items() if owner_of(k) in owners}
        if stage.node == state.me:
            mine.update(part)
        elif part:
            await actions.send(StateTransfer(src=state.me, dst=stage.node, epoch=state.epoch, round=round_,
                                          layers=[str(i) for i in sorted(layers_in(part))], state=part))
    if round_ == 0 or state.me not in state.plan.nodes:  # [Note: the cost objective]: a node left out
        return None
    sizes = state.model.parameter_bytes()
    owners = state.plan.owners_of(state.me)
    need = {(k, i) for k in owners for i in state.plan.part_layers(state.plan.part_of(state.me)) if sizes[i] > 0}
    try:
        async with asyncio.timeout(state.topology.timeouts.request):
            while not need <= owner_layers_in(mine):
                for transfer in state.collector.get(Topic.STATE, state.epoch).values():
                    mine.update({k: v for k, v in transfer.state.items() if owner_of(k) in owners})
                if need <= owner_layers_in(mine):
                    break
                await state.collector.wait_change()
    except TimeoutError:
        lost = sorted({i + 1 for _, i in need - owner_layers_in(mine)})
        raise TrainingError(f"the state of layers {lost} of round {round_} is lost (their node and the "
                            "node keeping its replica are both gone)") from None
    return mine
