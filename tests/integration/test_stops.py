"""Faults after which a deployment cannot go on, or this peer cannot go on with it: every peer
stops within seconds, with one line that says why, and nothing hangs. Real processes, small
deployments (two owners, two compute nodes, a few rounds)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, wait_for, write_topology

pytestmark = pytest.mark.timeout(300)

OWNERS, COMPUTE = ["alice", "bob"], ["c1", "c2"]
TRAINING = {"rounds": 3, "batch_size": 32}
TIMEOUTS = {"connect": "60s", "heartbeat": "0.5s", "dead": "4s", "gone": "2s", "request": "60s", "start": "120s"}


def start(tmp, faults: dict | None = None, training=TRAINING):
    topology = write_topology(tmp, OWNERS, COMPUTE, training=training, timeouts=TIMEOUTS)
    out = tmp / "out"
    procs = {n: start_peer(topology, n, out, env={"P2PSL_FAULTS": faults[n]} if n in (faults or {}) else None)
             for n in COMPUTE + OWNERS}
    return procs, out


def last_line(out, name: str) -> str:
    return (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1]


def logs(out, names) -> str:
    return "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in names)


def test_both_compute_nodes_killed_stops_every_owner_with_the_reason(tmp_path):
    """Nothing can train without a compute node: once both are gone the owners say so and exit 1,
    instead of re-planning over an empty chain."""
    procs, out = start(tmp_path)
    wait_for(lambda: rounds_of(out, "alice"), 200, lambda: logs(out, procs), procs.values())
    for name in COMPUTE:
        os.kill(procs[name].pid, signal.SIGKILL)
    killed = time.monotonic()
    codes = wait_all(procs, timeout=120)
    took = time.monotonic() - killed
    print(f"owners stopped {took:.1f} s after both compute nodes were killed (gone = 2 s)")
    assert codes == {"c1": -signal.SIGKILL, "c2": -signal.SIGKILL, "alice": 1, "bob": 1}, logs(out, procs)
    for owner in OWNERS:
        assert last_line(out, owner).startswith("TrainingError: no compute node is left (c1, c2 gone)"), \
            log_tail(out, owner)
        assert "Traceback" not in (out / f"{owner}.log").read_text()
