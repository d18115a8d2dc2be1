"""Choosing the split: which layers the owners keep and which compute node runs which segment.

Every peer runs `make_plan` on the same topology, profiles and sample counts at start-up and the
peers compare `Plan.digest`, so planning is deterministic: HiGHS runs single-threaded with a
fixed seed, and ties are broken by a fixed rule rather than by whichever optimum a solver finds
first ([Note: lexicographic objective] in `planner_problem`).

The problem. Choose a (the end of the owners' part 0, unless first_cut fixes it), b (the end of
the middle, unless last_cut fixes it), and for every compute node a non-empty contiguous segment
of a+1..b, their order forming a chain that `Topology.chain_orders` allows, so as to

    objective "time":   minimise the period P = max( max_r Σ_k ℓ_{r,k}, max_k c_k ), then the
                        training time of a round (`costmodel` has the formulas)
    objective "memory": minimise the largest compute node's peak memory, then P

subject to every peer's predicted peak memory (`peak_memory`: K copies of weights and
momentum, one set of gradients, the replica snapshot on its way to a neighbour, the activations
stashed for K owners in flight, and overhead) being within its capacity. In the
compute-bound case this is SPEC §5's  min T,  T ≥ K · speed_i⁻¹ · Σ_{j ∈ S_i} (fwd_j + bwd_j + opt_j).

Three methods give the same plan:

- `plan_milp`: a linear MILP for HiGHS with a cumulative 0/1 encoding of the segments
  (`planner_milp` holds the formulation); handles different nodes, links and chain orders;
- `plan_dp`: an exact dynamic program when the compute nodes are identical and the chain's
  order does not matter (`planner_dp`); `method="auto"` uses it when it applies;
- `plan_bruteforce`: enumerates every plan; for tests, and `method="auto"` uses it where there
  are at most `EXHAUSTIVE_UP_TO` plans to score (a re-plan with the owners' cuts fixed: 6 for
  three compute nodes over three layers), which it does in milliseconds where HiGHS takes tens
  of them — and every peer re-plans after every round ([Note: calibration]).

When nothing fits, `PlanInfeasible` names the binding constraint (`explain_infeasible`); the
planner never falls back silently. `even_plan` is the paper's equal-layer baseline, used before
any profile is known.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import replace

from p2psl.planning import costmodel
from p2psl.planning.memo import Memo, items
from p2psl.planning.memory import owner_memory, peak_memory
from p2psl.errors import PlanError, PlanInfeasible
from p2psl.planning.plan import Plan, plan_from_cuts
from p2psl.planning.dp import solve_dp
from p2psl.planning.milp import solve_milp
from p2psl.planning.chains import chain_counts, check_count, search, search_size
from p2psl.planning.cost import plan_for_cost
from p2psl.planning.problem import REL_TOL, Problem, select, structure_problem
from p2psl.planning.profile import Profile
from p2psl.topology import Topology
from p2psl.units import format_bytes, layers, plural, span

METHODS = ("auto", "milp", "dp", "bruteforce")
#: "auto" scores every plan when there are at most this many (chain orders × cuts × owner cuts)
EXHAUSTIVE_UP_TO = 64


def make_plan(topology: Topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
              objective: str | None = None, method: str = "auto",
              test_samples: Mapping[str, int] | None = None) -> Plan:
    """The optimal plan, with its predicted period, round time and peak memory filled in.

    `profiles` are per peer (as from `profile.peer_profiles`); `samples` are training samples per
    owner; `objective` defaults to the topology's ``[training] objective``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if (objective or topology.training.objective) == "cost":  # [Note: the cost objective]
        plan = plan_for_cost(topology, profiles,
                             lambda sub: make_plan(sub, profiles, samples, "time", method, test_samples))
        return replace(plan, objective="cost")
    key = (topology, items(profiles), items(samples), objective, method, items(test_samples))
    return _PLANS.get(key, lambda: _plan(topology, profiles, samples, objective, method, test_samples))


#: [Note: one answer per process]
_PLANS = Memo(16)


def _plan(topology: Topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
          objective: str | None, method: str, test_samples: Mapping[str, int] | None) -> Plan:
    problem = Problem.build(topology, profiles, samples, objective, test_samples)
    if problem.chains != 1:
        if method == "dp":
            raise ValueError("several chains are planned by the MILP or by search (method auto, milp or bruteforce), not dp")
        return _solve(problem, method)
    return _solve(problem, _method(problem, method))


def _method(problem: Problem, method: str) -> str:
    if method == "auto":
        return "dp" if problem.homogeneous else "bruteforce" if _few_plans(problem) else "milp"
    return method


def _few_plans(problem: Problem) -> bool:
    """Whether the brute force has at most `EXHAUSTIVE_UP_TO` plans to score. (Beyond six compute
    nodes the MILP, whatever the count: finding the few chain orders a sparse set of links
    allows could walk a great many partial chains.)"""
    n = len(problem.nodes)
    if n > 6:
        return False
    splits = sum(math.comb(b - a - 1, n - 1) for a in problem.a_range for b in problem.b_range if b - a >= n)
    if splits == 0:
        return False  # no plan at all: the MILP's explanation names why
    orders = itertools.islice(problem.topology.chain_orders(), EXHAUSTIVE_UP_TO // splits + 1)
    return splits * sum(1 for _ in orders) <= EXHAUSTIVE_UP_TO


def plan_milp(topology: Topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
              objective: str | None = None) -> Plan:
    return make_plan(topology, profiles, samples, objective, "milp")


def plan_dp(topology: Topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
            objective: str | None = None) -> Plan:
    """The dynamic program; ValueError unless the nodes are identical on an order-free chain."""
    return make_plan(topology, profiles, samples, objective, "dp")


def plan_bruteforce(topology: Topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                    objective: str | None = None) -> Plan:
    """Every plan scored by the cost model itself; exponential, for tests."""
    return make_plan(topology, profiles, samples, objective, "bruteforce")


def _solve(problem: Problem, method: str) -> Plan:
    broken = structure_problem(problem)
    if broken is not None:
        raise broken
    plan = finish(problem, _search(problem, method), method)
    for m in _worth_cutting(problem, plan):  # "auto": plan the cuts again for m micro-batches
        micro = replace(problem, micro_batches=m)
        try:
            cut = finish(micro, _search(micro, method), method)
        except PlanError:  # infeasible, or the solver failed: the same on every peer, whole batches stand
            continue
        if cut.round_seconds < plan.round_seconds * (1 - REL_TOL):
            plan = cut
    return plan


def _search(problem: Problem, method: str) -> Plan:
    if problem.chains != 1:
        return _search_chains(problem, method)
    solve = {"dp": solve_dp, "milp": solve_milp, "bruteforce": solve_bruteforce}[method]
    plan = solve(problem)
    if plan is None:
        raise explain_infeasible(problem)
    return plan


def _search_chains(problem: Problem, method: str) -> Plan:
    """Several chains ([Note: several chains]): C of them, or with "auto" the best of one chain
    (planned as always) and every C that `chains.chain_counts` allows (`_best_count`). The
    plan's `method` says how its chains were planned."""
    if problem.chains > 1:
        check_count(problem, problem.chains)
    candidates = []
    one = replace(problem, chains=1)
    if problem.chains == 0 and structure_problem(one) is None:  # too few layers for one chain: skipped, like counts below
        try:
            plan = replace(_search(one, _method(one, method)), method=_method(one, method))
            candidates.append((problem.score(plan), (1, *problem.key(plan)), plan))
        except PlanInfeasible:
            pass
    for count in chain_counts(problem):
        sub = replace(problem, chains=count)
        if structure_problem(sub) is not None or not sub.a_range or not sub.b_range:
            continue  # too few layers for chains of this length ("auto" only: a given count was checked)
        how = _chains_method(sub, method)
        plan = search(sub) if how == "bruteforce" else solve_milp(sub)
        if plan is not None:
            plan = replace(plan, method=how)
            candidates.append((problem.score(plan), (count, *problem.key(plan)), plan))
    plan = _best_count(problem, candidates) if problem.chains == 0 else select(candidates)
    if plan is None:
        raise PlanInfeasible(f"no arrangement of the compute nodes into {problem.chains or 'any number of'} "
                             "chains fits every memory capacity and the links")
    return plan


def _best_count(problem: Problem, candidates: list[tuple]) -> Plan | None:
    """"auto": the chain count to plan with, from each count's best plan.

    Under the time objective, the plan whose whole round the cost model predicts shortest, the
    runtime's per-task and per-message costs included (fewer chains on a tie within `REL_TOL`).
    The planner's objective leaves those costs out because they are nearly the same for every
    split of one chain; they are not for different counts, since a chain of h nodes costs each
    batch 2(h + 1) messages. Where the peers share a machine they decide it: four owners of the
    digits CNN on two nodes of one two-core machine, one chain of two 0.50–0.54 s a round, two
    chains of one 0.37–0.40 s, where the objective ties them. Under the memory objective, the
    shared selection rule ([Note: lexicographic objective])."""
    if problem.objective != "time" or len(candidates) < 2:
        return select(candidates)
    best: tuple[float, Plan] | None = None
    for _, _, plan in sorted(candidates, key=lambda c: c[1]):  # by count first
        seconds = costmodel.predict(replace(plan, micro_batches=problem.micro_batches), problem.topology,
                                    problem.profiles, problem.samples_for_score, problem.test_samples).round_seconds
        if best is None or seconds < best[0] * (1 - REL_TOL):
            best = (seconds, plan)
    return None if best is None else best[1]


#: `faster_chains` names another chain count where its rounds are predicted this much shorter
HINT_GAIN = 0.10


def faster_chains(topology: Topology, profiles: Mapping[str, Profile], samples: Mapping[str, int],
                  plan: Plan) -> Plan | None:
    """For a deployment held to one chain (`chains = 1`, the default) of several compute nodes,
    under the time objective: the plan `chains = "auto"` makes, where it has several chains and
    the cost model predicts its rounds at least `HINT_GAIN` shorter than `plan`'s — what
    `p2psl plan` suggests. None where finding it would take more than a quick search (the
    several-chain counts' searches together scoring at most `SEARCH_UP_TO` plans, whole batches):
    a hint must not make planning slow."""
    cfg = topology.training
    if (cfg.chains != 1 or cfg.mode != "split" or cfg.objective != "time" or cfg.micro_batches == 0
            or len(plan.nodes) < 2):
        return None
    auto = topology.with_changes(chains=0)
    try:  # a count that cannot be planned is no hint: every failure of the planner is a PlanError
        problem = Problem.build(auto, profiles, samples)
        counts = [replace(problem, chains=c) for c in chain_counts(problem)]
        counts = [sub for sub in counts if structure_problem(sub) is None and sub.a_range and sub.b_range]
        if not counts or sum(search_size(sub) for sub in counts) > SEARCH_UP_TO:
            return None
        other = make_plan(auto, profiles, samples)
    except PlanError:
        return None
    return other if other.chains > 1 and other.round_seconds <= (1 - HINT_GAIN) * plan.round_seconds else None


#: "auto" searches several chains where that scores at most this many plans, else runs the MILP
SEARCH_UP_TO = 2_000


def _chains_method(problem: Problem, method: str) -> str:
    """How `problem.chains` chains are planned: "auto" searches where there are few plans."""
    if method != "auto":
        return method
    return "bruteforce" if search_size(problem) <= SEARCH_UP_TO else "milp"


def finish(problem: Problem, plan: Plan, method: str) -> Plan:
    """The plan with its micro-batches and the cost model's predictions attached."""
    plan = replace(plan, micro_batches=problem.micro_batches)
    if problem.chains != 1:
        method = plan.method  # how the chosen chains were planned
    prediction = costmodel.predict(plan, problem.topology, problem.profiles, problem.samples_for_score,
                                   problem.test_samples)
    memory = peak_memory(plan, problem.topology, problem.profiles)
    return Plan(plan.num_layers, plan.owner_first, plan.owner_last, plan.chain, plan.owners,
                period_seconds=prediction.period_seconds, round_seconds=prediction.round_seconds,
                peak_memory_bytes=memory, method=method, objective=problem.objective,
                expected_period_seconds=prediction.expected_period_seconds, micro_batches=plan.micro_batches,
                chains=plan.chains, routes=plan.routes)


#: the numbers of micro-batches `micro_batches = "auto"` chooses from
MICRO_BATCH_CHOICES = (1, 2, 4, 8, 16)


def _worth_cutting(problem: Problem, plan: Plan) -> list[int]:
    """With `micro_batches = "auto"`, the numbers of micro-batches (from `MICRO_BATCH_CHOICES`, at
    most the batch size) for which the planner plans the cuts again, keeping the plan whose
    predicted round is the shortest (whole batches on a tie within the planner's tolerance). Each
    is planned for its own cuts: with few owners the whole-batch cuts are any of many tied splits,
    and judging m by them would judge it by the worst pipeline. None in a federated-averaging run
    (no chain to overlap), under the memory objective, or where a compute node could not hold
    every owner's gradients at once ([Note: micro-batches])."""
    cfg = problem.topology.training
    if cfg.micro_batches != 0 or cfg.mode != "split" or problem.objective == "memory":
        return []
    cut = replace(plan, micro_batches=2)
    if any(need > problem.capacity(name) for name, need in peak_memory(cut, problem.topology, problem.profiles).items()):
        return []
    return [m for m in MICRO_BATCH_CHOICES[1:] if m <= cfg.batch_size]


# -- brute force ---------------------------------------------------------------------------------

def solve_bruteforce(problem: Problem) -> Plan | None:
    """Score every (a, b, chain order, cuts) and select by the shared rule.

    Orders in which identical nodes appear out of name order are skipped: swapping them gives
    the same scores and a larger key, so they can never be selected.
    """
    n, candidates = len(problem.nodes), []
    orders = [o for o in dict.fromkeys(problem.topology.chain_orders()) if _canonical(problem, o)]
    for a in problem.a_range:
        for b in problem.b_range:
            if b - a < n or not problem.owner_fits(a, b):
                continue
            for cuts in itertools.combinations(range(a + 1, b), n - 1):
                for order in orders:
                    plan = problem.plan(a, list(order), [*cuts, b])
                    if problem.fits(plan):
                        candidates.append((problem.score(plan), problem.key(plan), plan))
    return select(candidates)


def _canonical(problem: Problem, order: tuple[str, ...]) -> bool:
    position = {node: index for index, node in enumerate(order)}
    return all(position[x] < position[y] for group in problem.classes for x, y in zip(group, group[1:]))


# -- the even split ------------------------------------------------------------------------------

def even_plan(topology: Topology, num_layers: int, profiles: Mapping[str, Profile] | None = None,
              samples: Mapping[str, int] | None = None) -> Plan:
    """The paper's baseline: owners keep first_cut / last_cut (default: one layer at each end)
    and the compute nodes, in the first chain order the links allow, get equal numbers of
    layers (the first ones one more when it does not divide). With profiles, the predictions
    are filled in; memory is not checked."""
    cfg = topology.training
    a = cfg.first_cut if cfg.first_cut is not None else 1
    b = cfg.last_cut if cfg.last_cut is not None else num_layers - 1
    chain = list(next(topology.chain_orders()))
    n, middle = len(chain), b - a
    if middle < n or b >= num_layers:
        raise PlanInfeasible(f"{layers(a + 1, b) if b > a else 'no layers'} of {num_layers} cannot give each of "
                             f"{plural(n, 'compute node')} a layer")
    sizes = [middle // n + (1 if s < middle % n else 0) for s in range(n)]
    lasts = list(itertools.accumulate(sizes, initial=a))[1:]
    owners = [p.name for p in topology.owners]
    plan = plan_from_cuts([a, *lasts], chain, owners, num_layers, method="even")
    if profiles is None:
        return plan
    problem = Problem.build(topology, profiles, samples or {}, None)
    return finish(problem, plan, "even")


# -- explaining infeasibility --------------------------------------------------------------------

def explain_infeasible(problem: Problem) -> PlanInfeasible:
    """Name the constraint that binds: the owners' memory for their smallest parts, else the peer
    that overflows most in the split that needs the least memory relative to capacity."""
    broken = structure_problem(problem) or _owner_overflow(problem)
    if broken is not None:
        return broken
    plan = solve_milp(problem, mode="ratio")
    if plan is None:
        return PlanInfeasible("no plan satisfies the chain's links and every memory capacity")
    memory = peak_memory(plan, problem.topology, problem.profiles)
    name = max(memory, key=lambda p: (memory[p] / problem.capacity(p), p))
    if memory[name] <= problem.capacity(name):
        return PlanInfeasible("no plan fits every memory capacity at once")
    need, have = format_bytes(memory[name]), format_bytes(problem.capacity(name))
    nodes = [s.node for s in plan.chain]
    total = sum(memory[i] for i in nodes)
    capacity = sum(problem.capacity(i) for i in nodes)
    if name in problem.owners:
        what = _owner_parts(plan.owner_first[1], plan.owner_last[0] - 1, plan.num_layers)
        return PlanInfeasible(f"{name} needs {need} for {what}, has {have} (in the split that needs the least "
                              f"memory for its capacity)")
    stage = plan.chain[plan.part_of(name) - 1]
    return PlanInfeasible(
        f"{name} needs {need} for {problem.copies} copies of {layers(stage.first, stage.last)}, has {have} "
        f"(in the split that needs the least memory for its capacity; the compute nodes need "
        f"{format_bytes(total)} in all, have {format_bytes(capacity)})")


def _owner_overflow(problem: Problem) -> PlanInfeasible | None:
    n = len(problem.nodes)
    pairs = [(a, b) for a in problem.a_range for b in problem.b_range if b - a >= n]
    need, a, b = min((owner_memory(problem.sizes, a, b, problem.copies), a, b) for a, b in pairs)
    for owner in problem.owners:
        if need > problem.capacity(owner):
            return PlanInfeasible(f"{owner} needs {format_bytes(need)} for {_owner_parts(a, b, problem.num_layers)} "
                                  f"(its smallest possible parts), has {format_bytes(problem.capacity(owner))}")
    return None


def _owner_parts(a: int, b: int, num_layers: int) -> str:
    """'layers 1–2 and 37' for part 0 = 1..a and part N+1 = b+1..num_layers."""
    return f"{layers(1, a)} and {span(b + 1, num_layers)}"
