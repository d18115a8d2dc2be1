"""Settling the heap once a process's peers hold their plan and train.

[Note: a settled heap] Start-up leaves a process with millions of objects that live as long as
it does: torch and the runtime's modules, the model's layers, the data, the profiles. Python's
cyclic collector visits every one of them in each full collection, which it runs whenever the
objects that outlived two younger collections have grown by a quarter: about once a round per
peer, and a dozen times a round in a process holding a hundred peers, where each took half a
second (measured: 30 s of 150 in five rounds of topologies/hundred_owners.toml). `Settle`
collects what start-up left behind once every peer of the process holds its plan, freezes the
rest (`gc.freeze`) once every peer has started training, and from then on runs a full
collection after a hundred middle-generation ones, not
ten: full collections then come rarer and visit only what training allocates. Young collections
come after 10,000 allocations, not 700: training allocates and frees a great many short-lived
containers (messages, their maps, futures), which reference counting frees anyway, and each
young collection visits the ones still alive; in six rounds of the hundred owners in one process
the collector's time went from 17 s to 9 s.

The full collection itself (about 0.12 s for one peer's process, alone on a core) runs once every
peer of the process holds its plan, before it proposes it (`Settle.planned`), not when training
starts: the proposals that follow line every peer of the deployment up again, so the pause does
not stagger round 1. Collected after building, each process's pause (longer on shared cores) came
between the agreement and its first task: compute nodes started round 1 up to 0.15 s after the
first owners, whose round 1 then took that much longer than the others (the digits CNN with 4
owners and 2 nodes: 0.61 s against 0.43–0.46 s). A peer that rejoins, and so plans nothing,
has its process collect when it trains. Between the full collection and the freeze only the
younger generations are collected, so a garbage cycle made while the parts are built and old
enough by then to be in the oldest generation is frozen with the rest (a few objects, kept for
the process's life). Reference counting still frees frozen objects that are released; only a
reference cycle among them would stay (start-up's cycles are collected before; one that a frozen
object joins later, a replaced connection's say, is not). A peer that never trains (one that failed at start-up)
never calls, so its process is not settled.
"""

from __future__ import annotations

import gc

#: middle-generation collections between two full ones, once training (Python's default: 10)
FULL_AFTER = 100
#: net allocations between two young collections, once training (Python's default: 700)
YOUNG_AFTER = 10_000


class Settle:
    """Called by each peer of a process: `planned` once it holds its plan, then the instance
    itself once it starts training. The last peer of `peers` to plan collects the garbage of
    start-up; the last to train freezes the heap (collecting first if nobody planned)."""

    def __init__(self, peers: int = 1):
        self.planning = self.waiting = peers
        self.collected = False

    def planned(self) -> None:
        self.planning -= 1
        if self.planning == 0:
            gc.collect()
            self.collected = True

    def __call__(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            gc.collect(1 if self.collected else 2)  # after a full one, the younger generations suffice
            gc.freeze()
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(max(young, YOUNG_AFTER), middle, FULL_AFTER)
