"""The pure parts of surviving a compute node ([Note: replicas], [Note: recovery]): who keeps
whose replica, which round a peer can restore, and which layers' state it can hand on."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from p2psl.runtime import recovery
from p2psl.wire import checkpoint

CHAIN = SimpleNamespace(nodes=["c1", "c2", "c3"])


def layer_state(*layers: int) -> dict[str, torch.Tensor]:
    return {f"alice/model/{i}.weight": torch.full((2,), float(i)) for i in layers}


def test_replicas_go_round_the_chain():
    assert [recovery.replica_holder(CHAIN, n) for n in CHAIN.nodes] == ["c2", "c3", "c1"]
    assert [recovery.replica_of(CHAIN, n) for n in CHAIN.nodes] == ["c3", "c1", "c2"]


def test_a_lone_node_or_an_owner_has_no_replica_holder():
    assert recovery.replica_holder(SimpleNamespace(nodes=["c1"]), "c1") is None
    assert recovery.replica_holder(CHAIN, "alice") is None
    assert recovery.replica_of(CHAIN, "alice") is None


def test_layer_names_give_the_global_layer_index():
    assert recovery.layer_of("alice/optim/12.momentum_buffer") == 12
    state = layer_state(1, 2, 5)
    assert recovery.layers_in(state) == {1, 2, 5}
    assert set(recovery.select_layers(state, {2, 5, 9})) == {"alice/model/2.weight", "alice/model/5.weight"}


def test_completed_round_is_the_older_of_own_checkpoint_and_kept_replica(tmp_path):
    """c2 keeps c1's replica: it can restore only a round it has both of."""
    assert recovery.completed_round(tmp_path, "c2", CHAIN) == 0
    for round_ in (1, 2, 3):
        checkpoint.save(tmp_path / "checkpoints", "c2", round_, "d", layer_state(3))
    assert recovery.completed_round(tmp_path, "c2", CHAIN) == 0  # no replica of c1 yet
    for round_ in (1, 2):
        checkpoint.save(recovery.replicas_dir(tmp_path, "c1"), "c1", round_, "d", layer_state(1))
    assert recovery.completed_round(tmp_path, "c2", CHAIN) == 2
    assert recovery.completed_round(tmp_path, "alice", CHAIN) == 3  # an owner keeps no replica
    assert recovery.completed_round(tmp_path, "c2", None) == 3


def test_provided_state_is_own_checkpoint_plus_replicas_of_the_gone(tmp_path):
    checkpoint.save(tmp_path / "checkpoints", "c2", 2, "d", layer_state(3, 4))
    checkpoint.save(recovery.replicas_dir(tmp_path, "c1"), "c1", 2, "d", layer_state(1, 2))
    assert recovery.layers_in(recovery.provided_state(tmp_path, "c2", set(), 2)) == {3, 4}
    both = recovery.provided_state(tmp_path, "c2", {"c1"}, 2)
    assert recovery.layers_in(both) == {1, 2, 3, 4}
    assert torch.equal(both["alice/model/1.weight"], torch.full((2,), 1.0))
    assert recovery.provided_state(tmp_path, "c2", {"c1"}, 1) == {}  # no such round kept
    assert recovery.provided_state(tmp_path, "c2", {"c1"}, 0) == {}  # round 0: the initial weights
