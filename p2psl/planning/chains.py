"""Planning several chains side by side ([Note: several chains] in p2psl.planning.plan).

With `[training] chains = C` the compute nodes form C chains of N = (compute nodes) / C hops;
with `chains = "auto"` the planner tries every C that divides the compute nodes (and has an
owner for each chain) besides one chain, and keeps the count whose best plan's whole round the
cost model predicts shortest (`planner._best_count`: the runtime's costs per message decide
between chains of different length). For each C, its best plan:

- **routes**: owners are dealt to the chains by their batches per round, the owner with most
  batches first (among equals, the slower first: the larger time of the whole model in its
  profile), each to the chain with the fewest batches so far (ties: the lower chain), so that the
  chains' loads are balanced whatever the owners' samples, and slow owners are spread over them;
- **nodes and cuts**: which nodes form each chain, in which order, and the segmentation all the
  chains share, scored by the cost model over all the chains at once (`costmodel` merges their
  workloads: a link or a machine that several chains use serves all of them) and selected by the
  planner's lexicographic rule ([Note: lexicographic objective]); the key puts fewer chains
  first, and after every node's last layer, every node's chain.

Two methods find that plan. The planner's MILP (p2psl.planning.milp, with the chain index on
every column) is exact for the routes it is given; `search` scores every arrangement (orders the
links allow, identical nodes in name order) and every shared split, up to `SEARCH_LIMIT` plans,
and is the MILP's test oracle and the planner's choice where there are few plans. `heuristic`
gives the MILP its first incumbent. One chain is planned as always (`planner`), so a one-chain
deployment gets the plan it had before.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from p2psl.errors import PlanError, PlanInfeasible
from p2psl.planning.dp import INF, SegmentTables, backtrack, prefix_tables
from p2psl.planning.plan import Plan, Stage
from p2psl.planning.problem import Problem, select
from p2psl.topology.model import chain_count_problems

#: the most plans of several chains the search scores, over every number of chains tried
SEARCH_LIMIT = 200_000


def chain_counts(problem: Problem) -> list[int]:
    """The numbers of chains to plan for: the configured one, or with "auto" (0) every C > 1
    that divides the compute nodes and leaves each chain an owner (one chain is planned apart)."""
    n, k = len(problem.nodes), len(problem.owners)
    if problem.chains > 0:
        return [problem.chains]
    return [c for c in range(2, n + 1) if n % c == 0 and c <= k]


def check_count(problem: Problem, chains: int) -> None:
    """`PlanInfeasible` when `chains` chains of equal length cannot be built."""
    problems = chain_count_problems(chains, len(problem.nodes), len(problem.owners))
    if problems:
        raise PlanInfeasible("; ".join(problems))


def chains_left(chains: int) -> int:
    """The chains to re-plan for when compute nodes are gone ([Note: recovery]): one chain stays
    one chain; several become "auto", the best number the nodes left can form (two chains of two
    that lose a node become one chain of three, or three chains of one where the middle has
    fewer than three layers), and owners may change chain."""
    return 1 if chains == 1 else 0


def routes(problem: Problem, chains: int) -> tuple[int, ...]:
    """Each owner's chain, in the order of `problem.owners` (module docstring, "routes")."""
    batches = problem.batches
    slowness = {o: sum(problem.profiles[o].total(j) for j in range(problem.num_layers)) for o in problem.owners}
    load = [0] * chains
    out: dict[str, int] = {}
    for owner in sorted(problem.owners, key=lambda o: (-batches.get(o, 0), -slowness[o], o)):
        chain = min(range(chains), key=lambda c: (load[c], c))
        out[owner] = chain
        load[chain] += max(batches.get(owner, 0), 1)
    return tuple(out[o] for o in problem.owners)


def arrangements(problem: Problem, chains: int, routed: tuple[int, ...]) -> Iterator[tuple[str, ...]]:
    """The compute nodes as C chains laid end to end, each chain's order one the links allow for
    its owners; of arrangements that differ only by swapping identical nodes, the one that lists
    them in name order."""
    hops = len(problem.nodes) // chains
    owners = [tuple(o for o, r in zip(problem.owners, routed) if r == c) for c in range(chains)]
    rank = {node: (index, node) for index, group in enumerate(problem.classes) for node in group}
    for order in itertools.permutations(problem.nodes):
        if not _canonical(order, rank):
            continue
        paths = [order[c * hops:(c + 1) * hops] for c in range(chains)]
        if all(problem.valid_order(path, owners[c]) for c, path in enumerate(paths)):
            yield order


def _canonical(order: tuple[str, ...], rank: dict[str, tuple[int, str]]) -> bool:
    """Identical nodes (one class) appear in name order."""
    seen: dict[int, str] = {}
    for node in order:
        group, name = rank[node]
        if group in seen and seen[group] > name:
            return False
        seen[group] = name
    return True


def search_size(problem: Problem) -> int:
    """How many plans `search` would score for `problem.chains` chains (without listing the
    arrangements when the nodes' orders alone exceed `SEARCH_LIMIT`)."""
    if math.factorial(len(problem.nodes)) > SEARCH_LIMIT:
        return math.factorial(len(problem.nodes)) * max(_splits_count(problem), 1)
    routed = routes(problem, problem.chains)
    return sum(1 for _ in arrangements(problem, problem.chains, routed)) * _splits_count(problem)


def search(problem: Problem) -> Plan | None:
    """The best plan of `problem.chains` > 1 chains by scoring every arrangement and shared
    split (module docstring), or None if none fits; `PlanError` beyond `SEARCH_LIMIT` plans."""
    size = search_size(problem)
    if size > SEARCH_LIMIT:
        raise PlanError(f"searching {problem.chains} chains of {len(problem.nodes)} compute nodes would score "
                        f"{size:,} plans (at most {SEARCH_LIMIT:,}): plan them with the MILP (method auto or milp)")
    routed = routes(problem, problem.chains)
    candidates = []
    for order in arrangements(problem, problem.chains, routed):
        for plan in _splits(problem, order, problem.chains, routed):
            if problem.fits(plan):
                candidates.append((problem.score(plan), problem.key(plan), plan))
    return select(candidates)


def heuristic(problem: Problem, budget: int = 200) -> Plan | None:
    """A good feasible plan of `problem.chains` chains, the MILP's first incumbent and bound:
    for three arrangements (the first in name order the links allow, and the nodes by speed, the
    fastest C at the first position, one per chain, or the slowest), then for arrangements that swap two
    different nodes of the best while that helps (at most `budget` of them), the shared split that
    minimises the largest load of a position (a node's load counting its chain's owners), scored
    for the few owners' cuts that a cheap proxy ranks first; the best by the score."""
    hops, chains = problem.hops, problem.chains
    split = _Splitter(problem)
    whole = {i: float(split.tables.load(i)[2, problem.num_layers]) for i in problem.nodes}
    by_speed = sorted(problem.nodes, key=lambda i: (whole[i], i))
    fast = [by_speed[h * chains + c] for c in range(chains) for h in range(hops)]
    slow = [by_speed[::-1][h * chains + c] for c in range(chains) for h in range(hops)]
    # the first arrangement the links allow, where listing the orders is cheap (else name order)
    small = math.factorial(len(problem.nodes)) <= SEARCH_LIMIT
    first = next(arrangements(problem, chains, split.routed), None) if small else problem.nodes
    best = None
    for order in (first, fast, slow):
        found = None if order is None else split(_in_name_order(problem, order))
        best = _better(best, found if found is None else _climb(problem, found))
    improved = best is not None
    while improved and budget > 0:
        improved, current = False, best
        for x, y in itertools.combinations(range(len(problem.nodes)), 2):
            order = [s.node for s in current[2].chain]
            if budget <= 0 or problem.identical(order[x], order[y]):
                continue
            order[x], order[y] = order[y], order[x]
            budget -= 1
            found = split(_in_name_order(problem, order))
            best = _better(best, found if found is None else _climb(problem, found))
        improved = best is not current
    return best[2] if best else None


def _climb(problem: Problem, best, moves: int = 1000):
    """(score, key, plan) after moving one cut by a layer at a time while the score improves (at
    most `moves` times: ties within the tolerance need not be transitive)."""
    improved = True
    while improved and moves > 0:
        moves -= 1
        improved, plan = False, best[2]
        bounds = [plan.owner_first[1], *(s.last for s in plan.paths[0])]
        for index in range(len(bounds)):
            for step in (-1, 1):
                moved = list(bounds)
                moved[index] += step
                candidate = _cut(problem, plan, moved)
                if candidate is not None and _better(best, candidate) is candidate:
                    best, improved = candidate, True
    return best


def _cut(problem: Problem, plan: Plan, bounds: list[int]):
    """(score, key, plan) of `plan`'s arrangement cut at `bounds` (a, each position's last layer),
    or None where that is no plan or does not fit."""
    a, b = bounds[0], bounds[-1]
    if (a not in problem.a_range or b not in problem.b_range or any(x >= y for x, y in zip(bounds, bounds[1:]))
            or not problem.owner_fits(a, b)):
        return None
    hops = problem.hops
    chain = tuple(Stage(s.node, bounds[i % hops] + 1, bounds[i % hops + 1]) for i, s in enumerate(plan.chain))
    moved = replace(plan, owner_first=(1, a), owner_last=(b + 1, plan.num_layers), chain=chain)
    return (problem.score(moved), problem.key(moved), moved) if problem.fits(moved) else None


def _better(best, candidate):
    if candidate is None or (best is not None and select([best, candidate]) is best[2]):
        return best
    return candidate


class _Splitter:
    """`heuristic`'s split of one arrangement: (score, key, plan) or None when nothing fits."""

    def __init__(self, problem: Problem):
        self.problem = p = problem
        self.routed = routes(p, p.chains)
        self.owners = [tuple(o for o, r in zip(p.owners, self.routed) if r == c) for c in range(p.chains)]
        self.tables = SegmentTables(p)
        self.mems = [self.tables.memory(len(lane), p.chains) for lane in self.owners]
        self.served = [max(sum(1 for o in lane if p.batches[o] >= 1), 1) for lane in self.owners]
        self.own, self.tail = _owners_parts(p)
        self.pairs = [(a, b) for a in p.a_range for b in p.b_range if b - a >= p.hops and p.owner_fits(a, b)]

    def __call__(self, order: tuple[str, ...]):
        p, hops, chains, tables = self.problem, self.problem.hops, self.problem.chains, self.tables
        if not all(p.valid_order(order[c * hops:(c + 1) * hops], self.owners[c]) for c in range(chains)):
            return None
        values = [np.max([np.where(tables.fits(order[c * hops + h], self.mems[c]),
                                   self.served[c] * tables.load(order[c * hops + h]), INF)
                          for c in range(chains)], axis=0) for h in range(hops)]
        middle = sum(tables.load(i) for i in order) * hops / len(order)
        tops = {a: prefix_tables(values, a)[-1] for a in sorted({a for a, _ in self.pairs})}
        proxy = {(a, b): max(tops[a][b], self.own[a] + self.tail[b] + middle[a + 1, b])
                 for a, b in self.pairs if tops[a][b] < INF}
        candidates = []
        for a, b in sorted(proxy, key=lambda ab: (proxy[ab], ab))[:4]:  # the best by the proxy, scored
            bounds = [a, *backtrack(values, prefix_tables(values, a), b)]
            chain = tuple(Stage(node, bounds[i % hops] + 1, bounds[i % hops + 1]) for i, node in enumerate(order))
            plan = Plan(p.num_layers, (1, a), (b + 1, p.num_layers), chain, p.owners,
                        micro_batches=p.micro_batches, chains=chains, routes=self.routed)
            if p.fits(plan):
                candidates.append((p.score(plan), p.key(plan), plan))
        plan = select(candidates)
        return None if plan is None else next(c for c in candidates if c[2] is plan)


def _owners_parts(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """The slowest owner's time for layers 1..a, and for b+1..L, by a and by b (a bound on the
    cycles for `heuristic`'s proxy, each maximised apart)."""
    L = problem.num_layers
    cum = [np.concatenate([[0.0], np.cumsum([problem.timing[o].total(j) for j in range(L)])]) for o in problem.owners]
    return np.max(cum, axis=0), np.max([t[L] - t for t in cum], axis=0)


def _in_name_order(problem: Problem, order: list[str]) -> tuple[str, ...]:
    """The arrangement with identical nodes swapped into name order (which changes nothing else)."""
    order = list(order)
    for group in problem.classes:
        slots = [index for index, node in enumerate(order) if node in group]
        for index, node in zip(slots, sorted(order[i] for i in slots)):
            order[index] = node
    return tuple(order)


def _splits_count(problem: Problem) -> int:
    """How many shared segmentations `_splits` yields for `problem.chains` chains."""
    hops = problem.hops
    return sum(math.comb(b - a - 1, hops - 1) for a in problem.a_range for b in problem.b_range if b - a >= hops)


def _splits(problem: Problem, order: tuple[str, ...], chains: int, routed: tuple[int, ...]) -> Iterator[Plan]:
    hops = problem.hops
    for a in problem.a_range:
        for b in problem.b_range:
            if b - a < hops or not problem.owner_fits(a, b):
                continue
            for cuts in itertools.combinations(range(a + 1, b), hops - 1):
                bounds = [a, *cuts, b]
                chain = tuple(Stage(node, bounds[i % hops] + 1, bounds[i % hops + 1]) for i, node in enumerate(order))
                yield Plan(problem.num_layers, (1, a), (b + 1, problem.num_layers), chain, problem.owners,
                           micro_batches=problem.micro_batches, chains=chains, routes=routed)
