"""The roles of a federated-averaging run (``[training] mode = "fedavg"``): the baseline a split
deployment is measured against, run by the same peers over the same transport.

[Note: the federated-averaging baseline] Every data owner trains the whole model on its own
shard (the plan's first part, the chain's layers and the head, all here) and the owners average
it at the round's end exactly as they average their parts in a split run: the same cut, the same
all-reduce, checkpoint, evaluation and reports. Only what a batch does differs: one local step,
no message. The compute nodes train nothing; they still take part in the cut and hear the
reports, so a round ends the same way in both modes and the two runs' round times compare the
training alone. Split and federated runs of one file give the same model round after round (the
split computes the same operations in the same order), which `p2psl run` on both shows.
"""

from __future__ import annotations

import torch

from p2psl.errors import RemoteProtocolError
from p2psl.learning.models import OwnerModel
from p2psl.runtime.roles.context import Context
from p2psl.runtime.roles.owner import DataOwner
from p2psl.runtime.roles.rounds import RoundEnd
from p2psl.wire import checkpoint
from p2psl.wire.messages import Activation, Error, Gradient, Routed


class LocalOwner(DataOwner):
    """A data owner that trains the whole model itself ([Note: the federated-averaging baseline])."""

    @staticmethod
    def build_model(ctx: Context) -> OwnerModel:
        plan = ctx.plan
        front = range(0, plan.owner_last[0] - 1)  # part 0 and every compute node's layers
        return OwnerModel(ctx.spec, front, plan.part_layers(plan.num_parts - 1), ctx.training.seed, ctx.optim,
                          ctx.me, ctx.device)

    async def handle(self, msg: Routed) -> None:
        if isinstance(msg, (Activation, Gradient)):
            raise RemoteProtocolError(f"a data owner of a federated-averaging run does not accept {msg.KIND}",
                                      "wrong_role")
        await super().handle(msg)

    async def train_batch(self, round_: int, batch: int, index: torch.Tensor) -> float:
        ctx = self.ctx
        ctx.faults.reached(round_, batch)
        x, y = self.x_train[index], self.y_train[index]
        micros = min(ctx.plan.micro_batches, len(index))  # as the split batch is cut
        return await ctx.worker.run("local step", self.model.local_step, (round_, batch), x, y, micros,
                                    owner=ctx.me, round=round_, batch=batch)

    async def logits(self, round_: int, batch: int, x: torch.Tensor) -> torch.Tensor:
        """One test batch's logits, here."""
        ctx = self.ctx
        return await ctx.worker.run("evaluate", self.model.infer, x, owner=ctx.me, round=round_, batch=batch)


class Bystander:
    """A compute node of a federated-averaging run, or one the plan leaves out ([Note: the cost
    objective]): it trains nothing, takes part in each round's cut ([Note: the cut]) and writes an
    empty checkpoint, so resuming finds every peer's round."""

    stash_count = 0

    def __init__(self, ctx: Context, round_end: RoundEnd):
        self.ctx, self.round_end = ctx, round_end

    async def handle(self, msg: Routed) -> None:
        if isinstance(msg, Error):
            self.ctx.log.warning("%s reports %s: %s", msg.src, msg.code, msg.message)
            return
        raise RemoteProtocolError(f"{self.ctx.me} runs no layers of this plan and does not accept {msg.KIND}",
                                  "wrong_role")

    async def run_round(self, round_: int) -> None:
        ctx = self.ctx
        await self.round_end.decide(round_)
        await ctx.worker.run("checkpoint", checkpoint.save, ctx.out / "checkpoints", ctx.me, round_,
                             ctx.checkpoint_tag, {}, ctx.keep_checkpoints)
        ctx.status.round = round_

    def state(self, snapshot: bool = True) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore: its checkpoints are empty (`checkpoint_tag` keeps a split run's apart)."""
