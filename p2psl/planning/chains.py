"""Planning several chains side by side ([Note: several chains] in p2psl.planning.plan).

With `[training] chains = C` the compute nodes form C chains of N = (compute nodes) / C hops;
with `chains = "auto"` the planner tries every C that divides the compute nodes (and has an
owner for each chain) and keeps the plan with the best score, one chain on a tie. For each C:

- **routes**: owners are dealt to the chains by their batches per round, the owner with most
  batches first (among equals, the slower first: the larger time of the whole model in its
  profile), each to the chain with the fewest batches so far (ties: the lower chain), so that the
  chains' loads are balanced whatever the owners' samples, and slow owners are spread over them;
- **nodes and cuts**: every arrangement of the compute nodes into C chains (orders the links
  allow, identical nodes kept in name order) and every shared segmentation is scored by the cost
  model over all the chains at once (`costmodel` merges their workloads: a link or a machine
  that several chains use serves all of them), and the best is selected by the planner's
  lexicographic rule ([Note: lexicographic objective]); the key puts fewer chains first.

This is an exhaustive search: it is exact for the routes it is given, and `SEARCH_LIMIT` bounds
the plans it scores (more raise `PlanError`, naming the count). One chain is planned as always
(`planner`), so a one-chain deployment gets the plan it had before.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace

from p2psl.errors import PlanError, PlanInfeasible
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


def solve_chains(problem: Problem) -> Plan | None:
    """The best plan of several chains (module docstring), or None if none fits."""
    if not chain_counts(problem):
        return None
    if math.factorial(len(problem.nodes)) > SEARCH_LIMIT:
        raise PlanError(f"planning several chains of {len(problem.nodes)} compute nodes would try "
                        f"{math.factorial(len(problem.nodes)):,} orders of them (at most {SEARCH_LIMIT:,})")
    searches = []
    for chains in chain_counts(problem):
        sub = replace(problem, chains=chains)
        routed = routes(sub, chains)
        searches.append((sub, routed, list(arrangements(sub, chains, routed))))
    counted = sum(len(orders) * _splits_count(sub) for sub, _, orders in searches)
    if counted > SEARCH_LIMIT:
        raise PlanError(f"planning several chains would score {counted:,} plans (at most {SEARCH_LIMIT:,}): "
                        "set [training] chains to a number, or first_cut and last_cut")
    candidates = []
    for sub, routed, orders in searches:
        for order in orders:
            for plan in _splits(sub, order, sub.chains, routed):
                if sub.fits(plan):
                    candidates.append((sub.score(plan), (sub.chains, *sub.key(plan)), plan))
    return select(candidates)


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
