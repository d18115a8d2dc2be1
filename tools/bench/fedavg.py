"""What splitting costs against federated averaging, on the same owners, transport and machine.

    .venv/bin/python tools/bench/fedavg.py [--quick] --out DIR

Runs one deployment over and over, alternating: the digits CNN with 4 data owners and 2 compute
nodes (batch 32, 2 local epochs), as a split run (`[training] mode = "split"`, `chains = "auto"`:
the planner chooses between one chain of both nodes and two chains of one, by the round it
predicts with the runtime's costs), as the same split run held to one chain (`chains = 1`, the
default), and as its federated-averaging baseline (`mode = "fedavg"`: every owner trains the
whole model, the owners average it at each round's end the same way; [Note: the
federated-averaging baseline]). Every peer is its own process on this machine, as `p2psl run`
starts them. Every mode runs in this one invocation, so the ratios compare runs on the same
machine under the same load.

Keys (flat, as tools/bench/run.py collects them; "details" has every round):

    round_time_ratio_vs_fedavg            median round seconds (rounds 2..end, every repeat pooled),
                                          split (the planner's chains) ÷ fedavg
    cpu_seconds_ratio_vs_fedavg           CPU seconds per round of all peers together (from round 1's
                                          end to the last round's), split ÷ fedavg
    round_time_ratio_vs_fedavg_one_chain  the same round ratio, split held to one chain
    cpu_seconds_ratio_vs_fedavg_one_chain the same CPU ratio, split held to one chain
    fedavg_accuracy_max_abs_diff          the largest |split − fedavg| test accuracy over the rounds,
                                          both split runs
    split_chains                          the chains of the split runs' plans at their end (a
                                          re-plan on measured times could change them mid-run)
    floor_round_time_ratio                the same deployment's training with the leanest runtime
    floor_cpu_seconds_ratio               there can be (tools/bench/floor.py), split ÷ whole, its runs
                                          alternating with the others: what splitting costs here
                                          whatever carries the batches
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench import floor
from tools.bench.common import free_ports, main, records, run_deployment, write_json

OWNERS, NODES = ("alice", "bob", "carol", "dave"), ("c1", "c2")


#: the runs compared: name → (training mode, chains)
RUNS = {"split": ("split", '"auto"'), "one chain": ("split", "1"), "fedavg": ("fedavg", "1")}


def topology(run: str, rounds: int, ports: list[int]) -> str:
    """The deployment of this benchmark as a topology file, for `run` (a key of `RUNS`)."""
    mode, chains = RUNS[run]
    lines = ["[training]", 'model = "cnn"', 'dataset = "digits"', f"rounds = {rounds}", "local_epochs = 2",
             "batch_size = 32", "learning_rate = 0.05", "momentum = 0.9", 'partition = "iid"', "seed = 0",
             f'mode = "{mode}"', f"chains = {chains}", ""]
    for (name, role), port in zip([(o, "data_owner") for o in OWNERS] + [(n, "compute") for n in NODES], ports):
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                  'memory = "2GiB"', ""]
    return "\n".join(lines)


def run_mode(mode: str, rounds: int, out: Path) -> dict:
    """One `p2psl run` of `mode` (a key of `RUNS`): its rounds, the peers' CPU seconds per round
    and the chains of its plan."""
    started = time.monotonic()
    rounds_seen = [{k: r.get(k) for k in ("round", "seconds", "test_accuracy", "train_loss")}
                   for r in run_deployment(topology(mode, rounds, free_ports(len(OWNERS) + len(NODES))), out, mode)
                   if r.get("event") == "round"]
    chains = json.loads((out / "run" / "plan.json").read_text()).get("chains", 1)
    cpu = {}
    for name in OWNERS + NODES:  # each peer's own file has its CPU seconds after every round
        for r in records(out / "run" / "peers" / name / "metrics.jsonl"):
            if r.get("event") == "peer_round":
                cpu.setdefault(name, {})[r["round"]] = r["cpu_seconds"]
    per_round = sum(c[rounds] - c[1] for c in cpu.values()) / (rounds - 1)
    return {"mode": mode, "wall_seconds": round(time.monotonic() - started, 1), "rounds": rounds_seen,
            "cpu_seconds_per_round": per_round, "chains": chains}


def run(quick: bool, out: Path) -> dict:
    """The runs of `RUNS` and the floor's two alternating (one round of them in the quick mode, two
    otherwise)."""
    out, rounds, repeats = Path(out) / "fedavg", 6 if quick else 10, 1 if quick else 2
    runs, floors = [], []
    for repeat in range(repeats):
        for mode in ("split", "whole"):
            floors.append(floor.measure(mode, rounds) | {"mode": mode})
            print(f"floor {mode:<5} #{repeat + 1}: round {floors[-1]['round_seconds']:.3f} s, "
                  f"{floors[-1]['cpu_seconds_per_round']:.2f} CPU s per round", flush=True)
        for mode in RUNS:
            result = run_mode(mode, rounds, out / f"{mode.replace(' ', '-')}-{repeat + 1}")
            runs.append(result)
            later = [r["seconds"] for r in result["rounds"][1:]]
            print(f"{mode:<9} #{repeat + 1}: rounds 2..{rounds} median {statistics.median(later):.3f} s, "
                  f"{result['cpu_seconds_per_round']:.2f} CPU s per round, {result['chains']} chain(s), final "
                  f"accuracy {result['rounds'][-1]['test_accuracy']:.4f}", flush=True)
    seconds = {m: statistics.median(r["seconds"] for x in runs if x["mode"] == m for r in x["rounds"][1:])
               for m in RUNS}
    cpu = {m: statistics.median(x["cpu_seconds_per_round"] for x in runs if x["mode"] == m) for m in RUNS}
    by_mode = {m: [x for x in runs if x["mode"] == m] for m in RUNS}
    diffs = [abs(a["test_accuracy"] - b["test_accuracy"]) for split in ("split", "one chain")
             for s, f in zip(by_mode[split], by_mode["fedavg"]) for a, b in zip(s["rounds"], f["rounds"])]
    results = {
        "round_time_ratio_vs_fedavg": seconds["split"] / seconds["fedavg"],
        "cpu_seconds_ratio_vs_fedavg": cpu["split"] / cpu["fedavg"],
        "round_time_ratio_vs_fedavg_one_chain": seconds["one chain"] / seconds["fedavg"],
        "cpu_seconds_ratio_vs_fedavg_one_chain": cpu["one chain"] / cpu["fedavg"],
        "fedavg_accuracy_max_abs_diff": max(diffs),
        "split_chains": sorted({x["chains"] for x in by_mode["split"]}),
        **floor.ratios(floors),
        "details": {"round_seconds": seconds, "cpu_seconds_per_round": cpu, "runs": runs, "floor": floors},
    }
    write_json(out / "fedavg.json", results)
    return results


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
