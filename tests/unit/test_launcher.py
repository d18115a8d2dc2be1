"""What `p2psl run` checks before it starts a process per peer."""

from __future__ import annotations

import psutil
import pytest

from p2psl.cli.launcher import check_machine_memory
from p2psl.errors import ConfigError
from p2psl.planning.plan import plan_from_cuts
from tests.helpers import make_topology


def plan_with_peaks(each: int):
    plan = plan_from_cuts([2, 4], ["c1"], ["alice", "bob"], 6)
    plan.peak_memory_bytes.update({name: each for name in ("alice", "bob", "c1")})
    return plan


def test_peers_whose_peaks_outgrow_the_free_memory_are_refused_naming_in_process():
    topology = make_topology(["alice", "bob"], ["c1"])
    free = psutil.virtual_memory().available
    with pytest.raises(ConfigError, match=r"^3 peers, a process each, need about .*; this machine has .* free: "
                                          r"run them in one process with --in-process$"):
        check_machine_memory(topology, plan_with_peaks(free))  # three times what is free
    check_machine_memory(topology, plan_with_peaks(2**20))  # 3 MiB: fits anywhere
