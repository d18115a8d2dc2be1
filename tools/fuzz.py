#!/usr/bin/env python3
"""Fuzz p2psl for longer than CI does: the codec, both sides of the handshake, and a live peer.

    .venv/bin/python tools/fuzz.py --minutes 10

Needs the test extras (hypothesis). Prints how many inputs each target took and stops at the
first one that ends in anything but a typed refusal (its input is printed to reproduce it).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ModuleNotFoundError:  # pragma: no cover - said to the user, not tested
    sys.exit("tools/fuzz.py needs the test extras: .venv/bin/pip install -c constraints.txt -e '.[test]'")

from tests.fuzzing import decode_outcome, dialler_outcome, hostile_frames, listener_outcome

TYPED = {"ok", "bad_frame", "bad_header", "version", "unknown_kind", "bad_tensor", "too_large", "bad_chunk"}


def run_target(name: str, check, seconds: float) -> int:
    """Batches of 200 fresh hypothesis examples until the time is up."""
    count = 0

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile_frames(), max_size=4))
    def target(frames):
        nonlocal count
        count += 1
        check(frames)

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        target()
    print(f"{name:<10} {count:>9} inputs, no crash", flush=True)
    return count


async def live_peer(seconds: float) -> int:
    """Random frames at a real peer over real sockets, pre- and post-authentication; it must keep
    serving its legitimate neighbour throughout."""
    from p2psl.wire.messages import Greeting
    from p2psl.net.network import Network
    from p2psl.net.transport import dial
    from tests.helpers import make_topology

    topology = make_topology(["alice"], ["c1"], timeouts={"heartbeat": "0.5s", "dead": "3s"})
    inbox: asyncio.Queue = asyncio.Queue()
    nets = {n: Network(topology, n, b"s", inbox.put if n == "c1" else _ignore, addresses={n: ("127.0.0.1", 0)})
            for n in ("alice", "c1")}
    for net in nets.values():
        await net.listen()
    ports = {n: ("127.0.0.1", net.port) for n, net in nets.items()}
    for net in nets.values():
        net.connect(ports)
    await nets["alice"].wait_connected(timeout=10)
    rng, count, deadline = random.Random(0), 0, time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            link = await dial("127.0.0.1", nets["c1"].port, 2)
            for _ in range(rng.randint(1, 5)):
                try:
                    await link.send(rng.randbytes(rng.randint(0, 400)))
                except Exception:
                    break
                count += 1
            await link.close()
            await nets["alice"].send(Greeting(src="alice", dst="c1", role="data_owner", completed_round=0,
                                              resume=False, dataset={}))
            async with asyncio.timeout(5):
                await inbox.get()  # the legitimate neighbour is still served
    finally:
        for net in nets.values():
            await net.stop()
    print(f"{'live peer':<10} {count:>9} frames, still serving")
    return count


async def _ignore(message) -> None:
    return None


def main() -> None:
    import logging

    logging.getLogger("p2psl").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="total time, shared by the targets")
    args = parser.parse_args()
    if not args.minutes > 0:
        parser.error(f"--minutes must be positive, got {args.minutes:g}")
    share = args.minutes * 60 / 4
    run_target("codec", lambda frames: _expect(decode_outcome(frames), TYPED), share)
    run_target("listener", lambda frames: _expect(listener_outcome(frames), {"refused", "broken"}), share)
    run_target("dialler", lambda frames: _expect(dialler_outcome(frames), {"refused", "broken"}), share)
    asyncio.run(live_peer(share))


def _expect(outcome: str, allowed: set[str]) -> None:
    if outcome not in allowed:
        raise AssertionError(f"unexpected outcome {outcome!r}")


if __name__ == "__main__":
    main()
