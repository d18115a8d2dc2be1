"""A peer the others went on without, and how it learns so.

[Note: left behind] A peer silent for `timeouts.dead` + `timeouts.gone` — frozen (SIGSTOP, a
blocked loop, a debugger) or cut off — has been counted gone, and the others went on without it.
When it comes back it must learn that, rather than go on as if nothing happened or blame the
others for what looks from its side like their disappearance:

* a peer that counts a neighbour gone and sees the same life of it reconnect tells it so (`Gone`
  about itself, `tell`), and the neighbour stops: the deployment went on without it;
* a peer watches its own event loop (`watch`): after a stall that long, any failure it meets
  next — its neighbours unreachable because they finished meanwhile, say — is reported as what
  it is: it was frozen, and left behind (`PeerState.stop_error`).
"""

from __future__ import annotations

import asyncio

from p2psl.errors import NotAdmitted, P2PSLError
from p2psl.runtime.state import Actions, PeerState
from p2psl.wire.messages import Gone


async def watch(state: PeerState) -> None:
    """Never returns: notes in `state.frozen` a stall of the event loop long enough for the others
    to have counted this peer gone (only once training started: before, nobody counts anyone)."""
    loop, t = asyncio.get_running_loop(), state.topology.timeouts
    tick = min(1.0, t.heartbeat)
    while True:
        before = loop.time()
        await asyncio.sleep(tick)
        stalled = loop.time() - before - tick
        if stalled > t.dead + t.gone and state.plan is not None:
            state.frozen = stalled
            state.log.warning("%s was frozen for %.0f s: the others have counted it gone", state.me, stalled)


async def tell(state: PeerState, actions: Actions, name: str) -> None:
    """Tell `name`, which we count gone and which reconnected as the same life, that it is gone."""
    gone = Gone(src=state.me, dst=name, peer=name, reason="it was out of reach for longer than timeouts.gone")
    try:
        await actions.send_anyway(gone, state.topology.timeouts.closing)  # to a peer counted gone
    except (P2PSLError, OSError):
        pass


def explain(state: PeerState, error: BaseException | None) -> None:
    """After a stall that left this peer behind, raise the stall as the cause of `error`."""
    if state.frozen and isinstance(error, P2PSLError) and not isinstance(error, NotAdmitted) \
            and "was frozen for" not in str(error):
        raise state.stop_error(str(error)) from None
