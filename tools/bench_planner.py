"""Planner solve times on synthetic models: 37 layers × 5 nodes, 100 × 8 and 200 × 16.

The compute nodes get different speeds and memory, so `make_plan` takes the MILP path; the
profiles are random but seeded, so runs are comparable. Prints one line per size and then a JSON
line with planner_seconds_37x5, planner_seconds_100x8 and planner_seconds_200x16.

    .venv/bin/python tools/bench_planner.py [--sizes 37x5,100x8] [--free-cuts] [--method milp]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from p2psl.planner import make_plan
from p2psl.profile import Profile
from p2psl.topology import parse_topology

MIB = 2**20


def synthetic(layers: int, nodes: int, owners: int = 8, seed: int = 0, free_cuts: bool = False):
    """A topology and per-peer profiles: random layer costs, nodes at speeds 0.5–2 with 16–64 GiB."""
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
        text.append(f'[[peer]]\nname = "{name}"\nrole = "data_owner"\naddress = "127.0.0.1:{7000 + k}"\nmemory = "8GiB"\n')
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


def bench(layers: int, nodes: int, method: str, free_cuts: bool) -> float:
    topology, profiles, samples = synthetic(layers, nodes, free_cuts=free_cuts)
    start = time.perf_counter()
    plan = make_plan(topology, profiles, samples, method=method)
    seconds = time.perf_counter() - start
    chain = " ".join(f"{s.node}:{s.first}-{s.last}" for s in plan.chain)
    print(f"{layers:>4} layers × {nodes:>2} nodes  {seconds:7.3f} s  period {plan.period_seconds:.4f} s  {chain}",
          flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="37x5,100x8,200x16")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--free-cuts", action="store_true", help="let the planner choose the owners' cuts too")
    args = parser.parse_args()
    out = {}
    for size in args.sizes.split(","):
        layers, nodes = map(int, size.split("x"))
        out[f"planner_seconds_{layers}x{nodes}"] = round(bench(layers, nodes, args.method, args.free_cuts), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
