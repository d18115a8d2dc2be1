"""The owners' all-reduce: the chunks' arithmetic (p2psl.learning.allreduce) and the protocol
among owners (p2psl.runtime.roles.allreduce) over an in-memory network.

The network is the one of test_rounds: nothing arrives until the test delivers it, in an order
drawn at random, so every interleaving can be tried; an owner can die at a fixed point of the
all-reduce (its task ends there, as a process would, and what it had sent stays in flight) and
is declared gone at a random moment after.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psl.errors import RemoteProtocolError
from p2psl.learning.aggregate import fedavg
from p2psl.learning.allreduce import assemble, chunk_of, contiguous, layout, numels, reduce_chunk, reducers, state_bytes
from p2psl.planning.roundend import reducer_count
from p2psl.runtime.roles.allreduce import OwnersAllReduce
from p2psl.runtime.roles.context import Collector
from p2psl.wire.messages import ReducedPart, ReducePart, ReduceStatus, Routed

from tests.unit.test_rounds import Log, settle

ROUND = 3
NAMES = [f"o{i}" for i in range(7)]


def states(owners, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Uneven entries: odd sizes, a matrix, an integer counter, a scalar."""
    g = torch.Generator().manual_seed(seed)
    return {o: {"0.weight": torch.randn(5, 3, generator=g), "0.bias": torch.randn(7, generator=g),
                "0.running": torch.randint(0, 50, (), generator=g), "4.w": torch.randn(1, generator=g),
                "4.v": torch.randn(13, generator=g, dtype=torch.float64)} for o in owners}


def samples(owners) -> dict[str, int]:
    return {o: 10 + 7 * i for i, o in enumerate(owners)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# -- the arithmetic ----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 7, 40])
def test_the_chunks_cover_every_element_once_in_balanced_contiguous_pieces(k):
    sizes = numels(states(["a"])["a"])
    chunks = layout(sizes, k)
    total = sum(sizes.values())
    flat = [(key, i) for key in sorted(sizes) for i in range(sizes[key])]
    pieces = [(key, i) for spans in chunks for key, a, b in spans for i in range(a, b)]
    assert pieces == flat  # in order, each element once
    lengths = [sum(b - a for _, a, b in spans) for spans in chunks]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == total


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_the_average_of_the_chunks_is_fedavg_bit_for_bit(k):
    owners = NAMES[:k]
    full, weights = states(owners, seed=k), samples(owners)
    spans = layout(numels(full[owners[0]]), k)
    reduced = [reduce_chunk({o: chunk_of(full[o], spans[j]) for o in owners}, weights) for j in range(k)]
    out = assemble(contiguous({key: torch.empty_like(t) for key, t in full[owners[0]].items()}),
                   zip(spans, reduced))
    assert same(out, fedavg(full, weights))


# -- the protocol ------------------------------------------------------------------------------------

class Died(Exception):
    """An owner's process ended at its fault point."""


class DieAt:
    def __init__(self, step: int | None):
        self.step = step

    def reached(self, round_: int, step: int, at: str = "batch") -> None:
        if at == "reduce" and step == self.step:
            raise Died()


class Owners:
    """Owners' all-reduces over an in-memory network."""

    def __init__(self, owners: list[str], die: dict[str, int] | None = None, min_chunk: int = 1):
        self.live = set(owners)
        self.dead: set[str] = set()
        self.in_flight: list[Routed] = []
        self.sent_bytes = {o: 0 for o in owners}
        self.sends = asyncio.Event()
        self.states = states(owners)
        self.ar = {o: OwnersAllReduce(self._ctx(o, DieAt((die or {}).get(o))), lambda: set(self.live),
                                      self.states[o], min_chunk) for o in owners}

    def _ctx(self, me: str, faults) -> SimpleNamespace:
        async def send(msg: Routed) -> None:
            if me not in self.dead:
                self.in_flight.append(msg)
                self.sent_bytes[me] += sum(t.numel() * t.element_size() for t in getattr(msg, "state", {}).values())
                self.sends.set()

        async def run(name, fn, *args, **span):
            return fn(*args)

        return SimpleNamespace(me=me, epoch=0, collector=Collector(), send=send, faults=faults, log=Log(),
                               timeouts=SimpleNamespace(request=30.0), worker=SimpleNamespace(run=run))

    async def deliver(self, msg: Routed) -> None:
        if msg.dst not in self.dead:
            await self.ar[msg.dst].receive(msg, set(self.ar))

    def gone(self, owner: str) -> None:
        self.live.discard(owner)
        for ar in self.ar.values():
            ar.ctx.collector.poke()

    async def run(self, rnd: random.Random, included: list[str], actions: list = ()) -> dict:
        """Every owner's all-reduce of ROUND (owners outside `included` listen), delivering in an
        order drawn from `rnd` and doing `actions` meanwhile, sometimes two before the owners run
        again; each live owner's (members, average)."""
        tasks = {o: asyncio.ensure_future(ar.average(ROUND, included, {k: v.clone() for k, v in self.states[o].items()},
                                                     samples(self.ar)[o]))
                 for o, ar in self.ar.items()}
        actions = list(actions)
        while True:
            if rnd.random() < 0.7 or not (self.in_flight or actions):  # else two events reach the owners at once
                await settle()
            for o, t in tasks.items():
                if o not in self.dead and t.done() and isinstance(t.exception(), Died):
                    self.dead.add(o)  # declared gone later, at a moment drawn like a delivery
                    actions.append(lambda o=o: self.gone(o))
            if all(t.done() for o, t in tasks.items() if o not in self.dead) and not actions:
                break
            choices = len(self.in_flight) + len(actions)
            if not choices:
                await self._progress([t for t in tasks.values() if not t.done()])
                continue
            pick = rnd.randrange(choices)
            if pick < len(self.in_flight):
                await self.deliver(self.in_flight.pop(pick))
            else:
                actions.pop(pick - len(self.in_flight))()
        return {o: t.result() for o, t in tasks.items() if o not in self.dead}

    async def _progress(self, pending) -> None:
        self.sends.clear()
        sent = asyncio.ensure_future(self.sends.wait())
        await asyncio.wait([*pending, sent], timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
        sent.cancel()
        assert self.in_flight or any(t.done() for t in pending), "the owners wait for something that never comes"


def check_agreement(net: Owners, results: dict) -> list[str]:
    """Every live owner has the same members and the same bits, which are FedAvg over them."""
    views = {tuple(m) for m, _ in results.values()}
    assert len(views) == 1, views
    members = list(views.pop())
    expected = fedavg({m: net.states[m] for m in members}, {m: samples(net.ar)[m] for m in members})
    for owner, (_, average) in results.items():
        assert same(average, expected), owner
    return members


STATE_BYTES = 204  # of `states`: 15 + 7 + 1 floats, 13 doubles, one int64
#: the smallest chunk → how many of 7 owners reduce: every one (the butterfly), four, one
REDUCERS = {1: 7, 50: 4, 1000: 1}


def test_the_parts_are_cut_into_chunks_of_at_least_the_smallest_chunk():
    assert state_bytes(states(["a"])["a"]) == STATE_BYTES
    for min_chunk, count in REDUCERS.items():
        assert reducers(NAMES, STATE_BYTES, min_chunk) == tuple(NAMES[:count])
    assert reducers(NAMES[:2], STATE_BYTES, 50) == tuple(NAMES[:2])
    assert reducer_count(144 * 1024, 100) == 2 and reducer_count(8 * 2**20, 64) == 64 and reducer_count(10, 3) == 1


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("min_chunk", sorted(REDUCERS))
@settings(max_examples=15, deadline=None)
@given(rnd=st.randoms(use_true_random=False))
def test_every_owner_gets_fedavg_bit_for_bit_and_sends_a_chunk_to_each_reducer(k, min_chunk, rnd):
    """Each owner sends a chunk to each reducer, and a reducer its average to every other
    owner: with R = K, (K − 1)/K of the parts out in each phase, whatever K."""
    net = Owners(NAMES[:k], min_chunk=min_chunk)
    results = asyncio.run(net.run(rnd, NAMES[:k]))
    assert check_agreement(net, results) == NAMES[:k]
    like = net.states["o0"]
    spans = layout(numels(like), min(k, REDUCERS[min_chunk]))
    chunk = [sum((b - a) * like[key].element_size() for key, a, b in piece) for piece in spans]
    for j, owner in enumerate(NAMES[:k]):
        mine = chunk[j] if j < len(chunk) else 0
        assert net.sent_bytes[owner] == sum(chunk) - mine + (k - 1) * mine
    if min_chunk == 1:  # the butterfly: (K − 1)/K of the parts out in each phase, give or take rounding
        assert all(abs(net.sent_bytes[o] - 2 * (k - 1) / k * STATE_BYTES) <= 2 * 8 * k for o in NAMES[:k])
    assert not any(w for ar in net.ar.values() for w in ar.ctx.log.warnings)


@settings(max_examples=30, deadline=None)
@given(rnd=st.randoms(use_true_random=False))
def test_an_owner_left_out_of_the_cut_takes_the_same_average(rnd):
    owners = NAMES[:4]
    net = Owners(owners)
    results = asyncio.run(net.run(rnd, owners[:3]))
    assert check_agreement(net, results) == owners[:3] and set(results) == set(owners)


@pytest.mark.parametrize("step", [1, 2])
@settings(max_examples=40, deadline=None)
@given(rnd=st.randoms(use_true_random=False), k=st.sampled_from([2, 3, 4, 5, 7]), min_chunk=st.sampled_from([1, 50]))
def test_an_owner_that_dies_mid_all_reduce_leaves_the_others_in_agreement(step, rnd, k, min_chunk):
    """o1 (a reducer) dies once its chunks are out (step 1: nobody can have its average; the
    others average again without it) or once its averaged chunk reached one owner (step 2:
    whether that owner passes it on or not, all agree), and is declared gone at a random moment
    after; every owner reduces, or the first four."""
    owners = NAMES[:k]
    net = Owners(owners, die={"o1": step}, min_chunk=min_chunk)
    results = asyncio.run(net.run(rnd, owners))
    members = check_agreement(net, results)
    assert set(results) == set(owners) - {"o1"}
    if step == 1:
        assert members == [o for o in owners if o != "o1"]


@settings(max_examples=40, deadline=None)
@given(rnd=st.randoms(use_true_random=False), k=st.sampled_from([4, 5, 7]),
       steps=st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2])), min_chunk=st.sampled_from([1, 50]))
def test_two_owners_that_die_in_one_all_reduce_leave_the_others_in_agreement(rnd, k, steps, min_chunk):
    """o1 and o3 die at their points and are declared gone at moments drawn independently: the
    others may freeze different attempts on the way, and still end on the same one."""
    owners = NAMES[:k]
    net = Owners(owners, die={"o1": steps[0], "o3": steps[1]}, min_chunk=min_chunk)
    results = asyncio.run(net.run(rnd, owners))
    members = check_agreement(net, results)
    assert set(results) == set(owners) - {"o1", "o3"}
    assert set(members) >= set(owners) - {"o1", "o3"}


@settings(max_examples=40, deadline=None)
@given(rnd=st.randoms(use_true_random=False), k=st.sampled_from([5, 7]), step=st.sampled_from([1, 2]))
def test_an_owner_that_reduces_nothing_dies_mid_all_reduce_and_the_others_agree(rnd, k, step):
    """o4 (not among the four reducers) dies once its chunks are out, and the first reducer once
    its chunks are out (nobody can have chunk 0: the others average again without o0) or once
    its average reached one owner; each is declared gone at a random moment after."""
    owners = NAMES[:k]
    net = Owners(owners, die={"o4": 1, "o0": step}, min_chunk=50)
    results = asyncio.run(net.run(rnd, owners))
    members = check_agreement(net, results)
    assert set(results) == set(owners) - {"o0", "o4"}
    assert set(members) >= set(owners) - {"o0", "o4"}
    if step == 1:
        assert "o0" not in members


def test_a_chunk_of_the_wrong_layout_is_refused():
    net = Owners(NAMES[:3])
    bad = ReducePart(src="o0", dst="o1", epoch=0, round=ROUND, members=NAMES[:3], samples=1,
                     state={"0.bias": torch.zeros(2)})
    with pytest.raises(RemoteProtocolError, match="not the expected"):
        asyncio.run(net.ar["o1"].receive(bad, set(NAMES[:3])))
    stranger = ReducedPart(src="o0", dst="o1", epoch=0, round=ROUND, members=NAMES[:3], reducer="o5", state={})
    with pytest.raises(RemoteProtocolError, match="reduces no chunk"):
        asyncio.run(net.ar["o1"].receive(stranger, set(NAMES[:3])))
    unsorted = ReduceStatus(src="o0", dst="o1", epoch=0, round=ROUND, members=["o2", "o0"], held=[])
    with pytest.raises(RemoteProtocolError, match="sorted"):
        asyncio.run(net.ar["o1"].receive(unsorted, set(NAMES[:3])))


def test_an_owner_that_completes_with_a_status_already_held_answers_it():
    """o0 holds every chunk but o1's; o1 died once its averaged chunk was on its way to o0, and
    o2, lacking that chunk and seeing o1 gone, froze the attempt. o1's chunk and o2's status reach
    o0 before it runs again: it completes, and must still answer the status (and serve o2 the
    chunk), or o2 waits for it in vain."""
    async def scenario() -> dict:
        owners = NAMES[:3]
        net = Owners(owners, die={"o1": 2})
        tasks = {o: asyncio.ensure_future(ar.average(ROUND, owners, {k: v.clone() for k, v in net.states[o].items()},
                                                     samples(net.ar)[o]))
                 for o, ar in net.ar.items()}

        async def deliver(which) -> None:
            for msg in [m for m in net.in_flight if which(m)]:
                net.in_flight.remove(msg)
                await net.deliver(msg)

        await settle()
        await deliver(lambda m: isinstance(m, ReducePart))          # every chunk to its reducer
        await settle()
        assert isinstance(tasks["o1"].exception(), Died)          # o1's average went to o0 only
        net.dead.add("o1")
        held_back = lambda m: m.dst == "o0" and isinstance(m, ReducedPart)
        await deliver(lambda m: not held_back(m))                 # o2 has o0's chunk, not o1's
        await settle()
        net.ar["o2"].live_owners = lambda: {"o0", "o2"}            # o2 sees o1 gone, o0 not yet:
        net.ar["o2"].ctx.collector.poke()                         # o2 freezes, its status to o0
        await settle()
        await deliver(lambda m: held_back(m) or isinstance(m, ReduceStatus))  # at once, no turn between
        await settle()
        net.gone("o1")                                            # o0 sees it too, later
        for _ in range(50):
            await settle()
            if all(t.done() for o, t in tasks.items() if o != "o1"):
                break
            await deliver(lambda m: True)
        return {o: t.result() for o, t in tasks.items() if o != "o1" and t.done()}

    results = asyncio.run(scenario())
    assert set(results) == {"o0", "o2"}
    assert [m for m, _ in results.values()] == [NAMES[:3]] * 2   # o0 completed; o2 completes it by the statuses
