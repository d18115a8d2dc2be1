"""The planner's mixed-integer linear program, solved with HiGHS.

Indices: layers j = 1..L, compute nodes i (sorted by name), owners k, phases m of the training
loop (`costmodel`: A_m = owners with at least β_(m) batches, K_m = |A_m|).

Decision variables (0/1). The middle is a path of segments from boundary a to boundary b:

    α_c = 1  iff  a = c               ω_c = 1  iff  b = c
    z_iuv = 1 iff compute node i runs layers u..v

Columns exist only for segments that can be in an optimal plan: inside the admissible range,
short enough to leave a layer for every other node, within i's memory, and not alone slower than
a known feasible plan T (from `dp.heuristic_plan`, or `chains.heuristic`): K · load_i(u, v) ≤ T
and `SegmentTables.cycle_floor` ≤ T (with several chains K and the cycles are i's chain's). Memory
capacities of compute nodes are thereby enforced by construction. Write end_i(c) = Σ_u z_iuc and
start_i(c) = Σ_w z_icw.

Constraint groups (named as in the code):

    partition    Σ_c α_c = Σ_c ω_c = 1;  Σ_uv z_iuv = 1 for each i;  at every boundary c the path
                 flows on:  α_c + Σ_i end_i(c) = Σ_i start_i(c+1) + ω_c  (segments only go forward,
                 so the unit of flow is one path a → b covering a+1..b exactly once: contiguous,
                 non-empty segments, linear without the paper's quadratic contiguity constraint)
    links        i → i' without a link:  end_i(c) + start_i'(c+1) ≤ 1;  a node not linked to every
                 owner cannot be first (α_c + start_i(c+1) ≤ 1) or last (end_i(c) + ω_c ≤ 1)
    order        only when a link has a cost: φ_i ≥ α_c + start_i(c+1) − 1 (first), λ_i ≥ end_i(c) +
                 ω_c − 1 (last), σ_ii' ≥ end_i(c) + start_i'(c+1) − 1 (i' follows i), Σ φ = Σ λ = 1,
                 Σ_i' σ_ii' = 1 − λ_i, Σ_i σ_ii' = 1 − φ_i'; bytes on links with bandwidth by big-M:
                 β_ii' ≥ X_i − X̄(1 − σ_ii') with X_i = Σ_uv act_v z_iuv, g0_i ≥ A0 − X̄(1 − φ_i), gL_i alike
    memory       owners: (K+3)·params + activations of parts 0 and N+1 + act_b + overhead ≤ cap_k,
                 separable in a and b, so linear in α and ω; compute nodes: by the columns
    symmetry     identical nodes i < i' (same costs, memory, links) keep name order:
                 Σ_uv u·z_iuv + 1 ≤ Σ_uv u·z_i'uv
    epigraph     occ_i = Σ_uv load_i(u, v) z_iuv;  c_k = own_k(α, ω) + Σ_i occ_i + transfers + latencies;
                 P_m ≥ K_m·occ_i,  P_m ≥ K_m·(β_ii' + β_i'i)/bw,  P_m ≥ (g0_i + gL_i)/bw_ki,  P_m ≥ c_k (k ∈ A_m);
                 P_m ≥ Σ_{k ∈ A_m} ℓ_{H,k} per shared machine H ([Note: shared machines]);
                 F ≥ c_k;  D ≥ (K−1)·occ_i, D ≥ (K−1)·chain link load, D ≥ machine stagger;  R = F + D + Σ_m (β_(m) − β_(m−1))·P_m
    micro-batches  with m > 1 (`costmodel.pipelined`) every time and byte above is one micro-batch's
                 (profiles at B/m), every load bound and drain term counts m of them, and an owner's
                 batch cycle is its micro-batch cycle + (m − 1)·X_k with X_k ≥ each load of its
                 micro-batch (occ_i, chain and owner links, machines): still linear

Several chains ([Note: several chains]). With C > 1 chains every column carries its chain,
z_icuv = 1 iff node i runs layers u..v in chain c, and each owner's chain r(k) is fixed
(`chains.routes`), so K_c = |chain c's owners| (K_{m,c} in phase m) are constants and the model
stays linear. Each node takes one column over all chains; every chain is a path a → b of its own
(the flow rows per chain, the same α and ω); the chains end their segments at the same layers
(Σ_i end_ic(x) = Σ_i end_i0(x) at every boundary x), so they run the same segments and have N/C
nodes each; a column's memory counts its chain's K_c copies and the C float64 sums of the round
end; φ, λ, σ, β and g are per chain; occ_ic = Σ_uv load_i(u, v) z_icuv; owner k's cycle takes
the occupancies, links and latencies of its own chain; a node's load in phase m is
Σ_c K_{m,c}·occ_ic (one chain's term is non-zero), its drain term Σ_c max(K_c − 1, 0)·occ_ic
with K_c the chain's owners that have batches; a machine's
drain has one row per owner that may load it least (`hosts.milp_drains`). Identical nodes keep
name order in (chain, first layer), and the key adds every node's chain after every node's last
layer.
`chains.heuristic` gives the first incumbent. With C = 1 all of this is the model above, column
for column.

Objectives, solved one after another ([Note: lexicographic objective]): "time" minimises
T = P_1, then, with T held within the tie tolerance, R; "memory" minimises M ≥ mem_i, then T.
Then the key: minimise a = Σ c·α_c, then each node's last layer Σ v·z_iuv in name order, each
time holding the value found. The heuristic plan is HiGHS's first incumbent. "ratio" (used to
explain infeasibility) drops the capacities and minimises the largest memory / capacity over all
peers.

Numerics: times are scaled so the busiest node's whole middle takes 100 units, memory is in MiB
and bytes on links in units of the largest activation, so that HiGHS's absolute tolerances stay
far below the tie tolerance. HiGHS still judges feasibility on its own scaled model, so after
each stage the plan is scored exactly by `costmodel`; a plan that slipped out of a tie band makes
the band tighter and the stage run again.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from p2psl.planning.memory import owner_memory
from p2psl.errors import PlanError
from p2psl.planning.highs import Lin, Model, Runner, lin
from p2psl.planning.plan import Plan, Stage
from p2psl.planning.chains import heuristic as chains_heuristic, routes
from p2psl.planning.dp import SegmentTables, heuristic_plan
from p2psl.planning.hosts import milp_drains, milp_loads
from p2psl.planning.problem import REL_TOL, Problem, tied

MIB = float(2**20)


class Formulation:
    """The MILP of the module docstring for one `Problem`.

    `upper` is a known feasible value of the first objective (from a heuristic plan): segments
    that alone would exceed it cannot be in an optimal plan and get no column.
    """

    def __init__(self, problem: Problem, mode: str, upper: float | None = None,
                 keep: set[tuple[str, int, int, int]] | None = None):
        self.p, self.mode, self.keep = problem, mode, keep
        self.m = Model()
        self.L, self.n = problem.num_layers, len(problem.nodes)
        self.mb = problem.micro  # [Note: micro-batches]: every load below is one micro-batch's
        self.tables = SegmentTables(problem)
        self.tu = max(max(float(self.tables.load(i)[2, self.L]) for i in problem.nodes), 1e-12) / 100
        self.active = [o for o in problem.owners if problem.batches[o] >= 1]
        self._lanes()
        self._columns(upper)
        self._partition()
        self._links()
        self._order()
        self._memory()
        self._epigraph()

    def _lanes(self) -> None:
        """The chains ([Note: several chains]): each owner's (fixed by `chains.routes`), the
        owners of each, and the nodes that may be first or last in each."""
        p = self.p
        self.C = max(p.chains, 1)
        self.lanes = range(self.C)
        self.routes = routes(p, self.C) if self.C > 1 else ()
        self.route = dict(zip(p.owners, self.routes)) if self.C > 1 else {o: 0 for o in p.owners}
        self.lane_owners = [[o for o in p.owners if self.route[o] == c] for c in self.lanes]
        self.ends = [p.ends if self.C == 1 else frozenset(i for i in p.nodes if all(p.link(o, i) for o in owners))
                     for owners in self.lane_owners]

    def count(self, members, c: int) -> int:
        """How many of `members` send their batches through chain c."""
        return sum(1 for o in members if self.route[o] == c)

    # -- columns -----------------------------------------------------------------------------------
    def _columns(self, upper: float | None) -> None:
        p, m = self.p, self.m
        self.alpha = {c: m.var() for c in p.a_range}
        self.omega = {c: m.var() for c in p.b_range}
        self.z: dict[tuple[str, int, int, int], int] = {}
        lo, hi = min(p.a_range) + 1, max(p.b_range)
        longest = hi - lo + 1 - (p.hops - 1)
        self.mems = [self.tables.mem if self.C == 1 else self.tables.memory(len(owners), self.C)
                     for owners in self.lane_owners]
        for i in p.nodes:
            for c in self.lanes:
                keep = self.tables.valid.copy()
                keep[:lo, :] = False
                keep[:, hi + 1:] = False
                if self.mode != "ratio":
                    keep &= self.tables.fits(i, self.mems[c])
                if upper is not None and self.mode == "time":
                    count = len(self.active) if self.C == 1 else self.count(self.active, c)
                    keep &= count * self.mb * self.tables.load(i) <= upper * (1 + REL_TOL) + 1e-15
                    owners = None if self.C == 1 else tuple(self.lane_owners[c])  # the cycles through i
                    keep &= self.tables.cycle_floor(i, owners) <= upper * (1 + REL_TOL) + 1e-15
                if upper is not None and self.mode == "memory":
                    keep &= self.mems[c] <= upper * (1 + REL_TOL)
                for u, v in zip(*np.nonzero(keep)):
                    if v - u + 1 <= longest and (self.keep is None or (i, c, int(u), int(v)) in self.keep):
                        self.z[i, c, int(u), int(v)] = m.var()
        self.starts, self.ends_at = defaultdict(list), defaultdict(list)
        for (i, c, u, v), col in self.z.items():
            self.starts[i, c, u].append(col)
            self.ends_at[i, c, v].append(col)

    def unit(self, stage: int) -> float:
        """Seconds (or bytes, for the memory objective's first stage) per unit of a stage's
        objective in the model."""
        return MIB if self.mode == "memory" and stage == 0 else self.tu

    def start(self, i: str, lane: int, c: int) -> Lin:
        """1 iff node i starts chain `lane`'s segment at layer c."""
        return lin(*((1, col) for col in self.starts.get((i, lane, c), ())))

    def end(self, i: str, lane: int, c: int) -> Lin:
        """1 iff node i ends chain `lane`'s segment at layer c."""
        return lin(*((1, col) for col in self.ends_at.get((i, lane, c), ())))

    def a0(self, c: int) -> Lin:
        return lin((1, self.alpha[c])) if c in self.alpha else Lin()

    def b0(self, c: int) -> Lin:
        return lin((1, self.omega[c])) if c in self.omega else Lin()

    @property
    def boundaries(self) -> range:
        return range(min(self.p.a_range), max(self.p.b_range) + 1)

    # -- constraint groups -----------------------------------------------------------------------
    def _partition(self) -> None:
        p, m = self.p, self.m
        m.row(lin(*((1, c) for c in self.alpha.values())), lo=1.0, hi=1.0)
        m.row(lin(*((1, c) for c in self.omega.values())), lo=1.0, hi=1.0)
        for i in p.nodes:
            m.row(lin(*((1, col) for (node, *_), col in self.z.items() if node == i)), lo=1.0, hi=1.0)
        for lane in self.lanes:
            for c in self.boundaries:
                inflow = lin((1, self.a0(c)), *((1, self.end(i, lane, c)) for i in p.nodes))
                outflow = lin((1, self.b0(c)), *((1, self.start(i, lane, c + 1)) for i in p.nodes))
                m.row(lin((1, inflow), (-1, outflow)), lo=0.0, hi=0.0)
        for lane in self.lanes if self.C > 1 else ():  # [Note: several chains]: N / C nodes per chain (implied; tightens the LP)
            m.row(lin(*((1, col) for (_, c, _, _), col in self.z.items() if c == lane)), lo=self.p.hops, hi=self.p.hops)
        for lane in self.lanes[1:]:  # every chain ends its segments where the first does
            for c in self.boundaries:
                m.row(lin(*((1, self.end(i, lane, c)) for i in p.nodes), *((-1, self.end(i, 0, c)) for i in p.nodes)),
                      lo=0.0, hi=0.0)
        for group in p.classes:
            for i, k in zip(group, group[1:]):
                m.le(lin((1, self._position(i)), const=1.0), self._position(k))

    def _position(self, i: str) -> Lin:
        """Where node i stands when the chains are laid end to end (its chain, then its first
        layer): identical nodes keep name order in it, as the search's arrangements do."""
        return lin(*((lane * (self.L + 1) + u, col) for (node, lane, u, _), col in self.z.items() if node == i))

    def _links(self) -> None:
        p, m = self.p, self.m
        for lane in self.lanes:
            for c in self.boundaries:
                for i in p.nodes:
                    for k in p.nodes:
                        if i != k and p.link(i, k) is None:
                            m.row(lin((1, self.end(i, lane, c)), (1, self.start(k, lane, c + 1))), hi=1.0)
                    if i not in self.ends[lane] and c in self.alpha:
                        m.row(lin((1, self.a0(c)), (1, self.start(i, lane, c + 1))), hi=1.0)
                    if i not in self.ends[lane] and c in self.omega:
                        m.row(lin((1, self.end(i, lane, c)), (1, self.b0(c))), hi=1.0)

    def _costly(self, u: str, v: str) -> bool:
        link = self.p.link(u, v)
        return link is not None and (link.bandwidth is not None or link.latency > 0)

    def _order(self) -> None:
        """φ, λ, σ and the bytes on links, only when some link has a cost (per chain: φ_ic = 1
        iff i is first in chain c, σ_ikc = 1 iff k follows i in chain c)."""
        p, m = self.p, self.m
        self.pairs = [(i, k) for i in p.nodes for k in p.nodes if i != k and p.link(i, k) is not None]
        self.ordered = any(self._costly(i, k) for i, k in self.pairs) or any(
            self._costly(o, i) for o in p.owners for i in p.nodes)
        self.beta, self.g0, self.gL = {}, {}, {}
        if not self.ordered:
            return
        self.phi = {(i, c): m.var(hi=1.0 if i in self.ends[c] else 0.0) for i in p.nodes for c in self.lanes}
        self.lam = {(i, c): m.var(hi=1.0 if i in self.ends[c] else 0.0) for i in p.nodes for c in self.lanes}
        self.sigma = {(i, k, c): m.var() for i, k in self.pairs for c in self.lanes}
        for lane in self.lanes:
            for c in self.boundaries:
                for i in p.nodes:
                    if c in self.alpha:
                        m.row(lin((1, self.phi[i, lane]), (-1, self.a0(c)), (-1, self.start(i, lane, c + 1))), lo=-1.0)
                    if c in self.omega:
                        m.row(lin((1, self.lam[i, lane]), (-1, self.end(i, lane, c)), (-1, self.b0(c))), lo=-1.0)
                for i, k in self.pairs:
                    m.row(lin((1, self.sigma[i, k, lane]), (-1, self.end(i, lane, c)), (-1, self.start(k, lane, c + 1))),
                          lo=-1.0)
        for lane in self.lanes:
            m.row(lin(*((1, self.phi[i, lane]) for i in p.nodes)), lo=1.0, hi=1.0)
            m.row(lin(*((1, self.lam[i, lane]) for i in p.nodes)), lo=1.0, hi=1.0)
        for i in p.nodes:
            after = [(1, col) for (x, _, _), col in self.sigma.items() if x == i]
            before = [(1, col) for (_, y, _), col in self.sigma.items() if y == i]
            m.row(lin(*after, *((1, self.lam[i, c]) for c in self.lanes)), lo=1.0, hi=1.0)
            m.row(lin(*before, *((1, self.phi[i, c]) for c in self.lanes)), lo=1.0, hi=1.0)
        self._bytes()

    def _bytes(self) -> None:
        p, m, act = self.p, self.m, self.p.timing_sizes.act_bytes
        self.bu = bu = max(float(max(act)), 1.0)  # bytes on links in units of the largest activation (a byte, if none)
        big = 1.0
        a0 = lin(*((act[c - 1] / bu, col) for c, col in self.alpha.items()))
        aL = lin(*((act[c - 1] / bu, col) for c, col in self.omega.items()))
        for i, k in self.pairs:
            if p.link(i, k).bandwidth is not None:
                x = lin(*((act[v - 1] / bu, col) for (node, _, _, v), col in self.z.items() if node == i))
                for c in self.lanes:
                    self.beta[i, k, c] = m.var(hi=big, integer=False)
                    m.row(lin((1, self.beta[i, k, c]), (-1, x), (-big, self.sigma[i, k, c])), lo=-big)
        for i in p.nodes:
            for c in self.lanes:
                if any(p.link(o, i) is not None and p.link(o, i).bandwidth is not None for o in self.lane_owners[c]):
                    self.g0[i, c], self.gL[i, c] = m.var(hi=big, integer=False), m.var(hi=big, integer=False)
                    m.row(lin((1, self.g0[i, c]), (-1, a0), (-big, self.phi[i, c])), lo=-big)
                    m.row(lin((1, self.gL[i, c]), (-1, aL), (-big, self.lam[i, c])), lo=-big)

    def _memory(self) -> None:
        p, m = self.p, self.m
        self.mem = {i: lin(*((float(self.mems[c][u, v]) / MIB, col) for (node, c, u, v), col in self.z.items()
                             if node == i)) for i in p.nodes}
        own = Lin()
        for c, col in self.alpha.items():
            own.add(col, owner_memory(p.sizes, c, max(p.b_range), p.copies) / MIB)
        for c, col in self.omega.items():
            own.add(col, (owner_memory(p.sizes, min(p.a_range), c, p.copies)
                          - owner_memory(p.sizes, min(p.a_range), max(p.b_range), p.copies)) / MIB)
        self.owner_mem = own
        if self.mode != "ratio":
            m.row(own, hi=min(p.capacity(o) for o in p.owners) / MIB)

    def _epigraph(self) -> None:
        p, m, tu = self.p, self.m, self.tu
        self.occ = {}
        for i in p.nodes:
            load = self.tables.load(i)
            for lane in self.lanes:
                self.occ[i, lane] = m.var(hi=np.inf, integer=False)
                m.row(lin((1, self.occ[i, lane]), *((-float(load[u, v]) / tu, col)
                                                    for (node, c, u, v), col in self.z.items() if node == i and c == lane)),
                      lo=0, hi=0)
        self.cycle, self.owner_link = {}, {}
        for o in p.owners:
            c = m.var(hi=np.inf, integer=False)
            chain = lin(*((1, self.occ[i, self.route[o]]) for i in p.nodes))
            m.row(lin((1, c), (-1, chain), (-1, self._own(o)), (-1, self._transfers(o))), lo=0, hi=0)
            self.cycle[o] = c
        self.chain_link = {}
        for (i, k, c), b in self.beta.items():
            scale = self.bu / p.link(i, k).bandwidth / tu
            self.chain_link[i, k, c] = lin((scale, b), *(((scale, self.beta[k, i, c]),) if (k, i, c) in self.beta else ()))
        if self.mb > 1:
            self._pipelined()
        self._phases()

    def node_load(self, i: str, weight) -> Lin:
        """Σ_c weight(c) · occ_ic: node i's occupancy, weighted by what its chain's owners count."""
        return lin(*((weight(c), self.occ[i, c]) for c in self.lanes))

    def link_loads(self, weight) -> list[Lin]:
        """Per link direction between compute nodes, Σ_c weight(c) · its load in chain c."""
        out: dict[tuple[str, str], Lin] = {}
        for (i, k, c), load in self.chain_link.items():
            out.setdefault((i, k), Lin()).add(load, weight(c))
        return list(out.values())

    def _pipelined(self) -> None:
        """A batch of m micro-batches: its cycle is one micro-batch's plus (m − 1) × the owner's
        slowest resource X_k (`costmodel.pipelined`), X_k ≥ every load of one of its micro-batches."""
        p, m = self.p, self.m
        for o in p.owners:
            slowest = m.var(hi=np.inf, integer=False)
            lane = self.route[o]
            loads = [lin((1, self.occ[i, lane])) for i in p.nodes]
            loads += [load for (_, _, c), load in self.chain_link.items() if c == lane]
            loads += [load for (k, _), load in self.owner_link.items() if k == o]
            loads += milp_loads(self, [o])
            for load in loads:
                m.le(load, lin((1, slowest)))
            batch = m.var(hi=np.inf, integer=False)
            m.row(lin((1, batch), (-1, self.cycle[o]), (-(self.mb - 1), slowest)), lo=0, hi=0)
            self.cycle[o] = batch

    def _own(self, o: str) -> Lin:
        """Owner o's parts 0 and N+1, seconds per batch (scaled)."""
        prof, L = self.p.timing[o], self.L
        t = np.concatenate([[0.0], np.cumsum([prof.total(j) for j in range(L)])])
        return lin(*((t[c] / self.tu, col) for c, col in self.alpha.items()),
                   *(((t[L] - t[c]) / self.tu, col) for c, col in self.omega.items()))

    def _transfers(self, o: str) -> Lin:
        """Owner o's transfer and latency seconds per batch (scaled), as in `costmodel`, through
        its chain."""
        p, tu, out, lane = self.p, self.tu, Lin(), self.route[o]
        if not self.ordered:
            return out
        for i in p.nodes:
            link = p.link(o, i)
            if link is None:
                continue
            if link.bandwidth is not None and (i, lane) in self.g0:
                scale = self.bu / link.bandwidth / tu
                out.add(self.g0[i, lane], 2 * scale).add(self.gL[i, lane], 2 * scale)
                self.owner_link[o, i] = lin((scale, self.g0[i, lane]), (scale, self.gL[i, lane]))
            out.add(self.phi[i, lane], 2 * link.latency / tu).add(self.lam[i, lane], 2 * link.latency / tu)
        for (i, k, c), b in self.beta.items():
            if c == lane:
                out.add(b, 2 * self.bu / p.link(i, k).bandwidth / tu)
        for (i, k, c), s in self.sigma.items():
            if c == lane:
                out.add(s, 2 * p.link(i, k).latency / tu)
        return out

    def _phases(self) -> None:
        p, m, active = self.p, self.m, self.active
        levels = sorted({p.batches[o] for o in active})
        self.period, previous = [], 1
        self.training = Lin()
        for level in levels:
            members = [o for o in active if p.batches[o] >= level]
            var = m.var(hi=np.inf, integer=False)
            self._bound(var, members)
            self.training.add(var, level - previous)
            self.period.append(var)
            previous = level
        fill, drain = m.var(hi=np.inf, integer=False), m.var(hi=np.inf, integer=False)
        for o in active:
            m.le(lin((1, self.cycle[o])), lin((1, fill)))
        queued = (lambda c: (len(active) - 1) * self.mb) if self.C == 1 else (
            lambda c: max(self.count(active, c) - 1, 0) * self.mb)
        for load in [*(self.node_load(i, queued) for i in p.nodes), *self.link_loads(queued)]:
            m.le(load, lin((1, drain)))
        for load in milp_drains(self, active):  # [Note: shared machines]
            m.le(lin((self.mb, load)), lin((1, drain)))
        self.training.add(fill).add(drain)
        self.peak = m.var(hi=np.inf, integer=False)
        for i in p.nodes:
            scale = 1.0 / p.capacity(i) if self.mode == "ratio" else 1.0
            m.le(lin((scale, self.mem[i])), lin((1, self.peak)))
        if self.mode == "ratio":
            m.le(lin((1 / min(p.capacity(o) for o in p.owners), self.owner_mem)), lin((1, self.peak)))

    def _bound(self, var: int, members: list[str]) -> None:
        """var ≥ every resource's load over `members`, and ≥ their cycles."""
        m, mb = self.m, self.mb
        served = (lambda c: len(members) * mb) if self.C == 1 else (lambda c: self.count(members, c) * mb)
        for i in self.p.nodes:
            m.le(self.node_load(i, served), lin((1, var)))
        for load in self.link_loads(served):
            m.le(load, lin((1, var)))
        for (o, _), load in self.owner_link.items():
            if o in members:
                m.le(lin((mb, load)), lin((1, var)))
        for o in members:
            m.le(lin((1, self.cycle[o])), lin((1, var)))
        for load in milp_loads(self, members):  # [Note: shared machines]
            m.le(lin((mb, load)), lin((1, var)))

    # -- plans ⇄ columns -------------------------------------------------------------------------
    def encode(self, plan: Plan) -> dict[int, float] | None:
        """The 0/1 columns of a plan (None if one of its segments has no column)."""
        out = {col: 0.0 for col in (*self.alpha.values(), *self.omega.values(), *self.z.values())}
        a, b = plan.owner_first[1], plan.owner_last[0] - 1
        if a not in self.alpha or b not in self.omega or plan.chains != self.C:
            return None
        out[self.alpha[a]] = out[self.omega[b]] = 1.0
        for lane, path in enumerate(plan.paths):
            for s in path:
                if (s.node, lane, s.first, s.last) not in self.z:
                    return None
                out[self.z[s.node, lane, s.first, s.last]] = 1.0
        if self.ordered:
            for lane, path in enumerate(plan.paths):
                nodes = [s.node for s in path]
                for i in self.p.nodes:
                    out[self.phi[i, lane]] = float(i == nodes[0])
                    out[self.lam[i, lane]] = float(i == nodes[-1])
                for (x, y, c), col in self.sigma.items():
                    if c == lane:
                        out[col] = float(any((x, y) == pair for pair in zip(nodes, nodes[1:])))
        return out

    def decode(self, x: np.ndarray) -> Plan:
        a = max(self.alpha, key=lambda c: x[self.alpha[c]])
        chosen = {}
        for (i, lane, u, v), col in self.z.items():
            if x[col] > 0.5:
                chosen[i] = (lane, u, v)
        order = sorted(chosen, key=lambda i: chosen[i])
        if self.C == 1:
            return self.p.plan(a, order, [chosen[i][2] for i in order])
        chain = tuple(Stage(i, chosen[i][1], chosen[i][2]) for i in order)
        return Plan(self.L, (1, a), (chain[-1].last + 1, self.L), chain, self.p.owners,
                    micro_batches=self.p.micro_batches, chains=self.C, routes=self.routes)


class Solver(Runner):
    """A runner on one formulation that reads plans back and keeps the tie bands."""

    def __init__(self, formulation: Formulation, start: Plan | None = None):
        super().__init__(formulation.m, formulation.encode(start) if start is not None else None)
        self.p, self.f = formulation.p, formulation
        self.best: dict[int, float] = {}

    def plan(self) -> Plan:
        return self.f.decode(self.x)

    def band(self, stage: int, best: float) -> None:
        """From now on, keep stage's objective tied with `best` (its exact optimum)."""
        self.best[stage] = best
        self.hold(stages(self.f)[stage], (best + REL_TOL * abs(best)) / self.f.unit(stage) + 1e-9)

    def settle(self, objective: Lin, attempts: int = 8) -> None:
        """Minimise; while the cost model's exact scores of the solution leave a tie band (HiGHS's
        tolerances act on its scaled model, so a plan just outside can slip in), hold that
        objective below the solution's value by the excess and solve again — never below the
        band's own optimum: where the model values the slipped plan below its exact score, a
        doubled excess cut off the optimum with it, and the MILP lost every plan."""
        for attempt in range(attempts):
            if not self.minimise(objective):
                raise PlanError("the planner's MILP lost its feasible plan between stages")
            score = self.p.score(self.plan())
            broken = [s for s, best in self.best.items() if not tied(score[s], best)]
            if not broken:
                return
            for s in broken:
                excess = (score[s] - self.best[s] * (1 + REL_TOL)) / self.f.unit(s) + 1e-7
                floor = self.best[s] / self.f.unit(s)
                self.hold(stages(self.f)[s], max(self.value(stages(self.f)[s]) - excess * 2**attempt, floor))
        raise PlanError("the planner's MILP could not keep its plan within the tie tolerance")


def solve_milp(problem: Problem, mode: str | None = None) -> Plan | None:
    """The optimal plan by [Note: lexicographic objective], or None when none fits in memory.
    mode "ratio" returns the plan with the smallest largest memory / capacity, ignoring capacities."""
    mode = mode or problem.objective
    if mode == "ratio":
        solver = Solver(Formulation(problem, mode))
        return solver.plan() if solver.minimise(lin((1, solver.f.peak))) else None
    start = heuristic_plan(problem) if problem.chains == 1 else chains_heuristic(problem)
    screen = _Screen(problem, mode, problem.score(start)[0] if start is not None else None)
    solver = screen.solver(start)
    if not solver.minimise(stages(solver.f)[0]):
        return None
    best = problem.score(solver.plan())[0]
    solver = screen.solver(solver.plan(), best * (1 + REL_TOL))
    solver.band(0, best)
    solver.settle(stages(solver.f)[1])
    solver.band(1, problem.score(solver.plan())[1])
    _key_stages(solver)
    return solver.plan()


def stages(f: Formulation) -> list[Lin]:
    """The objectives of [Note: lexicographic objective] in the model's units."""
    if f.mode == "time":
        return [lin((1, f.period[0])), f.training]
    return [lin((1, f.peak)), lin((1, f.period[0]))]


class _Screen:
    """Reduced-cost fixing: if the LP relaxation of the first objective has optimum z* and
    column j has reduced cost r_j ≥ 0, every plan using j scores at least z* + r_j, so a column
    with z* + r_j above a known score (plus the tie tolerance and a margin for LP tolerances)
    cannot be in a plan tied with the best. Screens once with the heuristic's score, and again,
    more tightly, with the optimum of the first stage."""

    def __init__(self, problem: Problem, mode: str, upper: float | None):
        self.problem, self.mode, self.upper = problem, mode, upper
        self.full = Formulation(problem, mode, upper)
        self.bound, self.reduced = -np.inf, None
        if upper is not None:
            self.bound, self.reduced = Solver(self.full).relaxation(stages(self.full)[0])

    def solver(self, start: Plan | None, upper: float | None = None) -> Solver:
        """A solver on the columns that survive `upper` (seconds or bytes; default: the heuristic's)."""
        upper = self.upper if upper is None else upper
        if self.reduced is None or upper is None:
            return Solver(Formulation(self.problem, self.mode, upper), start)
        limit = upper / self.full.unit(0)
        limit += 2 * REL_TOL * abs(limit) + 1e-7
        keep = {key for key, col in self.full.z.items() if self.bound + max(self.reduced[col], 0.0) <= limit}
        return Solver(Formulation(self.problem, self.mode, upper, keep), start)


def _key_stages(solver: Solver) -> None:
    """Minimise a, then each node's last layer in name order (every node: with b fixed, the last
    one is still free when b is another node's last). One component per solve: weighting several
    into one objective is exact for integers but makes HiGHS much slower."""
    f, p = solver.f, solver.p
    keys = [] if len(p.a_range) == 1 else [lin(*((c, col) for c, col in f.alpha.items()))]
    keys += [lin(*((v, col) for (node, _, _, v), col in f.z.items() if node == i)) for i in p.nodes]
    if f.C > 1:  # [Note: several chains]: then each node's chain, as `Problem.key` orders them
        keys += [lin(*((lane, col) for (node, lane, _, _), col in f.z.items() if node == i)) for i in p.nodes]
    for expr in keys:
        solver.settle(expr)
        solver.hold(expr, round(solver.value(expr)) + 0.5)
