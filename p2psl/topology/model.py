"""The validated deployment: peers, links, and the graph they form (routes, chain orders)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import networkx as nx

from p2psl.errors import ConfigError
from p2psl.topology.config import COMPUTE, DATA_OWNER, Timeouts, TrainingConfig
from p2psl.units import plural


@dataclass(frozen=True)
class PeerSpec:
    """One ``[[peer]]``: a process of the deployment."""

    name: str
    role: str
    host: str
    port: int
    memory: int
    device: str | None = None
    speed: float = 1.0
    machine: str = ""         # the machine it runs on: its `machine` key, else its address's host
    accelerator: str = "cpu"                  # where its parts compute: cpu, cuda, cuda:N or auto
    accelerator_memory: int | None = None     # bytes the accelerator holds for its parts (None: no limit)
    price: float = 0.0                        # a compute node's price per hour ([Note: the cost objective])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def machine_key(self) -> str:
        """Which machine this peer shares with others (loopback names are one machine)."""
        return machine_name(self.machine or self.host)

    @property
    def is_owner(self) -> bool:
        return self.role == DATA_OWNER


LOOPBACK = ("localhost", "::1", "0:0:0:0:0:0:0:1")


def machine_name(name: str) -> str:
    """A machine's key: every loopback name and address is "localhost"."""
    return "localhost" if name in LOOPBACK or name.startswith("127.") else name


@dataclass(frozen=True)
class MachineSpec:
    """One ``[[machine]]``: the cores a machine gives the peers that run on it."""

    name: str
    cores: int


@dataclass(frozen=True)
class LinkSpec:
    """One ``[[link]]``: an undirected connection, with bandwidth in bytes/s (None: free)."""

    a: str
    b: str
    bandwidth: float | None = None
    latency: float = 0.0


FREE_LINK = LinkSpec("", "", None, 0.0)


@dataclass(frozen=True)
class Topology:
    """A validated deployment. Build it with `load_topology` or `parse_topology`."""

    training: TrainingConfig
    peers: tuple[PeerSpec, ...]
    links: tuple[LinkSpec, ...]
    timeouts: Timeouts = field(default_factory=Timeouts)
    emulate_links: bool = False
    digest: str = ""
    source: str = "<memory>"
    machines: tuple[MachineSpec, ...] = ()
    #: every peer runs in one process (`p2psl run --in-process`): not in the file, a fact of the run
    one_process: bool = False
    _graph: nx.Graph = field(default=None, compare=False, repr=False)

    # -- lookups -------------------------------------------------------------------------------
    @property
    def owners(self) -> tuple[PeerSpec, ...]:
        return tuple(p for p in self.peers if p.role == DATA_OWNER)

    @property
    def compute_nodes(self) -> tuple[PeerSpec, ...]:
        return tuple(p for p in self.peers if p.role == COMPUTE)

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Every peer's name, in file order (asked for every message a peer receives)."""
        return tuple(p.name for p in self.peers)

    def peer(self, name: str) -> PeerSpec:
        for p in self.peers:
            if p.name == name:
                return p
        raise KeyError(name)

    def check_name(self, name: str) -> None:
        """A `--name` that names no peer of this file is bad local input (ConfigError)."""
        if name not in self.names:
            raise ConfigError(f"no peer named {name!r} in {self.source} (peers: {', '.join(self.names)})")

    def cores(self, machine: str) -> int | None:
        """The cores a ``[[machine]]`` table gives `machine` (None: not set in the file)."""
        return next((m.cores for m in self.machines if m.name == machine), None)

    @property
    def fully_connected(self) -> bool:
        return not self.links

    @property
    def graph(self) -> nx.Graph:
        """Peers as nodes (with their spec), links as edges (with their `LinkSpec`)."""
        return self._graph

    def neighbours(self, name: str) -> list[str]:
        return sorted(self.graph.neighbors(name))

    def link(self, a: str, b: str) -> LinkSpec:
        """The direct link between two peers (a free link in a fully connected topology)."""
        data = self.graph.get_edge_data(a, b)
        if data is None:
            raise KeyError(f"no link between {a} and {b}")
        return data["link"]

    def route(self, src: str, dst: str) -> list[str]:
        """The deterministic shortest path src → dst (ties broken by name; [Note: routes])."""
        return _route(self.graph, src, dst)

    def next_hop(self, src: str, dst: str) -> str:
        return self.route(src, dst)[1]

    def chain_orders(self) -> Iterator[tuple[str, ...]]:
        """Every order of the compute nodes that can form the chain over the links.

        Consecutive nodes must be linked, and every data owner must be linked to the first
        node (it sends activations there) and to the last (it receives the output from there).
        """
        return _chain_orders(self)

    def with_changes(self, **training_changes: Any) -> Topology:
        """A copy with some training settings replaced (used by benchmarks and tests)."""
        return replace(self, training=replace(self.training, **training_changes))

    def in_one_process(self) -> Topology:
        """This deployment with every peer in one process (the cost model's overheads differ:
        `costmodel.overheads_of`)."""
        return replace(self, one_process=True)

    def without_peers(self, names: set[str]) -> Topology:
        """The deployment that remains when `names` are gone (re-planning after a failure)."""
        peers = tuple(p for p in self.peers if p.name not in names)
        links = tuple(link for link in self.links if link.a not in names and link.b not in names)
        return with_graph(replace(self, peers=peers, links=links))


# -- loading -------------------------------------------------------------------------------------


def with_graph(topo: Topology) -> Topology:
    graph = nx.Graph()
    for p in topo.peers:
        graph.add_node(p.name, spec=p)
    if topo.links:
        for link in topo.links:
            graph.add_edge(link.a, link.b, link=link)
    else:
        for a, b in itertools.combinations(topo.names, 2):
            graph.add_edge(a, b, link=LinkSpec(a, b, None, 0.0))
    object.__setattr__(topo, "_graph", graph)
    return topo


def structural_problems(topo: Topology) -> list[str]:
    problems = []
    if not topo.owners:
        problems.append("no data owners: at least one [[peer]] needs role = 'data_owner'")
    if not topo.compute_nodes:
        problems.append("no compute nodes: at least one [[peer]] needs role = 'compute'")
    if problems:
        return problems
    if not nx.is_connected(topo.graph):
        parts = sorted(sorted(c) for c in nx.connected_components(topo.graph))
        problems.append("the links leave the peers in separate groups: "
                        + " | ".join(", ".join(c) for c in parts))
    elif topo.training.objective == "cost":
        pass  # the planner chooses which nodes form the chains ([Note: the cost objective]) and says so
    elif topo.training.chains > 1:
        problems += [f"[training].chains: {p}" for p in chain_count_problems(
            topo.training.chains, len(topo.compute_nodes), len(topo.owners))]
    elif topo.training.chains == 1 and next(topo.chain_orders(), None) is None:
        names = ", ".join(p.name for p in topo.compute_nodes)
        problems.append(f"no compute chain can be formed from the links: the compute nodes ({names}) must "
                        "be linked one after another, and every data owner linked to both ends")
    return problems


def chain_count_problems(c: int, n: int, k: int) -> list[str]:
    """Why `c` chains of equal length, each with an owner, cannot be built from `n` compute nodes
    and `k` data owners ([Note: several chains]); read by the topology check and the planner."""
    out = []
    if n % c:
        out.append(f"{plural(n, 'compute node')} cannot form {c} chains of equal length "
                   "(the number of chains must divide the compute nodes)")
    if c > k:
        out.append(f"{c} chains need an owner each; there are {k} data owner" + ("" if k == 1 else "s"))
    return out


def _route(graph: nx.Graph, src: str, dst: str) -> list[str]:
    """[Note: routes] The shortest path src → dst that comes first by its names: from src, step
    each time to the first-named neighbour one hop nearer dst. Hop counts to dst come from one
    breadth-first search per destination, kept on the graph itself, so every topology that shares
    the graph (`with_changes` copies share it) shares them, and a peer that never asks about a
    destination never pays for it: with a hundred owners, all-pairs routes cost seconds. Callers
    must not change the list returned."""
    routes = graph.graph.setdefault("routes", {})
    path = routes.get((src, dst))
    if path is None:
        distances = graph.graph.setdefault("hops_to", {})
        hops = distances.get(dst)
        if hops is None:
            hops = distances[dst] = nx.single_source_shortest_path_length(graph, dst)
        if src not in hops:
            raise nx.NetworkXNoPath(f"no path between {src} and {dst}")
        path = [src]
        while path[-1] != dst:
            here = hops[path[-1]]
            path.append(min(n for n in graph.neighbors(path[-1]) if hops.get(n) == here - 1))
        routes[(src, dst)] = path
    return path


def _chain_orders(topo: Topology) -> Iterator[tuple[str, ...]]:
    graph = topo.graph
    owners = [p.name for p in topo.owners]
    compute = sorted(p.name for p in topo.compute_nodes)
    ends = [c for c in compute if all(graph.has_edge(o, c) for o in owners)]

    def extend(path: list[str], left: set[str]) -> Iterator[tuple[str, ...]]:
        if not left:
            if path[-1] in ends:
                yield tuple(path)
            return
        for nxt in sorted(left):
            if graph.has_edge(path[-1], nxt):
                path.append(nxt)
                yield from extend(path, left - {nxt})
                path.pop()

    for first in ends:
        yield from extend([first], set(compute) - {first})
