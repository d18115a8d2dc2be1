"""The cost model on small cases computed by hand."""

from __future__ import annotations

import pytest

from p2psl import costmodel
from p2psl.costmodel import RUNTIME_OVERHEAD_BYTES as OVERHEAD
from p2psl.plan import plan_from_cuts
from p2psl.profile import Profile
from p2psl.topology import parse_topology

B = 10  # batch size of every profile and topology here


def topology(owners: list[str], compute: list[str], links: list[tuple] = (), **training) -> object:
    lines = ["[training]", f"batch_size = {B}", "eval_batch_size = 10"]
    lines += [f"{k} = {v!r}" for k, v in training.items()]
    for index, name in enumerate(owners + compute):
        role = "data_owner" if name in owners else "compute"
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{7000 + index}"',
                  'memory = "1GiB"']
    for a, b, bandwidth, latency in links:
        lines += ["[[link]]", f'peers = ["{a}", "{b}"]']
        lines += [f'bandwidth = "{bandwidth}"'] if bandwidth else []
        lines += [f'latency = "{latency}"'] if latency else []
    return parse_topology("\n".join(lines))


def profile(fwd, bwd, opt, act=(0, 0, 0, 0), params=(0, 0, 0, 0)) -> Profile:
    return Profile("hand", B, tuple(map(float, fwd)), tuple(map(float, bwd)), tuple(map(float, opt)),
                   tuple(act), tuple(params))


IDLE = profile((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
# layer 2: 1 + 2 + 0.5 = 3.5 s, layer 3: 0.5 + 1 + 0 = 1.5 s per batch
NODE = profile((9, 1, 0.5, 9), (9, 2, 1, 9), (9, 0.5, 0, 9))


def one_node(owners: int, owner_profile=IDLE, **training):
    names = [f"o{k}" for k in range(owners)]
    topo = topology(names, ["c1"], **training)
    plan = plan_from_cuts([1, 3], ["c1"], names, 4)
    profiles = {n: owner_profile for n in names} | {"c1": NODE}
    return topo, plan, profiles


def test_compute_bound_period_is_k_times_the_node_occupancy():
    topo, plan, profiles = one_node(10)
    p = costmodel.predict(plan, topo, profiles, {f"o{k}": 3 * B for k in range(10)}, test_samples={})
    assert p.occupancy["c1"] == pytest.approx(5.0)
    assert p.period_seconds == pytest.approx(50.0) and p.bottleneck == "c1"
    # first batch 5 s, nine more queued behind it, then two more periods: 30 batches × 5 s
    assert p.fill_seconds == pytest.approx(5.0) and p.drain_seconds == pytest.approx(45.0)
    assert p.training_seconds == pytest.approx(150.0)


def test_owner_bound_period_is_the_owners_cycle():
    owner = profile((1, 0, 0, 0.5), (0, 0, 0, 1), (0, 0, 0, 0.5))   # 1 s in part 0, 2 s in part 2
    topo, plan, profiles = one_node(1, owner)
    p = costmodel.predict(plan, topo, profiles, {"o0": 3 * B}, test_samples={})
    assert p.cycles["o0"] == pytest.approx(8.0)
    assert p.period_seconds == pytest.approx(8.0) and p.bottleneck == "o0 cycle"
    assert p.training_seconds == pytest.approx(24.0)


def test_owners_with_fewer_batches_drop_out():
    topo, plan, profiles = one_node(2)
    p = costmodel.predict(plan, topo, profiles, {"o0": B, "o1": 3 * B}, test_samples={})
    assert p.batches == {"o0": 1, "o1": 3}
    # the node serialises four batches of 5 s
    assert p.period_seconds == pytest.approx(10.0) and p.training_seconds == pytest.approx(20.0)


FAST = profile((0, 0.1, 0.05, 0), (0, 0.2, 0.1, 0), (0, 0.05, 0, 0), act=(0, 1_000_000, 0, 0))


def two_nodes(owners: int, bandwidth=None, latency=None):
    names = [f"o{k}" for k in range(owners)]
    links = [(o, c, None, None) for o in names for c in ("c1", "c2")] + [("c1", "c2", bandwidth, latency)]
    topo = topology(names, ["c1", "c2"], links)
    plan = plan_from_cuts([1, 2, 3], ["c1", "c2"], names, 4)
    profiles = {n: IDLE for n in names} | {"c1": FAST, "c2": FAST}
    return topo, plan, profiles


def test_a_slow_link_is_a_resource_in_each_direction():
    topo, plan, profiles = two_nodes(4, bandwidth="8Mbit/s")   # 1e6 B/s: 1 s per activation
    p = costmodel.predict(plan, topo, profiles, {f"o{k}": B for k in range(4)}, test_samples={})
    assert p.occupancy["c1→c2"] == pytest.approx(1.0) and p.occupancy["c2→c1"] == pytest.approx(1.0)
    assert p.cycles["o0"] == pytest.approx(0.35 + 0.15 + 2.0)
    assert p.period_seconds == pytest.approx(4.0) and p.bottleneck == "c1→c2"


def test_latency_lengthens_the_cycle_but_occupies_nothing():
    topo, plan, profiles = two_nodes(1, latency="50ms")
    p = costmodel.predict(plan, topo, profiles, {"o0": B}, test_samples={})
    assert set(p.occupancy) == {"c1", "c2"}
    assert p.period_seconds == pytest.approx(0.5 + 2 * 0.05)


def test_no_links_means_free_communication():
    names = ["o0"]
    topo = topology(names, ["c1", "c2"])
    plan = plan_from_cuts([1, 2, 3], ["c1", "c2"], names, 4)
    p = costmodel.predict(plan, topo, {"o0": IDLE, "c1": FAST, "c2": FAST}, {"o0": B}, test_samples={})
    assert p.period_seconds == pytest.approx(0.5)


def test_peak_memory_formula():
    sizes = profile((0,) * 4, (0,) * 4, (0,) * 4, act=(1000, 200, 30, 4), params=(1, 20, 300, 4000))
    names = ["o0", "o1", "o2"]
    topo = topology(names, ["c1"])
    plan = plan_from_cuts([1, 3], ["c1"], names, 4)
    memory = costmodel.peak_memory(plan, topo, {n: sizes for n in [*names, "c1"]})
    # three copies of weights, gradients and momentum, and three owners' stashed activations
    # (the layers' outputs plus the received input)
    assert memory["c1"] == 3 * (3 * (20 + 300) + (200 + 30) + 1000) + OVERHEAD
    # one copy of parts 0 and 2, one batch of their activations plus the received input of part 2
    assert memory["o0"] == 3 * (1 + 4000) + (1000 + 4) + 30 + OVERHEAD


def test_aggregation_and_routed_exchange():
    names = ["o0", "o1"]
    sizes = profile((0,) * 4, (0,) * 4, (0,) * 4, params=(500_000, 2_000_000, 0, 500_000))
    topo = topology(names, ["c1"], [("o0", "c1", "8Mbit/s", "10ms"), ("o1", "c1", "8Mbit/s", "10ms")])
    plan = plan_from_cuts([1, 3], ["c1"], names, 4)
    # o0 → o1 goes through c1: each direction of each link carries 1 MB once (1 s) and the route
    # has two hops of 10 ms
    assert costmodel.exchange_seconds(topo, names, 1_000_000) == pytest.approx(1.02)
    owners = 1.02 + 2 * 1_000_000 / costmodel.AVERAGE_BYTES_PER_SECOND
    nodes = 2 * 2_000_000 / costmodel.AVERAGE_BYTES_PER_SECOND
    agg = costmodel.aggregation_seconds(plan, topo, {n: sizes for n in [*names, "c1"]})
    assert agg == pytest.approx(max(owners, nodes))


def test_evaluation_is_forward_only_at_the_eval_batch_size():
    topo, plan, profiles = one_node(1)
    p = costmodel.predict(plan, topo, profiles, {"o0": B}, test_samples={"o0": 3 * B})
    assert p.evaluation_seconds == pytest.approx(3 * 1.5)     # three forward passes of 1 + 0.5 s
    assert p.round_seconds == pytest.approx(p.training_seconds + p.evaluation_seconds)


def test_paper_model():
    owner = profile((1, 0, 0, 0.5), (0.5, 0, 0, 1), (0, 0, 0, 0.5))
    topo, plan, profiles = one_node(2, owner)
    seconds = costmodel.paper_round_time(plan, topo, profiles, {"o0": 2 * B, "o1": 2 * B})
    start, first, end = 1.0, 5.0 + 2.0, 0.5
    steady = (4 - 1) * (1.5 + 3.5)
    assert seconds == pytest.approx(start + first + steady + end)
