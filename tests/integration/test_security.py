"""A peer of the deployment that misbehaves: every message its role has no business sending is
refused with a typed error, and nothing changes — the run ends exactly as a clean one."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from p2psl.wire.messages import Activation, EvalReport, ReducePart, StateTransfer, TrainDone
from p2psl.topology import load_topology
from p2psl.runtime.peer import Peer, PeerOptions
from tests.integration.harness import SECRET, rounds_of, run_in_process, write_topology

pytestmark = pytest.mark.timeout(300)

OWNERS, COMPUTE = ["alice", "bob", "carol"], ["c1", "c2"]
TRAINING = {"rounds": 3, "batch_size": 16}


def forgeries(plan) -> list:
    """What alice (an owner) and c1 (a compute node) have no business sending."""
    last_part = plan.num_parts - 1
    not_last = plan.chain[0].node if len(plan.chain) > 1 else None
    out = [
        # an owner slipping parts into an average it is not a member of
        ("alice", ReducePart(src="alice", dst="carol", epoch=0, round=1, members=["bob", "carol"], samples=10 ** 6,
                             state={"0.weight": torch.zeros(1)})),
        # an owner reporting another owner's training and evaluation
        ("alice", TrainDone(src="alice", dst="c1", epoch=0, owner="bob", round=1, samples=1, batches=1, loss_sum=0.0)),
        ("alice", EvalReport(src="alice", dst="carol", epoch=0, owner="bob", round=1, correct=1, total=1,
                             loss_sum=0.0, train_loss=0.0, samples=1, seconds=1.0)),
        # an owner posing as a compute node moving state
        ("alice", StateTransfer(src="alice", dst="c2", epoch=0, round=1, layers=["1"],
                                state={"alice/model/1.weight": torch.zeros(1)})),
        # a compute node sending an owner parts (labels never travel: this is the closest it gets)
        ("c1", ReducePart(src="c1", dst="bob", epoch=0, round=1, members=["bob", "c1"], samples=1,
                          state={"0.weight": torch.zeros(1)})),
    ]
    if not_last is not None:
        # a compute node that is not the chain's last sending an owner the head's input
        out.append((not_last, Activation(src=not_last, dst="bob", epoch=0, owner="bob", round=1, batch=1,
                                         part=last_part, train=True, x=torch.zeros(1, 1))))
    return out


def outcome(out) -> list[tuple]:
    return [(r["round"], r["train_loss"], r["test_accuracy"]) for r in rounds_of(out, "alice")]


async def test_wrong_role_messages_are_refused_and_change_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="p2psl")
    (tmp_path / "clean").mkdir()
    clean = load_topology(write_topology(tmp_path / "clean", OWNERS, COMPUTE, training=TRAINING))
    await run_in_process(clean, tmp_path / "clean" / "out")

    (tmp_path / "hostile").mkdir()
    topology = load_topology(write_topology(tmp_path / "hostile", OWNERS, COMPUTE, training=TRAINING))
    peers = {p.name: Peer(topology, p.name, SECRET.encode(), PeerOptions(tmp_path / "hostile" / "out" / p.name))
             for p in topology.peers}
    started = asyncio.Event()

    async def attack() -> int:
        await started.wait()
        for sender, message in forgeries(peers["alice"].state.plan):
            await peers[sender].network.send(message)
        return len(forgeries(peers["alice"].state.plan))

    class Watch(logging.Handler):  # training has begun once a peer logs its first round
        def emit(self, record: logging.LogRecord) -> None:
            if "round 1 of" in record.getMessage():
                started.set()

    watch = Watch()
    logging.getLogger("p2psl").addHandler(watch)
    try:
        async with asyncio.timeout(240):
            results = await asyncio.gather(attack(), *(p.run() for p in peers.values()))
    finally:
        logging.getLogger("p2psl").removeHandler(watch)
    assert results[0] >= 5
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    for kind in ("reduce_part from alice", "train_done from alice", "eval_report from alice",
                 "state_transfer from alice", "reduce_part from c1"):
        assert any(kind in line for line in refused), (kind, refused)
    assert outcome(tmp_path / "hostile" / "out") == outcome(tmp_path / "clean" / "out")
    assert len(outcome(tmp_path / "clean" / "out")) == TRAINING["rounds"]


async def test_peers_that_plan_differently_all_stop_with_a_clear_error(tmp_path):
    """A peer whose planner disagrees (as a different p2psl version would): every peer stops,
    none trains, and the message says who disagrees."""
    from p2psl.errors import PlanMismatch, TrainingError
    from p2psl.planning.plan import plan_from_cuts

    topology = load_topology(write_topology(tmp_path, OWNERS, COMPUTE, training=TRAINING))
    peers = {p.name: Peer(topology, p.name, SECRET.encode(), PeerOptions(tmp_path / "out" / p.name))
             for p in topology.peers}
    honest = peers["c2"].worker.run

    async def dissenting(name, fn, *args, **span):
        result = await honest(name, fn, *args, **span)
        if name == "plan":  # the same owners and nodes, another split
            result = plan_from_cuts([1, 2, 4], list(reversed(result.nodes)), list(result.owners),
                                    result.num_layers)
        return result

    peers["c2"].worker.run = dissenting
    async with asyncio.timeout(120):
        outcomes = await asyncio.gather(*(p.run() for p in peers.values()), return_exceptions=True)
    for name, outcome in zip(peers, outcomes):
        assert isinstance(outcome, (PlanMismatch, TrainingError)), (name, outcome)
        assert "plan" in str(outcome)
    assert any(isinstance(outcome, PlanMismatch) for outcome in outcomes)
    assert not any((tmp_path / "out" / n / "checkpoints").exists() for n in peers)  # nobody trained
