"""The planner's mixed-integer linear program, solved with HiGHS.

Indices: layers j = 1..L, compute nodes i (sorted by name), owners k, phases m of the training
loop (`costmodel`: A_m = owners with at least β_(m) batches, K_m = |A_m|).

Decision variables (0/1). The middle is a path of segments from boundary a to boundary b:

    α_c = 1  iff  a = c               ω_c = 1  iff  b = c
    z_iuv = 1 iff compute node i runs layers u..v

Columns exist only for segments that can be in an optimal plan: inside the admissible range,
short enough to leave a layer for every other node, within i's memory, and not alone slower than
a known feasible plan (K · load_i(u, v) ≤ T of the fixed-order heuristic of `planner_dp`). Memory
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
    memory       owners: 3·params + activations of parts 0 and N+1 + act_b + overhead ≤ cap_k,
                 separable in a and b, so linear in α and ω; compute nodes: by the columns
    symmetry     identical nodes i < i' (same costs, memory, links) keep name order:
                 Σ_uv u·z_iuv + 1 ≤ Σ_uv u·z_i'uv
    epigraph     occ_i = Σ_uv load_i(u, v) z_iuv;  c_k = own_k(α, ω) + Σ_i occ_i + transfers + latencies;
                 P_m ≥ K_m·occ_i,  P_m ≥ K_m·(β_ii' + β_i'i)/bw,  P_m ≥ (g0_i + gL_i)/bw_ki,  P_m ≥ c_k (k ∈ A_m);
                 F ≥ c_k;  D ≥ (K−1)·occ_i, D ≥ (K−1)·chain link load;  R = F + D + Σ_m (β_(m) − β_(m−1))·P_m

Objectives, solved one after another ([Note: lexicographic objective]): "time" minimises
T = P_1, then, with T held within the tie tolerance, R; "memory" minimises M ≥ mem_i, then T.
Then the key: minimise a = Σ c·α_c, then each node's last layer Σ v·z_iuv in name order, each
time holding the value found. The heuristic plan is HiGHS's first incumbent. "ratio" (used to
explain infeasibility) drops the capacities and minimises the largest memory / capacity over all
peers. Times are scaled so the busiest node's whole-model time is 100
and bytes to MiB, which keeps HiGHS's absolute tolerances far below the tie tolerance.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections import defaultdict

import numpy as np

from p2psl import costmodel
from p2psl.errors import PlanError
from p2psl.plan import Plan
from p2psl.planner_dp import SegmentTables, fixed_order_plan
from p2psl.planner_problem import REL_TOL, Problem

MIB = float(2**20)
_banner_done = False


def new_highs():
    """A silent HiGHS instance. The first one in a process prints a banner to file descriptor 1
    that `silent()` cannot stop; it goes to /dev/null so `p2psl plan --json` stays clean."""
    global _banner_done
    import highspy

    if _banner_done:
        return _configure(highspy.Highs())
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
            _flush_c_stdout()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _banner_done = True
    return _configure(h)


def _flush_c_stdout() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _configure(h):
    for name, value in (("output_flag", False), ("threads", 1), ("random_seed", 0),
                        ("mip_rel_gap", 1e-9), ("mip_abs_gap", 1e-9), ("presolve", "off")):
        h.setOptionValue(name, value)
    return h


class Lin:
    """A linear expression: {column: coefficient} plus a constant."""

    __slots__ = ("terms", "const")

    def __init__(self, terms: dict[int, float] | None = None, const: float = 0.0):
        self.terms = dict(terms or {})
        self.const = const

    def add(self, other: Lin | int, scale: float = 1.0) -> Lin:
        """self += scale · other (a Lin or a column index); returns self."""
        if isinstance(other, Lin):
            for col, coef in other.terms.items():
                self.terms[col] = self.terms.get(col, 0.0) + scale * coef
            self.const += scale * other.const
        else:
            self.terms[other] = self.terms.get(other, 0.0) + scale
        return self


def lin(*parts: tuple[float, Lin | int], const: float = 0.0) -> Lin:
    out = Lin(const=const)
    for scale, part in parts:
        out.add(part, scale)
    return out


class _Model:
    """Columns and rows collected in Python, then passed to HiGHS in one go."""

    def __init__(self):
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[float, float, dict[int, float]]] = []

    def var(self, lo: float = 0.0, hi: float = 1.0, integer: bool = True) -> int:
        self.lower.append(lo)
        self.upper.append(hi)
        self.integer.append(1 if integer else 0)
        return len(self.lower) - 1

    def fix(self, col: int, value: float) -> None:
        self.lower[col] = self.upper[col] = value

    def row(self, expr: Lin, lo: float = -np.inf, hi: float = np.inf) -> None:
        """lo ≤ expr ≤ hi."""
        terms = {c: v for c, v in expr.terms.items() if v != 0.0}
        self.rows.append((lo - expr.const, hi - expr.const, terms))

    def le(self, left: Lin, right: Lin) -> None:
        self.row(lin((1, left), (-1, right)), hi=0.0)

    def to_highs(self):
        import highspy

        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(self.lower), len(self.rows)
        lp.col_cost_ = np.zeros(lp.num_col_)
        lp.col_lower_, lp.col_upper_ = np.array(self.lower), np.array(self.upper)
        lp.row_lower_ = np.array([r[0] for r in self.rows])
        lp.row_upper_ = np.array([r[1] for r in self.rows])
        starts, index, value = [0], [], []
        for _, _, terms in self.rows:
            for col in sorted(terms):
                index.append(col)
                value.append(terms[col])
            starts.append(len(index))
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = starts, index, value
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in self.integer]
        h = new_highs()
        h.passModel(lp)
        return h


class Formulation:
    """The MILP of the module docstring for one `Problem`.

    `upper` is a known feasible value of the first objective (from a heuristic plan): segments
    that alone would exceed it cannot be in an optimal plan and get no column.
    """

    def __init__(self, problem: Problem, mode: str, upper: float | None = None,
                 keep: set[tuple[str, int, int]] | None = None):
        self.p, self.mode, self.keep = problem, mode, keep
        self.m = _Model()
        self.L, self.n = problem.num_layers, len(problem.nodes)
        self.tables = SegmentTables(problem)
        self.tu = max(max(float(self.tables.load(i)[2, self.L]) for i in problem.nodes), 1e-12) / 100
        self.active = [o for o in problem.owners if problem.batches[o] >= 1]
        self._columns(upper)
        self._partition()
        self._links()
        self._order()
        self._memory()
        self._epigraph()

    # -- columns -----------------------------------------------------------------------------------
    def _columns(self, upper: float | None) -> None:
        p, m = self.p, self.m
        self.alpha = {c: m.var() for c in p.a_range}
        self.omega = {c: m.var() for c in p.b_range}
        self.z: dict[tuple[str, int, int], int] = {}
        lo, hi = min(p.a_range) + 1, max(p.b_range)
        longest = hi - lo + 1 - (self.n - 1)
        for i in p.nodes:
            keep = self.tables.valid.copy()
            keep[:lo, :] = False
            keep[:, hi + 1:] = False
            if self.mode != "ratio":
                keep &= self.tables.fits(i)
            if upper is not None and self.mode == "time":
                keep &= len(self.active) * self.tables.load(i) <= upper * (1 + REL_TOL) + 1e-15
                keep &= self._cycle_bound(i) <= upper * (1 + REL_TOL) + 1e-15
            if upper is not None and self.mode == "memory":
                keep &= self.tables.mem <= upper * (1 + REL_TOL)
            for u, v in zip(*np.nonzero(keep)):
                if v - u + 1 <= longest and (self.keep is None or (i, int(u), int(v)) in self.keep):
                    self.z[i, int(u), int(v)] = m.var()
        self.starts, self.ends_at = defaultdict(list), defaultdict(list)
        for (i, u, v), col in self.z.items():
            self.starts[i, u].append(col)
            self.ends_at[i, v].append(col)

    def unit(self, stage: int) -> float:
        """Seconds (or bytes, for the memory objective's first stage) per unit of a stage's
        objective in the model."""
        return MIB if self.mode == "memory" and stage == 0 else self.tu

    def _cycle_bound(self, i: str) -> np.ndarray:
        """[u, v] ↦ a lower bound on the longest owner cycle if i runs u..v: the owner's parts plus
        i's load plus, for the rest of the middle, each layer at its fastest node's time and each
        other node's least extra time over that for the one layer it must take. Segments above
        a feasible period cannot be in an optimal plan (c_k ≤ T)."""
        if not hasattr(self, "_floor"):
            self._floor, self._extra = self._owner_floor()
        return self._floor + self.tables.load(i) + sum(e for n, e in self._extra.items() if n != i)

    def _owner_floor(self) -> tuple[np.ndarray, dict[str, float]]:
        """max over owners of min over (a, b) of their parts + the fastest times of the layers
        a+1..u−1 and v+1..b, as a matrix [u, v]; and each node's least extra time."""
        p, L = self.p, self.L
        times = np.array([[p.profiles[n].total(j) for j in range(L)] for n in p.nodes])
        fastest = times.min(axis=0)
        extra = {n: float((times[x] - fastest).min()) for x, n in enumerate(p.nodes)}
        cum = np.concatenate([[0.0], np.cumsum(fastest)])
        in_a = np.isin(np.arange(L + 1), list(p.a_range))
        in_b = np.isin(np.arange(L + 1), list(p.b_range))
        floor = np.full((L + 2, L + 1), -np.inf)
        for o in p.owners:
            own = np.concatenate([[0.0], np.cumsum([p.profiles[o].total(j) for j in range(L)])])
            first = np.minimum.accumulate(np.where(in_a, own - cum, np.inf))        # min over a ≤ index
            last = np.minimum.accumulate(np.where(in_b, own[L] - own + cum, np.inf)[::-1])[::-1]  # b ≥ index
            head = np.concatenate([[np.inf], first + cum, [np.inf]])[: L + 2]          # a < u: first[u−1] + cum[u−1]
            tail = last - cum
            floor = np.maximum(floor, head[:, None] + tail[None, :])
        return floor, extra

    def start(self, i: str, c: int) -> Lin:
        return lin(*((1, col) for col in self.starts.get((i, c), ())))

    def end(self, i: str, c: int) -> Lin:
        return lin(*((1, col) for col in self.ends_at.get((i, c), ())))

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
            m.row(lin(*((1, col) for (node, _, _), col in self.z.items() if node == i)), lo=1.0, hi=1.0)
        for c in self.boundaries:
            inflow = lin((1, self.a0(c)), *((1, self.end(i, c)) for i in p.nodes))
            outflow = lin((1, self.b0(c)), *((1, self.start(i, c + 1)) for i in p.nodes))
            m.row(lin((1, inflow), (-1, outflow)), lo=0.0, hi=0.0)
        for group in p.classes:
            for i, k in zip(group, group[1:]):
                first_i = lin(*((u, col) for (node, u, _), col in self.z.items() if node == i))
                first_k = lin(*((u, col) for (node, u, _), col in self.z.items() if node == k))
                m.le(lin((1, first_i), const=1.0), first_k)

    def _links(self) -> None:
        p, m = self.p, self.m
        for c in self.boundaries:
            for i in p.nodes:
                for k in p.nodes:
                    if i != k and p.link(i, k) is None:
                        m.row(lin((1, self.end(i, c)), (1, self.start(k, c + 1))), hi=1.0)
                if i not in p.ends and c in self.alpha:
                    m.row(lin((1, self.a0(c)), (1, self.start(i, c + 1))), hi=1.0)
                if i not in p.ends and c in self.omega:
                    m.row(lin((1, self.end(i, c)), (1, self.b0(c))), hi=1.0)

    def _costly(self, u: str, v: str) -> bool:
        link = self.p.link(u, v)
        return link is not None and (link.bandwidth is not None or link.latency > 0)

    def _order(self) -> None:
        """φ, λ, σ and the bytes on links, only when some link has a cost."""
        p, m = self.p, self.m
        self.pairs = [(i, k) for i in p.nodes for k in p.nodes if i != k and p.link(i, k) is not None]
        self.ordered = any(self._costly(i, k) for i, k in self.pairs) or any(
            self._costly(o, i) for o in p.owners for i in p.nodes)
        self.beta, self.g0, self.gL = {}, {}, {}
        if not self.ordered:
            return
        self.phi = {i: m.var(hi=1.0 if i in p.ends else 0.0) for i in p.nodes}
        self.lam = {i: m.var(hi=1.0 if i in p.ends else 0.0) for i in p.nodes}
        self.sigma = {pair: m.var() for pair in self.pairs}
        for c in self.boundaries:
            for i in p.nodes:
                if c in self.alpha:
                    m.row(lin((1, self.phi[i]), (-1, self.a0(c)), (-1, self.start(i, c + 1))), lo=-1.0)
                if c in self.omega:
                    m.row(lin((1, self.lam[i]), (-1, self.end(i, c)), (-1, self.b0(c))), lo=-1.0)
            for i, k in self.pairs:
                m.row(lin((1, self.sigma[i, k]), (-1, self.end(i, c)), (-1, self.start(k, c + 1))), lo=-1.0)
        m.row(lin(*((1, self.phi[i]) for i in p.nodes)), lo=1.0, hi=1.0)
        m.row(lin(*((1, self.lam[i]) for i in p.nodes)), lo=1.0, hi=1.0)
        for i in p.nodes:
            m.row(lin(*((1, self.sigma[i, k]) for k in p.nodes if (i, k) in self.sigma), (1, self.lam[i])), lo=1.0, hi=1.0)
            m.row(lin(*((1, self.sigma[k, i]) for k in p.nodes if (k, i) in self.sigma), (1, self.phi[i])), lo=1.0, hi=1.0)
        self._bytes()

    def _bytes(self) -> None:
        p, m, act = self.p, self.m, self.p.sizes.act_bytes
        big = max(act) / MIB
        a0 = lin(*((act[c - 1] / MIB, col) for c, col in self.alpha.items()))
        aL = lin(*((act[c - 1] / MIB, col) for c, col in self.omega.items()))
        for i, k in self.pairs:
            if p.link(i, k).bandwidth is not None:
                x = lin(*((act[v - 1] / MIB, col) for (node, _, v), col in self.z.items() if node == i))
                self.beta[i, k] = m.var(hi=big, integer=False)
                m.row(lin((1, self.beta[i, k]), (-1, x), (-big, self.sigma[i, k])), lo=-big)
        for i in p.nodes:
            if any(p.link(o, i) is not None and p.link(o, i).bandwidth is not None for o in p.owners):
                self.g0[i], self.gL[i] = m.var(hi=big, integer=False), m.var(hi=big, integer=False)
                m.row(lin((1, self.g0[i]), (-1, a0), (-big, self.phi[i])), lo=-big)
                m.row(lin((1, self.gL[i]), (-1, aL), (-big, self.lam[i])), lo=-big)

    def _memory(self) -> None:
        p, m = self.p, self.m
        self.mem = {i: lin(*((float(self.tables.mem[u, v]) / MIB, col) for (node, u, v), col in self.z.items()
                             if node == i)) for i in p.nodes}
        own = Lin()
        for c, col in self.alpha.items():
            own.add(col, costmodel.owner_memory(p.sizes, c, max(p.b_range)) / MIB)
        for c, col in self.omega.items():
            own.add(col, (costmodel.owner_memory(p.sizes, min(p.a_range), c)
                          - costmodel.owner_memory(p.sizes, min(p.a_range), max(p.b_range))) / MIB)
        self.owner_mem = own
        if self.mode != "ratio":
            m.row(own, hi=min(p.capacity(o) for o in p.owners) / MIB)

    def _epigraph(self) -> None:
        p, m, tu = self.p, self.m, self.tu
        self.occ = {}
        for i in p.nodes:
            load = self.tables.load(i)
            self.occ[i] = m.var(hi=np.inf, integer=False)
            m.row(lin((1, self.occ[i]), *((-float(load[u, v]) / tu, col) for (node, u, v), col in self.z.items()
                                          if node == i)), lo=0, hi=0)
        chain = lin(*((1, self.occ[i]) for i in p.nodes))
        self.cycle, self.owner_link = {}, {}
        for o in p.owners:
            c = m.var(hi=np.inf, integer=False)
            m.row(lin((1, c), (-1, chain), (-1, self._own(o)), (-1, self._transfers(o))), lo=0, hi=0)
            self.cycle[o] = c
        self.chain_link = {}
        for (i, k), b in self.beta.items():
            scale = MIB / p.link(i, k).bandwidth / tu
            self.chain_link[i, k] = lin((scale, b), *(((scale, self.beta[k, i]),) if (k, i) in self.beta else ()))
        self._phases()

    def _own(self, o: str) -> Lin:
        """Owner o's parts 0 and N+1, seconds per batch (scaled)."""
        prof, L = self.p.profiles[o], self.L
        t = np.concatenate([[0.0], np.cumsum([prof.total(j) for j in range(L)])])
        return lin(*((t[c] / self.tu, col) for c, col in self.alpha.items()),
                   *(((t[L] - t[c]) / self.tu, col) for c, col in self.omega.items()))

    def _transfers(self, o: str) -> Lin:
        """Owner o's transfer and latency seconds per batch (scaled), as in `costmodel`."""
        p, tu, out = self.p, self.tu, Lin()
        if not self.ordered:
            return out
        for i in p.nodes:
            link = p.link(o, i)
            if link is None:
                continue
            if link.bandwidth is not None and i in self.g0:
                scale = MIB / link.bandwidth / tu
                out.add(self.g0[i], 2 * scale).add(self.gL[i], 2 * scale)
                self.owner_link[o, i] = lin((scale, self.g0[i]), (scale, self.gL[i]))
            out.add(self.phi[i], 2 * link.latency / tu).add(self.lam[i], 2 * link.latency / tu)
        for (i, k), b in self.beta.items():
            out.add(b, 2 * MIB / p.link(i, k).bandwidth / tu)
        for (i, k), s in self.sigma.items():
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
        for load in [*(lin((1, self.occ[i])) for i in p.nodes), *self.chain_link.values()]:
            m.le(lin((len(active) - 1, load)), lin((1, drain)))
        self.training.add(fill).add(drain)
        self.peak = m.var(hi=np.inf, integer=False)
        for i in p.nodes:
            scale = 1.0 / p.capacity(i) if self.mode == "ratio" else 1.0
            m.le(lin((scale, self.mem[i])), lin((1, self.peak)))
        if self.mode == "ratio":
            m.le(lin((1 / min(p.capacity(o) for o in p.owners), self.owner_mem)), lin((1, self.peak)))

    def _bound(self, var: int, members: list[str]) -> None:
        """var ≥ every resource's load over `members`, and ≥ their cycles."""
        m, count = self.m, len(members)
        for i in self.p.nodes:
            m.le(lin((count, self.occ[i])), lin((1, var)))
        for load in self.chain_link.values():
            m.le(lin((count, load)), lin((1, var)))
        for (o, _), load in self.owner_link.items():
            if o in members:
                m.le(load, lin((1, var)))
        for o in members:
            m.le(lin((1, self.cycle[o])), lin((1, var)))

    # -- plans ⇄ columns -------------------------------------------------------------------------
    def encode(self, plan: Plan) -> dict[int, float] | None:
        """The 0/1 columns of a plan (None if one of its segments has no column)."""
        out = {col: 0.0 for col in (*self.alpha.values(), *self.omega.values(), *self.z.values())}
        a, b = plan.owner_first[1], plan.owner_last[0] - 1
        if a not in self.alpha or b not in self.omega:
            return None
        out[self.alpha[a]] = out[self.omega[b]] = 1.0
        for s in plan.chain:
            if (s.node, s.first, s.last) not in self.z:
                return None
            out[self.z[s.node, s.first, s.last]] = 1.0
        if self.ordered:
            nodes = plan.nodes
            for i in self.p.nodes:
                out[self.phi[i]] = float(i == nodes[0])
                out[self.lam[i]] = float(i == nodes[-1])
            for pair, col in self.sigma.items():
                out[col] = float(any(pair == (x, y) for x, y in zip(nodes, nodes[1:])))
        return out

    def decode(self, x: np.ndarray) -> Plan:
        a = max(self.alpha, key=lambda c: x[self.alpha[c]])
        chosen = {}
        for (i, u, v), col in self.z.items():
            if x[col] > 0.5:
                chosen[i] = (u, v)
        chain = sorted(chosen, key=lambda i: chosen[i][0])
        return self.p.plan(a, chain, [chosen[i][1] for i in chain])


class Solver:
    """Runs the stages of the module docstring on one formulation."""

    def __init__(self, formulation: Formulation, start: Plan | None = None):
        self.p, self.f = formulation.p, formulation
        self.h = self.f.m.to_highs()
        self.n_cols = len(self.f.m.lower)
        self.hint = self.f.encode(start) if start is not None else None
        self.x: np.ndarray | None = None

    def _objective(self, expr: Lin) -> None:
        cost = np.zeros(self.n_cols)
        for col, coef in expr.terms.items():
            cost[col] = coef
        self.h.changeColsCost(self.n_cols, np.arange(self.n_cols, dtype=np.int32), cost)

    def relaxation(self, expr: Lin) -> tuple[float, np.ndarray]:
        """The LP relaxation's optimum of `expr` and its reduced costs (primal simplex, which is
        the fastest here)."""
        self._objective(expr)
        self.h.setOptionValue("solve_relaxation", True)
        self.h.setOptionValue("simplex_strategy", 4)
        self.h.run()
        self.h.setOptionValue("solve_relaxation", False)
        self.h.setOptionValue("simplex_strategy", 1)
        if self.h.modelStatusToString(self.h.getModelStatus()) != "Optimal":
            return -np.inf, np.zeros(self.n_cols)
        return self.h.getInfo().objective_function_value + expr.const, np.array(self.h.getSolution().col_dual)

    def minimise(self, expr: Lin) -> bool:
        """Solve with `expr` as the objective; False when infeasible."""
        self._objective(expr)
        if self.x is not None:
            self.h.setSolution(self.n_cols, np.arange(self.n_cols, dtype=np.int32), self.x)
        elif self.hint is not None:
            cols = np.array(sorted(self.hint), dtype=np.int32)
            self.h.setSolution(len(cols), cols, np.array([self.hint[c] for c in cols]))
        self.h.run()
        status = self.h.modelStatusToString(self.h.getModelStatus())
        if status == "Infeasible":
            return False
        if status != "Optimal":
            raise PlanError(f"the planner's MILP solver stopped: {status}")
        self.x = np.array(self.h.getSolution().col_value)
        return True

    def hold(self, expr: Lin, limit: float) -> None:
        """Add expr ≤ limit for the following stages."""
        terms = {c: v for c, v in expr.terms.items() if v != 0.0}
        cols = np.array(sorted(terms), dtype=np.int32)
        self.h.addRow(-np.inf, limit - expr.const, len(cols), cols, np.array([terms[c] for c in cols]))

    def drop_segments(self, limit: float) -> None:
        """Fix to 0 the segments that alone exceed the first objective's limit (seconds of
        period or bytes of memory): T ≥ K·occ_i and M ≥ mem_i make them infeasible."""
        f, k = self.f, len(self.f.active)
        cols = [col for (i, u, v), col in f.z.items()
                if (f.mode == "time" and k * f.tables.load(i)[u, v] > limit * (1 + REL_TOL))
                or (f.mode == "memory" and f.tables.mem[u, v] > limit * (1 + REL_TOL))]
        if cols:
            idx = np.array(cols, dtype=np.int32)
            self.h.changeColsBounds(len(idx), idx, np.zeros(len(idx)), np.zeros(len(idx)))

    def value(self, expr: Lin) -> float:
        return expr.const + sum(coef * self.x[col] for col, coef in expr.terms.items())

    def plan(self) -> Plan:
        return self.f.decode(self.x)


def solve_milp(problem: Problem, mode: str | None = None) -> Plan | None:
    """The optimal plan by [Note: lexicographic objective], or None when none fits in memory.
    mode "ratio" returns the plan with the smallest largest memory / capacity, ignoring capacities."""
    mode = mode or problem.objective
    if mode == "ratio":
        solver = Solver(Formulation(problem, mode))
        return solver.plan() if solver.minimise(lin((1, solver.f.peak))) else None
    start = _heuristic(problem)
    upper = problem.score(start)[0] if start is not None else None
    solver = _reduced(problem, mode, start, upper)
    f = solver.f
    stages = [lin((1, f.period[0])), f.training] if mode == "time" else [lin((1, f.peak)), lin((1, f.period[0]))]
    if not solver.minimise(stages[0]):
        return None
    for index, stage in enumerate(stages):
        if index:
            solver.minimise(stage)
        true = problem.score(solver.plan())[index] / f.unit(index)
        limit = max(true, solver.value(stage))
        solver.hold(stage, limit + REL_TOL * abs(limit) + 1e-9)
        if index == 0:
            solver.drop_segments(limit * f.unit(0))
    _key_stages(solver)
    return solver.plan()


def _reduced(problem: Problem, mode: str, start: Plan | None, upper: float | None) -> Solver:
    """The solver on only the segments that can be in a plan tied with the best (reduced-cost
    fixing): if the LP relaxation of the first objective has optimum z* and column j has reduced
    cost r_j ≥ 0, every plan using j scores at least z* + r_j, so columns with z* + r_j above
    the heuristic's score (plus the tie tolerance and a margin for LP tolerances) cannot win."""
    full = Formulation(problem, mode, upper)
    if upper is None:
        return Solver(full)
    probe = Solver(full)
    objective = lin((1, full.period[0])) if mode == "time" else lin((1, full.peak))
    bound, reduced = probe.relaxation(objective)
    limit = upper / full.unit(0)
    limit += 2 * REL_TOL * abs(limit) + 1e-7
    keep = {key for key, col in full.z.items() if bound + max(reduced[col], 0.0) <= limit}
    return Solver(Formulation(problem, mode, upper, keep), start)


def _heuristic(problem: Problem, passes: int = 2) -> Plan | None:
    """A good feasible plan: the best fixed-order plan over a few orders (the first the links
    allow, the nodes by speed either way), improved by swapping two nodes of different speed
    while that helps (at most `passes` rounds, so the work is bounded and deterministic)."""
    tables = SegmentTables(problem)
    times = {i: problem.profiles[i].fwd + problem.profiles[i].bwd + problem.profiles[i].opt for i in problem.nodes}
    speed = {i: tables.load(i)[2, problem.num_layers] for i in problem.nodes}
    orders = [list(next(problem.topology.chain_orders())), sorted(problem.nodes, key=lambda i: (speed[i], i)),
              sorted(problem.nodes, key=lambda i: (-speed[i], i))]
    best = None
    for order in orders:
        best = _better(problem, tables, order, best)
    for _ in range(passes if best else 0):
        current = best
        for x, y in itertools.combinations(range(len(problem.nodes)), 2):
            order = list(current[1].nodes)
            if times[order[x]] != times[order[y]]:
                order[x], order[y] = order[y], order[x]
                best = _better(problem, tables, order, best, current[1])
        if best is current:
            break
    return best[1] if best else None


def _better(problem: Problem, tables: SegmentTables, order: list[str], best, like: Plan | None = None):
    """best, or (score, plan) of this order's plan when it fits and scores lower. With `like`,
    the owners' cuts are kept from that plan (a cheap move for the local search)."""
    if not problem.valid_order(order):
        return best
    cuts = (like.owner_first[1], like.owner_last[0] - 1) if like is not None else None
    plan = fixed_order_plan(problem, order, tables, cuts)
    if plan is None or not problem.fits(plan):
        return best
    score = problem.score(plan)
    return (score, plan) if best is None or score < best[0] else best


def _key_stages(solver: Solver) -> None:
    """Minimise a, then each node's last layer in name order (every node: with b fixed, the last
    one is still free when b is another node's last). One component per solve: weighting several
    into one objective is exact for integers but makes HiGHS much slower."""
    f, p, L = solver.f, solver.p, solver.f.L
    keys = [] if len(p.a_range) == 1 else [lin(*((c, col) for c, col in f.alpha.items()))]
    keys += [lin(*((v, col) for (node, _, v), col in f.z.items() if node == i)) for i in p.nodes]
    for expr in keys:
        solver.minimise(expr)
        solver.hold(expr, round(solver.value(expr)) + 0.5)
