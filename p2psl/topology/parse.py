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
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from p2psl.errors import TopologyError
from p2psl.topology.config import (
    COMPUTE,
    DATA_OWNER,
    DATASETS,
    MODEL_ZOO,
    MODES,
    OBJECTIVES,
    PARTITIONS,
    ROLES,
    STRAGGLER_POLICIES,
    Timeouts,
    TrainingConfig,
)
from p2psl.topology.model import (
    LinkSpec,
    MachineSpec,
    PeerSpec,
    machine_name,
    Topology,
    structural_problems,
    with_graph,
)
from p2psl.topology.reader import TableReader, array_of, table_of
from p2psl.units import parse_bandwidth, parse_duration, parse_size

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_ACCELERATOR = re.compile(r"cpu|auto|cuda(:[0-9]{1,2})?")


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; raises `TopologyError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is no TOML
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
    allowed_top = {"training", "peer", "link", "timeouts", "emulation", "machine"}
    for key in sorted(set(raw) - allowed_top):
        problems.append(f"unknown top-level key {key!r} (expected [training], [[peer]], [[link]], [[machine]], "
                        "[timeouts], [emulation])")
    training = _parse_training(table_of(raw, "training", problems), base, problems)
    timeouts = _parse_timeouts(table_of(raw, "timeouts", problems), problems)
    emulation = TableReader(table_of(raw, "emulation", problems), "[emulation]", problems, {"links"})
    emulate_links = emulation.get("links", bool, False)
    peers = _parse_peers(array_of(raw, "peer", problems), problems)
    links = _parse_links(array_of(raw, "link", problems), {p.name for p in peers}, problems)
    machines = _parse_machines(array_of(raw, "machine", problems), {p.machine_key for p in peers}, problems)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    topo = Topology(training, tuple(peers), tuple(links), timeouts, emulate_links, digest, source, tuple(machines))
    if not problems:
        topo = with_graph(topo)
        problems.extend(structural_problems(topo))
    if problems:
        raise TopologyError(problems, source)
    return topo



def _parse_training(table: dict, base: Path, problems: list[str]) -> TrainingConfig:
    d = TrainingConfig()
    r = TableReader(table, "[training]", problems, set(TrainingConfig.__dataclass_fields__))
    positive_int = (lambda v: v >= 1, "must be at least 1")
    model = r.get("model", str, d.model)
    if model not in MODEL_ZOO and not _FACTORY.fullmatch(model):
        r.bad("model", f"unknown model {model!r}: use one of {', '.join(MODEL_ZOO)} or 'package.module:factory'")
    dataset = r.get("dataset", str, d.dataset)
    if "\0" in dataset:
        r.bad("dataset", f"a path cannot hold a NUL character, got {dataset!r}")
    elif dataset not in DATASETS:
        path = (base / dataset).resolve()
        if path.suffix != ".npz":
            r.bad("dataset", f"{dataset!r} is neither {' nor '.join(DATASETS)} nor a path to an .npz file")
        elif not path.is_file():
            r.bad("dataset", f"no such file: {path}")
        else:
            dataset = str(path)
    profile = r.get("profile", str, None)
    if profile is not None and "\0" in profile:
        r.bad("profile", f"a path cannot hold a NUL character, got {profile!r}")
    elif profile is not None:
        path = (base / profile).resolve()
        if not path.is_file():
            r.bad("profile", f"no such file: {path}")
        profile = str(path)
    shape = r.get("synthetic_shape", list, list(d.synthetic_shape))
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        r.bad("synthetic_shape", f"expected a list of positive integers such as [3, 32, 32], got {shape!r}")
        shape = list(d.synthetic_shape)
    deadline = r.parsed("round_deadline", parse_duration, None)
    cost_deadline = r.parsed("deadline", parse_duration, None)
    keep = r.get("keep_checkpoints", (int, str), d.keep_checkpoints, lambda v: v == "all" or isinstance(v, int) and v >= 2,
                 "must be 'all' or a number of rounds, at least 2 (peers one round apart must find a round to"
                 " resume from)")
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
        micro_batches=_number_or_auto(r.get("micro_batches", (int, str), d.micro_batches,
                                           lambda v: v == "auto" or isinstance(v, int) and v >= 1,
                                           "must be a number of micro-batches, at least 1, or 'auto'")),
        chains=_number_or_auto(r.get("chains", (int, str), d.chains,
                                    lambda v: v == "auto" or isinstance(v, int) and v >= 1,
                                    "must be a number of chains, at least 1, or 'auto'")),
        round_deadline=deadline if deadline is None or deadline > 0 else None,
        deadline=cost_deadline if cost_deadline is None or cost_deadline > 0 else None,
        keep_checkpoints=None if keep == "all" else keep,
        straggler_policy=r.get("straggler_policy", str, d.straggler_policy,
                               lambda v: v in STRAGGLER_POLICIES, f"must be one of {STRAGGLER_POLICIES}"),
        mode=r.get("mode", str, d.mode, lambda v: v in MODES, f"must be one of {MODES}"),
    )
    if cost_deadline is not None and cost_deadline <= 0:
        problems.append("[training].deadline: must be positive")
    elif cost_deadline is not None and cfg.objective != "cost":
        problems.append("[training].deadline: needs objective = 'cost' (the longest predicted round the cheapest "
                        "plan may have)")
    if cfg.first_cut is not None and cfg.last_cut is not None and cfg.first_cut >= cfg.last_cut:
        problems.append(f"[training]: first_cut ({cfg.first_cut}) must be smaller than last_cut ({cfg.last_cut})")
    if cfg.micro_batches > cfg.batch_size:  # 0 is "auto"
        problems.append(f"[training]: micro_batches ({cfg.micro_batches}) cannot cut a batch of batch_size "
                        f"({cfg.batch_size}) samples: at most one sample each")
    return cfg


def _number_or_auto(value) -> int:
    """The ``micro_batches`` and ``chains`` keys: a number, or "auto" (0: the planner chooses)."""
    return 0 if value == "auto" else value


def _parse_timeouts(table: dict, problems: list[str]) -> Timeouts:
    d = Timeouts()
    r = TableReader(table, "[timeouts]", problems, set(Timeouts.__dataclass_fields__))
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
    known = {"name", "role", "address", "memory", "device", "speed", "machine", "accelerator", "accelerator_memory",
             "price"}
    for index, table in enumerate(tables, start=1):
        name = table.get("name")
        label = f"peer {name!r}" if isinstance(name, str) and name else f"[[peer]] #{index}"
        r = TableReader(table, label, problems, known)
        if name is None:
            problems.append(f"{label}: has no name")
            name = f"#{index}"
        elif not isinstance(name, str) or not _NAME.fullmatch(name):
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
        price = float(r.get("price", (int, float), 0.0, lambda v: v >= 0, "must be at least 0"))
        if "price" in table and role == DATA_OWNER:
            problems.append(f"{label}.price: only a compute node has a price (what it costs per hour, "
                            "for objective = 'cost')")
        peers.append(PeerSpec(
            name=name,
            role=role if role in ROLES else COMPUTE,
            host=host or "127.0.0.1",
            port=port or 0,
            memory=memory,
            device=r.get("device", str, None),
            speed=float(r.get("speed", (int, float), 1.0, lambda v: v > 0, "must be positive")),
            machine=r.get("machine", str, "", lambda v: bool(_NAME.fullmatch(v)),
                          "must be 1–63 letters, digits, '-', '_' or '.'"),
            price=price,
            **_parse_accelerator(r, table),
        ))
    return peers


def _parse_machines(tables: list[dict], used: set[str], problems: list[str]) -> list[MachineSpec]:
    """``[[machine]]`` tables: a machine's name (a peer's `machine` or its address's host) and its
    cores, which every peer then plans with (else the cores the peers measured on it)."""
    machines, seen = [], set()
    for index, table in enumerate(tables, start=1):
        name = table.get("name")
        label = f"machine {name!r}" if isinstance(name, str) and name else f"[[machine]] #{index}"
        r = TableReader(table, label, problems, {"name", "cores"})
        cores = r.get("cores", int, 0, lambda v: v >= 1, "must be at least 1")
        if "cores" not in table:
            problems.append(f"{label}.cores: missing (how many cores the machine gives its peers, e.g. 4)")
        if not isinstance(name, str) or not name:
            problems.append(f"{label}.name: expected a peer's machine or its address's host, got {name!r}")
            continue
        key = machine_name(name)
        if key in seen:
            problems.append(f"{label}: duplicate machine")
        elif key not in used:
            problems.append(f"{label}: no peer runs on it (machines: {', '.join(sorted(used))})")
        seen.add(key)
        if cores >= 1:
            machines.append(MachineSpec(key, cores))
    return machines


def _parse_accelerator(r: TableReader, table: dict) -> dict:
    """``accelerator`` and ``accelerator_memory``: where a peer's parts compute and what that
    device holds. Whether the device exists is checked by the peer at start, where it runs."""
    accelerator = r.get("accelerator", str, "cpu", lambda v: bool(_ACCELERATOR.fullmatch(v)),
                        "must be 'cpu', 'cuda', 'cuda:N' (a device index) or 'auto'")
    if not _ACCELERATOR.fullmatch(accelerator):
        accelerator = "cpu"
    memory = r.parsed("accelerator_memory", parse_size, None)
    if memory is not None and memory <= 0:
        r.bad("accelerator_memory", "must be positive")
        memory = None
    if "accelerator_memory" in table and table.get("accelerator", "cpu") == "cpu":
        r.bad("accelerator_memory", "is only meaningful with an accelerator: set accelerator = 'cuda' "
                                    "(or 'cuda:N', 'auto') or remove it")
        memory = None
    return {"accelerator": accelerator, "accelerator_memory": memory}


def _parse_address(value: Any, label: str, problems: list[str]) -> tuple[str | None, int | None]:
    if not isinstance(value, str):
        problems.append(f"{label}.address: expected 'host:port' such as '127.0.0.1:7101', got {value!r}")
        return None, None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
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
        r = TableReader(table, label, problems, known)
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

