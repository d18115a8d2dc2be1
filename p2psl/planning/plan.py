"""The Plan: which peer runs which layers. Plain data — no solver, no torch.

Layers are numbered from 1, ranges are inclusive (as in the paper and in `p2psl plan --json`).
Parts are numbered along the path a batch takes forward:

    part 0        layers owner_first          on every data owner (the input layers)
    part 1..N     layers of chain[i - 1]       on compute node chain[i - 1], one copy per owner
    part N + 1    layers owner_last           on every data owner (the head and the loss)

[Note: several chains] A plan may build `chains` = C > 1 chains of N hops each from C·N compute
nodes: `chain` lists them chain after chain, and every chain runs the same segments (chain c's
i-th node runs the layers of the first chain's i-th node). Owner k sends its batches through
chain `routes[k]` only, so a compute node keeps copies for its own chain's owners. Because the
segments are the same, the nodes at one position together hold one part for every owner, and
the round's FedAvg of that part is exact: each averages its owners' copies, weighted by their
samples, and the sum over the chains is the same weighted mean as one chain would compute
(p2psl.runtime.roles.chains). A one-chain plan has `chains = 1`, no routes, and the digest it
had before plans could have several.

The digest covers the decisions (cuts, chain, owners), not the predictions, so peers that agree on
the split agree on the digest even if their float arithmetic differs in the last bit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from p2psl.errors import ConfigError
from p2psl.units import layers, plural, span


@dataclass(frozen=True)
class Stage:
    """One compute node's contiguous segment of layers, `first`..`last` inclusive."""

    node: str
    first: int
    last: int

    @property
    def layers(self) -> range:
        """0-based indices into the model's layer list."""
        return range(self.first - 1, self.last)


@dataclass(frozen=True)
class Plan:
    num_layers: int
    owner_first: tuple[int, int]
    owner_last: tuple[int, int]
    chain: tuple[Stage, ...]
    owners: tuple[str, ...]
    period_seconds: float | None = None
    round_seconds: float | None = None
    peak_memory_bytes: dict[str, int] = field(default_factory=dict, compare=False)
    method: str = "even"
    objective: str = "time"
    #: the full model's period (with the runtime's costs), which a run's timeline is measured against
    expected_period_seconds: float | None = field(default=None, compare=False)
    #: how many micro-batches each training batch is cut into ([Note: micro-batches]); a decision
    micro_batches: int = 1
    #: how many chains `chain` holds, each of len(chain) / chains nodes ([Note: several chains])
    chains: int = 1
    #: the chain (0-based) each owner's batches go through, in the order of `owners`; () with one chain
    routes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid plan: " + "; ".join(problems))

    # -- structure -------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Why this plan is not a partition of 1..num_layers into non-empty contiguous parts."""
        path = self.chain[:len(self.chain) // self.chains] if isinstance(self.chains, int) and self.chains >= 1 else self.chain
        bounds = [self.owner_first] + [(s.first, s.last) for s in path] + [self.owner_last]
        out, expected = [], 1
        for index, (first, last) in enumerate(bounds):
            if first != expected:
                out.append(f"part {index} starts at layer {first}, expected {expected}")
            if last < first:
                out.append(f"part {index} is empty ({first}–{last})")
            expected = last + 1
        if expected != self.num_layers + 1:
            out.append(f"parts end at layer {expected - 1}, the model has {self.num_layers}")
        if not self.chain:
            out.append("no compute nodes in the chain")
        if len({s.node for s in self.chain}) != len(self.chain):
            out.append("a compute node appears twice in the chain")
        out += self._chain_problems()
        if not (isinstance(self.micro_batches, int) and self.micro_batches >= 1):
            out.append(f"micro_batches must be a positive integer, got {self.micro_batches!r}")
        return out

    def _chain_problems(self) -> list[str]:
        """Why `chains` and `routes` do not describe C chains of equal segments ([Note: several chains])."""
        c = self.chains
        if not (isinstance(c, int) and c >= 1) or len(self.chain) % c:
            return [f"{plural(len(self.chain), 'compute node')} cannot form {c!r} chains of equal length"]
        if c == 1:
            return [] if not self.routes else ["routes are given for a single chain"]
        out, hops = [], len(self.chain) // c
        for index in range(hops, len(self.chain)):
            stage, first = self.chain[index], self.chain[index % hops]
            if (stage.first, stage.last) != (first.first, first.last):
                out.append(f"{stage.node} runs {layers(stage.first, stage.last)}, but the chains' "
                           f"position {index % hops + 1} runs {span(first.first, first.last)}")
        if len(self.routes) != len(self.owners) or not all(isinstance(r, int) and 0 <= r < c for r in self.routes):
            out.append(f"routes must name a chain from 0 to {c - 1} for each of the {len(self.owners)} owners")
        elif set(self.routes) != set(range(c)):
            out.append(f"every chain needs an owner; chain {min(set(range(c)) - set(self.routes))} has none")
        return out

    @property
    def hops(self) -> int:
        """N: the compute nodes on one chain."""
        return len(self.chain) // self.chains

    @property
    def num_parts(self) -> int:
        return self.hops + 2

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every compute node, chain after chain."""
        return tuple(s.node for s in self.chain)

    @property
    def paths(self) -> tuple[tuple[Stage, ...], ...]:
        """The chains, each as its stages in batch order."""
        n = self.hops
        return tuple(self.chain[c * n:(c + 1) * n] for c in range(self.chains))

    def route(self, owner: str) -> int:
        """The chain `owner`'s batches go through."""
        return self.routes[self.owners.index(owner)] if self.chains > 1 else 0

    def path(self, owner: str) -> tuple[Stage, ...]:
        """The stages `owner`'s batches go through."""
        return self.paths[self.route(owner)]

    def owners_of(self, node: str) -> tuple[str, ...]:
        """The owners whose copies compute node `node` keeps (its chain's owners)."""
        chain = self.nodes.index(node) // self.hops
        return tuple(k for k in self.owners if self.route(k) == chain)

    def peers_at(self, node: str) -> tuple[str, ...]:
        """The compute nodes that run the same layers as `node`, one per chain, chain order."""
        position = self.nodes.index(node) % self.hops
        return tuple(path[position].node for path in self.paths)

    def lane(self, chain: int) -> Plan:
        """Chain `chain` with its owners as a one-chain plan (what the cost model and the
        memory bound take per chain)."""
        if self.chains == 1:
            return self
        owners = tuple(k for k, r in zip(self.owners, self.routes) if r == chain)
        return Plan(self.num_layers, self.owner_first, self.owner_last, self.paths[chain], owners,
                    micro_batches=self.micro_batches)

    def part_layers(self, part: int) -> range:
        """0-based layer indices of `part` (0 = owner's first part, N + 1 = owner's last part)."""
        if part == 0:
            return range(self.owner_first[0] - 1, self.owner_first[1])
        if part == self.hops + 1:
            return range(self.owner_last[0] - 1, self.owner_last[1])
        return self.chain[part - 1].layers

    def part_of(self, node: str) -> int:
        """The part number a compute node runs."""
        for index, stage in enumerate(self.chain):
            if stage.node == node:
                return index % self.hops + 1
        raise KeyError(f"{node} is not in the chain")

    def holder(self, part: int, owner: str) -> str:
        """Who runs `part` for `owner`: the owner itself at both ends, else a compute node of its chain."""
        if part in (0, self.hops + 1):
            return owner
        return self.path(owner)[part - 1].node

    # -- identity and serialisation ------------------------------------------------------------
    @property
    def decisions(self) -> dict:
        """What the digest covers, as a `plan` message carries it (docs/protocol.md §13);
        `micro_batches` only when the batches are cut, so whole-batch plans keep their digests."""
        out = {
            "num_layers": self.num_layers,
            "owner_first": list(self.owner_first),
            "owner_last": list(self.owner_last),
            "chain": [[s.node, s.first, s.last] for s in self.chain],
            "owners": list(self.owners),
        }
        if self.micro_batches != 1:
            out["micro_batches"] = self.micro_batches
        if self.chains != 1:
            out["chains"] = self.chains
            out["routes"] = list(self.routes)
        return out

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.decisions, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        """The `p2psl plan --json` object (also written as plan.json)."""
        return {
            "assignments": {s.node: [s.first, s.last] for s in self.chain},
            "chain": [s.node for s in self.chain],
            "owner_layers": {"first": list(self.owner_first), "last": list(self.owner_last)},
            "owners": list(self.owners),
            "num_layers": self.num_layers,
            "period_seconds": self.period_seconds,
            "round_seconds": self.round_seconds,
            "expected_period_seconds": self.expected_period_seconds,
            "peak_memory_bytes": dict(sorted(self.peak_memory_bytes.items())),
            "method": self.method,
            "objective": self.objective,
            "micro_batches": self.micro_batches,
            "chains": self.chains,
            "routes": {k: r for k, r in zip(self.owners, self.routes)},
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        try:
            assignments = data["assignments"]
            chain = tuple(Stage(n, *map(int, assignments[n])) for n in data["chain"])
            return cls(
                num_layers=int(data["num_layers"]),
                owner_first=tuple(data["owner_layers"]["first"]),
                owner_last=tuple(data["owner_layers"]["last"]),
                chain=chain,
                owners=tuple(data["owners"]),
                period_seconds=data.get("period_seconds"),
                round_seconds=data.get("round_seconds"),
                peak_memory_bytes={k: int(v) for k, v in data.get("peak_memory_bytes", {}).items()},
                method=data.get("method", "even"),
                objective=data.get("objective", "time"),
                expected_period_seconds=data.get("expected_period_seconds"),
                micro_batches=int(data.get("micro_batches", 1)),
                chains=int(data.get("chains", 1)),
                routes=tuple(int(data["routes"][k]) for k in data["owners"]) if data.get("routes") else (),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a p2psl plan: missing or malformed {exc}") from None

    @classmethod
    def read(cls, path) -> Plan:
        """A plan.json file (as `p2psl plan --json` and `p2psl run` write it)."""
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except ValueError as exc:
            raise ConfigError(f"{path}: not JSON ({exc})") from None
        except OSError as exc:  # a path given by hand: bad local input
            raise ConfigError(f"cannot read the plan {path}: {exc.strerror or exc}") from None
        return cls.from_json(data)


def plan_from_cuts(cuts: list[int], nodes: list[str], owners: list[str], num_layers: int, **extra) -> Plan:
    """A plan from the last layer of each part but the final one: cuts[0] ends the owner's first
    part, cuts[i] ends compute node nodes[i-1]'s segment (len(cuts) == len(nodes) + 1)."""
    if len(cuts) != len(nodes) + 1:
        raise ValueError("need one cut per compute node plus the first cut")
    bounds = [0] + list(cuts) + [num_layers]
    chain = tuple(Stage(n, bounds[i + 1] + 1, bounds[i + 2]) for i, n in enumerate(nodes))
    return Plan(num_layers, (1, bounds[1]), (bounds[-2] + 1, num_layers), chain, tuple(owners), **extra)
