"""Numbers a run reports: resident memory, round records and the metrics.jsonl file (SPEC §7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import psutil


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM); torch allocations are included, unlike tracemalloc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def cpu_seconds() -> float:
    """CPU seconds this process has used (user and system); with `p2psl run --in-process`, every
    peer's, since they share the process."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def reset_peak_rss() -> bool:
    """Restart the VmHWM high-water mark (Linux: write 5 to clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def round_record(round_: int, reports: list, predicted: float | None) -> dict:
    """The round's line of metrics.jsonl from every owner's EvalReport of that round."""
    total = sum(r.total for r in reports)
    samples = sum(r.samples for r in reports)
    return {
        "event": "round",
        "round": round_,
        "train_loss": _clean(sum(r.train_loss * r.samples for r in reports) / samples if samples else None),
        "test_accuracy": sum(r.correct for r in reports) / total if total else None,
        "test_loss": _clean(sum(r.loss_sum for r in reports) / total if total else None),
        "seconds": max(r.seconds for r in reports) if reports else None,
        "predicted_seconds": predicted,
        "owners": sorted(r.owner for r in reports),
    }


def _clean(value: float | None) -> float | None:
    """JSON has no NaN or infinity; a diverged loss is reported as null."""
    return None if value is None or not math.isfinite(value) else value


class MetricsFile:
    """Appends one JSON object per line; each line is flushed so a crash loses nothing written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl (a torn last line, from a crash, is skipped)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
