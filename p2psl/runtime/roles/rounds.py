"""How a round ends without a master: which owners' work is aggregated (the cut).

[Note: the cut] Every owner that finishes its local epochs sends `TrainDone` to every peer. A
peer stops waiting for more when every live participant has reported — or, with the "drop"
straggler policy, when `round_deadline` has passed since the first owner reported — and sends
every live peer its `Cut`: the owners it heard from. The owners aggregated are those in *every*
live peer's cut, so all peers aggregate the same owners whatever order messages arrived in.

An owner that dies before its `TrainDone` reached everyone is simply not in the intersection; an
owner declared gone stops being waited for. The owners' parts travel only after the cut, in the
owners' all-reduce among the included owners, which goes on without an owner that dies during it
([Note: an owner gone mid-all-reduce] in p2psl.runtime.roles.allreduce).
"""

from __future__ import annotations

from collections.abc import Callable

from p2psl.errors import PeerTimeout, TrainingError
from p2psl.wire.messages import Cut, EvalReport
from p2psl.runtime.roles.context import Context, Topic


class RoundEnd:
    def __init__(self, ctx: Context, live_participants: Callable[[], set[str]], live_peers: Callable[[], set[str]],
                 audience: Callable[[], set[str]] | None = None):
        self.ctx = ctx
        self.live_participants = live_participants  # owners of this round not declared gone
        self.live_peers = live_peers                # every peer not declared gone, this one included
        self.audience = audience or live_peers      # whom round messages go to (rejoining owners listen too)

    async def decide(self, round_: int) -> frozenset[str]:
        """The owners aggregated in `round_` (see [Note: the cut])."""
        ctx = self.ctx
        with ctx.tracer.span("wait for owners", "wait", round=round_):
            await self._wait_for_train_done(round_)
        have = sorted(set(ctx.collector.get(Topic.TRAIN_DONE, round_)) & self.live_participants())
        ctx.collector.put_nowait(Topic.CUT, round_, ctx.me, Cut(src=ctx.me, dst=ctx.me, epoch=ctx.epoch, round=round_,
                                                            owners=have))
        for peer in sorted(self.audience() - {ctx.me}):
            await ctx.send(Cut(src=ctx.me, dst=peer, epoch=ctx.epoch, round=round_, owners=have))
        with ctx.tracer.span("wait for cuts", "wait", round=round_):
            cuts = await ctx.collector.gather(Topic.CUT, round_, self.live_peers, ctx.timeouts.request,
                                              "every live peer sends its cut of the round")
        included = frozenset.intersection(*(frozenset(c.owners) for c in cuts.values())) & self.live_participants()
        if not included:
            raise TrainingError(f"round {round_}: no data owner finished in time to be aggregated")
        return included

    async def _wait_for_train_done(self, round_: int) -> None:
        ctx, cfg = self.ctx, self.ctx.training
        if cfg.straggler_policy == "wait" or cfg.round_deadline is None:
            await ctx.collector.gather(Topic.TRAIN_DONE, round_, self.live_participants, ctx.timeouts.round,
                                       "every owner finishes its local epochs")
            return
        # "drop": once the first owner is done, wait at most round_deadline for the others
        await ctx.collector.wait_any(Topic.TRAIN_DONE, round_, ctx.timeouts.round)
        try:
            await ctx.collector.gather(Topic.TRAIN_DONE, round_, self.live_participants, cfg.round_deadline)
        except PeerTimeout:  # the deadline passed: cut with whoever finished
            missing = sorted(self.live_participants() - set(ctx.collector.get(Topic.TRAIN_DONE, round_)))
            ctx.log.warning("round %d: %s did not finish within %.1f s of the first owner; aggregating without them",
                            round_, ", ".join(missing), cfg.round_deadline)


def check_reports(round_: int, reports: dict[str, EvalReport]) -> None:
    """Every owner must report the same aggregated owners and the same state digest."""
    views = {(tuple(r.included), r.digest) for r in reports.values()}
    if len(views) > 1:
        raise TrainingError(f"round {round_}: the owners aggregated different states "
                            f"({'; '.join(f'{n}: {r.included}' for n, r in reports.items())})")
