"""Helpers shared by the tests: topology text, free ports, in-process networks."""

from __future__ import annotations

import os
import random
import socket
from contextlib import closing
from pathlib import Path

from p2psl.topology import Topology, parse_topology


def free_ports(count: int) -> list[int]:
    """Free ports for topologies run as separate processes, below the kernel's ephemeral range,
    so that no outgoing connection can take one before its peer binds it. Each pytest-xdist
    worker draws from its own slice of that range, so two tests run at once never pick the same."""
    low, high = _port_slice()
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(low, high)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def _port_slice() -> tuple[int, int]:
    start, end = FIXED_PORTS_END, _ephemeral_low()
    width = (end - start) // _workers()
    return start + _worker() * width, start + (_worker() + 1) * width


def _worker() -> int:
    """This pytest-xdist worker's index (0 without xdist)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name[2:].isdigit() else 0


def _workers() -> int:
    return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), _worker() + 1)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: topologies that name no ports get 20001, 20002, … (plus 200 per xdist worker); free_ports
#: draws above this
FIXED_PORTS_END = 22000


def topology_toml(owners: list[str], compute: list[str], *, links: list[tuple] | None = None,
                  ports: list[int] | None = None, training: dict | None = None,
                  timeouts: dict | None = None, memory: str = "4GiB", speeds: dict | None = None,
                  peer_keys: dict[str, dict] | None = None) -> str:
    """TOML text of a deployment on loopback. `links` entries: (a, b) or (a, b, bandwidth, latency);
    `peer_keys`: more keys of some peers' [[peer]] tables (name → {key: value})."""
    names = owners + compute
    base = 20001 + 200 * _worker()
    ports = ports or list(range(base, base + len(names)))
    lines = ["[training]"]
    for key, value in (training or {}).items():
        lines.append(f"{key} = {_toml(value)}")
    if timeouts:
        lines.append("[timeouts]")
        lines += [f"{k} = {_toml(v)}" for k, v in timeouts.items()]
    for name, port in zip(names, ports):
        role = "data_owner" if name in owners else "compute"
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                  f'memory = "{memory}"']
        if name in (speeds or {}):
            lines.append(f"speed = {speeds[name]}")
        lines += [f"{k} = {_toml(v)}" for k, v in (peer_keys or {}).get(name, {}).items()]
    for link in links or []:
        lines += ["[[link]]", f'peers = ["{link[0]}", "{link[1]}"]']
        if len(link) > 2 and link[2]:
            lines.append(f'bandwidth = "{link[2]}"')
        if len(link) > 3 and link[3]:
            lines.append(f'latency = "{link[3]}"')
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def make_topology(owners, compute, **kwargs) -> Topology:
    return parse_topology(topology_toml(owners, compute, **kwargs))


def loopback_ports_closed(port: int) -> bool:
    with closing(socket.socket()) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
