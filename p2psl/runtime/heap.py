"""Settling the heap once a process's peers train.

[Note: a settled heap] Start-up leaves a process with millions of objects that live as long as
it does: torch and the runtime's modules, the model's layers, the data, the profiles. Python's
cyclic collector visits every one of them in each full collection, which it runs whenever the
objects that outlived two younger collections have grown by a quarter: about once a round per
peer, and a dozen times a round in a process holding a hundred peers, where each took half a
second (measured: 30 s of 150 in five rounds of topologies/hundred_owners.toml). Once every peer
of the process has started training, `Settle` collects what start-up left behind and freezes
the rest (`gc.freeze`), and runs a full collection after a hundred middle-generation ones, not
ten: full collections then come rarer and visit only what training allocates. Young collections
come after 10,000 allocations, not 700: training allocates and frees a great many short-lived
containers (messages, their maps, futures), which reference counting frees anyway, and each
young collection visits the ones still alive; in six rounds of the hundred owners in one process
the collector's time went from 17 s to 9 s. Reference
counting still frees frozen objects that are released; only a reference cycle among them would
stay (start-up's cycles are collected just before; one that a frozen object joins later, a
replaced connection's say, is not). A peer that never trains (one that failed at start-up)
never calls, so its process is not settled.
"""

from __future__ import annotations

import gc

#: middle-generation collections between two full ones, once training (Python's default: 10)
FULL_AFTER = 100
#: net allocations between two young collections, once training (Python's default: 700)
YOUNG_AFTER = 10_000


class Settle:
    """Called by each peer of a process when it starts training; the last call of `peers`
    collects and freezes the heap."""

    def __init__(self, peers: int = 1):
        self.waiting = peers

    def __call__(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            gc.collect()
            gc.freeze()
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(max(young, YOUNG_AFTER), middle, FULL_AFTER)
