"""One peer's life, with no master anywhere (SPEC §3).

    start     listen on this peer's address (returns once listening), dial neighbours
    connect   wait for every neighbour, reporting who is missing and why
    greet     a `Greeting` to every peer: role, data shape and size, round completed (resume)
    agree     flood profiles, run the deterministic planner, compare plan digests
    train     rounds of the role; every peer collects every owner's `EvalReport` per round
    finish    outputs written, `Done` to every live peer, wait for theirs, close

Failures ([Note: recovery] in p2psl.runtime.recovery): a neighbour whose link stays down for
`timeouts.gone` is declared gone and every live peer is told (`Gone`). A data owner gone is left
out of the round's cut; a compute node gone makes every live peer stop the round, re-plan over
the survivors, restore the last complete round and train on.

Messages that arrive before this peer is ready for them (a fast owner's first batch while this
node still builds its copies, or a message of the next epoch during a recovery) wait in a bounded
buffer and are replayed once the role exists; messages of an older epoch are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from p2psl.wire import checkpoint
from p2psl.runtime import rejoin
from p2psl.runtime import replan
from p2psl.runtime.agreement import agree_on_plan, dataset_facts
from p2psl.learning.data import load_dataset, shard
from p2psl.errors import (ConfigError, NotAdmitted, P2PSLError, PeerTimeout, RemoteProtocolError, TrainingError)
from p2psl.runtime.faults import Faults
from p2psl.wire.messages import (Abort, Adopt, Cut, Done, Error, EvalReport, Gone, Greeting, JoinInfo, Joining, PlanProposal,
                            ProfileShare, Routed, StateTransfer, TrainDone)
from p2psl.runtime.metrics import MetricsFile, peak_rss_bytes, reset_peak_rss, round_record, rss_bytes
from p2psl.learning.models import OptimConfig, model_spec
from p2psl.net.network import Network
from p2psl.runtime.roles.compute import ComputeNode
from p2psl.runtime.roles.context import Collector, Context, Status
from p2psl.runtime.roles.owner import DataOwner
from p2psl.runtime.roles.rounds import RoundEnd
from p2psl.runtime.replan import TRAINING_TOPICS
from p2psl.topology import DATA_OWNER, Topology
from p2psl.runtime.trace import Tracer, write_json_atomic
from p2psl.runtime.worker import Outbox, TorchWorker

EARLY_LIMIT = 10_000
STARTUP_KINDS = ("greeting", "profile", "done")


def warm_up() -> None:
    """One tiny training step of the layer kinds the models use, on the CPU, before the idle
    reading ([Note: idle baseline]); the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        _warm_up_step()


def _warm_up_step() -> None:
    with torch.device("meta"):
        layer = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2), torch.nn.Flatten())
        layer(torch.empty(1, 1, 8, 8))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(16, 3))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 2]))
    loss.backward()
    sgd.step()


class _Recover(Exception):
    """Raised inside the training loop when a compute node is gone: re-plan and restore."""


@dataclass(frozen=True)
class PeerOptions:
    out: Path
    resume: bool = False
    torch_threads: int = 1
    addresses: dict | None = None     # name → (host, port) overrides (tests bind port 0)
    trace: bool = True


class Peer:
    def __init__(self, topology: Topology, name: str, secret: bytes, options: PeerOptions):
        if name not in topology.names:
            raise ConfigError(f"no peer named {name!r} in {topology.source} (peers: {', '.join(topology.names)})")
        self.topology, self.me, self.options = topology, name, options
        self.spec_peer = topology.peer(name)
        self.out = Path(options.out)
        self.log = logging.LoggerAdapter(logging.getLogger("p2psl.runtime.peer"), {"peer": name})
        self.status = Status(name, self.spec_peer.role, rounds=topology.training.rounds)
        self.tracer = Tracer(name, options.trace)
        self.collector = Collector()
        self.network = Network(topology, name, secret, self._on_message, log=self.log, on_peer=self._on_link,
                               addresses=options.addresses, status=self.status_json)
        self.worker = TorchWorker(self.tracer, self.spec_peer.speed)
        self.outbox = Outbox(self.send, self.tracer, self.log, self._send_failed)
        self.faults = Faults(cut=self.network.cut)
        self.metrics = MetricsFile(self.out / "metrics.jsonl")
        self.role: DataOwner | ComputeNode | None = None
        self.plan = None
        self.epoch = 0
        self.next_round = 1
        self.gone: set[str] = set()
        self.gone_timers: dict[str, asyncio.TimerHandle] = {}
        self._held: list[Routed] = []
        self._aborted: asyncio.Future | None = None
        self.recovery_needed = asyncio.Event()
        self.idle_rss = 0
        self.joiners: dict[str, int | None] = {}  # owner → round it trains from (None: not yet)
        self.too_late = False

    # -- status ----------------------------------------------------------------------------------
    def status_json(self) -> dict:
        return self.status.to_json(rss_bytes=rss_bytes(), peak_rss_bytes=peak_rss_bytes(),
                                   idle_rss_bytes=self.idle_rss or None,
                                   bytes_sent=self.network.bytes_sent, bytes_received=self.network.bytes_received,
                                   busy_seconds=self.worker.busy_seconds, epoch=self.epoch, gone=sorted(self.gone),
                                   plan=self.plan.to_json() if self.plan else None)

    def say(self, state: str, detail: str = "") -> None:
        self.status.state, self.status.detail = state, detail
        if detail:
            self.log.info("%s", detail)

    def live_peers(self) -> set[str]:
        return set(self.topology.names) - self.gone

    def audience(self) -> set[str]:
        """Whom round messages go to: the live peers, and owners that announced their rejoining
        ([Note: rejoining]), who listen to a round before they are counted in it."""
        return self.live_peers() | {name for name, start in self.joiners.items() if start is not None}

    def live_participants(self) -> set[str]:
        return set(self.plan.owners) - self.gone if self.plan else set()

    # -- the whole life --------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until training completes; raises a P2PSLError if it cannot."""
        torch.set_num_threads(self.options.torch_threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self._aborted = asyncio.get_running_loop().create_future()
        try:
            await self.network.listen()
            # [Note: idle baseline] torch and the runtime are loaded, no model yet: what this peer
            # weighs before its share of the work, so memory can be reported above it. Sizing a
            # layer on the meta device loads what torch imports lazily (shape tracing pulls in
            # sympy, ~80 MB), and one tiny training step on the CPU maps and initialises its
            # kernels (~55 MB): costs of any model's first step, not of this model's size.
            await self.worker.run("warm up", warm_up)
            self.idle_rss = rss_bytes()
            reset_peak_rss()
            self.network.connect()
            await self._until_aborted(self._life())
        finally:
            for timer in self.gone_timers.values():
                timer.cancel()
            await self.outbox.close()
            await self.network.stop()
            self.worker.close()

    async def _until_aborted(self, coro) -> None:
        """Run `coro`, but stop at once if any peer broadcasts an Abort."""
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.wait({task, self._aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.done() and not task.cancelled():
            task.result()  # our own outcome first: it says more than another peer's abort
        if self._aborted.done():
            raise self._aborted.exception()

    async def _life(self) -> None:
        self.say("connecting", f"waiting for {', '.join(self.network.neighbours) or 'nobody'}")
        self.data, self.greeting = self._prepare()
        greeting = asyncio.ensure_future(self._send_greetings())
        try:
            started = asyncio.ensure_future(self._gather_greetings())
            joined = asyncio.ensure_future(self.collector.wait_any("join_info", 0, self.topology.timeouts.start))
            try:
                done, _ = await asyncio.wait({started, joined}, return_when=asyncio.FIRST_COMPLETED)
                rejoining = joined in done and joined.exception() is None
                greetings = None if rejoining else await started
            finally:
                for task in (started, joined):
                    task.cancel()
                await asyncio.gather(started, joined, return_exceptions=True)
            if rejoining:
                await rejoin.join(self)
            else:
                await self._agree(greetings)
        except NotAdmitted:
            raise  # our problem alone: the others train on
        except P2PSLError as exc:
            await self._broadcast_abort(exc)
            raise
        finally:
            greeting.cancel()
            await asyncio.gather(greeting, return_exceptions=True)
        if self.too_late:
            await self._finish()
            return
        try:
            await self._train()
        except P2PSLError as exc:
            await self._broadcast_abort(exc)
            raise
        await self._finish()

    # -- greeting and agreement -------------------------------------------------------------------
    def _prepare(self):
        """This peer's data (an owner's) and the greeting that describes it."""
        cfg, data = self.topology.training, None
        facts: dict = {}
        if self.spec_peer.role == DATA_OWNER:
            data = load_dataset(cfg)
            self.shards = shard(data, [o.name for o in self.topology.owners], cfg.partition, cfg.alpha, cfg.seed)
            mine = self.shards[self.me]
            facts = {"input_shape": list(data.input_shape), "num_classes": data.num_classes,
                     "train": len(mine.train_idx), "test": len(mine.test_idx)}
        completed = checkpoint.rounds(self.out / "checkpoints")[-1:] if self.options.resume else []
        return data, dict(role=self.spec_peer.role, completed_round=completed[0] if completed else 0,
                          resume=self.options.resume, dataset=facts)

    async def _send_greetings(self) -> None:
        """A greeting to every peer, each sent as soon as its way is up (all at once, so a peer
        that is gone for good holds up nobody)."""
        async def one(peer: str) -> None:
            try:
                await self.send(Greeting(src=self.me, dst=peer, **self.greeting), self.topology.timeouts.connect)
            except PeerTimeout as exc:
                self.log.warning("could not greet %s: %s", peer, exc)
        await asyncio.gather(*(one(p) for p in self._others()))

    async def _gather_greetings(self) -> dict[str, Greeting]:
        await self.network.wait_connected(status=lambda text: self.say("connecting", text))
        self.say("greeting", "greeting every peer")
        greetings = await self.collector.gather("greeting", 0, set(self._others()), self.topology.timeouts.start,
                                                "every peer greets every other at start-up")
        greetings[self.me] = Greeting(src=self.me, dst=self.me, **self.greeting)
        return greetings

    async def _agree(self, greetings: dict[str, Greeting]) -> None:
        cfg = self.topology.training
        input_shape, num_classes, self.samples = dataset_facts(self.topology, greetings)
        self.model = model_spec(cfg.model, input_shape, num_classes)
        self.say("planning", "agreeing on a plan")
        self.plan, self.profiles = await agree_on_plan(self, self.model, self.samples)
        self.first_plan = self.plan
        start = self._resume_round(greetings)
        state = None
        if start:
            replica = await self.worker.run("restore", checkpoint.load, self.out / "checkpoints", start)
            if replica.plan != self.plan.digest:
                raise ConfigError(f"the checkpoint of round {start} belongs to another plan; "
                                  "resume with the same topology, or start afresh without --resume")
            state = replica.state
            self.log.info("resuming from the checkpoint of round %d", start)
        await self.become(start, state)

    def _resume_round(self, greetings: dict[str, Greeting]) -> int:
        flags = {g.resume for g in greetings.values()}
        if len(flags) > 1:
            fresh = sorted(n for n, g in greetings.items() if not g.resume)
            raise ConfigError(f"some peers resume and others start afresh ({', '.join(fresh)}): "
                              "start every peer with --resume, or none")
        if not self.options.resume:
            return 0
        start = min(g.completed_round for g in greetings.values())
        if start and start not in checkpoint.rounds(self.out / "checkpoints"):
            raise ConfigError(f"the peers can resume from round {start} but {self.me} has no checkpoint for it")
        return start

    async def become(self, start: int, state: dict | None) -> None:
        """Build this peer's role for the current plan, restored to the end of round `start`."""
        write_json_atomic(self.out / "plan.json", self.plan.to_json())
        cfg = self.topology.training
        self.ctx = Context(self.topology, self.me, self.plan, self.model, OptimConfig.from_training(cfg), self.send,
                           self.outbox, self.worker, self.tracer, self.log, self.out, self.status, self.collector,
                           start, self.faults, self.epoch)
        round_end = RoundEnd(self.ctx, self.live_participants, self.live_peers, self.audience)
        self.say("building", f"building parts of plan {self.plan.digest[:12]} (epoch {self.epoch})")
        if self.spec_peer.role == DATA_OWNER:
            role = await self.worker.run("build", DataOwner, self.ctx, self.data, self.shards[self.me], round_end)
        else:
            role = await self.worker.run("build", ComputeNode, self.ctx, round_end)
        if state:
            await self.worker.run("restore", role.restore, state)
        self.next_round = start + 1
        self.role = role
        held, self._held = self._held, []
        for msg in held:
            await self._replay(msg)

    # -- training --------------------------------------------------------------------------------
    async def _train(self) -> None:
        while True:
            try:
                await self._run_epoch()
                return
            except _Recover:
                await replan.recover(self)

    async def _run_epoch(self) -> None:
        """Train rounds under the current plan; raise _Recover when a compute node is gone."""
        rounds = asyncio.ensure_future(self._rounds())
        serve = asyncio.ensure_future(self.role.serve()) if isinstance(self.role, ComputeNode) else None
        recovery = asyncio.ensure_future(self.recovery_needed.wait())
        tasks = {rounds, recovery} | ({serve} if serve else set())
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if recovery.done():
                raise _Recover()
            if serve is not None and serve.done():
                serve.result()  # re-raises what stopped the task loop
                raise TrainingError(f"{self.me}'s task loop stopped unexpectedly")
            rounds.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _rounds(self) -> None:
        cfg = self.topology.training
        while self.next_round <= cfg.rounds:
            round_ = self.next_round
            rejoin.admit_joiners(self)
            self.status.round = round_
            self.say("training", f"round {round_} of {cfg.rounds}" + (f" (epoch {self.epoch})" if self.epoch else ""))
            await self.role.run_round(round_)
            with self.tracer.span("wait for reports", "wait", round=round_):
                reports = await self.collector.gather("eval_report", round_, self.live_participants,
                                                      self.topology.timeouts.round, "every owner reports its evaluation")
            self._check_reports(round_, reports)
            self._record(round_, reports)
            await rejoin.hand_over(self, round_)
            self.collector.forget(TRAINING_TOPICS, before=round_)
            self.next_round = round_ + 1

    def _check_reports(self, round_: int, reports: dict[str, EvalReport]) -> None:
        views = {(tuple(r.included), r.digest) for r in reports.values()}
        if len(views) > 1:
            raise TrainingError(f"round {round_}: the owners aggregated different states "
                                f"({'; '.join(f'{n}: {r.included}' for n, r in reports.items())})")

    def _record(self, round_: int, reports: dict[str, EvalReport]) -> None:
        record = round_record(round_, list(reports.values()), self.plan.round_seconds)
        record["epoch"] = self.epoch
        record["aggregated"] = next(iter(reports.values())).included
        self.metrics.write(record)
        self.metrics.write({"event": "peer_round", "name": self.me, "round": round_, "rss_bytes": rss_bytes(),
                            "stashed": self.role.stash_count})
        self.status.accuracy, self.status.loss = record["test_accuracy"], record["train_loss"]
        self.log.info("round %d: test accuracy %.4f, train loss %.4f, %.1f s", round_,
                      record["test_accuracy"] or 0.0, record["train_loss"] or 0.0, record["seconds"] or 0.0)

    # -- failures --------------------------------------------------------------------------------
    def _on_link(self, name: str, up: bool, reason: str) -> None:
        """Link events from the network: a link down for `timeouts.gone` means the peer is gone."""
        timer = self.gone_timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        if up and reason == "restarted" and self.plan is not None:
            self.declare_gone(name, "it restarted and lost its state")
        elif not up and reason != "said bye" and self.plan is not None and (name not in self.gone
                                                                             or name in self.joiners):
            loop = asyncio.get_running_loop()
            self.gone_timers[name] = loop.call_later(self.topology.timeouts.gone, self.declare_gone, name,
                                                      f"unreachable for {self.topology.timeouts.gone:g} s ({reason})")

    def declare_gone(self, name: str, reason: str) -> None:
        if name in self.joiners and name in self.gone:  # an owner that was coming back left again
            del self.joiners[name]
            self.log.warning("%s, which was rejoining, is gone again: %s", name, reason)
            for peer in sorted(self.live_peers() - {self.me}):
                self.outbox.post_nowait(Gone(src=self.me, dst=peer, peer=name, reason=reason))
            return
        if name in self.gone or name == self.me:
            return
        self.gone.add(name)
        self.log.warning("%s is gone: %s", name, reason)
        for peer in sorted(self.live_peers() - {self.me}):
            self.outbox.post_nowait(Gone(src=self.me, dst=peer, peer=name, reason=reason))
        self.collector.poke()
        if self.plan is not None and name in self.plan.nodes:
            self.recovery_needed.set()
        elif not self.live_participants():
            self._abort(TrainingError("every data owner is gone"))

    def _abort(self, exc: P2PSLError) -> None:
        if self._aborted is not None and not self._aborted.done():
            self._aborted.set_exception(exc)

    # -- finishing -------------------------------------------------------------------------------
    async def _finish(self) -> None:
        self.say("finishing", "writing outputs")
        await self.outbox.flush()
        self.metrics.write({"event": "peer", "name": self.me, "role": self.spec_peer.role,
                            "peak_rss_bytes": peak_rss_bytes(), "idle_rss_bytes": self.idle_rss,
                            "bytes_sent": self.network.bytes_sent,
                            "bytes_received": self.network.bytes_received,
                            "busy_seconds": round(self.worker.busy_seconds, 3),
                            "seconds": round(time.time() - self.status.started, 3), "epoch": self.epoch,
                            "gone": sorted(self.gone)})
        self.tracer.write(self.out / "trace.json")
        if self.too_late:
            self.say("done", "finished (joined too late to train)")
            return
        rounds = self.topology.training.rounds
        for peer in sorted(self.live_peers() - {self.me}):
            await self.send(Done(src=self.me, dst=peer, round=rounds), self.topology.timeouts.request)
        await self.collector.gather("done", rounds, lambda: self.live_peers() - {self.me},
                                    self.topology.timeouts.request, "every peer says when it has finished")
        await self.network.farewell(self.topology.timeouts.dead)
        self.say("done", "finished")

    async def _broadcast_abort(self, exc: P2PSLError) -> None:
        for peer in sorted(self.live_peers() - {self.me}):
            try:
                await self.network.send(Abort(src=self.me, dst=peer, code=type(exc).__name__, reason=str(exc)),
                                        timeout=1.0)
            except (P2PSLError, OSError):
                pass

    # -- messages --------------------------------------------------------------------------------
    def _others(self) -> list[str]:
        return [n for n in self.topology.names if n != self.me]

    async def send(self, msg: Routed, timeout: float | None = None) -> None:
        """Send, waiting for a link that is down; a peer gone meanwhile is simply not told."""
        if msg.dst in self.gone and msg.dst not in self.joiners:
            return
        t = self.topology.timeouts
        try:
            await self.network.send(msg, timeout=timeout if timeout is not None else t.gone + t.dead)
        except PeerTimeout:
            if msg.dst in self.gone or self.topology.next_hop(self.me, msg.dst) in self.gone:
                return
            raise

    def _send_failed(self, msg: Routed, exc: Exception) -> None:
        if msg.dst not in self.gone:
            self.log.warning("could not send %s to %s: %s", msg.KIND, msg.dst, exc)

    async def _on_message(self, msg: Routed) -> None:
        """Every routed message for this peer arrives here (from the network's reader)."""
        if isinstance(msg, Abort):
            if msg.src in self.gone:  # a peer we already go on without cannot stop us
                self.log.warning("ignored an abort from %s, which is gone: %s", msg.src, msg.reason)
            else:
                self._abort(TrainingError(f"{msg.src} stopped the deployment: {msg.reason}"))
            return
        if isinstance(msg, Error) and self.plan is None and msg.code == "not_admitted":
            self._abort(NotAdmitted(f"{msg.src} will not take {self.me} in: {msg.message}"))
            return
        if isinstance(msg, Gone):
            if msg.peer in self.topology.names:
                self.declare_gone(msg.peer, f"{msg.reason}, says {msg.src}")
            return
        if isinstance(msg, Greeting) and self.plan is not None:
            await rejoin.welcome(self, msg)  # the deployment trains already: an owner coming back
            return
        if msg.KIND in STARTUP_KINDS:
            self.collector.put_nowait(msg.KIND, msg.round if isinstance(msg, Done) else 0, msg.src, msg)
            return
        if isinstance(msg, (JoinInfo, Adopt, Joining)):
            rejoin.receive(self, msg)
            return
        if isinstance(msg, ProfileShare):
            self.collector.put_nowait("profile", 0, msg.src, msg)
            return
        if isinstance(msg, PlanProposal):
            for name in msg.gone:
                if name in self.topology.names:
                    self.declare_gone(name, f"gone according to {msg.src}")
            self.collector.put_nowait("plan", msg.epoch, msg.src, msg)
            return
        if isinstance(msg, StateTransfer):  # needed while recovering, when no role exists yet
            if msg.src not in {p.name for p in self.topology.compute_nodes}:
                raise RemoteProtocolError(f"state_transfer from {msg.src} refused: not a compute node", "wrong_role")
            self.collector.put_nowait("state", msg.epoch, msg.src, msg)
            return
        epoch = getattr(msg, "epoch", None)
        if epoch is not None and epoch < self.epoch:
            return  # work of a plan that no longer holds
        if self.role is None or (epoch is not None and epoch > self.epoch):
            if len(self._held) >= EARLY_LIMIT:
                raise RemoteProtocolError("too many messages before this peer was ready", "not_ready")
            self._held.append(msg)
            return
        await self._dispatch(msg)

    async def _dispatch(self, msg: Routed) -> None:
        owners = {o.name for o in self.topology.owners}
        if isinstance(msg, (TrainDone, EvalReport)):
            if msg.src != msg.owner or msg.src not in owners:
                raise RemoteProtocolError(f"{msg.KIND} from {msg.src} about {msg.owner} refused", "wrong_role")
            self.collector.put_nowait(msg.KIND, msg.round, msg.src, msg)
        elif isinstance(msg, Cut):
            self.collector.put_nowait("cut", msg.round, msg.src, msg)
        else:
            await self.role.handle(msg)

    async def _replay(self, msg: Routed) -> None:
        """Hand over a message held while this peer was not ready; a refusal is only logged here,
        since its sender is past waiting for an answer."""
        try:
            await self._on_message(msg)
        except P2PSLError as exc:
            self.log.warning("refused held %s from %s: %s", msg.KIND, msg.src, exc)
