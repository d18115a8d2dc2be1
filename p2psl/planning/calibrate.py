"""Calibration: the cost model refitted to the times a deployment measures. Pure: no torch, no sockets.

[Note: calibration] A profile is measured once, alone, before training; the runtime's per-task
and per-message costs (`Overheads`) were measured on another machine. Where peers run — a shared
machine, other work beside them, a device slower than it was — both can be off. So after every
round each peer publishes what it measured (`Timing`: its training tasks' wall seconds and how
many batches they served; the ``timings`` message), and every peer fits, from the same numbers,
the same `Calibration`:

1. a **speed factor** per peer, f_p = measured ÷ predicted seconds of its training tasks per
   batch (its layers' fwd + bwd + opt in the agreed profile plus its task costs τ_p), which
   divides its profile (`calibrated_profiles`);
2. a **residual**: the round's measured time (`target`: its slowest owner's) minus what
   the model with the refitted profiles predicts for them — what no profile describes (other
   work on the machine, the round end's costs on this hardware). It is the same for every plan,
   so it moves predictions but never the choice between plans.

Peers of one machine. A factor is one number for a peer, but part of what it measures belongs to
the peer's layers: a layer timed alone, before training, runs faster or slower inside the
pipeline, and two identical compute nodes of one machine measured 1.3–1.4× apart (the digits CNN
at a tenth of full speed), the higher factor following the heavier segment from one plan to the
next. Taken as the peers' own speeds, such factors make the planner swap the segments every
round, each swap predicted faster and measured slower. So compute nodes that share a machine and
a profile (the same cores and the same emulated speed) get one factor — their measured seconds
over their expected seconds together — unless they measured more than `SAME_MACHINE_SPREAD`
apart, which is taken for a peer really slower (another load beside it, an emulated slowdown):
sorted by factor, each run of nodes within that ratio of its first is pooled. The ratio is a
compromise: a node of the machine slowed by less is not planned around, and layers' errors can
exceed it (up to 1.9× between the one-layer segments of topologies/many_owners.toml), which the
rising gain below keeps from swapping plans for ever.

Predictions of the following rounds use both (`predict_calibrated`). The fit is a function of
the agreed plan, profiles and sample counts and of numbers every peer received, computed in the
same order with the same floating-point operations, so every peer's calibration is the same.
Only the round's own numbers enter, so a peer that rejoined, with no record of earlier rounds,
fits the same; a peer that published nothing (no training task in the round) has no factor.

Re-planning. With the refitted model, every peer plans again over the same compute nodes with
the owners' cuts kept (`better_plan`). It adopts the new plan only if the refitted model predicts
its rounds at least `GAIN` × (1 + the plans already changed on measured times) faster than the
plan in force, at most `MOST_GAIN` — each change asks more of the next, so that a fit the plan's
own layers bias cannot swap plans back and forth, and a node that turns really slow is still
planned around — *and* the time saved over the rounds
left exceeds what changing costs: moving the state of every layer that changes holder (each
owner's copy of its weights and momentum, read from the round's checkpoint and sent over the
route between the two holders, one after another) plus `REPLAN_SECONDS` for agreeing and
building the parts again. All of it is a function of the same inputs, so every peer decides
the same; they still compare plan digests, as at start-up (p2psl.runtime.replan).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from p2psl.planning import costmodel
from p2psl.planning.pipeline import CHECKPOINT_BYTES_PER_SECOND, MEASURED, Overheads, Prediction, task_seconds
from p2psl.planning.cost import SECONDS_PER_HOUR, hourly_price
from p2psl.planning.plan import Plan
from p2psl.planning.planner import make_plan
from p2psl.planning.profile import Profile

#: the range of each peer's speed factor
FACTOR_RANGE = (1 / 64, 64.0)
#: a new plan must predict rounds at least this much faster than the plan in force
GAIN = 0.10
#: ... rising by `GAIN` with every change of plan on measured times, up to this
MOST_GAIN = 0.5
#: compute nodes of one machine and profile whose factors lie within this ratio share one factor
SAME_MACHINE_SPREAD = 1.5
#: what re-planning costs besides moving state: agreeing, building the parts again (seconds)
REPLAN_SECONDS = 1.0
#: the torch tasks of one training batch on each role, as the runtime names them
OWNER_TASKS, NODE_TASKS = 5, 3


@dataclass(frozen=True)
class Timing:
    """What one peer measured in one round: wall seconds of its training tasks (forward,
    backward, optimizer steps) and the owner batches they served."""

    batches: int
    seconds: float


@dataclass(frozen=True)
class Calibration:
    """Speed factors (measured ÷ profiled task time, per peer) and the residual seconds."""

    factors: dict[str, float] = field(default_factory=dict)
    residual: float = 0.0
    round: int = 0

    def to_json(self) -> dict:
        return {"round": self.round, "residual": self.residual, "factors": dict(sorted(self.factors.items()))}


NO_CALIBRATION = Calibration()


def expected_task_seconds(plan: Plan, topology, profiles: Mapping[str, Profile], peer: str,
                          overheads: Overheads = MEASURED) -> float:
    """Seconds of `peer`'s training tasks for one owner batch, as the model has them."""
    if peer in plan.owners:
        layers, tasks = [*plan.part_layers(0), *plan.part_layers(plan.num_parts - 1)], OWNER_TASKS
    else:
        layers, tasks = list(plan.part_layers(plan.part_of(peer))), NODE_TASKS
    profile = profiles[peer]
    # the task clock times the tasks themselves (p2psl.runtime.calibration): a hand-off to the
    # torch thread falls between them
    return sum(profile.total(j) for j in layers) + tasks * task_seconds(topology, peer, replace(overheads, dispatch=0.0))


def calibrated_profiles(profiles: Mapping[str, Profile], calibration: Calibration) -> dict[str, Profile]:
    return {name: p.scaled(1.0 / calibration.factors[name]) if name in calibration.factors else p
            for name, p in profiles.items()}


def predict_calibrated(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                       calibration: Calibration, test_samples: Mapping[str, int] | None = None) -> Prediction:
    """`costmodel.predict` with the refitted profiles, its round time plus the residual."""
    prediction = costmodel.predict(plan, topology, calibrated_profiles(_at_batch(topology, profiles), calibration),
                                   samples, test_samples)
    return replace(prediction, round_seconds=max(prediction.round_seconds + calibration.residual, 0.0))


def fit(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
        timings: Mapping[str, Timing], target: float, round_: int,
        test_samples: Mapping[str, int] | None = None) -> Calibration:
    """The calibration of the module docstring from one round's timings and the target time."""
    profiles = _at_batch(topology, profiles)
    measured: dict[str, tuple[float, float]] = {}  # peer → (seconds per batch, expected seconds)
    for name in sorted(timings):
        timing = timings[name]
        if name not in profiles or timing.batches <= 0 or not (name in plan.owners or name in plan.nodes):
            continue
        expected = expected_task_seconds(plan, topology, profiles, name)
        if expected > 0 and math.isfinite(timing.seconds) and timing.seconds > 0:
            measured[name] = (timing.seconds / timing.batches, expected)
    factors = {name: _clamp(seconds / expected, FACTOR_RANGE) for name, (seconds, expected) in measured.items()}
    for group in _alike_nodes(plan, topology, profiles, factors):
        pooled = sum(measured[n][0] for n in group) / sum(measured[n][1] for n in group)
        factors.update({n: _clamp(pooled, FACTOR_RANGE) for n in group})
    if not (target > 0 and math.isfinite(target)):
        return Calibration(factors, 0.0, round_)
    model = predict_calibrated(plan, topology, profiles, samples, Calibration(factors), test_samples)
    return Calibration(factors, target - model.round_seconds, round_)


def _alike_nodes(plan: Plan, topology, profiles: Mapping[str, Profile],
                 factors: Mapping[str, float]) -> list[list[str]]:
    """The groups of compute nodes that share one factor (module docstring, "Peers of one machine")."""
    kinds: dict[tuple, list[str]] = {}
    for name in sorted(n for n in plan.nodes if n in factors):
        kinds.setdefault((topology.peer(name).machine_key, profiles[name]), []).append(name)
    groups = []
    for names in kinds.values():
        names.sort(key=lambda n: (factors[n], n))
        while names:
            run = [n for n in names if factors[n] <= SAME_MACHINE_SPREAD * factors[names[0]]]
            if len(run) > 1:
                groups.append(run)
            names = names[len(run):]
    return groups


def better_plan(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                calibration: Calibration, rounds_left: int, changes: int = 0) -> Plan | None:
    """The plan to change to at this round's end, or None (module docstring, "Re-planning");
    `changes` is how many times the deployment has already changed plans on measured times."""
    if rounds_left < 1 or not calibration.factors:
        return None
    fixed = topology.with_changes(first_cut=plan.owner_first[1], last_cut=plan.owner_last[0] - 1)
    if topology.training.objective == "cost":  # [Note: the cost objective]: the nodes paid for stay
        unused = {p.name for p in topology.compute_nodes} - set(plan.nodes)
        fixed = fixed.without_peers(unused).with_changes(objective="time")
    candidate = replace(make_plan(fixed, calibrated_profiles(_at_batch(topology, profiles), calibration), samples),
                        objective=plan.objective)
    if candidate.decisions == plan.decisions:  # the same cuts and micro-batches
        return None
    rate = _cost_rate(topology)
    now = predict_calibrated(plan, topology, profiles, samples, calibration).round_seconds * rate(plan)
    then = predict_calibrated(candidate, topology, profiles, samples, calibration).round_seconds * rate(candidate)
    gain = min(GAIN * (1 + changes), MOST_GAIN)
    saved = (now - then) * rounds_left
    moving = (move_seconds(plan, candidate, topology, profiles) + REPLAN_SECONDS) * rate(candidate)
    if then <= (1 - gain) * now and saved > moving:
        return candidate
    return None


def _cost_rate(topology):
    """What a second of a plan is worth to the objective: 1 (time), or under the cost objective
    its compute nodes' price per second ([Note: the cost objective])."""
    if topology.training.objective != "cost":
        return lambda plan: 1.0
    return lambda plan: hourly_price(plan, topology) / SECONDS_PER_HOUR


def move_seconds(old: Plan, new: Plan, topology, profiles: Mapping[str, Profile],
                 overheads: Overheads = MEASURED) -> float:
    """Reading and sending, one after another, the state of every layer whose holder changes:
    each owner's copy of it (weights and momentum), grouped by its old holder (with several
    chains, [Note: several chains], an owner's copy moves from its old chain's node)."""
    sizes = costmodel.model_sizes(topology, profiles)
    seconds = 0.0
    for stage in new.chain:
        for j in stage.layers:
            moved: dict[str, int] = {}
            for owner in new.owners_of(stage.node):
                source = _compute_holder(old, j, owner)
                if source is not None and source != stage.node:
                    moved[source] = moved.get(source, 0) + 2 * sizes.param_bytes[j]
            for source, nbytes in moved.items():
                seconds += nbytes / CHECKPOINT_BYTES_PER_SECOND + costmodel.message_seconds(
                    topology, source, stage.node, nbytes, overheads)
    return seconds


def _compute_holder(plan: Plan, layer: int, owner: str) -> str | None:
    """The compute node that runs 0-based `layer` for `owner` in `plan`, or None (an owner's layer)."""
    for part in range(1, plan.num_parts - 1):
        if layer in plan.part_layers(part):
            return plan.holder(part, owner) if owner in plan.owners else None
    return None


def _at_batch(topology, profiles: Mapping[str, Profile]) -> dict[str, Profile]:
    return {name: p.at_batch(topology.training.batch_size) for name, p in profiles.items()}


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])
