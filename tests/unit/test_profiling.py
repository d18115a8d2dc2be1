"""Profiling what a peer may hold: which layers, measured one at a time, the cache that adds up,
and a planner that never gives a peer a layer it did not time."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

from p2psl.planning.check import plan_problems
from p2psl.planning.measure import measure_layer
from p2psl.planning.planner import make_plan
from p2psl.planning.profile import Profile
from p2psl.planning import profiling
from p2psl.planning.profiling import Layers, cached_layers_profile, candidate_layers, measure_layers
from tests.helpers import make_topology

MiB = 2**20


def tiny(built: list[int] | None = None) -> Layers:
    """Linear(8, 16), ReLU, Linear(16, 4); `built` records which layers were built."""
    def build(j: int) -> nn.Module:
        if built is not None:
            built.append(j)
        return [lambda: nn.Linear(8, 16), nn.ReLU, lambda: nn.Linear(16, 4)][j]()
    return Layers("tiny", (8,), [(16,), (16,), (4,)], [(8 * 16 + 16) * 4, 0, (16 * 4 + 4) * 4], build)


def test_each_layer_is_built_alone_and_timed_on_its_own_input_shape():
    built = []
    rows = measure_layers(tiny(built), [2, 0], 4, warmup=0, repeats=1)
    assert built == [2, 0] and sorted(rows) == [0, 2]
    fwd, bwd, opt, act, par = rows[2]
    assert fwd > 0 and bwd > 0 and opt > 0 and act == 4 * 4 * 4 and par == (16 * 4 + 4) * 4


class Preempted(nn.Module):
    """A linear layer whose forward loses a 5 ms time slice on the calls in `slow` (counted from 0)."""

    def __init__(self, slow: set[int]):
        super().__init__()
        self.linear, self.slow, self.calls = nn.Linear(8, 4), slow, 0

    def forward(self, x):
        if self.calls in self.slow:
            time.sleep(0.005)
        self.calls += 1
        return self.linear(x)


def test_on_the_cpu_time_off_the_core_is_not_the_layers():
    """[Note: timing under interference]: on the CPU the timing thread's CPU time is the clock,
    so a layer that loses its core on every call (here: sleeps) is timed at its own work."""
    always, threads = Preempted(set(range(100))), torch.get_num_threads()
    (fwd, _, _, _, _), _ = measure_layer(always, torch.randn(4, 8), False, warmup=0, repeats=5)
    assert always.calls == 5 and fwd < 0.004  # once: nothing looks interfered
    assert torch.get_num_threads() == threads  # held to one thread while timing, given back after


def test_a_layer_timed_on_the_wall_clock_while_preempted_is_timed_again():
    """[Note: timing under interference], as on an accelerator's wall clock: three of five forward passes lost a time slice, so their
    median did too; the second attempt runs undisturbed and is the one kept."""
    layer = Preempted({0, 1, 2})
    (fwd, _, _, _, _), _ = measure_layer(layer, torch.randn(4, 8), False, 0, 5, clock=time.perf_counter)
    assert layer.calls >= 10 and fwd < 0.004  # (a third try only if the machine preempted the second)
    always = Preempted(set(range(100)))  # on the wall clock, a sleep every time is the layer's own time, kept
    (fwd, _, _, _, _), _ = measure_layer(always, torch.randn(4, 8), False, 0, 5, clock=time.perf_counter)
    assert fwd >= 0.005
    hit_every_try = Preempted(set(range(100)) - {3, 4, 8, 9, 13, 14, 18, 19})
    measure_layer(hit_every_try, torch.randn(4, 8), False, 0, 5, clock=time.perf_counter)
    assert 10 <= hit_every_try.calls <= 15  # timed again, at most twice


def test_the_cache_adds_what_later_peers_time_and_a_damaged_file_is_timed_again(tmp_path):
    built = []
    first = cached_layers_profile(tiny(built), [0], 4, cache_dir=tmp_path, warmup=0, repeats=1)
    assert built == [0] and first.timed == 1 and first.profile.unmeasured == (2, 3)
    assert first.profile.fwd[1:] == (0.0, 0.0)
    # the sizes of a layer not timed are the model's: those timing it finds the same
    second = cached_layers_profile(tiny(built), [1, 2], 4, cache_dir=tmp_path, warmup=0, repeats=1)
    assert built == [0, 1, 2] and second.timed == 2
    # what a peer shares has times for its own layers only, whatever the cache holds besides
    assert second.profile.unmeasured == (1,) and second.profile.fwd[0] == 0.0
    assert second.profile.act_bytes == first.profile.act_bytes and second.profile.param_bytes == first.profile.param_bytes
    again = cached_layers_profile(tiny(built), [0, 1, 2], 4, cache_dir=tmp_path)
    assert again.timed == 0 and built == [0, 1, 2] and again.profile.unmeasured == ()
    assert again.profile.fwd[0] == first.profile.fwd[0] and again.profile.fwd[1:] == second.profile.fwd[1:]
    assert json.loads(again.path.read_text())["fwd"] == list(again.profile.fwd)
    assert cached_layers_profile(tiny(built), [0], 4, cache_dir=tmp_path).profile == first.profile
    again.path.write_text("{broken")
    cached_layers_profile(tiny(built), [0], 4, cache_dir=tmp_path, warmup=0, repeats=1)
    assert built == [0, 1, 2, 0]


def test_unmeasured_travels_in_the_profile_and_is_checked():
    p = Profile("d", 4, (1.0, 0.0), (1.0, 0.0), (0.0, 0.0), (4, 4), (8, 8), unmeasured=(2,))
    assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert p.measured(0) and not p.measured(1)
    assert "unmeasured" not in Profile("d", 4, (1.0,), (1.0,), (0.0,), (4,), (8,)).to_json()  # as before
    with pytest.raises(ValueError, match="unmeasured"):
        Profile.from_json({**p.to_json(), "unmeasured": [3]})


def layers_of(count: int, param_mib: int = 1) -> Layers:
    return Layers("m", (4,), [(4,)] * count, [param_mib * MiB] * count, lambda j: nn.Linear(4, 4))


def test_with_fixed_cuts_an_owner_times_its_own_layers_and_a_compute_node_the_middle():
    topology = make_topology(["alice", "bob"], ["c1", "c2"], training={"first_cut": 2, "last_cut": 36})
    layers = layers_of(37)
    assert candidate_layers(topology, "alice", layers) == [0, 1, 36]
    assert candidate_layers(topology, "c1", layers) == list(range(2, 36))


def test_without_cuts_an_owner_times_what_its_memory_could_hold_at_each_end():
    # 10 layers of 16 MiB: an owner's state is ~5.5 × its parts' bytes (2 owners) + 384 MiB
    layers = layers_of(10, 16)
    roomy = make_topology(["alice", "bob"], ["c1"], memory="64GiB")
    assert candidate_layers(roomy, "alice", layers) == list(range(10))          # fronts up to L − 2, backs too
    assert candidate_layers(roomy, "c1", layers) == list(range(1, 9))
    tight = make_topology(["alice", "bob"], ["c1"], memory="600MiB")
    held = candidate_layers(tight, "alice", layers)
    assert held[0] == 0 and held[-1] == 9 and len(held) < 10                      # a front and a back only


def profiles_for(topology, count: int, unmeasured_for: dict[str, tuple[int, ...]]) -> dict[str, Profile]:
    times = tuple(0.01 for _ in range(count))
    return {p.name: Profile("d", 32, times, times, (0.0,) * count, (1024,) * count, (4096,) * count,
                            unmeasured=unmeasured_for.get(p.name, ())) for p in topology.peers}


def test_the_planner_never_gives_an_owner_a_layer_it_did_not_time():
    topology = make_topology(["alice", "bob"], ["c1"])
    samples = {"alice": 100, "bob": 100}
    # owners fast, the compute node slow: the planner gives the owners big parts when it may
    profiles = profiles_for(topology, 8, {})
    profiles["c1"] = Profile("d", 32, (1.0,) * 8, (1.0,) * 8, (0.0,) * 8, (1024,) * 8, (4096,) * 8)
    greedy = make_plan(topology, profiles, samples)
    assert greedy.owner_first[1] > 1 or greedy.owner_last[0] < 8, greedy
    limited = {**profiles, "alice": Profile("d", 32, (0.01,) * 8, (0.01,) * 8, (0.0,) * 8, (1024,) * 8,
                                            (4096,) * 8, unmeasured=(2, 3, 4, 5, 6, 7))}
    plan = make_plan(topology, limited, samples)
    assert plan.owner_first == (1, 1) and plan.owner_last == (8, 8)
    assert any("did not time" in p for p in plan_problems(greedy.decisions, topology, limited))
    assert plan_problems(plan.decisions, topology, limited) == []


def test_peers_of_one_machine_time_in_turn_and_the_later_ones_take_the_first_ones_times(tmp_path):
    """Eight peers in threads of one process, as `p2psl run --in-process` runs them: one times the
    layers, alone; the others wait for it and time nothing."""
    import threading

    built: list[int] = []
    lock = threading.Lock()

    def build(j: int) -> nn.Module:
        with lock:
            built.append(j)
        return tiny().build(j)

    layers = Layers("tiny", (8,), [(16,), (16,), (4,)], [(8 * 16 + 16) * 4, 0, (16 * 4 + 4) * 4], build)
    start = threading.Barrier(8)
    results = []

    def peer() -> None:
        start.wait()
        results.append(cached_layers_profile(layers, [0, 1, 2], 4, cache_dir=tmp_path, warmup=0, repeats=1))

    threads = [threading.Thread(target=peer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.timed for r in results) == [0] * 7 + [3] and built == [0, 1, 2]
    assert len({r.profile for r in results}) == 1


class Sleepy(nn.Module):
    """A linear layer whose forward works at least 1 ms of its thread's CPU time, however idle
    the machine (the clock profiles are timed on, [Note: timing under interference])."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        until = time.thread_time() + 0.001
        while time.thread_time() < until:
            pass
        return self.linear(x)


def sleepy_layers(built: list[int]) -> Layers:
    def build(j: int) -> nn.Module:
        built.append(j)
        return Sleepy() if j == 0 else nn.Linear(4, 4)
    return Layers("sleepy", (8,), [(4,), (4,)], [(8 * 4 + 4) * 4, (4 * 4 + 4) * 4], build)


def cache_with(tmp_path, layers: Layers, fwd: tuple[float, float]) -> None:
    """A cache file for `layers` at batch 4 whose layers' forward passes took `fwd`, and their
    backward passes and steps 0.1 µs each (faster than any timing: a cache's times, not the
    first timing's, decide which are kept)."""
    first = cached_layers_profile(layers, [0, 1], 4, cache_dir=tmp_path, warmup=0, repeats=1)
    data = json.loads(first.path.read_text())
    data["fwd"], data["bwd"], data["opt"] = list(fwd), [1e-7, 1e-7], [1e-7, 1e-7]
    first.path.write_text(json.dumps(data))
    profiling._CHECKED.discard(first.path)  # as a later process finds it


def test_a_cache_timed_slower_than_the_machine_runs_is_timed_again_and_keeps_the_faster_times(tmp_path):
    """[Note: a cache timed slower than the machine runs]: the busy layer was cached at 18 ms
    (a busy machine) and takes 1 ms: the check finds it, every layer is timed again, and each
    keeps the faster of its times; the next peer of this process checks nothing."""
    built: list[int] = []
    layers = sleepy_layers(built)
    cache_with(tmp_path, layers, (0.018, 1e-7))
    built.clear()
    again = cached_layers_profile(layers, [0, 1], 4, cache_dir=tmp_path, warmup=0, repeats=3)
    assert built == [0, 0, 1] and again.timed == 2       # the check, then every layer
    assert 0.001 <= again.profile.fwd[0] < 0.018 / 1.5
    assert again.profile.fwd[1] == 1e-7                  # the cache's was faster: kept
    assert json.loads(again.path.read_text())["fwd"] == list(again.profile.fwd)
    later = cached_layers_profile(layers, [0, 1], 4, cache_dir=tmp_path)
    assert later.timed == 0 and built == [0, 0, 1] and later.profile == again.profile


def test_a_check_that_runs_slower_than_the_cache_changes_nothing(tmp_path):
    """The cache says 0.2 ms for the layer that works 1 ms of CPU: a busy machine now, not a slow
    cache; the cache stands."""
    built: list[int] = []
    layers = sleepy_layers(built)
    cache_with(tmp_path, layers, (0.0002, 1e-7))
    built.clear()
    again = cached_layers_profile(layers, [0, 1], 4, cache_dir=tmp_path, warmup=0, repeats=3)
    assert built == [0] and again.timed == 0 and again.profile.fwd == (0.0002, 1e-7)
