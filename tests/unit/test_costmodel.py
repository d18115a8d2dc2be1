"""The cost model on small cases computed by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from p2psl.planning import costmodel
from p2psl.planning.memory import peak_memory
from p2psl.planning.memory import RUNTIME_OVERHEAD_BYTES as OVERHEAD
from p2psl.planning.plan import plan_from_cuts
from p2psl.planning.profile import Profile
from p2psl.topology import parse_topology

B = 10  # batch size of every profile and topology here


def topology(owners: list[str], compute: list[str], links: list[tuple] = (), speeds: dict | None = None,
             **training) -> object:
    lines = ["[training]", f"batch_size = {B}", "eval_batch_size = 10"]
    lines += [f"{k} = {v!r}" for k, v in training.items()]
    for index, name in enumerate(owners + compute):
        role = "data_owner" if name in owners else "compute"
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{7000 + index}"',
                  'memory = "1GiB"', f"speed = {(speeds or {}).get(name, 1.0)}"]
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


def predict(*args, **kwargs):
    """The cost model without runtime overheads, whose formulas these cases check by hand."""
    return costmodel.predict(*args, overheads=costmodel.NONE, **kwargs)


def test_compute_bound_period_is_k_times_the_node_occupancy():
    topo, plan, profiles = one_node(10)
    p = predict(plan, topo, profiles, {f"o{k}": 3 * B for k in range(10)}, test_samples={})
    assert p.occupancy["c1"] == pytest.approx(5.0)
    assert p.period_seconds == pytest.approx(50.0) and p.bottleneck == "c1"
    assert p.expected_period_seconds == pytest.approx(50.0)
    # the first batch takes the node's forward and backward (1.5 + 3 s; its optimizer step runs
    # while the gradient travels on), nine more queue behind it, then two more periods
    assert p.fill_seconds == pytest.approx(4.5) and p.drain_seconds == pytest.approx(45.0)
    assert p.training_seconds == pytest.approx(4.5 + 45.0 + 2 * 50.0)


def test_owner_bound_period_is_the_owners_cycle():
    owner = profile((1, 0, 0, 0.5), (0, 0, 0, 1), (0, 0, 0, 0.5))   # 1 s in part 0, 2 s in part 2
    topo, plan, profiles = one_node(1, owner)
    p = predict(plan, topo, profiles, {"o0": 3 * B}, test_samples={})
    # the planner's bound charges every step: 1 + 2 + the node's 5 s
    assert p.period_seconds == pytest.approx(8.0)
    # the critical path leaves out the node's optimizer step (0.5 s) and that of part 2 (0.5 s)
    assert p.cycles["o0"] == pytest.approx(1 + 1.5 + 0.5 + 1 + 3)
    assert p.expected_period_seconds == pytest.approx(7.0) and p.bottleneck == "o0 cycle"
    assert p.training_seconds == pytest.approx(21.0)


def test_owners_with_fewer_batches_drop_out():
    topo, plan, profiles = one_node(2)
    p = predict(plan, topo, profiles, {"o0": B, "o1": 3 * B}, test_samples={})
    assert p.batches == {"o0": 1, "o1": 3}
    # first batches 4.5 s + 5 s behind each other, then o1 alone: two periods of 5 s
    assert p.period_seconds == pytest.approx(10.0) and p.training_seconds == pytest.approx(19.5)


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
    p = predict(plan, topo, profiles, {f"o{k}": B for k in range(4)}, test_samples={})
    assert p.occupancy["c1→c2"] == pytest.approx(1.0) and p.occupancy["c2→c1"] == pytest.approx(1.0)
    assert p.cycles["o0"] == pytest.approx(0.3 + 0.15 + 2.0)       # c1's step (0.05 s) is off the path
    assert p.period_seconds == pytest.approx(4.0) and p.bottleneck == "c1→c2"


def test_latency_lengthens_the_cycle_but_occupies_nothing():
    topo, plan, profiles = two_nodes(1, latency="50ms")
    p = predict(plan, topo, profiles, {"o0": B}, test_samples={})
    assert set(p.occupancy) == {"c1", "c2"}
    assert p.period_seconds == pytest.approx(0.5 + 2 * 0.05)
    assert p.expected_period_seconds == pytest.approx(0.45 + 2 * 0.05)


def test_no_links_means_free_communication():
    names = ["o0"]
    topo = topology(names, ["c1", "c2"])
    plan = plan_from_cuts([1, 2, 3], ["c1", "c2"], names, 4)
    p = predict(plan, topo, {"o0": IDLE, "c1": FAST, "c2": FAST}, {"o0": B}, test_samples={})
    assert p.period_seconds == pytest.approx(0.5) and p.expected_period_seconds == pytest.approx(0.45)


def test_peak_memory_formula():
    sizes = profile((0,) * 4, (0,) * 4, (0,) * 4, act=(1000, 200, 30, 4), params=(1, 20, 300, 4000))
    names = ["o0", "o1", "o2"]
    topo = topology(names, ["c1"])
    plan = plan_from_cuts([1, 3], ["c1"], names, 4)
    memory = peak_memory(plan, topo, {n: sizes for n in [*names, "c1"]})
    # three copies of weights and momentum, one set of gradients (a copy is stepped and its
    # gradients freed before any other task), and three owners' stashed activations (the layers'
    # outputs plus the received input); one compute node: no replica
    assert memory["c1"] == (2 * 3 + 1) * (20 + 300) + 3 * ((200 + 30) + 1000) + OVERHEAD
    # weights, gradients and momentum of parts 0 and 2, and at the round end a copy of them, the
    # two other owners' contributions to its chunk and their two averaged chunks (a third each),
    # and as the parts are too small for three chunks of 64 KiB, a reducer's larger chunk: two
    # contributions of under 128 KiB; one batch of their activations plus the received input of part 2
    assert memory["o0"] == (4 * 3 + 2 * 2) * (1 + 4000) // 3 + 2 * 2 * 65536 + (1000 + 4) + 30 + OVERHEAD
    training = peak_memory(plan, topo, {n: sizes for n in [*names, "c1"]}, round_end=False)
    assert training["c1"] == memory["c1"]
    assert training["o0"] == 3 * (1 + 4000) + (1000 + 4) + 30 + OVERHEAD


def test_peak_memory_counts_the_replica_in_flight():
    sizes = profile((0,) * 4, (0,) * 4, (0,) * 4, act=(1000, 200, 30, 4), params=(1, 20, 300, 4000))
    names = ["o0", "o1"]
    topo = topology(names, ["c1", "c2"])
    plan = plan_from_cuts([1, 2, 3], ["c1", "c2"], names, 4)
    profiles = {n: sizes for n in [*names, "c1", "c2"]}
    memory, training = (peak_memory(plan, topo, profiles, round_end=end) for end in (True, False))
    # c2 (layer 3) sends c1 a snapshot while it trains on: the common weights once, two momenta
    assert memory["c2"] - training["c2"] == (2 + 1) * 300
    assert training["c2"] == (2 * 2 + 1) * 300 + 2 * (30 + 200) + OVERHEAD


def test_aggregation_and_routed_exchange():
    names = ["o0", "o1"]
    sizes = profile((0,) * 4, (0,) * 4, (0,) * 4, params=(500_000, 2_000_000, 0, 500_000))
    topo = topology(names, ["c1"], [("o0", "c1", "8Mbit/s", "10ms"), ("o1", "c1", "8Mbit/s", "10ms")])
    plan = plan_from_cuts([1, 3], ["c1"], names, 4)
    # o0 → o1 goes through c1: each direction of each link carries 1 MB once (1 s) and the route
    # has two hops of 10 ms
    assert costmodel.exchange_seconds(topo, names, 1_000_000) == pytest.approx(1.02)
    # the owners' all-reduce: two exchanges of half their parts (0.5 s and 20 ms each), then the
    # reducer averages its chunk of the two owners (the parts' bytes in all)
    owners = 2 * 0.52 + 1_000_000 / costmodel.AVERAGE_BYTES_PER_SECOND
    nodes = 2 * 2_000_000 / costmodel.AVERAGE_BYTES_PER_SECOND
    agg = costmodel.aggregation_seconds(plan, topo, {n: sizes for n in [*names, "c1"]})
    assert agg == pytest.approx(max(owners, nodes))


def test_evaluation_is_forward_only_at_the_eval_batch_size():
    topo, plan, profiles = one_node(1)
    p = predict(plan, topo, profiles, {"o0": B}, test_samples={"o0": 3 * B})
    assert p.evaluation_seconds == pytest.approx(3 * 1.5)     # three forward passes of 1 + 0.5 s
    assert p.round_seconds == pytest.approx(p.training_seconds + p.aggregation_seconds + p.evaluation_seconds)


def test_evaluation_batches_split_the_test_shard_evenly():
    topo, plan, profiles = one_node(1)
    # 25 test samples at eval_batch_size 10: three batches of 9 (forward 1.5 s per 10 samples)
    assert costmodel.evaluation_batch({"o0": 25}, 10) == 9
    p = predict(plan, topo, profiles, {"o0": B}, test_samples={"o0": 25})
    assert p.evaluation_seconds == pytest.approx(3 * 1.5 * 9 / 10)
    # a shard smaller than one batch is one batch of its own size, not eval_batch_size
    assert costmodel.evaluation_batch({"o0": 4, "o1": 3}, 10) == 4


def test_paper_model():
    owner = profile((1, 0, 0, 0.5), (0.5, 0, 0, 1), (0, 0, 0, 0.5))
    topo, plan, profiles = one_node(2, owner)
    seconds = costmodel.paper_round_time(plan, topo, profiles, {"o0": 2 * B, "o1": 2 * B})
    start, first, end = 1.0, 5.0 + 2.0, 0.5
    steady = (4 - 1) * (1.5 + 3.5)
    assert seconds == pytest.approx(start + first + steady + end)


def test_runtime_overheads_on_tasks_and_messages():
    oh = costmodel.Overheads(task=0.01, dispatch=0.002, send=0.003, receive=0.004, header=1000)
    names = ["o0", "o1"]
    topo = topology(names, ["c1"], [(o, "c1", "8Mbit/s", "20ms") for o in names])   # 1e6 B/s
    plan = plan_from_cuts([1, 3], ["c1"], names, 4)
    node = profile((9, 1, 0.5, 9), (9, 2, 1, 9), (9, 0.5, 0, 9), act=(99_000, 0, 0, 0))
    profiles = {n: IDLE for n in names} | {"c1": node}
    p = costmodel.predict(plan, topo, profiles, {n: B for n in names}, test_samples={}, overheads=oh)
    task = 0.01  # every peer at speed 1: no hand-off to a thread, only a padded peer has one
    assert p.occupancy["c1"] == pytest.approx(5.0 + 3 * task)
    # o0 → c1 carries the activation and the gradient of layer 3's (empty) output a batch, each
    # (bytes + header) / bw + send
    assert p.occupancy["o0→c1"] == pytest.approx(0.1 + 0.003 + 0.001 + 0.003)
    # critical path: 4 owner tasks, the node's forward and backward (4.5 s + 2 tasks), the two
    # messages each way (0.1 s + send + latency + receive; layer 3's output is empty: 0.001 s)
    hop = 0.003 + 0.02 + 0.004
    assert p.cycles["o0"] == pytest.approx(4.5 + 6 * task + 2 * (0.1 + hop) + 2 * (0.001 + hop))
    assert p.expected_period_seconds == pytest.approx(max(2 * p.occupancy["c1"], p.cycles["o0"]))
    # the planner's bound has none of it
    assert p.period_seconds == pytest.approx(max(2 * 5.0, 5.0 + 2 * (0.099 + 0.02) + 2 * 0.02))


def test_a_slow_peer_stretches_the_python_around_its_tasks_and_hands_them_to_its_thread():
    oh = costmodel.Overheads(task=0.01, dispatch=0.002)
    _, plan, profiles = one_node(1)
    slow = topology(["o0"], ["c1"], speeds={"c1": 0.25})
    p = costmodel.predict(plan, slow, profiles, {"o0": B}, test_samples={}, overheads=oh)
    assert p.occupancy["c1"] == pytest.approx(5.0 + 3 * (0.01 / 0.25 + 0.002))


def test_messages_queue_on_links_and_are_stored_and_forwarded():
    names = ["o0", "o1", "o2"]
    topo = topology(names, ["c1"], [(o, "c1", "8Mbit/s", None) for o in names])     # 1e6 B/s
    # every owner sends 1 MB to each other owner, in name order, through c1
    sends = {o: (0.0, [(j, 1_000_000) for j in names if j != o]) for o in names}
    arrival = costmodel.deliver(topo, sends, costmodel.NONE)
    # first messages reach c1 at 1 s, second ones at 2 s; c1 → o1 carries o0's (1 → 2 s) then
    # o2's second (2 → 3 s); c1 → o0 takes o1's and o2's first messages one after the other;
    # c1 → o2 gets both second messages at 2 s: the last destination waits 2(K − 1) · W / bw
    assert arrival == {("o0", "o1"): 2.0, ("o2", "o1"): 3.0, ("o1", "o0"): 2.0, ("o2", "o0"): 3.0,
                       ("o0", "o2"): 3.0, ("o1", "o2"): 4.0}


def test_round_end_parts_notices_and_cuts():
    names = ["o0", "o1"]
    sizes = profile((0,) * 4, (0,) * 4, (0,) * 4, params=(500, 0, 0, 500))
    topo = topology(names, ["c1"], [(o, "c1", "8Mbit/s", "10ms") for o in names])  # 1e6 B/s
    plan = plan_from_cuts([1, 3], ["c1"], names, 4)
    profiles = {n: sizes for n in [*names, "c1"]}
    # o0's notices reach c1 at 10 ms and o1 (through c1) at 20 ms. The cuts: c1's reach the
    # owners at 20 ms, an owner's reaches the other through c1 at 40 ms. Then the all-reduce: the
    # parts (1000 B) are too small for two chunks of 64 KiB, so o0 alone reduces: o1's parts
    # (1 ms to c1, 10 ms, 1 ms to o0, 10 ms) reach it at 62 ms, it averages both (2000 B), the
    # average comes back 22 ms later; each owner assembles the average and checkpoints.
    average = 1000 / costmodel.AVERAGE_BYTES_PER_SECOND
    work = 2 * average + 2 * 1000 / costmodel.CHECKPOINT_BYTES_PER_SECOND
    end = costmodel.round_end_seconds(plan, topo, profiles, costmodel.NONE)
    assert end == pytest.approx(0.084 + work + average)
    p = predict(plan, topo, profiles, {n: B for n in names}, test_samples={})
    assert p.aggregation_seconds == pytest.approx(end)


def test_the_planners_bound_is_the_training_loop_it_optimises():
    topo, plan, profiles = two_nodes(4, bandwidth="8Mbit/s")
    samples = {f"o{k}": 2 * B for k in range(4)}
    bound = costmodel.training_loop(plan, topo, profiles, samples)
    p = costmodel.predict(plan, topo, profiles, samples, test_samples={})
    assert p.period_seconds == pytest.approx(bound.period)
    assert p.expected_period_seconds >= p.period_seconds      # overheads only add


def test_a_replica_longer_than_evaluation_delays_the_next_round():
    sizes = profile((0,) * 4, (0,) * 4, (0,) * 4, params=(0, 0, 1_000_000, 0))
    links = [("o0", "c1", None, None), ("o0", "c2", None, None), ("c1", "c2", "8Mbit/s", None)]   # 1e6 B/s
    topo = topology(["o0"], ["c1", "c2"], links)
    plan = plan_from_cuts([1, 2, 3], ["c1", "c2"], ["o0"], 4)
    profiles = {n: sizes for n in ["o0", "c1", "c2"]}
    # c2 averages its one copy (1 MB) and checkpoints weights and momentum (2 MB), then sends
    # them to its replica holder c1 over c2 → c1: 2 s, which no evaluation batch uses
    work = 1_000_000 / costmodel.AVERAGE_BYTES_PER_SECOND + 2_000_000 / costmodel.CHECKPOINT_BYTES_PER_SECOND
    end, replicas = costmodel.round_end(plan, topo, profiles, costmodel.NONE)
    assert end == pytest.approx(work) and replicas == pytest.approx(work + 2.0)
    p = predict(plan, topo, profiles, {"o0": B}, test_samples={})
    assert p.replica_wait_seconds == pytest.approx(2.0)
    assert p.round_seconds == pytest.approx(2.0 + p.training_seconds + end)


@pytest.mark.parametrize("micro_batches, period, bound", [(1, 4.5, 5.0), (2, 4.0, 4.25)])
def test_micro_batches_overlap_the_chain_and_the_planner_counts_it(micro_batches, period, bound):
    """One owner, c1 (forward and backward 3 s a batch, 1.5 s a half batch; its step, 0.5 s, off
    the cycle) then c2 (1.5 s; 0.75 s): whole, a batch takes 4.5 s; in two micro-batches, one
    micro-batch's cycle, 2.25 s, plus the second behind the slowest stage, c1's 1.75 s a half
    batch with half its step (the runtime steps once per batch: each micro-batch carries half).
    The planner's bound, which charges the steps on the cycle: 5.0 s whole, and 2.5 + 1.75 s in two."""
    topo = topology(["o0"], ["c1", "c2"])
    plan = plan_from_cuts([1, 2, 3], ["c1", "c2"], ["o0"], 4, micro_batches=micro_batches)
    p = predict(plan, topo, {"o0": IDLE, "c1": NODE, "c2": NODE}, {"o0": 3 * B}, test_samples={})
    assert p.expected_period_seconds == pytest.approx(period)
    assert p.period_seconds == pytest.approx(bound)


def test_a_federated_owner_is_planned_to_hold_every_layer():
    """`[training] mode = "fedavg"`: an owner's predicted peak is the whole model's, above what
    the split leaves it (`p2psl validate` compares it with the owner's memory)."""
    from p2psl.planning.memory import whole_model_memory

    sized = profile((1, 1, 1, 1), (1, 1, 1, 1), (0, 0, 0, 0), act=(100, 200, 300, 40), params=(1000, 2000, 3000, 400))
    topo, plan, _ = one_node(3, mode="fedavg")
    profiles = {n: sized for n in ("o0", "o1", "o2", "c1")}
    split = peak_memory(plan, topo, profiles)["o0"]
    whole = whole_model_memory(topo, profiles)
    # every layer's parameters (6400 bytes) where the split leaves the owner layers 1 and 4 (1400)
    assert whole - split > 2 * (6400 - 1400)



def test_auto_micro_batches_cut_the_batches_of_one_owner_and_not_of_many():
    """`micro_batches = "auto"`: the planner cuts batches where one owner leaves the chain idle,
    and keeps them whole where many owners fill it (each micro-batch costs tasks and messages);
    a cut batch's plan carries the decision, a whole one's digest is what it always was. (Layers
    of 10–20 ms a batch, where the tasks' and messages' milliseconds count: with layers of
    seconds, even twelve owners gain a little from micro-batches, at the round's fill and drain.)"""
    from p2psl.planning.planner import make_plan

    nodes = ["c1", "c2"]
    chain = profile((1e-5, 0.01, 0.01, 0.01), (1e-5, 0.02, 0.02, 0.02), (1e-6, 1e-3, 1e-3, 1e-3), act=(8, 8, 8, 8))
    for owners, cut in ((["o0"], True), ([f"o{k}" for k in range(12)], False)):
        topo = topology(owners, nodes, micro_batches="auto", first_cut=1, last_cut=3)
        profiles = {n: chain for n in owners + nodes}
        plan = make_plan(topo, profiles, {o: 4 * B for o in owners})
        whole = make_plan(topology(owners, nodes, first_cut=1, last_cut=3), profiles, {o: 4 * B for o in owners})
        assert (plan.micro_batches > 1) == cut, (owners, plan.micro_batches)
        assert (plan.digest == whole.digest) == (not cut)
        if cut:
            assert plan.decisions["micro_batches"] == plan.micro_batches and plan.round_seconds < whole.round_seconds


def test_auto_keeps_whole_batches_without_a_chain_or_room_for_every_owners_gradients():
    """One owner would gain from micro-batches (the test above), but not in a federated-averaging
    run, and not where a compute node could not also hold the other owners' gradients; the plan
    check holds "auto" to the batch size and a fixed number to the topology's."""
    from p2psl.planning.check import plan_problems
    from p2psl.planning.planner import make_plan

    nodes = ["c1", "c2"]
    chain = profile((0.001, 1, 1, 1), (0.001, 2, 2, 2), (0.0001, 0.1, 0.1, 0.1), act=(8, 8, 8, 8),
                    params=(8, 40 * 2**20, 40 * 2**20, 8))
    profiles = {n: chain for n in ["o0", "o1"] + nodes}
    samples = {"o0": 4 * B, "o1": 4 * B}
    roomy = make_plan(topology(["o0", "o1"], nodes, micro_batches="auto", first_cut=1, last_cut=3), profiles, samples)
    assert roomy.micro_batches > 1
    fedavg = make_plan(topology(["o0", "o1"], nodes, micro_batches="auto", first_cut=1, last_cut=3, mode="fedavg"),
                       profiles, samples)
    assert fedavg.micro_batches == 1
    whole = make_plan(topology(["o0", "o1"], nodes, first_cut=1, last_cut=3), profiles, samples)
    assert roomy.peak_memory_bytes["c1"] - whole.peak_memory_bytes["c1"] == 40 * 2**20  # the other owner's gradients
    room = {n: whole.peak_memory_bytes[n] + 20 * 2**20 for n in nodes}  # whole batches fit, cut ones do not
    text = "\n".join(["[training]", f"batch_size = {B}", 'micro_batches = "auto"', "first_cut = 1", "last_cut = 3"]
                     + [line for index, name in enumerate(["o0", "o1"] + nodes) for line in (
                         "[[peer]]", f'name = "{name}"', f'role = "{"compute" if name in nodes else "data_owner"}"',
                         f'address = "127.0.0.1:{7000 + index}"', f'memory = "{room.get(name, 2**30)}B"')])
    assert make_plan(parse_topology(text), profiles, samples).micro_batches == 1
    fixed = topology(["o0", "o1"], nodes, micro_batches=B, first_cut=1, last_cut=3)
    auto = topology(["o0", "o1"], nodes, micro_batches="auto", first_cut=1, last_cut=3)
    assert not any("micro-batches" in p for p in plan_problems(dict(whole.decisions, micro_batches=B), fixed, profiles))
    assert any("micro-batches" in p for p in plan_problems(dict(whole.decisions, micro_batches=4), fixed, profiles))
    many = dict(whole.decisions, micro_batches=64)
    assert any("more than batch_size" in p for p in plan_problems(many, auto, profiles))


@pytest.mark.parametrize("method", ["dp", "milp", "bruteforce"])
def test_the_cuts_are_planned_for_the_micro_batches(method):
    """One owner and three identical compute nodes over six equal middle layers: with whole
    batches every split takes the same time (one stage works at a time) and the tie-break puts
    the cuts first; with four micro-batches the stages overlap and the planner gives each node
    two layers, which the cost model predicts faster than the whole-batch cuts cut up alike."""
    from p2psl.planning.planner import make_plan

    nodes = ["c1", "c2", "c3"]
    layers = profile((0.01,) + (1,) * 6 + (0.01,), (0.01,) + (2,) * 6 + (0.01,), (0,) * 8, act=(8,) * 8,
                     params=(8,) * 8)
    profiles = {n: layers for n in ["o0", *nodes]}
    samples = {"o0": 4 * B}
    whole = make_plan(topology(["o0"], nodes, first_cut=1, last_cut=7), profiles, samples, method=method)
    cut = make_plan(topology(["o0"], nodes, first_cut=1, last_cut=7, micro_batches=4), profiles, samples,
                    method=method)
    assert [(s.first, s.last) for s in whole.chain] == [(2, 2), (3, 3), (4, 7)]
    assert [(s.first, s.last) for s in cut.chain] == [(2, 3), (4, 5), (6, 7)]
    assert cut.micro_batches == 4
    topo = topology(["o0"], nodes, first_cut=1, last_cut=7, micro_batches=4)
    same_cuts = replace(whole, micro_batches=4)
    assert cut.round_seconds < predict(same_cuts, topo, profiles, samples).round_seconds
    # the planner's bound: a micro-batch's cycle (a quarter batch: 4.5 s in the middle, 0.01 s
    # on the owner) plus three more behind the slowest stage (6 s a batch: 1.5 s each)
    assert cut.period_seconds == pytest.approx(4.51 + 3 * 1.5)
