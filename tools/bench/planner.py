"""Planner solve times on synthetic models: 37 layers × 5 nodes, 100 × 8 and 200 × 16.

    .venv/bin/python -m tools.bench.planner [--sizes 37x5,100x8] [--free-cuts] [--method milp]

The compute nodes get different speeds and memory, so `make_plan` takes the MILP path; the
profiles are random but seeded, so runs are comparable. Each size is solved in a fresh process
(the first `Highs()` of a process costs extra, and a user's `p2psl plan` pays it too) and the
figure is the wall time of `make_plan` alone. Keys planner_seconds_37x5, planner_seconds_100x8
(target ≤ 2 s) and planner_seconds_200x16.
"""

from __future__ import annotations

import sys

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: the repository root holds the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, ROOT, child_env, write_json

MIB = 2**20
SIZES = ((37, 5), (100, 8), (200, 16))


def synthetic(layers: int, nodes: int, owners: int = 8, seed: int = 0, free_cuts: bool = False):
    """A topology and per-peer profiles: random layer costs, nodes at speeds 0.5–2 with 16–64 GiB."""
    from p2psl.planning.profile import Profile
    from p2psl.topology import parse_topology

    rng = random.Random(seed)
    fwd = [rng.uniform(1e-3, 1e-2) for _ in range(layers)]
    base = Profile("synthetic", 32, tuple(fwd), tuple(f * rng.uniform(1.5, 3) for f in fwd),
                   tuple(rng.uniform(0, 1e-3) for _ in range(layers)),
                   tuple(int(rng.uniform(0.1, 4) * MIB) for _ in range(layers)),
                   tuple(int(rng.uniform(0.01, 20) * MIB) for _ in range(layers)))
    cuts = "" if free_cuts else f"first_cut = 1\nlast_cut = {layers - 1}\n"
    text = [f"[training]\nbatch_size = 32\n{cuts}"]
    profiles = {}
    for k in range(owners):
        name = f"owner{k}"
        text.append(f'[[peer]]\nname = "{name}"\nrole = "data_owner"\naddress = "127.0.0.1:{7000 + k}"\n'
                    'memory = "8GiB"\n')
        profiles[name] = base.scaled(0.25)
    for i in range(nodes):
        name = f"c{i + 1:02d}"
        speed, memory = rng.choice([0.5, 0.8, 1.0, 1.25, 2.0]), rng.choice([16, 32, 64])
        text.append(f'[[peer]]\nname = "{name}"\nrole = "compute"\naddress = "127.0.0.1:{8000 + i}"\n'
                    f'memory = "{memory}GiB"\nspeed = {speed}\n')
        profiles[name] = base.scaled(speed)
    topology = parse_topology("\n".join(text))
    samples = {f"owner{k}": 1000 + 100 * k for k in range(owners)}
    return topology, profiles, samples


def bench(layers: int, nodes: int, method: str = "auto", free_cuts: bool = False) -> dict:
    """Solve one size here; the seconds, the plan's method, period and chain."""
    from p2psl.planning.planner import make_plan

    topology, profiles, samples = synthetic(layers, nodes, free_cuts=free_cuts)
    start = time.perf_counter()
    plan = make_plan(topology, profiles, samples, method=method)
    seconds = time.perf_counter() - start
    return {"layers": layers, "nodes": nodes, "seconds": round(seconds, 4), "method": plan.method,
            "period_seconds": round(plan.period_seconds, 4),
            "chain": " ".join(f"{s.node}:{s.first}-{s.last}" for s in plan.chain)}


def bench_in_child(layers: int, nodes: int, method: str = "auto", free_cuts: bool = False) -> dict:
    cmd = [PYTHON, "-m", "tools.bench.planner", "--child", f"{layers}x{nodes}", "--method", method]
    if free_cuts:
        cmd.append("--free-cuts")
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, out: Path, sizes=SIZES, method: str = "auto", free_cuts: bool = False) -> dict:
    rows = []
    for layers, nodes in sizes:
        row = bench_in_child(layers, nodes, method, free_cuts)
        print(f"  {layers:>4} layers × {nodes:>2} nodes  {row['seconds']:7.3f} s  ({row['method']}, "
              f"period {row['period_seconds']:.4f} s)", flush=True)
        rows.append(row)
    results = {f"planner_seconds_{r['layers']}x{r['nodes']}": r["seconds"] for r in rows}
    results["details"] = {"sizes": rows, "method": method, "free_cuts": free_cuts}
    write_json(Path(out) / "planner.json", results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="37x5,100x8,200x16")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--free-cuts", action="store_true", help="let the planner choose the owners' cuts too")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one size, solved in this process
    args = parser.parse_args()
    if args.child:
        layers, nodes = map(int, args.child.split("x"))
        print(json.dumps(bench(layers, nodes, args.method, args.free_cuts)))
        return
    sizes = [tuple(map(int, s.split("x"))) for s in args.sizes.split(",")]
    results = run(False, args.out, sizes, args.method, args.free_cuts)
    print(json.dumps({k: v for k, v in results.items() if k != "details"}))


if __name__ == "__main__":
    main()
