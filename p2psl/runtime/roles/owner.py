"""The data-owner role: its data, its labels, the first and last parts, and its rounds.

Per batch (SPEC §1): part 0 forward → activation to the chain's first node; the last node's output
comes back; head + loss + backward here; gradient down the chain; the first node's gradient comes
back; part 0 backward. One batch in flight at a time ([Note: micro-batches] cuts it up). Labels and
raw inputs are used only in the torch calls on this peer; what leaves is part 0's output, the
gradient w.r.t. the head's input, this owner's own part weights (to other owners, for FedAvg) and
counts.

[Note: micro-batches] With the plan's `micro_batches = m` (`[training] micro_batches`, or the
planner's choice for "auto") an owner cuts each batch into m
micro-batches (`torch.tensor_split`: sizes differ by at most one sample; a batch of fewer than m
samples into one per sample) and sends them into the chain one after another, so c1 works on
micro-batch 2 while c2 works on micro-batch 1: the chain's stages overlap even when the owners are
too few to fill it. Each micro-batch's loss is weighted by its share of the batch's samples, every
holder adds the micro-batches' gradients up, and each part steps once, after the batch's last
micro-batch has gone through it (a compute node counts them: `micros` travels with each one), so
a step is the whole batch's step, to float rounding (sums in another order). Evaluation batches
are never cut. A compute node then holds, for a while, the gradients of every owner between its
first and last micro-batch, not of one owner at a time (`planning.memory` counts them). The cost
model predicts such a batch as a pipeline (`costmodel.micro_batched`), and the planner chooses the
cuts for that pipeline: with one owner, even stages, where whole batches leave every split tied.

Per round: local epochs of batches → `TrainDone` to every peer → the cut ([Note: the cut]) →
FedAvg of parts 0 and N+1 over the owners in the cut, as an all-reduce among them
([Note: the owners' all-reduce]) → checkpoint → evaluation of the test shard through the chain →
`EvalReport` to every peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import torch

from p2psl.wire import checkpoint
from p2psl.learning.allreduce import contiguous
from p2psl.learning.data import Dataset, OwnerShard, batch_order
from p2psl.errors import PeerTimeout, RemoteError, RemoteProtocolError
from p2psl.wire.messages import (Activation, Error, EvalReport, Gradient, ReducedPart, ReducePart, ReduceStatus,
                                 Routed, TrainDone)
from p2psl.learning.models import OwnerModel
from p2psl.runtime.roles.allreduce import OwnersAllReduce
from p2psl.runtime.roles.checks import check_batch, refuse_unless
from p2psl.runtime.roles.context import Context, Topic
from p2psl.runtime.roles.rounds import RoundEnd


class DataOwner:
    def __init__(self, ctx: Context, data: Dataset, shard: OwnerShard, round_end: RoundEnd):
        self.ctx, self.round_end = ctx, round_end
        plan = ctx.plan
        self.model = self.build_model(ctx)
        self.x_train, self.y_train = data.x_train[shard.train_idx], data.y_train[shard.train_idx]
        self.x_test, self.y_test = data.x_test[shard.test_idx], data.y_test[shard.test_idx]
        self.index = [o.name for o in ctx.topology.owners].index(ctx.me)
        path = plan.path(ctx.me)  # its own chain's ([Note: several chains])
        self.first_node, self.last_node = path[0].node, path[-1].node
        self.last_part = plan.num_parts - 1
        shapes = ctx.spec.output_shapes()
        self.cut_in = tuple(shapes[plan.owner_first[1] - 1])      # what part 0 sends / gets a gradient for
        self.cut_out = tuple(shapes[plan.owner_last[0] - 2])      # what the last node sends us
        self._pending: dict[tuple, asyncio.Future] = {}
        self.progress = (0, 0.0)  # batches done and their summed loss, this round
        self.aggregated = 0       # the last round this role averaged: later chunks of it are dropped
        self.allreduce = OwnersAllReduce(ctx, round_end.live_participants, self.model.state(snapshot=False))

    @staticmethod
    def build_model(ctx: Context) -> OwnerModel:
        """This owner's parts of the plan: part 0 and part N + 1."""
        return OwnerModel.from_plan(ctx.spec, ctx.plan, ctx.training.seed, ctx.optim, ctx.me, ctx.device)

    @property
    def samples(self) -> int:
        return len(self.y_train)

    @property
    def stash_count(self) -> int:
        """Batches whose activations are still held (zero between rounds, or something leaks)."""
        return self.model.first.stash_count + self.model.last.stash_count

    # -- inbound ---------------------------------------------------------------------------------
    async def handle(self, msg: Routed) -> None:
        """Check a message addressed to this owner and hand it to whoever waits for it."""
        if isinstance(msg, Activation):
            refuse_unless(msg.src == self.last_node and msg.part == self.last_part and msg.owner == self.ctx.me,
                        msg, f"only {self.last_node} sends this owner part {self.last_part}'s input")
            check_batch(msg.x, self.cut_out, msg, self.ctx.training)
            self._resolve(("out" if msg.train else "eval", msg.round, msg.batch, msg.micro), msg.x, msg)
        elif isinstance(msg, Gradient):
            refuse_unless(msg.src == self.first_node and msg.part == 0 and msg.owner == self.ctx.me,
                        msg, f"only {self.first_node} sends this owner the gradient of part 0")
            check_batch(msg.g, self.cut_in, msg, self.ctx.training)
            self._resolve(("grad", msg.round, msg.batch, msg.micro), msg.g, msg)
        elif isinstance(msg, (ReducePart, ReducedPart, ReduceStatus)):
            refuse_unless(msg.src in self.ctx.plan.owners, msg, "only data owners average their parts")
            if msg.round < self.aggregated or (msg.round == self.aggregated and not isinstance(msg, ReduceStatus)):
                self.ctx.log.debug("dropped %s's %s of round %d, already aggregated", msg.src, msg.KIND, msg.round)
                return
            await self.allreduce.receive(msg, set(self.ctx.plan.owners))
        elif isinstance(msg, Error):
            self.ctx.log.warning("%s refused our %s: %s (%s)", msg.src, msg.ref or "message", msg.message, msg.code)
            if msg.code == "training_error":  # our batch cannot pass that layer: waiting is pointless
                self.fail_pending(RemoteError(msg.src, msg.code, msg.message))
        else:
            raise RemoteProtocolError(f"a data owner does not accept {msg.KIND}", "wrong_role")

    def _resolve(self, key: tuple, value: torch.Tensor, msg: Routed) -> None:
        future = self._pending.pop(key, None)
        if future is None or future.done():
            raise RemoteProtocolError(f"unexpected {msg.KIND} for round {msg.round} batch {msg.batch}", "unexpected")
        future.set_result(value)

    def fail_pending(self, exc: Exception) -> None:
        """Fail every awaited activation and gradient. The batch awaits one of them and raises
        `exc`; the others are never awaited, so their exception is marked seen here (else asyncio
        logs each as never retrieved when it is collected)."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()
        self._pending.clear()

    def _expect(self, *key) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        return future

    async def _wait(self, future: asyncio.Future, what: str) -> torch.Tensor:
        try:
            async with asyncio.timeout(self.ctx.timeouts.request):
                return await future
        except TimeoutError:
            raise PeerTimeout(f"{self.ctx.me} waited {self.ctx.timeouts.request:g} s for {what}") from None

    # -- one batch -------------------------------------------------------------------------------
    async def train_batch(self, round_: int, batch: int, index: torch.Tensor) -> float:
        """One batch through the chain, cut into `micro_batches` micro-batches that follow each
        other through it ([Note: micro-batches]); every part steps once, after the last."""
        ctx = self.ctx
        ctx.faults.reached(round_, batch)
        pieces = torch.tensor_split(index, min(ctx.plan.micro_batches, len(index)))
        micros, ids = len(pieces), {"owner": ctx.me, "round": round_, "batch": batch}
        outs, grads = [], []
        for micro, piece in enumerate(pieces):
            h = await ctx.worker.run("forward", self.model.forward, (round_, batch, micro), self.x_train[piece], **ids,
                                     micro=micro)
            outs.append(self._expect("out", round_, batch, micro))
            grads.append(self._expect("grad", round_, batch, micro))
            await ctx.send(Activation(src=ctx.me, dst=self.first_node, epoch=ctx.epoch, owner=ctx.me, round=round_,
                                      batch=batch, part=1, train=True, x=h, micro=micro, micros=micros))
        loss = 0.0
        for micro, piece in enumerate(pieces):
            with ctx.tracer.span("wait for output", "wait", **ids):
                z = await self._wait(outs[micro], f"the output of {self.last_node} for batch {batch}")
            share = len(piece) / len(index) if micros > 1 else 1.0
            part_loss, g = await ctx.worker.run("loss+backward", self.model.loss_backward, (round_, batch, micro), z,
                                                self.y_train[piece], share, **ids)
            loss += part_loss * share
            await ctx.send(Gradient(src=ctx.me, dst=self.last_node, epoch=ctx.epoch, owner=ctx.me, round=round_,
                                    batch=batch, part=self.last_part - 1, g=g, micro=micro, micros=micros))
        await ctx.worker.run("optimize", self.model.last.step, **ids)
        for micro in range(micros):
            with ctx.tracer.span("wait for gradient", "wait", **ids):
                g0 = await self._wait(grads[micro], f"the gradient from {self.first_node} for batch {batch}")
            await ctx.worker.run("backward", self.model.backward, (round_, batch, micro), g0, **ids)
        await ctx.worker.run("optimize", self.model.first.step, **ids)
        return loss

    async def train(self, round_: int) -> tuple[int, float]:
        """This round's local epochs: (batches, sum of batch losses)."""
        ctx, cfg = self.ctx, self.ctx.training
        orders = [batch_order(self.samples, cfg.batch_size, cfg.seed, round_, epoch, self.index)
                  for epoch in range(cfg.local_epochs)]
        ctx.status.batches = sum(len(o) for o in orders)
        ctx.status.state, ctx.status.batch = "training", 0
        self.progress = (0, 0.0)
        try:
            for order in orders:
                for index in order:
                    batch = self.progress[0] + 1
                    loss = await self.train_batch(round_, batch, torch.from_numpy(index))
                    self.progress = (batch, self.progress[1] + loss)
                    ctx.status.batch, ctx.status.loss = batch, loss
        finally:
            self._pending.clear()
            self.model.first.drop_all()
            self.model.last.drop_all()
        return self.progress

    # -- one round -------------------------------------------------------------------------------
    async def run_round(self, round_: int) -> None:
        ctx = self.ctx
        started = time.monotonic()
        deciding = asyncio.ensure_future(self.round_end.decide(round_))
        training = asyncio.ensure_future(self.train(round_))
        try:
            await asyncio.wait({deciding, training}, return_when=asyncio.FIRST_COMPLETED)
            if training.done():
                batches, loss_sum = training.result()
                await self.share(round_, batches, loss_sum)
            else:  # the others cut the round without us (straggler policy "drop"), or deciding failed
                training.cancel()
                await asyncio.gather(training, return_exceptions=True)
                batches, loss_sum = self.progress
                if not deciding.cancelled() and deciding.exception() is None:
                    ctx.log.warning("round %d was aggregated without %s (too slow)", round_, ctx.me)
            included = await deciding
        finally:
            for task in (deciding, training):
                if not task.done():
                    task.cancel()
            await asyncio.gather(deciding, training, return_exceptions=True)
        included, digest = await self.aggregate(round_, included)
        correct, total, eval_loss = await self.evaluate(round_)
        ctx.status.accuracy = correct / total if total else None
        report = dict(epoch=ctx.epoch, owner=ctx.me, round=round_, correct=correct, total=total, loss_sum=eval_loss,
                      train_loss=loss_sum / max(batches, 1), samples=self.samples,
                      seconds=time.monotonic() - started, included=sorted(included), digest=digest)
        ctx.collector.put_nowait(Topic.EVAL_REPORT, round_, ctx.me, EvalReport(src=ctx.me, dst=ctx.me, **report))
        for peer in sorted(self.round_end.audience() - {ctx.me}):
            await ctx.send(EvalReport(src=ctx.me, dst=peer, **report))

    async def share(self, round_: int, batches: int, loss_sum: float) -> None:
        """TrainDone to everyone: its parts wait for the cut ([Note: the cut])."""
        ctx = self.ctx
        ctx.status.state = "aggregating"
        done = dict(epoch=ctx.epoch, owner=ctx.me, round=round_, samples=self.samples, batches=batches,
                    loss_sum=loss_sum)
        ctx.collector.put_nowait(Topic.TRAIN_DONE, round_, ctx.me, TrainDone(src=ctx.me, dst=ctx.me, **done))
        for peer in sorted(self.round_end.audience() - {ctx.me}):
            await ctx.send(TrainDone(src=ctx.me, dst=peer, **done))

    async def aggregate(self, round_: int, included: frozenset[str]) -> tuple[list[str], str]:
        """FedAvg of the included owners' parts by the owners' all-reduce; returns the owners it
        averaged (fewer if one was gone mid-way) and a digest of the result."""
        ctx = self.ctx
        await ctx.faults.at_aggregate(round_)  # a deliberate fault, if one waits here
        ctx.status.state = "aggregating"
        state = await ctx.worker.run("state", lambda: contiguous(self.model.state()))
        with ctx.tracer.span("all-reduce", "wait", round=round_):
            members, average = await self.allreduce.average(round_, included, state, self.samples)
        self.aggregated = round_
        await ctx.worker.run("load", self.model.load_state, average)
        # the live tensors: nothing trains until the checkpoint is written
        path = await ctx.worker.run("checkpoint", checkpoint.save, ctx.out / "checkpoints", ctx.me, round_,
                                    ctx.checkpoint_tag, self.state(snapshot=False), ctx.keep_checkpoints)
        ctx.status.checkpoint_bytes += path.stat().st_size
        await ctx.faults.at_end(round_)  # a deliberate fault, if one waits here
        return members, await ctx.worker.run("digest", state_digest, average)

    async def evaluate(self, round_: int) -> tuple[int, int, float]:
        """Accuracy and loss on this owner's test shard, without gradients."""
        ctx = self.ctx
        ctx.status.state = "evaluating"
        correct, loss_sum = 0, 0.0
        size = ctx.training.eval_batch_size
        for batch, start in enumerate(range(0, len(self.y_test), size), start=1):
            x, y = self.x_test[start:start + size], self.y_test[start:start + size]
            logits = await self.logits(round_, batch, x)
            correct += int((logits.argmax(dim=1) == y).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        return correct, len(self.y_test), loss_sum

    async def logits(self, round_: int, batch: int, x: torch.Tensor) -> torch.Tensor:
        """One test batch's logits, through the chain."""
        ctx = self.ctx
        h = await ctx.worker.run("evaluate", self.model.embed, x, owner=ctx.me, round=round_, batch=batch)
        out = self._expect("eval", round_, batch, 0)
        await ctx.send(Activation(src=ctx.me, dst=self.first_node, epoch=ctx.epoch, owner=ctx.me, round=round_,
                                  batch=batch, part=1, train=False, x=h))
        z = await self._wait(out, f"the evaluation output for test batch {batch}")
        return await ctx.worker.run("evaluate", self.model.predict, z, owner=ctx.me, round=round_)

    # -- state -----------------------------------------------------------------------------------
    def state(self, snapshot: bool = True) -> dict[str, torch.Tensor]:
        """Weights and momentum of both parts: clones, or the live tensors (`Part.state`)."""
        return {**{f"model/{k}": v for k, v in self.model.state(snapshot).items()},
                **{f"optim/{k}": v for k, v in self.model.optimizer_state(snapshot).items()}}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's state (`--resume`, or the round restored after a failure)."""
        self.model.load_state({k[6:]: v for k, v in state.items() if k.startswith("model/")})
        self.model.load_optimizer_state({k[6:]: v for k, v in state.items() if k.startswith("optim/")})


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A fingerprint of a state dict: equal states on two peers give equal digests."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()
