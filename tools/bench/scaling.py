"""Multihop vs horizontal scaling on the MP-SL authors' profiles, by the cost model alone (used by
tools/bench/costmodel.py).

The paper's setting: K = 150 data owners on Raspberry Pi 4s (profile columns "d1"), each with
B = 16 batches of 128 samples per local epoch and r = 2 local epochs per round; owners keep
VGG-19's layers 1–3 and 23–25 or ResNet-101's 1–2 and 37, as the authors did. For n compute
nodes, two ways to serve them:

    multihop     one chain of n nodes; each holds K copies of its segment of the middle
    horizontal   n one-hop deployments side by side, each a single node serving ⌈K / n⌉ owners
                 with ⌈K / n⌉ copies of the whole middle (the slowest one sets the round)

Node kinds: "equal" = the authors' VM with 64 GiB; "cheap" = a smaller, slower instance of it:
half the speed (profile times × 2) and 16 GiB. Links are free (a LAN). For each, the round time
and the node-hours a round costs (n × round time); a configuration whose largest node does not
fit in memory is infeasible. Cross-deployment averaging of the horizontal setup's n middles is
not counted (it favours horizontal scaling slightly).
"""

from __future__ import annotations

import sys

import math
from pathlib import Path

if __package__ in (None, ""):  # run by path: the repository root holds the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import REFERENCE_PROFILES

MODELS = {"vgg19": (3, 22), "resnet101": (2, 36)}
KINDS = {"equal": (1.0, "64GiB"), "cheap": (0.5, "16GiB")}
OWNERS, BATCHES, EPOCHS, BATCH_SIZE = 150, 16, 2, 128


def topology(model: str, owners: int, nodes: int, kind: str, table: Path):
    from p2psl.topology import parse_topology

    speed, memory = KINDS[kind]
    first, last = MODELS[model]
    lines = ["[training]", f'model = "{model}"', 'dataset = "synthetic"', f"batch_size = {BATCH_SIZE}",
             f"local_epochs = {EPOCHS}", f"first_cut = {first}", f"last_cut = {last}", f'profile = "{table}"']
    port = 20000
    # The compute nodes are what is compared; an owner keeping VGG-19's classifier collects
    # K − 1 shares of it for FedAvg (150 owners: ~70 GB), so owners are left uncapped here.
    for k in range(owners):
        lines += ["[[peer]]", f'name = "o{k:03d}"', 'role = "data_owner"', f'address = "127.0.0.1:{port + k}"',
                  'memory = "1TiB"', 'device = "d1"']
    for i in range(nodes):
        lines += ["[[peer]]", f'name = "c{i + 1}"', 'role = "compute"', f'address = "127.0.0.1:{port + owners + i}"',
                  f'memory = "{memory}"', 'device = "VM"', f"speed = {speed}"]
    return parse_topology("\n".join(lines))


def one(model: str, kind: str, nodes: int, mode: str, table: Path) -> dict:
    """Round time and node-hours of one configuration (None when it does not fit)."""
    from p2psl.planning import costmodel
    from p2psl.errors import PlanInfeasible
    from p2psl.planning.planner import make_plan
    from p2psl.planning.profile import peer_profiles

    owners = OWNERS if mode == "multihop" else math.ceil(OWNERS / nodes)
    topo = topology(model, owners, nodes if mode == "multihop" else 1, kind, table)
    profiles = peer_profiles(topo)
    samples = {o.name: BATCHES * BATCH_SIZE for o in topo.owners}
    try:
        plan = make_plan(topo, profiles, samples)
    except PlanInfeasible as exc:
        return {"round_seconds": None, "node_hours": None, "infeasible": str(exc)}
    p = costmodel.predict(plan, topo, profiles, samples, test_samples={o: 0 for o in samples})
    return {"round_seconds": p.round_seconds, "node_hours": nodes * p.round_seconds / 3600,
            "period_seconds": p.expected_period_seconds, "bottleneck": p.bottleneck,
            "largest_node_gib": max(plan.peak_memory_bytes[s.node] for s in plan.chain) / 2**30,
            "segments": {s.node: [s.first, s.last] for s in plan.chain}}


def scaling(quick: bool) -> tuple[dict, list[dict]]:
    """Headline ratios (multihop ÷ horizontal at 4 nodes, for each model and node kind) and the
    table behind them."""
    folder = REFERENCE_PROFILES
    counts = (4,) if quick else (2, 3, 4, 5, 6, 8)
    rows = []
    for model in MODELS:
        table = folder / f"{model}_cifar10_bs128.csv"
        for kind in KINDS:
            for n in counts:
                multi, horizontal = (one(model, kind, n, mode, table) for mode in ("multihop", "horizontal"))
                rows.append({"model": model, "nodes": kind, "n": n, "multihop": multi, "horizontal": horizontal})
    keys = {}
    for row in rows:
        if row["n"] != 4:
            continue
        multi, horizontal = row["multihop"], row["horizontal"]
        stem = f"scaling_{row['model']}_{row['nodes']}_4nodes"
        for what in ("round_seconds", "node_hours"):
            keys[f"{stem}_multihop_{what}"] = multi[what]
            keys[f"{stem}_horizontal_{what}"] = horizontal[what]
        if multi["round_seconds"] and horizontal["round_seconds"]:
            keys[f"{stem}_multihop_vs_horizontal_round_time"] = multi["round_seconds"] / horizontal["round_seconds"]
    return keys, rows
