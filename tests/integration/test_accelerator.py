"""A deployment whose compute nodes name `accelerator = "cpu"` runs the accelerator code path
(parts placed on a device, host tensors on the wire) and trains to the same bits as the default."""

from __future__ import annotations

import pytest

from p2psl.runtime.metrics import read_metrics
from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, write_topology

pytestmark = pytest.mark.timeout(600)

OWNERS, COMPUTE = ["alice", "bob"], ["c1", "c2"]


def _train(tmp_path, peer_keys: dict | None) -> tuple[list[dict], object]:
    tmp_path.mkdir()
    topology = write_topology(tmp_path, OWNERS, COMPUTE, training={"rounds": 2, "batch_size": 16},
                              peer_keys=peer_keys)
    out = tmp_path / "out"
    procs = {name: start_peer(topology, name, out) for name in COMPUTE + OWNERS}
    codes = wait_all(procs, timeout=500)
    assert codes == {n: 0 for n in procs}, "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    return rounds_of(out, "alice"), out


def test_compute_nodes_on_an_explicit_cpu_accelerator_train_as_the_default(tmp_path):
    default, _ = _train(tmp_path / "default", None)
    explicit, out = _train(tmp_path / "explicit", {"c1": {"accelerator": "cpu"}, "c2": {"accelerator": "cpu"}})
    assert [r["round"] for r in explicit] == [1, 2]
    for got, want in zip(explicit, default):
        assert (got["train_loss"], got["test_loss"], got["test_accuracy"]) == \
               (want["train_loss"], want["test_loss"], want["test_accuracy"])
    peer = [r for r in read_metrics(out / "c1" / "metrics.jsonl") if r.get("event") == "peer"][-1]
    assert peer["accelerator"] == "cpu" and peer["accelerator_peak_bytes"] is None
    assert peer["peak_rss_bytes"] > 0
