"""The owners' FedAvg at the end of a round, without a master: a butterfly all-reduce over the
owners of the round's cut ([Note: the owners' all-reduce] in p2psl.learning.allreduce).

An *attempt* is the all-reduce among `members`, sorted names: the round's included owners at
first. Its reducers are the first R members (`reducers`: every member unless the parts are small,
[Note: fewer reducers for small parts]). Each member sends chunk j of its parts to reducer j
(`ReducePart`); reducer j averages its chunk and sends it to every other live owner of the plan
(`ReducedPart`); every owner, member or not (a straggler left out of the cut still takes the
average), assembles the R chunks.

[Note: an owner gone mid-all-reduce] An owner that holds every chunk of an attempt has its
result, the same bits as everyone who completes it. When a member is gone before everyone has
every chunk, the owners must agree whether the attempt still completes. An owner that notices —
a member of the attempt declared gone while it waits, or another owner's `ReduceStatus` of the
attempt — *freezes* the attempt: it sends every live owner its status (the reducers whose chunk
it holds) and from then on completes the attempt only by the rule below, whatever arrives later.
An owner that had completed the attempt answers a status with its own (it holds every chunk).
Once it has the status of every live owner, each decides alike: if together they hold every
chunk, the attempt completes — for each chunk an owner lacks, the first owner by name that holds
it sends it — and otherwise nobody can have completed it (whoever had would hold every chunk),
so every owner tries again with the members still live. An owner whose attempts skipped one that
another froze answers that one's status with an empty one. Agreement rests on every owner
eventually declaring the same owners gone, as for the cut; the reports' digests check it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from torch import Tensor

from p2psl.errors import PeerTimeout, RemoteProtocolError, TrainingError
from p2psl.learning.allreduce import assemble, check_chunk, chunk_of, layout, numels, reduce_chunk, reducers, state_bytes
from p2psl.planning.roundend import MIN_CHUNK_BYTES
from p2psl.runtime.roles.context import Context, Topic
from p2psl.wire.messages import ReducedPart, ReducePart, ReduceStatus


class _Interrupted(Exception):
    """A member of the attempt is gone, or another owner froze it: settle it by statuses."""


def attempt_key(members) -> str:
    return ",".join(members)


class OwnersAllReduce:
    """One owner's side of the all-reduces, round after round."""

    def __init__(self, ctx: Context, live_owners: Callable[[], set[str]], like: dict[str, Tensor],
                 min_chunk: int = MIN_CHUNK_BYTES):
        self.ctx, self.live_owners = ctx, live_owners
        self.like, self.numels = like, numels(like)      # the parts' layout: keys, sizes, dtypes
        self.nbytes, self.min_chunk = state_bytes(like), min_chunk
        self.round, self.members = 0, ()                  # the attempt this owner is in (or completed last)
        self.done: tuple[int, tuple[str, ...], dict[str, Tensor]] | None = None
        self.statused: set[tuple[int, str]] = set()       # attempts this owner has sent its status of
        self._tasks: set[asyncio.Task] = set()

    # -- the whole all-reduce ------------------------------------------------------------------
    async def average(self, round_: int, included, state: dict[str, Tensor], samples: int) -> tuple[list[str], dict]:
        """The members of the attempt that completed and its average (assembled into `state`, a
        contiguous copy of this owner's parts, which contributes if this owner is a member)."""
        members, self.done = sorted(included), None
        self.round = round_
        self.statused = {s for s in self.statused if s[0] >= round_}
        while True:
            self.members = tuple(members)
            result = await self._attempt(round_, members, state, samples)
            if result is not None:
                self.done = (round_, tuple(members), result)
                if self._frozen(round_, attempt_key(members)):  # a status that came with the last chunk
                    await self._answer(round_, members)
                self.ctx.collector.forget((Topic.REDUCE_PART, Topic.REDUCED_PART), before=round_ + 1)
                return members, result
            survivors = sorted(set(members) & self.live_owners())
            gone = sorted(set(members) - set(survivors))
            self.ctx.log.warning("round %d: the owners' average among %d owners could not complete; again without %s",
                                 round_, len(members), ", ".join(gone) or "nobody")
            if not survivors or survivors == members:
                raise TrainingError(f"round {round_}: the owners could not agree on their average")
            await self._skip(round_, members, survivors)
            members = survivors

    def reducers(self, members: list[str]) -> list[str]:
        """The members that reduce a chunk of an attempt ([Note: fewer reducers for small parts])."""
        return list(reducers(members, self.nbytes, self.min_chunk))

    def spans(self, members: list[str]):
        return layout(self.numels, len(self.reducers(members)))

    async def _attempt(self, round_: int, members: list[str], state: dict, samples: int) -> dict | None:
        ctx, spans, chunked = self.ctx, self.spans(members), self.reducers(members)
        try:
            if ctx.me in members:
                await self._scatter(round_, members, spans, state, samples)
                ctx.faults.reached(round_, 1, "reduce")
            if ctx.me in chunked:
                parts = await self._wait(Topic.REDUCE_PART, round_, members, members, interrupt=True)
                reduced = await ctx.worker.run("aggregate", reduce_chunk, {m: p.state for m, p in parts.items()},
                                               {m: float(p.samples) for m, p in parts.items()}, round=round_)
                del parts
                await self._broadcast(round_, members, ctx.me, reduced)
            chunks = await self._wait(Topic.REDUCED_PART, round_, members, chunked, interrupt=True)
        except _Interrupted:
            return await self._recover(round_, members, state)
        return await self._assemble(round_, members, spans, state, chunks)

    async def _scatter(self, round_: int, members: list[str], spans, state: dict, samples: int) -> None:
        """Chunk j of this owner's parts to reducer j (its own chunk straight to its collector)."""
        ctx = self.ctx
        for j, member in enumerate(self.reducers(members)):
            part = ReducePart(src=ctx.me, dst=member, epoch=ctx.epoch, round=round_, members=list(members),
                              samples=samples, state=chunk_of(state, spans[j]))
            if member == ctx.me:
                ctx.collector.put_nowait(Topic.REDUCE_PART, round_, f"{attempt_key(members)}|{ctx.me}", part)
            else:
                await ctx.send(part)

    async def _broadcast(self, round_: int, members: list[str], reducer: str, chunk: dict) -> None:
        """A reduced chunk to every other live owner (members, and owners left out of the cut)."""
        ctx = self.ctx
        msg = dict(epoch=ctx.epoch, round=round_, members=list(members), reducer=reducer, state=chunk)
        ctx.collector.put_nowait(Topic.REDUCED_PART, round_, f"{attempt_key(members)}|{reducer}",
                                 ReducedPart(src=ctx.me, dst=ctx.me, **msg))
        for n, owner in enumerate(sorted(self.live_owners() - {ctx.me})):
            await ctx.send(ReducedPart(src=ctx.me, dst=owner, **msg))
            if n == 0:
                ctx.faults.reached(round_, 2, "reduce")

    async def _assemble(self, round_: int, members: list[str], spans, state: dict, chunks: dict) -> dict:
        pieces = [(spans[j], chunks[m].state) for j, m in enumerate(self.reducers(members))]
        return await self.ctx.worker.run("assemble", assemble, state, pieces, round=round_)

    async def _wait(self, topic: Topic, round_: int, members: list[str], senders, interrupt: bool = False,
                    why: str = "the owners' all-reduce") -> dict:
        """The values of `senders` (a set, or a function giving it) for this attempt; with
        `interrupt`, _Interrupted as soon as a member is gone or another owner froze the attempt."""
        ctx, key = self.ctx, attempt_key(members)
        expected = senders if callable(senders) else (lambda: set(senders))
        try:
            async with asyncio.timeout(ctx.timeouts.request):
                while True:
                    have = ctx.collector.get(topic, round_)
                    if all(f"{key}|{s}" in have for s in expected()):
                        return {s: have[f"{key}|{s}"] for s in sorted(expected())}
                    if interrupt and (not set(members) <= self.live_owners() or self._frozen(round_, key)):
                        raise _Interrupted()
                    await ctx.collector.wait_change()
        except TimeoutError:
            have = ctx.collector.get(topic, round_)
            missing = sorted(s for s in expected() if f"{key}|{s}" not in have)
            raise PeerTimeout(f"round {round_}: no {topic} from {', '.join(missing)} within "
                              f"{ctx.timeouts.request:g} s ({why})") from None

    def _frozen(self, round_: int, key: str) -> bool:
        mine = f"{key}|{self.ctx.me}"
        return any(k.startswith(f"{key}|") and k != mine for k in self.ctx.collector.get(Topic.REDUCE_STATUS, round_))

    # -- an owner gone mid-all-reduce ([Note: an owner gone mid-all-reduce]) -------------------
    async def _recover(self, round_: int, members: list[str], state: dict) -> dict | None:
        ctx, key = self.ctx, attempt_key(members)
        have, chunked = ctx.collector.get(Topic.REDUCED_PART, round_), self.reducers(members)
        held = [m for m in chunked if f"{key}|{m}" in have]
        await self._send_status(round_, members, held)
        statuses = await self._wait(Topic.REDUCE_STATUS, round_, members, self.live_owners,
                                    why="every live owner's status of a frozen all-reduce")
        holders = {m: sorted(o for o, s in statuses.items() if m in s.held) for m in chunked}
        if not all(holders.values()):
            return None
        chunks = {m: have[f"{key}|{m}"] for m in held}
        await self._serve(round_, members, statuses, holders, lambda m: chunks[m].state)
        missing = [m for m in chunked if m not in held]
        chunks.update(await self._wait(Topic.REDUCED_PART, round_, members, missing,
                                       why="averaged chunks from the owners that hold them"))
        return await self._assemble(round_, members, self.spans(members), state, chunks)

    async def _send_status(self, round_: int, members: list[str], held: list[str]) -> None:
        ctx = self.ctx
        self.statused.add((round_, attempt_key(members)))
        fields = dict(epoch=ctx.epoch, round=round_, members=list(members), held=list(held))
        ctx.collector.put_nowait(Topic.REDUCE_STATUS, round_, f"{attempt_key(members)}|{ctx.me}",
                                 ReduceStatus(src=ctx.me, dst=ctx.me, **fields))
        for owner in sorted(self.live_owners() - {ctx.me}):
            await ctx.send(ReduceStatus(src=ctx.me, dst=owner, **fields))

    async def _serve(self, round_: int, members: list[str], statuses: dict, holders: dict,
                     chunk: Callable[[str], dict]) -> None:
        """Each chunk an owner lacks, from the first owner by name that holds it."""
        ctx = self.ctx
        for owner, status in sorted(statuses.items()):
            for reducer in self.reducers(members):
                if owner != ctx.me and reducer not in status.held and holders[reducer][0] == ctx.me:
                    await ctx.send(ReducedPart(src=ctx.me, dst=owner, epoch=ctx.epoch, round=round_,
                                               members=list(members), reducer=reducer, state=chunk(reducer)))

    async def _serve_done(self, round_: int, members: list[str]) -> None:
        """Another owner froze the attempt this owner completed: say so, and serve."""
        _, _, average = self.done
        spans, chunked = self.spans(members), self.reducers(members)
        await self._send_status(round_, members, chunked)
        statuses = await self._wait(Topic.REDUCE_STATUS, round_, members, self.live_owners,
                                    why="every live owner's status of a frozen all-reduce")
        holders = {m: sorted(o for o, s in statuses.items() if m in s.held) for m in chunked}
        await self._serve(round_, members, statuses, holders, lambda m: chunk_of(average, spans[chunked.index(m)]))

    async def _skip(self, round_: int, old: list[str], new: list[str]) -> None:
        """Attempts between `old` and `new` that others froze: this owner never completes them."""
        for status in list(self.ctx.collector.get(Topic.REDUCE_STATUS, round_).values()):
            if set(new) < set(status.members) < set(old):
                await self._skip_one(round_, status.members)

    async def _skip_one(self, round_: int, members: list[str]) -> None:
        if (round_, attempt_key(members)) not in self.statused:
            await self._send_status(round_, members, [])

    # -- messages --------------------------------------------------------------------------------
    async def receive(self, msg: ReducePart | ReducedPart | ReduceStatus, owners: set[str]) -> None:
        """Check a message of the all-reduce (from an owner of the plan, `owners`) and keep it."""
        ctx, members = self.ctx, list(msg.members)
        if members != sorted(set(members)) or not set(members) <= owners or msg.src not in owners:
            raise RemoteProtocolError(f"{msg.KIND}: members must be sorted owners of the plan", "bad_value")
        key = attempt_key(members)
        if isinstance(msg, ReduceStatus):
            if not set(msg.held) <= set(self.reducers(members)):
                raise RemoteProtocolError("reduce_status: held must name reducers of its members", "bad_value")
            ctx.collector.put_nowait(Topic.REDUCE_STATUS, msg.round, f"{key}|{msg.src}", msg)
            await self._answer(msg.round, members)
            return
        owner = ctx.me if isinstance(msg, ReducePart) else msg.reducer
        if isinstance(msg, ReducePart) and msg.src not in members:
            raise RemoteProtocolError(f"reduce_part: {msg.src} is not a member of the average it contributes to",
                                      "bad_value")
        chunked = self.reducers(members)
        if owner not in chunked:
            raise RemoteProtocolError(f"{msg.KIND}: {owner} reduces no chunk among its members", "bad_value")
        try:
            check_chunk(msg.state, self.spans(members)[chunked.index(owner)], self.like)
        except ValueError as exc:
            raise RemoteProtocolError(f"{msg.KIND} from {msg.src}: {exc}", "bad_value") from None
        if isinstance(msg, ReducePart):
            ctx.collector.put_nowait(Topic.REDUCE_PART, msg.round, f"{key}|{msg.src}", msg)
        else:
            ctx.collector.put_nowait(Topic.REDUCED_PART, msg.round, f"{key}|{owner}", msg)

    async def _answer(self, round_: int, members: list[str]) -> None:
        """A status of an attempt this owner completed, or skipped, needs an answer now; one of
        the attempt it is in (or has yet to reach) is seen by its own wait."""
        if (round_, attempt_key(members)) in self.statused or round_ != self.round:
            return
        if self.done is not None and self.done[:2] == (round_, tuple(members)):
            self.statused.add((round_, attempt_key(members)))
            task = asyncio.ensure_future(self._serve_done(round_, members))
            self._tasks.add(task)
            task.add_done_callback(self._served)
        elif set(self.members) < set(members):
            await self._skip_one(round_, members)

    def _served(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.ctx.log.warning("could not serve the owners' average: %s", task.exception())
