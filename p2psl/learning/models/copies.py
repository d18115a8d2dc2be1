"""What a compute node holds: one copy of its part per data owner (SPEC §1, as in the paper).

Each copy has its own weights and optimizer state; at the end of a round the copies are replaced
by their FedAvg (`p2psl.learning.aggregate.fedavg`), each keeping its own momentum.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from p2psl.learning.aggregate import chain_sum, chains_average, fedavg_items
from p2psl.errors import TrainingError
from p2psl.learning.models.part import OptimConfig, Part
from p2psl.learning.models.spec import ModelSpec


class CopySet:
    """Identically initialised `Part`s of layers `indices`, one per owner.

    The layers are built once and deep-copied, so K owners cost one initialisation. Every copy
    and its optimizer state live on `device`; the average is taken on host tensors (`Part.state`),
    so it is the same bits whatever the device.
    """

    def __init__(self, spec: ModelSpec, indices: Sequence[int], owners: Sequence[str], seed: int,
                 optim: OptimConfig, *, name: str = "compute", check_shapes: bool = True,
                 device: torch.device | None = None):
        indices = list(indices)
        if not owners or len(set(owners)) != len(owners):
            raise ValueError(f"a copy set needs distinct owners, got {list(owners)}")
        shape = spec.output_shapes()[indices[0] - 1] if check_shapes and indices[0] > 0 else None
        layers = spec.build(indices, seed)
        self.indices = tuple(indices)
        self._parts = {
            owner: Part(copy.deepcopy(layers), indices, optim, input_shape=shape, name=f"{name} part for {owner}",
                        device=device)
            for owner in owners
        }

    @property
    def owners(self) -> tuple[str, ...]:
        return tuple(self._parts)

    def copy(self, owner: str) -> Part:
        try:
            return self._parts[owner]
        except KeyError:
            raise TrainingError(f"no copy for data owner {owner!r} (have {sorted(self._parts)})") from None

    def average(self, weights: Mapping[str, float]) -> None:
        """Set every copy's parameters and buffers to the FedAvg of the copies named in `weights`.

        Owners missing from `weights` (e.g. one that dropped out this round) contribute nothing
        but still receive the average. Integer buffers are averaged and rounded (see `fedavg`).
        Tensor by tensor: each average is written into every copy before the next is made, so
        the round end holds one tensor beside the copies, not a whole part (which took a
        ResNet-101 node 175 MiB above its training peak and above its planned peak).
        """
        states = {owner: self.copy(owner).state(snapshot=False) for owner in weights}
        targets = [part.module.state_dict() for part in self._parts.values()]  # the live tensors
        with torch.no_grad():
            for name, average in fedavg_items(states, weights):  # a name's copies are read before it is written
                for target in targets:
                    target[name].copy_(average)

    def chain_sum(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """This chain's share of the FedAvg over several chains (`aggregate.chain_sum`): its copies
        of owners in `weights` (every included owner of every chain) summed with their shares."""
        like = self.copy(self.owners[0]).state(snapshot=False)
        states = {owner: self.copy(owner).state(snapshot=False) for owner in self.owners if owner in weights}
        return chain_sum(states, weights, like)

    def load_chains_average(self, sums: list[Mapping[str, torch.Tensor]]) -> None:
        """Set every copy's parameters and buffers to the average of the chains' sums, in their order."""
        like = self.copy(self.owners[0]).state(snapshot=False)
        targets = [part.module.state_dict() for part in self._parts.values()]
        with torch.no_grad():
            for name, average in chains_average(sums, like):
                for target in targets:
                    target[name].copy_(average)

    @property
    def parameter_bytes(self) -> int:
        return sum(part.parameter_bytes for part in self._parts.values())

    @property
    def stash_count(self) -> int:
        return sum(part.stash_count for part in self._parts.values())
