"""Several chains ([Note: several chains]) with real peer processes and the digits data: four owners
and four compute nodes as two chains of two, against the same deployment as one chain of four."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from p2psl.wire import checkpoint
from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, wait_for, write_topology

pytestmark = pytest.mark.timeout(600)

OWNERS, COMPUTE = ["alice", "bob", "carol", "dave"], ["c1", "c2", "c3", "c4"]
TRAINING = {"rounds": 5, "batch_size": 16, "keep_checkpoints": "all"}
TIMEOUTS = {"connect": "60s", "heartbeat": "0.5s", "dead": "6s", "gone": "3s", "request": "90s", "start": "120s"}


def deploy(tmp, chains: int, kill: str | None = None):
    """Every peer as its own process; `kill` is SIGKILLed once round 1 is recorded."""
    topology = write_topology(tmp, OWNERS, COMPUTE, training={**TRAINING, "chains": chains}, timeouts=TIMEOUTS)
    out = tmp / "out"
    procs = {n: start_peer(topology, n, out) for n in COMPUTE + OWNERS}
    if kill is not None:
        wait_for(lambda: rounds_of(out, "alice"), 300, lambda: log_tail(out, "alice"), [procs[kill]])
        procs[kill].send_signal(signal.SIGKILL)
    codes = wait_all(procs, timeout=500)
    assert {n: c for n, c in codes.items() if n != kill} == {n: 0 for n in procs if n != kill}, \
        "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    return rounds_of(out, "alice"), out


@pytest.fixture(scope="module")
def one_chain(tmp_path_factory):
    records, out = deploy(tmp_path_factory.mktemp("one-chain"), chains=1)
    assert json.loads((out / "alice" / "plan.json").read_text())["chains"] == 1
    return records


def _weights(out, node: str, round_: int) -> dict[str, dict[str, torch.Tensor]]:
    """A compute node's checkpointed weights of `round_`, per owner copy."""
    state = checkpoint.load(out / node / "checkpoints", round_).state
    copies: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        owner, kind, name = key.split("/", 2)
        if kind == "model":
            copies.setdefault(owner, {})[name] = value
    return copies


def test_two_chains_train_as_well_as_one_and_agree_on_the_weights_at_every_round_end(tmp_path, one_chain):
    records, out = deploy(tmp_path, chains=2)
    plan = json.loads((out / "alice" / "plan.json").read_text())
    assert plan["chains"] == 2 and plan["chain"] == COMPUTE
    routes = plan["routes"]
    assert sorted(routes.values()) == [0, 0, 1, 1]  # two owners per chain
    assert [r["round"] for r in records] == list(range(1, TRAINING["rounds"] + 1))
    assert all(r["aggregated"] == OWNERS for r in records)
    print("accuracy per round, two chains:", [r["test_accuracy"] for r in records])
    print("accuracy per round, one chain: ", [r["test_accuracy"] for r in one_chain])
    assert abs(records[-1]["test_accuracy"] - one_chain[-1]["test_accuracy"]) <= 0.01
    # c1 and c3 run the same layers on the two chains, as do c2 and c4: after every round's
    # averaging, every copy on both holds the same weights, bit for bit
    for first, second in (("c1", "c3"), ("c2", "c4")):
        for round_ in range(1, TRAINING["rounds"] + 1):
            a, b = _weights(out, first, round_), _weights(out, second, round_)
            assert sorted(a) == sorted(o for o in OWNERS if routes[o] == routes[sorted(a)[0]])
            assert set(a).isdisjoint(b)  # each keeps copies of its own chain's owners only
            reference = next(iter(a.values()))
            for copy in [*a.values(), *b.values()]:
                assert copy.keys() == reference.keys()
                assert all(torch.equal(copy[k], reference[k]) for k in reference), (first, second, round_)


def test_a_compute_node_lost_from_two_chains_leaves_three_chains_of_one(tmp_path, one_chain):
    """c4 is killed after round 1. Three nodes cannot form two chains of equal length, and with
    the owners' cuts kept the middle's two layers cannot make one chain of three: the survivors
    re-plan three chains of one node (`chains_left`: "auto"), the owners of c4's chain move, and
    training ends as well as without the loss."""
    records, out = deploy(tmp_path, chains=2, kill="c4")
    assert [r["round"] for r in records] == list(range(1, TRAINING["rounds"] + 1))
    assert records[-1]["epoch"] == 1
    plan = json.loads((out / "alice" / "plan.json").read_text())
    assert plan["chains"] == 3 and plan["chain"] == ["c1", "c2", "c3"]
    print("accuracy per round, c4 lost:", [r["test_accuracy"] for r in records])
    assert abs(records[-1]["test_accuracy"] - one_chain[-1]["test_accuracy"]) <= 0.01


def test_two_chains_re_plan_around_a_slowed_node_and_keep_averaging_exactly(tmp_path):
    """[Note: calibration] with two chains: c1 turns eight times slower in round 2; the peers
    re-plan at a round boundary on the measured times, move each owner's copies to their new
    holders, and the nodes that run the same layers still hold the same weights at every round
    end; training reaches the accuracy of the run without the fault."""
    from tests.integration.test_calibration import SLOW, TRAINING as WIDE

    training = {**WIDE, "rounds": 5, "chains": 2, "keep_checkpoints": "all"}
    speeds = {n: 0.25 for n in COMPUTE}
    runs = {}
    for name, faults in (("clean", None), ("slowed", SLOW)):
        folder = tmp_path / name
        folder.mkdir()
        topology = write_topology(folder, OWNERS, COMPUTE, training=training, timeouts=TIMEOUTS, speeds=speeds)
        env = {"P2PSL_FAULTS": faults} if faults else None
        procs = {n: start_peer(topology, n, folder / "out", env=env) for n in COMPUTE + OWNERS}
        codes = wait_all(procs, timeout=500)
        assert codes == {n: 0 for n in procs}, "\n\n".join(f"{n}:\n{log_tail(folder / 'out', n)}" for n in procs)
        runs[name] = (rounds_of(folder / "out", "alice"), folder / "out")
    records, out = runs["slowed"]
    print("epochs:", [r["epoch"] for r in records], "seconds:", [round(r["seconds"], 2) for r in records])
    assert records[-1]["epoch"] >= 1  # re-planned on the measured times
    plan = json.loads((out / "alice" / "plan.json").read_text())
    clean = json.loads((runs["clean"][1] / "alice" / "plan.json").read_text())
    assert plan["digest"] != clean["digest"] and plan["chains"] == 2, (plan, clean)
    assert abs(records[-1]["test_accuracy"] - runs["clean"][0][-1]["test_accuracy"]) <= 0.01
    holders = [[node for node in plan["chain"] if tuple(plan["assignments"][node]) == span]
               for span in {tuple(v) for v in plan["assignments"].values()}]
    assert sorted(len(same) for same in holders) == [2, 2]
    for same in holders:
        weights = [copy for node in same for copy in _weights(out, node, 5).values()]
        assert all(torch.equal(w[k], weights[0][k]) for w in weights for k in weights[0]), same
