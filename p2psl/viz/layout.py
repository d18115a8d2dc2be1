"""Where each peer sits in a picture, and which links are drawn — shared by the static picture and
the live dashboard, so both show a deployment the same way.

Two columns: data owners on the left, compute nodes on the right in chain order (top to bottom),
so a batch reads owner → c1 → c2 → … → cN → back to the owner. Positions are in row units (one
row between neighbouring owners); drawings scale them. The layout is deterministic: the same
topology and plan always give the same picture.

A topology without ``[[link]]`` tables connects every pair of peers for free; drawing all n²/2
pairs hides the structure, so only the links a batch uses are drawn, marked `implicit`.

With several chains ([Note: several chains] in p2psl.planning.plan) the compute nodes stand chain
after chain, `paths` holds each chain in batch order, and an owner's links are those to the ends
of its own chain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from p2psl.planning.plan import Plan
from p2psl.topology import LinkSpec, Topology
from p2psl.units import format_rate


@dataclass(frozen=True)
class Node:
    name: str
    role: str
    x: float
    y: float


@dataclass(frozen=True)
class Edge:
    a: str
    b: str
    label: str         # "8 Mbit/s · 20 ms", or "free"
    kind: str          # "chain" (between consecutive compute nodes), "owner" (owner ↔ chain end), "other"
    implicit: bool     # not a [[link]] of the file: the topology connects every pair


@dataclass(frozen=True)
class Scene:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    chain: tuple[str, ...]
    rows: int
    #: the chains, each in the order a batch visits its nodes (one: `chain`)
    paths: tuple[tuple[str, ...], ...] = ()

    def to_json(self) -> dict:
        return {"nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges],
                "chain": list(self.chain), "paths": [list(p) for p in self.chains], "rows": self.rows}

    @property
    def chains(self) -> tuple[tuple[str, ...], ...]:
        return self.paths or (self.chain,)


def link_label(link: LinkSpec) -> str:
    """How a link is labelled everywhere: bandwidth and latency, or 'free' for a costless link."""
    if link.bandwidth is None and not link.latency:
        return "free"
    from p2psl.viz import format_seconds

    return f"{format_rate(link.bandwidth)} · {format_seconds(link.latency)}"


def chain_order(topology: Topology, plan: Plan | None) -> tuple[str, ...]:
    """The compute nodes in the order a batch visits them; nodes outside the chain come last."""
    if plan is not None:
        head = list(plan.nodes)
    else:
        head = list(next(topology.chain_orders(), ()))
    rest = sorted(p.name for p in topology.compute_nodes if p.name not in head)
    return tuple(head + rest)


def scene(topology: Topology, plan: Plan | None = None) -> Scene:
    owners = [p.name for p in topology.owners]
    compute = chain_order(topology, plan)
    rows = max(len(owners), len(compute))
    nodes = [Node(name, "data_owner", 0.0, _row(i, len(owners), rows)) for i, name in enumerate(owners)]
    nodes += [Node(name, "compute", 1.0, _row(i, len(compute), rows)) for i, name in enumerate(compute)]
    chain = tuple(plan.nodes) if plan is not None else compute
    paths = tuple(tuple(s.node for s in path) for path in plan.paths) if plan is not None else (chain,)
    path_of = {o: paths[plan.route(o) if plan is not None else 0] for o in owners}
    return Scene(tuple(nodes), tuple(_edges(topology, paths, path_of)), chain, rows, paths)


def _row(index: int, count: int, rows: int) -> float:
    """Spread `count` items evenly over `rows` rows (centred when there is one)."""
    if count <= 1:
        return (rows - 1) / 2
    return index * (rows - 1) / (count - 1)


def _edges(topology: Topology, paths: tuple[tuple[str, ...], ...], path_of: dict[str, tuple[str, ...]]) -> list[Edge]:
    consecutive = {frozenset(p) for path in paths for p in zip(path, path[1:])}
    ends = {o: {path[0], path[-1]} if path else set() for o, path in path_of.items()}

    def kind(a: str, b: str) -> str:
        if frozenset((a, b)) in consecutive:
            return "chain"
        if b in ends.get(a, ()) or a in ends.get(b, ()):
            return "owner"
        return "other"

    if topology.fully_connected:
        pairs = sorted(consecutive, key=sorted) + [frozenset((o, e)) for o in sorted(ends) for e in sorted(ends[o])]
        return [Edge(*sorted(p), "free", kind(*sorted(p)), True) for p in dict.fromkeys(pairs)]
    return [Edge(link.a, link.b, link_label(link), kind(link.a, link.b), False) for link in topology.links]


#: the role of the one box that stands for every data owner in a collapsed scene
OWNER_GROUP = "owner_group"


def collapsed(s: Scene, owners: list[str], name: str) -> Scene:
    """`s` with every data owner drawn as one box `name` (a deployment of a hundred owners would
    be a hundred boxes): the compute nodes keep their column, the owners' links become the box's,
    one per chain end and label."""
    owner_set = set(owners)
    compute = [n for n in s.nodes if n.role != "data_owner"]
    rows = max(len(compute), 1)
    nodes = [Node(name, OWNER_GROUP, 0.0, (rows - 1) / 2)]
    nodes += [Node(n.name, n.role, n.x, _row(i, len(compute), rows)) for i, n in enumerate(compute)]
    edges = {}
    for e in s.edges:
        a, b = (name if e.a in owner_set else e.a), (name if e.b in owner_set else e.b)
        if a != b:
            edges.setdefault((frozenset((a, b)), e.label, e.kind), Edge(a, b, e.label, e.kind, e.implicit))
    return Scene(tuple(nodes), tuple(edges.values()), s.chain, rows, s.paths)
