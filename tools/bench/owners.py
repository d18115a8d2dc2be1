"""Many owners: one owner's peak memory, bytes sent per round and round end against K.

    .venv/bin/python -m tools.bench.owners [--quick] --out DIR      (or through tools/bench/run.py)

For K = 4, 16 and 64 owners and a chain of two compute nodes, one owner (owner01) runs alone as
a `p2psl peer` process, exactly as on its own device, and every other peer runs in one
`p2psl together --except owner01` process, so 64 owners fit two cores and 24 GiB. The model
is the zoo's MLP on synthetic 1×128×128 data: the owner keeps layer 1 (16384×128 weights, 8 MiB)
and layer 4, the compute nodes the two small layers between — large owner parts, a small middle,
so the K copies each compute node holds stay cheap while an all-to-all average would make the
owner hold K − 1 other owners' 8 MiB. Owners are linked to the chain's ends only, as in
`topologies/hundred_owners.toml` (what they send each other travels through c1), so an owner's
links do not grow with K either. Two rounds of two batches of 8 per owner.

Figures, from owner01's own records (peers/owner01/metrics.jsonl and trace.json):

- memory: its process's peak RSS over the run (start-up, training, the all-reduce, evaluation)
  above its idle RSS (torch and the runtime loaded, no model yet); the profiles come from a
  cache this benchmark fills first (`warm_cache`), so no K's run times layers;
  `owner_memory_ratio_K64_vs_K4` is K = 64's over K = 4's;
- bytes: what it sent in round 2 (its traffic after round 2 less after round 1: activations,
  gradients, the all-reduce's chunks, the round end's notices and reports);
  `owner_bytes_ratio_K64_vs_K4`;
- round end: from its last training task of round 2 to the averaged parts loaded, seconds
  (`owner_round_end_seconds_K<k>`): it grows with K, because the messages of all K owners go
  through c1 and, here, share two cores with every other peer.

`--quick` runs K = 4 and 16 and 64 as well (the figures need both ends); it only shortens
nothing else, since each K takes under two minutes.
"""

from __future__ import annotations

import sys

import argparse
import json
import secrets
import subprocess
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: the repository root holds the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, ROOT, child_env, free_ports, mib, write_json

KS = (4, 16, 64)
MEASURED = "owner01"
NODES = ("c1", "c2")
ROUNDS, BATCHES, BATCH = 2, 2, 8
SHAPE = (1, 128, 128)


def topology(k: int, ports: list[int]) -> str:
    """K owners and c1–c2; each owner linked to c1 and c2 only; generous deadlines (shared cores)."""
    owners = [f"owner{i + 1:02d}" for i in range(k)]
    train = k * BATCHES * BATCH
    lines = ["[training]", 'model = "mlp"', 'dataset = "synthetic"', f"synthetic_shape = {list(SHAPE)}",
             f"synthetic_samples = {train * 5 // 4}", "test_fraction = 0.2", "num_classes = 10",
             f"rounds = {ROUNDS}", f"batch_size = {BATCH}", f"eval_batch_size = {BATCH}", "learning_rate = 0.01",
             "momentum = 0.9", "first_cut = 1", "last_cut = 3", "",
             "[timeouts]", 'heartbeat = "2s"', 'dead = "60s"', 'gone = "30s"', 'request = "600s"',
             'start = "600s"', 'connect = "300s"']
    for name, port in zip([*owners, *NODES], ports):
        role = "compute" if name in NODES else "data_owner"
        lines += ["", "[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                  'memory = "4GiB"']
    lines += ["", "[[link]]", 'peers = ["c1", "c2"]']
    for owner in owners:
        lines += ["", "[[link]]", f'peers = ["{owner}", "c1"]', "", "[[link]]", f'peers = ["{owner}", "c2"]']
    return "\n".join(lines) + "\n"


def measure(k: int, out: Path, cache: Path, timeout: float = 900.0) -> dict:
    """Run K owners as described above, profiles from `cache`; owner01's figures."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "topology.toml"
    path.write_text(f"# benchmark: {k} owners, owner01 alone in its process\n" + topology(k, free_ports(k + 2)),
                    encoding="utf-8")
    env = child_env(P2PSL_SECRET=secrets.token_urlsafe(32), P2PSL_CACHE_DIR=str(cache))
    started = time.monotonic()
    with open(out / "group.log", "wb") as group_log, open(out / "owner.log", "wb") as owner_log:
        group = subprocess.Popen([PYTHON, "-m", "p2psl", "together", "--topology", str(path), "--out",
                                  str(out / "peers"), "--except", MEASURED], cwd=ROOT, env=env,
                                 stdout=group_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        owner = subprocess.Popen([PYTHON, "-m", "p2psl", "peer", "--topology", str(path), "--name", MEASURED,
                                  "--out", str(out / "peers" / MEASURED)], cwd=ROOT, env=env,
                                 stdout=owner_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            codes = (owner.wait(timeout), group.wait(timeout))
        finally:
            for proc in (owner, group):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if codes != (0, 0):
        raise RuntimeError(f"K={k}: owner exited {codes[0]}, the others' process {codes[1]} (see {out})")
    return figures(out / "peers" / MEASURED) | {"seconds": round(time.monotonic() - started, 1)}


def figures(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    peer = next(r for r in records if r.get("event") == "peer")
    rounds = {r["round"]: r for r in records if r.get("event") == "peer_round"}
    return {"peak_above_idle_bytes": peer["peak_rss_bytes"] - peer["idle_rss_bytes"],
            "peak_rss_bytes": peer["peak_rss_bytes"], "idle_rss_bytes": peer["idle_rss_bytes"],
            "round_bytes_sent": rounds[ROUNDS]["bytes_sent"] - rounds[ROUNDS - 1]["bytes_sent"],
            "round_end_seconds": round_end_seconds(folder / "trace.json")}


def round_end_seconds(trace: Path) -> float:
    """From the last training task of the last round to the averaged parts loaded."""
    events = json.loads(trace.read_text(encoding="utf-8"))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    spans = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"] + e.get("dur", 0))
    load = [e for e in spans if e["name"] == "load"][-1]
    end = load["ts"] + load["dur"]
    trained = [e for e in spans if e["name"] in ("forward", "backward", "optimize", "loss+backward")
               and e["ts"] + e["dur"] <= end][-1]
    return round((end - trained["ts"] - trained["dur"]) / 1e6, 3)


def warm_cache(out: Path) -> Path:
    """A profile cache of this benchmark's own, every layer timed once (`p2psl plan`) before any K
    runs: no K's measured owner times layers, so each K starts alike (peers of one machine take
    turns timing, and which peer's turn comes first would otherwise differ from run to run)."""
    cache = out / "cache"
    path = out / "warm.toml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(topology(KS[0], free_ports(KS[0] + 2)), encoding="utf-8")
    subprocess.run([PYTHON, "-m", "p2psl", "plan", "--topology", str(path)], cwd=ROOT, check=True,
                   env=child_env(P2PSL_CACHE_DIR=str(cache)), stdout=subprocess.DEVNULL)
    return cache


def run(quick: bool, out: Path) -> dict:
    out = Path(out) / "owners"
    cache = warm_cache(out)
    details = {}
    for k in KS:
        print(f"   K = {k}", flush=True)
        details[f"K{k}"] = measure(k, out / f"K{k}", cache)
        print(f"   K = {k}: owner peak above idle {mib(details[f'K{k}']['peak_above_idle_bytes'])} MiB, "
              f"round bytes sent {mib(details[f'K{k}']['round_bytes_sent'])} MiB, "
              f"round end {details[f'K{k}']['round_end_seconds']} s", flush=True)
    low, high = details[f"K{KS[0]}"], details[f"K{KS[-1]}"]
    results = {
        "owner_memory_ratio_K64_vs_K4": round(high["peak_above_idle_bytes"] / low["peak_above_idle_bytes"], 3),
        "owner_bytes_ratio_K64_vs_K4": round(high["round_bytes_sent"] / low["round_bytes_sent"], 3),
        **{f"owner_round_end_seconds_K{k}": details[f"K{k}"]["round_end_seconds"] for k in KS},
        "details": details,
    }
    write_json(out / "results.json", results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = run(args.quick, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
