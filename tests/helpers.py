"""Helpers shared by the tests: topology text, free ports, in-process networks."""

from __future__ import annotations

import random
import socket
from contextlib import closing
from pathlib import Path

from p2psl.topology import Topology, parse_topology


def free_ports(count: int) -> list[int]:
    """Free ports for topologies run as separate processes, below the kernel's ephemeral range,
    so that no outgoing connection can take one before its peer binds it."""
    low = _ephemeral_low()
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20000, low)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def topology_toml(owners: list[str], compute: list[str], *, links: list[tuple] | None = None,
                  ports: list[int] | None = None, training: dict | None = None,
                  timeouts: dict | None = None, memory: str = "4GiB", speeds: dict | None = None,
                  peer_keys: dict[str, dict] | None = None) -> str:
    """TOML text of a deployment on loopback. `links` entries: (a, b) or (a, b, bandwidth, latency);
    `peer_keys`: more keys of some peers' [[peer]] tables (name → {key: value})."""
    names = owners + compute
    ports = ports or list(range(20001, 20001 + len(names)))
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
