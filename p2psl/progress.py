"""Live progress of a local run in the terminal: one line per peer with a bar and an ETA.

On a terminal the block of lines is redrawn in place; when output goes to a file or a pipe, a
line is printed only when a peer's round or state changes, so logs stay readable.
"""

from __future__ import annotations

import sys
import time

from p2psl.topology import Topology

BAR = 20


class ProgressView:
    def __init__(self, topology: Topology, echo=print, stream=None):
        self.topology = topology
        self.echo = echo
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._drawn = 0
        self._last: dict[str, tuple] = {}
        self._started = time.time()

    def update(self, statuses: dict[str, dict], codes: dict[str, int | None], final: bool = False) -> None:
        lines = [self._line(p.name, statuses.get(p.name, {}), codes.get(p.name)) for p in self.topology.peers]
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            for line in lines:
                self.stream.write("\x1b[2K" + line + "\n")
            self.stream.flush()
            self._drawn = len(lines)
            return
        for peer, line in zip(self.topology.peers, lines):
            status = statuses.get(peer.name, {})
            key = (status.get("state"), status.get("round"), codes.get(peer.name))
            if self._last.get(peer.name) != key or final:
                self._last[peer.name] = key
                if not final or codes.get(peer.name) is not None:
                    self.echo(line)

    def _line(self, name: str, s: dict, code: int | None) -> str:
        rounds = s.get("rounds") or self.topology.training.rounds
        rnd, batch, batches = s.get("round") or 0, s.get("batch") or 0, s.get("batches") or 0
        done_rounds = max(0, rnd - 1) + (batch / batches if batches else 0)
        fraction = 1.0 if code == 0 else min(1.0, done_rounds / rounds) if rounds else 0.0
        bar = "█" * int(fraction * BAR) + "·" * (BAR - int(fraction * BAR))
        state = "finished" if code == 0 else f"failed ({code})" if code is not None else s.get("state", "starting")
        parts = [f"{name:<10}", f"{bar}", f"round {rnd}/{rounds}"]
        if s.get("role") == "data_owner" and batches:
            parts.append(f"batch {batch}/{batches}")
        if s.get("loss") is not None:
            parts.append(f"loss {s['loss']:.3f}")
        if s.get("accuracy") is not None:
            parts.append(f"acc {s['accuracy']:.3f}")
        parts.append(state)
        elapsed = time.time() - self._started
        if 0.02 < fraction < 1.0 and code is None:
            parts.append(f"ETA {elapsed / fraction - elapsed:.0f}s")
        return "  ".join(parts)
