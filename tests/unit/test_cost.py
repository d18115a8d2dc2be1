"""[Note: the cost objective]: prices per hour, `objective = "cost"` and `deadline`."""

from __future__ import annotations

import itertools

import pytest

from p2psl.errors import PlanInfeasible, TopologyError
from p2psl.planning.check import plan_problems
from p2psl.planning.cost import round_cost
from p2psl.planning.planner import make_plan
from p2psl.planning.profile import Profile
from p2psl.topology import parse_topology
from tests.helpers import topology_toml

OWNERS = ["alice", "bob", "carol", "dave"]
SAMPLES = {k: 640 for k in OWNERS}


def deployment(prices: dict[str, float], speeds: dict[str, float], **training):
    """Four owners; compute nodes named in `prices`, at `speeds`; a uniform 8-layer profile."""
    nodes = sorted(prices)
    keys = {n: {"price": p} for n, p in prices.items() if p is not None}
    topology = parse_topology(topology_toml(OWNERS, nodes, training={"batch_size": 32, **training},
                                            speeds=speeds, peer_keys=keys))
    profiles = {p.name: Profile(p.name, 32, (0.004,) * 8, (0.008,) * 8, (0.0005,) * 8, (4096,) * 8, (1 << 16,) * 8)
                .scaled(topology.peer(p.name).speed) for p in topology.peers}
    return topology, profiles


def cheapest_by_hand(topology, profiles) -> tuple[float, tuple[str, ...]]:
    """Every set of compute nodes planned for time on its own, priced."""
    nodes = [p.name for p in topology.compute_nodes]
    best = None
    for size in range(1, len(nodes) + 1):
        for chosen in itertools.combinations(nodes, size):
            sub = topology.without_peers(set(nodes) - set(chosen)).with_changes(objective="time")
            plan = make_plan(sub, profiles, SAMPLES)
            cost = round_cost(plan, topology)
            if best is None or (cost, plan.round_seconds) < best[:2]:
                best = (cost, plan.round_seconds, tuple(plan.nodes))
    return best[0], best[2]


def test_the_cost_objective_pays_for_the_cheapest_round():
    # one fast node at 4.00/h against two at a quarter of its speed at 0.30/h each
    topology, profiles = deployment({"big": 4.0, "s1": 0.3, "s2": 0.3}, {"s1": 0.25, "s2": 0.25},
                                    objective="cost")
    plan = make_plan(topology, profiles, SAMPLES)
    cost, nodes = cheapest_by_hand(topology, profiles)
    assert plan.objective == "cost" and round_cost(plan, topology) == pytest.approx(cost)
    assert sorted(plan.nodes) == sorted(nodes) and "big" not in plan.nodes
    timed = make_plan(topology.with_changes(objective="time"), profiles, SAMPLES)
    assert set(timed.nodes) == {"big", "s1", "s2"} and round_cost(timed, topology) > 2 * round_cost(plan, topology)


def test_a_deadline_the_cheap_nodes_miss_buys_the_fast_one():
    topology, profiles = deployment({"big": 4.0, "s1": 0.3, "s2": 0.3}, {"s1": 0.25, "s2": 0.25},
                                    objective="cost")
    cheap = make_plan(topology, profiles, SAMPLES)
    deadline = cheap.round_seconds * 0.8
    plan = make_plan(topology.with_changes(deadline=deadline), profiles, SAMPLES)
    assert "big" in plan.nodes and plan.round_seconds <= deadline
    with pytest.raises(PlanInfeasible, match="no plan finishes a round within the deadline of 0.001 s: the fastest"):
        make_plan(topology.with_changes(deadline=0.001), profiles, SAMPLES)


def test_free_nodes_cost_nothing_and_the_faster_round_wins_the_tie():
    topology, profiles = deployment({"c1": None, "c2": None}, {}, objective="cost")
    plan = make_plan(topology, profiles, SAMPLES)
    assert round_cost(plan, topology) == 0.0
    assert plan.round_seconds == min(make_plan(topology.without_peers({n}).with_changes(objective="time"), profiles,
                                               SAMPLES).round_seconds for n in ("c1", "c2", "none"))


def test_a_plan_of_some_nodes_is_allowed_only_under_the_cost_objective():
    topology, profiles = deployment({"big": 4.0, "s1": 0.3, "s2": 0.3}, {"s1": 0.25, "s2": 0.25},
                                    objective="cost")
    plan = make_plan(topology, profiles, SAMPLES)
    assert plan_problems(plan.decisions, topology, profiles) == []
    timed = topology.with_changes(objective="time")
    assert any("expected every compute node once" in p for p in plan_problems(plan.decisions, timed, profiles))


@pytest.mark.parametrize("keys, training, problem", [
    ({"alice": {"price": 1.0}}, {}, "peer 'alice'.price: only a compute node has a price"),
    ({"c1": {"price": -1}}, {}, "peer 'c1'.price: must be at least 0, got -1"),
    ({}, {"deadline": "120s"}, "[training].deadline: needs objective = 'cost'"),
    ({}, {"objective": "cost", "deadline": "0s"}, "[training].deadline: must be positive"),
])
def test_bad_prices_and_deadlines_are_named(keys, training, problem):
    with pytest.raises(TopologyError) as info:
        parse_topology(topology_toml(OWNERS, ["c1"], training=training, peer_keys=keys))
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_prices_and_deadline_are_read():
    topology = parse_topology(topology_toml(OWNERS, ["c1"], training={"objective": "cost", "deadline": "120s"},
                                            peer_keys={"c1": {"price": 0.4}}))
    assert topology.peer("c1").price == 0.4 and topology.peer("alice").price == 0.0
    assert topology.training.deadline == 120.0


def test_re_planning_on_measured_times_keeps_the_nodes_paid_for():
    from p2psl.planning.calibrate import Timing, better_plan, expected_task_seconds, fit

    topology, profiles = deployment({"big": 4.0, "s1": 0.3, "s2": 0.3}, {"s1": 0.25, "s2": 0.25},
                                    objective="cost", first_cut=1, last_cut=5)
    plan = make_plan(topology, profiles, SAMPLES)
    slow = {n: 4.0 for n in plan.nodes}  # every node paid for turns four times slower
    timings = {p: Timing(20, 20 * expected_task_seconds(plan, topology, profiles, p) * slow.get(p, 1.0))
               for p in (*plan.owners, *plan.nodes)}
    calibration = fit(plan, topology, profiles, SAMPLES, timings, 10.0, 2)
    better = better_plan(plan, topology, profiles, SAMPLES, calibration, rounds_left=50)
    assert better is None or set(better.nodes) <= set(plan.nodes)
