"""Topology files: parsing, every problem reported at once, graph, routes and chains."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psl.errors import TopologyError
from p2psl.topology import load_topology, parse_topology
from p2psl.topology.model import _route
from p2psl.units import parse_bandwidth, parse_duration, parse_size
from tests.helpers import topology_toml

ROOT = Path(__file__).resolve().parents[2]


def problems_of(text: str) -> list[str]:
    with pytest.raises(TopologyError) as info:
        parse_topology(text)
    return info.value.problems


@pytest.mark.parametrize("path", sorted((ROOT / "topologies").glob("*.toml")), ids=lambda p: p.name)
def test_bundled_topologies_are_valid_and_explain_themselves(path):
    topology = load_topology(path)
    assert path.read_text().startswith("#"), "each example opens with a comment saying what it shows"
    assert topology.owners and topology.compute_nodes
    assert next(topology.chain_orders(), None) is not None


def test_defaults_and_graph():
    topo = parse_topology(topology_toml(["a", "b"], ["c1", "c2"]))
    assert topo.training.model == "cnn" and topo.training.rounds == 3
    assert topo.fully_connected and topo.graph.number_of_edges() == 6
    assert topo.link("a", "c1").bandwidth is None
    assert sorted(topo.chain_orders()) == [("c1", "c2"), ("c2", "c1")]


def test_many_problems_are_reported_at_once_each_naming_its_place():
    text = """
[training]
model = "gpt"
rounds = 0
learning_rte = 0.1
batch_size = "big"
[[peer]]
name = "alice"
role = "owner"
address = "127.0.0.1:7101"
memory = "2QB"
[[peer]]
name = "alice"
role = "compute"
address = "127.0.0.1:7101"
memory = "1GiB"
[[peer]]
name = "c2"
role = "compute"
address = "nowhere"
[[link]]
peers = ["alice", "zed"]
bandwidth = "fast"
latency = "soon"
"""
    problems = problems_of(text)
    expected = [
        "[training].model: unknown model 'gpt'",
        "[training].rounds: must be at least 1",
        "unknown key 'learning_rte' (did you mean 'learning_rate'?)",
        "[training].batch_size: expected an integer",
        "peer 'alice'.role: unknown role 'owner'",
        "peer 'alice'.memory: unknown size unit 'QB'",
        "peer 'alice': duplicate name",
        "127.0.0.1:7101 is also the address of peer 'alice'",
        "peer 'c2'.address: expected 'host:port'",
        "peer 'c2'.memory: missing",
        "bandwidth: expected a bandwidth such as '8Mbit/s', got 'fast'",
        "latency: expected a duration such as '20ms', got 'soon'",
        "unknown peer 'zed'",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) >= len(expected)


def test_not_toml_is_one_clear_problem():
    problems = problems_of("[training\nmodel = ")
    assert len(problems) == 1 and "not valid TOML" in problems[0]


def test_roles_must_both_exist():
    text = topology_toml(["a"], [])
    assert any("no compute nodes" in p for p in problems_of(text))


def test_a_chain_the_links_cannot_form_is_reported():
    # owner b reaches only c1, so no order of c1, c2 has b linked to both ends
    text = topology_toml(["a", "b"], ["c1", "c2"], links=[("a", "c1"), ("a", "c2"), ("b", "c1"), ("c1", "c2")])
    assert any("no compute chain" in p for p in problems_of(text))


def test_disconnected_groups_are_reported():
    text = topology_toml(["a", "b"], ["c1"], links=[("a", "c1")])
    assert any("separate groups" in p for p in problems_of(text))


def test_links_route_between_non_neighbours():
    topo = parse_topology(topology_toml(["a", "b"], ["c1"], links=[("a", "c1", "8Mbit/s", "20ms"), ("b", "c1")]))
    assert topo.route("a", "b") == ["a", "c1", "b"]
    assert topo.next_hop("a", "b") == "c1"
    assert topo.link("c1", "a").bandwidth == 1e6 and topo.link("a", "c1").latency == 0.02
    assert topo.neighbours("a") == ["c1"]


@given(st.integers(2, 10), st.floats(0.15, 0.9), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_routes_are_the_first_shortest_path_by_name(size, density, seed):
    """Every peer computes the same route: of all shortest paths, the first in name order."""
    graph = nx.gnp_random_graph(size, density, seed=seed)
    graph = nx.relabel_nodes(graph, {i: f"p{(i * 7919 + seed) % 97:02d}_{i}" for i in graph})
    for src in graph:
        for dst in graph:
            if nx.has_path(graph, src, dst):
                assert _route(graph, src, dst) == sorted(nx.all_shortest_paths(graph, src, dst))[0]
            else:
                with pytest.raises(nx.NetworkXNoPath):
                    _route(graph, src, dst)


def test_digest_changes_with_content_not_formatting():
    a = parse_topology(topology_toml(["a"], ["c1"]))
    b = parse_topology("# a comment\n" + topology_toml(["a"], ["c1"]).replace(" = ", "="))
    c = parse_topology(topology_toml(["a"], ["c1"], training={"rounds": 4}))
    assert a.digest == b.digest != c.digest


def test_first_cut_must_precede_last_cut():
    text = topology_toml(["a"], ["c1"], training={"first_cut": 4, "last_cut": 2})
    assert any("first_cut (4) must be smaller than last_cut (2)" in p for p in problems_of(text))


def test_missing_dataset_file_and_profile_are_reported(tmp_path):
    text = topology_toml(["a"], ["c1"], training={"dataset": "nothere.npz", "profile": "nothere.csv"})
    problems = problems_of(text)
    assert any("no such file" in p and "nothere.npz" in p for p in problems)
    assert any("no such file" in p and "nothere.csv" in p for p in problems)


def test_unreadable_file(tmp_path):
    with pytest.raises(TopologyError) as info:
        load_topology(tmp_path / "missing.toml")
    assert "cannot read" in info.value.problems[0]


@pytest.mark.parametrize("text,value", [("2GiB", 2 * 2**30), ("512 MB", 512e6), ("1000", 1000), (4096, 4096)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,value", [("8Mbit/s", 1e6), ("100Mbps", 12.5e6), ("10MB/s", 1e7), ("1Gb/s", 1.25e8),
                                        ("8b/s", 1), ("8B/s", 8), ("8kb/s", 1e3), ("8MBps", 8e6), ("8mbps", 1e6),
                                        ("2MiB/s", 2 * 2**20), ("3 Mbits/s", 3e6 / 8)])
def test_bandwidths(text, value):
    """A lower-case b is bits and an upper-case B bytes, in every spelling."""
    assert parse_bandwidth(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["8", "8 parsecs/s", "8Xbit/s", "0Mbit/s", "-8Mbit/s", "inf Mbit/s", float("nan")])
def test_bad_bandwidths(bad):
    with pytest.raises(ValueError):
        parse_bandwidth(bad)


@pytest.mark.parametrize("line,problem", [
    ("memory = inf", "memory: expected a size such as '2GiB' (finite, not negative), got inf"),
    ('memory = "1e400"', "memory: expected a size such as '2GiB' (finite, not negative), got '1e400'"),
    ("speed = inf", "speed: must be a finite number, got inf"),
    ("speed = nan", "speed: must be a finite number, got nan"),
    ('address = "127.0.0.1:\\u00b2"', "address: expected 'host:port' with a port in 1–65535"),
])
def test_numbers_toml_allows_but_no_peer_can_have_are_problems(line, problem):
    """TOML has inf and nan, and Python reads more characters as digits than a port can hold."""
    key = line.split(" = ")[0]
    lines = topology_toml(["alice"], ["c1"]).splitlines()
    at = [i for i, text in enumerate(lines) if text.startswith(f"{key} =")] or [len(lines)]
    lines[at[-1]:at[-1] + 1] = [line]  # c1's, the last peer's
    assert any(problem in p for p in problems_of("\n".join(lines) + "\n")), problems_of("\n".join(lines))


@pytest.mark.parametrize("table,value", [("[timeouts]\ndead", "nan"), ("[timeouts]\ngone", "-1.0"),
                                         ('[[link]]\npeers = ["alice", "c1"]\nlatency', "-0.5"),
                                         ('[[link]]\npeers = ["alice", "c1"]\nlatency', "nan")])
def test_durations_that_are_no_time_are_problems(table, value):
    problems = problems_of(topology_toml(["alice"], ["c1"]) + f"{table} = {value}\n")
    assert any("expected a duration such as '20ms' (finite, not negative)" in p for p in problems), problems


def test_a_nul_in_a_path_is_a_problem():
    text = topology_toml(["alice"], ["c1"], training={"dataset": "a-nul.npz"}).replace("-nul", "\\u0000")
    problems = problems_of(text)
    assert any("[training].dataset: a path cannot hold a NUL character" in p for p in problems), problems


@pytest.mark.parametrize("text,value", [("20ms", 0.02), ("1s", 1.0), ("500us", 5e-4), (0, 0.0)])
def test_durations(text, value):
    assert parse_duration(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "fast", "-1s", "3 parsecs"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_accelerator_keys_default_to_the_cpu_and_parse_sizes():
    topo = parse_topology(topology_toml(["a"], ["c1", "c2", "c3"], peer_keys={
        "c1": {"accelerator": "cuda", "accelerator_memory": "80GiB"},
        "c2": {"accelerator": "cuda:1"}, "c3": {"accelerator": "auto"}}))
    assert topo.peer("a").accelerator == "cpu" and topo.peer("a").accelerator_memory is None
    assert topo.peer("c1").accelerator == "cuda" and topo.peer("c1").accelerator_memory == 80 * 2**30
    assert topo.peer("c2").accelerator == "cuda:1" and topo.peer("c3").accelerator == "auto"


def test_bad_accelerator_keys_are_each_named():
    problems = problems_of(topology_toml(["a"], ["c1", "c2", "c3", "c4"], peer_keys={
        "c1": {"accelerator": "tpu"}, "c2": {"accelerator": "cuda", "accelerator_memory": "0B"},
        "c3": {"accelerator_memory": "8GiB"}, "c4": {"accelerator": "cuda", "accelerator_memory": "lots"}}))
    text = "\n".join(problems)
    assert "peer 'c1'.accelerator: must be 'cpu', 'cuda', 'cuda:N'" in text
    assert "peer 'c2'.accelerator_memory: must be positive" in text
    assert "peer 'c3'.accelerator_memory: is only meaningful with an accelerator" in text
    assert any(p.startswith("peer 'c4'.accelerator_memory:") for p in problems)
    assert len(problems) == 4, problems


def test_training_mode_is_split_by_default_and_fedavg_on_request():
    assert parse_topology(topology_toml(["a"], ["c1"])).training.mode == "split"
    assert parse_topology(topology_toml(["a"], ["c1"], training={"mode": "fedavg"})).training.mode == "fedavg"
    problems = problems_of(topology_toml(["a"], ["c1"], training={"mode": "federated"}))
    assert problems == ["[training].mode: must be one of ('split', 'fedavg'), got 'federated'"]


def test_micro_batches_is_a_number_or_auto():
    assert parse_topology(topology_toml(["a"], ["c1"], training={"micro_batches": "auto"})).training.micro_batches == 0
    assert parse_topology(topology_toml(["a"], ["c1"], training={"micro_batches": 4})).training.micro_batches == 4
    for bad in ("some", 0):
        assert problems_of(topology_toml(["a"], ["c1"], training={"micro_batches": bad})) == [
            f"[training].micro_batches: must be a number of micro-batches, at least 1, or 'auto', got {bad!r}"]


def test_a_byte_order_mark_is_not_part_of_the_file(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_text("\ufeff" + topology_toml(["alice"], ["c1"]), encoding="utf-8")
    assert list(load_topology(path).names) == ["alice", "c1"]


def test_a_peer_without_a_name_is_said_so():
    text = topology_toml(["alice"], ["c1"]).replace('name = "c1"\n', "")
    assert "[[peer]] #2: has no name" in problems_of(text)


def test_more_micro_batches_than_samples_in_a_batch_is_a_problem():
    text = topology_toml(["alice"], ["c1"], training={"batch_size": 16, "micro_batches": 32})
    assert problems_of(text) == ["[training]: micro_batches (32) cannot cut a batch of batch_size (16) samples: "
                                 "at most one sample each"]
    assert parse_topology(topology_toml(["alice"], ["c1"], training={"batch_size": 16, "micro_batches": 16}))
