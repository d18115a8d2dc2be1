"""What every planning method agrees on: the inputs, the objective, the tie-break, feasibility.

The MILP, the dynamic program and the brute force differ only in how they search; they share this
module so that "optimal" means the same thing to all three and they return the same plan.

[Note: lexicographic objective] A plan is scored by a pair (primary, secondary):

    objective "time":   (period P, training time of a round)        both from `costmodel`
    objective "memory": (largest compute node's peak memory, period P)

With micro-batches (`Problem.micro_batches` > 1) the times are those of each batch pipelined as
m micro-batches (`costmodel.pipelined`), and a node's memory holds every owner's gradients, so
the cuts are the best ones for the batches the peers will send.

Plans whose primary is within `REL_TOL` of the best are tied on it; among those, the secondary
decides with the same tolerance; remaining ties go to the smallest *key*

    key = (a, last layer of each compute node in name order)
          (several chains: then each compute node's chain, in name order)

which is unique per plan (the chain order follows from the segments), so the result does not
depend on the order in which a solver happens to find solutions. Every peer thus derives the same
plan. Aggregation and evaluation are predicted but not optimised: the compute nodes' averaging
depends on a second per-node statistic (parameter bytes) that would turn the dynamic program's
single maximum into a Pareto front, for a small share of the round.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from collections.abc import Mapping

from p2psl.planning import costmodel
from p2psl.planning.hosts import cpu_share, shared_machines
from p2psl.planning.memory import RUNTIME_OVERHEAD_BYTES, owner_memory, peak_memory
from p2psl.errors import PlanInfeasible
from p2psl.planning.plan import Plan, plan_from_cuts
from p2psl.planning.profile import Profile
from p2psl.topology import Topology
from p2psl.units import layers, plural

#: relative tolerance under which two objective values count as tied
REL_TOL = 1e-6
OBJECTIVES = ("time", "memory")


@dataclass(frozen=True)
class Problem:
    """Validated planning inputs, with profiles at the training batch size."""

    topology: Topology
    profiles: dict[str, Profile]
    samples: dict[str, int]
    objective: str = "time"
    test_samples: dict[str, int] | None = None
    #: the micro-batches each batch is cut into, which the plans are scored for
    micro_batches: int = 1
    #: the chains the compute nodes form ([Note: several chains]); 0: the planner chooses
    chains: int = 1

    @classmethod
    def build(cls, topology: Topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
              objective: str | None = None, test_samples: Mapping[str, int] | None = None,
              micro_batches: int | None = None) -> Problem:
        """`micro_batches` defaults to the topology's (1 for "auto", which the planner settles)."""
        objective = objective or topology.training.objective
        if objective == "cost":  # the cost objective plans each set of compute nodes for time (p2psl.planning.cost)
            objective = "time"
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if not topology.compute_nodes or not topology.owners:
            lacking = "compute node" if not topology.compute_nodes else "data owner"
            raise PlanInfeasible(f"no {lacking} to plan for: a chain needs at least one compute node and one data owner")
        missing = [p.name for p in topology.peers if p.name not in profiles]
        if missing:
            raise ValueError(f"no profile for {', '.join(missing)}")
        batch = topology.training.batch_size
        scaled = {p.name: profiles[p.name].at_batch(batch) for p in topology.peers}
        lengths = {p.num_layers for p in scaled.values()}
        if len(lengths) != 1:
            raise ValueError(f"profiles disagree on the number of layers: {sorted(lengths)}")
        counts = {o.name: int(samples.get(o.name, 0)) for o in topology.owners}
        tests = dict(test_samples) if test_samples is not None else None
        if micro_batches is None:
            micro_batches = max(topology.training.micro_batches, 1)
        return cls(topology, scaled, counts, objective, tests, micro_batches, topology.training.chains)

    # -- structure -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.sizes.num_layers

    @cached_property
    def sizes(self) -> Profile:
        return costmodel.model_sizes(self.topology, self.profiles)

    @property
    def micro(self) -> int:
        """How many micro-batches a batch is really cut into (no more than its samples)."""
        return costmodel.micro_count(self.micro_batches, self.topology.training.batch_size)

    @cached_property
    def timing(self) -> dict[str, Profile]:
        """The profiles at the size of what travels the chain: the batch, or one micro-batch of
        it ([Note: micro-batches]); times, loads and link bytes are planned at this size, memory
        at the whole batch's (an owner's micro-batches are all stashed until its batch ends)."""
        if self.micro == 1:
            return self.profiles
        return costmodel.at_micro_batch(self.profiles, self.topology.training.batch_size, self.micro)

    @cached_property
    def timing_sizes(self) -> Profile:
        return costmodel.model_sizes(self.topology, self.timing)

    @cached_property
    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted(p.name for p in self.topology.compute_nodes))

    @cached_property
    def owners(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.topology.owners)

    @property
    def copies(self) -> int:
        return len(self.owners)

    @property
    def hops(self) -> int:
        """The compute nodes on one chain; with "auto" (0), the fewest any choice gives (one),
        so that only what no number of chains can run is refused before the search."""
        return len(self.nodes) // self.chains if self.chains else 1

    @cached_property
    def batches(self) -> dict[str, int]:
        """β_k per owner (see `samples_for_score`)."""
        cfg = self.topology.training
        return costmodel.batches_per_owner(self.samples_for_score, cfg.batch_size, cfg.local_epochs)

    @cached_property
    def a_range(self) -> range:
        """Admissible ends of part 0 (fixed by first_cut, else leaving room for N + 1 parts and
        within the front layers every owner measured: [Note: profiling what a peer may hold])."""
        cfg, n = self.topology.training, self.hops
        if cfg.first_cut is not None:
            return range(cfg.first_cut, cfg.first_cut + 1)
        last = cfg.last_cut if cfg.last_cut is not None else self.num_layers - 1
        return range(1, max(min(last - n + 1, self._owners_measured_front + 1), 1))

    @cached_property
    def b_range(self) -> range:
        """Admissible ends of the middle (fixed by last_cut, else within the back layers every
        owner measured)."""
        cfg, n = self.topology.training, self.hops
        if cfg.last_cut is not None:
            return range(cfg.last_cut, cfg.last_cut + 1)
        return range(max(min(self.a_range) + n, self.num_layers - self._owners_measured_back), self.num_layers)

    @cached_property
    def _owners_measured_front(self) -> int:
        """How many leading layers every owner's profile has times for."""
        return min(next((j for j in range(self.num_layers) if not self.profiles[o].measured(j)), self.num_layers)
                   for o in self.owners)

    @cached_property
    def _owners_measured_back(self) -> int:
        """How many trailing layers every owner's profile has times for."""
        L = self.num_layers
        return min(next((k for k in range(L) if not self.profiles[o].measured(L - 1 - k)), L) for o in self.owners)

    @property
    def replicas(self) -> bool:
        """Whether every compute node sends a replica to a neighbour (a chain of two or more)."""
        return len(self.nodes) > 1

    def capacity(self, name: str) -> int:
        """The most a peer's predicted peak (its parts' bytes + `RUNTIME_OVERHEAD_BYTES`) may be.

        With an accelerator and an `accelerator_memory`, the parts (weights, momentum, gradients,
        stashes) live on the accelerator and the runtime on the host: the parts must fit the
        former and everything the host, which keeps the constraint one linear bound."""
        peer = self.topology.peer(name)
        accelerated = peer.accelerator != "cpu" and peer.accelerator_memory is not None
        if not accelerated:
            return peer.memory
        return min(peer.memory, peer.accelerator_memory + RUNTIME_OVERHEAD_BYTES)

    def owner_fits(self, a: int, b: int) -> bool:
        need = owner_memory(self.sizes, a, b, self.copies)
        return all(need <= self.capacity(k) for k in self.owners)

    # -- links -------------------------------------------------------------------------------------
    def link(self, u: str, v: str):
        """The direct link u–v, or None if there is none."""
        return self.topology.graph.get_edge_data(u, v, {}).get("link")

    @cached_property
    def ends(self) -> frozenset[str]:
        """Compute nodes linked to every owner: only these can be first or last in the chain."""
        return frozenset(i for i in self.nodes if all(self.link(k, i) for k in self.owners))

    def valid_order(self, order: list[str] | tuple[str, ...], owners: tuple[str, ...] | None = None) -> bool:
        """The chain can run in this order: consecutive nodes linked, both ends linked to every
        owner (what `Topology.chain_orders` enumerates, checked without enumerating); of a chain
        of several, to every owner it serves."""
        ends = self.ends if owners is None else {i for i in (order[0], order[-1]) if all(self.link(k, i) for k in owners)}
        return (order[0] in ends and order[-1] in ends
                and all(self.link(x, y) is not None for x, y in zip(order, order[1:])))

    def _signature(self, node: str) -> tuple:
        p = self.profiles[node]
        links = tuple(_spec(self.link(node, other)) for other in self.topology.names if other != node)
        return (p.fwd, p.bwd, p.opt, self.capacity(node), self._machine(node)), links

    def _machine(self, node: str) -> tuple | None:
        """The shared machine a node loads, and its CPU share ([Note: shared machines]): nodes on
        different machines are not interchangeable, whatever their profiles."""
        for machine, (names, _) in self._machines.items():
            if node in names:
                return machine, cpu_share(self.topology, node)
        return None

    @cached_property
    def _machines(self) -> dict:
        return shared_machines(self.topology, self.profiles)

    def identical(self, i: str, j: str) -> bool:
        """Swapping i and j anywhere in a chain changes nothing (same costs, memory, links and
        machine)."""
        if self._signature(i)[0] != self._signature(j)[0]:
            return False
        others = [n for n in self.topology.names if n not in (i, j)]
        return all(_spec(self.link(i, o)) == _spec(self.link(j, o)) for o in others)

    @cached_property
    def classes(self) -> list[list[str]]:
        """Compute nodes grouped into classes of identical nodes, each in name order."""
        out: list[list[str]] = []
        for node in self.nodes:
            for group in out:
                if self.identical(group[0], node):
                    group.append(node)
                    break
            else:
                out.append([node])
        return out

    @cached_property
    def order_free(self) -> bool:
        """The chain's cost and feasibility do not depend on its order: every pair of compute
        nodes has a free link, and each owner reaches every compute node over the same link."""
        for i in self.nodes:
            for j in self.nodes:
                if i < j and _spec(self.link(i, j)) != (None, 0.0):
                    return False
        for k in self.owners:
            if len({_spec(self.link(k, i)) for i in self.nodes}) != 1 or self.link(k, self.nodes[0]) is None:
                return False
        return True

    @property
    def homogeneous(self) -> bool:
        """The dynamic program applies: identical compute nodes, an order-free chain, and no
        machine that peers share ([Note: shared machines], which only the MILP models)."""
        return len(self.classes) == 1 and self.order_free and not shared_machines(self.topology, self.profiles)

    # -- plans and their scores ------------------------------------------------------------------
    def plan(self, a: int, chain: list[str], lasts: list[int], **extra) -> Plan:
        """The plan with part 0 = 1..a and chain[s] ending at lasts[s], cutting batches as planned for."""
        extra.setdefault("micro_batches", self.micro_batches)
        return plan_from_cuts([a, *lasts], list(chain), list(self.owners), self.num_layers, **extra)

    def fits(self, plan: Plan) -> bool:
        memory = peak_memory(plan, self.topology, self.profiles)
        return all(need <= self.capacity(name) for name, need in memory.items())

    def score(self, plan: Plan) -> tuple[float, float]:
        """(primary, secondary) of [Note: lexicographic objective]."""
        loop = costmodel.training_loop(plan, self.topology, self.profiles, self.samples_for_score)
        if self.objective == "memory":
            memory = peak_memory(plan, self.topology, self.profiles)
            return float(max(memory[s.node] for s in plan.chain)), loop.period
        return loop.period, loop.seconds

    @cached_property
    def samples_for_score(self) -> dict[str, int]:
        """The owners' sample counts, or one sample each when nobody has any yet, so that the
        period stays meaningful for a plan made before the data is known."""
        if any(self.samples.values()):
            return self.samples
        return {k: 1 for k in self.owners}

    def key(self, plan: Plan) -> tuple[int, ...]:
        """(a, each node's last layer, and with several chains each node's chain), nodes in name order."""
        last = {s.node: s.last for s in plan.chain}
        key = (plan.owner_first[1], *(last[n] for n in self.nodes))
        if plan.chains == 1:
            return key
        lane = {s.node: index // plan.hops for index, s in enumerate(plan.chain)}
        return (*key, *(lane[n] for n in self.nodes))


def _spec(link) -> tuple | None:
    return None if link is None else (link.bandwidth, link.latency)


def tied(value: float, best: float) -> bool:
    """value is within REL_TOL of best (values are non-negative)."""
    return value <= best + REL_TOL * abs(best) + 1e-15


def select(candidates: list[tuple[tuple[float, float], tuple[int, ...], Plan]]) -> Plan | None:
    """The best plan by [Note: lexicographic objective]."""
    if not candidates:
        return None
    best = min(c[0][0] for c in candidates)
    candidates = [c for c in candidates if tied(c[0][0], best)]
    best = min(c[0][1] for c in candidates)
    candidates = [c for c in candidates if tied(c[0][1], best)]
    return min(candidates, key=lambda c: c[1])[2]


def structure_problem(problem: Problem) -> PlanInfeasible | None:
    """Too few layers for the parts, before any memory question."""
    n, cfg, total = problem.hops, problem.topology.training, problem.num_layers
    a = cfg.first_cut if cfg.first_cut is not None else 1
    b = cfg.last_cut if cfg.last_cut is not None else total - 1
    if b >= total or a >= total:
        return PlanInfeasible(f"the model has {total} layers: first_cut {a} and last_cut {b} must be below {total}")
    if b - a < n:
        return PlanInfeasible(f"{plural(max(b - a, 0), 'layer')} between the owners' parts "
                              f"({layers(a + 1, b) if b > a else 'none'}) cannot give each of "
                              f"{plural(n, 'compute node')} a layer")
    if problem.chains == 1 and next(problem.topology.chain_orders(), None) is None:
        names = ", ".join(problem.nodes)
        return PlanInfeasible(f"the compute nodes ({names}) cannot form a chain over the links: they must be "
                              "linked one after another, and every data owner linked to both ends")
    return None
