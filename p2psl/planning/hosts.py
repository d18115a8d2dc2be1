"""Machines as resources: peers that run on one machine share its cores. Pure: no torch, no sockets.

[Note: shared machines] A compute node serves one task at a time, but so does every other peer on
its machine, and they all draw on the same cores: five peers on a two-core machine cannot run
five tasks at once. Each machine that two or more peers share is therefore one more resource of
the closed loop (p2psl.planning.pipeline), named ``host NAME``. Owner k's batch loads it with the
CPU seconds that the peers on it spend on that batch, divided by its cores C:

    ℓ_{H,k} = ( Σ_{p ∈ H} cpu_p,k ) / C

where cpu_p,k is p's compute for the batch (a compute node's segment, owner k's own parts when
k runs on H), with the runtime's per-task and per-message costs when the model includes them.
An emulated slow peer ([Note: emulated speed]) sleeps most of its stretched time, so only the
share min(1, speed) of its task time uses a core. ℓ_{H,k} is linear in the plan's choices, so
the MILP gets one more row per phase (`milp_loads`) and the model stays exact; the dynamic
program does not know machines, so the planner uses the MILP when one is shared.

Where the cores come from, so that every peer plans with the same number: a ``[[machine]]``
table of the topology file (``name``, ``cores``) wins; else the smallest `Profile.cores` among the
profiles of the peers on that machine — each peer measures the cores it may run on
(`profile.available_cores`) and sends them inside its profile, and every peer holds every profile
before it plans. A machine without either (profiles from a table, no ``[[machine]]``) is not a
resource: its peers are planned as if each had its own core.

A machine is named by a peer's ``machine`` key, else by its address's host; every loopback name
is one machine (``localhost``).

Drain. The other owners' first batches queue behind the first at every resource (`closed_loop`:
Σ_k ℓ_{r,k} − max_k ℓ_{r,k}); for a machine the model takes Σ_k ℓ_{H,k} − min_k ℓ_{H,k}, which is
the same when its owners' parts weigh the same and keeps the MILP linear otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

from p2psl.planning.highs import Lin, lin
from p2psl.planning.profile import Profile

#: prefix of a machine's resource name in a workload
HOST = "host "


def shared_machines(topology, profiles: Mapping[str, Profile]) -> dict[str, tuple[tuple[str, ...], int]]:
    """machine → (the peers on it, its cores), for every machine two or more peers share whose
    cores are known (the file's ``[[machine]]``, else the peers' profiles)."""
    groups: dict[str, list[str]] = {}
    for peer in topology.peers:
        groups.setdefault(peer.machine_key, []).append(peer.name)
    out = {}
    for machine, names in sorted(groups.items()):
        if len(names) < 2:
            continue
        measured = [profiles[n].cores for n in names if n in profiles and profiles[n].cores]
        cores = topology.cores(machine) or min(measured, default=0)
        if cores:
            out[machine] = (tuple(names), cores)
    return out


def cpu_share(topology, peer: str) -> float:
    """The part of a peer's task time that keeps a core busy ([Note: emulated speed])."""
    return min(1.0, topology.peer(peer).speed)


class HostCharges:
    """Adds CPU seconds to the machines' loads, owner batch by owner batch."""

    def __init__(self, topology, profiles: Mapping[str, Profile]):
        self.topology = topology
        machines = shared_machines(topology, profiles)
        self.where = {p: HOST + m for m, (names, _) in machines.items() for p in names}
        self.cores = {HOST + m: cores for m, (_, cores) in machines.items()}

    def __bool__(self) -> bool:
        return bool(self.where)

    def charge(self, loads: dict, owner: str, peer: str, seconds: float, tasks: bool = True) -> None:
        """`seconds` of `peer`'s work for one batch of `owner`: its layers' time when `tasks`, of
        which an emulated slow peer keeps a core busy only its share; else the runtime's own CPU
        (a message's, the Python around a task), which padding does not stretch."""
        resource = self.where.get(peer)
        if resource is None or seconds <= 0:
            return
        share = cpu_share(self.topology, peer) if tasks else 1.0
        per_owner = loads.setdefault(resource, {})
        per_owner[owner] = per_owner.get(owner, 0.0) + seconds * share / self.cores[resource]

    def hops(self, loads: dict, owner: str, route: list[str], send: float, receive: float) -> None:
        """A message's per-hop costs along `route`: sending on each hop's sender, receiving on its
        receiver."""
        for u, v in zip(route, route[1:]):
            self.charge(loads, owner, u, send, tasks=False)
            self.charge(loads, owner, v, receive, tasks=False)


def stagger(resource: str, per_owner: Mapping[str, float], owners: list[str]) -> float:
    """How long the other owners' first batches queue at a resource (see the module's "Drain")."""
    values = [per_owner.get(k, 0.0) for k in owners]
    return sum(values) - (min(values) if resource.startswith(HOST) else max(values))


# -- the MILP's rows -----------------------------------------------------------------------------

def _machine_terms(f) -> list[tuple[list[tuple[float, str]], dict[str, tuple[float, Lin]], float]]:
    """Per shared machine: its compute nodes' (CPU share, name), its owners' (CPU share, own
    parts' expression), and its cores — for a `Formulation` f."""
    p = f.p
    out = []
    for names, cores in shared_machines(p.topology, p.profiles).values():
        nodes = [(cpu_share(p.topology, i), i) for i in p.nodes if i in names]
        owners = {o: (cpu_share(p.topology, o), f._own(o)) for o in p.owners if o in names}
        out.append((nodes, owners, float(cores)))
    return out


def milp_loads(f, members: list[str]) -> list[Lin]:
    """Σ_{k ∈ members} ℓ_{H,k} of every shared machine, in the formulation's units (a node counts
    once per member whose batches it serves: its chain's, [Note: several chains])."""
    out = []
    served = (lambda c: len(members)) if f.C == 1 else (lambda c: f.count(members, c))
    for nodes, owners, cores in _machine_terms(f):
        terms = [(1.0, f.node_load(i, lambda c, s=share: served(c) * s / cores)) for share, i in nodes]
        terms += [(share / cores, own) for o, (share, own) in owners.items() if o in members]
        out.append(lin(*terms))
    return out


def milp_drains(f, active: list[str]) -> list[Lin]:
    """Expressions the drain must cover for every shared machine: Σ_k ℓ_{H,k} − min_k ℓ_{H,k},
    one expression Σ_k ℓ_{H,k} − ℓ_{H,j} per owner j that may be the minimum: with one chain,
    the owners off the machine (all alike), else each owner on it; with several, each owner on
    it and one owner off it per chain, whose loads differ by their chain's nodes."""
    out = []
    for nodes, owners, cores in _machine_terms(f):
        mine = [o for o in active if o in owners]
        if f.C == 1:
            base = [(1.0, f.node_load(i, lambda c, s=share: (len(active) - 1) * s / cores)) for share, i in nodes]
            leave = [None] if len(mine) < len(active) else mine
            for skipped in leave:
                out.append(lin(*base, *((owners[o][0] / cores, owners[o][1]) for o in mine if o != skipped)))
            continue
        away = {f.route[o]: o for o in reversed(active) if o not in owners}
        for skipped in [*mine, *away.values()]:
            served = (lambda c, j=skipped: f.count(active, c) - (f.route[j] == c))
            out.append(lin(*((1.0, f.node_load(i, lambda c, s=share: served(c) * s / cores)) for share, i in nodes),
                           *((owners[o][0] / cores, owners[o][1]) for o in mine if o != skipped)))
    return out
