"""Predicted period and round time of a plan. Pure: no torch, no sockets.

Notation (per batch of the training batch size B; profiles already carry each peer's speed):

    K owners k, each with β_k = local_epochs · ⌈n_k / B⌉ batches per round (active if β_k ≥ 1)
    part 0 = layers 1..a and part N+1 = layers b+1..L on every owner; chain i_1 … i_N in between
    t_p(j) = fwd + bwd + opt of layer j on peer p      x_s = output bytes of the last layer of part s
    f, b, o = forward, backward and optimizer seconds of a part on its holder

Runtime overheads (`Overheads`; `MEASURED` holds this runtime's, measured on the 2-core machine
of SPEC §10 by tools/bench/costmodel.py, and `IN_ONE_PROCESS` its messages' CPU when every peer
runs in one process): a torch task costs τ_p = τ / speed_p + [speed_p < 1]·τ_d beyond its
layers' profile (Python around the layers, which an emulated slow peer stretches like the
layers, and, on such a padded peer only, the hand-off to the torch thread: another peer runs its
small tasks on its event loop); a message costs σ on the sending side of each hop
(encoding, MAC, waking the sender: it holds the link like its bytes do), ρ on the receiving side
(decoding, routing, queueing the task), and carries h header bytes besides its tensor. On a
shared machine a task and a message cost its cores their CPU parts (`task_cpu`, `send_cpu`,
`receive_cpu`).

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

Machines ([Note: shared machines] in p2psl.planning.hosts). Peers that share a machine share its
cores: each such machine is one more resource r of the closed loop, loaded per owner batch by the
CPU seconds its peers spend on that batch over its cores, and its round end (`round_end_cpu`: the
round's messages' CPU) bounds the round end and evaluation together. Calibration
([Note: calibration] in p2psl.planning.calibrate) refits the profiles' speeds and a residual to
the rounds a deployment measures.

What the planner optimises is this closed loop without the runtime overheads and with every
optimizer step on the cycle (`workload` without `overheads`): SPEC §5's formulas, linear in the
plan's choices; the overheads are nearly the same for every split of one chain. A batch cut
into m micro-batches is that loop over micro-batches of B/m samples, pipelined (`pipelined`:
each load m times, the cycle one micro-batch's plus m − 1 times its slowest resource), still
linear, so the planner chooses the cuts for the micro-batches it will run. `predict`
reports that bound as `period_seconds` and the full model as `expected_period_seconds` and
`round_seconds`.

Memory (`peak_memory`) is predicted in p2psl.planning.memory from the same sizes.

Activation and parameter sizes are properties of the model: they are read from the profile of
the peer whose name sorts first, so every peer computes the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from p2psl.planning.memo import Memo, items
from p2psl.planning.hosts import HostCharges
from p2psl.planning.plan import Plan
from p2psl.planning.profile import Profile

from p2psl.planning.pipeline import AVERAGE_BYTES_PER_SECOND, CHECKPOINT_BYTES_PER_SECOND, ClosedLoop, IN_ONE_PROCESS, MEASURED, NONE, Overheads, Prediction, Workload, hops_of, route_time, batches_per_owner, closed_loop, critical_compute, model_sizes, overheads_of, period_of, task_seconds, workload
from p2psl.planning.roundend import aggregation_seconds, default_test_samples, deliver, evaluation_batch, exchange_seconds, message_seconds, owner_param_bytes, reducer_count, round_end, round_end_seconds

__all__ = [  # the cost model's whole interface, wherever each piece lives
    "AVERAGE_BYTES_PER_SECOND",
    "CHECKPOINT_BYTES_PER_SECOND",
    "ClosedLoop",
    "IN_ONE_PROCESS",
    "MEASURED",
    "NONE",
    "Overheads",
    "Prediction",
    "Workload",
    "aggregation_seconds",
    "at_batch",
    "batches_per_owner",
    "closed_loop",
    "critical_compute",
    "default_test_samples",
    "deliver",
    "evaluation_batch",
    "exchange_seconds",
    "message_seconds",
    "micro_batched",
    "micro_count",
    "model_sizes",
    "overheads_of",
    "owner_param_bytes",
    "paper_round_time",
    "period_of",
    "pipelined",
    "predict",
    "round_end",
    "round_end_cpu",
    "round_end_seconds",
    "task_seconds",
    "training_loop",
    "workload",
]


# -- predictions ---------------------------------------------------------------------------------

def at_batch(profiles: Mapping[str, Profile], batch_size: int) -> dict[str, Profile]:
    return {name: p.at_batch(batch_size) for name, p in profiles.items()}


def at_micro_batch(profiles: Mapping[str, Profile], batch_size: int, m: int) -> dict[str, Profile]:
    """The profiles of one of m micro-batches of a batch: its B/m samples' passes and an m-th of
    the optimizer step, which the runtime takes once per batch, so that m micro-batches add up
    to one step."""
    if m == 1:
        return at_batch(profiles, batch_size)
    return {name: replace(p.at_batch(batch_size / m), opt=tuple(o / m for o in p.opt))
            for name, p in profiles.items()}


def training_loop(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                  work: Workload | None = None) -> ClosedLoop:
    """The training part of a round as the planner optimises it (no runtime overheads; a batch
    cut into micro-batches as `micro_batched` pipelines it)."""
    work = work or micro_batched(plan, topology, profiles, None)
    return closed_loop(work, _batches(plan, topology, samples))


def _batches(plan: Plan, topology, samples: Mapping[str, int]) -> dict[str, int]:
    cfg = topology.training
    return batches_per_owner({k: samples.get(k, 0) for k in plan.owners}, cfg.batch_size, cfg.local_epochs)


def predict(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
            test_samples: Mapping[str, int] | None = None, overheads: Overheads | None = None) -> Prediction:
    """Period, round time and its parts for `plan` (see the module docstring); `overheads`
    default to the runtime's for how the deployment runs (`overheads_of`)."""
    overheads = overheads or overheads_of(topology)
    key = (plan, topology, items(profiles), items(samples), items(test_samples), overheads)
    return _PREDICTIONS.get(key, lambda: _predict(plan, topology, profiles, samples, test_samples, overheads))


#: [Note: one answer per process]
_PREDICTIONS = Memo(32)


def _predict(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
             test_samples: Mapping[str, int] | None, overheads: Overheads) -> Prediction:
    cfg = topology.training
    bound = training_loop(plan, topology, profiles, samples)
    work = micro_batched(plan, topology, profiles, overheads)
    train = closed_loop(work, _batches(plan, topology, samples))
    tests = test_samples if test_samples is not None else default_test_samples(samples, cfg.test_fraction)
    size = evaluation_batch({k: tests.get(k, 0) for k in plan.owners}, cfg.eval_batch_size)
    evaluation = closed_loop(
        workload(plan, topology, at_batch(profiles, size), forward_only=True, overheads=overheads),
        batches_per_owner({k: tests.get(k, 0) for k in plan.owners}, cfg.eval_batch_size),
    )
    end, replicas = round_end(plan, topology, at_batch(profiles, cfg.batch_size), overheads)
    end = max(end, round_end_cpu(plan, topology, profiles, overheads) - evaluation.seconds)
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


def micro_batched(plan: Plan, topology, profiles: Mapping[str, Profile], overheads: Overheads | None) -> Workload:
    """A batch's demand when it is cut into m micro-batches ([Note: micro-batches] in
    p2psl.runtime.roles.owner): `pipelined` over the workload of one micro-batch of B/m samples.
    With m = 1 it is `workload` itself; `overheads` as there (None: the planner's model)."""
    cfg = topology.training
    m = micro_count(plan.micro_batches, cfg.batch_size)
    per = workload(plan, topology, at_micro_batch(profiles, cfg.batch_size, m), overheads=overheads)
    return pipelined(per, m)


def micro_count(micro_batches: int, batch_size: int) -> int:
    """How many micro-batches a batch is really cut into: no more than it has samples."""
    return min(micro_batches, batch_size)


def pipelined(per: Workload, m: int) -> Workload:
    """m micro-batches through the resources of one (`per`): each resource serves all m, and the
    batch's cycle is one micro-batch's cycle plus m − 1 times its slowest resource, the
    pipeline's fill and then one micro-batch per bottleneck time. (Each micro-batch carries an
    m-th of the optimizer step, `at_micro_batch`; its task overheads are counted per micro-batch,
    a little pessimistic for the step, which is one task per batch.)"""
    if m == 1:
        return per
    loads = {r: {k: m * v for k, v in by_owner.items()} for r, by_owner in per.loads.items()}
    cycles = {k: c + (m - 1) * max((by_owner.get(k, 0.0) for by_owner in per.loads.values()), default=0.0)
              for k, c in per.cycles.items()}
    return Workload(loads, cycles)


def round_end_cpu(plan: Plan, topology, profiles: Mapping[str, Profile], overheads: Overheads) -> float:
    """The round end's messages on a shared machine ([Note: shared machines]): every chunk of the
    owners' all-reduce (a `reduce_part` from each owner to each reducer, a `reduced_part` back),
    notice, cut and evaluation report, and, where the model is refitted between rounds
    ([Note: calibration]), every peer's task times to every other, costs its sender and receiver
    CPU on their machines, whose cores they share; the busiest machine's seconds bound the round
    end and evaluation together. (The task times leave after the evaluation reports, so their CPU
    is taken from the next round's start: on cores that training keeps busy, the same seconds.)"""
    hosts = HostCharges(topology, profiles)
    if not hosts:
        return 0.0
    owners = sorted(plan.owners)
    peers = sorted({*owners, *plan.nodes})
    reducers = owners[:reducer_count(owner_param_bytes(plan, model_sizes(topology, profiles)), len(owners))]
    pairs = [(o, j) for o in owners for j in reducers if j != o] + [(j, o) for j in reducers for o in owners if o != j]
    pairs += 2 * [(o, p) for o in owners for p in peers if p != o]
    pairs += (2 if topology.training.modelled else 1) * [(p, q) for p in peers for q in peers if p != q]
    pairs += [(i, j) for i in plan.nodes for j in plan.peers_at(i) if j != i]  # [Note: several chains]
    loads: dict = {}
    for src, dst in pairs:
        hosts.hops(loads, "", hops_of(topology, src, dst), overheads.send_cpu, overheads.receive_cpu)
    return max((sum(v.values()) for v in loads.values()), default=0.0)


def paper_round_time(plan: Plan, topology, profiles: Mapping[str, Profile], samples: Mapping[str, int]) -> float:
    """The MP-SL paper's estimate (SPEC §5), for comparison:

        start + first batch + (r·B·K − 1) · (max_i fwd_i + max_i bwd_i) + end + aggregation

    start = mean over owners of part-0 forward + upload to i_1; first batch = every stage's
    forward and backward plus the mean owner's last part and its transfers to and from i_N; end
    = the slowest owner's download from i_1 and part-0 backward; fwd_i / bwd_i are compute only
    (bwd includes the optimizer step) and transfers between compute nodes are ignored.
    """
    if plan.chains > 1:  # the paper has one chain: several run side by side, each as the paper predicts it
        return max(paper_round_time(plan.lane(c), topology, profiles, samples) for c in range(plan.chains))
    cfg = topology.training
    profiles = at_batch(profiles, cfg.batch_size)
    sizes = model_sizes(topology, profiles)
    owners = list(plan.owners)
    first, last = plan.owner_first[1], plan.owner_last[0] - 1
    fwd = [sum(profiles[s.node].fwd[j] for j in s.layers) for s in plan.chain]
    bwd = [sum(profiles[s.node].total(j) - profiles[s.node].fwd[j] for j in s.layers) for s in plan.chain]
    head, tail = plan.nodes[0], plan.nodes[-1]

    def send(src: str, dst: str, j: int) -> float:
        return route_time(topology, src, dst, sizes.act_bytes[j - 1], "", {})

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
