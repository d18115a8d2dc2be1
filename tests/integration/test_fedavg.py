"""The federated-averaging baseline ([training] mode = "fedavg") against the split run of the same
file: real peer processes, real sockets, the digits data."""

from __future__ import annotations

import pytest
import torch

from p2psl.runtime.metrics import read_metrics
from p2psl.wire import checkpoint
from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, write_topology

pytestmark = pytest.mark.timeout(600)

OWNERS, COMPUTE = ["alice", "bob"], ["c1", "c2"]
ROUNDS = 2


def _run(tmp_path, mode: str, micro_batches: int):
    folder = tmp_path / mode
    folder.mkdir()
    topology = write_topology(folder, OWNERS, COMPUTE, training={"rounds": ROUNDS, "batch_size": 16, "mode": mode,
                                                                 "micro_batches": micro_batches})
    out = folder / "out"
    procs = {name: start_peer(topology, name, out) for name in COMPUTE + OWNERS}
    codes = wait_all(procs, timeout=300)
    assert codes == {n: 0 for n in procs}, "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    return out


def _peer(out, name: str) -> dict:
    return next(r for r in read_metrics(out / name / "metrics.jsonl") if r.get("event") == "peer")


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_the_federated_baseline_trains_the_very_model_of_the_split_run(tmp_path, micro_batches):
    """Each owner trains the whole model alone and the compute nodes train nothing, yet every
    round's loss and accuracy, and the final weights and momentum, are the split run's bit for bit
    ([Note: the federated-averaging baseline], [Note: memory order on the wire]), with whole
    batches or with each batch cut into micro-batches ([Note: micro-batches])."""
    split, federated = _run(tmp_path, "split", micro_batches), _run(tmp_path, "fedavg", micro_batches)
    keys = ("round", "train_loss", "test_accuracy", "test_loss", "owners")
    want = [{k: r[k] for k in keys} for r in rounds_of(split, "alice")]
    assert [{k: r[k] for k in keys} for r in rounds_of(federated, "alice")] == want
    assert all(r["mode"] == "fedavg" and r["predicted_seconds"] is None for r in rounds_of(federated, "alice"))

    whole = checkpoint.load(federated / "alice" / "checkpoints", ROUNDS).state
    parts = dict(checkpoint.load(split / "alice" / "checkpoints", ROUNDS).state)
    for node in COMPUTE:  # the compute nodes' copies for alice
        parts.update({k.removeprefix("alice/"): v for k, v in
                      checkpoint.load(split / node / "checkpoints", ROUNDS).state.items() if k.startswith("alice/")})
    assert sorted(whole) == sorted(parts)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)

    for node in COMPUTE:  # a bystander sends its cut and its reports, no activation
        assert _peer(federated, node)["bytes_sent"] < 100_000 < _peer(split, node)["bytes_sent"]
