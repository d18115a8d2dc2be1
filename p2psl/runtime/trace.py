"""Task spans in Chrome trace-event JSON (Perfetto and chrome://tracing open it).

Each peer records complete events ("ph": "X") with wall-clock microseconds, so traces of peers on
one machine line up when merged; `merge_traces` gives each peer its own process lane, named by
`process_name` metadata. Thread 0 is the event loop (sends, receives, waits), thread 1 the torch
worker (forward, backward, optimize, aggregate, evaluate).
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

LOOP, WORKER = 0, 1


def now_us() -> float:
    return time.time_ns() / 1000.0


class Tracer:
    """Collects spans of one peer; cheap enough to stay on during training.

    A span is kept as a tuple of plain values, which Python's cyclic collector stops visiting
    after it first sees one ([Note: a settled heap] in p2psl.runtime.heap): a run's hundreds of
    thousands of spans would otherwise make every full collection longer than the last. They
    become trace-event maps when read."""

    def __init__(self, peer: str, enabled: bool = True, limit: int = 500_000):
        self.peer = peer
        self.enabled = enabled
        self._limit = limit
        self._events: list[tuple] = []
        self._lock = threading.Lock()

    def add(self, name: str, cat: str, start_us: float, end_us: float, tid: int = LOOP, **args) -> None:
        if not self.enabled or len(self._events) >= self._limit:
            return
        event = (name, cat, start_us, max(0.0, end_us - start_us), tid, tuple(args.items()))
        with self._lock:
            self._events.append(event)

    @contextmanager
    def span(self, name: str, cat: str, tid: int = LOOP, **args) -> Iterator[None]:
        start = now_us()
        try:
            yield
        finally:
            self.add(name, cat, start, now_us(), tid, **args)

    @property
    def events(self) -> list[dict]:
        """The spans as Chrome trace events ("ph": "X")."""
        with self._lock:
            spans = list(self._events)
        return [{"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": dict(args)}
                for name, cat, ts, dur, tid, args in spans]

    def busy_seconds(self, tid: int = WORKER) -> float:
        """Time the given thread spent in spans (for utilisation)."""
        with self._lock:
            return sum(span[3] for span in self._events if span[4] == tid) / 1e6

    def write(self, path: str | Path) -> None:
        """This peer's trace as a standalone Chrome trace file (atomically)."""
        write_json_atomic(path, {"traceEvents": _metadata(0, self.peer) + self.events, "displayTimeUnit": "ms"})


def _metadata(pid: int, name: str) -> list[dict]:
    return [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": LOOP, "args": {"name": "network"}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": WORKER, "args": {"name": "torch"}},
    ]


def merge_traces(paths: dict[str, Path], out: str | Path) -> int:
    """Merge per-peer traces into one file, one process per peer. Returns the number of spans."""
    events, count = [], 0
    for pid, (peer, path) in enumerate(sorted(paths.items()), start=1):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        events += _metadata(pid, peer)
        for event in data.get("traceEvents", []):
            if event.get("ph") == "X":
                events.append({**event, "pid": pid})
                count += 1
    write_json_atomic(out, {"traceEvents": events, "displayTimeUnit": "ms"})
    return count


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON next to `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
