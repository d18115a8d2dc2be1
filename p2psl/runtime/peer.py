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

Messages for this peer go through one table by kind ([Note: one dispatch table] in
p2psl.runtime.inbox). The peer's state is one dataclass (p2psl.runtime.state), which agreement,
re-planning and rejoining change as functions of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from p2psl.errors import AuthError, ConfigError, NotAdmitted, P2PSLError, PeerTimeout, TrainingError
from p2psl.learning.accelerator import deterministic, peak_bytes, reset_peak, resolve_device
from p2psl.learning.models import OptimConfig, model_spec
from p2psl.learning.sgd import Sgd
from p2psl.net.network import Network
from p2psl.runtime import behind, calibration, rejoin, replan, startup
from p2psl.runtime.agreement import agree_on_plan, dataset_facts
from p2psl.runtime.faults import Faults
from p2psl.runtime.heap import Settle
from p2psl.runtime.inbox import Inbox
from p2psl.runtime.metrics import MetricsFile, cpu_seconds, peak_rss_bytes, reset_peak_rss, round_record, rss_bytes
from p2psl.runtime.roles.compute import ComputeNode
from p2psl.runtime.roles.fedavg import Bystander, LocalOwner
from p2psl.runtime.roles.context import TRAINING_TOPICS, Collector, Context, Status, Topic, checkpoint_tag
from p2psl.runtime.roles.owner import DataOwner
from p2psl.runtime.roles.rounds import RoundEnd, check_reports
from p2psl.runtime.state import PeerState
from p2psl.runtime.trace import Tracer, write_json_atomic
from p2psl.runtime.worker import Outbox, TorchWorker
from p2psl.tasks import first_completed
from p2psl.topology import DATA_OWNER, Topology
from p2psl.wire import checkpoint
from p2psl.wire.messages import Abort, Done, EvalReport, Gone, Greeting, Routed

def warm_up() -> None:
    """One tiny training step of the layer kinds the models use, on the CPU, before the idle
    reading; the global random state is left as it was.

    [Note: idle baseline] torch and the runtime are loaded, no model yet: what a peer weighs
    before its share of the work, so memory can be reported above it. Sizing a layer on the meta
    device loads what torch imports lazily (shape tracing pulls in sympy, ~80 MB), and one tiny
    training step on the CPU maps and initialises its kernels (~55 MB): costs of any model's
    first step, not of this model's size."""
    with torch.random.fork_rng(devices=[]):
        _warm_up_step()


def _warm_up_step() -> None:
    with torch.device("meta"):
        layer = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2), torch.nn.Flatten())
        layer(torch.empty(1, 1, 8, 8))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(16, 3))
    sgd = Sgd(model.parameters(), lr=0.01, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 2]))
    loss.backward()
    sgd.step()


class _Recover(Exception):
    """Raised inside the training loop when a compute node is gone: re-plan and restore."""


class _Rebalance(Exception):
    """Raised at a round's end when measured times favour another plan ([Note: calibration])."""


@dataclass(frozen=True)
class PeerOptions:
    out: Path
    resume: bool = False
    torch_threads: int = 1
    addresses: dict | None = None     # name → (host, port) overrides (tests bind port 0)
    trace: bool = True
    #: told when this peer holds its plan and when it starts training ([Note: a settled heap]); None: nothing
    settled: Settle | None = None


class Peer:
    """One peer: its state (`PeerState`), its network, its torch worker and its outbox. It
    implements `Actions` for agreement, re-planning and rejoining."""

    def __init__(self, topology: Topology, name: str, secret: bytes, options: PeerOptions):
        topology.check_name(name)
        self.options = options
        # where this peer's parts train; a missing accelerator stops it here, before any network
        self.device = resolve_device(name, topology.peer(name).accelerator)
        deterministic(self.device)
        log = logging.LoggerAdapter(logging.getLogger("p2psl.peer"), {"peer": name})
        self.tracer = Tracer(name, options.trace)
        self.worker = TorchWorker(self.tracer, topology.peer(name).speed, cpu_clock=self.device.type == "cpu")
        self.clock = self.worker.observe = calibration.TaskClock()
        self.state = PeerState(topology, name, Path(options.out), log,
                               Status(name, topology.peer(name).role, rounds=topology.training.rounds),
                               Collector(), self.worker)
        self.outbox = Outbox(self.send, self.tracer, log, self._send_failed, deadline=topology.timeouts.round)
        self.inbox = Inbox(self.state, self, self._abort)
        self.network = Network(topology, name, secret, self.inbox.deliver, log=log, on_peer=self._on_link,
                               addresses=options.addresses, status=self.status_json, on_refused=self._refused)
        self.state.life = self.network.incarnation
        self.faults = Faults(cut=self.network.cut, settle=self._settle, slow=self.worker.slow_down, me=name)
        self.metrics = MetricsFile(self.state.out / "metrics.jsonl")
        self._aborted: asyncio.Future | None = None
        self._gave_up = False
        self._telling: set[asyncio.Task] = set()

    @property
    def topology(self) -> Topology:
        return self.state.topology

    @property
    def status(self) -> Status:
        return self.state.status

    def status_json(self) -> dict:
        return status_of(self.state, self.network, self.worker, self.device)

    # -- the whole life --------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until training completes; raises a P2PSLError if it cannot."""
        torch.set_num_threads(self.options.torch_threads)
        self.state.out.mkdir(parents=True, exist_ok=True)
        self._aborted = asyncio.get_running_loop().create_future()
        try:
            await self.network.listen()
            await self.worker.run("warm up", warm_up)  # [Note: idle baseline]
            self.state.idle_rss = rss_bytes()
            reset_peak_rss()
            reset_peak(self.device)
            self.network.connect()
            outcome = await first_completed(life=self._life(), abort=self._aborted, stalls=behind.watch(self.state))
            if outcome.name == "abort" and self._gave_up:
                await broadcast_abort(self.state, self.network, outcome.error)
            behind.explain(self.state, outcome.error)
            outcome.result()  # our own outcome first: it says more than another peer's abort
        finally:
            aborted, self._aborted = self._aborted, None  # an abort arriving from now on changes nothing
            if aborted.done() and not aborted.cancelled():
                aborted.exception()  # seen: this peer's own outcome above is its answer
            for name in list(self.state.gone_timers):
                self.state.cancel_gone_timer(name)
            for task in list(self._telling):
                task.cancel()
            await self.outbox.close()
            await self.network.stop()
            await self.worker.aclose()

    async def _life(self) -> None:
        state = self.state
        state.say("connecting", f"waiting for {', '.join(self.network.neighbours) or 'nobody'}")
        startup.prepare(self.state, self.options.resume)
        try:
            (await first_completed(start=self._start(), greet=self._greet_then_wait())).result()
        except NotAdmitted:
            raise  # our problem alone: the others train on
        except P2PSLError as exc:
            await broadcast_abort(self.state, self.network, exc)
            raise
        if state.too_late:
            await self._finish()
            return
        if self.options.settled is not None:
            self.options.settled()
        try:
            await self._train()
        except P2PSLError as exc:
            await broadcast_abort(self.state, self.network, exc)
            raise
        await self._finish()

    async def _start(self) -> None:
        """Agree on a plan with every peer, or rejoin a deployment that already trains."""
        outcome = await first_completed(
            started=startup.gather_greetings(self.state, self.network),
            # no deadline of its own: the greetings' deadline ends the race
            joined=self.state.collector.wait_any(Topic.JOIN_INFO, 0, None))
        if outcome.name == "joined":
            await rejoin.join(self.state, self)
        else:
            await self._agree(outcome.result())

    # -- greeting and agreement -------------------------------------------------------------------
    async def _greet_then_wait(self) -> None:
        """Greet every peer, then wait: greeting runs beside the start until the start is over."""
        await startup.send_greetings(self.state, self)
        await asyncio.Event().wait()

    async def _agree(self, greetings: dict[str, Greeting]) -> None:
        state, cfg = self.state, self.topology.training
        input_shape, num_classes, samples = dataset_facts(self.topology, greetings)
        state.model = model_spec(cfg.model, input_shape, num_classes)
        state.say("planning", "agreeing on a plan")
        planned = self.options.settled.planned if self.options.settled is not None else None
        state.plan, state.profiles = await agree_on_plan(state, self, state.model, samples, planned)
        state.samples, state.first_plan = samples, state.plan
        start = startup.resume_round(state, greetings, self.options.resume)
        if not self.options.resume:
            startup.clear_earlier_run(state)
        restored = None
        if start:
            replica = await self.worker.run("restore", checkpoint.load, state.out / "checkpoints", start)
            if replica.plan != checkpoint_tag(state.plan, cfg):
                raise ConfigError(f"the checkpoint of round {start} belongs to another plan or [training] mode; "
                                  "resume with the same topology, or start afresh without --resume")
            restored = replica.state
            self.state.log.info("resuming from the checkpoint of round %d", start)
        await self.become(start, restored)

    async def become(self, start: int, restored: dict | None) -> None:
        """Build this peer's role for the current plan, restored to the end of round `start`."""
        state, cfg = self.state, self.topology.training
        write_json_atomic(state.out / "plan.json", state.plan.to_json())
        ctx = Context(self.topology, state.me, state.plan, state.model, OptimConfig.from_training(cfg),
                      self.outbox, self.worker, self.tracer, state.log, state.out, state.status, state.collector,
                      start, self.faults, state.epoch, self.device)
        round_end = RoundEnd(ctx, state.live_participants, state.live_peers, state.audience)
        state.say("building", f"building parts of plan {state.plan.digest[:12]} (epoch {state.epoch})")
        federated = cfg.mode == "fedavg"  # [Note: the federated-averaging baseline]
        if state.spec.role == DATA_OWNER:
            owner = LocalOwner if federated else DataOwner
            role = await self.worker.run("build", owner, ctx, state.data, state.shards[state.me], round_end)
        else:
            idle = federated or state.me not in state.plan.nodes  # [Note: the cost objective]: a node left out
            role = await self.worker.run("build", Bystander if idle else ComputeNode, ctx, round_end)
        if restored:
            await self.worker.run("restore", role.restore, restored)
        state.next_round = start + 1
        state.role = role
        state.startup_peak = state.startup_peak or peak_rss_bytes()
        await self.inbox.replay_held()

    # -- training --------------------------------------------------------------------------------
    async def _train(self) -> None:
        while True:
            try:
                await self._run_epoch()
                return
            except _Recover:
                await replan.recover(self.state, self)
            except _Rebalance:
                plan, self.state.better = self.state.better, None
                if not await replan.rebalance(self.state, self, plan, self.state.next_round - 1):
                    await replan.recover(self.state, self)

    async def _run_epoch(self) -> None:
        """Train rounds under the current plan; raise _Recover when a compute node is gone."""
        state = self.state
        contenders = dict(rounds=self._rounds(), recovery=state.recovery_needed.wait())
        if isinstance(state.role, ComputeNode):
            contenders["serve"] = state.role.serve()
        outcome = await first_completed(**contenders)
        if state.recovery_needed.is_set():
            raise _Recover()
        if outcome.name == "serve":
            outcome.result()  # re-raises what stopped the task loop
            raise TrainingError(f"{state.me}'s task loop stopped unexpectedly")
        outcome.result()

    async def _rounds(self) -> None:
        state, cfg = self.state, self.topology.training
        while state.next_round <= cfg.rounds:
            round_ = state.next_round
            if round_ > 1:  # under the plan the next round trains under ([Note: rejoining])
                await rejoin.hand_over(state, self, round_ - 1)
            rejoin.admit_joiners(state)
            state.status.round = round_
            state.say("training", f"round {round_} of {cfg.rounds}" + (f" (epoch {state.epoch})" if state.epoch else ""))
            await state.role.run_round(round_)
            with self.tracer.span("wait for reports", "wait", round=round_):
                reports = await state.collector.gather(Topic.EVAL_REPORT, round_, state.live_participants,
                                                       self.topology.timeouts.round,
                                                       "every owner reports its evaluation")
            check_reports(round_, reports)
            record_round(state, self.metrics, round_, reports, self.network)
            if round_ == cfg.rounds:  # no round starts after it: an owner waiting learns it is too late
                await rejoin.hand_over(state, self, round_)
            if cfg.modelled:  # what the cost model does not describe, it does not refit either
                await calibration.calibrate(state, self, self.clock, round_, reports)
            state.collector.forget(TRAINING_TOPICS, before=round_)
            state.next_round = round_ + 1
            if state.better is not None:
                raise _Rebalance()

    # -- failures --------------------------------------------------------------------------------
    def _on_link(self, name: str, up: bool, reason: str) -> None:
        """Link events from the network: a link down for `timeouts.gone` means the peer is gone."""
        state = self.state
        state.cancel_gone_timer(name)
        state.link_event(name, up, reason)
        if up and reason == "restarted" and state.plan is not None:
            self.declare_gone(name, "it restarted and lost its state")
        elif up and reason == "restarted" and state.told:  # still starting: its new life hears it all again
            self._spawn(startup.tell_again(state, self, name))
        elif up and state.plan is not None and name in state.gone and name not in state.joiners:
            self._spawn(behind.tell(state, self, name))  # the same life of a peer we went on without
        elif not up and reason != "said bye" and state.plan is not None and (name not in state.gone
                                                                              or name in state.joiners):
            gone = self.topology.timeouts.gone
            state.gone_timers[name] = asyncio.get_running_loop().call_later(
                gone, self.declare_gone, name, f"unreachable for {gone:g} s ({reason})")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    def _refused(self, name: str, why: str) -> None:
        """A neighbour refused for good ([Note: refusals for good] in p2psl.net.dialling): stop now,
        and tell the others why."""
        self.give_up(AuthError(f"{self.state.me} cannot work with {name}: {why}"))

    def declare_gone(self, name: str, reason: str, life: bytes | None = None) -> None:
        state = self.state
        if name == state.me:
            return
        self._heard(name, life)
        if name in state.joiners and name in state.gone:  # an owner that was coming back left again
            del state.joiners[name]
            state.told_epoch.pop(name, None)
            self.network.news()
            self.state.log.warning("%s, which was rejoining, is gone again: %s", name, reason)
            self._tell_gone(name, reason, life)
            return
        if name in state.gone:
            return
        state.gone.add(name)
        self.network.news()  # sends waiting for its link give up now
        self.state.log.warning("%s is gone: %s", name, reason)
        self._tell_gone(name, reason, life)
        state.collector.poke()
        why = state.cannot_train()
        if why is not None:
            self.give_up(state.stop_error(why))
        elif state.plan is not None and name in state.gone_nodes() and self.topology.training.mode == "split":
            state.recovery_needed.set()  # also for a node the plan leaves out: the epoch counts every node gone

    def _heard(self, name: str, life: bytes | None) -> None:
        """Remember news of `name` gone, whether or not it changes anything here ([Note:
        rejoining]): the life it names (else the one its last greeting told), whose greeting,
        relayed late behind the next life's, is then no owner coming back; and, of a data owner,
        that the news came, which a rejoining owner keeps over a `join_info` older than it."""
        state = self.state
        state.ended(name, life if life is not None else state.lives.get(name, b""))
        if self.topology.peer(name).role == DATA_OWNER:
            state.heard_gone.append(name)

    def _tell_gone(self, name: str, reason: str, life: bytes | None) -> None:
        """`Gone` to every live peer, naming the life declared gone ([Note: rejoining]): the one
        the news this peer passes on names, or else the one its last greeting told. News of a
        data owner goes to the owners rejoining too: they will wait for its round messages
        otherwise. Of a compute node it does not: a joiner learns that with the plan it changes
        (`join_info` before the next parts), and must not start a recovery of its own."""
        state = self.state
        if life is None:
            life = state.lives.get(name, b"")
        told = state.live_peers() - {state.me}
        if self.topology.peer(name).role == DATA_OWNER:
            told |= set(state.joiners) - {name}
        for peer in sorted(told):
            self.outbox.post_nowait(Gone(src=state.me, dst=peer, peer=name, reason=reason, incarnation=life))

    def _abort(self, exc: P2PSLError) -> None:
        if self._aborted is not None and not self._aborted.done():
            self._aborted.set_exception(exc)

    def give_up(self, exc: P2PSLError) -> None:
        """Stop at once for a reason found here (not another peer's abort): the live peers are
        told on the way out."""
        self._gave_up = True
        self._abort(exc)

    # -- finishing -------------------------------------------------------------------------------
    async def _finish(self) -> None:
        state = self.state
        state.say("finishing", "writing outputs")
        await self.outbox.flush()
        self.metrics.write(peer_record(state, self.network, self.worker, self.device))
        self.tracer.write(state.out / "trace.json")
        if state.too_late:
            state.say("done", "finished (joined too late to train)")
            return
        rounds, timeouts = self.topology.training.rounds, self.topology.timeouts
        for peer in sorted(state.live_peers() - {state.me}):
            await self.send(Done(src=state.me, dst=peer, round=rounds), timeouts.request)
        await state.collector.gather(Topic.DONE, rounds, lambda: state.live_peers() - {state.me},
                                     timeouts.request, "every peer says when it has finished")
        await self.network.farewell(timeouts.dead)
        state.say("done", "finished")

    # -- messages --------------------------------------------------------------------------------
    async def send(self, msg: Routed, timeout: float | None = None) -> None:
        """Send, waiting for a link that is down; a peer gone meanwhile is simply not told."""
        state, t = self.state, self.topology.timeouts
        if msg.dst in state.gone and msg.dst not in state.joiners:
            return
        try:  # a link down waits, but not once the destination or the way to it is declared gone
            await self.network.send(msg, timeout=timeout if timeout is not None else t.gone + t.dead,
                                    abandon=lambda name: name in state.gone and name not in state.joiners)
        except PeerTimeout:
            if msg.dst in state.gone or self.topology.next_hop(state.me, msg.dst) in state.gone:
                return
            raise

    async def _settle(self) -> None:
        await self.outbox.flush()
        await self.network.acknowledged(self.topology.timeouts.request)

    async def send_anyway(self, msg: Routed, timeout: float) -> None:
        await self.network.send(msg, timeout=timeout)

    def _send_failed(self, msg: Routed, exc: Exception) -> None:
        if msg.dst not in self.state.gone:
            self.state.log.warning("could not send %s to %s: %s", msg.KIND, msg.dst, exc)


def status_of(state: PeerState, network: Network, worker: TorchWorker, device: torch.device) -> dict:
    """What /status serves: the live numbers, memory (host and accelerator), traffic and plan."""
    return state.status.to_json(rss_bytes=rss_bytes(), peak_rss_bytes=peak_rss_bytes(),
                                idle_rss_bytes=state.idle_rss or None, accelerator=str(device),
                                accelerator_peak_bytes=peak_bytes(device), bytes_sent=network.bytes_sent,
                                bytes_received=network.bytes_received, busy_seconds=worker.busy_seconds,
                                epoch=state.epoch, gone=sorted(state.gone),
                                plan=state.plan.to_json() if state.plan else None)


def peer_record(state: PeerState, network: Network, worker: TorchWorker, device: torch.device) -> dict:
    """This peer's line in metrics.jsonl at the end: its memory, traffic, disk and busy time."""
    return {"event": "peer", "name": state.me, "role": state.spec.role, "peak_rss_bytes": peak_rss_bytes(),
            "idle_rss_bytes": state.idle_rss, "startup_peak_rss_bytes": state.startup_peak,
            "bytes_sent": network.bytes_sent,
            "bytes_received": network.bytes_received, "checkpoint_bytes": state.status.checkpoint_bytes,
            "busy_seconds": round(worker.busy_seconds, 3), "cpu_seconds": round(cpu_seconds(), 3),
            "seconds": round(time.time() - state.status.started, 3),
            "epoch": state.epoch, "gone": sorted(state.gone), "accelerator": str(device),
            "accelerator_peak_bytes": peak_bytes(device)}


def record_round(state: PeerState, metrics: MetricsFile, round_: int, reports: dict[str, EvalReport],
                 network: Network) -> None:
    """The round's line in metrics.jsonl and the log, and this peer's memory after it; once per
    round (a round trained again after a recovery keeps its first record)."""
    if round_ <= state.recorded:
        state.log.info("round %d trained again after a recovery (recorded before)", round_)
        return
    state.recorded = round_
    modelled = state.topology.training.modelled  # else no prediction: none would be true
    record = round_record(round_, list(reports.values()),
                          state.predicted.get(round_, state.plan.round_seconds) if modelled else None)
    record["planned_seconds"] = state.plan.round_seconds if modelled else None  # the plan's own, uncalibrated
    record["calibration"] = state.calibration.to_json()   # what the prediction used ([Note: calibration])
    record["epoch"] = state.epoch
    record["mode"] = state.topology.training.mode
    record["aggregated"] = next(iter(reports.values())).included
    metrics.write(record)
    metrics.write({"event": "peer_round", "name": state.me, "round": round_, "rss_bytes": rss_bytes(),
                   "stashed": state.role.stash_count, "bytes_sent": network.bytes_sent,
                   "bytes_received": network.bytes_received, "cpu_seconds": round(cpu_seconds(), 3)})
    state.status.accuracy, state.status.loss = record["test_accuracy"], record["train_loss"]
    state.status.round_seconds, state.status.predicted_seconds = record["seconds"], record["predicted_seconds"]
    state.log.info("round %d: test accuracy %.4f, train loss %.4f, %.1f s", round_,
                   record["test_accuracy"] or 0.0, record["train_loss"] or 0.0, record["seconds"] or 0.0)


async def broadcast_abort(state: PeerState, network: Network, exc: P2PSLError) -> None:
    """An `Abort` to every live peer, all at once (a peer out of reach holds up nobody)."""
    async def one(peer: str) -> None:
        try:
            await network.send(Abort(src=state.me, dst=peer, code=type(exc).__name__, reason=str(exc)),
                               timeout=state.topology.timeouts.closing)
        except (P2PSLError, OSError):
            pass
    await asyncio.gather(*(one(p) for p in sorted(state.live_peers() - {state.me})))
