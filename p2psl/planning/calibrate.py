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
2. one **overhead factor** s that scales every runtime cost (`Overheads.scaled`), chosen so that
   the model with the refitted profiles predicts the round just measured (its longest owner's
   round time): the round time is non-decreasing in s, and s is found by bisection in log
   space between `OVERHEAD_RANGE`'s ends.

Predictions of the following rounds use both (`predict_calibrated`). The fit is a function of
the agreed plan, profiles and sample counts and of numbers every peer received, computed in the
same order with the same floating-point operations, so every peer's calibration is the same.
A peer that published nothing (no training task in the round) keeps its previous factor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from p2psl.planning import costmodel
from p2psl.planning.pipeline import MEASURED, Overheads, Prediction, task_seconds
from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile

#: the range of the overhead factor, and of each peer's speed factor
OVERHEAD_RANGE = (1 / 64, 64.0)
FACTOR_RANGE = (1 / 64, 64.0)
#: bisection steps (the factor is then known to 2^-20 of the range's logarithm)
STEPS = 20
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
    """Speed factors (measured ÷ profiled task time, per peer) and the overhead factor."""

    factors: dict[str, float] = field(default_factory=dict)
    overhead: float = 1.0
    round: int = 0

    def to_json(self) -> dict:
        return {"round": self.round, "overhead": self.overhead, "factors": dict(sorted(self.factors.items()))}


NO_CALIBRATION = Calibration()


def expected_task_seconds(plan: Plan, topology, profiles: Mapping[str, Profile], peer: str,
                          overheads: Overheads = MEASURED) -> float:
    """Seconds of `peer`'s training tasks for one owner batch, as the model has them."""
    if peer in plan.owners:
        layers, tasks = [*plan.part_layers(0), *plan.part_layers(plan.num_parts - 1)], OWNER_TASKS
    else:
        layers, tasks = list(plan.part_layers(plan.part_of(peer))), NODE_TASKS
    profile = profiles[peer]
    return sum(profile.total(j) for j in layers) + tasks * task_seconds(topology, peer, overheads)


def calibrated_profiles(profiles: Mapping[str, Profile], calibration: Calibration) -> dict[str, Profile]:
    return {name: p.scaled(1.0 / calibration.factors[name]) if name in calibration.factors else p
            for name, p in profiles.items()}


def predict_calibrated(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                       calibration: Calibration, test_samples: Mapping[str, int] | None = None) -> Prediction:
    """`costmodel.predict` with the refitted profiles and runtime costs."""
    return costmodel.predict(plan, topology, calibrated_profiles(_at_batch(topology, profiles), calibration),
                             samples, test_samples, MEASURED.scaled(calibration.overhead))


def fit(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
        timings: Mapping[str, Timing], measured_round: float, round_: int,
        previous: Calibration = NO_CALIBRATION, test_samples: Mapping[str, int] | None = None) -> Calibration:
    """The calibration of the module docstring from one round's timings and measured time."""
    profiles = _at_batch(topology, profiles)
    factors = dict(previous.factors)
    for name in sorted(timings):
        timing = timings[name]
        if name not in profiles or timing.batches <= 0 or not (name in plan.owners or name in plan.nodes):
            continue
        expected = expected_task_seconds(plan, topology, profiles, name)
        if expected > 0 and math.isfinite(timing.seconds) and timing.seconds > 0:
            factors[name] = _clamp(timing.seconds / timing.batches / expected, FACTOR_RANGE)
    calibration = Calibration(factors, previous.overhead, round_)
    if not (measured_round > 0 and math.isfinite(measured_round)):
        return calibration

    def error(log_s: float) -> float:
        trial = Calibration(factors, math.exp(log_s), round_)
        return predict_calibrated(plan, topology, profiles, samples, trial, test_samples).round_seconds - measured_round

    lo, hi = math.log(OVERHEAD_RANGE[0]), math.log(OVERHEAD_RANGE[1])
    if error(lo) >= 0:
        return Calibration(factors, math.exp(lo), round_)
    if error(hi) <= 0:
        return Calibration(factors, math.exp(hi), round_)
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if error(mid) < 0 else (lo, mid)
    return Calibration(factors, math.exp((lo + hi) / 2), round_)


def _at_batch(topology, profiles: Mapping[str, Profile]) -> dict[str, Profile]:
    return {name: p.at_batch(topology.training.batch_size) for name, p in profiles.items()}


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])
