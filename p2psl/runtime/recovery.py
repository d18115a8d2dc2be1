"""Surviving a compute node: replicas, re-planning over the survivors, and moving state.

[Note: replicas] After aggregating a round, each compute node checkpoints its copies and sends the
same state to the next compute node of the chain (the last node sends it to the first), which
keeps it on disk. A single node's death therefore loses no weights: its layers' state of the last
complete round is on its successor.

[Note: recovery] When a compute node is declared gone, every live peer stops the round in progress
and plans again over the compute nodes left (the owners keep the layers they had, so their
memory is unaffected). The epoch is the number of compute nodes gone, so peers that know the same
failures compute the same plan; they compare digests as at start-up. They restore the last round R
that every live peer completed: owners from their own checkpoints, compute nodes from state that
each survivor sends to the new holder of each layer — from its own checkpoint, or from the replica
it keeps for a node that is gone. Then the round after R is trained again.

State keys name the model's global layer index (p2psl.learning.models.part, [Note: global state names]),
so a layer's state means the same whichever node holds it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from p2psl.wire import checkpoint
from p2psl.planning.plan import Plan


def replica_holder(plan: Plan, node: str) -> str | None:
    """Who keeps `node`'s replica: the next node of the chain, cyclically (None if alone)."""
    nodes = list(plan.nodes)
    if len(nodes) < 2 or node not in nodes:
        return None
    return nodes[(nodes.index(node) + 1) % len(nodes)]


def replica_of(plan: Plan, holder: str) -> str | None:
    """Whose replica `holder` keeps."""
    for node in plan.nodes:
        if replica_holder(plan, node) == holder:
            return node
    return None


def replicas_dir(out: Path, node: str) -> Path:
    return Path(out) / "replicas" / node


def completed_round(out: Path, me: str, plan: Plan | None) -> int:
    """The last round this peer can restore: its own checkpoint and, for a compute node, the
    replica it keeps for its predecessor in the chain."""
    own = checkpoint.rounds(Path(out) / "checkpoints")
    done = own[-1] if own else 0
    kept = replica_of(plan, me) if plan is not None else None
    if kept is not None:
        replicas = checkpoint.rounds(replicas_dir(out, kept))
        done = min(done, replicas[-1] if replicas else 0)
    return done


def layer_of(key: str) -> int:
    """The 0-based global layer index of a compute-node state key "<owner>/<model|optim>/<layer>.…"."""
    return int(key.split("/", 2)[2].split(".", 1)[0])


def provided_state(out: Path, me: str, gone: set[str], round_: int) -> dict[str, torch.Tensor]:
    """The state of `round_` this node can hand on: its own checkpoint, plus the replicas it keeps
    of nodes that are gone."""
    state: dict[str, torch.Tensor] = {}
    if round_ == 0:
        return state
    if round_ in checkpoint.rounds(Path(out) / "checkpoints"):
        state.update(checkpoint.load(Path(out) / "checkpoints", round_).state)
    for node in sorted(gone):
        folder = replicas_dir(out, node)
        if round_ in checkpoint.rounds(folder):
            state.update(checkpoint.load(folder, round_).state)
    return state


_COPY_KEY = re.compile(r"([^/]+)/(?:model|optim)/[0-9]+\.")


def is_copy_key(key: str, owners: set[str]) -> bool:
    """Whether `key` is a compute-node state key of one of `owners`' copies (what `layer_of` and
    `owner_of` can read)."""
    match = _COPY_KEY.match(key)
    return match is not None and match[1] in owners


def owner_of(key: str) -> str:
    """The owner whose copy a compute-node state key "<owner>/<model|optim>/<layer>.…" belongs to."""
    return key.split("/", 1)[0]


def owner_layers_in(state: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    """(owner, layer) of every copy's entry in `state`."""
    return {(owner_of(k), layer_of(k)) for k in state}


def select_layers(state: dict[str, torch.Tensor], layers: set[int]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if layer_of(k) in layers}


def layers_in(state: dict[str, torch.Tensor]) -> set[int]:
    return {layer_of(k) for k in state}
