"""What a data owner holds: its copy of the first part (input layers) and the last part (head + loss).

Labels enter only `loss_backward`, which returns a gradient w.r.t. the head's input — the only
thing that leaves the owner on the way back (SPEC §1, check c).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from p2psl.errors import TrainingError
from p2psl.learning.models.part import OptimConfig, Part
from p2psl.learning.models.spec import ModelSpec

if TYPE_CHECKING:
    from p2psl.planning.plan import Plan


class OwnerModel:
    """Part 0 (`first`) and part N+1 (`last`) of one data owner."""

    def __init__(self, spec: ModelSpec, first: Sequence[int], last: Sequence[int], seed: int,
                 optim: OptimConfig, name: str = "owner", device: torch.device | None = None):
        first, last = list(first), list(last)
        shapes = spec.output_shapes()
        self.first = Part(spec.build(first, seed), first, optim, input_grad=False,
                          input_shape=spec.input_shape, name=f"{name} first part", device=device)
        self.last = Part(spec.build(last, seed), last, optim,
                         input_shape=shapes[last[0] - 1], name=f"{name} last part", device=device)

    @classmethod
    def from_plan(cls, spec: ModelSpec, plan: Plan, seed: int, optim: OptimConfig, name: str = "owner",
                  device: torch.device | None = None) -> OwnerModel:
        """The owner's parts of a `p2psl.planning.plan.Plan`, on `device` (default: the CPU)."""
        return cls(spec, plan.part_layers(0), plan.part_layers(plan.num_parts - 1), seed, optim, name, device)

    # -- one batch --------------------------------------------------------------------------------
    def forward(self, key: Hashable, x: Tensor) -> Tensor:
        """Input layers on raw data; the activation that goes to the first compute node."""
        return self.first.forward_train(key, x)

    def loss_backward(self, key: Hashable, h: Tensor, labels: Tensor, share: float = 1.0) -> tuple[float, Tensor]:
        """Head, cross-entropy (batch mean) and backward: (loss, gradient w.r.t. `h`). A micro-batch
        holding `share` of its batch's samples backpropagates its loss times `share`, so the
        gradients its micro-batches add up to are the whole batch's; the loss returned is its own."""
        logits = self.last.forward_train(key, h).requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(logits, labels)
            (loss if share == 1.0 else loss * share).backward()
        return float(loss.detach()), self.last.backward(key, logits.grad)

    def backward(self, key: Hashable, grad: Tensor) -> None:
        """Finish the batch in the input layers (their input is data: no gradient goes anywhere)."""
        self.first.backward(key, grad)

    def step(self) -> None:
        self.first.step()
        self.last.step()

    def local_step(self, key: Hashable, x: Tensor, labels: Tensor, micros: int = 1) -> float:
        """One whole batch here, with no chain between the parts (a federated-averaging owner,
        whose first part holds every layer up to the head), cut into `micros` micro-batches as a
        split batch would be (`micro_batches`): the same operations, in the same order, as the
        split batch, so the same bits. Returns the batch's loss."""
        loss, size = 0.0, len(labels)
        for micro, index in enumerate(torch.tensor_split(torch.arange(size), micros)):
            share = len(index) / size if micros > 1 else 1.0
            part_loss, grad = self.loss_backward((key, micro), self.forward((key, micro), x[index]), labels[index], share)
            self.backward((key, micro), grad)
            loss += part_loss * share
        self.last.step()
        self.first.step()
        return loss

    def drop(self, key: Hashable) -> None:
        self.first.drop(key)
        self.last.drop(key)

    # -- evaluation -------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Input layers in eval mode (the evaluation pass through the chain starts here)."""
        return self.first.forward_eval(x)

    def predict(self, h: Tensor) -> Tensor:
        """Logits from the head in eval mode."""
        return self.last.forward_eval(h)

    def infer(self, x: Tensor) -> Tensor:
        """Logits of raw inputs with no chain between the parts (a federated-averaging owner)."""
        return self.predict(self.embed(x))

    # -- state: the union of both parts, keyed by global layer index ------------------------------
    def state(self, snapshot: bool = True) -> dict[str, Tensor]:
        return {**self.first.state(snapshot), **self.last.state(snapshot)}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        self._check_keys(state, "state")
        self.first.load_state(_subset(state, self.first.indices))
        self.last.load_state(_subset(state, self.last.indices))

    def optimizer_state(self, snapshot: bool = True) -> dict[str, Tensor]:
        return {**self.first.optimizer_state(snapshot), **self.last.optimizer_state(snapshot)}

    def load_optimizer_state(self, state: Mapping[str, Tensor]) -> None:
        self._check_keys(state, "optimizer state")
        self.first.load_optimizer_state(_subset(state, self.first.indices))
        self.last.load_optimizer_state(_subset(state, self.last.indices))

    def _check_keys(self, state: Mapping[str, Tensor], what: str) -> None:
        ours = {str(i) for i in self.first.indices + self.last.indices}
        foreign = sorted(k for k in state if k.split(".", 1)[0] not in ours)
        if foreign:
            raise TrainingError(f"{self.first.name}: {what} has entries of other layers: {foreign[:5]}")


def _subset(state: Mapping[str, Tensor], indices: Sequence[int]) -> dict[str, Tensor]:
    """Entries whose global layer index (the first name component) is one of `indices`."""
    wanted = {str(i) for i in indices}
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in wanted}
