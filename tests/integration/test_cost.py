"""[Note: the cost objective] with real peer processes: the planner pays only for the compute
nodes worth their price, and the one left out idles through every round."""

from __future__ import annotations

import json

import pytest

from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, write_topology

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
