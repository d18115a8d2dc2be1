"""Pictures of a deployment: pure functions from data (topology, plan, trace events, metrics) to
matplotlib `Figure`s, and `save` to write one by file extension.

No pyplot anywhere: a `Figure` made directly owns its canvas, so drawing needs no display, keeps
no global state and is safe inside the launcher's process.

    layout.py     where each peer sits (shared with the live dashboard)
    topology.py   the topology and plan picture (tools/visualize.py)
    timeline.py   the pipeline timeline from a merged trace (tools/timeline.py)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from p2psl.errors import ConfigError

#: one colour per role, and a qualitative palette for owners (colour-blind friendly, Okabe–Ito first)
ROLE_COLOURS = {"data_owner": "#cfe3f7", "compute": "#fde0c5"}
ROLE_EDGES = {"data_owner": "#2b6cb0", "compute": "#c05621"}
OWNER_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
                 "#7f3c8d", "#11a579", "#3969ac", "#f2b701", "#e73f74", "#80ba5a", "#e68310", "#008695")
OVER = "#c53030"

FORMATS = (".png", ".svg")
#: SVG keeps text as text (searchable, selectable, smaller) instead of glyph outlines
SVG_TEXT = {"svg.fonttype": "none"}


def owner_colours(owners) -> dict[str, str]:
    """A stable colour per owner (in the given order; the palette repeats beyond 16 owners)."""
    return {name: OWNER_PALETTE[i % len(OWNER_PALETTE)] for i, name in enumerate(owners)}


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as PNG or SVG, chosen by the extension of `path`."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"cannot write {path.name}: use a .png or .svg file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with matplotlib.rc_context(SVG_TEXT):
            fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata=_metadata(path))
    except OSError as exc:  # a path given by hand: bad local input, said as such
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _metadata(path: Path) -> dict:
    # no creation date in PNG/SVG metadata: the same inputs give byte-identical pictures
    return {"Software": "p2psl"} if path.suffix.lower() == ".png" else {"Date": None}


def format_seconds(seconds: float | None) -> str:
    """0.02 → '20 ms'; None → '—'."""
    if seconds is None:
        return "—"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    if seconds > 0:
        return f"{seconds * 1e6:.3g} µs"
    return "0 s"
