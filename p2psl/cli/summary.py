"""The end-of-run report of `p2psl run`: rounds, accuracy beside centralized training, predicted
versus measured round time, and each peer's memory and traffic."""

from __future__ import annotations

from pathlib import Path

from p2psl.runtime.metrics import read_metrics
from p2psl.topology import Topology
from p2psl.units import format_bytes, plural


def summarise(topology: Topology, out: Path, codes: dict[str, int], seconds: float,
              baseline: bool) -> tuple[dict, bool]:
    records = read_metrics(out / "metrics.jsonl")
    rounds = [r for r in records if r.get("event") == "round"]
    peers = [r for r in records if r.get("event") == "peer"]
    ok = all(code == 0 for code in codes.values()) and len(rounds) == topology.training.rounds
    lines = ["", f"{'round':>5} {'train loss':>10} {'test acc':>9} {'seconds':>8} {'predicted':>9}"]
    for r in rounds:
        lines.append(f"{r['round']:>5} {_num(r['train_loss'], 4):>10} {_num(r['test_accuracy'], 4):>9} "
                     f"{_num(r['seconds'], 2):>8} {_num(r.get('predicted_seconds'), 2):>9}")
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
        lines.append(f"centralized training, same model and {central['epochs']} epochs: "
                     f"{central['test_accuracy']:.4f}  (p2psl {gap:+.2f} points)")
    errors = [abs(r["seconds"] - r["predicted_seconds"]) / r["seconds"] for r in rounds
              if r.get("predicted_seconds") and r.get("seconds")]
    if errors:
        report["cost_model_mean_abs_error"] = sum(errors) / len(errors)
        lines.append(f"round time predicted vs measured: mean error {100 * report['cost_model_mean_abs_error']:.1f} %")
    if peers:
        lines.append("")
        lines.append(f"{'peer':<10} {'role':<10} {'peak memory':>12} {'sent':>10} {'received':>10}")
        for p in peers:
            lines.append(f"{p['name']:<10} {p['role']:<10} {format_bytes(p['peak_rss_bytes']):>12} "
                         f"{format_bytes(p['bytes_sent']):>10} {format_bytes(p['bytes_received']):>10}")
    lines.extend(_checkpoints(topology, out, peers, report))
    lines.append(f"outputs: {out}/metrics.jsonl, plan.json, trace.json, peers/")
    report["text"] = "\n".join(lines)
    return report, ok


def _checkpoints(topology: Topology, out: Path, peers: list[dict], report: dict) -> list[str]:
    """What the checkpoints cost the disk: bytes the peers wrote, and what is left of them."""
    written = sum(p.get("checkpoint_bytes", 0) for p in peers)
    kept = sum(f.stat().st_size for f in out.rglob("round-*.ckpt"))
    report["checkpoint_bytes_written"], report["checkpoint_bytes_kept"] = written, kept
    keep = topology.training.keep_checkpoints
    rule = "every round" if keep is None else f"the newest {plural(keep, 'round')} per peer"
    return [f"checkpoints: {format_bytes(written)} written, {format_bytes(kept)} kept on disk "
            f"({rule}: [training] keep_checkpoints)"]


def _num(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
