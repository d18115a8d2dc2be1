"""Checking a plan without the planner (docs/protocol.md §13, "Checking a plan"): the planner's
own plans pass, and each way a plan can break the rules is named."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from p2psl.errors import PlanMismatch
from p2psl.planning.check import decisions_digest, plan_of, plan_problems
from p2psl.planning.memory import peak_memory
from p2psl.planning.plan import Plan
from p2psl.planning.planner import make_plan
from p2psl.planning.profile import peer_profiles
from p2psl.runtime.agreement import judge
from p2psl.topology import parse_topology
from p2psl.wire.codec import decode, encode
from p2psl.wire.messages import PlanProposal
from tests.unit.test_planner import REFERENCE, nodes, owners, toml


def deployment(memory: str = "64GiB", links=(), **training):
    text = toml(owners(3, device="d1", memory="12GiB") + nodes(*({"device": d, "memory": memory}
                                                                 for d in ("VM", "laptop", "VM"))),
                links=links, batch_size=128, profile=str(REFERENCE / "vgg19_cifar10_bs128.csv"), **training)
    topology = parse_topology(text)
    return topology, peer_profiles(topology), {f"o{k:02d}": 3000 for k in range(3)}


@pytest.fixture(scope="module")
def planned():
    topology, profiles, samples = deployment()
    return topology, profiles, make_plan(topology, profiles, samples)


def test_the_planners_plan_passes_and_its_digest_covers_its_decisions(planned):
    topology, profiles, plan = planned
    assert plan_problems(plan.decisions, topology, profiles) == []
    assert decisions_digest(plan.decisions) == plan.digest == \
        hashlib.sha256(json.dumps(plan.decisions, sort_keys=True).encode()).hexdigest()


def test_the_decisions_travel_in_the_plan_message(planned):
    _, _, plan = planned
    message = PlanProposal(src="o00", dst="c1", digest=plan.digest, epoch=0, decisions=plan.decisions)
    frames = encode(message)
    back = decode(frames[0])
    assert back.decisions == plan.decisions and decisions_digest(back.decisions) == back.digest


def broken(plan: Plan, change) -> dict:
    decisions = copy.deepcopy(plan.decisions)
    change(decisions)
    return decisions


def test_each_broken_rule_is_named(planned):
    topology, profiles, plan = planned
    first, last = plan.owner_first[1], plan.owner_last[0]

    def gap(d):  # the middle starts one layer late: not a partition
        d["chain"][0][1] += 1
    assert "part 1 starts at layer" in plan_problems(broken(plan, gap), topology, profiles)[0]

    def owners_reordered(d):
        d["owners"].reverse()
    assert "owners" in plan_problems(broken(plan, owners_reordered), topology, profiles)[0]

    def node_missing(d):  # the last node's layers handed to the one before it
        d["chain"][-2][2] = d["chain"][-1][2]
        del d["chain"][-1]
    assert "every compute node once" in plan_problems(broken(plan, node_missing), topology, profiles)[0]

    def layers_miscounted(d):
        d["num_layers"] += 1
        d["owner_last"][1] += 1
    assert "layers" in plan_problems(broken(plan, layers_miscounted), topology, profiles)[0]
    assert "malformed" in plan_problems({"chain": "c1"}, topology, profiles)[0]

    def whole_batches_spelt_out(d):  # another digest for the same plan: whole batches are left out
        d["micro_batches"] = 1
    assert "micro_batches 1 must be left out" in plan_problems(broken(plan, whole_batches_spelt_out), topology,
                                                                profiles)[0]
    assert first >= 1 and last <= plan.num_layers


def test_the_fixed_cuts_and_the_chains_links_are_checked():
    topology, profiles, samples = deployment(first_cut=3, last_cut=22)
    plan = make_plan(topology, profiles, samples)
    moved = copy.deepcopy(plan.decisions)
    moved["owner_first"][1] -= 1
    moved["chain"][0][1] -= 1
    assert "first_cut is 3" in plan_problems(moved, topology, profiles)[0]
    # a line of links: o* – c1 – c2 – c3 – o*; the chain must run c1, c2, c3 or c3, c2, c1
    links = [{"a": o, "b": c} for o in ("o00", "o01", "o02") for c in ("c1", "c3")] + \
            [{"a": "c1", "b": "c2"}, {"a": "c2", "b": "c3"}]
    line, line_profiles, _ = deployment(links=links)
    decisions = {"num_layers": plan.num_layers, "owners": ["o00", "o01", "o02"], "owner_first": [1, 3],
                 "owner_last": [23, plan.num_layers], "chain": [["c2", 4, 10], ["c1", 11, 16], ["c3", 17, 22]]}
    assert "cannot run the chain in the order c2 → c1 → c3" in plan_problems(decisions, line, line_profiles)[0]
    decisions["chain"] = [["c1", 4, 10], ["c2", 11, 16], ["c3", 17, 22]]
    assert plan_problems(decisions, line, line_profiles) == []


def test_a_plan_that_overflows_a_peers_memory_is_refused(planned):
    topology, profiles, plan = planned
    need = peak_memory(plan, topology, profiles)
    tight, tight_profiles, _ = deployment(memory=f"{min(need[n] for n in plan.nodes) - 1}B")
    problems = plan_problems(plan.decisions, tight, tight_profiles)
    assert problems and all(" needs " in p and "its memory is" in p for p in problems)


def test_a_differing_plan_is_judged_in_the_mismatch_error(planned):
    topology, profiles, plan = planned
    ok = PlanProposal(src="o01", dst="o00", digest=plan.digest, epoch=0, decisions=plan.decisions)
    assert judge(ok, topology, profiles) == "; o01's plan fits too, but differs"
    forged = PlanProposal(src="o01", dst="o00", digest="0" * 64, epoch=0, decisions=plan.decisions)
    assert "do not match its digest" in judge(forged, topology, profiles)
    assert judge(PlanProposal(src="o01", dst="o00", digest="0" * 64, epoch=0), topology, profiles) == ""
    assert PlanMismatch  # the error the judgement is part of


def test_the_documented_example_digest():
    """docs/protocol.md §13 (plan): the example decisions and their digest."""
    example = {"chain": [["c1", 2, 2]], "num_layers": 3, "owner_first": [1, 1], "owner_last": [3, 3],
               "owners": ["alice"]}
    assert decisions_digest(example) == "cdaa2e81919b9ab3876c7b78322d8817efa8a40d7be8746ea96ce3021cb2c06b"
    text = (REFERENCE.parents[1] / "docs" / "protocol.md").read_text()
    assert decisions_digest(example) in text
    # two chains of one node ([Note: several chains]): the example after it
    two = {"chain": [["c1", 2, 3], ["c2", 2, 3]], "chains": 2, "num_layers": 4, "owner_first": [1, 1],
           "owner_last": [4, 4], "owners": ["alice", "bob"], "routes": [0, 1]}
    assert decisions_digest(two) == "3323729384c19a026ea0cd2893fc9a6fbc51f023f9486b4d946a878255e15e77"
    assert decisions_digest(two) in text and plan_of(two).digest == decisions_digest(two)


@pytest.mark.parametrize("train", [float("inf"), "many", None, -0.5])
def test_an_owners_dataset_facts_that_are_no_count_are_a_protocol_error(train):
    """Greetings come off the wire: a sample count that is no integer (infinity included) is the
    sender's fault, named, not a crash of the receiver."""
    from p2psl.errors import RemoteProtocolError
    from p2psl.runtime.agreement import dataset_facts
    from p2psl.wire.messages import Greeting
    from tests.helpers import make_topology

    topology = make_topology(["alice", "bob"], ["c1"])
    facts = {"input_shape": [1, 8, 8], "num_classes": 10, "train": 400}
    greetings = {name: Greeting(src=name, dst="c1", role="data_owner", completed_round=0, resume=False,
                                dataset={**facts, "train": train} if name == "bob" else facts)
                 for name in ("alice", "bob")}
    with pytest.raises(RemoteProtocolError, match="bob's greeting lacks its dataset facts"):
        dataset_facts(topology, greetings)


def test_a_fedavg_owner_over_its_memory_is_an_overrun_not_a_stop():
    """The peers train a "fedavg" run whatever memory the file declares for the whole model, so
    `run` warns of it while `validate` reports it; a split that fits is no problem."""
    from p2psl.learning.local_plan import check_locally, deep_problems, local_inputs
    from p2psl.planning.memory import whole_model_memory
    from tests.helpers import make_topology

    roomy = make_topology(["alice", "bob"], ["c1"], training={"mode": "fedavg"})
    _, profiles, _ = local_inputs(roomy)
    whole = whole_model_memory(roomy, profiles)
    split = max(check_locally(roomy)[2].peak_memory_bytes.values())
    assert split < whole
    tight = make_topology(["alice", "bob"], ["c1"], training={"mode": "fedavg"}, memory=f"{(split + whole) // 2}B")
    stops, overruns, plan = check_locally(tight)
    assert stops == [] and plan is not None
    assert [o.split(":")[0] for o in overruns] == ["peer 'alice'", "peer 'bob'"]
    assert deep_problems(tight) == overruns
