"""The pictures at the end of `p2psl run`: accuracy and loss per round (curves.png).

Drawn from the run's merged metrics.jsonl (SPEC §7) and, when the launcher trained the same model
centrally for comparison, summary.json's ``centralized_accuracy`` as a reference line. Also a
command: ``python -m p2psl.cli.report RUN_FOLDER`` redraws the curves of a finished run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from p2psl.runtime.metrics import read_metrics
from p2psl.viz import save
from p2psl.units import plural

CURVES = "curves.png"


def write_curves(out: str | Path) -> Path | None:
    """Draw OUT/curves.png from OUT/metrics.jsonl; None when the run finished no round."""
    out = Path(out)
    rounds = sorted((r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "round"),
                    key=lambda r: r["round"])
    if not rounds:
        return None
    return save(draw_curves(rounds, _centralized(out), title=out.name), out / CURVES)


def _centralized(out: Path) -> float | None:
    try:
        value = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("centralized_accuracy")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, (int, float)) else None


def draw_curves(rounds: list[dict], centralized: float | None = None, title: str = "") -> Figure:
    """Three panels: test accuracy, train and test loss, and round time measured vs predicted."""
    x = [r["round"] for r in rounds]
    fig = Figure(figsize=(12.0, 3.6), layout="constrained")
    acc, loss, seconds = fig.subplots(1, 3)
    _line(acc, x, [r.get("test_accuracy") for r in rounds], "p2psl", "#2f855a")
    if centralized is not None:
        acc.axhline(centralized, color="#4a5568", linestyle="--", linewidth=1,
                    label=f"centralized {centralized:.3f}")
    acc.set_ylim(0, 1.02)
    acc.set_title("test accuracy", fontsize=10, loc="left")
    _line(loss, x, [r.get("train_loss") for r in rounds], "train (mean over batches)", "#c05621")
    _line(loss, x, [r.get("test_loss") for r in rounds], "test", "#2b6cb0")
    loss.set_ylim(bottom=0)
    loss.set_title("loss", fontsize=10, loc="left")
    _line(seconds, x, [r.get("seconds") for r in rounds], "measured", "#1a202c")
    _line(seconds, x, [r.get("predicted_seconds") for r in rounds], "predicted before the round", "#805ad5",
          dashed=True)
    _line(seconds, x, [r.get("planned_seconds") for r in rounds], "the plan's own model", "#a0aec0", dashed=True)
    seconds.set_ylim(bottom=0)
    seconds.set_title("round time (s)", fontsize=10, loc="left")
    for ax in (acc, loss, seconds):
        ax.set_xlabel("round", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(color="#edf2f7")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False, loc="lower right" if ax is acc else "best")
    final = rounds[-1].get("test_accuracy")
    fig.suptitle(f"{title} — {plural(len(rounds), 'round')}" + (f", final test accuracy {final:.4f}" if final is not None else ""),
                 fontsize=11, x=0.01, ha="left")
    return fig


def _line(ax, x: list[int], y: list, label: str, colour: str, dashed: bool = False) -> None:
    points = [(a, b) for a, b in zip(x, y) if isinstance(b, (int, float))]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=4, color=colour, label=label, linestyle="--" if dashed else "-")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print("usage: python -m p2psl.cli.report RUN_FOLDER\n\nRedraw curves.png of a run's output folder "
              "from its metrics.jsonl.")
        return 0
    if len(args) != 1:
        print("usage: python -m p2psl.cli.report RUN_FOLDER", file=sys.stderr)
        return 2
    if not (Path(args[0]) / "metrics.jsonl").is_file():
        print(f"{args[0]}: no metrics.jsonl there (give the output folder of a run)", file=sys.stderr)
        return 2
    path = write_curves(args[0])
    if path is None:
        print(f"{args[0]}: no round in metrics.jsonl", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
