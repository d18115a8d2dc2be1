"""Topology files: TOML → validated frozen dataclasses → a networkx graph.

Every peer of a deployment reads the same file (SPEC §2). Loading validates everything up front and
collects *every* problem before raising one `TopologyError`, so a user fixes a file in one pass.
Each problem names the table, the peer or the key it is about.

Links are connectivity: with no ``[[link]]`` at all every pair of peers is directly connected;
otherwise peers are connected only where a link says so, and messages between peers that are
not neighbours are relayed along the shortest path. A link without a bandwidth costs nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import networkx as nx

from p2psl.errors import TopologyError
from p2psl.units import parse_bandwidth, parse_duration, parse_size

DATA_OWNER = "data_owner"
COMPUTE = "compute"
ROLES = (DATA_OWNER, COMPUTE)

#: names the model zoo understands; anything else must be "package.module:factory"
MODEL_ZOO = ("mlp", "cnn", "vgg19", "resnet101")
DATASETS = ("digits", "synthetic")
PARTITIONS = ("iid", "dirichlet")
OBJECTIVES = ("time", "memory")
STRAGGLER_POLICIES = ("wait", "drop")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class TrainingConfig:
    """The ``[training]`` table: what is trained, on what, and how."""

    model: str = "cnn"
    dataset: str = "digits"
    rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    first_cut: int | None = None
    last_cut: int | None = None
    profile: str | None = None
    objective: str = "time"
    eval_batch_size: int = 256
    test_fraction: float = 0.2
    synthetic_shape: tuple[int, ...] = (1, 8, 8)
    synthetic_samples: int = 2000
    num_classes: int = 10
    micro_batches: int = 1
    round_deadline: float | None = None
    straggler_policy: str = "wait"


@dataclass(frozen=True)
class Timeouts:
    """Every network wait has a deadline from here (the ``[timeouts]`` table; tests shrink them)."""

    connect: float = 60.0        # how long to keep dialling a neighbour before giving up
    handshake: float = 10.0      # one authentication handshake
    heartbeat: float = 1.0       # interval between pings on an idle connection
    dead: float = 6.0            # silence after which a link is declared down
    gone: float = 4.0            # a link down this long (after `dead`, or a closed connection) means the peer is gone
    request: float = 120.0       # one reply (a batch's activations, a part to aggregate)
    start: float = 120.0         # agreeing on a plan at start-up
    round: float = 3600.0        # the longest a round may take before the peers give up
    closing: float = 2.0         # on the way out: a bye, an abort, an error reply; closing a link


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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_owner(self) -> bool:
        return self.role == DATA_OWNER


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
    timeouts: Timeouts = Timeouts()
    emulate_links: bool = False
    digest: str = ""
    source: str = "<memory>"
    _graph: nx.Graph = field(default=None, compare=False, repr=False)

    # -- lookups -------------------------------------------------------------------------------
    @property
    def owners(self) -> tuple[PeerSpec, ...]:
        return tuple(p for p in self.peers if p.role == DATA_OWNER)

    @property
    def compute_nodes(self) -> tuple[PeerSpec, ...]:
        return tuple(p for p in self.peers if p.role == COMPUTE)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.peers)

    def peer(self, name: str) -> PeerSpec:
        for p in self.peers:
            if p.name == name:
                return p
        raise KeyError(name)

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
        """The deterministic shortest path src → dst (ties broken by name)."""
        return _routes(self)[src][dst]

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
        from dataclasses import replace

        return replace(self, training=replace(self.training, **training_changes))

    def without_peers(self, names: set[str]) -> Topology:
        """The deployment that remains when `names` are gone (re-planning after a failure)."""
        from dataclasses import replace

        peers = tuple(p for p in self.peers if p.name not in names)
        links = tuple(l for l in self.links if l.a not in names and l.b not in names)
        return _with_graph(replace(self, peers=peers, links=links))


# -- loading -------------------------------------------------------------------------------------

def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; raises `TopologyError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError([f"cannot read the file: {exc.strerror or exc}"], str(path)) from None
    except UnicodeDecodeError:
        raise TopologyError(["the file is not UTF-8 text"], str(path)) from None
    return parse_topology(text, source=str(path), base_dir=path.parent)


def parse_topology(text: str, source: str = "<memory>", base_dir: Path | None = None) -> Topology:
    """Validate TOML text as a topology (relative paths resolve against `base_dir`)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError([f"not valid TOML: {exc}"], source) from None
    problems: list[str] = []
    base = base_dir or Path.cwd()
    allowed_top = {"training", "peer", "link", "timeouts", "emulation"}
    for key in sorted(set(raw) - allowed_top):
        problems.append(f"unknown top-level key {key!r} (expected [training], [[peer]], [[link]], [timeouts], "
                        "[emulation])")
    training = _parse_training(_table(raw, "training", problems), base, problems)
    timeouts = _parse_timeouts(_table(raw, "timeouts", problems), problems)
    emulation = _Reader(_table(raw, "emulation", problems), "[emulation]", problems, {"links"})
    emulate_links = emulation.get("links", bool, False)
    peers = _parse_peers(_array(raw, "peer", problems), problems)
    links = _parse_links(_array(raw, "link", problems), {p.name for p in peers}, problems)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    topo = Topology(training, tuple(peers), tuple(links), timeouts, emulate_links, digest, source)
    if not problems:
        topo = _with_graph(topo)
        problems.extend(_structural_problems(topo))
    if problems:
        raise TopologyError(problems, source)
    return topo


def _table(raw: dict, key: str, problems: list[str]) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"[{key}] must be a table")
        return {}
    return value


def _array(raw: dict, key: str, problems: list[str]) -> list[dict]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append(f"[[{key}]] must be an array of tables (write [[{key}]] before each entry)")
        return []
    return value


class _Reader:
    """Reads typed keys from one table, recording a problem for each bad one."""

    def __init__(self, table: dict, where: str, problems: list[str], known: set[str]):
        self.table, self.where, self.problems = table, where, problems
        for key in sorted(set(table) - known):
            hint = _close_match(key, known)
            problems.append(f"{where}: unknown key {key!r}{hint}")

    def bad(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where}.{key}: {message}")

    def get(self, key: str, kind: type | tuple, default: Any, check=None, message: str = "") -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join("number" if k is float else k.__name__ for k in kinds)
            self.bad(key, f"expected {names.replace('str', 'a string').replace('int', 'an integer')}, got {value!r}")
            return default
        if check is not None and not check(value):
            self.bad(key, f"{message}, got {value!r}")
            return default
        return value

    def parsed(self, key: str, parser, default: Any) -> Any:
        if key not in self.table:
            return default
        try:
            return parser(self.table[key])
        except ValueError as exc:
            self.bad(key, str(exc))
            return default


def _close_match(key: str, known: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _parse_training(table: dict, base: Path, problems: list[str]) -> TrainingConfig:
    d = TrainingConfig()
    r = _Reader(table, "[training]", problems, set(TrainingConfig.__dataclass_fields__))
    positive_int = (lambda v: v >= 1, "must be at least 1")
    model = r.get("model", str, d.model)
    if model not in MODEL_ZOO and not _FACTORY.fullmatch(model):
        r.bad("model", f"unknown model {model!r}: use one of {', '.join(MODEL_ZOO)} or 'package.module:factory'")
    dataset = r.get("dataset", str, d.dataset)
    if dataset not in DATASETS:
        path = (base / dataset).resolve()
        if path.suffix != ".npz":
            r.bad("dataset", f"{dataset!r} is neither {' nor '.join(DATASETS)} nor a path to an .npz file")
        elif not path.is_file():
            r.bad("dataset", f"no such file: {path}")
        else:
            dataset = str(path)
    profile = r.get("profile", str, None)
    if profile is not None:
        path = (base / profile).resolve()
        if not path.is_file():
            r.bad("profile", f"no such file: {path}")
        profile = str(path)
    shape = r.get("synthetic_shape", list, list(d.synthetic_shape))
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        r.bad("synthetic_shape", f"expected a list of positive integers such as [3, 32, 32], got {shape!r}")
        shape = list(d.synthetic_shape)
    deadline = r.parsed("round_deadline", parse_duration, None)
    cfg = TrainingConfig(
        model=model,
        dataset=dataset,
        rounds=r.get("rounds", int, d.rounds, *positive_int),
        local_epochs=r.get("local_epochs", int, d.local_epochs, *positive_int),
        batch_size=r.get("batch_size", int, d.batch_size, *positive_int),
        learning_rate=r.get("learning_rate", (int, float), d.learning_rate, lambda v: v > 0, "must be positive"),
        momentum=r.get("momentum", (int, float), d.momentum, lambda v: 0 <= v < 1, "must be in [0, 1)"),
        weight_decay=r.get("weight_decay", (int, float), d.weight_decay, lambda v: v >= 0, "must be >= 0"),
        partition=r.get("partition", str, d.partition, lambda v: v in PARTITIONS, f"must be one of {PARTITIONS}"),
        alpha=r.get("alpha", (int, float), d.alpha, lambda v: v > 0, "must be positive"),
        seed=r.get("seed", int, d.seed),
        first_cut=r.get("first_cut", int, None, *positive_int),
        last_cut=r.get("last_cut", int, None, *positive_int),
        profile=profile,
        objective=r.get("objective", str, d.objective, lambda v: v in OBJECTIVES, f"must be one of {OBJECTIVES}"),
        eval_batch_size=r.get("eval_batch_size", int, d.eval_batch_size, *positive_int),
        test_fraction=r.get("test_fraction", (int, float), d.test_fraction, lambda v: 0 < v < 1, "must be in (0, 1)"),
        synthetic_shape=tuple(shape),
        synthetic_samples=r.get("synthetic_samples", int, d.synthetic_samples, lambda v: v >= 10, "must be at least 10"),
        num_classes=r.get("num_classes", int, d.num_classes, lambda v: v >= 2, "must be at least 2"),
        micro_batches=r.get("micro_batches", int, d.micro_batches, *positive_int),
        round_deadline=deadline if deadline is None or deadline > 0 else None,
        straggler_policy=r.get("straggler_policy", str, d.straggler_policy,
                               lambda v: v in STRAGGLER_POLICIES, f"must be one of {STRAGGLER_POLICIES}"),
    )
    if cfg.first_cut is not None and cfg.last_cut is not None and cfg.first_cut >= cfg.last_cut:
        problems.append(f"[training]: first_cut ({cfg.first_cut}) must be smaller than last_cut ({cfg.last_cut})")
    return cfg


def _parse_timeouts(table: dict, problems: list[str]) -> Timeouts:
    d = Timeouts()
    r = _Reader(table, "[timeouts]", problems, set(Timeouts.__dataclass_fields__))
    values = {}
    for key in Timeouts.__dataclass_fields__:
        value = r.parsed(key, parse_duration, getattr(d, key))
        if value <= 0:
            r.bad(key, "must be positive")
            value = getattr(d, key)
        values[key] = value
    if values["dead"] <= values["heartbeat"]:
        problems.append("[timeouts]: dead must be longer than heartbeat")
    return Timeouts(**values)


def _parse_peers(tables: list[dict], problems: list[str]) -> list[PeerSpec]:
    peers, seen_names, seen_addresses = [], {}, {}
    known = {"name", "role", "address", "memory", "device", "speed"}
    for index, table in enumerate(tables, start=1):
        name = table.get("name")
        label = f"peer {name!r}" if isinstance(name, str) and name else f"[[peer]] #{index}"
        r = _Reader(table, label, problems, known)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(f"{label}: name must be 1–63 letters, digits, '-', '_' or '.', got {name!r}")
            name = f"#{index}"
        elif name in seen_names:
            problems.append(f"{label}: duplicate name (also [[peer]] #{seen_names[name]})")
        seen_names.setdefault(name, index)
        role = table.get("role")
        if role not in ROLES:
            problems.append(f"{label}.role: unknown role {role!r} (expected 'data_owner' or 'compute')")
        host, port = _parse_address(table.get("address"), label, problems)
        if host is not None:
            key = f"{host}:{port}"
            if key in seen_addresses:
                problems.append(f"{label}.address: {key} is also the address of peer {seen_addresses[key]!r}")
            seen_addresses.setdefault(key, name)
        if "memory" not in table:
            problems.append(f"{label}.memory: missing (the capacity the planner must respect, e.g. '2GiB')")
        memory = r.parsed("memory", parse_size, 0)
        if "memory" in table and memory <= 0 and not any(p.startswith(f"{label}.memory") for p in problems):
            r.bad("memory", "must be positive")
        peers.append(PeerSpec(
            name=name,
            role=role if role in ROLES else COMPUTE,
            host=host or "127.0.0.1",
            port=port or 0,
            memory=memory,
            device=r.get("device", str, None),
            speed=float(r.get("speed", (int, float), 1.0, lambda v: v > 0, "must be positive")),
        ))
    return peers


def _parse_address(value: Any, label: str, problems: list[str]) -> tuple[str | None, int | None]:
    if not isinstance(value, str):
        problems.append(f"{label}.address: expected 'host:port' such as '127.0.0.1:7101', got {value!r}")
        return None, None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        problems.append(f"{label}.address: expected 'host:port' with a port in 1–65535, got {value!r}")
        return None, None
    return host, int(port)


def _parse_links(tables: list[dict], names: set[str], problems: list[str]) -> list[LinkSpec]:
    links, seen = [], {}
    known = {"peers", "bandwidth", "latency"}
    for index, table in enumerate(tables, start=1):
        pair = table.get("peers")
        label = f"[[link]] #{index}"
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
            label = f"link {pair[0]}–{pair[1]}"
        r = _Reader(table, label, problems, known)
        bandwidth = r.parsed("bandwidth", parse_bandwidth, None)
        latency = r.parsed("latency", parse_duration, 0.0)
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            problems.append(f"{label}.peers: expected two peer names such as [\"alice\", \"c1\"], got {pair!r}")
            continue
        a, b = pair
        unknown = [p for p in pair if p not in names]
        for p in unknown:
            problems.append(f"{label}: unknown peer {p!r}")
        if a == b:
            problems.append(f"{label}: a link needs two different peers")
        key = frozenset(pair)
        if key in seen:
            problems.append(f"{label}: duplicate of [[link]] #{seen[key]}")
        seen.setdefault(key, index)
        if not unknown and a != b:
            links.append(LinkSpec(a, b, bandwidth, latency))
    return links


def _with_graph(topo: Topology) -> Topology:
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


def _structural_problems(topo: Topology) -> list[str]:
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
    elif next(topo.chain_orders(), None) is None:
        names = ", ".join(p.name for p in topo.compute_nodes)
        problems.append(f"no compute chain can be formed from the links: the compute nodes ({names}) must "
                        "be linked one after another, and every data owner linked to both ends")
    return problems


def _routes(topo: Topology) -> dict[str, dict[str, list[str]]]:
    cached = topo.__dict__.get("_route_cache")
    if cached is None:
        cached = {}
        for src in topo.names:
            cached[src] = {dst: _shortest(topo.graph, src, dst) for dst in topo.names}
        object.__setattr__(topo, "_route_cache", cached)
    return cached


def _shortest(graph: nx.Graph, src: str, dst: str) -> list[str]:
    paths = sorted(nx.all_shortest_paths(graph, src, dst))
    return paths[0]


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
