"""Peers on a real network: one network namespace per peer, a veth pair per [[link]], rate caps
with tc (tbf), latency emulated by the transport (this kernel has no netem, SPEC §10), and a link
cut by iptables for a few seconds in the middle of a round.

Needs root and `ip netns` (plus tc and iptables): .ci/run runs the tests as root and installs
iproute2 and iptables. Elsewhere the test skips and says why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.harness import SECRET, log_tail, rounds_of, start_peer, wait_all, wait_for, write_topology

pytestmark = pytest.mark.timeout(600)

OWNERS, COMPUTE = ["alice", "bob"], ["c1", "c2"]
LINKS = [("alice", "c1"), ("alice", "c2"), ("bob", "c1"), ("bob", "c2"), ("c1", "c2")]
TRAINING = {"rounds": 4, "batch_size": 16}
RATE = "40mbit"
LATENCY = "5ms"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run .ci/run as root)"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 iptables; .ci/run does)"
    probe = f"p2psl-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "network namespaces are not available here (ip netns add failed)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")


@contextmanager
def namespaces(names: list[str], links: list[tuple[str, str]]):
    """A namespace per peer with address 10.99.0.N/32 on its loopback, and a capped veth pair per
    link with a host route to the other end's address."""
    tag = os.getpid() % 10000
    ns = {n: f"p2psl{tag}-{n}" for n in names}
    ip = {n: f"10.99.0.{i + 1}" for i, n in enumerate(names)}
    try:
        for n in names:
            sh("ip", "netns", "add", ns[n])
            sh("ip", "-n", ns[n], "link", "set", "lo", "up")
            sh("ip", "-n", ns[n], "addr", "add", f"{ip[n]}/32", "dev", "lo")
        for i, (a, b) in enumerate(links):
            va, vb = f"v{tag}x{i}a", f"v{tag}x{i}b"
            sh("ip", "link", "add", va, "netns", ns[a], "type", "veth", "peer", "name", vb, "netns", ns[b])
            for side, dev, other in ((a, va, b), (b, vb, a)):
                sh("ip", "-n", ns[side], "link", "set", dev, "up")
                sh("ip", "-n", ns[side], "route", "add", f"{ip[other]}/32", "dev", dev)
                sh("ip", "netns", "exec", ns[side], "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                   "rate", RATE, "burst", "64kb", "latency", "200ms")
        yield ns, ip
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def netns_topology(tmp: Path, ip: dict[str, str], timeouts: dict) -> Path:
    from tests.helpers import topology_toml

    text = topology_toml(OWNERS, COMPUTE, ports=[7500] * len(ip), training=TRAINING, timeouts=timeouts,
                         links=[(a, b, None, LATENCY) for a, b in LINKS])
    lines, current = [], None  # every peer at port 7500 of its own address
    for line in text.splitlines():
        if line.startswith("name = "):
            current = line.split('"')[1]
        if line.startswith("address = ") and current in ip:
            line = f'address = "{ip[current]}:7500"'
        lines.append(line)
    lines += ["[emulation]", "links = true"]
    path = tmp / "netns.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_in(ns: str, topology: Path, name: str, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{name}.log", "wb")
    env = {**os.environ, "P2PSL_SECRET": SECRET}
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "p2psl", "peer", "--topology",
                             str(topology), "--name", name, "--out", str(out / name)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    log.close()
    return proc


def test_training_over_capped_veth_links_survives_an_iptables_cut(tmp_path):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    # the same training on loopback, with no fault: the numbers the netns run must reproduce
    reference = write_topology(tmp_path, OWNERS, COMPUTE, training=TRAINING)
    # each peer on a machine of its own, as in the namespaces, so both plan the same split
    reference.write_text(re.sub(r'(name = "([^"]+)"\n)', r'\1machine = "\2"\n', reference.read_text()))
    procs = {n: start_peer(reference, n, tmp_path / "ref") for n in COMPUTE + OWNERS}
    assert wait_all(procs, 300) == {n: 0 for n in procs}
    expected = [(r["train_loss"], r["test_accuracy"]) for r in rounds_of(tmp_path / "ref", "alice")]

    timeouts = {"connect": "60s", "handshake": "2s", "heartbeat": "0.5s", "dead": "2s", "gone": "30s",
                "request": "120s", "start": "120s"}
    with namespaces(OWNERS + COMPUTE, LINKS) as (ns, ip):
        topology = netns_topology(tmp_path, ip, timeouts)
        out = tmp_path / "netns"
        procs = {n: start_in(ns[n], topology, n, out) for n in COMPUTE + OWNERS}
        wait_for(lambda: rounds_of(out, "alice"), 300,
                 lambda: "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs), procs.values())
        # cut alice ↔ c1 both ways for 4 s: longer than `dead`, so the link is torn down and rebuilt
        rules = [("OUTPUT", "-d", ip["c1"]), ("INPUT", "-s", ip["c1"])]
        for chain, flag, address in rules:
            sh("ip", "netns", "exec", ns["alice"], "iptables", "-A", chain, flag, address, "-j", "DROP")
        time.sleep(4)  # the fault's duration: nothing to wait for but the clock
        for chain, flag, address in rules:
            sh("ip", "netns", "exec", ns["alice"], "iptables", "-D", chain, flag, address, "-j", "DROP")
        codes = wait_all(procs, 400)
    assert codes == {n: 0 for n in procs}, "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    log = (out / "alice" / "peer.log").read_text()
    assert "reconnected to c1" in log
    got = [(r["train_loss"], r["test_accuracy"]) for r in rounds_of(out, "alice")]
    assert got == expected  # nothing lost, nothing applied twice
