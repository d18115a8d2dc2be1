"""Deliberate faults fire at an exact point of training, never at a moment on the clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from p2psl.errors import ConfigError
from p2psl.runtime import faults as faults_module
from p2psl.runtime.faults import Fault, Faults, parse


def test_parse_reads_kinds_and_fields():
    assert parse("crash:round=2:batch=3; cut:round=1:peer=c1:seconds=2") == [
        Fault("crash", 2, 3), Fault("cut", 1, 1, 2.0, "c1")]


@pytest.mark.parametrize("text", ["crash", "crash:round=x", "explode:round=1", "cut:round=1", "crash:round=1:peer=c1",
                                  "crash:round=1:colour=red"])
def test_parse_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError):
        parse(text)


def test_a_crash_ends_the_process_exactly_at_its_batch(monkeypatch):
    """The process exits (137, as after SIGKILL) at the first batch at or past (round 2, batch 3), once."""
    exits = []
    monkeypatch.setattr(faults_module, "os", SimpleNamespace(_exit=exits.append))
    f = Faults("crash:round=2:batch=3")
    for point in [(1, 1), (1, 9), (2, 1), (2, 2)]:
        f.reached(*point)
    assert exits == []
    f.reached(2, 3)
    assert exits == [137]
    f.reached(2, 4)
    assert exits == [137]


def test_a_cut_calls_back_with_the_neighbour_and_duration():
    cuts = []
    f = Faults("cut:round=2:batch=3:peer=c1:seconds=3", cut=lambda peer, s: cuts.append((peer, s)))
    f.reached(2, 2)
    f.reached(3, 1)  # a later point also fires it: the batch may not exist in that round
    f.reached(3, 2)
    assert cuts == [("c1", 3.0)]


async def test_a_fault_at_a_round_end_fires_there_once_after_settling(monkeypatch):
    """`at=end` faults ignore batches; at the end of their round they wait for what was sent to
    arrive (settle), then fire — once."""
    exits, settled = [], []
    monkeypatch.setattr(faults_module, "os", SimpleNamespace(_exit=exits.append))

    async def settle():
        settled.append(True)

    f = Faults("crash:round=2:at=end", settle=settle)
    assert parse("crash:round=2:at=end") == [Fault("crash", 2, 1, at="end")]
    f.reached(2, 1)
    f.reached(3, 1)
    await f.at_end(1)
    assert (exits, settled) == ([], [])
    assert f.due_at_end(2)
    await f.at_end(2)
    await f.at_end(2)
    assert (exits, settled) == ([137], [True])


def test_a_fault_place_must_be_known():
    with pytest.raises(ConfigError):
        parse("crash:round=2:at=start")
