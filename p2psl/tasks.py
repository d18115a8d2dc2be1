"""Racing awaitables under one owner: the first to finish wins, the others are cancelled.

A peer often waits for whichever comes first — its rounds to end or a compute node to be lost,
its own work or another peer's abort. `first_completed` runs the contenders in one
`asyncio.TaskGroup`, so none outlives the race, whatever happens to the caller. A contender's
exception is the outcome of the race, not a failure of the group: the caller decides what to do
with it (`Outcome.result()` re-raises it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """How the winner of a race finished."""

    name: str
    value: Any = None
    error: Exception | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


async def first_completed(**contenders: Awaitable) -> Outcome:
    """Await every contender at once; return the first outcome and cancel the rest.

    A future passed in is shielded: it belongs to someone else, and losing the race must not
    cancel it (an abort that has not happened yet may still happen later)."""
    outcomes: list[Outcome] = []
    finished = asyncio.Event()

    async def run(name: str, contender: Awaitable) -> None:
        try:
            outcome = Outcome(name, value=await contender)
        except Exception as exc:  # the race's outcome, handed to the caller
            outcome = Outcome(name, error=exc)
        outcomes.append(outcome)
        finished.set()

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(run(name, asyncio.shield(c) if asyncio.isfuture(c) else c))
                 for name, c in contenders.items()]
        await finished.wait()
        for task in tasks:
            task.cancel()
    return outcomes[0]
