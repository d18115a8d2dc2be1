"""Predicted period, round time and peak memory of a plan. Pure: no torch, no sockets.

Notation (per batch of the training batch size B; profiles already carry each peer's speed):

    K owners k, each with β_k = local_epochs · ⌈n_k / B⌉ batches per round (active if β_k ≥ 1)
    part 0 = layers 1..a and part N+1 = layers b+1..L on every owner; chain i_1 … i_N in between
    t_p(j) = fwd + bwd + opt of layer j on peer p      x_s = output bytes of the last layer of part s

Resources. A compute node serves one task at a time, so its *occupancy* per owner batch is
occ_i = Σ_{j ∈ S_i} t_i(j) (it cannot run Alice's forward and Bob's backward at once). A link
direction u→v with bandwidth bw is busy x / bw for each transfer of x bytes that crosses it:
the activation x_s forward and its gradient (same size) backward. Traffic between peers that
are not neighbours follows `Topology.route` and loads every hop. A link without bandwidth (and
every link of a topology without [[link]] tables) is free. ℓ_{r,k} is resource r's busy time
for one batch of owner k.

Cycle. An owner has one batch in flight, so its batches are spaced at least by its cycle, the
latency of one batch through an empty pipeline:

    c_k = Σ_{j ≤ a} t_k(j) + Σ_{j > b} t_k(j) + Σ_i occ_i + Σ_transfers Σ_hops (x / bw + latency)

Latency lengthens the cycle but occupies nothing.

Period. In steady state every active owner completes one batch per period P. Each resource must
serve one batch of every owner per period, and no owner can beat its own cycle:

    P(A) = max( max_r Σ_{k ∈ A} ℓ_{r,k} ,  max_{k ∈ A} c_k )

The first term is the compute- or link-bound regime (K large: P = K · max_i occ_i when the links
are free), the second the owner-bound regime (few or slow owners: P = c_k). Both are lower
bounds that a closed cyclic pipeline attains asymptotically; near the knee queueing makes the
real period a little longer.

Round. All owners start together. The first batches finish after the slowest cycle plus the
queueing of the other owners' first batches behind the bottleneck, and that stagger persists to
the last round:

    fill  = max_k c_k          drain = max_r ( Σ_k ℓ_{r,k} − max_k ℓ_{r,k} )   (= (K−1)·occ_i)
    train = fill + drain + Σ_m (β_(m) − β_(m−1)) · P(A_m)

where β_(1) < β_(2) < … are the distinct batch counts, β_(0) = 1 (the first batch is the fill)
and A_m = {k : β_k ≥ β_(m)}: owners with fewer batches drop out and the rest speed up. With equal
counts this is c + (K−1)·ℓ* + (β−1)·P, which gives β·K·occ + (c − occ) when compute-bound and
β·c + (K−1)·occ when owner-bound.

    aggregation = max( owner exchange + K · W_0 / R ,  max_i K · W_i / R )   (0 when K = 1)

where W_0 = parameter bytes of parts 0 and N+1, exchanged all-to-all between owners (the most
loaded link direction's bytes / bandwidth, plus the longest route's latency), W_i = the
parameters of compute node i's segment, and R = `AVERAGE_BYTES_PER_SECOND` the rate of a
weighted average of K copies in memory. Evaluation is the same closed loop, forward only, at the
evaluation batch size, with ⌈test samples / eval_batch_size⌉ batches per owner.

    round = train + aggregation + evaluation

Memory (`peak_memory`). A compute node holds K copies of weights, gradients and SGD momentum
(3 × parameter bytes) and, per owner batch in flight at it, the activations its layers save for
backward (their output activations plus the received input); in the worst case all K owners are
in flight there. An owner holds one copy of parts 0 and N+1 and one batch's activations. Both
add `RUNTIME_OVERHEAD_BYTES` for the interpreter, torch and buffers.

Activation and parameter sizes are properties of the model: they are read from the profile of
the peer whose name sorts first, so every peer computes the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from p2psl.plan import Plan
from p2psl.profile import Profile

#: rate of averaging K copies of parameters in memory (read K, write one), bytes per second
AVERAGE_BYTES_PER_SECOND = 1e9
#: per-process memory that is not weights or activations: Python, torch (~220 MiB), buffers
RUNTIME_OVERHEAD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Workload:
    """Per-batch demand of each owner: ℓ_{r,k} per resource r, and each owner's cycle c_k."""

    loads: dict[str, dict[str, float]]
    cycles: dict[str, float]


@dataclass(frozen=True)
class ClosedLoop:
    """The closed-loop formula's result for one phase (training or evaluation) of a round."""

    period: float
    fill: float
    drain: float
    seconds: float
    bottleneck: str
    loads: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects of a plan; `occupancy` is seconds per owner batch."""

    period_seconds: float
    round_seconds: float
    training_seconds: float
    fill_seconds: float
    drain_seconds: float
    aggregation_seconds: float
    evaluation_seconds: float
    bottleneck: str
    occupancy: dict[str, float]
    cycles: dict[str, float]
    batches: dict[str, int]


# -- the closed loop -----------------------------------------------------------------------------

def batches_per_owner(samples: Mapping[str, int], batch_size: int, epochs: int = 1) -> dict[str, int]:
    """β_k = epochs · ⌈n_k / batch_size⌉."""
    return {k: epochs * math.ceil(max(n, 0) / batch_size) for k, n in samples.items()}


def period_of(work: Workload, owners: list[str]) -> tuple[float, str]:
    """P(A) and the resource (or owner cycle) that sets it; ties go to the first name."""
    best, name = 0.0, ""
    for r in sorted(work.loads):
        value = sum(work.loads[r].get(k, 0.0) for k in owners)
        if value > best:
            best, name = value, r
    for k in sorted(owners):
        if work.cycles[k] > best:
            best, name = work.cycles[k], f"{k} cycle"
    return best, name


def closed_loop(work: Workload, batches: Mapping[str, int]) -> ClosedLoop:
    """fill + drain + Σ_m (β_(m) − β_(m−1)) · P(A_m), as in the module docstring."""
    active = sorted(k for k in work.cycles if batches.get(k, 0) >= 1)
    if not active:
        return ClosedLoop(0.0, 0.0, 0.0, 0.0, "")
    fill = max(work.cycles[k] for k in active)
    drain = max([_stagger(work.loads[r], active) for r in work.loads] or [0.0])
    seconds, previous = fill + drain, 1
    for level in sorted({batches[k] for k in active}):
        members = [k for k in active if batches[k] >= level]
        seconds += (level - previous) * period_of(work, members)[0]
        previous = level
    period, bottleneck = period_of(work, active)
    loads = {r: sum(work.loads[r].get(k, 0.0) for k in active) for r in work.loads}
    return ClosedLoop(period, fill, drain, seconds, bottleneck, loads)


def _stagger(per_owner: Mapping[str, float], owners: list[str]) -> float:
    values = [per_owner.get(k, 0.0) for k in owners]
    return sum(values) - max(values)


# -- building the workload of a plan -------------------------------------------------------------

def model_sizes(topology, profiles: Mapping[str, Profile]) -> Profile:
    """The profile whose activation and parameter sizes stand for the model's (first name)."""
    return profiles[min(p.name for p in topology.peers)]


def workload(plan: Plan, topology, profiles: Mapping[str, Profile], forward_only: bool = False) -> Workload:
    """ℓ_{r,k} and c_k of every owner of the plan, for one batch at the profiles' batch size."""
    sizes = model_sizes(topology, profiles)
    cost = (lambda p, j: p.fwd[j]) if forward_only else (lambda p, j: p.total(j))
    loads: dict[str, dict[str, float]] = {}
    node_time = {s.node: sum(cost(profiles[s.node], j) for j in s.layers) for s in plan.chain}
    cycles = {}
    for k in plan.owners:
        own = profiles[k]
        layers = [*plan.part_layers(0), *plan.part_layers(plan.num_parts - 1)]
        cycle = sum(cost(own, j) for j in layers) + sum(node_time.values())
        for node, t in node_time.items():
            loads.setdefault(node, {})[k] = t
        for src, dst, nbytes in _transfers(plan, k, sizes, forward_only):
            cycle += _route_time(topology, src, dst, nbytes, k, loads)
        cycles[k] = cycle
    return Workload(loads, cycles)


def _transfers(plan: Plan, owner: str, sizes: Profile, forward_only: bool) -> list[tuple[str, str, int]]:
    """(src, dst, bytes) of one batch: activations forward, then gradients backward."""
    hops = [owner, *plan.nodes, owner]
    cuts = [plan.owner_first[1]] + [s.last for s in plan.chain]
    forward = [(hops[i], hops[i + 1], sizes.act_bytes[c - 1]) for i, c in enumerate(cuts)]
    backward = [(dst, src, n) for src, dst, n in reversed(forward)]
    return forward if forward_only else forward + backward


def _route_time(topology, src: str, dst: str, nbytes: float, owner: str, loads: dict) -> float:
    """Seconds to move nbytes src → dst hop by hop; adds each hop's busy time to `loads`."""
    seconds = 0.0
    route = topology.route(src, dst)
    for u, v in zip(route, route[1:]):
        link = topology.link(u, v)
        if link.bandwidth is not None:
            busy = nbytes / link.bandwidth
            per_owner = loads.setdefault(f"{u}→{v}", {})
            per_owner[owner] = per_owner.get(owner, 0.0) + busy
            seconds += busy
        seconds += link.latency
    return seconds


# -- aggregation and evaluation ------------------------------------------------------------------

def owner_param_bytes(plan: Plan, sizes: Profile) -> int:
    """W_0: parameter bytes of parts 0 and N+1, what owners exchange at the end of a round."""
    layers = [*plan.part_layers(0), *plan.part_layers(plan.num_parts - 1)]
    return sum(sizes.param_bytes[j] for j in layers)


def exchange_seconds(topology, owners: list[str], nbytes: float) -> float:
    """All-to-all exchange of nbytes between owners: busiest link direction plus longest latency."""
    busy: dict[tuple[str, str], float] = {}
    latency = 0.0
    for k in owners:
        for other in owners:
            if other == k:
                continue
            route = topology.route(k, other)
            hop_latency = 0.0
            for u, v in zip(route, route[1:]):
                link = topology.link(u, v)
                if link.bandwidth is not None:
                    busy[(u, v)] = busy.get((u, v), 0.0) + nbytes / link.bandwidth
                hop_latency += link.latency
            latency = max(latency, hop_latency)
    return max(busy.values(), default=0.0) + latency


def aggregation_seconds(plan: Plan, topology, profiles: Mapping[str, Profile]) -> float:
    """FedAvg at the end of a round (see the module docstring)."""
    k = len(plan.owners)
    if k <= 1:
        return 0.0
    sizes = model_sizes(topology, profiles)
    w0 = owner_param_bytes(plan, sizes)
    owners = exchange_seconds(topology, list(plan.owners), w0) + k * w0 / AVERAGE_BYTES_PER_SECOND
    nodes = [k * sum(sizes.param_bytes[j] for j in s.layers) / AVERAGE_BYTES_PER_SECOND for s in plan.chain]
    return max([owners, *nodes])


def default_test_samples(samples: Mapping[str, int], test_fraction: float) -> dict[str, int]:
    """Test split sizes when not given: n_k · f / (1 − f), the split that left n_k for training."""
    return {k: int(round(n * test_fraction / (1 - test_fraction))) for k, n in samples.items()}


# -- predictions ---------------------------------------------------------------------------------

def at_batch(profiles: Mapping[str, Profile], batch_size: int) -> dict[str, Profile]:
    return {name: p.at_batch(batch_size) for name, p in profiles.items()}


def training_loop(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                  work: Workload | None = None) -> ClosedLoop:
    """The training part of a round (what the planner optimises)."""
    cfg = topology.training
    work = work or workload(plan, topology, at_batch(profiles, cfg.batch_size))
    return closed_loop(work, _batches(plan, topology, samples))


def _batches(plan: Plan, topology, samples: Mapping[str, int]) -> dict[str, int]:
    cfg = topology.training
    return batches_per_owner({k: samples.get(k, 0) for k in plan.owners}, cfg.batch_size, cfg.local_epochs)


def predict(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
            test_samples: Mapping[str, int] | None = None) -> Prediction:
    """Period, round time and its parts for `plan` (see the module docstring)."""
    cfg = topology.training
    work = workload(plan, topology, at_batch(profiles, cfg.batch_size))
    train = training_loop(plan, topology, profiles, samples, work)
    tests = test_samples if test_samples is not None else default_test_samples(samples, cfg.test_fraction)
    evaluation = closed_loop(
        workload(plan, topology, at_batch(profiles, cfg.eval_batch_size), forward_only=True),
        batches_per_owner({k: tests.get(k, 0) for k in plan.owners}, cfg.eval_batch_size),
    )
    aggregation = aggregation_seconds(plan, topology, at_batch(profiles, cfg.batch_size))
    return Prediction(
        period_seconds=train.period,
        round_seconds=train.seconds + aggregation + evaluation.seconds,
        training_seconds=train.seconds,
        fill_seconds=train.fill,
        drain_seconds=train.drain,
        aggregation_seconds=aggregation,
        evaluation_seconds=evaluation.seconds,
        bottleneck=train.bottleneck,
        occupancy={r: max(v.values()) for r, v in sorted(work.loads.items())},
        cycles=dict(sorted(work.cycles.items())),
        batches=_batches(plan, topology, samples),
    )


def paper_round_time(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int]) -> float:
    """The MP-SL paper's estimate (SPEC §5), for comparison:

        start + first batch + (r·B·K − 1) · (max_i fwd_i + max_i bwd_i) + end + aggregation

    start = mean over owners of part-0 forward + upload to i_1; first batch = every stage's
    forward and backward plus the mean owner's last part and its transfers to and from i_N; end
    = the slowest owner's download from i_1 and part-0 backward; fwd_i / bwd_i are compute only
    (bwd includes the optimizer step) and transfers between compute nodes are ignored.
    """
    cfg = topology.training
    profiles = at_batch(profiles, cfg.batch_size)
    sizes = model_sizes(topology, profiles)
    owners = list(plan.owners)
    first, last = plan.owner_first[1], plan.owner_last[0] - 1
    fwd = [sum(profiles[s.node].fwd[j] for j in s.layers) for s in plan.chain]
    bwd = [sum(profiles[s.node].total(j) - profiles[s.node].fwd[j] for j in s.layers) for s in plan.chain]
    head, tail = plan.nodes[0], plan.nodes[-1]

    def send(src: str, dst: str, j: int) -> float:
        return _route_time(topology, src, dst, sizes.act_bytes[j - 1], "", {})

    start = _mean(sum(profiles[k].fwd[j] for j in plan.part_layers(0)) + send(k, head, first) for k in owners)
    tail_part = plan.part_layers(plan.num_parts - 1)
    first_batch = sum(fwd) + sum(bwd) + _mean(
        send(tail, k, last) + sum(profiles[k].total(j) for j in tail_part) + send(k, tail, last) for k in owners)
    end = max(send(head, k, first) + sum(profiles[k].total(j) - profiles[k].fwd[j] for j in plan.part_layers(0))
              for k in owners)
    total = sum(batches_per_owner({k: samples.get(k, 0) for k in owners}, cfg.batch_size, cfg.local_epochs).values())
    steady = max(total - 1, 0) * (max(fwd) + max(bwd))
    return start + first_batch + steady + end + aggregation_seconds(plan, topology, profiles)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# -- memory --------------------------------------------------------------------------------------

def node_memory(sizes: Profile, first: int, last: int, copies: int) -> int:
    """Peak bytes of a compute node holding layers first..last (1-based) for `copies` owners."""
    layers = range(first - 1, last)
    params = sum(sizes.param_bytes[j] for j in layers)
    stash = sum(sizes.act_bytes[j] for j in layers) + (sizes.act_bytes[first - 2] if first > 1 else 0)
    return copies * (3 * params + stash) + RUNTIME_OVERHEAD_BYTES


def owner_memory(sizes: Profile, first_cut: int, last_cut: int) -> int:
    """Peak bytes of a data owner holding layers 1..first_cut and last_cut+1..L."""
    layers = [*range(first_cut), *range(last_cut, sizes.num_layers)]
    params = sum(sizes.param_bytes[j] for j in layers)
    stash = sum(sizes.act_bytes[j] for j in layers) + sizes.act_bytes[last_cut - 1]
    return 3 * params + stash + RUNTIME_OVERHEAD_BYTES


def peak_memory(plan: Plan, topology, profiles: Mapping[str, Profile]) -> dict[str, int]:
    """Predicted peak bytes per peer of the plan (compute nodes and owners)."""
    sizes = model_sizes(topology, profiles).at_batch(topology.training.batch_size)
    k = len(plan.owners)
    out = {s.node: node_memory(sizes, s.first, s.last, k) for s in plan.chain}
    for owner in plan.owners:
        out[owner] = owner_memory(sizes, plan.owner_first[1], plan.owner_last[0] - 1)
    return dict(sorted(out.items()))
