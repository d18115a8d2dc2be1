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
exact for the predictions. Ties go to the faster round, then to fewer nodes, then to the set
first by name. A node left out idles: it takes part in every round's cut and hears the reports,
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
    found, fastest = [], None
    for size in range(1, len(nodes) + 1):
        for chosen in itertools.combinations(nodes, size):
            sub = topology.without_peers(set(nodes) - set(chosen)).with_changes(objective="time")
            try:
                plan = plan_over(sub)
            except PlanInfeasible:
                continue
            if fastest is None or plan.round_seconds < fastest.round_seconds:
                fastest = plan
            if deadline is not None and plan.round_seconds > deadline:
                continue
            found.append(((round_cost(plan, topology), plan.round_seconds, size, chosen), plan))
    if not found:
        if fastest is None:
            raise PlanInfeasible(f"no set of the {plural(len(nodes), 'compute node')} can hold the model "
                                 "within every memory capacity")
        raise PlanInfeasible(f"no plan finishes a round within the deadline of {deadline:g} s: the fastest, "
                             f"over {', '.join(fastest.nodes)}, is predicted at {fastest.round_seconds:.3g} s")
    return min(found, key=lambda item: item[0])[1]
