"""Predicted period, round time and peak memory of a plan. Pure: no torch, no sockets.

Notation (per batch of the training batch size B; profiles already carry each peer's speed):

    K owners k, each with β_k = local_epochs · ⌈n_k / B⌉ batches per round (active if β_k ≥ 1)
    part 0 = layers 1..a and part N+1 = layers b+1..L on every owner; chain i_1 … i_N in between
    t_p(j) = fwd + bwd + opt of layer j on peer p      x_s = output bytes of the last layer of part s
    f, b, o = forward, backward and optimizer seconds of a part on its holder

Runtime overheads (`Overheads`; `MEASURED` holds this runtime's, measured on the 2-core machine
of SPEC §10 by tools/bench/costmodel.py): a torch task costs τ_p = τ / speed_p + τ_d beyond its
layers' profile (Python around the layers, which an emulated slow peer stretches like the
layers, and the hand-off to the torch thread); a message costs σ on the sending side of each hop
(encoding, MAC, waking the sender: it holds the link like its bytes do), ρ on the receiving side
(decoding, routing, queueing the task), and carries h header bytes besides its tensor.

Resources. A compute node serves one task at a time, so its *occupancy* per owner batch is
occ_i = Σ_{j ∈ S_i} t_i(j) + 3·τ_i (it cannot run Alice's forward and Bob's backward at once). A
link direction u→v with bandwidth bw is busy (x + h) / bw + σ for each message of x bytes that
crosses it: the activation x_s forward and its gradient (same size) backward. Traffic between
peers that are not neighbours follows `Topology.route` and loads every hop. A link without
bandwidth is no resource (its latency still lengthens the cycle); every link of a topology
without [[link]] tables is free. ℓ_{r,k} is resource r's busy time for one batch of owner k.

Cycle. An owner has one batch in flight, so its batches are spaced at least by its cycle, the
critical path of one batch through an empty pipeline:

    c_k = f_k(0) + Σ_i f_i + f_k(N+1) + b_k(N+1) + Σ_i b_i + b_k(0) + o_k(0)
          + 4·τ_k + 2·Σ_i τ_i + Σ_transfers Σ_hops ((x + h) / bw + latency + σ + ρ)

The compute nodes' optimizer steps and the owner's step of part N+1 are not on it: each runs
while the gradient travels on. Latency lengthens the cycle but occupies nothing.

Period. In steady state every active owner completes one batch per period P. Each resource must
serve one batch of every owner per period, and no owner can beat its own cycle:

    P(A) = max( max_r Σ_{k ∈ A} ℓ_{r,k} ,  max_{k ∈ A} c_k )

The first term is the compute- or link-bound regime (K large: P = K · max_i occ_i when the links
are free), the second the owner-bound regime (few or slow owners: P = c_k). Both are lower
bounds; a closed cyclic pipeline with steady service times attains them (measured within a few
per cent on rate-capped links, tools/bench/costmodel.py), so no queueing term is added: mean
value analysis, which assumes exponential service, overestimates the period there by 10–40 %.

Round. All owners start together. The first batches finish after the slowest cycle plus the
queueing of the other owners' first batches behind the bottleneck, and that stagger persists to
the last round:

    fill  = max_k c_k          drain = max_r ( Σ_k ℓ_{r,k} − max_k ℓ_{r,k} )   (= (K−1)·occ_i)
    train = fill + drain + Σ_m (β_(m) − β_(m−1)) · P(A_m)

where β_(1) < β_(2) < … are the distinct batch counts, β_(0) = 1 (the first batch is the fill)
and A_m = {k : β_k ≥ β_(m)}: owners with fewer batches drop out and the rest speed up. With equal
counts this is c + (K−1)·ℓ* + (β−1)·P, which gives β·K·occ + (c − occ) when compute-bound and
β·c + (K−1)·occ when owner-bound.

The round then ends (`round_end_seconds`, from the last training batch to the first evaluation
batch), as the protocol does it ([Note: the cut]): every owner sends its parts (W_0 = parameter
bytes of parts 0 and N+1) to each other owner and then a notice to every peer, one message after
another; each peer, once it has every notice, sends every other its cut; `deliver` moves these
messages through the links as FIFO queues, store-and-forward at relays (so an all-to-all over one
relay costs up to 2(K−1)·W_0 / bw, not (K−1)·W_0 / bw). Then each owner averages K copies of W_0,
loads, checkpoints and fingerprints them; each compute node averages its K copies of W_i and
checkpoints them before it passes an evaluation batch, and sends weights and momentum (2·K·W_i)
to its replica holder, holding the link directions of that route: evaluation waits on those it
shares, and a replica that takes longer than the evaluation still holds its links when the next
round starts (w, `replica_wait_seconds`, every round after the first). Evaluation is the same
closed loop, forward only, at the real evaluation batch size (the test shard in
⌈test samples / eval_batch_size⌉ equal batches).

    round = w + train + round end + evaluation

Against the paper's model (`paper_round_time`, SPEC §5), which predicts a round as start + first
batch + (r·B·K − 1) · (max_i f_i + max_i (b_i + o_i)) + end + aggregation: (1) its steady batch
time adds the slowest forward stage to the slowest backward stage as if they were separate
resources; here the bottleneck resource's whole occupancy counts, a node's forward, backward and
step being one queue; (2) it ignores transfers between compute nodes and, in the steady state,
all transfers; here every link direction is a resource and every hop is on the cycle; (3) it has
no owner-bound regime; here P ≥ c_k; (4) its fill and drain are one batch; here the other
owners' first batches queue behind the first, and owners with fewer batches drop out; (5) it
knows no runtime overheads and counts aggregation as averaging only; here the round end is the
protocol's messages through the links, plus evaluation.

What the planner optimises is this closed loop without the runtime overheads and with every
optimizer step on the cycle (`workload` without `overheads`): SPEC §5's formulas, linear in the
plan's choices; the overheads are nearly the same for every split of one chain. `predict`
reports that bound as `period_seconds` and the full model as `expected_period_seconds` and
`round_seconds`.

Memory (`peak_memory`). A compute node holds K copies of weights and SGD momentum but one set
of gradients: the runtime steps an owner's copy right after its backward pass and frees the
gradients, before any other task runs (roles/compute.py), so training takes (2K + 1) × parameter
bytes, not the 3K of a node that kept every copy's gradients. Per owner batch in flight at it, a
node also holds the activations its layers save for backward (their outputs plus the received
input); in the worst case all K owners are in flight there. When a neighbour keeps its replica
(two or more compute nodes), a snapshot travels there while the next round trains: the weights,
which FedAvg made the same in every copy, once, and every copy's momentum ((K + 1) × parameter
bytes), so the node's peak is (3K + 2) × parameter bytes plus the stash. Not counted: the replica this node keeps for its predecessor, which it
decodes whole before writing it (2K × the predecessor's parameter bytes, briefly). An owner holds
weights, gradients and momentum of parts 0 and N+1 and one batch's activations, and at the round
end the K shares FedAvg reads (its own snapshot among them): (K + 3) × parameter bytes plus the
stash, a sum of both phases that keeps the planner's constraint linear. Both add
`RUNTIME_OVERHEAD_BYTES` for the interpreter, torch and buffers.

Activation and parameter sizes are properties of the model: they are read from the profile of
the peer whose name sorts first, so every peer computes the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping

from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile

#: rate of averaging K copies of parameters in memory (read K, write one), bytes per second
AVERAGE_BYTES_PER_SECOND = 1e9
#: rate of writing a checkpoint (the codec's frames, fsynced), bytes per second
CHECKPOINT_BYTES_PER_SECOND = 7e8
#: per-process memory that is not weights or activations: a peer's idle RSS (Python, torch and
#: the runtime loaded and warmed up: ~350 MiB with the CPU build of torch 2.13) and its buffers
RUNTIME_OVERHEAD_BYTES = 384 * 2**20


@dataclass(frozen=True)
class Overheads:
    """What the runtime adds to each task and message, beyond any profile (seconds).

    `task` (τ) is Python around a task's layers, stretched by an emulated slow peer like the
    layers; `dispatch` (τ_d) hands the task to the torch thread and back; `send` (σ) and
    `receive` (ρ) are a message's cost on each side of one hop; `header` the bytes a message
    adds to its tensor on the wire (CBOR header, MAC); `checkpoint` the fixed cost of writing
    one checkpoint file (create, fsync, rename)."""

    task: float = 0.0
    dispatch: float = 0.0
    send: float = 0.0
    receive: float = 0.0
    header: int = 0
    checkpoint: float = 0.0


NONE = Overheads()
#: measured on the 2-core machine of SPEC §10 (tools/bench/costmodel.py, its calibration run)
MEASURED = Overheads(task=2.2e-4, dispatch=1.6e-4, send=8.8e-4, receive=7.5e-4, header=128, checkpoint=5e-4)


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


def task_seconds(topology, peer: str, overheads: Overheads) -> float:
    """τ_p: the runtime's fixed cost of one torch task on `peer` (see `Overheads`)."""
    return overheads.task / topology.peer(peer).speed + overheads.dispatch


def workload(plan: Plan, topology, profiles: Mapping[str, Profile], forward_only: bool = False,
             overheads: Overheads | None = None) -> Workload:
    """ℓ_{r,k} and c_k of every owner of the plan, for one batch at the profiles' batch size.

    Without `overheads`, the planner's model: no runtime costs, and the cycle charges every
    optimizer step. With them, the module docstring's: task and message overheads, and the
    cycle is the batch's critical path."""
    exact = overheads is not None
    overheads = overheads or NONE
    sizes = model_sizes(topology, profiles)
    tasks = 1 if forward_only else 3
    cost = (lambda p, j: p.fwd[j]) if forward_only else (lambda p, j: p.total(j))
    node_time = {s.node: sum(cost(profiles[s.node], j) for j in s.layers)
                 + (tasks * task_seconds(topology, s.node, overheads) if exact else 0.0) for s in plan.chain}
    loads: dict[str, dict[str, float]] = {}
    cycles = {}
    for k in plan.owners:
        for node, t in node_time.items():
            loads.setdefault(node, {})[k] = t
        if exact:
            cycle = critical_compute(plan, topology, profiles, k, forward_only, overheads)
        else:
            layers = [*plan.part_layers(0), *plan.part_layers(plan.num_parts - 1)]
            cycle = sum(cost(profiles[k], j) for j in layers) + sum(node_time.values())
        for src, dst, nbytes in _transfers(plan, k, sizes, forward_only):
            cycle += _route_time(topology, src, dst, nbytes, k, loads, overheads)
        cycles[k] = cycle
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


def _route(topology, src: str, dst: str) -> list[str]:
    """`Topology.route`, short-cut for neighbours: a direct link is the only shortest path (and
    asking the topology computes every route at once, which large deployments pay for)."""
    return [src, dst] if topology.graph.has_edge(src, dst) else topology.route(src, dst)


def _route_time(topology, src: str, dst: str, nbytes: float, owner: str, loads: dict,
                overheads: Overheads = NONE) -> float:
    """Seconds to move nbytes src → dst hop by hop; adds each hop's busy time to `loads`."""
    seconds = 0.0
    route = _route(topology, src, dst)
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


# -- aggregation and evaluation ------------------------------------------------------------------

def owner_param_bytes(plan: Plan, sizes: Profile) -> int:
    """W_0: parameter bytes of parts 0 and N+1, what owners exchange at the end of a round."""
    layers = [*plan.part_layers(0), *plan.part_layers(plan.num_parts - 1)]
    return sum(sizes.param_bytes[j] for j in layers)


def exchange_seconds(topology, owners: list[str], nbytes: float, overheads: Overheads = NONE) -> float:
    """All-to-all exchange of nbytes between owners: busiest link direction plus longest route's
    latency (and per-hop message costs)."""
    busy: dict[tuple[str, str], float] = {}
    latency = 0.0
    for k in owners:
        for other in owners:
            if other == k:
                continue
            route = _route(topology, k, other)
            hop_latency = 0.0
            for u, v in zip(route, route[1:]):
                link = topology.link(u, v)
                if link.bandwidth is not None:
                    busy[(u, v)] = busy.get((u, v), 0.0) + nbytes / link.bandwidth + overheads.send
                hop_latency += link.latency + overheads.receive
            latency = max(latency, hop_latency)
    return max(busy.values(), default=0.0) + latency


def aggregation_seconds(plan: Plan, topology, profiles: Mapping[str, Profile]) -> float:
    """FedAvg at the end of a round as the paper's model counts it: the owners' exchange and
    averaging, or the slowest compute node's averaging (0 when K = 1)."""
    k = len(plan.owners)
    if k <= 1:
        return 0.0
    sizes = model_sizes(topology, profiles)
    w0 = owner_param_bytes(plan, sizes)
    owners = exchange_seconds(topology, list(plan.owners), w0) + k * w0 / AVERAGE_BYTES_PER_SECOND
    nodes = [k * sum(sizes.param_bytes[j] for j in s.layers) / AVERAGE_BYTES_PER_SECOND for s in plan.chain]
    return max([owners, *nodes])


def message_seconds(topology, src: str, dst: str, nbytes: float, overheads: Overheads) -> float:
    """One message of nbytes from src to dst through an idle network."""
    return _route_time(topology, src, dst, nbytes, "", {}, overheads)


def deliver(topology, sends: Mapping[str, tuple[float, list[tuple[str, float]]]], overheads: Overheads,
            busy: dict | None = None) -> dict[tuple[str, str], float]:
    """When each message arrives: `sends` maps a sender to (when it starts, [(receiver, bytes)…]),
    sent one after another as a peer awaits each send (the next starts when the previous has
    left its first hop). Every link direction is a FIFO queue, store-and-forward at relays.
    `busy` (link direction → free from) carries queued traffic from one call to the next.
    Returns (sender, receiver) → arrival time of that sender's last message to that receiver."""
    import heapq

    busy = {} if busy is None else busy
    events, order, out = [], 0, {}
    for src, (start, messages) in sorted(sends.items()):
        heapq.heappush(events, (start, order, src, src, 0, messages))
        order += 1
    while events:
        t, _, src, at, index, messages = heapq.heappop(events)
        dst, nbytes = messages[index]
        route = _route(topology, at, dst)
        link = topology.link(at, route[1])
        begin = max(t, busy.get((at, route[1]), 0.0))
        left = begin + overheads.send + ((nbytes + overheads.header) / link.bandwidth if link.bandwidth else 0.0)
        if link.bandwidth:
            busy[(at, route[1])] = left
        arrive = left + link.latency + overheads.receive
        if route[1] == dst:
            out[(src, dst)] = arrive
        else:  # relayed: the next hop as a message of its own
            heapq.heappush(events, (arrive, order, src, route[1], 0, [(dst, nbytes)]))
            order += 1
        if at == src and index + 1 < len(messages):
            heapq.heappush(events, (left, order, src, src, index + 1, messages))
        order += 1
    return out


def round_end_seconds(plan: Plan, topology, profiles: Mapping[str, Profile], overheads: Overheads) -> float:
    """From the last training batch to the first evaluation batch (module docstring, "Round")."""
    return round_end(plan, topology, profiles, overheads)[0]


def round_end(plan: Plan, topology, profiles: Mapping[str, Profile], overheads: Overheads) -> tuple[float, float]:
    """(seconds from the last training batch to the first evaluation batch, and to the arrival
    of the last compute node's replica): the owners' parts and notices, then every peer's cut,
    through the links as `deliver` moves them; then the owners' and compute nodes' work."""
    sizes, owners = model_sizes(topology, profiles), sorted(plan.owners)
    peers = sorted({*owners, *plan.nodes})
    w0 = owner_param_bytes(plan, sizes)
    busy: dict = {}
    shares = {o: (overheads.task + overheads.dispatch,
                  [(j, w0) for j in owners if j != o] + [(p, 0) for p in peers if p != o]) for o in owners}
    done = deliver(topology, shares, overheads, busy)
    ready = {p: max([done.get((o, p), 0.0) for o in owners if o != p] or [0.0]) for p in peers}
    cuts = deliver(topology, {p: (ready[p], [(q, 0) for q in peers if q != p]) for p in peers}, overheads, busy)
    cut = {p: max([ready[p], *(cuts.get((q, p), 0.0) for q in peers if q != p)]) for p in peers}
    own = [cut[o] + _owner_round_end(topology, o, w0, len(owners), overheads) for o in owners]
    nodes = [[cut[s.node] + t for t in _node_round_end(plan, topology, s.node,
                                                       sum(sizes.param_bytes[j] for j in s.layers),
                                                       len(owners), overheads)] for s in plan.chain]
    return max(own + [ready for ready, _ in nodes]), max(replica for _, replica in nodes)


def _owner_round_end(topology, owner: str, w0: int, k: int, overheads: Overheads) -> float:
    """FedAvg of K copies of W_0, loading it, a checkpoint of weights and momentum, a digest (work
    no profile describes, so an emulated slow peer does not stretch it)."""
    work = k * w0 / AVERAGE_BYTES_PER_SECOND + overheads.checkpoint + 2 * w0 / CHECKPOINT_BYTES_PER_SECOND
    return 4 * (overheads.task + overheads.dispatch) + work


def _node_round_end(plan: Plan, topology, node: str, params: int, k: int,
                    overheads: Overheads) -> tuple[float, float]:
    """(when the node passes evaluation batches, when its replica has arrived): FedAvg of its K
    copies and their checkpoint first; then the replica (weights and momentum), which holds the
    link directions of its route, evaluation's among them."""
    state = 2 * k * params
    ready = 2 * (overheads.task + overheads.dispatch) + (
        k * params / AVERAGE_BYTES_PER_SECOND + overheads.checkpoint + state / CHECKPOINT_BYTES_PER_SECOND)
    nodes = list(plan.nodes)
    if len(nodes) < 2:
        return ready, ready
    holder = nodes[(nodes.index(node) + 1) % len(nodes)]  # p2psl.runtime.recovery.replica_holder
    route = _route(topology, node, holder)
    evaluation = _evaluation_links(plan)
    busy, blocked = overheads.task + overheads.dispatch, 0.0
    for u, v in zip(route, route[1:]):
        link = topology.link(u, v)
        busy += ((state + overheads.header) / link.bandwidth if link.bandwidth else 0.0) + overheads.send
        if (u, v) in evaluation:
            blocked = busy
        busy += link.latency + overheads.receive
    return ready + blocked, ready + busy


def _evaluation_links(plan: Plan) -> set[tuple[str, str]]:
    """Link directions between neighbours on the evaluation batches' way (owner → chain → owner)."""
    out = set()
    for k in plan.owners:
        hops = [k, *plan.nodes, k]
        out.update(zip(hops, hops[1:]))
    return out


def default_test_samples(samples: Mapping[str, int], test_fraction: float) -> dict[str, int]:
    """Test split sizes when not given: n_k · f / (1 − f), the split that left n_k for training."""
    return {k: int(round(n * test_fraction / (1 - test_fraction))) for k, n in samples.items()}


def evaluation_batch(tests: Mapping[str, int], eval_batch_size: int) -> int:
    """The size of the evaluation batches: the largest test shard split into equal batches."""
    largest = max(tests.values(), default=0)
    if largest <= 0:
        return eval_batch_size
    return math.ceil(largest / math.ceil(largest / eval_batch_size))


# -- predictions ---------------------------------------------------------------------------------

def at_batch(profiles: Mapping[str, Profile], batch_size: int) -> dict[str, Profile]:
    return {name: p.at_batch(batch_size) for name, p in profiles.items()}


def training_loop(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                  work: Workload | None = None) -> ClosedLoop:
    """The training part of a round as the planner optimises it (no runtime overheads)."""
    cfg = topology.training
    work = work or workload(plan, topology, at_batch(profiles, cfg.batch_size))
    return closed_loop(work, _batches(plan, topology, samples))


def _batches(plan: Plan, topology, samples: Mapping[str, int]) -> dict[str, int]:
    cfg = topology.training
    return batches_per_owner({k: samples.get(k, 0) for k in plan.owners}, cfg.batch_size, cfg.local_epochs)


def predict(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
            test_samples: Mapping[str, int] | None = None, overheads: Overheads = MEASURED) -> Prediction:
    """Period, round time and its parts for `plan` (see the module docstring)."""
    cfg = topology.training
    bound = training_loop(plan, topology, profiles, samples)
    work = workload(plan, topology, at_batch(profiles, cfg.batch_size), overheads=overheads)
    train = closed_loop(work, _batches(plan, topology, samples))
    tests = test_samples if test_samples is not None else default_test_samples(samples, cfg.test_fraction)
    size = evaluation_batch({k: tests.get(k, 0) for k in plan.owners}, cfg.eval_batch_size)
    evaluation = closed_loop(
        workload(plan, topology, at_batch(profiles, size), forward_only=True, overheads=overheads),
        batches_per_owner({k: tests.get(k, 0) for k in plan.owners}, cfg.eval_batch_size),
    )
    end, replicas = round_end(plan, topology, at_batch(profiles, cfg.batch_size), overheads)
    carry = max(0.0, replicas - end - evaluation.seconds)
    return Prediction(
        period_seconds=bound.period,
        round_seconds=carry + train.seconds + end + evaluation.seconds,
        training_seconds=train.seconds,
        fill_seconds=train.fill,
        drain_seconds=train.drain,
        aggregation_seconds=end,
        evaluation_seconds=evaluation.seconds,
        bottleneck=train.bottleneck,
        occupancy={r: max(v.values()) for r, v in sorted(work.loads.items())},
        cycles=dict(sorted(work.cycles.items())),
        batches=_batches(plan, topology, samples),
        expected_period_seconds=train.period,
        replica_wait_seconds=carry,
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

def node_state_bytes(params, copies: int, replica: bool = False):
    """Weights and momentum of every copy plus one copy's gradients, and with `replica` (a
    neighbour keeps this node's replica) the snapshot that travels there while the next round
    trains: the copies' common weights once and every copy's momentum (module docstring, Memory).
    Works on ints and on numpy arrays of parameter bytes alike."""
    return (2 * copies + 1 + (copies + 1 if replica else 0)) * params


def owner_state_bytes(params, copies: int, round_end: bool = True):
    """An owner's weights, gradients and momentum; with `round_end` also the K shares FedAvg
    reads (its own snapshot among them)."""
    return (copies + 3 if round_end else 3) * params


def node_memory(sizes: Profile, first: int, last: int, copies: int, replica: bool = False) -> int:
    """Peak bytes of a compute node holding layers first..last (1-based) for `copies` owners."""
    layers = range(first - 1, last)
    params = sum(sizes.param_bytes[j] for j in layers)
    stash = sum(sizes.act_bytes[j] for j in layers) + (sizes.act_bytes[first - 2] if first > 1 else 0)
    return node_state_bytes(params, copies, replica) + copies * stash + RUNTIME_OVERHEAD_BYTES


def owner_memory(sizes: Profile, first_cut: int, last_cut: int, copies: int, round_end: bool = True) -> int:
    """Peak bytes of a data owner holding layers 1..first_cut and last_cut+1..L among `copies`
    owners."""
    layers = [*range(first_cut), *range(last_cut, sizes.num_layers)]
    params = sum(sizes.param_bytes[j] for j in layers)
    stash = sum(sizes.act_bytes[j] for j in layers) + sizes.act_bytes[last_cut - 1]
    return owner_state_bytes(params, copies, round_end) + stash + RUNTIME_OVERHEAD_BYTES


def peak_memory(plan: Plan, topology, profiles: Mapping[str, Profile], round_end: bool = True) -> dict[str, int]:
    """Predicted peak bytes per peer of the plan (compute nodes and owners); `round_end=False`
    gives the training part of a round alone (no FedAvg shares, no replica in flight)."""
    sizes = model_sizes(topology, profiles).at_batch(topology.training.batch_size)
    k, replica = len(plan.owners), round_end and len(plan.chain) > 1
    out = {s.node: node_memory(sizes, s.first, s.last, k, replica) for s in plan.chain}
    for owner in plan.owners:
        out[owner] = owner_memory(sizes, plan.owner_first[1], plan.owner_last[0] - 1, k, round_end)
    return dict(sorted(out.items()))
