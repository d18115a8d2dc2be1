"""The cost model against real rounds: predicted against measured round times of real peers.

    .venv/bin/python tools/bench/costmodel.py [--quick] --out DIR

Runs a matrix of real deployments on this machine (`p2psl run`: every peer its own process) and
compares each measured round with `costmodel.predict` and with the MP-SL paper's model
(`costmodel.paper_round_time`) for the plan the peers agreed on; prints a table and writes
DIR/costmodel.json. CI does not run it.

What is measured is the pipeline and the network, not CPU contention. Two cores are shared by
every local peer (and by whatever else runs here), so the links are rate-capped and delayed by
the transport (``[emulation] links = true``: a frame holds its link for bytes / bandwidth and
arrives `latency` later, asleep, not computing) and carry most of each batch's time (a 64 KiB
activation takes 131–262 ms); compute nodes run at emulated half speed (compute padded by
sleeping, as the paper's authors padded theirs to emulate Raspberry Pis). The peers run at raised
scheduling priority (`NICE`) where the machine allows it, so that other work here delays their
wake-ups less; the CPU other processes used during each run is reported beside it. The model
(`bench_model`) is a small CNN on synthetic 3×16×16 data whose activations outweigh its
parameters; its per-layer profile is measured here before any peer starts and handed to the
peers as a profile table, so plan and prediction rest on an uncontended measurement.

Rounds: round 1 is left out. It includes the peers' start skew (each owner starts its first round
when its own set-up ends) and first-touch warm-up; rounds ≥ 2 start from the previous round's
barrier, as every later round of a long run does.

Keys (flat, as tools/bench/run.py collects them; "details" has every run):

    cost_model_median_abs_error      median over measured rounds of |predicted / measured − 1|,
                                     over the rate-capped runs (the matrix and the split pair)
    cost_model_max_abs_error         the largest of those
    paper_model_median_abs_error     the same for the paper's model on the same rounds and plans
    paper_model_max_abs_error
    pipeline_efficiency              the cost model's lower bound of the period (every resource
                                     busy, no waiting) ÷ the measured period, median over those
                                     runs whose bound is a resource the owners share (a compute
                                     node or a link between compute nodes); 1.0 is perfect
    optimized_vs_even_round_time_ratio   measured round time of the planner's split ÷ that of
                                     the paper's even split, capped links between compute nodes
    scaling_*                        multihop vs horizontal scaling (tools/bench/scaling.py)

The full mode adds the paper's own setting for the split, compute-bound with compute nodes at a
fifth of this machine's speed ("compute-*" in the details, with their errors and efficiency).
Those runs are as good as the profile is for the deployment: on this shared machine a layer's
CPU time in a deployment is 1.2–1.4× its time measured alone, and the padding that emulates the
slow node multiplies that, so their prediction errors are tens of per cent; the pipeline itself
keeps the bottleneck busy (its measured period is within a few per cent of K × its measured
occupancy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, child_env, free_ports, write_json

BENCH_MODEL, SHAPE, BATCH = "tools.bench.costmodel:bench_model", (3, 16, 16), 16
#: scheduling priority of the deployments' processes (nice value; ignored where not allowed)
NICE = -10
#: heartbeats less often than the default 1 s: a peer answers a ping from its read loop, so a
#: ping that arrives while that peer's link back is busy with a replica (seconds on a capped
#: link) holds up every message behind it until the replica has left
HEARTBEAT, DEAD = "4s", "15s"


def bench_model(input_shape: tuple[int, ...], num_classes: int) -> list:
    """Six layers whose activations (64 KiB a batch between the middle ones) outweigh their
    parameters (9 KiB each), so the pipeline and its links, not the round's parameter exchange,
    make up a round; compute is a fraction of a millisecond per layer."""
    from torch import nn

    def conv(cin: int, *extra) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, 16, 3, padding=1), nn.Tanh(), *extra)

    return [conv(input_shape[0]), conv(16, nn.MaxPool2d(2)), conv(16), conv(16), conv(16),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))]


# -- deployments ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One deployment: K owners and a chain of N compute nodes. Every owner is linked to the
    chain's two ends (`owner_link`), consecutive compute nodes to each other (`chain_link`); a
    link is "BANDWIDTH@LATENCY", "" is free; no links at all (`links=False`) is a full mesh."""

    name: str
    owners: int
    hops: int
    owner_link: str = ""
    chain_link: str = ""
    links: bool = True
    model: str = BENCH_MODEL
    node_speed: float = 0.5
    owner_speed: float = 1.0
    batches: int = 5             # per owner and round
    rounds: int = 3
    first_cut: int | None = None
    last_cut: int | None = None
    even: bool = False           # make the peers plan the even split (see `even_table`)


#: link caps of the matrix: (owner links, links between compute nodes)
CAPS = {
    "owner": ("2Mbit/s@10ms", ""),                 # each owner's own links limit it
    "chain": ("50Mbit/s@2ms", "2Mbit/s@5ms"),      # the links between compute nodes, shared
    "both": ("4Mbit/s@5ms", "4Mbit/s@5ms"),
}
QUICK = ("k2n1-owner", "k4n2-chain", "k4n3-owner", "k8n2-chain", "k8n3-both")


def matrix(quick: bool) -> list[Config]:
    """Owners 2, 4, 8 × hops 1, 2, 3 × link caps (no "chain" cap with one hop)."""
    out = []
    for k in (2, 4, 8):
        for n in (1, 2, 3):
            for cap, (owner_link, chain_link) in CAPS.items():
                name = f"k{k}n{n}-{cap}"
                if (n == 1 and cap == "chain") or (quick and name not in QUICK):
                    continue
                out.append(Config(name, k, n, owner_link, chain_link, rounds=2 if quick else 3))
    return out


def split_configs(quick: bool) -> list[Config]:
    """The planner's split against the paper's even split, on the zoo CNN whose layers differ in
    cost and in output size; owners keep layers 1 and 6. "split-*": the links between compute
    nodes are capped, which the even split ignores (it cuts where the activation is twice as
    large); "compute-*" (full mode): the paper's compute-bound setting, three nodes at a fifth
    of this machine's speed on free links, where the even split overloads the first node."""
    rounds = 2 if quick else 3
    links = Config("split-optimized", 4, 2, "50Mbit/s@2ms", "8Mbit/s@5ms", model="cnn", batches=8,
                   rounds=rounds, first_cut=1, last_cut=5)
    out = [links, replace(links, name="split-even", even=True)]
    if not quick:
        compute = Config("compute-optimized", 6, 3, links=False, model="cnn", node_speed=0.2, batches=30,
                         rounds=rounds, first_cut=1, last_cut=5)
        out += [compute, replace(compute, name="compute-even", even=True)]
    return out


def _link_lines(a: str, b: str, spec: str) -> list[str]:
    bandwidth, _, latency = spec.partition("@")
    return (["[[link]]", f'peers = ["{a}", "{b}"]'] + ([f'bandwidth = "{bandwidth}"'] if bandwidth else [])
            + ([f'latency = "{latency}"'] if latency else []) + [""])


def topology_text(c: Config, ports: list[int], table: Path) -> str:
    owners = [f"o{k + 1}" for k in range(c.owners)]
    nodes = [f"c{i + 1}" for i in range(c.hops)]
    train = c.owners * c.batches * BATCH
    lines = [f"# cost-model benchmark: {c.name}", "[emulation]", f"links = {str(c.links).lower()}", "",
             "[training]", f'model = "{c.model}"', 'dataset = "synthetic"', f"synthetic_shape = {list(SHAPE)}",
             f"synthetic_samples = {round(train / 0.9)}", "test_fraction = 0.1", f"rounds = {c.rounds}",
             f"batch_size = {BATCH}", "learning_rate = 0.01", "momentum = 0.9", f'profile = "{table.resolve()}"']
    lines += [f"first_cut = {c.first_cut}"] if c.first_cut is not None else []
    lines += [f"last_cut = {c.last_cut}"] if c.last_cut is not None else []
    lines += ["", "[timeouts]", f'heartbeat = "{HEARTBEAT}"', f'dead = "{DEAD}"', ""]
    for index, name in enumerate(owners + nodes):
        role, speed = ("data_owner", c.owner_speed) if name in owners else ("compute", c.node_speed)
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{ports[index]}"',
                  'memory = "4GiB"', f"speed = {speed}", ""]
    if c.links:
        for o in owners:
            for n in sorted({nodes[0], nodes[-1]}):
                lines += _link_lines(o, n, c.owner_link)
        for a, b in zip(nodes, nodes[1:]):
            lines += _link_lines(a, b, c.chain_link)
    return "\n".join(lines)


# -- profiles ------------------------------------------------------------------------------------

def measure_table(model: str, attempts: int = 7):
    """The model's per-layer profile, measured here before any peer starts: the per-layer
    minimum over `attempts` medians, so a burst of other work on the machine does not stick."""
    from p2psl.learning.models import model_spec
    from p2psl.planning.profile import Profile, measure_profile

    spec = model_spec(model, SHAPE, 10)
    runs = [measure_profile(spec.build(range(spec.num_layers), 0), SHAPE, BATCH, warmup=2, repeats=5)
            for _ in range(attempts)]
    best = {k: tuple(map(min, *(getattr(p, k) for p in runs))) for k in ("fwd", "bwd", "opt")}
    return Profile("local", BATCH, best["fwd"], best["bwd"], best["opt"], runs[0].act_bytes, runs[0].param_bytes)


def write_table(path: Path, profile, times: list[float] | None = None) -> Path:
    """`profile` as a profile table (SPEC §5 format, device "local", named ..._bs16.csv). With
    `times`, each layer costs that (all in its forward pass) and every activation the same."""
    rows = ["layer,act_KiB,param_KiB,local_fwd_ms,local_bwd_ms,local_opt_ms"]
    for j in range(profile.num_layers):
        fwd, bwd, opt = (times[j], 0.0, 0.0) if times else (profile.fwd[j], profile.bwd[j], profile.opt[j])
        act = max(profile.act_bytes) if times else profile.act_bytes[j]
        rows.append(f"{j + 1},{act / 1024!r},{profile.param_bytes[j] / 1024!r},{fwd * 1e3!r},{bwd * 1e3!r},"
                    f"{opt * 1e3!r}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def even_table(path: Path, profile, c: Config, real: Path) -> Path:
    """A table whose only optimal plan is `planner.even_plan`'s for `c`: each of its segments
    costs 1 s (each layer 1 s / the segment's length), so any other split puts more than one
    segment's worth on some node, and these costs outweigh every link."""
    from p2psl.planning.planner import even_plan
    from p2psl.topology import parse_topology

    plan = even_plan(parse_topology(topology_text(c, list(range(9000, 9000 + c.owners + c.hops)), real)),
                     profile.num_layers)
    times = [1.0] * profile.num_layers
    for stage in plan.chain:
        for j in stage.layers:
            times[j] = 1.0 / len(stage.layers)
    return write_table(path, profile, times)


# -- one run -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """A deployment's measured rounds (≥ 2) beside the predictions for the plan it ran."""

    config: Config
    plan: dict
    predicted: dict
    paper_seconds: float
    rounds: list[dict] = field(default_factory=list)
    period: float | None = None
    wall_seconds: float = 0.0
    others_cores: float = math.nan   # CPU other processes here used while it ran
    failure: str | None = None
    folder: Path | None = None

    def errors(self, paper: bool = False) -> list[float]:
        value = self.paper_seconds if paper else self.predicted["round_seconds"]
        return [value / r["seconds"] - 1 for r in self.rounds]

    @property
    def efficiency(self) -> float | None:
        return self.predicted["period_bound_seconds"] / self.period if self.period else None

    @property
    def pipelined(self) -> bool:
        """The bound is a resource the owners share: a compute node or a link between nodes."""
        nodes = set(self.plan["chain"])
        name = self.predicted["bottleneck"]
        return name in nodes or ("→" in name and set(name.split("→")) <= nodes)


def run_config(c: Config, out: Path, tables: dict[str, Path], timeout: float = 600) -> Outcome:
    """Run `c` with `p2psl run` and compare its rounds ≥ 2 with the predictions."""
    out.mkdir(parents=True, exist_ok=True)
    ports = free_ports(c.owners + c.hops)
    table = tables[c.model]
    (out / "predicted.toml").write_text(topology_text(c, ports, table), encoding="utf-8")
    if c.even:
        from p2psl.planning.profile import read_profile_csv

        table = even_table(out / f"even_bs{BATCH}.csv", read_profile_csv(table, "local"), c, table)
    path = out / "topology.toml"
    path.write_text(topology_text(c, ports, table), encoding="utf-8")
    started, cpu = time.monotonic(), _cpu()
    proc = subprocess.run([*_nice(), PYTHON, "-m", "p2psl", "run", "--topology", str(path), "--out",
                           str(out / "run"), "--no-baseline", "--no-dashboard"], env=child_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    (out / "stdout.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    wall = time.monotonic() - started
    (busy, mine), (busy0, mine0) = _cpu(), cpu
    try:
        outcome = analyse(c, out)
    except (OSError, ValueError, KeyError) as exc:
        return Outcome(c, {}, {}, math.nan, folder=out, failure=f"no result ({type(exc).__name__}: {exc}); "
                       f"exit status {proc.returncode}, see {out / 'stdout.txt'}")
    outcome.wall_seconds, outcome.folder = wall, out
    outcome.others_cores = max(0.0, (busy - busy0) - (mine - mine0)) / wall
    if len(outcome.rounds) < c.rounds - 1:
        outcome.failure = (f"the run ended after {len(outcome.rounds) + 1} of {c.rounds} rounds "
                           f"(exit status {proc.returncode}, see {out / 'stdout.txt'})")
    return outcome


def _nice() -> list[str]:
    """`nice -n NICE` where this machine lets us raise priority (as root), else nothing."""
    tool = shutil.which("nice")
    if tool is None:
        return []
    probe = subprocess.run([tool, "-n", str(NICE), "true"], capture_output=True, text=True, check=False)
    return [tool, "-n", str(NICE)] if probe.returncode == 0 and not probe.stderr else []


def _cpu() -> tuple[float, float]:
    """(CPU seconds every process here has used, and this process's finished children)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = math.nan
    return busy, children.ru_utime + children.ru_stime


def analyse(c: Config, out: Path) -> Outcome:
    """The predictions for the run in `out` (its plan, the real profile, the owners' real
    sample counts) beside its measured rounds ≥ 2 and period."""
    from p2psl.planning import costmodel
    from p2psl.learning.data import load_dataset, shard
    from p2psl.planning.plan import Plan
    from p2psl.planning.profile import peer_profiles
    from p2psl.topology import load_topology

    topology = load_topology(out / "predicted.toml")
    plan_json = json.loads((out / "run" / "plan.json").read_text(encoding="utf-8"))
    cfg = topology.training
    owners = [o.name for o in topology.owners]
    shards = shard(load_dataset(cfg), owners, cfg.partition, cfg.alpha, cfg.seed)
    samples = {o: len(shards[o].train_idx) for o in owners}
    tests = {o: len(shards[o].test_idx) for o in owners}
    profiles = peer_profiles(topology)
    plan = Plan.from_json(plan_json)
    p = costmodel.predict(plan, topology, profiles, samples, tests)
    bound = costmodel.closed_loop(costmodel.workload(plan, topology, costmodel.at_batch(profiles, cfg.batch_size),
                                                     overheads=costmodel.MEASURED),
                                  costmodel.batches_per_owner(samples, cfg.batch_size, cfg.local_epochs))
    predicted = {"round_seconds": p.round_seconds, "period_seconds": p.expected_period_seconds,
                 "period_bound_seconds": bound.period, "planner_period_seconds": p.period_seconds,
                 "training_seconds": p.training_seconds, "fill_seconds": p.fill_seconds,
                 "drain_seconds": p.drain_seconds, "round_end_seconds": p.aggregation_seconds,
                 "evaluation_seconds": p.evaluation_seconds, "bottleneck": p.bottleneck}
    outcome = Outcome(c, plan_json, predicted, costmodel.paper_round_time(plan, topology, profiles, samples))
    phases = trace_phases(out / "run" / "trace.json", owners)
    for record in _records(out / "run" / "metrics.jsonl"):
        if record.get("event") == "round" and record["round"] >= 2:
            outcome.rounds.append({"round": record["round"], "seconds": record["seconds"],
                                   **phases["rounds"].get(record["round"], {})})
    outcome.period = phases["period"]
    return outcome


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def trace_phases(path: Path, owners: list[str]) -> dict:
    """From the merged trace: the measured period ([Note: measured period] in p2psl.viz.timeline,
    rounds ≥ 2) and, per round, when the first and last batches, and evaluation, ended."""
    from p2psl.viz.timeline import completions, load_trace

    trace = load_trace(path)
    done = completions(trace, owners)
    periods = [(t[-1] - t[0]) / (len(t) - 1) for (_, r), t in done.items() if r >= 2 and len(t) >= 3]
    rounds: dict[int, dict] = {}
    for r in sorted({r for _, r in done}):
        own = [s for s in trace.spans if s.peer in owners and s.round == r]
        ends = [done[(o, r)] for o in owners if (o, r) in done]
        evals = [min(s.start for s in own if s.peer == o and s.name == "evaluate") for o in owners
                 if any(s.peer == o and s.name == "evaluate" for s in own)]
        if own and ends:
            start = min(s.start for s in own)
            rounds[r] = {"first_batch": max(t[0] for t in ends) - start, "training": max(t[-1] for t in ends) - start,
                         "evaluation_start": (max(evals) - start) if evals else None}
    return {"period": statistics.median(periods) if periods else None, "rounds": rounds}


def calibrate(out: Path) -> dict[str, list[float]]:
    """Samples of the runtime overheads of `costmodel.Overheads`, read off a run's trace:

    task      a compute node's task span × its speed − the profile of its layers
    dispatch  from a node's backward to the optimizer step queued behind it
    send      a node's send span − the message's bytes / bandwidth (its first hop, if capped)
    receive   from a message's arrival (send end + latency) at a compute node to the task it
              starts, when that node's torch thread was idle"""
    from p2psl.planning import costmodel
    from p2psl.planning.plan import Plan
    from p2psl.planning.profile import peer_profiles
    from p2psl.topology import load_topology
    from p2psl.viz.timeline import load_trace

    topology = load_topology(out / "predicted.toml")
    plan = Plan.from_json(json.loads((out / "run" / "plan.json").read_text(encoding="utf-8")))
    profiles = peer_profiles(topology)
    sizes = costmodel.model_sizes(topology, profiles)
    trace = load_trace(out / "run" / "trace.json")
    spans = [s for s in trace.spans if s.round is not None and s.round >= 2 and s.batch is not None]
    index = {(s.peer, s.name, s.owner, s.round, s.batch): s for s in spans}
    busy = {n: [(s.start, s.end) for s in trace.spans if s.peer == n and s.worker] for n in plan.nodes}
    kinds = {"forward": "fwd", "backward": "bwd", "optimize": "opt"}
    out_samples: dict[str, list[float]] = {"task": [], "dispatch": [], "send": [], "receive": []}
    for part, stage in enumerate(plan.chain, start=1):
        node, speed = stage.node, topology.peer(stage.node).speed
        base = {k: sum(getattr(profiles[node], k)[j] for j in stage.layers) * speed for k in kinds.values()}
        for s in (s for s in spans if s.peer == node):
            if s.worker and s.name in kinds:
                out_samples["task"].append(s.duration * speed - base[kinds[s.name]])
            back = index.get((node, "backward", s.owner, s.round, s.batch))
            if s.name == "optimize" and back is not None:
                out_samples["dispatch"].append(s.start - back.end)
            if s.name not in ("send activation", "send gradient"):
                continue
            forward = s.name == "send activation"
            dst = plan.holder(part + 1 if forward else part - 1, s.owner)
            link = topology.link(node, topology.route(node, dst)[1])
            if link.bandwidth:
                nbytes = sizes.act_bytes[(stage.last if forward else stage.first - 1) - 1]
                out_samples["send"].append(s.duration - (nbytes + costmodel.MEASURED.header) / link.bandwidth)
            sink = index.get((dst, "forward" if forward else "backward", s.owner, s.round, s.batch))
            if dst in plan.nodes and sink is not None and len(topology.route(node, dst)) == 2:
                arrival = s.end + link.latency
                if not any(a < sink.start and b > arrival for a, b in busy[dst]):
                    out_samples["receive"].append(sink.start - arrival)
    return out_samples


# -- the whole benchmark -------------------------------------------------------------------------

def run(quick: bool, out: Path) -> dict:
    """Measure every configuration, then summarise; writes out/costmodel.json (and each run
    under out/costmodel/)."""
    from tools.bench.scaling import scaling

    out = Path(out)
    runs = out / "costmodel"
    runs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tables = {m: write_table(runs / f"{m.rpartition(':')[2] or m}_bs{BATCH}.csv", measure_table(m))
              for m in (BENCH_MODEL, "cnn")}
    outcomes = []
    print(HEADER, flush=True)
    for c in [*matrix(quick), *split_configs(quick)]:
        wait_for_quiet(QUIET_CORES, 0 if quick else QUIET_WAIT)
        outcomes.append(run_config(c, runs / c.name, tables))
        print(row(outcomes[-1]), flush=True)
    scaling_keys, scaling_rows = scaling(quick)
    results = summarise(outcomes, quick)
    results.update(scaling_keys)
    results["details"]["scaling"] = scaling_rows
    results["details"]["seconds"] = round(time.monotonic() - started, 1)
    write_json(out / "costmodel.json", results)
    print(footer(results))
    return results


#: before a run (full mode), wait up to QUIET_WAIT s for other processes to use < QUIET_CORES
QUIET_CORES, QUIET_WAIT = 0.8, 30.0


def wait_for_quiet(limit: float, most: float, window: float = 2.0) -> float:
    """Wait (at most `most` seconds) until other processes here use fewer than `limit` cores over
    `window`; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < most:
        before = _cpu()[0]
        time.sleep(window)
        if (_cpu()[0] - before) / window < limit:
            break
    return time.monotonic() - started


def summarise(outcomes: list[Outcome], quick: bool) -> dict:
    """The keys of the module docstring. Rate-capped runs (the matrix and the split pair) make the
    error and efficiency figures; the compute-bound pair is reported beside them in "details"."""
    from p2psl.planning import costmodel

    good = [o for o in outcomes if not o.failure and o.rounds]
    capped = [o for o in good if not o.config.name.startswith("compute")]
    compute = [o for o in good if o.config.name.startswith("compute")]
    ours = [abs(e) for o in capped for e in o.errors()]
    paper = [abs(e) for o in capped for e in o.errors(paper=True)]
    samples: dict[str, list[float]] = {}
    for o in capped:
        for key, values in calibrate(o.folder).items():
            samples.setdefault(key, []).extend(values)
    return {
        "cost_model_median_abs_error": _median(ours),
        "cost_model_max_abs_error": max(ours) if ours else None,
        "paper_model_median_abs_error": _median(paper),
        "paper_model_max_abs_error": max(paper) if paper else None,
        "cost_model_rounds": len(ours),
        "pipeline_efficiency": _median([o.efficiency for o in capped if o.pipelined and o.efficiency]),
        **_split_ratio(good, "split", "optimized_vs_even"),
        "details": {
            "quick": quick,
            "priority_nice": NICE if _nice() else 0,
            "others_cores_median": _median([o.others_cores for o in outcomes if not math.isnan(o.others_cores)]),
            "compute_bound_abs_error_median": _median([abs(e) for o in compute for e in o.errors()]),
            "compute_bound_pipeline_efficiency": _median([o.efficiency for o in compute if o.efficiency]),
            **_split_ratio(good, "compute", "compute_bound_optimized_vs_even"),
            "overheads_model": asdict(costmodel.MEASURED),
            "overheads_measured": {k: statistics.median(v) for k, v in samples.items() if v},
            "failures": {o.config.name: o.failure for o in outcomes if o.failure},
            "runs": [_detail(o) for o in outcomes],
        },
    }


def _split_ratio(outcomes: list[Outcome], prefix: str, key: str) -> dict:
    """Measured (and predicted) round time of `prefix`-optimized ÷ `prefix`-even."""
    runs = {o.config.name: o for o in outcomes}
    best, even = runs.get(f"{prefix}-optimized"), runs.get(f"{prefix}-even")
    if best is None or even is None:
        return {}
    return {f"{key}_round_time_ratio": _mean_round(best) / _mean_round(even),
            f"{key}_predicted_ratio": best.predicted["round_seconds"] / even.predicted["round_seconds"]}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean_round(o: Outcome) -> float:
    return statistics.mean(r["seconds"] for r in o.rounds)


def _detail(o: Outcome) -> dict:
    if o.failure:
        return {"config": asdict(o.config), "failure": o.failure}
    return {"config": asdict(o.config), "plan": {"chain": o.plan["chain"], "assignments": o.plan["assignments"],
                                                 "owner_layers": o.plan["owner_layers"]},
            "predicted": o.predicted, "paper_seconds": o.paper_seconds, "rounds": o.rounds,
            "errors": o.errors(), "paper_errors": o.errors(paper=True), "period_measured": o.period,
            "efficiency": o.efficiency, "pipelined": o.pipelined, "others_cores": o.others_cores,
            "wall_seconds": o.wall_seconds}


HEADER = (f"{'configuration':16} {'split (chain: layers)':24} {'bound':8} {'others':>6} {'measured':>8} "
          f"{'ours':>7} {'err':>6} {'paper':>7} {'err':>6} {'period':>7} {'bound':>7} {'eff':>5}")


def row(o: Outcome) -> str:
    if o.failure:
        return f"{o.config.name:16} FAILED: {o.failure}"
    split = " ".join(f"{n}:{a}-{b}" for n, (a, b) in o.plan["assignments"].items())
    measured = _mean_round(o) if o.rounds else math.nan
    ours, paper = o.predicted["round_seconds"], o.paper_seconds
    bottleneck = o.predicted["bottleneck"].replace(" cycle", "")
    return (f"{o.config.name:16} {split:24} {bottleneck:8} {o.others_cores:6.2f} {measured:8.3f} {ours:7.3f} "
            f"{ours / measured - 1:+6.1%} {paper:7.3f} {paper / measured - 1:+6.1%} {o.period or math.nan:7.3f} "
            f"{o.predicted['period_bound_seconds']:7.3f} {o.efficiency or math.nan:5.2f}")


def footer(r: dict) -> str:
    d = r["details"]
    lines = ["", f"round time, |predicted / measured − 1| over {r['cost_model_rounds']} rounds (≥ 2):",
             f"  cost model  median {_pct(r['cost_model_median_abs_error'])}, max {_pct(r['cost_model_max_abs_error'])}",
             f"  paper model median {_pct(r['paper_model_median_abs_error'])}, max {_pct(r['paper_model_max_abs_error'])}",
             ("pipeline efficiency (bound ÷ measured period, runs bound by a shared resource): "
              f"{_num(r['pipeline_efficiency'])}; compute-bound (padded) runs: "
              f"{_num(d['compute_bound_pipeline_efficiency'])}, their round-time error "
              f"{_pct(d['compute_bound_abs_error_median'])}")]
    if "optimized_vs_even_round_time_ratio" in r:
        lines.append(f"optimized ÷ even split, measured round time: {r['optimized_vs_even_round_time_ratio']:.3f} "
                     f"(predicted {r['optimized_vs_even_predicted_ratio']:.3f}), capped links between nodes")
    if "compute_bound_optimized_vs_even_round_time_ratio" in d:
        lines.append(f"  compute-bound: {d['compute_bound_optimized_vs_even_round_time_ratio']:.3f} (predicted "
                     f"{d['compute_bound_optimized_vs_even_predicted_ratio']:.3f})")
    lines.append(f"others' CPU during the runs: median {_num(d['others_cores_median'])} cores; priority nice "
                 f"{d['priority_nice']}")
    lines.append("runtime overheads, model vs measured here: " + ", ".join(
        f"{k} {d['overheads_model'][k] * 1e3:.2f}/{v * 1e3:.2f} ms" for k, v in d["overheads_measured"].items()))
    for key, value in r.items():
        if key.startswith("scaling_") and key.endswith(("_round_time", "node_hours")):
            lines.append(f"{key}: {_num(value)}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of the matrix, two rounds each (~5 min)")
    parser.add_argument("--out", required=True, type=Path, help="folder for costmodel.json and every run")
    args = parser.parse_args(argv)
    run(args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
