"""How a round ends without a master ([Note: the cut]), for several peers in one event loop.

Each peer's `RoundEnd` gets a stand-in context: its own collector, and a `send` that only puts
the message in flight. The test decides when, and in which order, in-flight messages arrive and
when a peer is declared gone, so every interleaving can be tried without a network.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psl.errors import TrainingError
from p2psl.runtime.roles.context import Collector
from p2psl.runtime.roles.rounds import RoundEnd
from p2psl.runtime.trace import Tracer
from p2psl.wire.messages import Cut, Routed, TrainDone

ROUND = 4


class Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, fmt: str, *args) -> None:
        self.warnings.append(fmt % args)


class Deployment:
    """Peers' round ends over an in-memory network; nothing arrives until the test delivers it."""

    def __init__(self, peers: list[str], owners: list[str], others: tuple[str, ...] = (),
                 policy: str = "wait", deadline: float | None = None, audience: tuple[str, ...] = ()):
        """`peers` run a RoundEnd; `others` are live peers that run none (they died silently)."""
        self.live = set(peers) | set(others)
        self.owners = set(owners)
        self.in_flight: list[Routed] = []
        self.delivered: list[Routed] = []
        self.sent = asyncio.Event()
        training = SimpleNamespace(straggler_policy=policy, round_deadline=deadline)
        self.ctx = {p: self._context(p, training) for p in peers}
        self.ends = {p: RoundEnd(c, self.live_participants, lambda: set(self.live),
                                 lambda: set(self.live) | set(audience)) for p, c in self.ctx.items()}

    def _context(self, me: str, training) -> SimpleNamespace:
        return SimpleNamespace(me=me, epoch=0, collector=Collector(), tracer=Tracer(me), send=self.send,
                               timeouts=SimpleNamespace(request=30.0, round=30.0), training=training, log=Log())

    def live_participants(self) -> set[str]:
        return self.owners & self.live

    async def send(self, message: Routed) -> None:
        self.in_flight.append(message)
        self.sent.set()

    def finish(self, owner: str, reach: set[str] | None = None) -> None:
        """`owner` finished its local epochs; its TrainDone goes to `reach` (default: every peer)."""
        done = dict(epoch=0, owner=owner, round=ROUND, samples=10, batches=1, loss_sum=1.0)
        if owner in self.ctx:
            self.ctx[owner].collector.put_nowait("train_done", ROUND, owner, TrainDone(src=owner, dst=owner, **done))
        for peer in sorted((self.live if reach is None else reach) - {owner}):
            self.in_flight.append(TrainDone(src=owner, dst=peer, **done))

    def deliver(self, message: Routed) -> None:
        self.delivered.append(message)
        if message.dst in self.ctx:
            self.ctx[message.dst].collector.put_nowait(message.KIND, message.round, message.src, message)

    def deliver_now(self) -> None:
        """Deliver everything in flight, before any peer starts waiting."""
        while self.in_flight:
            self.deliver(self.in_flight.pop(0))

    def gone(self, peer: str) -> None:
        """`peer` is declared gone everywhere: every waiter looks again."""
        self.live.discard(peer)
        for ctx in self.ctx.values():
            ctx.collector.poke()

    def start(self) -> dict[str, asyncio.Task]:
        return {p: asyncio.ensure_future(end.decide(ROUND)) for p, end in self.ends.items()}

    async def run(self, rnd: random.Random, actions: list = ()) -> dict[str, frozenset | Exception]:
        """Deliver what is in flight and do `actions`, one at a time in an order drawn from `rnd`,
        until every peer has decided; each peer's decision (or what it raised)."""
        tasks, actions = self.start(), list(actions)
        while pending := [t for t in tasks.values() if not t.done()]:
            await settle()
            choices = len(self.in_flight) + len(actions)
            if not choices:
                await self._progress(pending)
                continue
            pick = rnd.randrange(choices)
            if pick < len(self.in_flight):
                self.deliver(self.in_flight.pop(pick))
            else:
                actions.pop(pick - len(self.in_flight))()
        return {p: t.exception() or t.result() for p, t in tasks.items()}

    async def _progress(self, pending: list[asyncio.Task]) -> None:
        """Nothing to deliver: only a deadline can move the peers now. Wait until one decides or sends."""
        self.sent.clear()
        sent = asyncio.ensure_future(self.sent.wait())
        await asyncio.wait([*pending, sent], timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
        sent.cancel()
        await asyncio.gather(sent, return_exceptions=True)
        assert self.in_flight or any(t.done() for t in pending), "the peers wait for something that never comes"

    def cuts(self) -> dict[str, list[str]]:
        """The owners named in each peer's cut."""
        return {m.src: m.owners for m in self.delivered + self.in_flight if isinstance(m, Cut)}


async def settle() -> None:
    """Let every task run until it waits (yields to the loop; no clock involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False))
def test_every_peer_aggregates_every_owner_whatever_the_order(rnd):
    net = Deployment(["alice", "bob", "carol", "c1"], ["alice", "bob", "carol"])
    for owner in ("alice", "bob", "carol"):
        net.finish(owner)
    decided = asyncio.run(net.run(rnd))
    assert decided == {p: frozenset({"alice", "bob", "carol"}) for p in net.ends}


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False))
def test_an_owner_whose_train_done_reached_only_some_is_left_out_everywhere(rnd):
    """dave told only alice he was done, then died: alice's cut may name him, the others' cannot,
    and once he is declared gone (at any point) all peers aggregate alice and bob alone."""
    net = Deployment(["alice", "bob", "c1"], ["alice", "bob", "dave"], others=("dave",))
    net.finish("alice")
    net.finish("bob")
    net.finish("dave", reach={"alice"})
    decided = asyncio.run(net.run(rnd, [lambda: net.gone("dave")]))
    assert decided == {p: frozenset({"alice", "bob"}) for p in net.ends}
    assert all("dave" not in owners for peer, owners in net.cuts().items() if peer != "alice")


async def test_an_owner_declared_gone_mid_wait_stops_being_waited_for():
    net = Deployment(["alice", "bob", "c1"], ["alice", "bob", "dave"], others=("dave",))
    net.finish("alice")
    net.finish("bob")
    net.finish("dave", reach={"alice"})
    tasks = net.start()
    await deliver_all(net)
    assert not any(t.done() for t in tasks.values())  # bob and c1 wait for dave, alice for their cuts
    assert net.cuts() == {"alice": ["alice", "bob", "dave"]}
    net.gone("dave")
    await deliver_all(net)
    assert {p: await t for p, t in tasks.items()} == {p: frozenset({"alice", "bob"}) for p in net.ends}
    assert net.cuts() == {"alice": ["alice", "bob", "dave"], "bob": ["alice", "bob"], "c1": ["alice", "bob"]}


async def deliver_all(net: Deployment) -> None:
    """Deliver in arrival order until nothing is in flight and every peer waits."""
    await settle()
    while net.in_flight:
        net.deliver(net.in_flight.pop(0))
        await settle()


async def test_with_the_drop_policy_a_straggler_is_cut_after_the_round_deadline():
    """dave is alive but slow: 0.2 s after alice and bob finished, every peer, dave included,
    cuts without him, and says so. (Their TrainDones arrive before anyone waits, so the
    deadline can only cut dave.)"""
    net = Deployment(["alice", "bob", "dave", "c1"], ["alice", "bob", "dave"], policy="drop", deadline=0.2)
    net.finish("alice")
    net.finish("bob")
    net.deliver_now()
    decided = await asyncio.wait_for(net.run(random.Random(1)), 20.0)
    assert decided == {p: frozenset({"alice", "bob"}) for p in net.ends}
    assert all(c.log.warnings == ["round 4: dave did not finish within 0.2 s of the first owner; "
                                  "aggregating without them"] for c in net.ctx.values())


async def test_an_owner_in_only_some_cuts_is_left_out_everywhere_though_alive():
    """Under "drop", dave's TrainDone reached alice in time but bob and c1 only after their
    deadline: alice's and dave's cuts name him, bob's and c1's do not, so nobody aggregates him."""
    net = Deployment(["alice", "bob", "dave", "c1"], ["alice", "bob", "dave"], policy="drop", deadline=0.2)
    for owner in ("alice", "bob", "dave"):
        net.finish(owner)
    late = [m for m in net.in_flight if m.src == "dave" and m.dst in ("bob", "c1")]
    net.in_flight = [m for m in net.in_flight if m not in late]
    net.deliver_now()
    decided = await asyncio.wait_for(net.run(random.Random(2)), 20.0)
    assert net.cuts() == {"alice": ["alice", "bob", "dave"], "dave": ["alice", "bob", "dave"],
                          "bob": ["alice", "bob"], "c1": ["alice", "bob"]}
    assert decided == {p: frozenset({"alice", "bob"}) for p in net.ends}


async def test_with_the_wait_policy_a_straggler_is_waited_for():
    net = Deployment(["alice", "bob", "dave", "c1"], ["alice", "bob", "dave"], policy="wait", deadline=0.05)
    net.finish("alice")
    net.finish("bob")
    tasks = net.start()
    await deliver_all(net)
    assert not any(t.done() for t in tasks.values())
    net.finish("dave")
    await deliver_all(net)
    assert {p: await t for p, t in tasks.items()} == {p: frozenset({"alice", "bob", "dave"}) for p in net.ends}


async def test_no_owner_left_is_a_training_error():
    net = Deployment(["c1", "c2"], ["dave"], others=("dave",))
    decided = await net.run(random.Random(1), [lambda: net.gone("dave")])
    assert all(isinstance(e, TrainingError) and "no data owner finished" in str(e) for e in decided.values())


async def test_a_rejoining_owner_hears_the_cut_but_is_not_waited_for():
    net = Deployment(["alice", "c1"], ["alice"], audience=("erin",))
    net.finish("alice")
    decided = await net.run(random.Random(1))
    assert decided == {"alice": frozenset({"alice"}), "c1": frozenset({"alice"})}
    assert sorted(m.dst for m in net.delivered if isinstance(m, Cut) and m.src == "alice") == ["c1", "erin"]


async def test_an_owner_whose_round_end_fails_says_why_not_that_it_was_too_slow():
    """The owner stops training once the round's decision is out; when that decision is a
    failure, the failure is the news, and no straggler warning misleads the reader first."""
    from p2psl.runtime.roles.owner import DataOwner

    async def decide(round_):
        raise TrainingError("no data owner finished in time")

    async def train(round_):
        await asyncio.Event().wait()  # a round that would never end by itself

    owner = DataOwner.__new__(DataOwner)
    owner.ctx, owner.progress = SimpleNamespace(log=Log(), me="alice"), (0, 0.0)
    owner.round_end, owner.train = SimpleNamespace(decide=decide), train
    with pytest.raises(TrainingError, match="^no data owner finished in time$"):
        await owner.run_round(ROUND)
    assert owner.ctx.log.warnings == []


async def test_failing_an_owners_pending_batch_leaves_no_unretrieved_exception():
    import gc

    from p2psl.runtime.roles.owner import DataOwner

    loop, reported = asyncio.get_running_loop(), []
    loop.set_exception_handler(lambda loop, context: reported.append(context["message"]))
    owner = DataOwner.__new__(DataOwner)
    owner._pending = {}
    awaited = owner._expect("out", 1)
    owner._expect("grad", 1)
    owner._expect("grad", 2)
    owner.fail_pending(TrainingError("c1 cannot run layer 2"))
    with pytest.raises(TrainingError, match="c1 cannot run layer 2"):
        await awaited
    gc.collect()
    assert reported == [] and owner._pending == {}
