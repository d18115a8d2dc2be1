"""Exact dynamic program for identical compute nodes on an order-free chain, and its fixed-order
variant as the MILP's starting point.

With identical nodes, free links between them and each owner reaching every node over the same
link, the chain's order does not matter and only the cuts do. For fixed owner cuts (a, b):

- every owner's cycle is part 0 + part N+1 + Σ_{a<j≤b} t(j) + its transfers, which depend on
  (a, b) only, so the training loop of `costmodel` depends on the middle's partition only through
  M = max_i occ_i, and the period and training time are non-decreasing in M;
- a compute node's memory depends only on its own segment.

So for each (a, b) the best partition minimises M subject to each segment fitting in memory:

    H_1(c) = V(a+1, c)          H_s(c) = min_{c'<c} max(H_{s−1}(c'), V(c'+1, c))       M*(a, b) = H_N(b)

where V(u, v) is the load t(u) + … + t(v), or +∞ when the segment does not fit. With objective
"memory" the same recursion first runs on the segments' memory, then on the load restricted to
segments within the best memory. [Note: lexicographic objective] then picks (a, b), and the key
(the smallest a, then the smallest cut at each position) is read off suffix tables
G_s(c) = min-max of c+1..b in s segments: take the first cut that still admits a completion
within the tolerance band. Nodes go into the chain in name order, which is where the key puts
identical nodes.

With different nodes in a fixed order, position s uses its own node's V_s; `fixed_order_plan`
gives a good plan for one order (exact for the period when links are free and the owners' cuts
are given). `heuristic_plan` tries a few orders and improves the best by swapping nodes; its plan
is the MILP's first incumbent and its score bounds which segments the MILP needs at all.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import numpy as np

from p2psl.planning import costmodel
from p2psl.planning.memory import RUNTIME_OVERHEAD_BYTES, node_state_bytes
from p2psl.planning.plan import Plan
from p2psl.planning.problem import Problem, tied

INF = float("inf")


class SegmentTables:
    """Per-segment load and memory, indexed [u, v] for layers u..v (1-based, u ≥ 2); +∞ (or the
    int64 maximum for memory) where u > v."""

    def __init__(self, problem: Problem):
        self.problem = problem
        L, k, sizes = problem.num_layers, problem.copies, problem.sizes
        u = np.arange(L + 2)[:, None]
        v = np.arange(L + 1)[None, :]
        self.valid = (u >= 2) & (u <= v)
        self._uu, self._vv = np.minimum(u, L), np.minimum(v, L)
        par = np.concatenate([[0], np.cumsum(sizes.param_bytes, dtype=np.int64)])
        act = np.concatenate([[0], np.cumsum(sizes.act_bytes, dtype=np.int64)])
        before = np.array([0, 0, *sizes.act_bytes], dtype=np.int64)[np.minimum(u, L + 1)]
        uu, vv = self._uu, self._vv
        self._params, self._stash = par[vv] - par[uu - 1], act[vv] - act[uu - 1] + before
        self._mems: dict[tuple[int, int], np.ndarray] = {}
        self.mem = self.memory(k)
        self._load: dict[str, np.ndarray] = {}
        self._base: dict[tuple[int, int], costmodel.Workload] = {}
        self._floors: dict[tuple[str, ...], tuple[np.ndarray, dict[str, float]]] = {}

    def load(self, node: str) -> np.ndarray:
        """Seconds per owner batch (or micro-batch) of node's segment u..v (fwd + bwd + opt)."""
        if node not in self._load:
            prof = self.problem.timing[node]
            t = np.concatenate([[0.0], np.cumsum([prof.total(j) for j in range(self.problem.num_layers)])])
            self._load[node] = np.where(self.valid, t[self._vv] - t[np.maximum(self._uu - 1, 0)], INF)
        return self._load[node]

    def memory(self, copies: int, chains: int = 1) -> np.ndarray:
        """Peak bytes of a node running [u, v] for `copies` owners, in a plan of `chains` chains
        (`memory.peak_memory`: their float64 sums at the round end when there are several)."""
        if (copies, chains) not in self._mems:
            p = self.problem
            mem = (node_state_bytes(self._params, copies, p.replicas, p.micro_batches > 1)
                   + copies * self._stash + RUNTIME_OVERHEAD_BYTES + (2 * chains * self._params if chains > 1 else 0))
            self._mems[copies, chains] = np.where(self.valid, mem, np.iinfo(np.int64).max)
        return self._mems[copies, chains]

    def fits(self, node: str, mem: np.ndarray | None = None) -> np.ndarray:
        return (self.mem if mem is None else mem) <= self.problem.capacity(node)

    def cycle_floor(self, i: str, owners: tuple[str, ...] | None = None) -> np.ndarray:
        """[u, v] ↦ a lower bound on the longest owner cycle if i runs u..v: the owner's parts plus
        i's load plus, for the rest of the middle, each layer at its fastest node's time and each
        other node's least extra time over that for the one layer it must take. Segments above
        a feasible period cannot be in an optimal plan (c_k ≤ T). With `owners` (the owners of
        i's chain, [Note: several chains]) only theirs count, and of the other nodes the N/C − 1
        least extra times, whichever nodes share the chain."""
        if owners is None:
            floor, extra = self._owner_floor
            return floor + self.load(i) + sum(e for n, e in extra.items() if n != i)
        if owners not in self._floors:
            self._floors[owners] = self._floor(owners)
        floor, extra = self._floors[owners]
        rest = sorted(e for n, e in extra.items() if n != i)
        return floor + self.load(i) + sum(rest[:self.problem.hops - 1])

    @cached_property
    def _owner_floor(self) -> tuple[np.ndarray, dict[str, float]]:
        return self._floor(self.problem.owners)

    def _floor(self, owners) -> tuple[np.ndarray, dict[str, float]]:
        """max over `owners` with batches of min over (a, b) of their parts + the fastest
        times of the layers a+1..u−1 and v+1..b, as a matrix [u, v]; and each node's least extra
        time over the fastest."""
        p, L = self.problem, self.problem.num_layers
        times = np.array([[p.timing[n].total(j) for j in range(L)] for n in p.nodes])
        fastest = times.min(axis=0)
        extra = {n: float((times[x] - fastest).min()) for x, n in enumerate(p.nodes)}
        cum = np.concatenate([[0.0], np.cumsum(fastest)])
        in_a = np.isin(np.arange(L + 1), list(p.a_range))
        in_b = np.isin(np.arange(L + 1), list(p.b_range))
        floor = np.full((L + 2, L + 1), -np.inf)
        for o in (o for o in owners if p.batches[o] >= 1):
            own = np.concatenate([[0.0], np.cumsum([p.timing[o].total(j) for j in range(L)])])
            first = np.minimum.accumulate(np.where(in_a, own - cum, np.inf))        # min over a ≤ index
            last = np.minimum.accumulate(np.where(in_b, own[L] - own + cum, np.inf)[::-1])[::-1]  # b ≥ index
            head = np.concatenate([[np.inf], first + cum, [np.inf]])[: L + 2]          # a < u: first[u−1] + cum[u−1]
            tail = last - cum
            floor = np.maximum(floor, head[:, None] + tail[None, :])
        return floor, extra

    def score(self, a: int, b: int, m: float) -> tuple[float, float]:
        """(period, training seconds) of any partition of a+1..b over identical nodes whose
        largest load is m (only meaningful on an order-free chain)."""
        base = self._base.get((a, b))
        if base is None:
            base = self._base[(a, b)] = self._workload(a, b)
        loads = {**base.loads, "compute": {k: m for k in self.problem.owners}}
        work = costmodel.pipelined(costmodel.Workload(loads, base.cycles), self.problem.micro)
        loop = costmodel.closed_loop(work, self.problem.batches)
        return loop.period, loop.seconds

    def _workload(self, a: int, b: int) -> costmodel.Workload:
        p = self.problem
        n = len(p.nodes)
        plan = p.plan(a, list(p.nodes), [*range(a + 1, a + n), b])
        work = costmodel.workload(plan, p.topology, p.timing)
        return costmodel.Workload({r: v for r, v in work.loads.items() if r not in p.nodes}, work.cycles)


def admissible_pairs(problem: Problem) -> list[tuple[int, int]]:
    """(a, b) with room for every compute node and owners that fit in memory."""
    n = len(problem.nodes)
    return [(a, b) for a in problem.a_range for b in problem.b_range if b - a >= n and problem.owner_fits(a, b)]


# -- identical nodes -----------------------------------------------------------------------------

def solve_dp(problem: Problem) -> Plan | None:
    """The optimal plan, or None when no plan fits in memory. Needs `problem.homogeneous`."""
    if not problem.homogeneous:
        raise ValueError("the dynamic program needs identical compute nodes on an order-free chain")
    tables, n = SegmentTables(problem), len(problem.nodes)
    pairs = admissible_pairs(problem)
    fits = tables.fits(problem.nodes[0])
    if problem.objective == "memory":
        best_mem = minmax_all([np.where(fits, tables.mem.astype(float), INF)] * n, pairs)
        if not best_mem:
            return None
        fits = fits & tied(tables.mem.astype(float), min(best_mem.values()))
    load = np.where(fits, tables.load(problem.nodes[0]), INF)
    best = minmax_all([load] * n, pairs)
    if not best:
        return None
    return _lexicographic(problem, load, _thresholds(tables, best, load))


def minmax_all(values: list[np.ndarray], pairs: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """M*(a, b) for every pair with a finite value: position s of the chain uses values[s]."""
    out = {}
    for a in sorted({a for a, _ in pairs}):
        h = prefix_tables(values, a)[-1]
        for pa, b in pairs:
            if pa == a and h[b] < INF:
                out[(a, b)] = float(h[b])
    return out


def prefix_tables(values: list[np.ndarray], a: int, combine=np.maximum) -> list[np.ndarray]:
    """H_s(c) for s = 1..n: the best (min-max, or min-sum with combine=np.add) split of layers
    a+1..c into s segments."""
    h = values[0][a + 1].copy()
    out = [h]
    for matrix in values[1:]:
        h = combine(h[:, None], matrix[1:, :]).min(axis=0)
        out.append(h)
    return out


def backtrack(values: list[np.ndarray], tables: list[np.ndarray], b: int, combine=np.maximum) -> list[int]:
    """The last layer of each position of a best split found by `prefix_tables` (ending at b)."""
    lasts = [b]
    for s in range(len(values) - 1, 0, -1):
        end = lasts[0]
        lasts.insert(0, int(np.argmin(combine(tables[s - 1][:end], values[s][1:end + 1, end]))))
    return lasts


def _thresholds(tables: SegmentTables, best: dict[tuple[int, int], float], load: np.ndarray) -> dict[tuple[int, int], float]:
    """For each optimal (a, b): the largest segment load that keeps the plan tied with the best."""
    scores = {ab: tables.score(*ab, m) for ab, m in best.items()}
    top = min(s[0] for s in scores.values())
    if tables.problem.objective == "memory":
        def accept(ab, m):
            return tied(tables.score(*ab, m)[0], top)
    else:
        second = min(s[1] for s in scores.values() if tied(s[0], top))

        def accept(ab, m):
            s = tables.score(*ab, m)
            return tied(s[0], top) and tied(s[1], second)
    values = np.unique(load[np.isfinite(load)])
    return {ab: _largest(values, best[ab], lambda m, ab=ab: accept(ab, m)) for ab in best if accept(ab, best[ab])}


def _largest(values: np.ndarray, start: float, ok) -> float:
    """The largest v in sorted `values` (≥ start) with ok(v), given ok is monotone and ok(start)."""
    lo, hi = int(np.searchsorted(values, start)), len(values) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(float(values[mid])):
            lo = mid
        else:
            hi = mid - 1
    return max(float(values[lo]) if lo < len(values) else start, start)


def _lexicographic(problem: Problem, load: np.ndarray, thresholds: dict[tuple[int, int], float]) -> Plan:
    """The smallest key among the tied plans: smallest a, then the smallest cut at each position."""
    n = len(problem.nodes)
    a = min(a for a, _ in thresholds)
    alive = {b: thr for (pa, b), thr in thresholds.items() if pa == a}
    suffix = {b: _suffix(load, b, n) for b in alive}
    prev, lasts = a, []
    for position in range(1, n):
        for c in range(prev + 1, problem.num_layers):
            ok = {b: t for b, t in alive.items() if load[prev + 1, c] <= t and suffix[b][n - position][c] <= t}
            if ok:
                alive, prev = ok, c
                lasts.append(c)
                break
    b = min(b for b, t in alive.items() if load[prev + 1, b] <= t)
    return problem.plan(a, list(problem.nodes), [*lasts, b])


def _suffix(values: np.ndarray, b: int, n: int) -> list[np.ndarray]:
    """G_s(c) for s = 0..n−1: min-max of layers c+1..b split into s segments."""
    g = np.full(values.shape[1], INF)
    g[b] = 0.0
    out = [g]
    for _ in range(n - 1):
        g = np.maximum(values[1:, :], g[None, :]).min(axis=1)
        out.append(g)
    return out


# -- a fixed order of different nodes ------------------------------------------------------------

def fixed_order_plan(problem: Problem, order: list[str], tables: SegmentTables | None = None,
                     cuts: tuple[int, int] | None = None, above: float | None = None) -> Plan | None:
    """A good plan for this chain order (memory respected): (a, b) = `cuts`, or chosen by a cheap
    proxy of the period; then the split minimising max(K · M, C + S) with M the largest and S
    the sum of the node loads and C the slowest owner's parts, which is the period exactly when
    links are free. None when nothing fits, or when the period cannot come below `above`."""
    tables = tables or SegmentTables(problem)
    values = [np.where(tables.fits(i), tables.load(i), INF) for i in order]
    best = minmax_all(values, [cuts] if cuts else admissible_pairs(problem))
    if not best:
        return None
    owners = _owner_prefix(problem)
    proxy = _proxy(problem, tables, order, owners)
    a, b = min(best, key=lambda ab: (proxy(*ab, best[ab]), ab))
    if problem.objective != "time":
        return problem.plan(a, order, backtrack(values, prefix_tables(values, a), b))
    own = max(t[a] + t[-1] - t[b] for t in owners)
    k = sum(1 for o in problem.owners if problem.batches[o] >= 1)
    if above is not None and max(k * best[(a, b)], own + prefix_tables(values, a, np.add)[-1][b]) > above:
        return None
    return problem.plan(a, order, _period_split(values, a, b, best[(a, b)], own, k))


def _period_split(values: list[np.ndarray], a: int, b: int, least: float, own: float, k: int) -> list[int]:
    """Cuts minimising max(k · M, own + S) over thresholds m ≥ least on the segment loads: the
    sum-optimal split under m has S(m) non-increasing, so the best m is where k · m meets own + S(m)."""
    window = np.concatenate([v[a + 1: b + 1, a + 1: b + 1].ravel() for v in values])
    candidates = np.unique(window[np.isfinite(window) & (window >= least)])

    def split(m: float) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        masked = [np.where(v <= m, v, INF) for v in values]
        tables = prefix_tables(masked, a, np.add)
        return max(k * m, own + tables[-1][b]), masked, tables

    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if k * candidates[mid] >= own + split(float(candidates[mid]))[2][-1][b]:
            hi = mid
        else:
            lo = mid + 1
    options = [split(float(candidates[i])) for i in sorted({max(lo - 1, 0), lo})]
    _, masked, tables = min(options, key=lambda o: o[0])
    return backtrack(masked, tables, b, np.add)


def _owner_prefix(problem: Problem) -> list[np.ndarray]:
    """Per owner, the cumulative time of its first j layers (j = 0..L)."""
    out = []
    for k in problem.owners:
        prof = problem.timing[k]
        out.append(np.concatenate([[0.0], np.cumsum([prof.total(j) for j in range(problem.num_layers)])]))
    return out


def _proxy(problem: Problem, tables: SegmentTables, order: list[str], owners: list[np.ndarray]):
    """(a, b, M) ↦ max(K · M, the slowest owner's parts + the middle at the mean node speed)."""
    middle = sum(tables.load(i)[2:, :] for i in order) / len(order)

    def proxy(a: int, b: int, m: float) -> float:
        own = max(t[a] + t[-1] - t[b] for t in owners)
        return max(problem.copies * m, own + float(middle[a - 1, b]))
    return proxy


def heuristic_plan(problem: Problem, work: float = 2e8) -> Plan | None:
    """A good feasible plan: the best fixed-order plan over a few orders (the first the links
    allow, the nodes by speed either way), then improved by swapping two nodes of different
    speed whenever that helps. The number of orders tried is bounded by `work` / (N·L²), the cost
    of one, so the search is deterministic and cheap on large models."""
    tables = SegmentTables(problem)
    times = {i: problem.profiles[i].fwd + problem.profiles[i].bwd + problem.profiles[i].opt for i in problem.nodes}
    speed = {i: tables.load(i)[2, problem.num_layers] for i in problem.nodes}
    orders = [list(next(problem.topology.chain_orders())), sorted(problem.nodes, key=lambda i: (speed[i], i)),
              sorted(problem.nodes, key=lambda i: (-speed[i], i))]
    best = None
    for order in orders:
        best = _better(problem, tables, order, best)
    budget = int(work / (len(problem.nodes) * problem.num_layers ** 2))
    improved = best is not None
    while improved and budget > 0:
        current = best
        for x, y in itertools.combinations(range(len(problem.nodes)), 2):
            order = list(current[1].nodes)
            if times[order[x]] == times[order[y]] or budget <= 0:
                continue
            order[x], order[y] = order[y], order[x]
            budget -= 1
            best = _better(problem, tables, order, best, current[1])
        improved = best is not current
    return best[1] if best else None


def _better(problem: Problem, tables: SegmentTables, order: list[str], best, like: Plan | None = None):
    """best, or (score, plan) of this order's plan when it fits and scores lower. With `like`,
    the owners' cuts are kept from that plan (a cheap move for the local search)."""
    if not problem.valid_order(order):
        return best
    cuts = (like.owner_first[1], like.owner_last[0] - 1) if like is not None else None
    above = best[0][0] if best is not None and problem.objective == "time" else None
    plan = fixed_order_plan(problem, order, tables, cuts, above)
    if plan is None or not problem.fits(plan):
        return best
    score = problem.score(plan)
    return (score, plan) if best is None or score < best[0] else best
