"""The collector of per-round values from several peers, without a network."""

from __future__ import annotations

import asyncio

import pytest

from p2psl.errors import PeerTimeout
from p2psl.runtime.roles.context import Collector


async def still_pending(task: asyncio.Future) -> bool:
    """Whether `task` still waits once everything ready to run has run (no clock involved)."""
    for _ in range(20):
        await asyncio.sleep(0)
    return not task.done()


async def test_gather_returns_the_expected_senders_values_once_all_are_in():
    c = Collector()
    c.put_nowait("eval_report", 1, "carol", "C")
    waiting = asyncio.ensure_future(c.gather("eval_report", 1, {"alice", "carol"}, 30.0))
    assert await still_pending(waiting)
    c.put_nowait("eval_report", 1, "zed", "Z")  # not expected: no help, not returned
    assert await still_pending(waiting)
    c.put_nowait("eval_report", 2, "alice", "A2")  # another round: no help either
    assert await still_pending(waiting)
    c.put_nowait("eval_report", 1, "alice", "A")
    assert await waiting == {"alice": "A", "carol": "C"}
    assert list((await waiting).keys()) == ["alice", "carol"]


async def test_a_peer_declared_gone_is_no_longer_waited_for():
    """The expected set is a function, asked again on `poke`."""
    c, live = Collector(), {"alice", "bob"}
    c.put_nowait("train_done", 1, "alice", "A")
    waiting = asyncio.ensure_future(c.gather("train_done", 1, lambda: set(live), 30.0))
    assert await still_pending(waiting)
    live.discard("bob")
    assert await still_pending(waiting)  # nobody told it yet
    c.poke()
    assert await waiting == {"alice": "A"}


async def test_the_timeout_names_the_peers_still_missing():
    c = Collector()
    c.put_nowait("cut", 3, "alice", "A")
    with pytest.raises(PeerTimeout) as caught:
        await c.gather("cut", 3, {"alice", "dave", "bob"}, 0.01, "every live peer sends its cut")
    assert str(caught.value) == "no cut for round 3 from bob, dave within 0.01 s (every live peer sends its cut)"


async def test_wait_any_returns_on_the_first_value():
    c = Collector()
    waiting = asyncio.ensure_future(c.wait_any("train_done", 2, 30.0))
    c.put_nowait("train_done", 1, "alice", "old round")
    assert await still_pending(waiting)
    c.put_nowait("train_done", 2, "bob", "B")
    await waiting


async def test_wait_any_timeout_says_nobody_came():
    with pytest.raises(PeerTimeout, match="no train_done for round 2 from anyone within 0.01 s"):
        await Collector().wait_any("train_done", 2, 0.01)


async def test_wait_change_wakes_on_put_and_on_poke():
    c = Collector()
    for wake in (lambda: c.put_nowait("t", 1, "a", 1), c.poke):
        waiting = asyncio.ensure_future(c.wait_change())
        assert await still_pending(waiting)
        wake()
        await waiting


def test_get_is_a_copy():
    c = Collector()
    c.put_nowait("t", 1, "a", 1)
    c.get("t", 1)["b"] = 2
    assert c.get("t", 1) == {"a": 1} and c.get("t", 9) == {}


def test_forget_by_topic_and_by_round():
    c = Collector()
    for topic in ("reduce_part", "cut"):
        for round_ in (1, 2, 3):
            c.put_nowait(topic, round_, "a", (topic, round_))
    c.forget(("reduce_part",), before=3)
    assert [r for r in (1, 2, 3) if c.get("reduce_part", r)] == [3]
    assert [r for r in (1, 2, 3) if c.get("cut", r)] == [1, 2, 3]
    c.forget(before=2)
    assert [r for r in (1, 2, 3) if c.get("cut", r)] == [2, 3]
    c.forget(("cut",))
    assert not any(c.get("cut", r) for r in (1, 2, 3)) and c.get("reduce_part", 3)
    c.forget()
    assert not c.get("reduce_part", 3)
