"""One peer's life, with no master anywhere (SPEC §3).

    start     listen on this peer's address (returns once listening), dial neighbours
    connect   wait for every neighbour, reporting who is missing and why
    greet     a `Greeting` to every peer: role, data shape and size, round completed (resume)
    agree     flood profiles, run the deterministic planner, compare plan digests
    train     the role's rounds; every peer collects every owner's `EvalReport` per round
    finish    outputs written, `Done` to every peer, wait for everyone's `Done`, close

Messages that arrive before this peer is ready for them (a fast owner's first batch while this
node still builds its copies) wait in a bounded buffer and are replayed once the role exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from p2psl import checkpoint
from p2psl.agreement import agree_on_plan, dataset_facts
from p2psl.data import load_dataset, shard
from p2psl.errors import (ConfigError, P2PSLError, PeerTimeout, RemoteProtocolError, TrainingError)
from p2psl.messages import (Abort, Done, EvalReport, Greeting, PlanProposal, ProfileShare, Routed)
from p2psl.metrics import MetricsFile, peak_rss_bytes, round_record, rss_bytes
from p2psl.models import OptimConfig, model_spec
from p2psl.network import Network
from p2psl.roles.compute import ComputeNode
from p2psl.roles.context import Collector, Context, Status
from p2psl.roles.owner import DataOwner
from p2psl.topology import DATA_OWNER, Topology
from p2psl.trace import Tracer, write_json_atomic
from p2psl.worker import Outbox, TorchWorker

EARLY_LIMIT = 10_000
STARTUP_KINDS = {"greeting": Greeting, "profile": ProfileShare, "plan": PlanProposal, "done": Done}


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
        self.log = logging.LoggerAdapter(logging.getLogger("p2psl.peer"), {"peer": name})
        self.status = Status(name, self.spec_peer.role, rounds=topology.training.rounds)
        self.tracer = Tracer(name, options.trace)
        self.collector = Collector()
        self.network = Network(topology, name, secret, self._on_message, log=self.log,
                               addresses=options.addresses, status=self.status_json)
        self.worker = TorchWorker(self.tracer, self.spec_peer.speed)
        self.role: DataOwner | ComputeNode | None = None
        self._early: list[Routed] = []
        self._aborted: asyncio.Future | None = None
        self.plan = None
        self.metrics = MetricsFile(self.out / "metrics.jsonl")

    # -- status ----------------------------------------------------------------------------------
    def status_json(self) -> dict:
        return self.status.to_json(rss_bytes=rss_bytes(), peak_rss_bytes=peak_rss_bytes(),
                                   bytes_sent=self.network.bytes_sent, bytes_received=self.network.bytes_received,
                                   busy_seconds=self.worker.busy_seconds, plan=self.plan.to_json() if self.plan else None)

    def say(self, state: str, detail: str = "") -> None:
        self.status.state, self.status.detail = state, detail
        if detail:
            self.log.info("%s", detail)

    # -- the whole life --------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until training completes; raises a P2PSLError if it cannot."""
        torch.set_num_threads(self.options.torch_threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self._aborted = asyncio.get_running_loop().create_future()
        try:
            await self.network.listen()
            self.network.connect()
            await self._until_aborted(self._life())
        finally:
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
        if self._aborted.done():
            raise self._aborted.exception()
        task.result()

    async def _life(self) -> None:
        self.say("connecting", f"waiting for {', '.join(self.network.neighbours) or 'nobody'}")
        await self.network.wait_connected(status=lambda text: self.say("connecting", text))
        try:
            data, greetings = await self._greet()
            await self._agree(greetings, data)
            await self._train()
        except P2PSLError as exc:
            await self._broadcast_abort(exc)
            raise
        await self._finish()

    # -- greeting and agreement -------------------------------------------------------------------
    async def _greet(self):
        cfg, data = self.topology.training, None
        facts: dict = {}
        if self.spec_peer.role == DATA_OWNER:
            data = load_dataset(cfg)
            self.shards = shard(data, [o.name for o in self.topology.owners], cfg.partition, cfg.alpha, cfg.seed)
            mine = self.shards[self.me]
            facts = {"input_shape": list(data.input_shape), "num_classes": data.num_classes,
                     "train": len(mine.train_idx), "test": len(mine.test_idx)}
        completed = checkpoint.rounds(self.out / "checkpoints")[-1:] if self.options.resume else []
        self.say("greeting", "greeting every peer")
        for peer in self._others():
            await self._send(Greeting(src=self.me, dst=peer, role=self.spec_peer.role,
                                      completed_round=completed[0] if completed else 0,
                                      resume=self.options.resume, dataset=facts), self.topology.timeouts.start)
        greetings = await self.collector.gather("greeting", 0, set(self._others()), self.topology.timeouts.start,
                                                "every peer greets every other at start-up")
        greetings[self.me] = Greeting(src=self.me, dst=self.me, role=self.spec_peer.role,
                                      completed_round=completed[0] if completed else 0,
                                      resume=self.options.resume, dataset=facts)
        return data, greetings

    async def _agree(self, greetings: dict[str, Greeting], data) -> None:
        cfg = self.topology.training
        input_shape, num_classes, samples = dataset_facts(self.topology, greetings)
        self.model = model_spec(cfg.model, input_shape, num_classes)
        self.say("planning", "agreeing on a plan")
        self.plan = await agree_on_plan(self, self.model, samples)
        write_json_atomic(self.out / "plan.json", self.plan.to_json())
        start = self._resume_round(greetings)
        ctx = Context(self.topology, self.me, self.plan, self.model, OptimConfig.from_training(cfg), self._send,
                      Outbox(self._send, self.tracer, self.log, self._send_failed), self.worker, self.tracer,
                      self.log, self.out, self.status, self.collector, start)
        self.ctx = ctx
        self.say("building", f"building parts of plan {self.plan.digest[:12]}")
        if self.spec_peer.role == DATA_OWNER:
            self.role = await self.worker.run("build", DataOwner, ctx, data, self.shards[self.me])
        else:
            self.role = await self.worker.run("build", ComputeNode, ctx)
        if start:
            replica = await self.worker.run("restore", checkpoint.load, self.out / "checkpoints", start)
            if replica.plan != self.plan.digest:
                raise ConfigError(f"the checkpoint of round {start} belongs to another plan; "
                                  "resume with the same topology, or start afresh without --resume")
            await self.worker.run("restore", self.role.restore, replica)
            self.log.info("resumed from the checkpoint of round %d", start)
        early, self._early = self._early, []
        for msg in early:
            await self._replay(msg)

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

    # -- training --------------------------------------------------------------------------------
    async def _train(self) -> None:
        cfg = self.topology.training
        owners = set(self.plan.owners)
        serve = asyncio.ensure_future(self.role.serve()) if isinstance(self.role, ComputeNode) else None
        try:
            for round_ in range(self.ctx.start_round + 1, cfg.rounds + 1):
                self.status.round = round_
                self.say("training", f"round {round_} of {cfg.rounds}")
                if isinstance(self.role, DataOwner):
                    await self.role.run_round(round_)
                reports = await self._gather_reports(round_, owners, serve)
                record = round_record(round_, list(reports.values()), self.plan.round_seconds)
                self.metrics.write(record)
                self.metrics.write({"event": "peer_round", "name": self.me, "round": round_, "rss_bytes": rss_bytes(),
                                    "stashed": self.role.stash_count})
                self.status.accuracy, self.status.loss = record["test_accuracy"], record["train_loss"]
                self.log.info("round %d: test accuracy %.4f, train loss %.4f, %.1f s", round_,
                              record["test_accuracy"] or 0.0, record["train_loss"] or 0.0, record["seconds"] or 0.0)
                self.collector.forget_before(round_)
        finally:
            if serve is not None:
                serve.cancel()
                await asyncio.gather(serve, return_exceptions=True)

    async def _gather_reports(self, round_: int, owners: set[str], serve: asyncio.Future | None) -> dict:
        gather = asyncio.ensure_future(self.collector.gather(
            "eval_report", round_, owners, self.topology.timeouts.round, "every owner reports its evaluation"))
        waits = {gather} | ({serve} if serve is not None else set())
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not gather.done():
                gather.cancel()
                await asyncio.gather(gather, return_exceptions=True)
        if serve is not None and serve.done():
            serve.result()  # re-raises what stopped the compute loop
            raise TrainingError(f"{self.me}'s task loop stopped unexpectedly")
        return gather.result()

    # -- finishing -------------------------------------------------------------------------------
    async def _finish(self) -> None:
        self.say("finishing", "writing outputs")
        await self.ctx.outbox.flush()
        self.metrics.write({"event": "peer", "name": self.me, "role": self.spec_peer.role,
                            "peak_rss_bytes": peak_rss_bytes(), "bytes_sent": self.network.bytes_sent,
                            "bytes_received": self.network.bytes_received,
                            "busy_seconds": round(self.worker.busy_seconds, 3),
                            "seconds": round(time.time() - self.status.started, 3)})
        self.tracer.write(self.out / "trace.json")
        rounds = self.topology.training.rounds
        for peer in self._others():
            await self._send(Done(src=self.me, dst=peer, round=rounds), self.topology.timeouts.request)
        await self.collector.gather("done", rounds, set(self._others()), self.topology.timeouts.request,
                                    "every peer says when it has finished")
        self.say("done", "finished")
        await self.ctx.outbox.close()

    async def _broadcast_abort(self, exc: P2PSLError) -> None:
        for peer in self._others():
            try:
                await self.network.send(Abort(src=self.me, dst=peer, code=type(exc).__name__, reason=str(exc)),
                                        timeout=1.0)
            except (P2PSLError, OSError):
                pass

    # -- messages --------------------------------------------------------------------------------
    def _others(self) -> list[str]:
        return [n for n in self.topology.names if n != self.me]

    async def _send(self, msg: Routed, timeout: float | None = None) -> None:
        await self.network.send(msg, timeout=timeout)

    def _send_failed(self, msg: Routed, exc: Exception) -> None:
        self.log.error("could not send %s to %s: %s", msg.KIND, msg.dst, exc)
        if self._aborted is not None and not self._aborted.done():
            self._aborted.set_exception(exc if isinstance(exc, P2PSLError) else PeerTimeout(str(exc)))

    async def _on_message(self, msg: Routed) -> None:
        """Every routed message for this peer arrives here (from the network's reader)."""
        if isinstance(msg, Abort):
            if not self._aborted.done():
                self._aborted.set_exception(TrainingError(f"{msg.src} stopped the deployment: {msg.reason}"))
            return
        kind = STARTUP_KINDS.get(msg.KIND)
        if kind is not None:
            round_ = msg.round if isinstance(msg, Done) else 0
            self.collector.put_nowait(msg.KIND, round_, msg.src, msg)
            return
        if isinstance(msg, EvalReport):
            if msg.src != msg.owner or msg.src not in {o.name for o in self.topology.owners}:
                raise RemoteProtocolError(f"eval_report from {msg.src} about {msg.owner} refused", "wrong_role")
            self.collector.put_nowait("eval_report", msg.round, msg.src, msg)
            return
        if self.role is None:
            if len(self._early) >= EARLY_LIMIT:
                raise RemoteProtocolError("too many messages before the plan was agreed", "not_ready")
            self._early.append(msg)
            return
        await self._dispatch(msg)

    async def _dispatch(self, msg: Routed) -> None:
        self.role.handle(msg)

    async def _replay(self, msg: Routed) -> None:
        """Hand over a message that arrived before the role existed; refusals are only logged
        (its sender was answered... not at all, so say so here)."""
        try:
            self.role.handle(msg)
        except P2PSLError as exc:
            self.log.warning("refused early %s from %s: %s", msg.KIND, msg.src, exc)


def write_summary(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))
