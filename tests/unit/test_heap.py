"""[Note: a settled heap]: the heap is frozen once, when the last peer of the process trains."""

from __future__ import annotations

import gc
import weakref

from p2psl.runtime.heap import Settle


class _Cycle:
    def __init__(self):
        self.me = self


def test_the_last_peer_to_train_collects_start_up_cycles_and_freezes_the_rest():
    assert gc.get_freeze_count() == 0
    threshold = gc.get_threshold()
    gc.disable()  # only Settle collects here
    settle = Settle(peers=2)
    kept = [object() for _ in range(10)] + [[] for _ in range(10)]
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage
    try:
        settle()
        assert gc.get_freeze_count() == 0 and gone() is not None   # one peer of two: nothing yet
        settle()
        assert gc.get_freeze_count() >= 10                     # the lists kept alive, frozen
        assert gone() is None                                  # start-up's cycle collected, not frozen
        assert kept
    finally:
        assert gc.get_threshold()[2] > threshold[2]             # full collections rarer from now on
        assert gc.get_threshold()[0] >= 10_000                  # and young ones
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.enable()


def test_the_full_collection_comes_when_the_last_peer_holds_its_plan_and_the_freeze_when_it_trains():
    """Collecting before the plans are proposed: the proposals line every peer up after the
    pause, so round 1 starts together ([Note: a settled heap])."""
    threshold = gc.get_threshold()
    gc.disable()
    settle = Settle(peers=2)
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage
    try:
        settle.planned()
        assert gone() is not None                        # one peer of two holds its plan
        settle.planned()
        assert gone() is None and gc.get_freeze_count() == 0  # collected, not frozen yet
        late = _Cycle()  # start-up garbage made after the collection (building the parts)
        late_gone = weakref.ref(late)
        del late
        settle()
        settle()
        assert late_gone() is None                       # the younger generations, collected
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.enable()


def test_the_freeze_collects_only_the_younger_generations_after_a_full_collection(monkeypatch):
    """The freeze must not pause every peer again for a full collection once one ran before the
    plans were proposed; a process whose peers planned nothing (it rejoined) still gets one."""
    from p2psl.runtime import heap

    generations = []
    monkeypatch.setattr(heap.gc, "collect", lambda generation=2: generations.append(generation))
    monkeypatch.setattr(heap.gc, "freeze", lambda: None)
    monkeypatch.setattr(heap.gc, "set_threshold", lambda *args: None)
    planned = Settle(peers=1)
    planned.planned()
    planned()
    assert generations == [2, 1]
    generations.clear()
    rejoined = Settle(peers=1)
    rejoined()
    assert generations == [2]
