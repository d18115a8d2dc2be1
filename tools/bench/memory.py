"""Memory: the busiest compute node against the number of hops, a data owner against training
the whole model alone, and a compute node against the number of owners it serves.

    .venv/bin/python -m tools.bench.memory [--quick] --out DIR      (or through tools/bench/run.py)

Every figure comes from real peer processes (`tools.bench.deploy`): synthetic 3×32×32 data,
batch 16, three training batches per owner, the authors' owner layers (VGG-19 owners keep layers
1–3 and 23–25, ResNet-101 owners 1–2 and 37) and the planner's "memory" objective, which
minimises the largest compute node's predicted peak. Memory is a process's peak resident set
above its idle baseline (torch and the runtime loaded, no model yet).

1. Hops. For N compute nodes (full: 1..5; quick: VGG-19 1, 3, 5 and ResNet-101 1, 2, 4), the
   busiest node's training peak ([Note: training peak] in tools.bench.deploy) beside the
   planner's prediction for the same window (`memory.peak_memory(..., round_end=False)`:
   without the round end's FedAvg shares and replica snapshot, which plan.json's peaks include)
   less the cost model's fixed per-process overhead, which the idle baseline stands for). Ratios `cn_memory_ratio_5hop_vs_1hop` (VGG-19)
   and `cn_memory_ratio_4hop_vs_1hop` (ResNet-101). K = 4 owners (full: VGG-19 6, ResNet-101 8):
   enough that the copies outweigh a process's fixed cost, few enough for 24 GiB — each VGG-19
   owner keeps the 400 MB classifier, 1.5 GiB with its gradients and momentum.
2. Owner. A ResNet-101 data owner's own peak over a whole round (training, the exchange of parts,
   FedAvg, the checkpoint, evaluation) against a process that loads the runtime the same way,
   records its idle RSS, and trains the whole model on the same shard, batches and batch size —
   what a federated-learning client must do: `owner_memory_ratio_vs_full_model`.
3. Owners. One hop of ResNet-101 for K = 1, 2, 4 (8): a least-squares line through the training
   peaks. SPEC §1 says a node holds one copy per owner, so the slope should be one copy —
   weights and momentum (the runtime frees gradients after each step) — and nothing grows faster.
4. Round end. Complete ResNet-101 runs (K = 2; one hop, and four hops in the full mode) read
   each peer's own peak at exit, which includes the end of the round, to show what that costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: the repository root holds the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, ROOT, child_env, mib, write_json
from tools.bench.deploy import Deployment, Outcome, run_deployment

GIB = 2**30
#: memory a peer takes above its idle RSS besides its parts (measured: ~100 MiB), for the guard
SLACK_PER_PEER = 200 * 2**20

#: owners per model, compute nodes per model, owners of the one-hop sweep, complete runs' hops
SETTINGS = {
    True: {"vgg19": 4, "resnet101": 4, "vgg19_hops": (1, 3, 5), "resnet101_hops": (1, 2, 4),
           "sweep": (1, 2, 4), "complete": (1,)},
    False: {"vgg19": 6, "resnet101": 8, "vgg19_hops": (1, 2, 3, 4, 5), "resnet101_hops": (1, 2, 3, 4, 5),
            "sweep": (1, 2, 4, 8), "complete": (1, 4)},
}
KEY_HOPS = {"vgg19": 5, "resnet101": 4}
KEYS = {"vgg19": "cn_memory_ratio_5hop_vs_1hop", "resnet101": "cn_memory_ratio_4hop_vs_1hop"}


def run(quick: bool, out: Path) -> dict:
    out = Path(out)
    settings = SETTINGS[quick]
    results: dict = {}
    details: dict = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
    outcomes: dict[str, dict[int, Outcome]] = {}
    for model in ("vgg19", "resnet101"):
        outcomes[model] = {}
        for hops in settings[f"{model}_hops"]:
            dep = Deployment(model, settings[model], hops)
            outcome = _deploy(dep, out / dep.label, details)
            if outcome is not None:
                outcomes[model][hops] = outcome
        details[model] = hop_table(outcomes[model])
        results.update(hop_ratios(model, details[model]))
    sweep = {settings["resnet101"]: outcomes["resnet101"].get(1)}
    for owners in settings["sweep"]:
        if owners not in sweep or sweep[owners] is None:
            dep = Deployment("resnet101", owners, 1)
            sweep[owners] = _deploy(dep, out / dep.label, details)
    details["owners_sweep"] = owner_sweep({k: v for k, v in sweep.items() if v is not None and k in settings["sweep"]})
    for key in ("cn_memory_per_owner_mib", "cn_memory_per_owner_predicted_mib"):
        if key in details["owners_sweep"]:
            results[key] = details["owners_sweep"][key]
    complete = {}
    for hops in settings["complete"]:
        dep = Deployment("resnet101", 2, hops)
        complete[hops] = _deploy(dep, out / f"{dep.label}-complete", details, complete=True)
    details["round_end"] = round_end_table(complete)
    full = full_model(Deployment("resnet101", 2, 1), out / "resnet101-full-model")
    details["owner"] = owner_table(complete.get(1), full)
    if details["owner"].get("ratio") is not None:
        results["owner_memory_ratio_vs_full_model"] = details["owner"]["ratio"]
    plot = plot_memory(details, out / "memory.png")
    if plot is not None:
        details["plot"] = str(plot)
    results["details"] = details
    write_json(out / "memory.json", results)
    return results


def _deploy(dep: Deployment, folder: Path, details: dict, complete: bool = False) -> Outcome | None:
    """Run one deployment unless this machine lacks the memory for it; failures are recorded."""
    need = predicted_need(dep, complete)
    available = mem_available()
    if need > available:
        details.setdefault("skipped", []).append(f"{dep.label}: needs about {need / GIB:.1f} GiB, "
                                                 f"{available / GIB:.1f} GiB available")
        print(f"  skip {dep.label}: needs about {need / GIB:.1f} GiB, {available / GIB:.1f} GiB available", flush=True)
        return None
    try:
        outcome = run_deployment(dep, folder, complete=complete)
    except RuntimeError as exc:
        details.setdefault("failed", []).append(str(exc))
        print(f"  {exc}", flush=True)
        return None
    print(f"  {dep.label}{' (complete)' if complete else ''}: {outcome.seconds:.0f} s, busiest node "
          f"{mib(max(outcome.training(n) or 0 for n in outcome.nodes))} MiB above idle", flush=True)
    return outcome


def predicted_need(dep: Deployment, complete: bool) -> int:
    """Bytes the deployment may take on this machine: the plan's peaks (idle included), slack per
    peer, and for a complete run twice each node's peak again for the round end. A run stopped
    after training spares the owners their round end (what the owners' all-reduce holds)."""
    from p2psl.planning import costmodel
    from p2psl.planning.memory import owner_state_bytes
    from p2psl.learning.local_plan import plan_locally
    from p2psl.topology import parse_topology

    topology = parse_topology(dep.topology(list(range(7000, 7000 + len(dep.names)))))
    plan, profiles, _ = plan_locally(topology)
    peaks = dict(plan.peak_memory_bytes)
    if not complete:
        sizes = costmodel.model_sizes(topology, profiles).at_batch(topology.training.batch_size)
        w0, k = costmodel.owner_param_bytes(plan, sizes), len(plan.owners)
        shares = owner_state_bytes(w0, k) - owner_state_bytes(w0, k, round_end=False)
        peaks.update({o: peaks[o] - shares for o in plan.owners})
    need = sum(peaks.values()) + SLACK_PER_PEER * len(peaks)
    if complete:
        need += 2 * sum(peaks[n] for n in plan.nodes)
    return need + 2 * GIB  # leave room for everything else on the machine


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# -- 1. hops -------------------------------------------------------------------------------------

def hop_table(outcomes: dict[int, Outcome]) -> list[dict]:
    rows = []
    for hops, o in sorted(outcomes.items()):
        measured = {n: o.training(n) for n in o.nodes}
        predicted = {n: o.predicted(n) for n in o.nodes}
        busiest = max(o.nodes, key=lambda n: measured[n] or 0)
        rows.append({"hops": hops, "owners": o.deployment.owners, "busiest": busiest,
                     "measured_bytes": measured[busiest], "predicted_bytes": max(predicted.values()),
                     "nodes": {n: {"layers": o.plan["assignments"][n], "measured_bytes": measured[n],
                                   "predicted_bytes": predicted[n]} for n in o.nodes},
                     "seconds": round(o.seconds, 1)})
    return rows


def hop_ratios(model: str, rows: list[dict]) -> dict:
    by_hops = {r["hops"]: r for r in rows}
    one, many = by_hops.get(1), by_hops.get(KEY_HOPS[model])
    if one is None or many is None or not one["measured_bytes"]:
        return {}
    key = KEYS[model]
    return {key: round(many["measured_bytes"] / one["measured_bytes"], 3),
            key + "_predicted": round(many["predicted_bytes"] / one["predicted_bytes"], 3)}


# -- 3. owners -----------------------------------------------------------------------------------

def owner_sweep(outcomes: dict[int, Outcome]) -> dict:
    """Training peak of the single compute node against K, a least-squares line, the prediction."""
    points = sorted((k, o.training(o.nodes[0]), o.predicted(o.nodes[0])) for k, o in outcomes.items())
    out: dict = {"points": [{"owners": k, "measured_bytes": m, "predicted_bytes": p} for k, m, p in points]}
    if len(points) < 2:
        return out
    ks, ms = [p[0] for p in points], [p[1] for p in points]
    slope, intercept = _fit(ks, ms)
    predicted_slope = (points[-1][2] - points[0][2]) / (points[-1][0] - points[0][0])
    copy_bytes = _copy_bytes(outcomes[ks[0]])
    residual = max(abs(m - (intercept + slope * k)) / m for k, m in zip(ks, ms))
    out.update({"slope_bytes": int(slope), "intercept_bytes": int(intercept),
                "max_relative_residual": round(residual, 3),
                "predicted_slope_bytes": int(predicted_slope), "weights_and_momentum_bytes": copy_bytes,
                "slope_vs_weights_and_momentum": round(slope / copy_bytes, 3) if copy_bytes else None,
                "cn_memory_per_owner_mib": mib(slope), "cn_memory_per_owner_predicted_mib": mib(predicted_slope)})
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def _copy_bytes(o: Outcome) -> int:
    """Weights plus momentum of the node's segment: one owner's copy (SPEC §1)."""
    from p2psl.learning.models import model_spec

    spec = model_spec(o.deployment.model, (3, 32, 32), 10)
    first, last = o.plan["assignments"][o.nodes[0]]
    return 2 * sum(spec.parameter_bytes()[first - 1:last])


# -- 4. the end of a round ------------------------------------------------------------------------

def round_end_table(outcomes: dict[int, Outcome | None]) -> dict:
    rows = []
    for hops, o in sorted(outcomes.items()):
        if o is None:
            continue
        busiest = max(o.nodes, key=lambda n: o.run_peak(n) or 0)
        idle_error = max(abs(o.watch.idle(n) - o.records[n]["idle_rss_bytes"]) for n in o.nodes
                         if o.watch.idle(n) is not None)
        rows.append({"hops": hops, "owners": o.deployment.owners, "busiest": busiest,
                     "run_peak_bytes": o.run_peak(busiest),
                     "training_peak_bytes": max(o.training(n) or 0 for n in o.nodes),
                     "idle_from_status_error_bytes": idle_error})
    out: dict = {"rows": rows}
    if len(rows) == 2 and rows[0]["run_peak_bytes"]:
        out["run_peak_ratio"] = round(rows[1]["run_peak_bytes"] / rows[0]["run_peak_bytes"], 3)
        out["training_peak_ratio"] = round(rows[1]["training_peak_bytes"] / rows[0]["training_peak_bytes"], 3)
    return out


# -- 2. an owner against the whole model ----------------------------------------------------------

def owner_table(complete: Outcome | None, full: dict | None) -> dict:
    if complete is None or full is None:
        return {"ratio": None}
    owners = {n: complete.run_peak(n) for n in complete.plan["owners"]}
    busiest = max(owners, key=lambda n: owners[n])
    whole = full["peak_rss_bytes"] - full["idle_rss_bytes"]
    return {"owner": busiest, "owner_bytes": owners[busiest], "owner_layers": complete.plan["owner_layers"],
            "full_model_bytes": whole, "full_model_seconds": full["seconds"],
            "ratio": round(owners[busiest] / whole, 3)}


def full_model(dep: Deployment, folder: Path) -> dict | None:
    """Train the whole model in a fresh process on the first owner's shard; its idle and peak RSS."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, "-m", "tools.bench.memory", "--full-model", dep.model, "--owners", str(dep.owners),
           "--hops", str(dep.hops)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900, check=False)
    (folder / "stderr.log").write_text(proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        print(f"  full model: exited with {proc.returncode}; see {folder / 'stderr.log'}", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    write_json(folder / "result.json", result)
    print(f"  {dep.model} whole model in one process: {mib(result['peak_rss_bytes'] - result['idle_rss_bytes'])} "
          "MiB above idle", flush=True)
    return result


def train_full_model(dep: Deployment) -> dict:
    """What a federated-learning client does: the whole model, this owner's shard, same batches.

    Loads the runtime and warms torch up as a peer does, records the idle RSS and restarts VmHWM
    there ([Note: idle baseline] in p2psl.runtime.peer), then trains and evaluates."""
    import time

    import torch

    from p2psl.learning.centralized import evaluate
    from p2psl.learning.data import Dataset, batch_order, load_dataset, shard
    from p2psl.runtime.metrics import peak_rss_bytes, reset_peak_rss, rss_bytes
    from p2psl.learning.models import OptimConfig, OwnerModel, model_spec
    from p2psl.runtime.peer import warm_up  # torch, aiohttp and the runtime: what a peer has loaded when idle
    from p2psl.topology import parse_topology

    torch.set_num_threads(1)
    warm_up()
    idle = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    cfg = parse_topology(dep.topology(list(range(7000, 7000 + len(dep.names))))).training
    data = load_dataset(cfg)
    mine = shard(data, dep.names[:dep.owners], cfg.partition, cfg.alpha, cfg.seed)[dep.names[0]]
    train = (data.x_train[torch.from_numpy(mine.train_idx)], data.y_train[torch.from_numpy(mine.train_idx)])
    test = (data.x_test[torch.from_numpy(mine.test_idx)], data.y_test[torch.from_numpy(mine.test_idx)])
    spec = model_spec(cfg.model, data.input_shape, data.num_classes)
    layers = spec.num_layers
    model = OwnerModel(spec, range(layers - 1), [layers - 1], cfg.seed, OptimConfig.from_training(cfg), "whole model")
    for batch_id, batch in enumerate(batch_order(len(train[1]), cfg.batch_size, cfg.seed, 0, 0, 0)):
        index = torch.from_numpy(batch)
        h = model.forward(batch_id, train[0][index])
        _, grad = model.loss_backward(batch_id, h, train[1][index])
        model.backward(batch_id, grad)
        model.step()
    evaluate(model, Dataset(*train, *test, data.input_shape, data.num_classes), cfg.eval_batch_size)
    return {"idle_rss_bytes": idle, "peak_rss_bytes": peak_rss_bytes(),
            "seconds": round(time.perf_counter() - started, 2),
            "batches": len(batch_order(len(train[1]), cfg.batch_size, cfg.seed, 0, 0, 0))}


# -- plot ----------------------------------------------------------------------------------------

def plot_memory(details: dict, path: Path) -> Path | None:
    """Busiest compute node against hops (both models) and the single node against owners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("vgg19", "resnet101") if details.get(m)]
    sweep = details.get("owners_sweep", {}).get("points", [])
    if not panels and not sweep:
        return None
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.6))
    names = {"vgg19": "VGG-19", "resnet101": "ResNet-101"}
    for ax, model in zip(axes, panels):
        rows = details[model]
        hops = [r["hops"] for r in rows]
        ax.bar(hops, [r["measured_bytes"] / 2**20 for r in rows], color="#4c72b0", label="measured (busiest node)")
        ax.plot(hops, [r["predicted_bytes"] / 2**20 for r in rows], "o--", color="#dd8452",
                label="planner's prediction")
        ax.set_title(f"{names[model]}, K = {rows[0]['owners']} owners")
        ax.set_xlabel("compute nodes (hops)")
        ax.set_ylabel("peak memory above idle (MiB)")
        ax.set_xticks(hops)
        ax.legend(fontsize=8)
    ax = axes[-1]
    if sweep:
        ks = [p["owners"] for p in sweep]
        ax.plot(ks, [p["measured_bytes"] / 2**20 for p in sweep], "o", color="#4c72b0", label="measured")
        fit = details["owners_sweep"]
        if "slope_bytes" in fit:
            ax.plot(ks, [(fit["intercept_bytes"] + fit["slope_bytes"] * k) / 2**20 for k in ks], "-", color="#4c72b0",
                    label=f"fit: {fit['slope_bytes'] / 2**20:.0f} MiB per owner")
        ax.plot(ks, [p["predicted_bytes"] / 2**20 for p in sweep], "o--", color="#dd8452", label="planner's prediction")
        ax.set_title("ResNet-101, one hop: memory vs owners")
        ax.set_xlabel("data owners K")
        ax.set_ylabel("peak memory above idle (MiB)")
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--full-model", help=argparse.SUPPRESS)  # the child process of `full_model`
    parser.add_argument("--owners", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--hops", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full_model:
        print(json.dumps(train_full_model(Deployment(args.full_model, args.owners, args.hops))))
        return
    results = run(args.quick, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
