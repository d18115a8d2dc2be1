"""The end-of-run report of `p2psl run`: rounds, accuracy beside centralized training, predicted
versus measured round time, and each peer's memory and traffic."""

from __future__ import annotations

import statistics
from pathlib import Path

from p2psl.runtime.metrics import read_metrics
from p2psl.topology import Topology
from p2psl.cli.progress import MANY_OWNERS
from p2psl.units import format_bytes, plural, span


def summarise(topology: Topology, out: Path, codes: dict[str, int], seconds: float,
              baseline: bool, shared_process: bool = False) -> tuple[dict, bool]:
    records = read_metrics(out / "metrics.jsonl")
    rounds = [r for r in records if r.get("event") == "round"]
    peers = [r for r in records if r.get("event") == "peer"]
    ok = all(code == 0 for code in codes.values()) and len(rounds) == topology.training.rounds
    lines = ["", f"{'round':>5} {'train loss':>10} {'test acc':>9} {'seconds':>8} {'predicted':>9} {'error':>7} "
                 f"{'planned':>8}"] if rounds else []
    for r in rounds:
        lines.append(f"{r['round']:>5} {_num(r['train_loss'], 4):>10} {_num(r['test_accuracy'], 4):>9} "
                     f"{_num(r['seconds'], 2):>8} {_num(r.get('predicted_seconds'), 2):>9} "
                     f"{_percent(prediction_error(r)):>7} {_num(r.get('planned_seconds'), 2):>8}")
    report: dict = {"ok": ok, "seconds": round(seconds, 2), "exit_codes": codes}
    final = rounds[-1]["test_accuracy"] if rounds else None
    report["test_accuracy"] = final
    lines.append("")
    lines.append(f"p2psl test accuracy after {plural(len(rounds), 'round')}: {_num(final, 4)}  ({seconds:.1f} s in all)")
    if baseline and final is not None:
        from p2psl.learning.centralized import train_centralized

        central = train_centralized(topology.training)
        report["centralized_accuracy"] = central["test_accuracy"]
        gap = (final - central["test_accuracy"]) * 100
        lines.append(f"centralized training, same model and {plural(central['epochs'], 'epoch')}: "
                     f"{central['test_accuracy']:.4f}  (p2psl {gap:+.2f} points)")
    report.update(prediction_errors(rounds))
    if "cost_model_round1_abs_error" in report:
        first = f"round time predicted vs measured: round 1 {_percent(report['cost_model_round1_abs_error'])}"
        last = max(r["round"] for r in rounds)
        if last > 1:
            median = "median " if last > 2 else ""
            first += (f", {_rounds(2, last)} {median}{_percent(report.get('cost_model_median_abs_error'))} "
                      f"(calibrated after every round; the plan's own model: {median}"
                      f"{_percent(report.get('planned_median_abs_error'))})")
        lines.append(first)
    if peers:
        lines.extend(peer_lines(peers, shared_process))
    lines.extend(_checkpoints(topology, out, peers, report))
    written = [name for name in ("metrics.jsonl", "plan.json", "trace.json", "peers/")
               if (out / name).exists() and (name != "metrics.jsonl" or records)]
    lines.append(f"outputs: {out}/{', '.join(written)}" if written else f"outputs: none in {out}")
    report["text"] = "\n".join(lines)
    return report, ok


def _rounds(first: int, last: int) -> str:
    return f"round {first}" if first == last else f"rounds {span(first, last)}"


def peer_lines(peers: list[dict], shared_process: bool = False) -> list[str]:
    """Each peer's memory and traffic; beyond `MANY_OWNERS` owners, the owners summed up in one
    line (least, median, most) and the three that sent most, as the progress view does."""
    lines = ["", f"{'peer':<10} {'role':<10} {'peak memory':>12} {'sent':>10} {'received':>10}"]
    owners = [p for p in peers if p["role"] == "data_owner"]
    many = len(owners) > MANY_OWNERS
    for p in peers:
        if not (many and p["role"] == "data_owner"):
            lines.append(_peer_row(p))
    if many:
        lines.append(f"{len(owners)} data owners, least / median / most: peak memory {_spread(owners, 'peak_rss_bytes')}"
                     f"; sent {_spread(owners, 'bytes_sent')}; received {_spread(owners, 'bytes_received')}")
        lines.append("the owners that sent most:")
        lines.extend(_peer_row(p) for p in sorted(owners, key=lambda p: (-p["bytes_sent"], p["name"]))[:3])
    if shared_process:
        lines.append("(every peer ran in one process: peak memory is that process's, not one peer's)")
    return lines


def _peer_row(p: dict) -> str:
    return (f"{p['name']:<10} {p['role'].replace('_', ' '):<10} {format_bytes(p['peak_rss_bytes']):>12} "
            f"{format_bytes(p['bytes_sent']):>10} {format_bytes(p['bytes_received']):>10}")


def _spread(peers: list[dict], key: str) -> str:
    values = sorted(p[key] for p in peers)
    return " / ".join(format_bytes(v) for v in (values[0], statistics.median_low(values), values[-1]))


def _checkpoints(topology: Topology, out: Path, peers: list[dict], report: dict) -> list[str]:
    """What the checkpoints cost the disk: bytes the peers wrote, and what is left of them."""
    written = sum(p.get("checkpoint_bytes", 0) for p in peers)
    kept = sum(f.stat().st_size for f in out.rglob("round-*.ckpt"))
    report["checkpoint_bytes_written"], report["checkpoint_bytes_kept"] = written, kept
    keep = topology.training.keep_checkpoints
    rule = "every round" if keep is None else f"the newest {plural(keep, 'round')} per peer"
    return [f"checkpoints: {format_bytes(written)} written, {format_bytes(kept)} kept on disk "
            f"({rule}: [training] keep_checkpoints)"]
def prediction_error(record: dict, key: str = "predicted_seconds") -> float | None:
    """|predicted ÷ measured − 1| of one round's record (None without both)."""
    predicted, measured = record.get(key), record.get("seconds")
    return abs(predicted / measured - 1) if predicted and measured else None


def prediction_errors(rounds: list[dict]) -> dict:
    """Round 1's error, and the median over the later rounds, of the calibrated predictions
    (`predicted_seconds`) and of the plan's own (`planned_seconds`)."""
    out: dict = {}
    first = [prediction_error(r) for r in rounds if r["round"] == 1]
    if first and first[0] is not None:
        out["cost_model_round1_abs_error"] = first[0]
    for name, key in (("cost_model_median_abs_error", "predicted_seconds"),
                      ("planned_median_abs_error", "planned_seconds")):
        later = [e for e in (prediction_error(r, key) for r in rounds if r["round"] >= 2) if e is not None]
        if later:
            out[name] = statistics.median(later)
    return out


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _num(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
