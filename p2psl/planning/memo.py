"""Answers kept by their inputs, for the peers of one process. Pure: no I/O.

[Note: one answer per process] Peers that share a process (`p2psl run --in-process`) plan and
predict the same deployment from the same inputs at the same moments: at start, at every round
end's calibration, when re-planning. Computing it once per peer made a hundred peers take turns
on the interpreter for minutes while their heartbeats went unanswered, so links were declared
dead. A `Memo` keeps the latest answers by their full inputs (frozen values compared by
equality: the topology with its peers, links and training, every profile and sample count); its
lock makes the others wait, blocked and off the interpreter, for the first one's answer. The
functions kept are pure, so a kept answer is exactly what computing again would give, and each
caller gets its own copy, free to change.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any


class Memo:
    """The `size` latest answers of one pure function, shared by the threads of a process."""

    def __init__(self, size: int):
        self._kept: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            answer = self._kept.get(key)
            if answer is None:
                answer = self._kept[key] = compute()
                while len(self._kept) > self._size:
                    self._kept.popitem(last=False)
            self._kept.move_to_end(key)
        return copy.deepcopy(answer)


def items(mapping: Mapping | None) -> tuple | None:
    """A mapping as a key: its items in order (None stays None)."""
    return None if mapping is None else tuple(sorted(mapping.items()))
