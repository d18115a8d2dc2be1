"""Faults after which a deployment cannot go on, or this peer cannot go on with it: every peer
stops within seconds, with one line that says why, and nothing hangs. Real processes, small
deployments (two owners, two compute nodes, a few rounds)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from p2psl import PROTOCOL_VERSION
from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, wait_for, write_topology

pytestmark = pytest.mark.timeout(300)

OWNERS, COMPUTE = ["alice", "bob"], ["c1", "c2"]
TRAINING = {"rounds": 3, "batch_size": 32}
TIMEOUTS = {"connect": "60s", "heartbeat": "0.5s", "dead": "4s", "gone": "2s", "request": "60s", "start": "120s"}


def start(tmp, faults: dict | None = None, training=TRAINING):
    topology = write_topology(tmp, OWNERS, COMPUTE, training=training, timeouts=TIMEOUTS)
    out = tmp / "out"
    procs = {n: start_peer(topology, n, out, env={"P2PSL_FAULTS": faults[n]} if n in (faults or {}) else None)
             for n in COMPUTE + OWNERS}
    return procs, out


def last_line(out, name: str) -> str:
    return (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1]


def logs(out, names) -> str:
    return "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in names)


def test_both_compute_nodes_killed_stops_every_owner_with_the_reason(tmp_path):
    """Nothing can train without a compute node: once both are gone the owners say so and exit 1,
    instead of re-planning over an empty chain."""
    procs, out = start(tmp_path)
    wait_for(lambda: rounds_of(out, "alice"), 200, lambda: logs(out, procs), procs.values())
    for name in COMPUTE:
        os.kill(procs[name].pid, signal.SIGKILL)
    killed = time.monotonic()
    codes = wait_all(procs, timeout=120)
    took = time.monotonic() - killed
    print(f"owners stopped {took:.1f} s after both compute nodes were killed (gone = 2 s)")
    assert codes == {"c1": -signal.SIGKILL, "c2": -signal.SIGKILL, "alice": 1, "bob": 1}, logs(out, procs)
    for owner in OWNERS:
        assert last_line(out, owner).startswith("TrainingError: no compute node is left (c1, c2 gone)"), \
            log_tail(out, owner)
        assert "Traceback" not in (out / f"{owner}.log").read_text()


def test_a_round_checkpointed_but_not_yet_evaluated_when_a_compute_node_dies_still_gets_its_record(tmp_path):
    """c2 dies at the end of round 2 (the crash fault at=end): its checkpoint written, its replica
    on c1, every owner's checkpoint written — and no evaluation of round 2 anywhere yet. The
    survivors must not resume after round 2 as if it were complete: it is trained again and
    recorded, so every round has its line."""
    procs, out = start(tmp_path, faults={"c2": "crash:round=2:at=end"})
    codes = wait_all(procs, timeout=200)
    assert codes == {"c1": 0, "alice": 0, "bob": 0, "c2": 137}, logs(out, procs)
    assert (out / "c1" / "replicas" / "c2" / "round-000002.ckpt").exists()  # round 2 was restorable
    for peer in ("alice", "bob", "c1"):
        records = rounds_of(out, peer)
        assert [r["round"] for r in records] == [1, 2, 3], (peer, records)
        assert [r["epoch"] for r in records] == [0, 1, 1]
    assert "training again from round 2" in (out / "c1" / "peer.log").read_text()


def test_a_compute_node_frozen_past_gone_learns_that_the_others_went_on_without_it(tmp_path):
    """c2's event loop blocks for 12 s in round 2 (the freeze fault: as SIGSTOP, nothing answers).
    The others count it gone after dead + gone = 6 s, re-plan over c1 and finish. When c2 wakes it
    says that the deployment went on without it — whether the others are still there to tell it,
    or finished and unreachable — not that every data owner is gone."""
    procs, out = start(tmp_path, faults={"c2": "freeze:round=2:batch=1:seconds=12"})
    codes = wait_all(procs, timeout=200)
    assert codes == {"c1": 0, "alice": 0, "bob": 0, "c2": 1}, logs(out, procs)
    assert [r["round"] for r in rounds_of(out, "alice")] == [1, 2, 3]
    line = last_line(out, "c2")
    assert line.startswith("TrainingError: c2 was frozen for 1") and "went on without c2" in line, log_tail(out, "c2")
    assert "Traceback" not in (out / "c2.log").read_text()


# -- refusals no retry can heal (in one process, real sockets) ---------------------------------------

async def refused_deployment(tmp_path, odd: str, secret: bytes | None = None, change=None) -> dict:
    """Every peer of a small deployment in this process, `odd` with another secret or with its
    topology text changed by `change`; returns each peer's error. All must stop well before
    `timeouts.connect` (60 s)."""
    import asyncio

    from p2psl.runtime.peer import Peer, PeerOptions
    from p2psl.topology import parse_topology
    from tests.integration.harness import SECRET

    text = write_topology(tmp_path, OWNERS, COMPUTE, training=TRAINING, timeouts=TIMEOUTS).read_text()
    shared = parse_topology(text, source="shared.toml")
    theirs = parse_topology(change(text), source="odd.toml") if change else shared
    peers = {p.name: Peer(theirs if p.name == odd else shared, p.name,
                          secret if p.name == odd and secret else SECRET.encode(),
                          PeerOptions(tmp_path / "out" / p.name)) for p in shared.peers}
    async with asyncio.timeout(40):
        outcomes = await asyncio.gather(*(p.run() for p in peers.values()), return_exceptions=True)
    return dict(zip(peers, outcomes))


def named(errors: dict, odd: str, cause: str) -> None:
    """The odd peer and every other stop with an error that names the odd one and the cause."""
    from p2psl.errors import AuthError, TrainingError

    print("\n".join(f"{name}: {type(e).__name__}: {e}" for name, e in errors.items()))
    assert isinstance(errors[odd], AuthError) and cause in str(errors[odd]), errors
    for name in set(errors) - {odd}:  # its neighbours learn of it themselves, or from another's abort
        assert isinstance(errors[name], (AuthError, TrainingError)), errors
        assert odd in str(errors[name]) and cause in str(errors[name]), errors
    assert any(isinstance(e, AuthError) and str(e).startswith(f"alice cannot work with {odd}")
               for e in errors.values()), errors


async def test_a_peer_with_another_secret_stops_everyone_at_once_naming_it(tmp_path):
    """c2 has another secret: it and every peer that learns of it stop now, saying who and why,
    instead of waiting out the connect timeout."""
    named(await refused_deployment(tmp_path, "c2", secret=b"another secret"), "c2", "secret")


async def test_a_peer_with_another_topology_file_stops_everyone_at_once_naming_it(tmp_path):
    """c1's file has one more round (same peers, same addresses): another digest."""
    errors = await refused_deployment(tmp_path, "c1", change=lambda t: t.replace("rounds = 3", "rounds = 4"))
    named(errors, "c1", "different topology file")


async def test_a_neighbour_speaking_another_protocol_version_stops_the_listener_at_once_naming_it(tmp_path):
    """alice dials c1 in protocol version 2: c1 (a real peer, listening on its real socket) reads
    her name from the hello it cannot otherwise decode, answers `version`, and stops naming her,
    instead of waiting out `timeouts.connect` (60 s) for a neighbour that can never fit."""
    import asyncio

    import aiohttp
    import cbor2

    from p2psl.errors import AuthError
    from p2psl.runtime.peer import Peer, PeerOptions
    from p2psl.topology import parse_topology
    from tests.integration.harness import SECRET

    topology = parse_topology(write_topology(tmp_path, OWNERS, COMPUTE, training=TRAINING, timeouts=TIMEOUTS)
                              .read_text())
    c1 = Peer(topology, "c1", SECRET.encode(), PeerOptions(tmp_path / "out" / "c1"))
    listening, listen = asyncio.Event(), c1.network.listen

    async def listen_then_tell() -> None:
        await listen()
        listening.set()

    c1.network.listen = listen_then_tell
    running = asyncio.ensure_future(c1.run())
    header = cbor2.dumps({"v": PROTOCOL_VERSION + 1, "kind": "hello", "name": "alice", "topology": topology.digest, "nonce": bytes(32)})
    async with asyncio.timeout(40), aiohttp.ClientSession() as session:
        await listening.wait()
        ws = await session.ws_connect(f"ws://{topology.peer('c1').address}/p2psl")
        await ws.send_bytes(len(header).to_bytes(4, "big") + header)
        answer = await ws.receive()
        await ws.close()
        with pytest.raises(AuthError) as stopped:
            await running
    assert cbor2.loads(answer.data[4:])["code"] == "version"
    print(f"c1 stopped: {stopped.value}")
    assert str(stopped.value).startswith("c1 cannot work with alice") and "protocol version" in str(stopped.value)
