"""Run a deployment for tests: peers as separate processes, or as Peer objects in one process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from p2psl.runtime.metrics import read_metrics
from p2psl.runtime.peer import Peer, PeerOptions
from p2psl.topology import Topology
from tests.helpers import free_ports, topology_toml

SECRET = "integration-test-secret"
FAST_TIMEOUTS = {"connect": "60s", "heartbeat": "0.5s", "dead": "6s", "request": "90s", "start": "120s"}


def write_topology(tmp: Path, owners, compute, training=None, **kwargs) -> Path:
    """A topology file with free loopback ports."""
    ports = free_ports(len(owners) + len(compute))
    text = topology_toml(owners, compute, ports=ports, training=training,
                         timeouts=kwargs.pop("timeouts", FAST_TIMEOUTS), **kwargs)
    path = tmp / "topology.toml"
    path.write_text(text)
    return path


def start_peer(topology: Path, name: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`p2psl peer` as its own process (stdout and stderr to out/NAME.log)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{name}.log", "wb")
    environment = {**os.environ, "P2PSL_SECRET": SECRET, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "p2psl", "peer", "--topology", str(topology), "--name", name,
                             "--out", str(out / name), *extra], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=environment)
    log.close()
    return proc


def wait_all(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    try:
        for name, proc in procs.items():
            codes[name] = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def wait_for(condition: Callable[[], object], timeout: float, explain: Callable[[], str],
             alive: Iterable[subprocess.Popen] = ()) -> None:
    """Return once `condition()` is true. The peers are other processes that record a round by
    appending to their metrics file, so there is no event to await from here: this polls every
    50 ms, and fails with `explain()` at the deadline or once a process in `alive` has exited."""
    alive = list(alive)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and all(p.poll() is None for p in alive), explain()
        time.sleep(0.05)


def log_tail(out: Path, name: str, lines: int = 30) -> str:
    try:
        return "\n".join((out / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def rounds_of(out: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(out / name / "metrics.jsonl") if r.get("event") == "round"]


async def run_in_process(topology: Topology, out: Path, addresses: dict[str, dict] | None = None,
                         timeout: float = 300.0) -> dict[str, Peer]:
    """Every peer as a Peer object in this process, each listening on its topology address.

    `addresses` maps a peer to the address overrides it dials with (e.g. through a proxy)."""
    peers = {p.name: Peer(topology, p.name, SECRET.encode(),
                          PeerOptions(out / p.name, addresses=(addresses or {}).get(p.name)))
             for p in topology.peers}
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(p.run() for p in peers.values()))
    return peers
