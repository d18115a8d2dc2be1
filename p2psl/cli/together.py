"""Every peer of a topology in one OS process (`p2psl run --in-process`).

The peers are the same `Peer` objects a `p2psl peer` process runs, each on its own event-loop
tasks with its own torch worker thread and its own listening socket, talking to the others over
real loopback WebSockets; only the process is shared, which spares each peer the ~400 MiB of an
interpreter with torch loaded. torch runs one intra-op thread (the peers take turns on the
cores instead of fighting over them).

[Note: memory in one process] What a peer reports about memory (`rss_bytes`, `peak_rss_bytes`,
`idle_rss_bytes` at /status and in metrics.jsonl) is the *process's*, shared by every peer in it:
it says what the whole deployment weighs on this machine, not what one peer would need alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import torch

from p2psl.errors import P2PSLError
from p2psl.topology import Topology

#: where each peer's exit status is written, beside its other outputs
EXIT_FILE = "exit.json"


class _OnePeer(logging.Filter):
    def __init__(self, name: str):
        super().__init__()
        self.peer = name

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "peer", None) == self.peer


def log_each_peer(topology: Topology, out: Path, level: str, skip: set[str] = frozenset()) -> None:
    """Each peer's records into its own peer.log; the others (libraries) into out/process.log."""
    fmt = logging.Formatter("%(asctime)s %(peer)-8s %(levelname)-7s %(message)s", "%H:%M:%S")
    root = logging.getLogger("p2psl")
    root.setLevel(level.upper())
    for spec in (s for s in topology.peers if s.name not in skip):
        (out / spec.name).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / spec.name / "peer.log", encoding="utf-8")
        handler.setFormatter(fmt)
        handler.addFilter(_OnePeer(spec.name))
        root.addHandler(handler)
    shared = logging.FileHandler(out / "process.log", encoding="utf-8")
    shared.setFormatter(fmt)
    shared.addFilter(lambda record: setattr(record, "peer", getattr(record, "peer", "-")) or True)
    root.addHandler(shared)


async def run_together(topology: Topology, out: Path, secret: bytes, skip: set[str] = frozenset(),
                       resume: bool = False) -> dict[str, int]:
    """Run every peer but those in `skip` until each finishes or fails; each one's exit status
    (0, or its error's)."""
    from p2psl.runtime.heap import Settle
    from p2psl.runtime.peer import Peer, PeerOptions

    torch.set_num_threads(1)
    if not skip:  # every peer here: the cost model counts one process's messages (costmodel.IN_ONE_PROCESS)
        topology = topology.in_one_process()
    names = [s.name for s in topology.peers if s.name not in skip]
    settled = Settle(len(names))  # [Note: a settled heap]: once every peer here plans, then trains
    peers = {name: Peer(topology, name, secret, PeerOptions(out / name, resume=resume, torch_threads=1,
                                                             settled=settled))
             for name in names}
    outcomes = await asyncio.gather(*(p.run() for p in peers.values()), return_exceptions=True)
    codes = {}
    for name, outcome in zip(peers, outcomes):
        if isinstance(outcome, P2PSLError):
            logging.getLogger("p2psl").error("%s: %s", type(outcome).__name__, outcome, extra={"peer": name})
            codes[name] = outcome.exit_code
        elif isinstance(outcome, BaseException):
            logging.getLogger("p2psl").error("internal error", exc_info=outcome, extra={"peer": name})
            codes[name] = 70
        else:
            codes[name] = 0
        (out / name / EXIT_FILE).write_text(json.dumps({"code": codes[name]}))
    return codes


def exit_codes(out: Path, names: list[str]) -> dict[str, int]:
    """The statuses `run_together` wrote (a peer without one did not get to finish)."""
    codes = {}
    for name in names:
        try:
            codes[name] = int(json.loads((out / name / EXIT_FILE).read_text())["code"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return codes
