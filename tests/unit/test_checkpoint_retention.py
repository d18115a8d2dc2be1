"""Checkpoint retention: the newest `keep_checkpoints` rounds stay on disk, the older go."""

from __future__ import annotations

import pytest
import torch

from p2psl import PROTOCOL_VERSION
from p2psl.errors import ConfigError, TopologyError
from p2psl.wire import checkpoint
from tests.helpers import topology_toml
from p2psl.topology import parse_topology


def write_rounds(folder, rounds: int, keep: int | None) -> None:
    for round_ in range(1, rounds + 1):
        checkpoint.save(folder, "c1", round_, "digest", {"0.weight": torch.full((4,), float(round_))}, keep)


@pytest.mark.parametrize(("keep", "left"), [(2, [4, 5]), (3, [3, 4, 5]), (None, [1, 2, 3, 4, 5])])
def test_the_newest_rounds_stay_and_the_older_go(tmp_path, keep, left):
    write_rounds(tmp_path, 5, keep)
    assert checkpoint.rounds(tmp_path) == left
    assert checkpoint.load(tmp_path, left[-1]).state["0.weight"].tolist() == [5.0] * 4


def keep_of(value) -> int | None:
    text = topology_toml(["alice"], ["c1"], training={"keep_checkpoints": value})
    return parse_topology(text).training.keep_checkpoints


def test_the_topology_takes_a_number_of_rounds_or_all():
    assert parse_topology(topology_toml(["alice"], ["c1"])).training.keep_checkpoints == 2
    assert keep_of(5) == 5
    assert keep_of("all") is None


@pytest.mark.parametrize("value", [1, 0, "some", 2.5])
def test_fewer_than_two_or_anything_else_is_refused_naming_the_key(value):
    with pytest.raises(TopologyError, match="keep_checkpoints"):
        keep_of(value)


def test_the_round_just_written_stays_even_beside_newer_rounds_of_an_earlier_run(tmp_path):
    write_rounds(tmp_path, 5, 2)                         # an earlier life left rounds 4 and 5
    checkpoint.save(tmp_path, "c1", 1, "digest", {"0.weight": torch.zeros(4)}, 2)
    assert checkpoint.rounds(tmp_path) == [1]            # the rounds after it are that life's
    checkpoint.save(tmp_path, "c1", 2, "digest", {"0.weight": torch.ones(4)}, 2)
    assert checkpoint.rounds(tmp_path) == [1, 2]


def test_a_fresh_start_clears_an_earlier_runs_rounds(tmp_path):
    write_rounds(tmp_path, 3, None)
    assert checkpoint.clear(tmp_path) == 3 and checkpoint.rounds(tmp_path) == []
    assert checkpoint.clear(tmp_path / "missing") == 0


def test_a_federated_runs_checkpoints_belong_to_its_mode_not_only_its_plan():
    """Resuming a split run as federated averaging, or back, must be refused as another plan's
    checkpoint: the owners' checkpoints hold other layers in the two modes."""
    from dataclasses import replace

    from p2psl.planning.plan import plan_from_cuts
    from p2psl.runtime.roles.context import checkpoint_tag
    from p2psl.topology import TrainingConfig

    plan = plan_from_cuts([1, 3], ["c1"], ["alice"], 6)
    split = TrainingConfig()
    assert checkpoint_tag(plan, split) == plan.digest  # what split runs always wrote
    assert checkpoint_tag(plan, replace(split, mode="fedavg")) not in (plan.digest, None)


def test_a_checkpoint_of_another_wire_protocol_is_refused_as_such_not_as_damaged(tmp_path):
    """A file written by a release of another protocol version (its frames' "v" differ) is named
    for what it is, so the user knows a resume needs that release."""
    write_rounds(tmp_path, 1, None)
    path = checkpoint.path_for(tmp_path, 1)
    data = bytearray(path.read_bytes())
    at = data.index(b"av") + 2  # the CBOR text "v", then its value: the first frame's version
    assert data[at] == PROTOCOL_VERSION
    data[at] = PROTOCOL_VERSION - 1
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="another wire protocol") as info:
        checkpoint.load(tmp_path, 1)
    assert "damaged" not in str(info.value)
