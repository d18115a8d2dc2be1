"""Live progress of a local run: the numbers (`Live`) and the terminal view (`ProgressView`).

`Live` turns the peers' /status snapshots into what a person watching wants: the current round,
how far the run is, an ETA, each peer's recent utilisation (its torch thread's busy seconds over
wall time, over the last few seconds) and each round's accuracy and loss. The terminal view and
the dashboard (p2psl/dashboard.py) both read it, so they never disagree.

On a terminal the view redraws a block of lines in place: a header with a bar over all rounds and
the ETA, one bar per data owner for its batches in the current round, and one line per compute
node. With more than `MANY_OWNERS` owners, one line sums the owners up (how many in each state,
their batches) and only the `SLOWEST` owners furthest behind get a bar. When output goes to a
file or a pipe, a line is printed only when the round or a peer's coarse state changes (with many
owners: the owners' summary once a round, and an owner's line only if it fails), so logs stay
readable.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass

from p2psl.topology import Topology

BAR = 24
WINDOW_SECONDS = 5.0
#: task-level states of a compute node, shown as "training" where only the phase matters
TASK_STATES = {"forward", "backward", "optimize", "aggregate"}
ENDED = {"done", "finished"}  # "finished": the launcher saw the process exit 0 ("failed": not 0)
SETUP_STATES = {"starting", "connecting", "greeting", "planning", "building"}
#: above this many owners, the view sums them up and shows only the slowest
MANY_OWNERS = 12
SLOWEST = 5


class Live:
    """The numbers derived from successive status snapshots (feed it with `observe`)."""

    def __init__(self, topology: Topology, clock=time.monotonic):
        self.topology = topology
        self.clock = clock
        self.training_since: float | None = None
        self.fraction_since = 0.0  # how far the run was when training was first seen
        self._busy: dict[str, deque] = {p.name: deque() for p in topology.peers}
        self.history: dict[int, dict] = {}

    # -- feeding -----------------------------------------------------------------------------------
    def observe(self, statuses: dict[str, dict]) -> None:
        now = self.clock()
        if self.training_since is None and any(s.get("round") and s.get("state") not in SETUP_STATES
                                               for s in statuses.values()):
            self.training_since, self.fraction_since = now, self.fraction(statuses)
        for name, s in statuses.items():
            samples = self._busy.setdefault(name, deque())
            if not s.get("round") or s.get("state") in SETUP_STATES:
                samples.clear()  # building parts is one long task: it would read as a burst of work
            elif isinstance(s.get("busy_seconds"), (int, float)):
                samples.append((now, float(s["busy_seconds"])))
                while len(samples) > 2 and now - samples[1][0] >= WINDOW_SECONDS:
                    samples.popleft()
            self._record_round(s)

    def _record_round(self, s: dict) -> None:
        """A peer's accuracy and loss are the last finished round's once its next round has begun,
        or once it is finishing (the peer sets them, then moves to the next round, in one step).
        Compute nodes are read because an owner's accuracy is briefly its own shard's."""
        if s.get("role") != "compute" or s.get("accuracy") is None:
            return
        number = s.get("round") or 0
        if s.get("state") not in ("finishing", "done"):  # not "finished": the launcher's last snapshot may be stale
            number -= 1
        if number >= 1 and number not in self.history:
            self.history[number] = {"round": number, "accuracy": s["accuracy"], "loss": s.get("loss"),
                                    "seconds": s.get("round_seconds"), "predicted": s.get("predicted_seconds")}

    # -- reading -----------------------------------------------------------------------------------
    def utilisation(self, name: str) -> float | None:
        """Share of the last few seconds the peer's torch thread was busy."""
        samples = self._busy.get(name)
        if not samples or len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return None
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        return max(0.0, min(1.0, (b1 - b0) / (t1 - t0)))

    def pipeline_utilisation(self) -> float | None:
        """Mean recent utilisation of the compute nodes: how full the pipeline is."""
        values = [u for p in self.topology.compute_nodes if (u := self.utilisation(p.name)) is not None]
        return sum(values) / len(values) if values else None

    def current_round(self, statuses: dict[str, dict]) -> int:
        rounds = [s.get("round") or 0 for s in statuses.values() if s.get("role") == "data_owner"]
        rounds = rounds or [s.get("round") or 0 for s in statuses.values()]
        return max(rounds, default=0)

    def owner_fraction(self, s: dict) -> float:
        """How much of the whole run one owner has done (rounds and batches)."""
        rounds = s.get("rounds") or self.topology.training.rounds
        if s.get("state") in ENDED or s.get("state") == "finishing":
            return 1.0
        rnd, batch, batches = s.get("round") or 0, s.get("batch") or 0, s.get("batches") or 0
        if rnd == 0:
            return 0.0
        within = batch / batches if batches else 0.0
        return min(1.0, ((rnd - 1) + within) / rounds)

    def fraction(self, statuses: dict[str, dict], codes: dict[str, int | None] | None = None) -> float:
        codes = codes or {}
        values = [1.0 if codes.get(p.name) == 0 else self.owner_fraction(statuses.get(p.name, {}))
                  for p in self.topology.owners]
        return sum(values) / len(values) if values else 0.0

    def eta(self, fraction: float) -> float | None:
        """Seconds left, extrapolating the progress made since training was first seen (None
        until there is a trend): a first look that comes late, after fast rounds, is no progress
        made in no time."""
        made = fraction - self.fraction_since
        if self.training_since is None or made < 0.02 or fraction >= 1.0:
            return None
        return (self.clock() - self.training_since) * (1.0 - fraction) / made

    def add_round(self, record: dict) -> None:
        """A round's record as a peer wrote it to its metrics.jsonl: every round reaches the
        history this way, however much shorter than the time between two looks at /status (the
        latest record of a round wins: a round trained again after a resume)."""
        self.history[record["round"]] = {
            "round": record["round"], "accuracy": record.get("test_accuracy"), "loss": record.get("train_loss"),
            "seconds": record.get("seconds"), "predicted": record.get("predicted_seconds")}

    def rounds_seen(self) -> list[dict]:
        return [self.history[r] for r in sorted(self.history)]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def bar(fraction: float, width: int = BAR) -> str:
    """A bar with eighth-block resolution: '███████▍        '."""
    fraction = max(0.0, min(1.0, fraction))
    eighths = int(round(fraction * width * 8))
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part and full < width else ""
    return ("█" * full + partial).ljust(width, "·")


class ProgressView:
    def __init__(self, topology: Topology, echo=print, stream=None, clock=time.monotonic):
        self.topology = topology
        self.echo = echo
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.live = Live(topology, clock)
        self.clock = clock
        self._started = clock()
        self._drawn = 0
        self._last: dict[str, tuple] = {}

    def update(self, statuses: dict[str, dict], codes: dict[str, int | None], final: bool = False) -> None:
        self.live.observe(statuses)
        if self.tty:
            self._redraw(self.lines(statuses, codes))
        else:
            self._log(statuses, codes, final)

    # -- the lines -------------------------------------------------------------------------------
    def lines(self, statuses: dict[str, dict], codes: dict[str, int | None]) -> list[str]:
        shown = self.topology.peers
        extra = []
        if self._many:
            shown = self.slowest(statuses, codes) + list(self.topology.compute_nodes)
            extra = [self.owners_line(statuses, codes)]
        return [self.header(statuses, codes), *extra] + [self.peer_line(p.name, statuses.get(p.name, {}),
                                                                        codes.get(p.name)) for p in shown]

    @property
    def _many(self) -> bool:
        return len(self.topology.owners) > MANY_OWNERS

    def owners_line(self, statuses: dict[str, dict], codes: dict[str, int | None]) -> str:
        """All the owners in one line: how many are in each state, and their batches this round."""
        tally = owners_tally(self.topology, self.live, statuses, codes)
        states = ", ".join(f"{n} {state}" for state, n in tally.states.items())
        return f"  {len(self.topology.owners)} owners: {states}; batches {tally.batch}/{tally.batches or '?'} this round"

    def slowest(self, statuses: dict[str, dict], codes: dict[str, int | None]) -> list:
        """The owners furthest behind (failed ones first), at most SLOWEST of them."""
        names = owners_tally(self.topology, self.live, statuses, codes).slowest
        return [self.topology.peer(name) for name in names]

    def header(self, statuses: dict[str, dict], codes: dict[str, int | None]) -> str:
        rounds = self.topology.training.rounds
        done = bool(codes) and all(c == 0 for c in codes.values())
        fraction = 1.0 if done else self.live.fraction(statuses, codes)
        parts = [f"round {min(self.live.current_round(statuses), rounds)}/{rounds}", bar(fraction),
                 f"{fraction:4.0%}", f"{format_duration(self.clock() - self._started)} elapsed"]
        eta = None if done else self.live.eta(fraction)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        pipeline = self.live.pipeline_utilisation()
        if pipeline is not None and not done:
            parts.append(f"pipeline busy {pipeline:.0%}")
        last = self.live.rounds_seen()[-1:] or [None]
        if last[0] is not None and not done:  # at the end the summary's table says it all
            parts.append(f"round {last[0]['round']}: test acc {_num(last[0]['accuracy'])}, "
                         f"train loss {_num(last[0]['loss'])}")
        return "  ".join(parts)

    def peer_line(self, name: str, s: dict, code: int | None) -> str:
        spec = self.topology.peer(name)
        state = _state(s, code)
        if spec.is_owner:
            batches, batch = s.get("batches") or 0, s.get("batch") or 0
            within = 1.0 if code == 0 else batch / batches if batches else 0.0
            parts = [f"  {name:<10}", bar(within, BAR // 2), f"batch {batch if code != 0 else batches}/{batches or '?'}"]
            if s.get("loss") is not None and code is None:  # once it has exited, the snapshot may be stale
                parts.append(f"loss {_num(s['loss'])}")
        else:
            served = s.get("batch") or 0
            parts = [f"  {name:<10}", f"{'compute':<{BAR // 2}}"]
            if code is None:  # once a peer has exited, its last snapshot is stale
                parts.append(f"{served} batch{'' if served == 1 else 'es'} served")
            util = self.live.utilisation(name)
            if util is not None and code is None:
                parts.append(f"busy {util:.0%}")
        parts.append(state)
        return "  ".join(parts)

    # -- output ----------------------------------------------------------------------------------
    def _redraw(self, lines: list[str]) -> None:
        width = shutil.get_terminal_size((120, 24)).columns - 1
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F")
        for line in lines:
            self.stream.write("\x1b[2K" + line[:width] + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def _log(self, statuses: dict[str, dict], codes: dict[str, int | None], final: bool) -> None:
        key = ("header", self.live.current_round(statuses))
        if self._last.get("header") != key or final:
            self._last["header"] = key
            self.echo(self.header(statuses, codes))
            if self._many:
                self.echo(self.owners_line(statuses, codes))
        for peer in self.topology.peers:
            s, code = statuses.get(peer.name, {}), codes.get(peer.name)
            if self._many and peer.is_owner and code in (None, 0):
                continue
            key = _phase(_state(s, code))
            if self._last.get(peer.name) != key or (final and code is not None):
                self._last[peer.name] = key
                self.echo(self.peer_line(peer.name, s, code))


@dataclass(frozen=True)
class OwnersTally:
    """Every owner at once, for a view with no room for one each (the terminal, the dashboard)."""

    states: dict[str, int]     # how many owners in each state, the most common first
    batch: int                 # their batches done this round
    batches: int               # and to do
    slowest: list[str]         # the SLOWEST furthest behind, failed ones first


def owners_tally(topology: Topology, live: Live, statuses: dict[str, dict],
                 codes: dict[str, int | None]) -> OwnersTally:
    """The owners summed up from their statuses and, where known, their processes' exit codes."""
    counts: dict[str, int] = {}
    batch = batches = 0
    for p in topology.owners:
        s, code = statuses.get(p.name, {}), codes.get(p.name)
        state = _state(s, code)
        counts[state] = counts.get(state, 0) + 1
        batch += (s.get("batches") or 0) if code == 0 else (s.get("batch") or 0)
        batches += s.get("batches") or 0

    def behind(p):
        s, code = statuses.get(p.name, {}), codes.get(p.name)
        failed = code not in (None, 0) or s.get("state") == "failed"
        return not failed, 1.0 if code == 0 else live.owner_fraction(s), p.name
    return OwnersTally(dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))), batch, batches,
                       [p.name for p in sorted(topology.owners, key=behind)[:SLOWEST]])


def _state(s: dict, code: int | None) -> str:
    if code == 0:
        return "finished"
    if code is not None:
        return f"failed (exit {code})"
    state = s.get("state", "starting")
    return "training" if state in TASK_STATES else state


def _phase(state: str) -> str:
    """States that change every few batches are one phase for the log."""
    return "training" if state in ("training", "aggregating", "evaluating") else state


def _num(value) -> str:
    return "—" if value is None else f"{value:.3f}"
