"""Measuring a round's task times, sharing them, and refitting the cost model at the round's end
([Note: calibration] in p2psl.planning.calibrate holds the fit)."""

from __future__ import annotations

from p2psl.errors import PlanError
from p2psl.planning.calibrate import Timing, better_plan, fit, predict_calibrated
from p2psl.runtime.roles.context import Topic
from p2psl.runtime.state import Actions, PeerState
from p2psl.wire.messages import EvalReport, Timings

#: the torch tasks of a training batch; "forward" is counted once per owner batch
TRAINING_TASKS = frozenset({"forward", "backward", "optimize", "loss+backward"})


class TaskClock:
    """Sums the wall seconds of this peer's training tasks per round (the worker's observer)."""

    def __init__(self) -> None:
        self.rounds: dict[int, list] = {}

    def __call__(self, name: str, seconds: float, span: dict) -> None:
        round_ = span.get("round")
        if name not in TRAINING_TASKS or not isinstance(round_, int):
            return
        entry = self.rounds.setdefault(round_, [0, 0.0])
        entry[0] += name == "forward" and not span.get("micro")  # once per batch, micro-batches or not
        entry[1] += seconds

    def timing(self, round_: int) -> Timing:
        batches, seconds = self.rounds.pop(round_, (0, 0.0))
        for old in [r for r in self.rounds if r < round_]:
            del self.rounds[old]
        return Timing(batches, seconds)


async def calibrate(state: PeerState, actions: Actions, clock: TaskClock, round_: int,
                    reports: dict[str, EvalReport]) -> None:
    """Publish this peer's timing of `round_` to every live peer, gather theirs, refit, choose
    whether to change plans (`state.better`), and predict the next round with the refitted model
    (`state.predicted`)."""
    mine = clock.timing(round_)
    fields = dict(epoch=state.epoch, round=round_, batches=mine.batches, seconds=mine.seconds)
    state.collector.put_nowait(Topic.TIMINGS, round_, state.me, Timings(src=state.me, dst=state.me, **fields))
    for peer in sorted(state.audience() - {state.me}):
        await actions.send(Timings(src=state.me, dst=peer, **fields))
    shared = await state.collector.gather(Topic.TIMINGS, round_, lambda: state.live_peers() - set(state.joiners),
                                          state.topology.timeouts.round, "every peer publishes its task times")
    timings = {name: Timing(msg.batches, msg.seconds) for name, msg in sorted(shared.items())}
    # the round as every peer recorded it (its slowest owner): a peer that rejoined has no older
    # rounds, so nothing older may enter the fit if its calibration is to be everyone's
    measured = max(r.seconds for r in reports.values())
    state.calibration = await state.worker.run("calibrate", fit, state.plan, state.topology, state.profiles,
                                               state.samples, timings, measured, round_)
    try:
        live = state.topology.without_peers(state.gone_nodes())  # the nodes a plan may use
        state.better = await state.worker.run("plan", better_plan, state.plan, live, state.profiles,
                                              state.samples, state.calibration,
                                              state.topology.training.rounds - round_, state.rebalances)
    except PlanError as exc:  # the same inputs fail the same way everywhere: every peer keeps its plan
        state.log.warning("keeping plan %s: planning on measured times failed: %s", state.plan.digest[:12], exc)
        state.better = None
    plan = state.better or state.plan
    prediction = predict_calibrated(plan, state.topology, state.profiles, state.samples, state.calibration)
    state.predicted[round_ + 1] = prediction.round_seconds
