"""The cheapest round: which compute nodes to pay for ([training] objective = "cost").

[Note: the cost objective] A compute node may carry a price per hour (`[[peer]] price = 0.40`, in
any currency; none: free). With `objective = "cost"` the planner chooses which compute nodes to
use as well as the split, so as to minimise the predicted cost of a round

    cost(S) = round(S) · Σ_{i ∈ S} price_i / 3600

over every non-empty set S of compute nodes, where round(S) is the predicted round time of the
best plan over S alone (the time objective, with the topology's `chains`, cuts and micro-batches),
optionally under `deadline = "120s"`: only sets whose predicted round is within the deadline
count. Cost is a product of a time and a price, so no single linear program holds it; the sets are
few (at most `MAX_NODES` compute nodes: 255 sets) and each is planned exactly, so the choice is
exact for the predictions. Costs within the planner's tie tolerance are tied, and go to the
faster round, then to fewer nodes, then to the set first by name. Each set is planned over the
topology without the nodes left out: a route through one of them is not used in planning (the
runtime would relay through it), and their share of the round end's messages is not counted.
A deadline holds after a failure too: when no set of the nodes left meets it, the deployment
stops, naming the fastest plan left. A node left out idles: it takes part in every round's cut and hears the reports,
and the re-planning after a lost node is over every node left, so it may take over layers whose
state survives (replicas go from a used node to the next used one: a plan of one compute node
keeps none, and losing that node stops the deployment with its state lost). This is
the MP-SL paper's "cheaper compute nodes" argument made a planner feature: a chain of small
cheap nodes against one large expensive one, priced and timed on the deployment at hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

from p2psl.errors import PlanError, PlanInfeasible
from p2psl.planning.plan import Plan
from p2psl.planning.problem import tied
from p2psl.planning.profile import Profile
from p2psl.topology import Topology
from p2psl.units import plural

#: the most compute nodes whose every subset the cost objective plans for (2^8 − 1 plans)
MAX_NODES = 8
SECONDS_PER_HOUR = 3600.0


def round_cost(plan: Plan, topology: Topology) -> float | None:
    """The predicted cost of one round of `plan`: its predicted round time × the used compute
    nodes' prices per hour; None without a prediction."""
    if plan.round_seconds is None:
        return None
    return plan.round_seconds * hourly_price(plan, topology) / SECONDS_PER_HOUR


def hourly_price(plan: Plan, topology: Topology) -> float:
    """What the plan's compute nodes cost per hour together."""
    return sum(topology.peer(n).price for n in plan.nodes)


def plan_for_cost(topology: Topology, profiles: Mapping[str, Profile],
                  plan_over: Callable[[Topology], Plan]) -> Plan:
    """The cheapest plan (module docstring); `plan_over(sub)` plans a topology of fewer compute
    nodes for time. `PlanInfeasible` when no set of nodes fits, or none meets the deadline."""
    nodes = sorted(p.name for p in topology.compute_nodes)
    if len(nodes) > MAX_NODES:
        raise PlanError(f"objective \"cost\" plans every set of compute nodes, at most {MAX_NODES} of them; "
                        f"this topology has {len(nodes)}")
    deadline = topology.training.deadline
    found, fastest, first_failure = [], None, None
    for size in range(1, len(nodes) + 1):
        for chosen in itertools.combinations(nodes, size):
            sub = topology.without_peers(set(nodes) - set(chosen)).with_changes(objective="time")
            try:
                plan = plan_over(sub)
            except PlanInfeasible as exc:
                first_failure = first_failure or exc
                continue
            if fastest is None or plan.round_seconds < fastest.round_seconds:
                fastest = plan
            if deadline is None or plan.round_seconds <= deadline:
                found.append(plan)
    if not found:
        if fastest is None:
            raise PlanInfeasible(f"no set of the {plural(len(nodes), 'compute node')} can run the model: "
                                 f"{first_failure}")
        raise PlanInfeasible(f"no plan finishes a round within the deadline of {deadline:g} s: the fastest, "
                             f"over {', '.join(fastest.nodes)}, is predicted at {fastest.round_seconds:.3g} s")
    return _cheapest(found, topology)


def _cheapest(plans: list[Plan], topology: Topology) -> Plan:
    """The cheapest plan, costs within the planner's tie tolerance tied ([Note: lexicographic
    objective]): then the faster round (tolerance alike), then fewer nodes, then names."""
    best = min(round_cost(p, topology) for p in plans)
    plans = [p for p in plans if tied(round_cost(p, topology), best)]
    fastest = min(p.round_seconds for p in plans)
    plans = [p for p in plans if tied(p.round_seconds, fastest)]
    return min(plans, key=lambda p: (len(p.nodes), sorted(p.nodes)))
