"""What `p2psl run` checks before it starts a process per peer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from p2psl.cli import launcher
from p2psl.cli.launcher import machine_memory_warnings
from p2psl.planning.memory import RUNTIME_OVERHEAD_BYTES
from p2psl.planning.plan import plan_from_cuts
from tests.helpers import make_topology

FREE = 2 * 2**30


@pytest.fixture(autouse=True)
def two_gib_free(monkeypatch):
    monkeypatch.setattr(launcher.psutil, "virtual_memory", lambda: SimpleNamespace(available=FREE))


def plan_with_peaks(each: int):
    plan = plan_from_cuts([2, 4], ["c1"], ["alice", "bob"], 6)
    plan.peak_memory_bytes.update({name: each for name in ("alice", "bob", "c1")})
    return plan


def test_peers_whose_peaks_outgrow_the_free_memory_are_warned_of_naming_in_process():
    topology = make_topology(["alice", "bob"], ["c1"])
    assert machine_memory_warnings(topology, plan_with_peaks(FREE // 3)) == []
    [warning] = machine_memory_warnings(topology, plan_with_peaks(FREE // 3 + 1))
    assert warning == ("3 peers, a process each, may need up to 2.0 GiB (the plan's peaks); this machine has "
                       "2.0 GiB free: --in-process runs them in one process")


def test_a_peer_on_an_accelerator_counts_only_its_process_on_the_host():
    """Its parts' bytes are the accelerator's, not this machine's memory."""
    topology = make_topology(["alice", "bob"], ["c1"], peer_keys={"c1": {"accelerator": "cuda"}})
    plan = plan_with_peaks(RUNTIME_OVERHEAD_BYTES)
    plan.peak_memory_bytes["c1"] = 10 * FREE
    assert machine_memory_warnings(topology, plan) == []


def test_round_records_are_read_as_the_peers_append_them(tmp_path):
    import json

    from p2psl.cli.launcher import RoundRecords

    alice, c1 = tmp_path / "alice.jsonl", tmp_path / "c1.jsonl"
    reader = RoundRecords([alice, c1])
    assert reader.read() == []  # nothing written yet
    record = {"event": "round", "round": 1, "test_accuracy": 0.5}
    alice.write_text(json.dumps(record) + "\n" + json.dumps({"event": "peer_round", "round": 1}) + "\n"
                     + '{"event": "round", "ro')  # a line being written
    assert reader.read() == [record]
    with open(alice, "a") as f:
        f.write('und": 2}\n')
    c1.write_text(json.dumps(record) + "\n")
    assert reader.read() == [{"event": "round", "round": 2}, record]
    assert reader.read() == []


def test_in_one_process_each_peer_ends_with_its_own_status(tmp_path):
    """The process exits with the worst status; each peer's own is in its exit.json."""
    import json

    from p2psl.cli.launcher import Launcher

    class Ended:
        def poll(self):
            return 3

    topology = make_topology(["alice"], ["c1"])
    run = Launcher(topology, tmp_path, in_process=True)
    run.procs = {"alice": Ended(), "c1": Ended()}
    for name, code in (("alice", 0), ("c1", 3)):
        (tmp_path / "peers" / name).mkdir(parents=True)
        (tmp_path / "peers" / name / "exit.json").write_text(json.dumps({"code": code}))
    assert {name: run._exit_code(name) for name in run.procs} == {"alice": 0, "c1": 3}
