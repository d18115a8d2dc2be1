"""FedAvg and the compute node's copy set."""

from __future__ import annotations

import pytest
import torch

from p2psl.learning.aggregate import fedavg
from p2psl.errors import TrainingError
from p2psl.learning.models import CopySet, OptimConfig, model_spec

torch.set_num_threads(1)


def _states():
    return {
        "bob": {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)},
        "alice": {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(1)},
    }


def test_fedavg_is_the_weighted_average():
    out = fedavg(_states(), {"alice": 3, "bob": 1})  # renormalised to 0.75 / 0.25
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert out["w"].dtype == torch.float32
    assert out["n"].dtype == torch.int64 and out["n"].item() == 2  # 0.75 * 1 + 0.25 * 4 = 1.75 → 2


def test_fedavg_does_not_depend_on_dict_order_and_keeps_equal_states():
    a = torch.randn(50, generator=torch.Generator().manual_seed(0))
    b = torch.randn(50, generator=torch.Generator().manual_seed(1))
    first = fedavg({"x": {"t": a}, "y": {"t": b}}, {"x": 0.3, "y": 0.7})
    second = fedavg({"y": {"t": b}, "x": {"t": a}}, {"y": 0.7, "x": 0.3})
    assert torch.equal(first["t"], second["t"])
    same = fedavg({o: {"t": a} for o in "pqr"}, {"p": 1 / 3, "q": 1 / 3, "r": 1 / 3})
    assert torch.equal(same["t"], a)


def test_fedavg_does_not_modify_its_inputs():
    states = _states()
    fedavg(states, {"alice": 1, "bob": 1})
    assert torch.equal(states["alice"]["w"], torch.tensor([3.0, 6.0]))


@pytest.mark.parametrize("states, weights, message", [
    ({}, {}, "no states"),
    ({"a": {"w": torch.zeros(2)}, "b": {"v": torch.zeros(2)}}, {"a": 1, "b": 1}, "different keys"),
    ({"a": {"w": torch.zeros(2)}, "b": {"w": torch.zeros(3)}}, {"a": 1, "b": 1}, r"\(2,\)"),
    ({"a": {"w": torch.zeros(2)}, "b": {"w": torch.zeros(2, dtype=torch.float64)}}, {"a": 1, "b": 1}, "float64"),
    ({"a": {"w": torch.zeros(2)}}, {"b": 1}, "missing"),
    ({"a": {"w": torch.zeros(2)}}, {"a": 0}, "positive sum"),
    ({"a": {"w": torch.zeros(2)}}, {"a": float("nan")}, "non-negative"),
])
def test_fedavg_rejects_bad_input(states, weights, message):
    with pytest.raises(ValueError, match=message):
        fedavg(states, weights)


def _copies():
    spec = model_spec("mlp", (1, 8, 8), 10)
    return CopySet(spec, [1, 2], ["alice", "bob", "carol"], seed=4, optim=OptimConfig(lr=0.1, momentum=0.9))


def _train(part, seed: int) -> None:
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(seed))
    part.backward("k", part.forward_train("k", x))  # any gradient will do
    part.step()


def test_copies_start_identical_and_are_independent():
    copies = _copies()
    states = [copies.copy(o).state() for o in copies.owners]
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    _train(copies.copy("alice"), 0)
    assert not torch.equal(copies.copy("alice").state()["1.0.weight"], copies.copy("bob").state()["1.0.weight"])
    with pytest.raises(TrainingError, match="dave"):
        copies.copy("dave")


def test_copyset_average_is_fedavg_and_keeps_each_optimizer():
    copies = _copies()
    _train(copies.copy("alice"), 0)
    _train(copies.copy("bob"), 1)
    weights = {"alice": 30, "bob": 10}  # carol dropped out this round: she only receives
    expected = fedavg({o: copies.copy(o).state() for o in weights}, weights)
    momentum = {o: copies.copy(o).optimizer_state() for o in copies.owners}
    copies.average(weights)
    for owner in copies.owners:
        state = copies.copy(owner).state()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        kept = copies.copy(owner).optimizer_state()
        assert kept.keys() == momentum[owner].keys()
        assert all(torch.equal(kept[k], momentum[owner][k]) for k in kept)
    assert momentum["carol"] == {}


def test_copyset_average_writes_each_tensor_before_making_the_next(monkeypatch):
    """The round end holds one averaged tensor beside the copies, never a whole averaged part."""
    import p2psl.learning.models.copies as module

    copies = _copies()
    _train(copies.copy("alice"), 0)
    weights = {"alice": 1, "bob": 1}
    expected = fedavg({o: copies.copy(o).state() for o in weights}, weights)
    made = []

    def watched(states, shares):
        for name, average in module_items(states, shares):
            for earlier in made:  # every average made so far is in every copy already
                assert all(torch.equal(copies.copy(o).state()[earlier], expected[earlier]) for o in copies.owners)
            made.append(name)
            yield name, average

    module_items = module.fedavg_items
    monkeypatch.setattr(module, "fedavg_items", watched)
    copies.average(weights)
    assert made == sorted(expected)
    assert all(torch.equal(copies.copy("carol").state()[k], expected[k]) for k in expected)


def test_copyset_checks_input_shapes_and_sizes():
    copies = _copies()
    with pytest.raises(TrainingError, match="part for bob"):
        copies.copy("bob").forward_train("k", torch.zeros(1, 64))
    assert copies.parameter_bytes == 3 * copies.copy("alice").parameter_bytes
    with pytest.raises(ValueError, match="distinct"):
        CopySet(model_spec("mlp", (1, 8, 8), 10), [1], ["a", "a"], 0, OptimConfig())
