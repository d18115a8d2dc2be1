"""[Note: the cost objective] with real peer processes: the planner pays only for the compute
nodes worth their price, the one left out idles through every round, and takes over when a node
in use is lost."""

from __future__ import annotations

import json
import signal

import pytest

from tests.helpers import free_ports
from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, wait_for, write_topology

pytestmark = pytest.mark.timeout(600)

OWNERS, COMPUTE = ["alice", "bob"], ["big", "small"]
TRAINING = {"rounds": 4, "batch_size": 16, "objective": "cost"}
TIMEOUTS = {"connect": "60s", "heartbeat": "0.5s", "dead": "6s", "gone": "3s", "request": "90s", "start": "120s"}
PRICES = {"big": {"price": 3.0}, "small": {"price": 0.5}}


def deploy(tmp):
    topology = write_topology(tmp, OWNERS, COMPUTE, training=TRAINING, timeouts=TIMEOUTS, speeds={"small": 0.5},
                              peer_keys=PRICES)
    out = tmp / "out"
    procs = {n: start_peer(topology, n, out) for n in COMPUTE + OWNERS}
    codes = wait_all(procs, timeout=500)
    assert codes == {n: 0 for n in procs}, "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    return out


def test_the_cheap_node_trains_and_the_expensive_one_idles(tmp_path):
    out = deploy(tmp_path)
    plan = json.loads((out / "alice" / "plan.json").read_text())
    assert plan["objective"] == "cost" and plan["chain"] == ["small"]
    records = rounds_of(out, "alice")
    assert [r["round"] for r in records] == [1, 2, 3, 4] and records[-1]["test_accuracy"] >= 0.9
    assert rounds_of(out, "big") == records  # it took part in every round's cut and heard the reports


def test_a_node_left_out_takes_over_when_a_node_in_use_is_lost(tmp_path):
    """Two cheap nodes whose memory holds one layer each of the middle (layers 2 and 3), and an
    expensive one that holds both: the planner pays for the two cheap ones. s2 is killed after
    round 1; the one cheap node left cannot hold the middle alone, so the survivors re-plan
    with the expensive node, which receives s2's layer from the replica s1 keeps."""
    ports = free_ports(5)
    peers = [("alice", "data_owner", "2GiB", None), ("bob", "data_owner", "2GiB", None),
             ("big", "compute", "4GiB", 3.0), ("s1", "compute", "403100000B", 0.5), ("s2", "compute", "403100000B", 0.5)]
    lines = ["[training]", 'model = "cnn"', "rounds = 4", "batch_size = 16", 'objective = "cost"', "first_cut = 1",
             "last_cut = 3", "[timeouts]", *(f'{k} = "{v}"' for k, v in TIMEOUTS.items())]
    for (name, role, memory, price), port in zip(peers, ports):
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                  f'memory = "{memory}"'] + ([f"price = {price}"] if price else [])
    topology = tmp_path / "topology.toml"
    topology.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    procs = {name: start_peer(topology, name, out) for name, *_ in peers}
    wait_for(lambda: rounds_of(out, "alice"), 300, lambda: log_tail(out, "alice"), [procs["s2"]])
    assert json.loads((out / "alice" / "plan.json").read_text())["chain"] == ["s1", "s2"]
    procs["s2"].send_signal(signal.SIGKILL)
    codes = wait_all(procs, timeout=500)
    assert {n: c for n, c in codes.items() if n != "s2"} == {n: 0 for n in procs if n != "s2"}, \
        "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    records = rounds_of(out, "alice")
    assert [r["round"] for r in records] == [1, 2, 3, 4] and records[-1]["epoch"] == 1
    assert "big" in json.loads((out / "alice" / "plan.json").read_text())["chain"]
    assert records[-1]["test_accuracy"] >= 0.9
