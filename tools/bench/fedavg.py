"""What splitting costs against federated averaging, on the same owners, transport and machine.

    .venv/bin/python tools/bench/fedavg.py [--quick] --out DIR

Runs one deployment twice over, alternating: the digits CNN with 4 data owners and 2 compute
nodes (batch 32, 2 local epochs), as a split run (`[training] mode = "split"`) and as its
federated-averaging baseline (`mode = "fedavg"`: every owner trains the whole model, the owners
average it at each round's end the same way; [Note: the federated-averaging baseline]). Every
peer is its own process on this machine, as `p2psl run` starts them. Both modes run in this one
invocation, so the ratios compare runs on the same machine under the same load.

Keys (flat, as tools/bench/run.py collects them; "details" has every round):

    round_time_ratio_vs_fedavg    median round seconds (rounds 2..end, every repeat pooled), split ÷ fedavg
    cpu_seconds_ratio_vs_fedavg   CPU seconds per round of all peers together (from round 1's end to
                                  the last round's), split ÷ fedavg
    fedavg_accuracy_max_abs_diff  the largest |split − fedavg| test accuracy over the rounds
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import free_ports, main, records, run_deployment, write_json

OWNERS, NODES = ("alice", "bob", "carol", "dave"), ("c1", "c2")


def topology(mode: str, rounds: int, ports: list[int]) -> str:
    """The deployment of this benchmark as a topology file, in `mode`."""
    lines = ["[training]", 'model = "cnn"', 'dataset = "digits"', f"rounds = {rounds}", "local_epochs = 2",
             "batch_size = 32", "learning_rate = 0.05", "momentum = 0.9", 'partition = "iid"', "seed = 0",
             f'mode = "{mode}"', ""]
    for (name, role), port in zip([(o, "data_owner") for o in OWNERS] + [(n, "compute") for n in NODES], ports):
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                  'memory = "2GiB"', ""]
    return "\n".join(lines)


def run_mode(mode: str, rounds: int, out: Path) -> dict:
    """One `p2psl run` in `mode`: its rounds and the peers' CPU seconds per round."""
    started = time.monotonic()
    rounds_seen = [{k: r.get(k) for k in ("round", "seconds", "test_accuracy", "train_loss")}
                   for r in run_deployment(topology(mode, rounds, free_ports(len(OWNERS) + len(NODES))), out, mode)
                   if r.get("event") == "round"]
    cpu = {}
    for name in OWNERS + NODES:  # each peer's own file has its CPU seconds after every round
        for r in records(out / "run" / "peers" / name / "metrics.jsonl"):
            if r.get("event") == "peer_round":
                cpu.setdefault(name, {})[r["round"]] = r["cpu_seconds"]
    per_round = sum(c[rounds] - c[1] for c in cpu.values()) / (rounds - 1)
    return {"mode": mode, "wall_seconds": round(time.monotonic() - started, 1), "rounds": rounds_seen,
            "cpu_seconds_per_round": per_round}


def run(quick: bool, out: Path) -> dict:
    """Split and federated runs alternating (one pair in the quick mode, two otherwise)."""
    out, rounds, repeats = Path(out) / "fedavg", 6 if quick else 10, 1 if quick else 2
    runs = []
    for repeat in range(repeats):
        for mode in ("split", "fedavg"):
            result = run_mode(mode, rounds, out / f"{mode}-{repeat + 1}")
            runs.append(result)
            later = [r["seconds"] for r in result["rounds"][1:]]
            print(f"{mode:<7} #{repeat + 1}: rounds 2..{rounds} median {statistics.median(later):.3f} s, "
                  f"{result['cpu_seconds_per_round']:.2f} CPU s per round, final accuracy "
                  f"{result['rounds'][-1]['test_accuracy']:.4f}", flush=True)
    seconds = {m: statistics.median(r["seconds"] for x in runs if x["mode"] == m for r in x["rounds"][1:])
               for m in ("split", "fedavg")}
    cpu = {m: statistics.median(x["cpu_seconds_per_round"] for x in runs if x["mode"] == m) for m in seconds}
    diffs = [abs(a["test_accuracy"] - b["test_accuracy"])
             for s, f in zip(runs[0::2], runs[1::2]) for a, b in zip(s["rounds"], f["rounds"])]
    results = {
        "round_time_ratio_vs_fedavg": seconds["split"] / seconds["fedavg"],
        "cpu_seconds_ratio_vs_fedavg": cpu["split"] / cpu["fedavg"],
        "fedavg_accuracy_max_abs_diff": max(diffs),
        "details": {"round_seconds": seconds, "cpu_seconds_per_round": cpu, "runs": runs},
    }
    write_json(out / "fedavg.json", results)
    return results


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
