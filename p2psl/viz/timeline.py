"""The pipeline timeline from a merged trace (tools/timeline.py): one lane per peer, one colour
per owner, the measured and the predicted period marked.

Reading a trace. `p2psl run` merges every peer's Chrome trace into one file with one process per
peer, named by `process_name` metadata (p2psl/trace.py): thread 1 is the torch worker (forward,
backward, optimize, aggregate, evaluate), thread 0 the event loop (sends and waits). Training
spans carry ``owner``, ``round`` and ``batch`` in their args.

[Note: measured period] The cost model's period P is the time in which every active owner
completes one batch in steady state (p2psl/costmodel.py). Measured the same way: an owner's
batch completes when the owner's own last span of that batch ends; an owner's period in a round
is (last completion − first completion) / (batches − 1), which leaves out the pipeline's fill,
and the run's period is the median over owners and rounds.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from p2psl.errors import ConfigError
from p2psl.planning.plan import Plan
from p2psl.viz import format_seconds, owner_colours
from p2psl.units import plural

WORKER = 1
SETUP = "#a0aec0"       # profile, plan, build
ROUND_END = "#4a5568"   # aggregate, state, load, checkpoint
EVALUATE = "#cbd5e0"
WAIT = "#edf2f7"


@dataclass(frozen=True)
class Span:
    peer: str
    name: str
    cat: str
    start: float      # seconds since the trace's first span
    duration: float
    worker: bool      # on the torch thread (else the event loop: sends, waits)
    owner: str | None = None
    round: int | None = None
    batch: int | None = None

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def training(self) -> bool:
        return self.owner is not None and self.batch is not None and not self.name.startswith("eval")


@dataclass(frozen=True)
class Trace:
    peers: tuple[str, ...]     # in the trace's process order
    spans: tuple[Span, ...]
    origin_us: float           # wall-clock microseconds of time 0

    def of(self, peer: str) -> list[Span]:
        return [s for s in self.spans if s.peer == peer]


def load_trace(path: str | Path) -> Trace:
    """A merged trace.json (or one peer's); raises ConfigError if it is not a Chrome trace."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the trace {path}: {exc}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ConfigError(f"{path} is not a Chrome trace (no traceEvents list)")
    return parse_events(events)


def parse_events(events: list[dict]) -> Trace:
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "pid" in e}
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
    origin = min((e["ts"] for e in complete), default=0.0)
    spans = []
    for e in complete:
        args = e.get("args") or {}
        spans.append(Span(peer=names.get(e.get("pid"), f"pid {e.get('pid')}"), name=str(e.get("name", "")),
                          cat=str(e.get("cat", "")), start=(e["ts"] - origin) / 1e6,
                          duration=float(e.get("dur", 0.0)) / 1e6, worker=e.get("tid") == WORKER,
                          owner=args.get("owner"), round=args.get("round"), batch=args.get("batch")))
    peers = tuple(dict.fromkeys(names[p] for p in sorted(names)))
    peers += tuple(sorted({s.peer for s in spans} - set(peers)))
    return Trace(peers, tuple(sorted(spans, key=lambda s: s.start)), origin)


# -- analysis ------------------------------------------------------------------------------------

def owners_of(trace: Trace, plan: Plan | None = None) -> list[str]:
    if plan is not None:
        return list(plan.owners)
    return sorted({s.owner for s in trace.spans if s.training and s.peer == s.owner})


def completions(trace: Trace, owners: list[str]) -> dict[tuple[str, int], list[float]]:
    """(owner, round) → sorted end times of the owner's batches (see [Note: measured period])."""
    ends: dict[tuple[str, int, int], float] = {}
    for s in trace.spans:
        if s.training and s.peer == s.owner and s.owner in owners and s.round is not None:
            key = (s.owner, s.round, s.batch)
            ends[key] = max(ends.get(key, 0.0), s.end)
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for (owner, round_, _), end in ends.items():
        out[(owner, round_)].append(end)
    return {k: sorted(v) for k, v in out.items()}


def measured_period(trace: Trace, owners: list[str]) -> float | None:
    """The median steady-state time between an owner's consecutive batches; None if no owner
    finished three batches in a round."""
    periods = [(t[-1] - t[0]) / (len(t) - 1) for t in completions(trace, owners).values() if len(t) >= 3]
    return statistics.median(periods) if periods else None


def rounds(trace: Trace) -> dict[int, tuple[float, float]]:
    """round → (first training span's start, last training span's end), over every peer."""
    out: dict[int, tuple[float, float]] = {}
    for s in trace.spans:
        if s.training and s.round is not None:
            first, last = out.get(s.round, (s.start, s.end))
            out[s.round] = (min(first, s.start), max(last, s.end))
    return dict(sorted(out.items()))


def lanes(trace: Trace, plan: Plan | None) -> list[str]:
    """Owners first, then the compute nodes in chain order, then anyone else."""
    owners = [o for o in owners_of(trace, plan) if o in trace.peers]
    chain = [n for n in (plan.nodes if plan else ()) if n in trace.peers]
    rest = [p for p in trace.peers if p not in owners and p not in chain]
    return owners + chain + rest


def busy_share(trace: Trace, peer: str, start: float, end: float) -> float:
    """Fraction of [start, end] the peer's torch thread was busy (utilisation)."""
    busy = sum(max(0.0, min(s.end, end) - max(s.start, start)) for s in trace.of(peer) if s.worker)
    return busy / (end - start) if end > start else 0.0


# -- drawing -------------------------------------------------------------------------------------

def _shade(colour: str, towards: float) -> tuple[float, float, float]:
    """Mix towards white (towards > 0) or black (towards < 0)."""
    r, g, b = to_rgb(colour)
    target = 1.0 if towards > 0 else 0.0
    k = abs(towards)
    return (r + (target - r) * k, g + (target - g) * k, b + (target - b) * k)


def span_colour(s: Span, colours: dict[str, str]) -> tuple:
    if s.cat == "wait" or s.name.startswith("wait"):
        return to_rgb(WAIT)
    if s.name in ("profile", "plan", "build"):
        return to_rgb(SETUP)
    if s.name.startswith("eval"):
        return to_rgb(EVALUATE)
    if s.owner in colours:
        base = colours[s.owner]
        if "backward" in s.name:
            return _shade(base, 0.45)
        if s.name.startswith("optimize"):
            return _shade(base, -0.35)
        return to_rgb(base)
    return to_rgb(ROUND_END)


def _bars(ax, spans: list[Span], y: float, colours: dict[str, str], lo: float, hi: float, pixel: float,
          scale: float = 1.0) -> None:
    """Spans of one lane as broken_barh groups, x = (time − lo) × scale; spans thinner than a
    pixel merge with neighbours of the same colour, so a million spans draw as fast as a thousand."""
    groups: dict[tuple, list[list[float]]] = defaultdict(list)
    for s in spans:
        if s.end < lo or s.start > hi:
            continue
        key = (span_colour(s, colours), s.worker)
        runs = groups[key]
        if runs and s.start - (runs[-1][0] + runs[-1][1]) < pixel:
            runs[-1][1] = max(runs[-1][1], s.end - runs[-1][0])
        else:
            runs.append([s.start, max(s.duration, pixel * 0.6)])
    for (colour, worker), runs in groups.items():
        extent = (y - 0.36, 0.56) if worker else (y + 0.24, 0.14)
        ax.broken_barh([((start - lo) * scale, width * scale) for start, width in runs], extent,
                       facecolors=[colour], linewidth=0)


def _lane_axes(ax, names: list[str], lo: float, hi: float) -> None:
    ax.set_ylim(len(names) - 0.5, -0.6)
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelsize=8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    for y in range(len(names)):
        ax.axhline(y + 0.5, color="#edf2f7", linewidth=0.6, zorder=0)


def zoom_window(trace: Trace, owners: list[str], period: float | None,
                round_: int | None = None) -> tuple[float, float, int] | None:
    """A window of about eight periods in the steady state of a round (the last complete round
    unless `round_` is given): (start, end, round)."""
    spans = rounds(trace)
    if not spans:
        return None
    chosen = round_ if round_ in spans else max(spans)
    first, last = spans[chosen]
    ends = sorted(t for (o, r), ts in completions(trace, owners).items() if r == chosen for t in ts)
    start = ends[len(ends) // 4] if ends else first
    width = 8 * period if period else (last - first) / 10
    return start, min(last, start + width), chosen


def draw_timeline(trace: Trace, plan: Plan | None = None, round_: int | None = None) -> Figure:
    if not trace.spans:
        raise ConfigError("the trace has no spans: was the run traced?")
    names = lanes(trace, plan)
    owners = owners_of(trace, plan)
    colours = owner_colours(owners)
    period = measured_period(trace, owners)
    predicted = (plan.expected_period_seconds or plan.period_seconds) if plan is not None else None
    window = zoom_window(trace, owners, period, round_)
    lane_h = 0.34 if len(names) > 12 else 0.42
    top_h, zoom_h = lane_h * len(names) + 0.6, (lane_h + 0.1) * len(names) + 0.9
    total = 0.95 + top_h + 0.75 + (zoom_h if window else 0) + 0.55
    fig = Figure(figsize=(12.0, total))

    def axes(top_in: float, height_in: float):
        return fig.add_axes((1.1 / 12, 1 - (top_in + height_in) / total, 9.6 / 12, height_in / total))

    overview = axes(0.95, top_h)
    _overview(overview, trace, names, colours)
    if window:
        zoom = axes(0.95 + top_h + 0.75, zoom_h)
        _zoom(zoom, trace, names, colours, window, period, predicted)
        overview.axvspan(window[0] - overview.lo, window[1] - overview.lo, color="#f6ad55", alpha=0.35, zorder=0)
    fig.text(0.3 / 12, 1 - 0.12 / total, _title(trace, plan, period, predicted), fontsize=10, va="top")
    legend = [Patch(color=colours[o], label=o) for o in owners[:16]]
    legend += [Patch(color=_shade("#718096", 0.45), label="backward (lighter)"),
               Patch(color=_shade("#718096", -0.35), label="optimize (darker)"),
               Patch(color=EVALUATE, label="evaluate"), Patch(color=ROUND_END, label="aggregate · checkpoint"),
               Patch(color=SETUP, label="set-up"), Patch(color=WAIT, label="wait (thin: event loop)")]
    fig.legend(handles=legend, loc="upper right", bbox_to_anchor=(0.99, 1 - 0.5 / total), fontsize=7.5,
               ncol=min(len(legend), 11), frameon=False, handlelength=1.2, columnspacing=1.0)
    return fig


def _title(trace: Trace, plan: Plan | None, period: float | None, predicted: float | None) -> str:
    n_rounds = len(rounds(trace))
    head = f"pipeline timeline — {plural(len(trace.peers), 'peer')}, {plural(n_rounds, 'round')}, {len(trace.spans):,} spans"
    ratio = f" (measured/predicted {period / predicted:.2f}×)" if period and predicted else ""
    setup = min((first for first, _ in rounds(trace).values()), default=0.0)
    head += f", set-up {format_seconds(setup)}"
    return (f"{head}\nperiod (an owner's time per batch in steady state): measured {format_seconds(period)}, "
            f"predicted {format_seconds(predicted)}{ratio}")


def _overview(ax, trace: Trace, names: list[str], colours: dict[str, str]) -> None:
    spans = rounds(trace)
    end = max(s.end for s in trace.spans)
    # the rounds, not the set-up (building parts, profiling) before them: the title says how long it took
    lo = min((first for first, _ in spans.values()), default=0.0)
    lo = max(0.0, lo - (end - lo) * 0.01)
    pixel = (end - lo) / 1200
    for y, name in enumerate(names):
        _bars(ax, trace.of(name), y, colours, lo, end, pixel)
    _lane_axes(ax, names, 0.0, (end - lo) * 1.001)
    for number, (first, last) in spans.items():
        ax.axvline(first - lo, color="#2d3748", linewidth=0.7, linestyle=":", zorder=3)
        ax.text(first - lo, -0.55, f" round {number}", fontsize=7.5, va="bottom", ha="left", color="#2d3748")
    if spans:
        first, last = min(f for f, _ in spans.values()), max(end for _, end in spans.values())
        for y, name in enumerate(names):
            ax.text(1.005, y, f"busy {busy_share(trace, name, first, last):.0%}", transform=ax.get_yaxis_transform(),
                    fontsize=7.5, va="center")
    ax.set_xlabel(f"seconds since training began, {lo:.1f} s after the first span (set-up: profiling, planning, "
                  "building parts); busy: share of the rounds the torch thread worked", fontsize=8)
    ax.set_title("whole run", fontsize=9, loc="left")
    ax.lo = lo  # the zoom window is shaded in these coordinates


def _zoom(ax, trace: Trace, names: list[str], colours: dict[str, str], window: tuple[float, float, int],
          period: float | None, predicted: float | None) -> None:
    """The window in milliseconds from its start, with the periods drawn to scale."""
    lo, hi, number = window
    width = (hi - lo) * 1e3
    for y, name in enumerate(names):
        spans = [s for s in trace.of(name) if s.end >= lo and s.start <= hi]
        _bars(ax, spans, y, colours, lo, hi, (hi - lo) / 1500, scale=1e3)
        for s in spans:  # batch numbers on the compute spans wide enough to hold them
            middle = (s.start + s.duration / 2 - lo) * 1e3
            if s.worker and s.batch is not None and s.duration * 1e3 > width / 45 and 0 <= middle <= width:
                ax.text(middle, y - 0.08, f"{s.name[0].upper()}{s.batch}", fontsize=6.5, ha="center", va="center",
                        color="#1a202c" if "backward" in s.name else "white", clip_on=True)
    _lane_axes(ax, names, 0.0, width)
    marks = [(label, length * 1e3, colour) for label, length, colour in
             (("measured", period, "#c53030"), ("predicted", predicted, "#2b6cb0")) if length]
    for row, (label, length, colour) in enumerate(marks):
        y = -0.75 - 0.35 * row
        ax.annotate("", xy=(min(length, width), y), xytext=(0, y), annotation_clip=False,
                    arrowprops=dict(arrowstyle="<->" if length <= width else "<-", color=colour, linewidth=1.2,
                                    shrinkA=0, shrinkB=0))
        text = f"{label} period {format_seconds(length / 1e3)}"
        if length < width * 0.7:
            ax.text(length, y, "  " + text, color=colour, fontsize=8, va="center", ha="left", clip_on=False)
        else:  # above its arrow, which may run past the window
            ax.text(width, y - 0.06, text + ("" if length <= width else " (longer than this window) "),
                    color=colour, fontsize=8, va="bottom", ha="right", clip_on=False)
    if period:
        for k in range(1, int(width // (period * 1e3)) + 1):
            ax.axvline(k * period * 1e3, color="#c53030", linewidth=0.7, linestyle=(0, (2, 3)), zorder=3)
    ax.set_ylim(len(names) - 0.5, -0.6 - 0.35 * len(marks) - 0.2)
    ax.set_xlabel(f"milliseconds after t = {lo:.3f} s (round {number}); dashed lines every measured period; "
                  "F/B/O + batch number on wide spans", fontsize=8)
    ax.set_title(f"steady state of round {number}, zoomed", fontsize=9, loc="left")
