"""The round end in the cost model: aggregation, checkpoints, replicas and evaluation (see
p2psl.planning.costmodel, which explains the model). Pure: no torch, no sockets."""

from __future__ import annotations

import math
from collections.abc import Mapping

from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile

from p2psl.planning.pipeline import AVERAGE_BYTES_PER_SECOND, CHECKPOINT_BYTES_PER_SECOND, NONE, Overheads, hops_of, route_time, model_sizes


# -- aggregation and evaluation ------------------------------------------------------------------

#: the smallest chunk the owners' all-reduce cuts their parts into ([Note: fewer reducers for small
#: parts] in p2psl.learning.allreduce): below it a message's fixed cost outweighs its bytes
MIN_CHUNK_BYTES = 64 * 1024


def reducer_count(nbytes: float, k: int, min_chunk: int = MIN_CHUNK_BYTES) -> int:
    """How many of K owners reduce a chunk of parts of `nbytes`: every one while the chunks are
    at least `min_chunk`, else as many as the parts hold such chunks (at least one)."""
    return max(1, min(k, int(nbytes // min_chunk)))


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
            route = hops_of(topology, k, other)
            hop_latency = 0.0
            for u, v in zip(route, route[1:]):
                link = topology.link(u, v)
                if link.bandwidth is not None:
                    busy[(u, v)] = busy.get((u, v), 0.0) + nbytes / link.bandwidth + overheads.send
                hop_latency += link.latency + overheads.receive
            latency = max(latency, hop_latency)
    return max(busy.values(), default=0.0) + latency


def aggregation_seconds(plan: Plan, topology, profiles: Mapping[str, Profile]) -> float:
    """FedAvg at the end of a round as the paper's model counts it: the owners' all-reduce (two
    all-to-all exchanges of a chunk of their parts, and averaging one chunk of every owner), or
    the slowest compute node's averaging (0 when K = 1)."""
    k = len(plan.owners)
    if k <= 1:
        return 0.0
    sizes = model_sizes(topology, profiles)
    w0 = owner_param_bytes(plan, sizes)
    r = reducer_count(w0, k)
    owners = 2 * exchange_seconds(topology, list(plan.owners), w0 / r) + k * w0 / r / AVERAGE_BYTES_PER_SECOND
    nodes = [len(plan.owners_of(s.node)) * sum(sizes.param_bytes[j] for j in s.layers) / AVERAGE_BYTES_PER_SECOND
             for s in plan.chain]
    return max([owners, *nodes])


def message_seconds(topology, src: str, dst: str, nbytes: float, overheads: Overheads) -> float:
    """One message of nbytes from src to dst through an idle network."""
    return route_time(topology, src, dst, nbytes, "", {}, overheads)


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
        route = hops_of(topology, at, dst)
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
    of the last compute node's replica): the owners' notices, then every peer's cut, then the
    owners' all-reduce (their chunks to the reducers, the averaged chunks back), through the
    links as `deliver` moves them; then the owners' and compute nodes' work."""
    sizes, owners = model_sizes(topology, profiles), sorted(plan.owners)
    peers = sorted({*owners, *plan.nodes})
    w0, k = owner_param_bytes(plan, sizes), len(owners)
    busy: dict = {}
    start = overheads.task + overheads.dispatch
    done = deliver(topology, {o: (start, [(p, 0) for p in peers if p != o]) for o in owners}, overheads, busy)
    ready = {p: max([done.get((o, p), 0.0) for o in owners if o != p] or [0.0]) for p in peers}
    cuts = deliver(topology, {p: (ready[p], [(q, 0) for q in peers if q != p]) for p in peers}, overheads, busy)
    cut = {p: max([ready[p], *(cuts.get((q, p), 0.0) for q in peers if q != p)]) for p in peers}
    have = _all_reduce(topology, owners, cut, w0, overheads, busy)
    own = [have[o] + _owner_round_end(topology, o, w0, k, overheads) for o in owners]
    nodes = [[cut[s.node] + t for t in _node_round_end(plan, topology, s.node,
                                                       sum(sizes.param_bytes[j] for j in s.layers),
                                                       len(plan.owners_of(s.node)), overheads)] for s in plan.chain]
    return max(own + [ready for ready, _ in nodes]), max(replica for _, replica in nodes)


def _all_reduce(topology, owners: list[str], cut: Mapping[str, float], w0: float, overheads: Overheads,
                busy: dict) -> dict[str, float]:
    """When each owner has every averaged chunk: each owner sends a chunk (W_0 / R) to each of the
    R reducers (`reducer_count`: the first R owners), a reducer averages the K contributions of
    its chunk, and sends the result to every other owner."""
    k = len(owners)
    if k == 1:
        return {o: cut[o] + w0 / AVERAGE_BYTES_PER_SECOND for o in owners}
    reducers = owners[:reducer_count(w0, k)]
    chunk = w0 / len(reducers)
    scatter = deliver(topology, {o: (cut[o], [(j, chunk) for j in reducers if j != o]) for o in owners
                                 if reducers != [o]}, overheads, busy)
    reduced = {o: max([cut[o], *(scatter.get((j, o), 0.0) for j in owners if j != o)])
               + overheads.task + overheads.dispatch + k * chunk / AVERAGE_BYTES_PER_SECOND for o in reducers}
    gather = deliver(topology, {o: (reduced[o], [(j, chunk) for j in owners if j != o]) for o in reducers},
                     overheads, busy)
    return {o: max([reduced.get(o, cut[o]), *(gather.get((j, o), 0.0) for j in reducers if j != o)]) for o in owners}


def _owner_round_end(topology, owner: str, w0: int, k: int, overheads: Overheads) -> float:
    """Assembling the average and loading it, a checkpoint of weights and momentum, a digest
    (work no profile describes, so an emulated slow peer does not stretch it)."""
    work = w0 / AVERAGE_BYTES_PER_SECOND + overheads.checkpoint + 2 * w0 / CHECKPOINT_BYTES_PER_SECOND
    return 4 * (overheads.task + overheads.dispatch) + work


def _node_round_end(plan: Plan, topology, node: str, params: int, k: int,
                    overheads: Overheads) -> tuple[float, float]:
    """(when the node passes evaluation batches, when its replica has arrived): FedAvg of its K
    copies and their checkpoint first; then the replica (weights and momentum), which holds the
    link directions of its route, evaluation's among them."""
    state = 2 * k * params
    ready = 2 * (overheads.task + overheads.dispatch) + (
        k * params / AVERAGE_BYTES_PER_SECOND + overheads.checkpoint + state / CHECKPOINT_BYTES_PER_SECOND)
    ready += _across_chains(plan, topology, node, params, overheads)
    nodes = list(plan.nodes)
    if len(nodes) < 2:
        return ready, ready
    holder = nodes[(nodes.index(node) + 1) % len(nodes)]  # p2psl.runtime.recovery.replica_holder
    route = hops_of(topology, node, holder)
    evaluation = _evaluation_links(plan)
    busy, blocked = overheads.task + overheads.dispatch, 0.0
    for u, v in zip(route, route[1:]):
        link = topology.link(u, v)
        busy += ((state + overheads.header) / link.bandwidth if link.bandwidth else 0.0) + overheads.send
        if (u, v) in evaluation:
            blocked = busy
        busy += link.latency + overheads.receive
    return ready + blocked, ready + busy


def _across_chains(plan: Plan, topology, node: str, params: int, overheads: Overheads) -> float:
    """With several chains ([Note: several chains]): the node's float64 sum of its layers to the
    node of each other chain at its place, one after another, and every chain's sum added up."""
    others = [p for p in plan.peers_at(node) if p != node]
    if not others:
        return 0.0
    sums = 2 * params
    sends = sum(message_seconds(topology, node, p, sums, overheads) for p in others)
    return sends + overheads.task + overheads.dispatch + plan.chains * sums / AVERAGE_BYTES_PER_SECOND


def _evaluation_links(plan: Plan) -> set[tuple[str, str]]:
    """Link directions between neighbours on the evaluation batches' way (owner → chain → owner)."""
    out = set()
    for k in plan.owners:
        hops = [k, *(s.node for s in plan.path(k)), k]
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
