"""The compute-node role: one copy of its segment per data owner, serving whoever is ready.

[Note: backward first] Tasks wait in one priority queue: optimizer steps (0), then backward (1),
then aggregation (2), then forward (3). Running a ready backward before any forward frees its
stashed activations soonest and returns the gradient to the owner, whose next batch cannot start
before it; forward work of other owners fills the gaps. The optimizer step queued right after a
backward runs before anything else, so one owner's gradients at most exist at a time (memory is
K copies of weights and momentum plus one set of gradients, whatever the timing; with
micro-batches the step waits for a batch's last one, [Note: micro-batches]), and it always
runs before that owner's next forward reaches this node.

Round end: once the cut is known ([Note: the cut]), the copies are replaced by the FedAvg of the
included owners' copies (weighted by their samples), every stash left by an owner cut out of the
round is dropped, and the state is checkpointed and replicated to the next node of the chain, so
it survives this node ([Note: replicas] in p2psl.runtime.recovery). An evaluation batch of round r waits
until that aggregation is done, so owners always evaluate the aggregated model; a training task
of a round already aggregated is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import torch

from p2psl.wire import checkpoint
from p2psl.errors import RemoteProtocolError, TrainingError
from p2psl.wire.messages import Activation, ChainPart, Error, Gradient, Replica, Routed
from p2psl.learning.models import CopySet
from p2psl.runtime.recovery import replica_holder, replicas_dir
from p2psl.runtime.roles.checks import check_batch, refuse_unless
from p2psl.runtime.roles.context import Context, Topic
from p2psl.runtime.roles.rounds import RoundEnd

OPTIMIZE, BACKWARD, AGGREGATE, FORWARD = 0, 1, 2, 3


@dataclass(order=True)
class Task:
    priority: int
    seq: int
    kind: str = field(compare=False)
    owner: str = field(compare=False, default="")
    round: int = field(compare=False, default=0)
    batch: int = field(compare=False, default=0)
    tensor: torch.Tensor | None = field(compare=False, default=None)
    train: bool = field(compare=False, default=True)
    micro: int = field(compare=False, default=0)
    micros: int = field(compare=False, default=1)
    included: frozenset = field(compare=False, default=frozenset())


class ComputeNode:
    def __init__(self, ctx: Context, round_end: RoundEnd):
        self.ctx, self.round_end = ctx, round_end
        plan = ctx.plan
        self.part = plan.part_of(ctx.me)
        self.layers = list(plan.part_layers(self.part))
        self.copies = CopySet(ctx.spec, self.layers, plan.owners_of(ctx.me), ctx.training.seed, ctx.optim,
                              name=ctx.me, device=ctx.device)
        shapes = ctx.spec.output_shapes()
        #: the part's state entries and their shapes, which a `chain_part` must have ([Note: several chains])
        self._entries = {k: tuple(v.shape) for k, v in self.copies.copy(self.copies.owners[0]).state(snapshot=False).items()}
        self.in_shape = tuple(shapes[self.layers[0] - 1])
        self.out_shape = tuple(shapes[self.layers[-1]])
        # Unbounded on purpose: every task comes from a message `handle` checked (one batch in
        # flight per owner, duplicates refused), so it holds at most two tasks per owner, plus
        # the optimizer steps they cause; bounding it would stall the network reader instead.
        self.queue: asyncio.PriorityQueue[Task] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self.aggregated = ctx.start_round       # last round whose aggregation is done
        self._aggregated = asyncio.Event()
        self._deferred: list[Task] = []         # evaluation batches waiting for that aggregation
        self._replica: dict | None = None       # the aggregated state, on its way to the replica holder
        self._forward_seen: set[tuple] = set()      # (owner, round, batch, micro) of this round's forward passes
        self._backward_queued: set[tuple] = set()   # ... and of the backward passes queued
        self._backward_done: dict[tuple, int] = {}  # (owner, round, batch) → its micro-batches backpropagated
        self._micros: dict[tuple, int] = {}         # (owner, round, batch) → the micro-batches it is cut into

    @property
    def stash_count(self) -> int:
        return self.copies.stash_count

    # -- inbound ---------------------------------------------------------------------------------
    async def handle(self, msg: Routed) -> None:
        """Check a message addressed to this node and queue the work it asks for."""
        plan = self.ctx.plan
        if isinstance(msg, Activation):
            self._check_owner(msg)
            expected = plan.holder(self.part - 1, msg.owner)
            refuse_unless(msg.part == self.part and msg.src == expected, msg,
                        f"part {self.part}'s input for {msg.owner} comes from {expected}")
            check_batch(msg.x, self.in_shape, msg, self.ctx.training)
            self._check_micro(msg)
            if msg.train and msg.round != self.aggregated + 1:
                raise RemoteProtocolError(f"training batch of round {msg.round} while round "
                                          f"{self.aggregated + 1} is in progress", "stale_round")
            if msg.train and ((msg.owner, msg.round, msg.batch, msg.micro) in self._forward_seen):
                raise RemoteProtocolError(f"{msg.owner}'s batch {msg.batch} of round {msg.round} arrived twice",
                                          "duplicate")
            if msg.train:
                self._forward_seen.add((msg.owner, msg.round, msg.batch, msg.micro))
                self._micros.setdefault((msg.owner, msg.round, msg.batch), msg.micros)
            self._put(Task(FORWARD, next(self._seq), "forward", msg.owner, msg.round, msg.batch, msg.x, msg.train,
                           micro=msg.micro, micros=msg.micros))
        elif isinstance(msg, Gradient):
            self._check_owner(msg)
            expected = plan.holder(self.part + 1, msg.owner)
            refuse_unless(msg.part == self.part and msg.src == expected, msg,
                        f"part {self.part}'s gradient for {msg.owner} comes from {expected}")
            check_batch(msg.g, self.out_shape, msg, self.ctx.training)
            self._check_micro(msg)
            if not self.copies.copy(msg.owner).has_stash((msg.round, msg.batch, msg.micro)) or \
                    (msg.owner, msg.round, msg.batch, msg.micro) in self._backward_queued:
                raise RemoteProtocolError(f"gradient for {msg.owner}'s batch {msg.batch} of round {msg.round} "
                                          "without a pending forward pass", "unexpected")
            self._backward_queued.add((msg.owner, msg.round, msg.batch, msg.micro))
            self._put(Task(BACKWARD, next(self._seq), "backward", msg.owner, msg.round, msg.batch, msg.g,
                           micro=msg.micro, micros=msg.micros))
        elif isinstance(msg, Replica):
            refuse_unless(msg.src == msg.node and msg.src in plan.nodes and replica_holder(plan, msg.src) == self.ctx.me,
                        msg, f"{self.ctx.me} keeps no replica for {msg.src}")
            path = await self.ctx.worker.run("store replica", checkpoint.save, replicas_dir(self.ctx.out, msg.node),
                                             msg.node, msg.round, msg.plan, msg.state, self.ctx.keep_checkpoints)
            self.ctx.status.checkpoint_bytes += path.stat().st_size
        elif isinstance(msg, ChainPart):
            self._check_chain_part(msg)
            self.ctx.collector.put_nowait(Topic.CHAIN_PART, msg.round, msg.src, msg)
        elif isinstance(msg, Error):
            self.ctx.log.warning("%s reports %s: %s", msg.src, msg.code, msg.message)
        else:
            raise RemoteProtocolError(f"a compute node does not accept {msg.KIND}", "wrong_role")

    def _check_owner(self, msg) -> None:
        if msg.owner not in self.copies.owners:
            chain = " on this node's chain" if self.ctx.plan.chains > 1 and msg.owner in self.ctx.plan.owners else ""
            raise RemoteProtocolError(f"{msg.owner!r} is not a data owner of this plan{chain}", "wrong_role")

    def _check_chain_part(self, msg: ChainPart) -> None:
        """From the node of another chain that runs this part, for a round in progress, with every
        entry of the part in float64 ([Note: several chains])."""
        plan = self.ctx.plan
        peers = set(plan.peers_at(self.ctx.me)) - {self.ctx.me}
        refuse_unless(msg.src in peers and msg.part == self.part, msg,
                      f"part {self.part}'s chain sums come from {', '.join(sorted(peers)) or 'nobody'}")
        if msg.round <= self.aggregated:
            raise RemoteProtocolError(f"chain sum of round {msg.round}, already aggregated", "stale_round")
        like = self._entries
        wrong = sorted(k for k in set(like) | set(msg.state) if k not in like or k not in msg.state
                       or msg.state[k].dtype != torch.float64 or tuple(msg.state[k].shape) != like[k])
        if wrong:
            raise RemoteProtocolError(f"chain sum entries {wrong[:3]} are missing, unknown or not float64 of "
                                      "the part's shapes", "bad_tensor")

    def _check_micro(self, msg: Activation | Gradient) -> None:
        """A micro-batch of a batch cut into at most `micro_batches` ([Note: micro-batches]);
        evaluation batches are never cut."""
        train = getattr(msg, "train", True)
        most = self.ctx.plan.micro_batches if train else 1
        if not 0 <= msg.micro < msg.micros <= most:
            raise RemoteProtocolError(f"micro-batch {msg.micro} of {msg.micros}: a batch is cut into 1 to {most}",
                                      "unexpected")
        known = self._micros.get((msg.owner, msg.round, msg.batch)) if train else None
        if known is not None and msg.micros != known:
            raise RemoteProtocolError(f"{msg.owner}'s batch {msg.batch} of round {msg.round} was cut into {known} "
                                      f"micro-batches, not {msg.micros}", "unexpected")

    def _put(self, task: Task) -> None:
        self.queue.put_nowait(task)

    # -- the worker loop -------------------------------------------------------------------------
    async def serve(self) -> None:
        """Run tasks until cancelled by the peer."""
        while True:
            task = await self.queue.get()
            if task.kind == "forward" and not task.train and task.round > self.aggregated:
                self._deferred.append(task)
                continue
            if task.kind in ("forward", "backward", "optimize") and task.train and task.round <= self.aggregated:
                continue  # left over from an owner cut out of a round already aggregated
            self.ctx.status.state = task.kind
            self.ctx.faults.reached(task.round, task.batch)
            try:
                await getattr(self, "_" + task.kind)(task)
            except TrainingError as exc:
                if task.kind == "aggregate":
                    raise
                await self._refuse(task, exc)

    async def _forward(self, task: Task) -> None:
        ctx, copy = self.ctx, self.copies.copy(task.owner)
        ids = {"owner": task.owner, "round": task.round, "batch": task.batch}
        if task.train:
            y = await ctx.worker.run("forward", copy.forward_train, (task.round, task.batch, task.micro), task.tensor,
                                     **ids, micro=task.micro)
        else:
            y = await ctx.worker.run("evaluate", copy.forward_eval, task.tensor, **ids)
        await ctx.send(Activation(src=ctx.me, dst=ctx.plan.holder(self.part + 1, task.owner), epoch=ctx.epoch,
                                  owner=task.owner, round=task.round, batch=task.batch, part=self.part + 1,
                                  train=task.train, x=y, micro=task.micro, micros=task.micros))

    async def _backward(self, task: Task) -> None:
        ctx, copy = self.ctx, self.copies.copy(task.owner)
        ids = {"owner": task.owner, "round": task.round, "batch": task.batch}
        g = await ctx.worker.run("backward", copy.backward, (task.round, task.batch, task.micro), task.tensor, **ids)
        await ctx.send(Gradient(src=ctx.me, dst=ctx.plan.holder(self.part - 1, task.owner), epoch=ctx.epoch,
                                owner=task.owner, round=task.round, batch=task.batch, part=self.part - 1, g=g,
                                micro=task.micro, micros=task.micros))
        batch = (task.owner, task.round, task.batch)
        done = self._backward_done[batch] = self._backward_done.get(batch, 0) + 1
        if done == task.micros:  # the batch's gradients are all added up: step ([Note: micro-batches])
            del self._backward_done[batch]
            self._put(Task(OPTIMIZE, next(self._seq), "optimize", task.owner, task.round, task.batch))
            ctx.status.batch += 1

    async def _refuse(self, task: Task, exc: TrainingError) -> None:
        """A task that cannot run (its input does not fit a layer): tell whoever sent it."""
        ctx = self.ctx
        ctx.log.warning("%s of %s's batch %d failed: %s", task.kind, task.owner, task.batch, exc)
        source = ctx.plan.holder(self.part - 1 if task.kind == "forward" else self.part + 1, task.owner)
        await ctx.send(Error(src=ctx.me, dst=source, code="training_error", message=str(exc)[:500],
                                    ref="activation" if task.kind == "forward" else "gradient"))

    async def _optimize(self, task: Task) -> None:
        copy = self.copies.copy(task.owner)
        await self.ctx.worker.run("optimize", copy.step, owner=task.owner, round=task.round, batch=task.batch)

    async def _aggregate(self, task: Task) -> None:
        ctx = self.ctx
        await ctx.faults.at_aggregate(task.round)  # a deliberate fault, if one waits here
        done = ctx.collector.get(Topic.TRAIN_DONE, task.round)
        weights = {owner: float(done[owner].samples) for owner in sorted(task.included)}
        if ctx.plan.chains > 1:
            await self._average_chains(weights, task.round)
        else:
            await ctx.worker.run("aggregate", self._average, weights, round=task.round)
        self._forward_seen.clear()
        self._backward_queued.clear()
        self._backward_done.clear()
        self._micros.clear()
        # the live tensors: the worker writes them before it runs the next round's first task
        path = await ctx.worker.run("checkpoint", checkpoint.save, ctx.out / "checkpoints", ctx.me, task.round,
                                    ctx.checkpoint_tag, self.state(snapshot=False), ctx.keep_checkpoints)
        ctx.status.checkpoint_bytes += path.stat().st_size
        if replica_holder(ctx.plan, ctx.me) is not None:  # before any task of the next round can run
            self._replica = await ctx.worker.run("snapshot", self.replica_state)
        if ctx.faults.due_at_end(task.round):  # a deliberate fault right here: the replica goes first
            await self._send_replica(task.round)
            await ctx.faults.at_end(task.round)
        self.aggregated = task.round
        self._aggregated.set()
        for deferred in self._deferred:
            self._put(deferred)
        self._deferred.clear()

    def _average(self, weights: dict[str, float]) -> None:
        for owner in self.copies.owners:
            self.copies.copy(owner).drop_all()  # stashes of owners cut out of the round
        self.copies.average(weights)

    def _chain_sum(self, weights: dict[str, float]) -> dict[str, torch.Tensor]:
        for owner in self.copies.owners:
            self.copies.copy(owner).drop_all()
        return self.copies.chain_sum(weights)

    async def _average_chains(self, weights: dict[str, float], round_: int) -> None:
        """[Note: several chains]: this chain's weighted sum to the nodes of the other chains that
        run this part, theirs from them, and every copy set to the sum of all, added in chain
        order: the same bits on every such node."""
        ctx = self.ctx
        peers = ctx.plan.peers_at(ctx.me)
        mine = await ctx.worker.run("chain sum", self._chain_sum, weights, round=round_)
        for peer in peers:
            if peer != ctx.me:
                await ctx.send(ChainPart(src=ctx.me, dst=peer, epoch=ctx.epoch, round=round_, part=self.part,
                                         state=mine))
        with ctx.tracer.span("wait for chain sums", "wait", round=round_):
            parts = await ctx.collector.gather(Topic.CHAIN_PART, round_, set(peers) - {ctx.me}, ctx.timeouts.request,
                                               f"every chain's node of part {self.part} sends its sum")
        sums = [mine if peer == ctx.me else parts[peer].state for peer in peers]
        await ctx.worker.run("aggregate", self.copies.load_chains_average, sums, round=round_)

    # -- one round -------------------------------------------------------------------------------
    async def run_round(self, round_: int) -> None:
        """The cut, the aggregation (run by the task loop), then a replica for the neighbour."""
        ctx = self.ctx
        included = await self.round_end.decide(round_)
        self._aggregated.clear()
        self._put(Task(AGGREGATE, next(self._seq), "aggregate", round=round_, included=included))
        while self.aggregated < round_:
            await self._aggregated.wait()
            self._aggregated.clear()
        ctx.status.round = round_
        await self._send_replica(round_)

    async def _send_replica(self, round_: int) -> None:
        ctx, holder = self.ctx, replica_holder(self.ctx.plan, self.ctx.me)
        if holder is not None and self._replica is not None:
            state, self._replica = self._replica, None
            await ctx.send(Replica(src=ctx.me, dst=holder, node=ctx.me, round=round_, plan=ctx.plan.digest, state=state))

    # -- state -----------------------------------------------------------------------------------
    def state(self, snapshot: bool = True) -> dict[str, torch.Tensor]:
        """Every copy's weights and momentum, keyed "<owner>/model/…" and "<owner>/optim/…";
        clones (a replica is sent while the next round trains), or the live tensors."""
        out = {}
        for owner in self.copies.owners:
            copy = self.copies.copy(owner)
            out.update({f"{owner}/model/{k}": v for k, v in copy.state(snapshot).items()})
            out.update({f"{owner}/optim/{k}": v for k, v in copy.optimizer_state(snapshot).items()})
        return out

    def replica_state(self) -> dict[str, torch.Tensor]:
        """`state()` as the replica's snapshot, taken right after FedAvg: every copy then has the
        same weights, so they are cloned once and shared by every owner's keys (the wire still
        carries them once per owner); the momentum is cloned copy by copy. K + 1 copies of the
        parameters instead of 2K, while the next round trains."""
        owners = self.copies.owners
        weights = self.copies.copy(owners[0]).state()
        out = {}
        for owner in owners:
            out.update({f"{owner}/model/{k}": v for k, v in weights.items()})
            out.update({f"{owner}/optim/{k}": v for k, v in self.copies.copy(owner).optimizer_state().items()})
        return out

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for owner in self.copies.owners:
            copy = self.copies.copy(owner)
            prefix_m, prefix_o = f"{owner}/model/", f"{owner}/optim/"
            copy.load_state({k[len(prefix_m):]: v for k, v in state.items() if k.startswith(prefix_m)})
            copy.load_optimizer_state({k[len(prefix_o):]: v for k, v in state.items() if k.startswith(prefix_o)})
