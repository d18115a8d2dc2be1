"""Micro-batches where they pay: one data owner, a chain of three compute nodes.

    .venv/bin/python tools/bench/microbatch.py [--quick] --out DIR

One owner keeps one batch in flight, so without micro-batches only one stage of its chain works
at a time. Cut into micro-batches ([Note: micro-batches]), a batch's pieces follow each other
through the chain and its stages overlap. The deployment is emulated so that what is timed is the
pipeline, not two shared cores: the compute nodes run at `speed = 0.25` (each task padded by
sleeping, [Note: emulated speed]) and the links carry 1 Gbit/s with 2 ms latency
(`[emulation] links = true`); synthetic 3×32×32 images, batch 128, on `tools.bench.models:tower`
(a stem, six equal convolutions, a head; the owner keeps the stem and the head), so that the
planner can give the three nodes even stages, as it does for micro-batches. (On the zoo's CNN, whose
four middle layers split 45/45/10 % at best, 4 micro-batches gave 1.72.) Every peer is its own
process; the runs alternate.

Keys (flat, as tools/bench/run.py collects them; "details" has every round):

    microbatch_speedup_1owner       median round seconds with 1 micro-batch ÷ with 4 (rounds 2..end,
                                    every repeat pooled)
    microbatch_speedup_1owner_auto  the same with 1 ÷ with `micro_batches = "auto"`, the planner's
                                    choice (`microbatch_auto_choice`)
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

NODES = ("c1", "c2", "c3")


def topology(micro_batches: int | str, rounds: int, ports: list[int]) -> str:
    lines = ["[emulation]", "links = true", "", "[training]", 'model = "tools.bench.models:tower"',
             'dataset = "synthetic"', "synthetic_shape = [3, 32, 32]", "synthetic_samples = 1280", f"rounds = {rounds}",
             "batch_size = 128", "learning_rate = 0.05", "first_cut = 1", f"last_cut = {1 + TOWER_DEPTH}",
             f"micro_batches = {json.dumps(micro_batches)}", ""]
    lines += ["[[peer]]", 'name = "alice"', 'role = "data_owner"', f'address = "127.0.0.1:{ports[0]}"',
              'memory = "2GiB"', ""]
    for name, port in zip(NODES, ports[1:]):
        lines += ["[[peer]]", f'name = "{name}"', 'role = "compute"', f'address = "127.0.0.1:{port}"',
                  'memory = "4GiB"', "speed = 0.25", ""]
    for a, b in (("alice", "c1"), ("c1", "c2"), ("c2", "c3"), ("c3", "alice")):
        lines += ["[[link]]", f'peers = ["{a}", "{b}"]', 'bandwidth = "1Gbit/s"', 'latency = "2ms"', ""]
    return "\n".join(lines)


def run_once(micro_batches: int | str, rounds: int, out: Path) -> dict:
    started = time.monotonic()
    rounds_seen = [{k: r.get(k) for k in ("round", "seconds", "test_accuracy")}
                   for r in run_deployment(topology(micro_batches, rounds, free_ports(1 + len(NODES))), out,
                                           f"micro_batches = {micro_batches}") if r.get("event") == "round"]
    chosen = json.loads((out / "run" / "plan.json").read_text()).get("micro_batches", 1)
    return {"micro_batches": micro_batches, "chosen": chosen, "wall_seconds": round(time.monotonic() - started, 1),
            "rounds": rounds_seen}


def run(quick: bool, out: Path) -> dict:
    out, rounds, repeats = Path(out) / "microbatch", 3 if quick else 5, 1 if quick else 2
    runs = []
    for repeat in range(repeats):
        for micro_batches in (1, 4, "auto"):
            result = run_once(micro_batches, rounds, out / f"m{micro_batches}-{repeat + 1}")
            runs.append(result)
            later = [r["seconds"] for r in result["rounds"][1:]]
            print(f"micro_batches {micro_batches} ({result['chosen']}) #{repeat + 1}: rounds 2..{rounds} median "
                  f"{statistics.median(later):.2f} s, accuracy {result['rounds'][-1]['test_accuracy']:.3f}",
                  flush=True)
    seconds = {str(m): statistics.median(r["seconds"] for x in runs if x["micro_batches"] == m
                                         for r in x["rounds"][1:]) for m in (1, 4, "auto")}
    results = {"microbatch_speedup_1owner": seconds["1"] / seconds["4"],
               "microbatch_speedup_1owner_auto": seconds["1"] / seconds["auto"],
               "microbatch_auto_choice": runs[-1]["chosen"],
               "details": {"round_seconds": seconds, "runs": runs}}
    write_json(out / "microbatch.json", results)
    return results


if __name__ == "__main__":
    sys.exit(main(run, __doc__))
