"""The pipeline part of the cost model: a round's batches as a closed loop over compute nodes
and links (see p2psl.planning.costmodel, which explains the model). Pure: no torch, no sockets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from collections.abc import Mapping

from p2psl.planning.hosts import HostCharges, stagger
from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile

#: rate of averaging K copies of parameters in memory (read K, write one), bytes per second
AVERAGE_BYTES_PER_SECOND = 1e9
#: rate of writing a checkpoint (the codec's frames, fsynced), bytes per second
CHECKPOINT_BYTES_PER_SECOND = 7e8


@dataclass(frozen=True)
class Overheads:
    """What the runtime adds to each task and message, beyond any profile (seconds).

    `task` (τ) is Python around a task's layers, stretched by an emulated slow peer like the
    layers; `dispatch` (τ_d) hands the task to the torch thread and back; `send` (σ) and
    `receive` (ρ) are a message's cost on each side of one hop; `header` the bytes a message
    adds to its tensor on the wire (CBOR header, MAC); `checkpoint` the fixed cost of writing
    one checkpoint file (create, fsync, rename). `send_cpu` and `receive_cpu` are the part of
    `send` and `receive` that keeps a core busy (the rest is waking up and waiting), which is
    what a message costs the machine its peers share ([Note: shared machines]); `task_cpu` is
    the same for a task (the Python around its layers: a small task runs on the event loop and
    hands nothing to a thread, [Note: small tasks on the loop] in p2psl.runtime.worker)."""

    task: float = 0.0
    dispatch: float = 0.0
    send: float = 0.0
    receive: float = 0.0
    header: int = 0
    checkpoint: float = 0.0
    send_cpu: float = 0.0
    receive_cpu: float = 0.0
    task_cpu: float = 0.0



NONE = Overheads()
#: measured on the 2-core machine of SPEC §10 (tools/bench/costmodel.py, its calibration run); the
#: CPU parts fitted to the rounds of `p2psl run` of topologies/ring.toml and many_owners.toml and
#: of the digits CNN with 4 owners and 2 compute nodes in 2 chains there (tools/bench/fedavg.py's
#: deployment): 0.3 ms a message at each end, about 2.4 times its cost between two idle peers
#: (a ping-pong), as six to nineteen processes take turns on two cores
MEASURED = Overheads(task=2.2e-4, dispatch=1.6e-4, send=8.8e-4, receive=7.5e-4, header=128, checkpoint=5e-4,
                     send_cpu=3e-4, receive_cpu=3e-4, task_cpu=1.3e-4)
#: every peer in one process (`p2psl run --in-process`): a message between two peers of the
#: process costs it about 0.4 × the CPU it costs two processes (no process to wake, one event loop
#: serving both ends), fitted to the rounds of topologies/hundred_owners.toml in one process on
#: the same machine (14.0–14.4 s, tools/bench/bundled.py, 2026-12-04)
IN_ONE_PROCESS = replace(MEASURED, send_cpu=1.25e-4, receive_cpu=1.25e-4)


def overheads_of(topology) -> Overheads:
    """The runtime's overheads for how the deployment runs: `IN_ONE_PROCESS` or `MEASURED`."""
    return IN_ONE_PROCESS if topology.one_process else MEASURED


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
    """What the cost model expects of a plan; `occupancy` is seconds per owner batch.

    `period_seconds` is the planner's bound (no runtime overheads), `expected_period_seconds`
    the full model's period; the round and its parts are the full model's, `replica_wait_seconds`
    the part of a round spent waiting for the previous round's replicas to leave a link."""

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
    expected_period_seconds: float = 0.0
    replica_wait_seconds: float = 0.0


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
    drain = max([stagger(r, work.loads[r], active) for r in work.loads] or [0.0])
    seconds, previous = fill + drain, 1
    for level in sorted({batches[k] for k in active}):
        members = [k for k in active if batches[k] >= level]
        seconds += (level - previous) * period_of(work, members)[0]
        previous = level
    period, bottleneck = period_of(work, active)
    loads = {r: sum(work.loads[r].get(k, 0.0) for k in active) for r in work.loads}
    return ClosedLoop(period, fill, drain, seconds, bottleneck, loads)


# -- building the workload of a plan -------------------------------------------------------------

def model_sizes(topology, profiles: Mapping[str, Profile]) -> Profile:
    """The profile whose activation and parameter sizes stand for the model's (first name)."""
    return profiles[min(p.name for p in topology.peers)]


def task_seconds(topology, peer: str, overheads: Overheads) -> float:
    """τ_p: the runtime's fixed cost of one torch task on `peer` (see `Overheads`). Only a padded
    peer hands its tasks to the torch thread and back ([Note: emulated speed]); another runs a
    task as small as a profiled layer's on the event loop ([Note: small tasks on the loop]). The
    model leaves out the hand-offs an unpadded peer still makes (a kind's first task, one over
    `INLINE_SECONDS`, one queued behind a task on the thread): rare, or small beside the task."""
    return overheads.task / topology.peer(peer).speed + _hand_off(topology, peer, overheads)


def task_cpu_seconds(topology, peer: str, overheads: Overheads) -> float:
    """What one torch task on `peer` costs its machine's cores beyond its layers: the Python
    around them, and a padded peer's hand-off to its thread (`task_seconds`)."""
    return overheads.task_cpu + _hand_off(topology, peer, overheads)


def _hand_off(topology, peer: str, overheads: Overheads) -> float:
    return overheads.dispatch if topology.peer(peer).speed < 1 else 0.0


def workload(plan: Plan, topology, profiles: Mapping[str, Profile], forward_only: bool = False,
             overheads: Overheads | None = None) -> Workload:
    """ℓ_{r,k} and c_k of every owner of the plan, for one batch at the profiles' batch size.

    Without `overheads`, the planner's model: no runtime costs, and the cycle charges every
    optimizer step. With them, the module docstring's: task and message overheads, and the
    cycle is the batch's critical path."""
    if plan.chains > 1:  # [Note: several chains]: each chain's owners load their chain's resources
        return _merged([workload(plan.lane(c), topology, profiles, forward_only, overheads)
                        for c in range(plan.chains)])
    exact = overheads is not None
    overheads = overheads or NONE
    sizes = model_sizes(topology, profiles)
    tasks = 1 if forward_only else 3
    cost = (lambda p, j: p.fwd[j]) if forward_only else (lambda p, j: p.total(j))
    compute = {s.node: sum(cost(profiles[s.node], j) for j in s.layers) for s in plan.chain}
    node_time = {node: t + (tasks * task_seconds(topology, node, overheads) if exact else 0.0)
                 for node, t in compute.items()}
    loads: dict[str, dict[str, float]] = {}
    cycles = {}
    hosts = HostCharges(topology, profiles)  # [Note: shared machines]
    layers = [*plan.part_layers(0), *plan.part_layers(plan.num_parts - 1)]
    # an owner runs 5 tasks a training batch (2 steps) and 2 an evaluation batch; 4 and 2 on the cycle
    own_tasks = 2 if forward_only else 5
    for k in plan.owners:
        own = sum(cost(profiles[k], j) for j in layers)
        for node, t in node_time.items():
            loads.setdefault(node, {})[k] = t
            hosts.charge(loads, k, node, compute[node])
            if exact:
                hosts.charge(loads, k, node, tasks * task_cpu_seconds(topology, node, overheads), tasks=False)
        if exact:
            cycle = critical_compute(plan, topology, profiles, k, forward_only, overheads)
            hosts.charge(loads, k, k, own_tasks * task_cpu_seconds(topology, k, overheads), tasks=False)
        else:
            cycle = own + sum(node_time.values())
        hosts.charge(loads, k, k, own)
        for src, dst, nbytes in _transfers(plan, k, sizes, forward_only):
            cycle += route_time(topology, src, dst, nbytes, k, loads, overheads)
            if hosts and exact:
                hosts.hops(loads, k, hops_of(topology, src, dst), overheads.send_cpu, overheads.receive_cpu)
        cycles[k] = cycle
    return Workload(loads, cycles)


def _merged(works: list[Workload]) -> Workload:
    """The workloads of disjoint owners as one: a resource that several chains use (a link, a
    shared machine) serves the owners of all of them."""
    loads: dict[str, dict[str, float]] = {}
    cycles: dict[str, float] = {}
    for work in works:
        for resource, by_owner in work.loads.items():
            loads.setdefault(resource, {}).update(by_owner)
        cycles.update(work.cycles)
    return Workload(loads, cycles)


def critical_compute(plan: Plan, topology, profiles: Mapping[str, Profile], owner: str, forward_only: bool,
                     overheads: Overheads) -> float:
    """The compute on one batch's critical path (module docstring, "Cycle"): every stage's
    forward, then (training) every backward and part 0's optimizer step, with their task costs."""
    mine, last = profiles[owner], plan.num_parts - 1

    def part(profile: Profile, layers, kind: str) -> float:
        return sum(getattr(profile, kind)[j] for j in layers)

    seconds = part(mine, plan.part_layers(0), "fwd") + part(mine, plan.part_layers(last), "fwd")
    seconds += sum(part(profiles[s.node], s.layers, "fwd") for s in plan.chain)
    tasks = {owner: 2, **{s.node: 1 for s in plan.chain}}
    if not forward_only:
        seconds += part(mine, plan.part_layers(last), "bwd") + part(mine, plan.part_layers(0), "bwd")
        seconds += part(mine, plan.part_layers(0), "opt")
        seconds += sum(part(profiles[s.node], s.layers, "bwd") for s in plan.chain)
        tasks = {owner: 4, **{s.node: 2 for s in plan.chain}}
    return seconds + sum(n * task_seconds(topology, p, overheads) for p, n in tasks.items())


def _transfers(plan: Plan, owner: str, sizes: Profile, forward_only: bool) -> list[tuple[str, str, int]]:
    """(src, dst, bytes) of one batch: activations forward, then gradients backward."""
    hops = [owner, *plan.nodes, owner]
    cuts = [plan.owner_first[1]] + [s.last for s in plan.chain]
    forward = [(hops[i], hops[i + 1], sizes.act_bytes[c - 1]) for i, c in enumerate(cuts)]
    backward = [(dst, src, n) for src, dst, n in reversed(forward)]
    return forward if forward_only else forward + backward


def hops_of(topology, src: str, dst: str) -> list[str]:
    """`Topology.route`, short-cut for neighbours: a direct link is the only shortest path (and
    asking the topology computes every route at once, which large deployments pay for)."""
    return [src, dst] if topology.graph.has_edge(src, dst) else topology.route(src, dst)


def route_time(topology, src: str, dst: str, nbytes: float, owner: str, loads: dict,
                overheads: Overheads = NONE) -> float:
    """Seconds to move nbytes src → dst hop by hop; adds each hop's busy time to `loads`."""
    seconds = 0.0
    route = hops_of(topology, src, dst)
    for u, v in zip(route, route[1:]):
        link = topology.link(u, v)
        if link.bandwidth is not None:
            busy = (nbytes + overheads.header) / link.bandwidth + overheads.send
            per_owner = loads.setdefault(f"{u}→{v}", {})
            per_owner[owner] = per_owner.get(owner, 0.0) + busy
            seconds += busy
        else:
            seconds += overheads.send
        seconds += link.latency + overheads.receive
    return seconds
