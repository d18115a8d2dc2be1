"""[Note: calibration]: refitting speed factors and the residual from measured times, the choice
to re-plan, the round's task clock, and the slow fault that tests it end to end."""

from __future__ import annotations

from dataclasses import replace

import pytest

from p2psl.errors import ConfigError
from p2psl.planning.calibrate import (Timing, better_plan, expected_task_seconds, fit, move_seconds,
                                      predict_calibrated)
from p2psl.planning.costmodel import predict
from p2psl.planning.planner import make_plan
from p2psl.planning.profile import Profile
from p2psl.runtime.calibration import TaskClock
from p2psl.runtime.faults import Faults, parse
from p2psl.topology import parse_topology
from tests.unit.test_planner import nodes, owners, toml

LAYERS = 6
BASE = Profile("u", 8, (0.01,) * LAYERS, (0.02,) * LAYERS, (0.001,) * LAYERS, (1000,) * LAYERS,
               (4096,) * LAYERS, cores=8)


def deployment():
    topo = parse_topology(toml(owners(2) + nodes({}, {}), batch_size=8, first_cut=1, last_cut=5))
    profiles = {p.name: BASE for p in topo.peers}
    samples = {o.name: 64 for o in topo.owners}
    return topo, profiles, samples, make_plan(topo, profiles, samples)


def timings(topo, profiles, plan, slow: dict[str, float]) -> dict[str, Timing]:
    return {p: Timing(16, 16 * expected_task_seconds(plan, topo, profiles, p) * slow.get(p, 1.0))
            for p in (*plan.owners, *plan.nodes)}


def test_the_fit_finds_each_peer_s_speed_and_the_residual():
    topo, profiles, samples, plan = deployment()
    model = predict(plan, topo, profiles, samples).round_seconds
    cal = fit(plan, topo, profiles, samples, timings(topo, profiles, plan, {"c1": 4.0}), model + 0.5, 2)
    assert cal.factors["c1"] == pytest.approx(4.0)
    assert cal.factors["c2"] == pytest.approx(1.0) and cal.factors["o00"] == pytest.approx(1.0)
    assert predict_calibrated(plan, topo, profiles, samples, cal).round_seconds == pytest.approx(model + 0.5)
    assert cal.to_json()["round"] == 2


def test_the_fit_is_the_same_whatever_order_the_timings_arrived_in():
    topo, profiles, samples, plan = deployment()
    measured = timings(topo, profiles, plan, {"c1": 2.5, "o01": 1.3})
    backwards = dict(reversed(list(measured.items())))
    assert fit(plan, topo, profiles, samples, measured, 3.0, 1) == fit(plan, topo, profiles, samples, backwards, 3.0, 1)


def test_only_the_round_s_own_timings_enter():
    topo, profiles, samples, plan = deployment()
    cal = fit(plan, topo, profiles, samples, {"c1": Timing(0, 0.0), "c2": Timing(16, 1.0)}, 1.0, 2)
    assert set(cal.factors) == {"c2"}


def test_a_slow_node_is_planned_around_when_the_rounds_left_pay_for_the_move():
    topo, profiles, samples, plan = deployment()
    assert [s.last - s.first + 1 for s in plan.chain] == [2, 2]
    slow = fit(plan, topo, profiles, samples, timings(topo, profiles, plan, {plan.nodes[0]: 4.0}), 10.0, 2)
    better = better_plan(plan, topo, profiles, samples, slow, rounds_left=8)
    assert better is not None
    assert len(better.part_layers(better.part_of(plan.nodes[0]))) == 1
    assert move_seconds(plan, better, topo, profiles) > 0
    assert better_plan(plan, topo, profiles, samples, slow, rounds_left=0) is None
    even = fit(plan, topo, profiles, samples, timings(topo, profiles, plan, {}), 10.0, 2)
    assert better_plan(plan, topo, profiles, samples, even, rounds_left=8) is None


def test_moving_a_lot_of_state_for_one_round_is_not_worth_it():
    topo, profiles, samples, plan = deployment()
    heavy = {n: replace(p, param_bytes=(2**30,) * LAYERS) for n, p in profiles.items()}
    slow = fit(plan, topo, heavy, samples, timings(topo, heavy, plan, {plan.nodes[0]: 4.0}), 10.0, 2)
    assert better_plan(plan, topo, heavy, samples, slow, rounds_left=1) is None


def test_the_task_clock_counts_training_tasks_per_round():
    clock = TaskClock()
    for name, round_ in (("forward", 1), ("backward", 1), ("optimize", 1), ("forward", 1), ("evaluate", 1),
                         ("aggregate", 1), ("forward", 2), ("build", None)):
        clock(name, 0.5, {"round": round_} if round_ else {})
    assert clock.timing(1) == Timing(2, 2.0)
    assert clock.timing(2) == Timing(1, 0.5)
    assert clock.timing(3) == Timing(0, 0.0)


def test_the_slow_fault():
    assert parse("slow:round=2:factor=4:peer=c1")[0].factor == 4.0
    with pytest.raises(ConfigError):
        parse("slow:round=2:factor=0.5")
    with pytest.raises(ConfigError):
        parse("crash:round=2:peer=c1")
    slowed = []
    mine = Faults("slow:round=2:factor=4:peer=c1", slow=slowed.append, me="c1")
    mine.reached(1, 9)
    assert slowed == []
    mine.reached(2, 1)
    assert slowed == [4.0]
    others = Faults("slow:round=2:factor=4:peer=c1", slow=slowed.append, me="c2")
    others.reached(3, 1)
    assert slowed == [4.0]


def test_slower_compute_nodes_may_change_the_micro_batches_alone():
    """`micro_batches = "auto"` with the cuts fixed: one owner over two compute nodes whose
    layers prove twelve times slower than profiled. More micro-batches then pay for their messages,
    so the re-plan cuts each batch into more pieces though no layer moves (nothing to send)."""
    layers = Profile("u", 8, (0.001,) * 4, (0.002,) * 4, (0.0001,) * 4, (1000,) * 4, (4096,) * 4, cores=8)
    topo = parse_topology(toml(owners(1) + nodes({}, {}), batch_size=8, first_cut=1, last_cut=3,
                               micro_batches="auto"))
    profiles = {p.name: layers for p in topo.peers}
    samples = {"o00": 6400}
    plan = make_plan(topo, profiles, samples)
    slow = fit(plan, topo, profiles, samples, timings(topo, profiles, plan, {"c1": 12.0, "c2": 12.0}), 10.0, 2)
    better = better_plan(plan, topo, profiles, samples, slow, rounds_left=8)
    assert better is not None and better.micro_batches > plan.micro_batches
    assert [(s.node, s.first, s.last) for s in better.chain] == [(s.node, s.first, s.last) for s in plan.chain]
    assert move_seconds(plan, better, topo, profiles) == 0


def test_alike_nodes_of_one_machine_share_a_factor_so_their_layers_do_not_swap_every_round():
    """[Note: calibration], "Peers of one machine": two identical compute nodes measured 1.4×
    apart (what the heavier segment's profile error alone gives) are one speed, and no plan
    predicts better for moving layers between them; 4× apart, one is really slower."""
    topo, profiles, samples, plan = deployment()
    first, second = plan.nodes
    biased = fit(plan, topo, profiles, samples, timings(topo, profiles, plan, {first: 1.4}), 10.0, 2)
    assert biased.factors[first] == biased.factors[second] == pytest.approx(1.2)
    assert better_plan(plan, topo, profiles, samples, biased, rounds_left=8) is None
    slowed = fit(plan, topo, profiles, samples, timings(topo, profiles, plan, {first: 4.0}), 10.0, 2)
    assert slowed.factors[first] == pytest.approx(4.0) and slowed.factors[second] == pytest.approx(1.0)


def test_nodes_of_different_machines_or_profiles_keep_their_own_factors():
    topo, profiles, samples, plan = deployment()
    first, second = plan.nodes
    text = toml(owners(2) + nodes({}, {}), batch_size=8, first_cut=1, last_cut=5)
    apart = parse_topology(text.replace(f'address = "127.0.0.1:{7003}"', 'address = "10.0.0.9:7003"'))
    assert apart.peer(second).machine_key != apart.peer(first).machine_key
    measured = timings(topo, profiles, plan, {first: 1.4})
    assert fit(plan, apart, profiles, samples, measured, 10.0, 2).factors[first] == pytest.approx(1.4)
    faster = {**profiles, second: BASE.scaled(2.0)}
    measured = {**measured, second: Timing(16, 16 * expected_task_seconds(plan, topo, faster, second))}
    assert fit(plan, topo, faster, samples, measured, 10.0, 2).factors[first] == pytest.approx(1.4)


def test_each_change_of_plan_asks_a_larger_gain_of_the_next():
    topo, profiles, samples, plan = deployment()
    slow = fit(plan, topo, profiles, samples, timings(topo, profiles, plan, {plan.nodes[0]: 4.0}), 10.0, 2)
    assert better_plan(plan, topo, profiles, samples, slow, rounds_left=8, changes=0) is not None
    assert better_plan(plan, topo, profiles, samples, slow, rounds_left=8, changes=9) is None
