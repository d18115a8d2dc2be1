"""Wider or deeper: the same four compute nodes as one chain of four, two of two, four of one, and
as the planner chooses (`chains = "auto"`), measured with real peers.

    .venv/bin/python tools/bench/chains.py [--quick] --out DIR

Eight data owners, four compute nodes ([Note: several chains]). The deployment is emulated so
that what is timed is the pipeline, not two shared cores: the compute nodes run at `speed = 0.1`
and the owners at 0.25 (each task padded by sleeping, [Note: emulated speed]: twelve peers on two
cores would otherwise time the cores) and every link carries 1 Gbit/s with 2 ms
latency (`[emulation] links = true`; every owner is linked to every compute node and the compute
nodes to each other, so each arrangement can run); synthetic 3×32×32 images, batch 64, on
`tools.bench.models:tower` (the owners keep the stem and the head; six equal middle layers, which
one, two and four-hop chains can split evenly or nearly so). Every peer is its own process; the
configurations alternate.

Keys (flat, as tools/bench/run.py collects them; "details" has every round):

    chains_round_seconds_<c>                   median round seconds with c chains (1, 2, 4; rounds
                                               2..end, every repeat pooled)
    chains_round_seconds_auto                  the same for the runs with `chains = "auto"` alone
    chains_auto_choice                         how many chains the planner chose
    chosen_vs_best_chains_round_time_ratio     the planner's choice (the "auto" runs) ÷ the best of 1, 2
                                               and 4 chains
    chosen_vs_best_chains_round_time_ratio_pooled  the same with each distinct plan's round time pooled
                                               over every run of it

"auto" runs the very plan (the same digest) of one of the explicit configurations, so the runs of
that configuration measure the choice too: the pooled ratio takes each distinct plan's median over
all its runs, half the noise of a shared machine (one plan's runs differ by 10–20 % here).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import free_ports, main, run_deployment, write_json
from tools.bench.models import TOWER_DEPTH

OWNERS = tuple(f"o{k}" for k in range(1, 9))
NODES = ("c1", "c2", "c3", "c4")
CHOICES = (1, 2, 4, "auto")
#: emulated speeds: a compute node's task takes 10× its CPU time (sleeping the rest), an owner's 4×,
#: so that the twelve peers use about one of the two cores and what is timed is the pipeline
NODE_SPEED, OWNER_SPEED = 0.1, 0.25


def topology(chains: int | str, rounds: int, ports: list[int]) -> str:
    lines = ["[emulation]", "links = true", "", "[training]", 'model = "tools.bench.models:tower"',
             'dataset = "synthetic"', "synthetic_shape = [3, 32, 32]", "synthetic_samples = 2560", f"rounds = {rounds}",
             "batch_size = 64", "learning_rate = 0.05", "first_cut = 1", f"last_cut = {1 + TOWER_DEPTH}",
             f"chains = {json.dumps(chains)}", ""]
    for name, port in zip(OWNERS + NODES, ports):
        role = "compute" if name in NODES else "data_owner"
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                  'memory = "2GiB"', f"speed = {NODE_SPEED if name in NODES else OWNER_SPEED}", ""]
    pairs = [(o, c) for o in OWNERS for c in NODES] + [(a, b) for i, a in enumerate(NODES) for b in NODES[i + 1:]]
    for a, b in pairs:
        lines += ["[[link]]", f'peers = ["{a}", "{b}"]', 'bandwidth = "1Gbit/s"', 'latency = "2ms"', ""]
    return "\n".join(lines)


def run_once(chains: int | str, rounds: int, out: Path) -> dict:
    started = time.monotonic()
    records = [r for r in run_deployment(topology(chains, rounds, free_ports(len(OWNERS) + len(NODES))), out,
                                         f"chains = {chains}") if r.get("event") == "round"]
    plan = json.loads((out / "run" / "plan.json").read_text())
    return {"chains": chains, "chosen": plan.get("chains", 1), "digest": plan["digest"],
            "predicted_round_seconds": plan["round_seconds"], "wall_seconds": round(time.monotonic() - started, 1),
            "rounds": [{k: r.get(k) for k in ("round", "seconds", "test_accuracy")} for r in records]}


def run(quick: bool, out: Path) -> dict:
    out, rounds, repeats = Path(out) / "chains", 3 if quick else 4, 1 if quick else 2
    runs = []
    for repeat in range(repeats):
        for chains in CHOICES:
            result = run_once(chains, rounds, out / f"chains{chains}-{repeat + 1}")
            runs.append(result)
            later = [r["seconds"] for r in result["rounds"][1:]]
            print(f"chains {chains} ({result['chosen']}) #{repeat + 1}: rounds 2..{rounds} median "
                  f"{statistics.median(later):.2f} s (predicted {result['predicted_round_seconds']:.2f} s), "
                  f"accuracy {result['rounds'][-1]['test_accuracy']:.3f}", flush=True)
    results = summarize(runs)
    results["details"]["runs"] = runs
    write_json(out / "chains.json", results)
    return results


def summarize(runs: list[dict]) -> dict:
    """The module's figures from its runs (module docstring)."""
    def median(selected) -> float:
        return statistics.median(r["seconds"] for x in selected for r in x["rounds"][1:])

    seconds = {str(c): median(x for x in runs if x["chains"] == c) for c in CHOICES}
    by_plan = {d: median(x for x in runs if x["digest"] == d) for d in {x["digest"] for x in runs}}
    plan_of = {c: next(x["digest"] for x in runs if x["chains"] == c) for c in CHOICES}
    best = min(by_plan[plan_of[c]] for c in CHOICES if c != "auto")
    return {**{f"chains_round_seconds_{c}": seconds[str(c)] for c in CHOICES},
            "chains_auto_choice": next(x["chosen"] for x in runs if x["chains"] == "auto"),
            "chosen_vs_best_chains_round_time_ratio": seconds["auto"] / min(seconds[str(c)] for c in CHOICES
                                                                            if c != "auto"),
            "chosen_vs_best_chains_round_time_ratio_pooled": by_plan[plan_of["auto"]] / best,
            "details": {"round_seconds": seconds, "round_seconds_by_plan": by_plan}}


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
